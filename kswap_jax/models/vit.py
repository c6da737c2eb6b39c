"""Vision Transformer in Flax linen, named like the public vit_jax / AugReg checkpoints.

Parameter names and shapes equal the `.npz` layout of google-research/vision_transformer
(`embedding`, `cls`, `Transformer/posembed_input/pos_embedding`,
`Transformer/encoderblock_{i}/{LayerNorm_0, MultiHeadDotProductAttention_1, LayerNorm_2,
MlpBlock_3/Dense_0, MlpBlock_3/Dense_1}`, `Transformer/encoder_norm`, `pre_logits`, `head`),
so a published checkpoint loads by name (see `kswap_jax.checkpoint.load_npz`).

The module knows nothing about LoRA: `kswap_jax.lora.apply` adds the low-rank update
by intercepting the Dense calls it targets, so the same module serves full training,
LoRA training and evaluation of merged weights.

References: Dosovitskiy et al., arXiv 2010.11929; Steiner et al. (AugReg), arXiv 2106.10270.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from kswap_jax.errors import ConfigError

# name -> (width, depth, mlp_dim, num_heads); the patch size comes from "<name>/<patch>".
VARIANTS = {
    "test": (64, 2, 128, 2),     # tests and CI: depth 2, width 64
    "demo": (64, 4, 256, 4),     # the bundled-digits default run
    "Ti": (192, 12, 768, 3),
    "S": (384, 12, 1536, 6),
    "B": (768, 12, 3072, 12),
    "L": (1024, 24, 4096, 16),
}


@dataclasses.dataclass(frozen=True)
class ViTConfig:
  """Architecture hyper-parameters; see `vit_config` for building one from a config."""
  width: int
  depth: int
  mlp_dim: int
  num_heads: int
  patch_size: int
  num_classes: int
  dropout: float = 0.0
  attention_dropout: float = 0.0
  attention_output_dropout: float = 0.0
  representation_size: int | None = None
  layer_norm_eps: float = 1e-6


def vit_config(model_cfg: ml_collections.ConfigDict) -> ViTConfig:
  """Builds a `ViTConfig` from the `model` field of a run config.

  `model.variant` is "<name>/<patch>" with name in `VARIANTS` (e.g. "B/16", "test/4");
  `model.width/depth/mlp_dim/num_heads` override the variant when > 0.
  """
  variant = str(model_cfg.variant)
  name, _, patch = variant.partition("/")
  if name not in VARIANTS or not patch.isdigit() or int(patch) <= 0:
    raise ConfigError(
        f"model.variant: unknown variant {variant!r} (expected '<name>/<patch>' with name "
        f"one of {', '.join(VARIANTS)}, e.g. 'B/16')")
  width, depth, mlp_dim, num_heads = VARIANTS[name]
  get = lambda field, default: int(model_cfg.get(field, 0) or 0) or default
  cfg = ViTConfig(
      width=get("width", width), depth=get("depth", depth), mlp_dim=get("mlp_dim", mlp_dim),
      num_heads=get("num_heads", num_heads), patch_size=int(patch),
      num_classes=int(model_cfg.num_classes), dropout=float(model_cfg.get("dropout", 0.0)),
      attention_dropout=float(model_cfg.get("attention_dropout", 0.0)),
      attention_output_dropout=float(model_cfg.get("attention_output_dropout", 0.0)),
      representation_size=model_cfg.get("representation_size", None) or None)
  if cfg.width % cfg.num_heads:
    raise ConfigError(f"model.num_heads: width {cfg.width} is not divisible by {cfg.num_heads} heads")
  if cfg.num_classes <= 0:
    raise ConfigError(f"model.num_classes: expected a positive head size, got {cfg.num_classes}")
  image_size = int(model_cfg.image_size)
  if image_size % cfg.patch_size:
    raise ConfigError(
        f"model.image_size: {image_size} is not divisible by the patch size {cfg.patch_size}")
  return cfg


class MlpBlock(nn.Module):
  """FFN: Dense_0 -> exact (erf) GELU -> dropout -> Dense_1 -> dropout."""
  mlp_dim: int
  dropout: float

  @nn.compact
  def __call__(self, x, *, deterministic: bool):
    width = x.shape[-1]
    init = dict(kernel_init=nn.initializers.xavier_uniform(),
                bias_init=nn.initializers.normal(stddev=1e-6))
    x = nn.Dense(self.mlp_dim, name="Dense_0", **init)(x)
    x = nn.gelu(x, approximate=False)
    x = nn.Dropout(self.dropout)(x, deterministic=deterministic)
    x = nn.Dense(width, name="Dense_1", **init)(x)
    return nn.Dropout(self.dropout)(x, deterministic=deterministic)


class Encoder1DBlock(nn.Module):
  """Pre-LN transformer block: x + MHSA(LN(x)), then x + MLP(LN(x))."""
  cfg: ViTConfig

  @nn.compact
  def __call__(self, x, *, deterministic: bool):
    eps = self.cfg.layer_norm_eps
    y = nn.LayerNorm(epsilon=eps, name="LayerNorm_0")(x)
    y = nn.MultiHeadDotProductAttention(
        num_heads=self.cfg.num_heads, kernel_init=nn.initializers.xavier_uniform(),
        broadcast_dropout=False, dropout_rate=self.cfg.attention_dropout,
        name="MultiHeadDotProductAttention_1")(y, y, deterministic=deterministic)
    x = x + nn.Dropout(self.cfg.attention_output_dropout)(y, deterministic=deterministic)
    y = nn.LayerNorm(epsilon=eps, name="LayerNorm_2")(x)
    return x + MlpBlock(self.cfg.mlp_dim, self.cfg.dropout, name="MlpBlock_3")(
        y, deterministic=deterministic)


class AddPositionEmbs(nn.Module):
  """Adds a learned (1, tokens, width) position embedding."""

  @nn.compact
  def __call__(self, x):
    pos = self.param("pos_embedding", nn.initializers.normal(stddev=0.02), (1,) + x.shape[1:])
    return x + pos.astype(x.dtype)


class Transformer(nn.Module):
  """The `Transformer` sub-tree of the checkpoints."""
  cfg: ViTConfig

  @nn.compact
  def __call__(self, x, *, deterministic: bool):
    x = AddPositionEmbs(name="posembed_input")(x)
    x = nn.Dropout(self.cfg.dropout)(x, deterministic=deterministic)
    for i in range(self.cfg.depth):
      x = Encoder1DBlock(self.cfg, name=f"encoderblock_{i}")(x, deterministic=deterministic)
    return nn.LayerNorm(epsilon=self.cfg.layer_norm_eps, name="encoder_norm")(x)


class VisionTransformer(nn.Module):
  """ViT classifier on the CLS token; `__call__(images, train=False) -> logits`.

  Example:
    >>> model = VisionTransformer(vit_config(config.model))
    >>> params = model.init(jax.random.key(0), images)["params"]
    >>> logits = model.apply({"params": params}, images)
  """
  cfg: ViTConfig

  @nn.compact
  def __call__(self, images, *, train: bool = False, features: bool = False):
    """Logits (batch, num_classes); with `features=True`, the representation the head sees."""
    x = nn.Conv(self.cfg.width, (self.cfg.patch_size,) * 2, strides=(self.cfg.patch_size,) * 2,
                padding="VALID", name="embedding")(images)
    n, h, w, c = x.shape
    x = x.reshape(n, h * w, c)
    cls = self.param("cls", nn.initializers.zeros, (1, 1, c))
    x = jnp.concatenate([jnp.tile(cls, (n, 1, 1)).astype(x.dtype), x], axis=1)
    x = Transformer(self.cfg, name="Transformer")(x, deterministic=not train)[:, 0]
    if self.cfg.representation_size:
      x = jnp.tanh(nn.Dense(self.cfg.representation_size, name="pre_logits")(x))
    if features:
      return x
    return nn.Dense(self.cfg.num_classes, name="head", kernel_init=nn.initializers.zeros)(x)


def build(model_cfg: ml_collections.ConfigDict) -> VisionTransformer:
  """Builds the model named by `model_cfg.variant`; raises ConfigError on bad fields."""
  return VisionTransformer(vit_config(model_cfg))


def input_shape(model_cfg: ml_collections.ConfigDict, batch: int = 1) -> tuple[int, ...]:
  """(batch, image_size, image_size, channels) for `model.init` and shape checks."""
  return (batch, int(model_cfg.image_size), int(model_cfg.image_size), int(model_cfg.channels))


def init_params(model: VisionTransformer, model_cfg, rng) -> dict[str, Any]:
  """Random parameters (the `params` collection) for an input of the configured shape."""
  return model.init(rng, jnp.zeros(input_shape(model_cfg), jnp.float32))["params"]
