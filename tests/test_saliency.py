"""Fisher diagonals and saliency masks on literal trees and a tiny BatchNorm model."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kswap_jax import losses
from kswap_jax.optim import saliency


def test_fisher_diagonal_is_the_mean_of_squared_minibatch_gradients():
  params = {"a": jnp.zeros(2), "b": {"c": jnp.zeros((1, 2))}}
  grads = [{"a": jnp.array([1.0, -2.0]), "b": {"c": jnp.array([[3.0, 0.0]])}},
           {"a": jnp.array([3.0, 0.0]), "b": {"c": jnp.array([[-1.0, 0.0]])}}]
  f = saliency.fisher_diagonal(lambda p, g: g, params, grads)
  np.testing.assert_allclose(np.asarray(f["a"]), [5.0, 2.0])
  np.testing.assert_allclose(np.asarray(f["b"]["c"]), [[5.0, 0.0]])
  assert f["a"].dtype == jnp.float32
  m = saliency.gradient_magnitude(lambda p, g: g, params, grads)
  np.testing.assert_allclose(np.asarray(m["a"]), [4.0, 2.0])
  with pytest.raises(ValueError, match="batches"):
    saliency.fisher_diagonal(lambda p, g: g, params, [])


class TinyBN(nn.Module):
  @nn.compact
  def __call__(self, x, train=False):
    x = nn.Dense(6, name="dense")(x)
    x = nn.BatchNorm(use_running_average=not train, name="bn")(x)
    return nn.Dense(3, name="head")(nn.relu(x))


def test_balanced_mask_covers_every_leaf_including_batchnorm_affine():
  model = TinyBN()
  variables = model.init(jax.random.key(0), jnp.zeros((1, 4)))
  params, stats = variables["params"], variables["batch_stats"]

  def batch(seed):
    rr = np.random.RandomState(seed)
    return {"image": rr.randn(8, 4).astype(np.float32),
            "label": rr.randint(0, 3, 8), "mask": np.ones(8, np.float32)}

  @jax.jit
  def grad_fn(p, b):   # eval mode: running statistics, nothing mutable
    def loss(p):
      logits = model.apply({"params": p, "batch_stats": stats}, b["image"], train=False)
      return losses.cross_entropy(logits, b["label"], b["mask"])
    return jax.grad(loss)(p)

  f_u = saliency.fisher_diagonal(grad_fn, params, [batch(1), batch(2)])
  f_r = saliency.fisher_diagonal(grad_fn, params, [batch(3), batch(4), batch(5)])
  g = [grad_fn(params, batch(s)) for s in (1, 2)]
  want = jax.tree_util.tree_map(lambda x, y: (x ** 2 + y ** 2) / 2, *g)
  for a, b in zip(jax.tree_util.tree_leaves(f_u), jax.tree_util.tree_leaves(want)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)
  mask = saliency.balanced_ratio_mask(f_u, f_r)
  assert jax.tree_util.tree_structure(mask) == jax.tree_util.tree_structure(params)
  assert set(mask["bn"]) == {"scale", "bias"}
  for m, p in zip(jax.tree_util.tree_leaves(mask), jax.tree_util.tree_leaves(params)):
    assert m.shape == p.shape and m.dtype == jnp.float32
    assert set(np.unique(np.asarray(m))) <= {0.0, 1.0}
  kept = saliency.mask_sparsity(mask)["kept"]
  assert 0 < kept < sum(p.size for p in jax.tree_util.tree_leaves(params))


def test_ratio_rule_with_ties_and_zeros():
  f_u = {"w": jnp.array([0.0, 2.0, 1.0, 0.0, 1e-16])}
  f_r = {"w": jnp.array([0.0, 2.0, 3.0, 1e-10, 0.0])}
  np.testing.assert_array_equal(np.asarray(saliency.balanced_ratio_mask(f_u, f_r)["w"]),
                                [1.0, 1.0, 0.0, 0.0, 1.0])
  # γ moves the threshold: 1/3 ≥ 0.3 passes.
  np.testing.assert_array_equal(
      np.asarray(saliency.balanced_ratio_mask(f_u, f_r, threshold=0.3)["w"]),
      [1.0, 1.0, 1.0, 0.0, 1.0])
  with pytest.raises(ValueError, match="denominator"):
    saliency.balanced_ratio_mask(f_u, {"v": f_r["w"]})


def test_clu_mask_reduces_to_sfron_and_places_the_learn_fisher():
  f_u = {"w": jnp.array([1.0, 1.0, 4.0])}
  f_r = {"w": jnp.array([0.5, 2.0, 1.0])}
  f_l = {"w": jnp.array([1.0, 0.0, 4.0])}
  np.testing.assert_array_equal(np.asarray(saliency.clu_ratio_mask(f_u, f_r)["w"]),
                                np.asarray(saliency.balanced_ratio_mask(f_u, f_r)["w"]))
  # Denominator p_R·F_R + p_L·F_L = (1.5, 2, 5) -> ratios (0.67, 0.5, 0.8).
  np.testing.assert_array_equal(
      np.asarray(saliency.clu_ratio_mask(f_u, f_r, f_l)["w"]), [0.0, 0.0, 0.0])
  # Numerator p_U·F_U + p_L·F_L = (2, 1, 8) over (0.5, 2, 1) -> (4, 0.5, 8).
  np.testing.assert_array_equal(
      np.asarray(saliency.clu_ratio_mask(f_u, f_r, f_l, learn_in="numerator")["w"]),
      [1.0, 0.0, 1.0])
  # Partition weights: p_U = 0.1, p_R = 0.9 -> (0.2, 0.056, 0.44).
  pu, pr, pl = saliency.partition_weights(10, 90)
  assert (pu, pr, pl) == (0.1, 0.9, 0.0)
  np.testing.assert_array_equal(
      np.asarray(saliency.clu_ratio_mask(f_u, f_r, p_unlearn=pu, p_remain=pr)["w"]),
      [0.0, 0.0, 0.0])
  with pytest.raises(ValueError, match="learn_in"):
    saliency.clu_ratio_mask(f_u, f_r, f_l, learn_in="both")


def test_topk_mask_keeps_the_global_top_fraction():
  sal = {"a": jnp.array([0.1, 5.0, 0.3]), "b": jnp.array([[4.0, 0.2], [3.0, 0.0]])}
  mask = saliency.topk_mask(sal, 0.5)   # 7 values -> top 3: 5, 4, 3
  np.testing.assert_array_equal(np.asarray(mask["a"]), [0.0, 1.0, 0.0])
  np.testing.assert_array_equal(np.asarray(mask["b"]), [[1.0, 0.0], [1.0, 0.0]])
  assert saliency.mask_sparsity(saliency.topk_mask(sal, 0.0))["kept"] == 0
  assert saliency.mask_sparsity(saliency.topk_mask(sal, 1.0))["kept"] == 7
  summary = saliency.mask_sparsity(mask)
  assert summary["kept"] == 3 and summary["total"] == 7
  assert summary["per_leaf"] == {"a": pytest.approx(1 / 3), "b": pytest.approx(0.5)}
  with pytest.raises(ValueError, match="fraction"):
    saliency.topk_mask(sal, 1.5)
  # Ties: exactly k kept, the earlier positions first.
  tied = saliency.topk_mask({"a": jnp.array([1.0, 2.0, 2.0, 2.0, 0.0])}, 0.4)
  np.testing.assert_array_equal(np.asarray(tied["a"]), [0.0, 1.0, 1.0, 0.0, 0.0])
