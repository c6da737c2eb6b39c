"""Learning-rate schedules evaluated on the host at epoch granularity.

The reference implementations step timm's cosine scheduler once per epoch
(`lr_scheduler.step(epoch)`), so the LR is constant within an epoch. These are optax
schedules indexed by the epoch; the host evaluates them and injects the value into the
jitted step (`optax.inject_hyperparams`), which lets a schedule restart per stage while the
optimizer state (Adam moments and count) carries on.
"""

from __future__ import annotations

import functools
from typing import Callable

import optax


def _on_host(schedule: optax.Schedule) -> Callable[[int], float]:
  """epoch -> float, each epoch's value computed once."""
  return functools.lru_cache(maxsize=None)(lambda epoch: float(schedule(int(epoch))))


def epoch_cosine(*, base: float, minimum: float, epochs: int) -> Callable[[int], float]:
  """lr(e) = min + ½ (base − min) (1 + cos(π e / E)), timm's per-epoch cosine, no warm-up.

  Example: base 1e-2, min 1e-5, E = 5 gives 1.0000e-2, 9.0460e-3, 6.5485e-3, 3.4615e-3,
  9.640e-4 for e = 0..4 (Knowledge Swapping); E = 100 gives lr(50) = 5.005e-3 (GS-LoRA).

  Returns:
    epoch -> learning rate (a host float).
  """
  alpha = minimum / base if base else 0.0
  return _on_host(optax.cosine_decay_schedule(base, max(1, int(epochs)), alpha=alpha))


def warmup_epoch_cosine(*, base: float, minimum: float, epochs: int,
                        warmup_epochs: int) -> Callable[[int], float]:
  """Linear warm-up base/W, 2·base/W, ..., base over W = `warmup_epochs` epochs, then
  `epoch_cosine` over the remaining epochs."""
  warmup_epochs = int(warmup_epochs)
  cosine = optax.cosine_decay_schedule(base, max(1, int(epochs) - warmup_epochs),
                                       alpha=minimum / base if base else 0.0)
  if warmup_epochs <= 0:
    return _on_host(cosine)
  ramp = optax.linear_schedule(base / warmup_epochs, base, max(1, warmup_epochs - 1))
  return _on_host(optax.join_schedules([ramp, cosine], boundaries=[warmup_epochs]))


def structure_alpha(*, alpha: float, alpha_epoch: int = 0, warmup_alpha: bool = False,
                    big_alpha: float = 0.0) -> Callable[[int], float]:
  """GS-LoRA's step schedule for the weight α of the group-sparse structure term.

      α(e) = 0                                     if e < alpha_epoch
             big_alpha if warmup_alpha else alpha  otherwise

  The reference's single-step engine gates the term for e < alpha_epoch (shipped: 20); its
  continual engine has no gate (set alpha_epoch = 0: constant α, shipped 1e-4) unless the
  warm-up is on, which gives 0 before alpha_epoch and big_alpha after it in both engines
  (the missing-class runs: 0 until epoch 30, then 0.015).

  Args:
    alpha: α without the warm-up.
    alpha_epoch: first (0-based) epoch of a task with the structure term on.
    warmup_alpha: use big_alpha once the gate opens.
    big_alpha: α after the gate when warmup_alpha is set.

  Returns:
    epoch -> α (a host float).

  Example:
    >>> schedule = structure_alpha(alpha=0.01, alpha_epoch=20)
    >>> schedule(19), schedule(20)
    (0.0, 0.01)

  References: Zhao et al., arXiv 2403.11530 (GS-LoRA).
  """
  after = float(big_alpha) if warmup_alpha else float(alpha)
  gate = int(alpha_epoch)
  return lambda epoch: 0.0 if int(epoch) < gate else after
