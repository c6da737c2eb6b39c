"""Learning-rate schedules evaluated on the host at epoch granularity.

The reference implementations step timm's cosine scheduler once per epoch
(`lr_scheduler.step(epoch)`), so the LR is constant within an epoch. The host computes
it and injects it into the jitted step (`optax.inject_hyperparams`), which lets a
schedule restart per stage while the optimizer state (Adam moments and count) carries on.
"""

import math


def epoch_cosine(epoch: int, *, base: float, minimum: float, epochs: int) -> float:
  """lr(e) = min + ½ (base − min) (1 + cos(π e / E)), timm's per-epoch cosine, no warm-up.

  Example: base 1e-2, min 1e-5, E = 5 gives 1.0000e-2, 9.0460e-3, 6.5485e-3, 3.4615e-3,
  9.640e-4 for e = 0..4 (Knowledge Swapping spec §4.2).
  """
  return minimum + 0.5 * (base - minimum) * (1.0 + math.cos(math.pi * epoch / epochs))


def warmup_epoch_cosine(epoch: int, *, base: float, minimum: float, epochs: int,
                        warmup_epochs: int) -> float:
  """Linear warm-up from base/warmup over `warmup_epochs`, then `epoch_cosine` on the rest."""
  if epoch < warmup_epochs:
    return base * (epoch + 1) / warmup_epochs
  return epoch_cosine(epoch - warmup_epochs, base=base, minimum=minimum,
                      epochs=max(1, epochs - warmup_epochs))


def structure_alpha(epoch: int, *, alpha: float, alpha_epoch: int = 0,
                    warmup_alpha: bool = False, big_alpha: float = 0.0) -> float:
  """GS-LoRA's step schedule for the weight α of the group-sparse structure term.

      α(e) = 0                                   if e < alpha_epoch
             big_alpha if warmup_alpha else alpha  otherwise

  The reference's single-step engine gates the term for e < alpha_epoch (shipped: 20); its
  continual engine has no gate (set alpha_epoch = 0: constant α, shipped 1e-4) unless the
  warm-up is on, which gives 0 before alpha_epoch and big_alpha after it in both engines
  (the missing-class runs: 0 until epoch 30, then 0.015).

  Args:
    epoch: 0-based epoch within the task.
    alpha: α without the warm-up.
    alpha_epoch: first epoch with the structure term on.
    warmup_alpha: use big_alpha once the gate opens.
    big_alpha: α after the gate when warmup_alpha is set.

  Returns:
    α for this epoch.

  Example:
    >>> [structure_alpha(e, alpha=0.01, alpha_epoch=20) for e in (19, 20)]
    [0.0, 0.01]

  References: Zhao et al., arXiv 2403.11530 (GS-LoRA).
  """
  if epoch < alpha_epoch:
    return 0.0
  return float(big_alpha) if warmup_alpha else float(alpha)
