"""LoRA tree: counts, init bounds, unmerged vs merged forward, split/join, groups, norms."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_model_config
from kswap_jax import lora
from kswap_jax.errors import ConfigError
from kswap_jax.models import vit
from kswap_jax.optim import group_lasso


@pytest.fixture(scope="module")
def b16_abstract():
  cfg = tiny_model_config(num_classes=200, image_size=224, variant="B/16")
  model = vit.build(cfg)
  return jax.eval_shape(lambda: vit.init_params(model, cfg, jax.random.key(0)))


def test_b16_rank8_ffn_has_737280_parameters(b16_abstract):
  tree = jax.eval_shape(lambda: lora.init(b16_abstract, lora.LoraSpec(), jax.random.key(1)))
  assert lora.count(tree) == 737_280 == 12 * (8 * 768 + 3072 * 8 + 8 * 3072 + 768 * 8)
  fc1 = tree["Transformer"]["encoderblock_0"]["MlpBlock_3"]["Dense_0"]
  assert fc1["a"].shape == (768, 8) and fc1["b"].shape == (8, 3072)
  assert "MultiHeadDotProductAttention_1" not in tree["Transformer"]["encoderblock_0"]


def test_attention_targets_cover_qkv_and_out(b16_abstract):
  spec = lora.LoraSpec(targets=lora.ATTENTION_TARGETS)
  tree = jax.eval_shape(lambda: lora.init(b16_abstract, spec, jax.random.key(1)))
  att = tree["Transformer"]["encoderblock_3"]["MultiHeadDotProductAttention_1"]
  assert sorted(att) == ["key", "out", "query", "value"]
  assert att["query"]["a"].shape == (768, 8) and att["query"]["b"].shape == (8, 768)
  assert att["out"]["a"].shape == (768, 8)  # (heads, head_dim) flattened to 768 inputs
  assert lora.count(tree) == 12 * 4 * (768 * 8 + 8 * 768)


def test_init_bounds_match_the_reference_kaiming_sqrt50(b16_abstract):
  tree = lora.init(b16_abstract, lora.LoraSpec(), jax.random.key(1))
  blk = tree["Transformer"]["encoderblock_0"]["MlpBlock_3"]
  for name, fan_in, bound in (("Dense_0", 768, 0.0123768), ("Dense_1", 3072, 0.0061884)):
    assert math.isclose(math.sqrt(6 / (51 * fan_in)), bound, rel_tol=1e-5)
    a = np.asarray(blk[name]["a"])
    assert np.abs(a).max() <= bound and np.abs(a).max() > 0.95 * bound
    np.testing.assert_array_equal(blk[name]["b"], 0.0)
    # E||A||_F for uniform(-c, c) entries: c * sqrt(n / 3) = 0.560 (docs/knowledge_swapping.md).
    assert np.linalg.norm(a) == pytest.approx(bound * math.sqrt(a.size / 3), rel=0.02)


def test_omega_at_init_is_about_9_5_for_b16(b16_abstract):
  omega = jax.eval_shape(lambda: group_lasso.group_lasso_penalty(
      lora.init(b16_abstract, lora.LoraSpec(), jax.random.key(1))))
  assert omega.shape == ()
  value = float(group_lasso.group_lasso_penalty(
      lora.init(b16_abstract, lora.LoraSpec(), jax.random.key(1))))
  # Each block: sqrt(||A1||^2 + ||A2||^2) = sqrt(2 * 0.5601^2) = 0.792; 12 blocks: 9.505.
  expected = 12 * math.sqrt(0.0123768 ** 2 * 768 * 8 / 3 + 0.0061884 ** 2 * 3072 * 8 / 3)
  assert expected == pytest.approx(9.505, abs=0.01)
  assert value == pytest.approx(expected, rel=0.01)


def test_zero_init_lora_forward_equals_base(tiny):
  cfg, model, params = tiny
  spec = lora.LoraSpec(rank=4)
  tree = lora.init(params, spec, jax.random.key(1))
  x = jax.random.normal(jax.random.key(2), (2, 16, 16, 3))
  np.testing.assert_array_equal(
      lora.apply(model, params, tree, x, scale=spec.scale, features=True),
      model.apply({"params": params}, x, features=True))


@pytest.mark.parametrize("targets", [lora.FFN_TARGETS, lora.ATTENTION_TARGETS])
def test_merged_forward_equals_unmerged(tiny, targets):
  cfg, model, params = tiny
  spec = lora.LoraSpec(targets=targets, rank=4, alpha=2.0)
  tree = jax.tree_util.tree_map(lambda a: a + 0.2 * jax.random.normal(jax.random.key(3), a.shape),
                                lora.init(params, spec, jax.random.key(1)))
  x = jax.random.normal(jax.random.key(2), (2, 16, 16, 3))
  unmerged = lora.apply(model, params, tree, x, scale=spec.scale, features=True)
  merged = model.apply({"params": lora.merge(params, tree, spec.scale)}, x, features=True)
  base = model.apply({"params": params}, x, features=True)
  np.testing.assert_allclose(unmerged, merged, atol=1e-5)
  assert float(jnp.abs(unmerged - base).max()) > 1e-2  # LoRA really changes the output


def test_low_rank_gradients_are_those_of_the_plain_product():
  """lora.low_rank's hand-written backward (cotangent read in the forward's layout) gives
  jax's own gradients of (x a) b for every input, with leading batch axes."""
  k = jax.random.split(jax.random.key(0), 4)
  x = jax.random.normal(k[0], (3, 5, 16))
  a, b = jax.random.normal(k[1], (16, 4)), jax.random.normal(k[2], (4, 12))
  w = jax.random.normal(k[3], (3, 5, 12))  # a non-uniform cotangent
  mine = jax.grad(lambda *v: jnp.sum(lora.low_rank(*v) * w), argnums=(0, 1, 2))(x, a, b)
  plain = jax.grad(lambda x, a, b: jnp.sum((x @ a) @ b * w), argnums=(0, 1, 2))(x, a, b)
  np.testing.assert_array_equal(lora.low_rank(x, a, b), (x @ a) @ b)
  for got, want in zip(mine, plain):
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert float(jnp.abs(want).max()) > 1.0


