"""ViT naming/shape parity with vit_jax checkpoints and architecture details."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_model_config
from kswap_jax import lora
from kswap_jax.errors import ConfigError
from kswap_jax.models import vit


def _shapes(variant, num_classes=1000, image_size=224):
  cfg = tiny_model_config(num_classes=num_classes, image_size=image_size, variant=variant)
  model = vit.build(cfg)
  abstract = jax.eval_shape(lambda: vit.init_params(model, cfg, jax.random.key(0)))
  return {n: x.shape for n, x in lora.named_leaves(abstract)}


def test_b16_names_and_shapes_match_vit_jax_npz_layout():
  shapes = _shapes("B/16")
  assert shapes["embedding/kernel"] == (16, 16, 3, 768)
  assert shapes["cls"] == (1, 1, 768)
  assert shapes["Transformer/posembed_input/pos_embedding"] == (1, 197, 768)
  block = "Transformer/encoderblock_11/"
  assert shapes[block + "LayerNorm_0/scale"] == (768,)
  assert shapes[block + "MultiHeadDotProductAttention_1/query/kernel"] == (768, 12, 64)
  assert shapes[block + "MultiHeadDotProductAttention_1/out/kernel"] == (12, 64, 768)
  assert shapes[block + "LayerNorm_2/bias"] == (768,)
  assert shapes[block + "MlpBlock_3/Dense_0/kernel"] == (768, 3072)
  assert shapes[block + "MlpBlock_3/Dense_1/kernel"] == (3072, 768)
  assert shapes["Transformer/encoder_norm/scale"] == (768,)
  assert shapes["head/kernel"] == (768, 1000)
  assert "Transformer/encoderblock_12/LayerNorm_0/scale" not in shapes
  # The published ViT-B/16 (1000 classes) has 86,567,656 parameters.
  assert sum(int(np.prod(s)) for s in shapes.values()) == 86_567_656


@pytest.mark.parametrize("variant,width,depth", [("Ti/16", 192, 12), ("S/32", 384, 12),
                                                 ("L/16", 1024, 24), ("test/4", 64, 2)])
def test_variants(variant, width, depth):
  shapes = _shapes(variant, image_size=32 if variant.startswith("test") else 224)
  assert shapes["cls"] == (1, 1, width)
  assert sum(n.endswith("LayerNorm_0/scale") for n in shapes) == depth


def test_mlp_block_uses_exact_erf_gelu():
  block = vit.MlpBlock(mlp_dim=8, dropout=0.0)
  x = jax.random.normal(jax.random.key(0), (3, 4)) * 3
  p = block.init(jax.random.key(1), x, deterministic=True)["params"]
  h = x @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"]
  erf_gelu = 0.5 * h * (1 + jax.scipy.special.erf(h / np.sqrt(2)))
  want = erf_gelu @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"]
  got = block.apply({"params": p}, x, deterministic=True)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  tanh_gelu = jax.nn.gelu(h, approximate=True) @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"]
  assert float(jnp.abs(got - tanh_gelu).max()) > 1e-5  # the test can tell the two apart


def _dropout_model():
  """(config, model, params, images) of the tiny ViT with dropout 0.5."""
  cfg = tiny_model_config()
  cfg.dropout = 0.5
  model = vit.build(cfg)
  return (cfg, model, vit.init_params(model, cfg, jax.random.key(0)),
          jax.random.normal(jax.random.key(1), (2, 16, 16, 3)))


def test_dropout_active_only_in_training():
  _, model, params, x = _dropout_model()
  f_eval = model.apply({"params": params}, x, features=True)
  f_eval2 = model.apply({"params": params}, x, features=True)
  f_train = model.apply({"params": params}, x, features=True, train=True,
                        rngs={"dropout": jax.random.key(2)})
  np.testing.assert_array_equal(f_eval, f_eval2)
  assert float(jnp.abs(f_train - f_eval).max()) > 1e-3


def test_train_blocks_keeps_dropout_to_the_lower_blocks():
  """LIRF's student: dropout in the blocks below `train_blocks`, the rest as in evaluation."""
  cfg, model, params, x = _dropout_model()
  kw = dict(features=True, train=True, rngs={"dropout": jax.random.key(2)})
  np.testing.assert_array_equal(model.apply({"params": params}, x, **kw),
                                model.apply({"params": params}, x, train_blocks=2, **kw))
  _, state = model.apply({"params": params}, x, train_blocks=1, mutable=["intermediates"],
                         capture_intermediates=lambda m, _: m.name in ("encoderblock_0",
                                                                      "Transformer"), **kw)
  inter = state["intermediates"]["Transformer"]
  mid, out = inter["encoderblock_0"]["__call__"][0], inter["__call__"][0]
  block_cfg = vit.vit_config(cfg)
  top = params["Transformer"]
  upper = vit.Encoder1DBlock(block_cfg).apply({"params": top["encoderblock_1"]}, mid, True)
  normed = nn.LayerNorm(epsilon=block_cfg.layer_norm_eps).apply(
      {"params": top["encoder_norm"]}, upper)
  np.testing.assert_allclose(out, normed, rtol=1e-5, atol=1e-6)  # block 1 in eval mode
  full = model.apply({"params": params}, x, mutable=["intermediates"],
                     capture_intermediates=lambda m, _: m.name == "Transformer", **kw)[1]
  assert float(jnp.abs(full["intermediates"]["Transformer"]["__call__"][0] - out).max()) > 1e-3


