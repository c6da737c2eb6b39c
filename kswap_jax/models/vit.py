"""Vision Transformer in Flax linen, named like the public vit_jax / AugReg checkpoints.

Parameter names and shapes equal the `.npz` layout of google-research/vision_transformer
(`embedding`, `cls`, `Transformer/posembed_input/pos_embedding`,
`Transformer/encoderblock_{i}/{LayerNorm_0, MultiHeadDotProductAttention_1, LayerNorm_2,
MlpBlock_3/Dense_0, MlpBlock_3/Dense_1}`, `Transformer/encoder_norm`, `pre_logits`, `head`),
so a published checkpoint loads by name (see `kswap_jax.checkpoint.load_npz`).

The module knows nothing about LoRA: `kswap_jax.lora.apply` adds the low-rank update
by intercepting the Dense calls it targets, so the same module serves full training,
LoRA training and evaluation of merged weights.

The same module family also builds the Face Transformer of GS-LoRA (`model.name =
"vit_face"`, see `FACE_DEFAULTS`): 8x8 patches on 112x112 faces, bias-free q/k/v with the
attention scale width^-0.5 (the reference's quirk), LayerNorm eps 1e-5 and a CosFace head
on the LayerNorm'd CLS token. Patch embedding by a stride-p convolution is the same map as
the reference's Dense on (p1, p2, c)-ordered patches (its kernel reshaped to (p, p, c, w)).

References: Dosovitskiy et al., arXiv 2010.11929; Steiner et al. (AugReg), arXiv 2106.10270;
Zhong & Deng, "Face Transformer for Recognition", arXiv 2103.14803; Wang et al. (CosFace),
arXiv 1801.09414.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
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
    "face": (512, 6, 2048, 8),   # GS-LoRA's Face Transformer (ViT_face, depth 6)
}

HEADS = ("linear", "cosface")
ATTENTION_SCALES = ("head_dim", "width")
POOLS = ("cls", "gap")

# `model` config fields of the ViT and their defaults (vit_jax / Knowledge Swapping).
DEFAULTS = dict(
    name="vit",
    variant="B/16",        # "<Ti|S|B|L|face|demo|test>/<patch>"
    num_classes=200,       # head rows: a fixed upper bound, old classes + room for new ones
    image_size=224,
    channels=3,
    dropout=0.1,           # embedding + MLP dropout
    attention_dropout=0.0,  # on the attention probabilities
    attention_output_dropout=0.0,  # after the attention projection: 0 in the Knowledge
                           # Swapping reference (jeonsworld proj_dropout); vit_jax uses `dropout`
    representation_size=0,  # >0 adds vit_jax's tanh `pre_logits` layer
    width=0, depth=0, mlp_dim=0, num_heads=0,  # >0 overrides the variant
    qkv_bias=True,         # biases on query/key/value (the Face Transformer has none)
    attention_scale="head_dim",  # softmax(q k^T * d^-0.5): d = head_dim, or width (face quirk)
    layer_norm_eps=1e-6,
    gelu_approximate=False,  # exact erf GELU (PyTorch); True: the tanh form of vit_jax/big_vision
    pool="cls",            # cls: a learned CLS token is the head's input; gap: the mean of
                           # the final-LayerNorm'd patch tokens, no CLS token (big_vision "gap")
    head="linear",         # linear | cosface
    cosface_scale=64.0,    # CosFace s
    cosface_margin=0.35,   # CosFace m, subtracted from the true-class cosine when labels are given
)

# GS-LoRA's Face Transformer (spec'd from the authors' `ViT_face`): 112x112 RGB in [0, 1].
FACE_DEFAULTS = dict(
    DEFAULTS, name="vit_face", variant="face/8", num_classes=100, image_size=112,
    dropout=0.1, attention_output_dropout=0.1, qkv_bias=False, attention_scale="width",
    layer_norm_eps=1e-5, head="cosface")


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
  qkv_bias: bool = True
  attention_scale: str = "head_dim"
  gelu_approximate: bool = False
  pool: str = "cls"
  head: str = "linear"
  cosface_scale: float = 64.0
  cosface_margin: float = 0.35


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
      representation_size=model_cfg.get("representation_size", None) or None,
      layer_norm_eps=float(model_cfg.get("layer_norm_eps", 1e-6)),
      qkv_bias=bool(model_cfg.get("qkv_bias", True)),
      attention_scale=str(model_cfg.get("attention_scale", "head_dim")),
      gelu_approximate=bool(model_cfg.get("gelu_approximate", False)),
      pool=str(model_cfg.get("pool", "cls")),
      head=str(model_cfg.get("head", "linear")),
      cosface_scale=float(model_cfg.get("cosface_scale", 64.0)),
      cosface_margin=float(model_cfg.get("cosface_margin", 0.35)))
  if cfg.head not in HEADS:
    raise ConfigError(f"model.head: unknown head {cfg.head!r} (expected one of "
                      f"{', '.join(HEADS)})")
  if cfg.attention_scale not in ATTENTION_SCALES:
    raise ConfigError(f"model.attention_scale: {cfg.attention_scale!r} (expected one of "
                      f"{', '.join(ATTENTION_SCALES)})")
  if cfg.pool not in POOLS:
    raise ConfigError(f"model.pool: {cfg.pool!r} (expected one of {', '.join(POOLS)})")
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
  """FFN: Dense_0 -> GELU (exact erf unless `approximate`) -> dropout -> Dense_1 -> dropout."""
  mlp_dim: int
  dropout: float
  approximate: bool = False

  @nn.compact
  def __call__(self, x, *, deterministic: bool):
    width = x.shape[-1]
    init = dict(kernel_init=nn.initializers.xavier_uniform(),
                bias_init=nn.initializers.normal(stddev=1e-6))
    x = nn.Dense(self.mlp_dim, name="Dense_0", **init)(x)
    x = nn.gelu(x, approximate=self.approximate)
    x = nn.Dropout(self.dropout)(x, deterministic=deterministic)
    x = nn.Dense(width, name="Dense_1", **init)(x)
    return nn.Dropout(self.dropout)(x, deterministic=deterministic)


class MultiHeadSelfAttention(nn.Module):
  """Self-attention with the parameters of flax's `MultiHeadDotProductAttention`.

  query/key/value are DenseGeneral (width -> heads x head_dim), `out` maps heads x head_dim
  back to width, so vit_jax checkpoints load by name. With the defaults the computation is
  flax's (`nn.dot_product_attention`, scores scaled by head_dim^-0.5); `qkv_bias=False`
  and `scale="width"` give the Face Transformer's bias-free qkv and width^-0.5 scale.
  """
  num_heads: int
  dropout_rate: float = 0.0
  qkv_bias: bool = True
  scale: str = "head_dim"

  @nn.compact
  def __call__(self, x, *, deterministic: bool):
    width = x.shape[-1]
    head_dim = width // self.num_heads
    dense = lambda name, bias: nn.DenseGeneral(
        features=(self.num_heads, head_dim), axis=-1, use_bias=bias,
        kernel_init=nn.initializers.xavier_uniform(), name=name)
    query = dense("query", self.qkv_bias)(x)
    key = dense("key", self.qkv_bias)(x)
    value = dense("value", self.qkv_bias)(x)
    if self.scale == "width":
      # nn.dot_product_attention divides by sqrt(head_dim); this turns it into sqrt(width).
      query = query * jnp.asarray((head_dim / width) ** 0.5, query.dtype)
    dropout = self.dropout_rate > 0.0 and not deterministic
    y = nn.dot_product_attention(
        query, key, value, dropout_rng=self.make_rng("dropout") if dropout else None,
        dropout_rate=self.dropout_rate, broadcast_dropout=False, deterministic=not dropout)
    return nn.DenseGeneral(features=width, axis=(-2, -1),
                           kernel_init=nn.initializers.xavier_uniform(), name="out")(y)


class Encoder1DBlock(nn.Module):
  """Pre-LN transformer block: x + MHSA(LN(x)), then x + MLP(LN(x))."""
  cfg: ViTConfig

  @nn.compact
  def __call__(self, x, *, deterministic: bool):
    eps = self.cfg.layer_norm_eps
    y = nn.LayerNorm(epsilon=eps, name="LayerNorm_0")(x)
    y = MultiHeadSelfAttention(
        num_heads=self.cfg.num_heads, dropout_rate=self.cfg.attention_dropout,
        qkv_bias=self.cfg.qkv_bias, scale=self.cfg.attention_scale,
        name="MultiHeadDotProductAttention_1")(y, deterministic=deterministic)
    x = x + nn.Dropout(self.cfg.attention_output_dropout)(y, deterministic=deterministic)
    y = nn.LayerNorm(epsilon=eps, name="LayerNorm_2")(x)
    return x + MlpBlock(self.cfg.mlp_dim, self.cfg.dropout, self.cfg.gelu_approximate,
                        name="MlpBlock_3")(
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


def cosface_logits(embedding: jax.Array, kernel: jax.Array, labels: jax.Array | None, *,
                   scale: float, margin: float, eps: float = 1e-12) -> jax.Array:
  """CosFace logits s·(cos θ − m·onehot(y)).

      cos θ_{ij} = <e_i / max(||e_i||, eps), w_j / max(||w_j||, eps)>

  with w_j the j-th column of `kernel` (width, classes). With `labels=None` the margin is
  left out (plain scaled cosines). GS-LoRA evaluates *with* the margin, so a sample counts
  as correct only if its class wins by m in cosine.

  References: Wang et al., arXiv 1801.09414.
  """
  e = embedding.astype(jnp.float32)
  w = kernel.astype(jnp.float32)
  e = e / jnp.maximum(jnp.linalg.norm(e, axis=-1, keepdims=True), eps)
  w = w / jnp.maximum(jnp.linalg.norm(w, axis=0, keepdims=True), eps)
  cos = e @ w
  if labels is not None:
    cos = cos - margin * jax.nn.one_hot(labels, cos.shape[-1], dtype=cos.dtype)
  return scale * cos


class CosFaceHead(nn.Module):
  """A bias-free (width, classes) kernel scored by `cosface_logits`."""
  num_classes: int
  scale: float
  margin: float

  @nn.compact
  def __call__(self, x, labels=None):
    kernel = self.param("kernel", nn.initializers.xavier_uniform(),
                        (x.shape[-1], self.num_classes))
    return cosface_logits(x, kernel, labels, scale=self.scale, margin=self.margin)


class VisionTransformer(nn.Module):
  """ViT classifier on the CLS token; `__call__(images, train=False) -> logits`.

  Example:
    >>> model = VisionTransformer(vit_config(config.model))
    >>> params = model.init(jax.random.key(0), images)["params"]
    >>> logits = model.apply({"params": params}, images)
  """
  cfg: ViTConfig

  @nn.compact
  def __call__(self, images, *, train: bool = False, features: bool = False,
               labels: jax.Array | None = None):
    """Logits (batch, num_classes); with `features=True`, the representation the head sees.

    `labels` matter only for the CosFace head, which subtracts its margin from the
    true-class cosine when they are given (training, and GS-LoRA's evaluation).
    """
    x = nn.Conv(self.cfg.width, (self.cfg.patch_size,) * 2, strides=(self.cfg.patch_size,) * 2,
                padding="VALID", name="embedding")(images)
    n, h, w, c = x.shape
    x = x.reshape(n, h * w, c)
    if self.cfg.pool == "cls":
      cls = self.param("cls", nn.initializers.zeros, (1, 1, c))
      x = jnp.concatenate([jnp.tile(cls, (n, 1, 1)).astype(x.dtype), x], axis=1)
      x = Transformer(self.cfg, name="Transformer")(x, deterministic=not train)[:, 0]
    else:  # "gap": big_vision's global average pool over the normed patch tokens
      x = Transformer(self.cfg, name="Transformer")(x, deterministic=not train).mean(axis=1)
    if self.cfg.representation_size:
      x = jnp.tanh(nn.Dense(self.cfg.representation_size, name="pre_logits")(x))
    if features:
      return x
    if self.cfg.head == "cosface":
      return CosFaceHead(self.cfg.num_classes, self.cfg.cosface_scale, self.cfg.cosface_margin,
                         name="head")(x, labels)
    return nn.Dense(self.cfg.num_classes, name="head", kernel_init=nn.initializers.zeros)(x)


def build(model_cfg: ml_collections.ConfigDict) -> VisionTransformer:
  """Builds the model named by `model_cfg.variant`; raises ConfigError on bad fields."""
  return VisionTransformer(vit_config(model_cfg))


def input_shape(model_cfg: ml_collections.ConfigDict, batch: int = 1) -> tuple[int, ...]:
  """(batch, image_size, image_size, channels) for `model.init` and shape checks."""
  return (batch, int(model_cfg.image_size), int(model_cfg.image_size), int(model_cfg.channels))


def init_variables(model: VisionTransformer, model_cfg, rng) -> dict[str, Any]:
  """{"params": ...}: random parameters for an input of the configured shape."""
  return {"params": model.init(rng, jnp.zeros(input_shape(model_cfg), jnp.float32))["params"]}


def init_params(model: VisionTransformer, model_cfg, rng) -> dict[str, Any]:
  """Random parameters (the `params` collection) for an input of the configured shape."""
  return init_variables(model, model_cfg, rng)["params"]
