"""Adaptive ascent, plain GA and random-other-label targets against hand-computed values."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kswap_jax import losses


def test_per_sample_cross_entropy_zeroes_padded_slots():
  logits = jnp.array([[2.0, 0.0], [0.0, 0.0], [50.0, -50.0]])
  labels = jnp.array([0, 1, 1])
  got = losses.per_sample_cross_entropy(logits, labels, jnp.array([1.0, 1.0, 0.0]))
  np.testing.assert_allclose(np.asarray(got), [math.log(1 + math.exp(-2.0)), math.log(2.0), 0.0],
                             rtol=1e-6)


def test_adaptive_weights_sum_to_one_and_favour_low_loss():
  ell = jnp.array([0.25, 1.0, 4.0, 9.0])
  mask = jnp.array([1.0, 1.0, 1.0, 0.0])
  w = losses.adaptive_ascent_weights(ell, mask, lambd=0.5)
  coef = np.array([2.0, 1.0, 0.5])            # 1/sqrt(ℓ)
  np.testing.assert_allclose(np.asarray(w), list(coef / coef.sum()) + [0.0], rtol=1e-6)
  assert float(jnp.sum(w)) == pytest.approx(1.0)
  assert float(w[0]) > float(w[1]) > float(w[2])
  # λ = 0: 1/B over the valid samples.
  w0 = losses.adaptive_ascent_weights(ell, mask, lambd=0.0)
  np.testing.assert_allclose(np.asarray(w0), [1 / 3, 1 / 3, 1 / 3, 0.0], rtol=1e-6)
  # λ < 0 turns the rule around (up-weights high-loss samples, e.g. for new data).
  wn = losses.adaptive_ascent_weights(ell, mask, lambd=-0.5)
  assert float(wn[2]) > float(wn[1]) > float(wn[0])
  # A zero loss is finite (ε in the reciprocal) and takes all the weight.
  wz = losses.adaptive_ascent_weights(jnp.array([0.0, 1.0]), lambd=0.5)
  assert float(wz[0]) == pytest.approx(1.0) and bool(jnp.all(jnp.isfinite(wz)))


def test_adaptive_loss_value_and_gradient_through_the_losses_only():
  logits = jnp.array([[3.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, -2.0], [9.0, 9.0, 9.0]])
  labels = jnp.array([0, 0, 2, 1])
  mask = jnp.array([1.0, 1.0, 1.0, 0.0])
  ell = losses.per_sample_cross_entropy(logits, labels, mask)
  w = losses.adaptive_ascent_weights(ell, mask, 0.5)
  loss = losses.adaptive_ascent_loss(logits, labels, mask, 0.5)
  assert float(loss) == pytest.approx(float(jnp.sum(w * ell)), rel=1e-6)
  # Gradient = Σ w_i ∇ℓ_i with w held fixed (stop-gradient on the weights).
  g = jax.grad(lambda z: losses.adaptive_ascent_loss(z, labels, mask, 0.5))(logits)
  g_fixed = jax.grad(
      lambda z: jnp.sum(w * losses.per_sample_cross_entropy(z, labels, mask)))(logits)
  np.testing.assert_allclose(np.asarray(g), np.asarray(g_fixed), rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(np.asarray(g[3]), 0.0)   # padded slot
  g_w = jax.grad(lambda e: jnp.sum(losses.adaptive_ascent_weights(e, mask, 0.5)))(ell + 0.1)
  np.testing.assert_array_equal(np.asarray(g_w), 0.0)
  # λ = 0 and plain GA are the mean CE.
  ce = losses.cross_entropy(logits, labels, mask)
  ga = losses.adaptive_ascent_loss(logits, labels, mask, 0.0)
  assert float(ga) == pytest.approx(float(ce), rel=1e-6)
  assert float(losses.gradient_ascent_loss(logits, labels, mask)) == pytest.approx(float(ce))


def test_random_other_labels_never_the_true_one_and_uniform():
  labels = jnp.tile(jnp.arange(4), 5000)
  new = losses.random_other_labels(jax.random.key(0), labels, 4)
  assert new.dtype == jnp.int32
  assert not bool(jnp.any(new == labels))
  assert bool(jnp.all((new >= 0) & (new < 4)))
  counts = np.bincount(np.asarray(new[labels == 1]), minlength=4)
  assert counts[1] == 0 and np.all(np.abs(counts[[0, 2, 3]] / 5000 - 1 / 3) < 0.03)
  again = losses.random_other_labels(jax.random.key(0), labels, 4)
  np.testing.assert_array_equal(np.asarray(new), np.asarray(again))
  other = losses.random_other_labels(jax.random.key(1), labels, 4)
  assert bool(jnp.any(other != new))
  with pytest.raises(ValueError, match="num_classes"):
    losses.random_other_labels(jax.random.key(0), labels, 1)
