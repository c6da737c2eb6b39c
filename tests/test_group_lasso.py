"""Group-lasso penalty and proximal operator on hand-computed literal trees."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kswap_jax.optim import group_lasso


def _tree(a0, a1):
  # Two blocks, one module each; b leaves zero.
  mk = lambda a: {"M": {"a": jnp.asarray(a, jnp.float32), "b": jnp.zeros((2, 1))}}
  return {"Transformer": {"encoderblock_0": mk(a0), "encoderblock_1": mk(a1)}}


def test_penalty_value_and_gradient_by_hand():
  t = _tree([[3.0, 4.0]], [[0.0, 0.0]])
  assert float(group_lasso.group_lasso_penalty(t)) == pytest.approx(5.0)
  g = jax.grad(group_lasso.group_lasso_penalty)(t)
  np.testing.assert_allclose(g["Transformer"]["encoderblock_0"]["M"]["a"], [[0.6, 0.8]])
  # The all-zero group: the gradient is 0, not NaN (safe norm).
  np.testing.assert_array_equal(g["Transformer"]["encoderblock_1"]["M"]["a"], [[0.0, 0.0]])
  assert all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves(g))


def test_penalty_groupings():
  t = _tree([[3.0, 4.0]], [[1.0, 0.0]])
  t["Transformer"]["encoderblock_0"]["M"]["b"] = jnp.asarray([[12.0], [0.0]])
  # block: sqrt(9 + 16 + 144) + 1 = 14; leaf: 5 + 12 + 1 = 18.
  assert float(group_lasso.group_lasso_penalty(t, "block")) == pytest.approx(14.0)
  assert float(group_lasso.group_lasso_penalty(t, "leaf")) == pytest.approx(18.0)


def test_prox_block_soft_thresholds_each_group():
  t = _tree([[3.0, 4.0]], [[0.3, 0.4]])
  tx = group_lasso.group_lasso_prox(strength=2.0, learning_rate=0.5)
  zero = jax.tree_util.tree_map(jnp.zeros_like, t)
  updates, _ = tx.update(zero, tx.init(t), t)
  new = optax.apply_updates(t, updates)
  # τ = 0.5 * 2 = 1: ||(3,4)|| = 5 -> scaled by 1 - 1/5; ||(.3,.4)|| = .5 <= τ -> exactly 0.
  np.testing.assert_allclose(new["Transformer"]["encoderblock_0"]["M"]["a"], [[2.4, 3.2]],
                             rtol=1e-6)
  np.testing.assert_array_equal(new["Transformer"]["encoderblock_1"]["M"]["a"], [[0.0, 0.0]])


def test_prox_after_optimizer_update_in_chain():
  t = _tree([[3.0, 4.0]], [[0.0, 1.0]])
  tx = optax.chain(optax.sgd(0.5), group_lasso.group_lasso_prox(1.0, 0.5))
  grads = jax.tree_util.tree_map(jnp.ones_like, t)
  updates, _ = tx.update(grads, tx.init(t), t)
  new = optax.apply_updates(t, updates)
  # SGD step: a0 -> (2.5, 3.5), b0 -> (-.5, -.5); group norm sqrt(6.25+12.25+.5) = sqrt(19).
  pre = np.array([2.5, 3.5, -0.5, -0.5])
  factor = 1 - 0.5 / np.linalg.norm(pre)
  np.testing.assert_allclose(new["Transformer"]["encoderblock_0"]["M"]["a"],
                             [pre[:2] * factor], rtol=1e-6)


def test_prox_with_injected_learning_rate_is_jittable():
  t = _tree([[3.0, 4.0]], [[0.0, 1.0]])

  def make(learning_rate):
    return optax.chain(optax.sgd(learning_rate),
                       group_lasso.group_lasso_prox(1.0, learning_rate))
  tx = optax.inject_hyperparams(make)(learning_rate=0.1)
  state = tx.init(t)

  @jax.jit
  def step(t, state):
    grads = jax.tree_util.tree_map(jnp.zeros_like, t)
    u, state = tx.update(grads, state, t)
    return optax.apply_updates(t, u), state
  new, _ = step(t, state)
  np.testing.assert_allclose(new["Transformer"]["encoderblock_0"]["M"]["a"],
                             [[3 * 0.98, 4 * 0.98]], rtol=1e-6)


def test_an_empty_tree_is_named():
  from kswap_jax.errors import ConfigError  # pylint: disable=import-outside-toplevel
  with pytest.raises(ConfigError, match=r"^group_lasso: the LoRA tree has no leaves"):
    group_lasso.group_lasso_penalty({})


def test_prox_refuses_a_negative_strength_and_an_unknown_grouping_when_built():
  with pytest.raises(ValueError, match="^strength: expected λ >= 0, got -1.0"):
    group_lasso.group_lasso_prox(-1.0, 1e-2)
  with pytest.raises(ValueError, match="^grouping: unknown grouping 'blocks'"):
    group_lasso.group_lasso_prox(0.1, 1e-2, grouping="blocks")
  with pytest.raises(ValueError, match="^strength: expected λ >= 0, got -0.1"):
    group_lasso.group_lasso_prox(jnp.asarray(-0.1, jnp.float32), 1e-2)
  # A traced strength (e.g. injected into the optimizer state) cannot be checked when built.
  jax.jit(lambda a: group_lasso.group_lasso_prox(a, 1e-2).init({}))(jnp.asarray(-0.1))