def test_a_convolution_target_is_refused(tiny):
  """apply adds LoRA to Dense calls only, so a conv target (the patch embedding here) would
  train factors that never reach the forward: refused, naming the kernel."""
  _, _, params = tiny
  with pytest.raises(ConfigError, match=r"lora.targets: .*convolution kernel 'embedding/kernel'"):
    lora.init(params, lora.LoraSpec(targets=r"embedding/kernel|.*MlpBlock_3/Dense_0/kernel"),
              jax.random.key(0))


def test_merge_by_hand_and_unmerge_restores_base(tiny):
  _, _, params = tiny
  spec = lora.LoraSpec(rank=2, alpha=1.0)
  tree = lora.init(params, spec, jax.random.key(1))
  mod = tree["Transformer"]["encoderblock_1"]["MlpBlock_3"]["Dense_1"]
  mod["b"] = jnp.ones_like(mod["b"])
  merged = lora.merge(params, tree, spec.scale)
  kernel = params["Transformer"]["encoderblock_1"]["MlpBlock_3"]["Dense_1"]["kernel"]
  want = kernel + 0.5 * mod["a"] @ mod["b"]
  np.testing.assert_allclose(
      merged["Transformer"]["encoderblock_1"]["MlpBlock_3"]["Dense_1"]["kernel"], want,
      rtol=1e-6)
  # The base tree itself is untouched (pure functions).
  assert params["Transformer"]["encoderblock_1"]["MlpBlock_3"]["Dense_1"]["kernel"] is kernel
  restored = lora.unmerge(merged, tree, spec.scale)
  for a, b in zip(jax.tree_util.tree_leaves(restored), jax.tree_util.tree_leaves(params)):
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_merge_refuses_factors_that_do_not_fit_the_kernel(tiny):
  """A transposed pair (a (fan_out, r), b (r, fan_in)) has a product of the kernel's size:
  reshaped, it would merge into garbage weights."""
  _, _, params = tiny
  tree = lora.init(params, lora.LoraSpec(rank=2), jax.random.key(1))
  mod = tree["Transformer"]["encoderblock_0"]["MlpBlock_3"]["Dense_0"]
  a, b = mod["a"], mod["b"]
  mod["a"], mod["b"] = b.T, a.T
  for fn in (lora.merge, lora.unmerge):
    with pytest.raises(ConfigError, match=r"lora: module Transformer/encoderblock_0/MlpBlock_3/"
                                          r"Dense_0: a \(\d+, 2\) and b \(2, \d+\) do not fit"):
      fn(params, tree, 0.5)


