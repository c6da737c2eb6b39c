"""Losses, metrics and the LR schedule against hand-computed values."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kswap_jax import losses, metrics
from kswap_jax.optim import schedules


def test_cross_entropy_masks_padded_slots():
  logits = jnp.array([[2.0, 0.0], [0.0, 0.0], [50.0, -50.0]])
  labels = jnp.array([0, 1, 1])
  mask = jnp.array([1.0, 1.0, 0.0])
  want = (math.log(1 + math.exp(-2.0)) + math.log(2.0)) / 2
  assert float(losses.cross_entropy(logits, labels, mask)) == pytest.approx(want, rel=1e-6)
  # Unmasked, the third (huge-loss) sample dominates.
  assert float(losses.cross_entropy(logits, labels)) > 30


def test_bounded_forgetting_value_and_gradient():
  bound = 105.0
  f = lambda ce: 0.2 * losses.bounded_forgetting(ce, bound)
  assert float(f(5.0)) == pytest.approx(20.0)
  assert float(jax.grad(f)(5.0)) == pytest.approx(-0.2)   # ascent on CE_f below the bound
  assert float(jax.grad(f)(110.0)) == 0.0                  # no gradient once above it
  assert float(f(110.0)) == 0.0


def test_bounded_forgetting_acts_on_the_batch_mean():
  logits = jnp.array([[0.0, 9.0], [0.0, 0.0]])
  labels = jnp.array([0, 0])

  def loss(z):
    return losses.bounded_forgetting(losses.cross_entropy(z, labels), 5.0)
  ce = [math.log(1 + math.exp(9.0)), math.log(2.0)]  # 9.0001, 0.693: mean 4.85 < 5
  assert float(loss(logits)) == pytest.approx(5.0 - sum(ce) / 2, rel=1e-5)
  g = jax.grad(loss)(logits)
  # Gradient is -∇ mean CE: both samples receive gradient though one is above the bound.
  assert float(jnp.abs(g[0]).sum()) > 0 and float(jnp.abs(g[1]).sum()) > 0


def test_top1_argmax_over_all_rows():
  logits = np.array([[0.1, 0.9, 0.0, 5.0], [3.0, 0.0, 0.0, 0.0]])
  # Row 3 (an unused "random" head row) wins for sample 0, as in the reference's arg-max.
  assert metrics.top1(logits, np.array([1, 0])) == 50.0
  assert math.isnan(metrics.top1(np.zeros((0, 4)), np.zeros((0,), np.int64)))
  # The masked arg-max over the 3 rows in use: row 3 cannot win, sample 0 is right.
  assert metrics.top1(logits, np.array([1, 0]), rows=3) == 100.0


@pytest.mark.parametrize("before,after,retain,want", [
    (70.88, 0.00, 71.16, 71.02), (87.40, 0.10, 85.00, 86.13), (72.74, 0.00, 70.81, 71.76),
    (74.65, 0.00, 74.16, 74.40), (73.86, 0.00, 73.56, 73.71)])
def test_h_mean_reproduces_gs_lora_table_entries(before, after, retain, want):
  assert round(metrics.h_mean(before, after, retain), 2) == want


def test_accuracy_of_empty_split_is_nan_not_zero():
  assert math.isnan(metrics.accuracy(0, 0))
  assert metrics.accuracy(3, 4) == 75.0


def test_epoch_cosine_matches_the_reference_per_epoch_values():
  lr = schedules.epoch_cosine(base=1e-2, minimum=1e-5, epochs=5)
  np.testing.assert_allclose([lr(e) for e in range(5)],
                             [1.0000e-2, 9.0460e-3, 6.5485e-3, 3.4615e-3, 9.640e-4], rtol=2e-4)
  # GS-LoRA: E = 100 gives lr(0) = 1e-2 and lr(50) = 5.005e-3.
  lr = schedules.epoch_cosine(base=1e-2, minimum=1e-5, epochs=100)
  assert lr(0) == pytest.approx(1e-2, rel=1e-6) and lr(50) == pytest.approx(5.005e-3, rel=1e-5)


def test_warmup_then_cosine():
  lr = schedules.warmup_epoch_cosine(base=1.0, minimum=0.0, epochs=6, warmup_epochs=2)
  lrs = [lr(e) for e in range(6)]
  assert lrs[:3] == [0.5, 1.0, 1.0]
  assert lrs[3] < lrs[2] and lrs[5] < lrs[4]