@pytest.mark.parametrize("field,value", [("variant", "Q/16"), ("variant", "B"),
                                         ("variant", "B/0"), ("image_size", 30),
                                         ("num_heads", 3)])
def test_bad_model_fields_raise_config_error_naming_the_field(field, value):
  cfg = tiny_model_config()
  cfg[field] = value
  with pytest.raises(ConfigError, match=f"model.{field}"):
    vit.build(cfg)


def test_build_takes_a_dict_and_refuses_a_whole_run_config():
  from kswap_jax import methods, models  # pylint: disable=import-outside-toplevel
  cfg = tiny_model_config()
  model = models.build(cfg.to_dict())
  variables = models.init_variables(model, cfg.to_dict(), jax.random.key(0))
  images = jnp.zeros(models.input_shape(cfg, 2))
  assert model.apply(variables, images).shape == (2, cfg.num_classes)
  with pytest.raises(ValueError, match=r"^images: expected a batch \(batch, height, width, "
                                       r"channels\), got shape \(16, 16, 3\)"):
    model.apply(variables, images[0])
  with pytest.raises(ConfigError, match=r"pass its model section \(config.model\)"):
    models.build(methods.default_config("lbf"))


def test_bad_pool_raises_config_error():
  cfg = tiny_model_config()
  cfg.pool = "map"
  with pytest.raises(ConfigError, match="model.pool"):
    vit.build(cfg)


def test_gap_pool_has_no_cls_and_averages_the_normed_tokens():
  cfg = tiny_model_config()
  cfg.pool = "gap"
  model = vit.build(cfg)
  params = vit.init_params(model, cfg, jax.random.key(0))
  assert "cls" not in params
  assert params["Transformer"]["posembed_input"]["pos_embedding"].shape == (1, 16, 64)
  x = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))
  tokens = []  # the encoder output (after encoder_norm), captured on the way
  def keep(next_fun, args, kwargs, context):
    y = next_fun(*args, **kwargs)
    if context.module.name == "Transformer" and context.method_name == "__call__":
      tokens.append(y)
    return y
  with nn.intercept_methods(keep):
    got = model.apply({"params": params}, x, features=True)
  assert tokens[0].shape == (2, 16, 64)
  np.testing.assert_allclose(got, tokens[0].mean(axis=1), rtol=1e-6, atol=1e-6)


def test_gelu_tanh_switches_to_the_tanh_form():
  block = vit.MlpBlock(mlp_dim=8, dropout=0.0, gelu="tanh")
  x = jax.random.normal(jax.random.key(0), (3, 4)) * 3
  p = block.init(jax.random.key(1), x, deterministic=True)["params"]
  h = x @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"]
  want = jax.nn.gelu(h, approximate=True) @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"]
  np.testing.assert_allclose(block.apply({"params": p}, x, deterministic=True), want,
                             rtol=1e-5, atol=1e-6)
