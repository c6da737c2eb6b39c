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
