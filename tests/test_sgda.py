"""SCRUB-S's smoothing transform (`kswap_jax.optim.sgda`): its gradient is that of the
term it stands for, θ̄ is torch's exponential AveragedModel, refreshed when asked."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from kswap_jax.optim import sgda


def _tree(seed):
  k = jax.random.split(jax.random.key(seed), 4)
  attn = "Transformer/encoderblock_0/MultiHeadDotProductAttention_1"
  return {"Transformer": {"encoderblock_0": {"MultiHeadDotProductAttention_1": {
      name: {"kernel": jax.random.normal(k[i], (4, 2, 3))}
      for i, name in enumerate(("query", "key", "value"))}}},
      "head": {"kernel": jax.random.normal(k[3], (5, 2))}}, attn


def test_the_added_gradient_is_the_terms_gradient_with_fused_qkv_norms():
  params, _ = _tree(0)
  average, _ = _tree(1)
  tx = sgda.smoothing(0.3, group_of=sgda.fused_qkv)
  state = tx.init(average)  # θ̄ = `average`
  zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
  added, state = tx.update(zeros, state, params)
  want = jax.grad(lambda p: sgda.smoothing_value(p, average, 0.3, sgda.fused_qkv))(params)
  for a, w in zip(jax.tree_util.tree_leaves(added), jax.tree_util.tree_leaves(want)):
    np.testing.assert_allclose(a, w, rtol=1e-5, atol=1e-7)
  # q, k and v share one norm: Σ over 2 tensors, not 4.
  qkv = [p - a for p, a in zip(jax.tree_util.tree_leaves(params)[:3],
                               jax.tree_util.tree_leaves(average)[:3])]
  head = params["head"]["kernel"] - average["head"]["kernel"]
  value = 0.3 * (np.sqrt(sum(float(jnp.sum(d ** 2)) for d in qkv))
                 + float(jnp.linalg.norm(head)))
  np.testing.assert_allclose(sgda.smoothing_value(params, average, 0.3, sgda.fused_qkv),
                             value, rtol=1e-5)
  assert int(state.num_averaged) == 0  # no refresh asked


def test_refreshes_copy_first_then_average_exponentially_and_equal_weights_add_nothing():
  p0, _ = _tree(0)
  p1, _ = _tree(1)
  p2, _ = _tree(2)
  tx = optax.inject_hyperparams(lambda refresh: sgda.smoothing(0.5, beta=0.1,
                                                               refresh=refresh))(refresh=0.0)
  state = tx.init(p0)
  zeros = jax.tree_util.tree_map(jnp.zeros_like, p0)
  added, _ = tx.update(zeros, state, p0)  # θ = θ̄: no gradient, and not NaN
  assert all(np.all(x == 0) for x in jax.tree_util.tree_leaves(added))
  state.hyperparams["refresh"] = jnp.asarray(1.0)
  _, state = tx.update(zeros, state, p1)  # the first refresh copies the weights
  inner = state.inner_state
  for a, p in zip(jax.tree_util.tree_leaves(inner.average), jax.tree_util.tree_leaves(p1)):
    np.testing.assert_array_equal(a, p)
  _, state = tx.update(zeros, state, p2)  # then (1 − β) θ̄ + β θ
  for a, x, y in zip(jax.tree_util.tree_leaves(state.inner_state.average),
                     jax.tree_util.tree_leaves(p1), jax.tree_util.tree_leaves(p2)):
    np.testing.assert_allclose(a, 0.9 * x + 0.1 * y, rtol=1e-6)
  assert int(state.inner_state.num_averaged) == 2
  state.hyperparams["refresh"] = jnp.asarray(0.0)
  before = jax.tree_util.tree_leaves(state.inner_state.average)
  _, state = tx.update(zeros, state, p0)  # no refresh: θ̄ kept
  for a, b in zip(jax.tree_util.tree_leaves(state.inner_state.average), before):
    np.testing.assert_array_equal(a, b)
