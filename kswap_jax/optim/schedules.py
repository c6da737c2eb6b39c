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