@pytest.mark.parametrize("rank", [0, -2, 1.5, True])
def test_a_spec_built_in_code_refuses_a_bad_rank(rank):
  with pytest.raises(ConfigError, match=r"^lora.rank: expected an int >= 1"):
    lora.LoraSpec(rank=rank)


def test_a_spec_built_in_code_refuses_a_bad_targets_regex():
  with pytest.raises(ConfigError, match=r"^lora.targets: invalid regex"):
    lora.LoraSpec(targets="(")
  assert lora.LoraSpec(rank=np.int64(4)).scale == 0.25  # numpy ints are ints


def test_split_inverts_join(tiny):
  _, _, params = tiny
  tree = lora.init(params, lora.LoraSpec(rank=2), jax.random.key(1))
  joined = lora.join(params, tree)
  assert "lora_a" in joined["Transformer"]["encoderblock_0"]["MlpBlock_3"]["Dense_0"]
  base, again = lora.split(joined)
  assert jax.tree_util.tree_structure(base) == jax.tree_util.tree_structure(params)
  jax.tree_util.tree_map(np.testing.assert_array_equal, again, tree)


def test_bad_specs_raise_config_errors(tiny):
  _, _, params = tiny
  with pytest.raises(ConfigError, match="lora.targets"):
    lora.init(params, lora.LoraSpec(targets=r"nothing/matches"), jax.random.key(0))
  cfg = tiny_model_config()
  import ml_collections
  bad = ml_collections.ConfigDict(dict(targets=lora.FFN_TARGETS, rank=0, alpha=1.0,
                                       init_slope=1.0))
  with pytest.raises(ConfigError, match="lora.rank"):
    lora.LoraSpec.from_config(bad)
  bad.rank, bad.targets = 4, "("
  with pytest.raises(ConfigError, match="lora.targets"):
    lora.LoraSpec.from_config(bad)
  del cfg


def test_groups_and_block_norms(tiny):
  _, _, params = tiny
  spec = lora.LoraSpec(rank=2)
  tree = lora.init(params, spec, jax.random.key(1))
  blocks = lora.groups(tree, "block")
  assert list(blocks) == ["Transformer/encoderblock_0", "Transformer/encoderblock_1"]
  assert len(blocks["Transformer/encoderblock_0"]) == 4  # a, b of fc1 and fc2
  assert len(lora.groups(tree, "module")) == 4 and len(lora.groups(tree, "leaf")) == 8
  norms = lora.block_norms(tree, spec.scale)
  a0 = tree["Transformer"]["encoderblock_0"]["MlpBlock_3"]["Dense_0"]["a"]
  a1 = tree["Transformer"]["encoderblock_0"]["MlpBlock_3"]["Dense_1"]["a"]
  assert norms["sum_frobenius"]["Transformer/encoderblock_0"] == pytest.approx(
      float(jnp.linalg.norm(a0) + jnp.linalg.norm(a1)), rel=1e-6)
  assert norms["delta_w"]["Transformer/encoderblock_0"] == 0.0  # b = 0 at init
  with pytest.raises(ConfigError, match="grouping"):
    lora.groups(tree, "layer")
