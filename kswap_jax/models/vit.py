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
import functools
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax import lax

from kswap_jax.errors import ConfigError

# The sizes a variant names; a `model` field of the same name overrides it when > 0.
VARIANT_FIELDS = ("width", "depth", "mlp_dim", "num_heads")
# name -> the VARIANT_FIELDS; the patch size comes from "<name>/<patch>".
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
GELUS = ("erf", "erf_autodiff", "erf_custom_vjp", "tanh")
ATTENTIONS = ("flax", "heads_first")
DROPOUT_MASKS = ("compact", "flax")
DROPOUT_RNGS = ("threefry", "rbg", "unsafe_rbg")
DROPOUT_BITS = (32, 16, 8)
DTYPES = ("float32", "bfloat16")
# jax.checkpoint_policies entries that are policy factories, not policies.
REMAT_POLICIES_WITH_ARGS = ("save_only_these_names", "save_any_names_but_these",
                            "save_and_offload_only_these_names", "save_from_both_policies",
                            "offload_dot_with_no_batch_dims", "save_anything_except_these_names")

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
    pool="cls",            # cls: a learned CLS token is the head's input; gap: the mean of
                           # the final-LayerNorm'd patch tokens, no CLS token (big_vision "gap")
    head="linear",         # linear | cosface
    cosface_scale=64.0,    # CosFace s
    cosface_margin=0.35,   # CosFace m, subtracted from the true-class cosine when labels are given
    # Speed options (docs/speed.md: gelu, attention, dropout_mask/rng/bits, dtype, remat,
    # remat_policy, scan); their defaults compute the reference function exactly.
    gelu="erf",            # erf: exact GELU, nn.gelu(approximate=False), whose backward
                           # recomputes jax's derivative from the saved input (`erf_gelu`:
                           # gradients equal to autodiff's up to rounding; the fastest and
                           # smallest exact form measured on CPU); erf_autodiff: nn.gelu
                           # differentiated by jax as is (bitwise the reference; it keeps
                           # erfc and exp(-x^2/2) for the backward pass);
                           # erf_custom_vjp: the same values, backward from the saved erfc
                           # (gradients equal to a few ulp); tanh: the tanh approximation
                           # (other numerics; the GELU of vit_jax / big_vision checkpoints)
    attention="flax",      # flax: nn.dot_product_attention; heads_first: the same products
                           # with q, k, v moved to (batch, heads, tokens, head_dim) first
                           # (other float rounding, ~5e-7; faster on XLA:CPU)
    dropout_mask="compact",  # compact: flax nn.Dropout's mask drawn once, kept packed 8 per byte;
                           # flax: nn.Dropout as is (its mask is rebuilt in the backward pass)
    dropout_rng="threefry",  # threefry: the same masks as flax nn.Dropout; rbg | unsafe_rbg:
                           # XLA's bit generator keyed from the threefry key (other masks)
    dropout_bits=32,       # random bits per mask element: 32 = flax's masks; 16 | 8 share one
                           # 32-bit draw between 2 | 4 elements (other masks, rate rounded
                           # to a multiple of 2^-bits)
    dtype="float32",       # compute dtype: float32 | bfloat16 (parameters and logits stay f32)
    remat=False,           # rematerialise each encoder block in the backward pass
    remat_policy="nothing_saveable",  # a jax.checkpoint_policies name used when remat is on
    scan=False,            # nn.scan over the blocks: parameters under Transformer/encoderblock
                           # with a leading layer axis (see scan_params / unscan_params)
)

# GS-LoRA's Face Transformer (the authors' `ViT_face`): 112x112 RGB in [0, 1].
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
  pool: str = "cls"
  head: str = "linear"
  cosface_scale: float = 64.0
  cosface_margin: float = 0.35
  gelu: str = "erf"
  attention: str = "flax"
  dropout_mask: str = "compact"
  dropout_rng: str = "threefry"
  dropout_bits: int = 32
  dtype: str = "float32"
  remat: bool = False
  remat_policy: str = "nothing_saveable"
  scan: bool = False

  @property
  def compute_dtype(self):
    """None for float32 (flax infers f32 from the parameters: the reference path)."""
    return None if self.dtype == "float32" else jnp.dtype(self.dtype)


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
  sizes = {field: int(model_cfg.get(field, 0) or 0) or default
           for field, default in zip(VARIANT_FIELDS, VARIANTS[name])}
  cfg = ViTConfig(
      **sizes, patch_size=int(patch),
      num_classes=int(model_cfg.num_classes), dropout=float(model_cfg.get("dropout", 0.0)),
      attention_dropout=float(model_cfg.get("attention_dropout", 0.0)),
      attention_output_dropout=float(model_cfg.get("attention_output_dropout", 0.0)),
      representation_size=model_cfg.get("representation_size", None) or None,
      layer_norm_eps=float(model_cfg.get("layer_norm_eps", 1e-6)),
      qkv_bias=bool(model_cfg.get("qkv_bias", True)),
      attention_scale=str(model_cfg.get("attention_scale", "head_dim")),
      pool=str(model_cfg.get("pool", "cls")),
      head=str(model_cfg.get("head", "linear")),
      cosface_scale=float(model_cfg.get("cosface_scale", 64.0)),
      cosface_margin=float(model_cfg.get("cosface_margin", 0.35)),
      gelu=str(model_cfg.get("gelu", "erf")),
      attention=str(model_cfg.get("attention", "flax")),
      dropout_mask=str(model_cfg.get("dropout_mask", "compact")),
      dropout_rng=str(model_cfg.get("dropout_rng", "threefry")),
      dropout_bits=int(model_cfg.get("dropout_bits", 32)),
      dtype=str(model_cfg.get("dtype", "float32")),
      remat=bool(model_cfg.get("remat", False)),
      remat_policy=str(model_cfg.get("remat_policy", "nothing_saveable")),
      scan=bool(model_cfg.get("scan", False)))
  for field, value, allowed in (("gelu", cfg.gelu, GELUS),
                                ("attention", cfg.attention, ATTENTIONS),
                                ("dropout_mask", cfg.dropout_mask, DROPOUT_MASKS),
                                ("dropout_rng", cfg.dropout_rng, DROPOUT_RNGS),
                                ("dropout_bits", cfg.dropout_bits, DROPOUT_BITS),
                                ("dtype", cfg.dtype, DTYPES)):
    if value not in allowed:
      raise ConfigError(f"model.{field}: {value!r} (expected one of "
                        f"{', '.join(map(str, allowed))})")
  if cfg.dropout_mask == "flax" and cfg.dropout_bits != 32:
    raise ConfigError(f"model.dropout_bits: {cfg.dropout_bits} needs model.dropout_mask="
                      f"'compact' (the flax mask always uses 32 bits per element)")
  policy = getattr(jax.checkpoint_policies, cfg.remat_policy, None)
  if cfg.remat and (policy is None or cfg.remat_policy.startswith("_")
                    or cfg.remat_policy in REMAT_POLICIES_WITH_ARGS):
    raise ConfigError(f"model.remat_policy: {cfg.remat_policy!r} is not an argument-free "
                      f"jax.checkpoint_policies name (e.g. nothing_saveable, "
                      f"dots_with_no_batch_dims_saveable)")
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


@jax.custom_vjp
def gelu(x: jax.Array) -> jax.Array:
  r"""Exact (erf) GELU whose backward pass reuses the forward's erfc (`model.gelu="erf_custom_vjp"`).

      gelu(x)  = x/2 · erfc(−x/√2)
      gelu'(x) = erfc(−x/√2)/2 + x·φ(x),    φ(x) = exp(−x²/2)/√(2π)

  The forward is `jax.nn.gelu(x, approximate=False)` operation for operation (bitwise the
  same values); the backward is the exact derivative computed from the saved input and
  erfc, so autodiff does not rebuild the erfc chain in the backward pass. Gradients agree
  with `jax.grad` of `jax.nn.gelu(approximate=False)` to float rounding (a few ulp).
  It stores erfc beside x for the backward pass: on XLA:CPU (jax 0.10) that extra array
  costs more than the recomputation it saves (docs/speed.md), so it is an option there.

  Args:
    x: pre-activations (any float dtype).

  Returns:
    gelu(x), same shape and dtype.

  Example:
    >>> y = vit.gelu(jnp.linspace(-3., 3., 7))

  References: Hendrycks & Gimpel, arXiv 1606.08415.
  """
  return _gelu_fwd(x)[0]


def _gelu_fwd(x):
  sqrt_half = np.sqrt(0.5).astype(x.dtype)
  erfc = lax.erfc(-x * sqrt_half)
  return 0.5 * x * erfc, (x, erfc)


def _gelu_bwd(res, g):
  x, erfc = res
  inv_sqrt_2pi = np.asarray(1.0 / np.sqrt(2.0 * np.pi), x.dtype)
  return (g * (0.5 * erfc + x * (inv_sqrt_2pi * jnp.exp(-0.5 * x * x))),)


gelu.defvjp(_gelu_fwd, _gelu_bwd)


def _erf_gelu(x: jax.Array) -> jax.Array:
  return nn.gelu(x, approximate=False)


@jax.custom_vjp
def erf_gelu(x: jax.Array) -> jax.Array:
  r"""Exact (erf) GELU that keeps only its input for the backward pass (`model.gelu="erf"`).

  The forward is `nn.gelu(x, approximate=False)`; the backward runs jax's own derivative of
  it, `jax.vjp(nn.gelu)`, from the saved x once the cotangent exists: the same derivative,
  bitwise jax's when computed alone; inside a model XLA fuses it with other instructions
  than autodiff's, so it rounds differently (~1e-7 relative, tested on the whole model;
  `model.gelu="erf_autodiff"` is the bitwise path). Differentiated as is, `nn.gelu` keeps x, erfc
  and exp(−x²/2) alive from the forward to the backward pass: three (tokens, mlp_dim)
  arrays per block and forward pass instead of one. For ViT-B/16 that is ~0.8 GiB of a
  Knowledge Swapping forget step's temporaries at 8 + 8 images, and on XLA:CPU the
  recomputation costs less than writing and re-reading those arrays (docs/speed.md).

  The optimisation barrier ties the recomputation to the cotangent: without it XLA would
  merge it with the forward's identical computation (or schedule it there) and keep the
  arrays alive again.

  Args:
    x: pre-activations (any float dtype).

  Returns:
    gelu(x), same shape and dtype.

  Example:
    >>> y = vit.erf_gelu(jnp.linspace(-3., 3., 7))
  """
  return _erf_gelu(x)


def _erf_gelu_fwd(x):
  return _erf_gelu(x), x


def _erf_gelu_bwd(x, g):
  x, g = lax.optimization_barrier((x, g))
  return jax.vjp(_erf_gelu, x)[1](g)


erf_gelu.defvjp(_erf_gelu_fwd, _erf_gelu_bwd)


def activation(x: jax.Array, kind: str) -> jax.Array:
  """The MLP activation named by `model.gelu` (see `GELUS`)."""
  if kind == "erf":
    return erf_gelu(x)
  if kind == "erf_autodiff":
    return nn.gelu(x, approximate=False)
  if kind == "erf_custom_vjp":
    return gelu(x)
  if kind == "tanh":
    return nn.gelu(x, approximate=True)
  raise ValueError(f"activation: unknown kind {kind!r} (expected one of {', '.join(GELUS)})")


_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))


def _threefry2x32(k1, k2, x1, x2):
  """The Threefry-2x32 block cipher (20 rounds), written out as plain uint32 ops.

  The same function as jax's `threefry2x32` primitive, whose CPU lowering runs the rounds
  as a 5-step while loop (every step a full pass over the arrays in memory); unrolled, XLA
  fuses the whole hash into the consumer of its output.
  """
  rotl = lambda v, d: lax.shift_left(v, np.uint32(d)) | lax.shift_right_logical(
      v, np.uint32(32 - d))
  ks = (k1, k2, k1 ^ k2 ^ np.uint32(0x1BD11BDA))
  x1, x2 = x1 + ks[0], x2 + ks[1]
  for i in range(5):
    for r in _ROTATIONS[i % 2]:
      x1 = x1 + x2
      x2 = x1 ^ rotl(x2, r)
    x1 = x1 + ks[(i + 1) % 3]
    x2 = x2 + ks[(i + 2) % 3] + np.uint32(i + 1)
  return x1, x2


def random_bits(key: jax.Array, size: int) -> jax.Array:
  """`jax.random.bits(key, (size,), jnp.uint32)`, bitwise, with threefry's rounds unrolled.

  Applies to threefry keys under jax's default `jax_threefry_partitionable` bit layout
  (word i = hash of the 64-bit counter i, the two output halves xor-ed); any other key or
  setting falls back to `jax.random.bits`.
  """
  if (str(jax.random.key_impl(key)) != "threefry2x32" or not jax.config.jax_threefry_partitionable
      or size >= 2 ** 32):
    return jax.random.bits(key, (size,), jnp.uint32)
  k = jax.random.key_data(key)
  counter = lax.iota(jnp.uint32, size)
  b1, b2 = _threefry2x32(k[0], k[1], jnp.zeros_like(counter), counter)
  return b1 ^ b2


def keep_mask(key: jax.Array, keep_prob: float, shape: tuple[int, ...], bits: int = 32
              ) -> tuple[jax.Array, float]:
  """A Bernoulli(keep_prob) bool mask from `bits` random bits per element.

  bits=32 is `jax.random.bernoulli(key, keep_prob, shape)` bitwise (flax's dropout mask):
  u = float(bits >> 9)·2^-23, keep iff u < keep_prob. With 16 or 8 bits one 32-bit word
  serves 2 or 4 elements: keep iff v < t with v uniform on [0, 2^bits) and
  t = round(keep_prob·2^bits), so the realised keep probability is t/2^bits (0.9 ->
  0.899994 with 16 bits, 0.898438 with 8).

  Returns:
    (mask, the realised keep probability: divide the kept values by it).
  """
  size = int(np.prod(shape))
  if bits == 32:
    words = random_bits(key, size)
    one = np.array(1.0, np.float32).view(np.uint32)
    u = lax.bitcast_convert_type(lax.shift_right_logical(words, np.uint32(9)) | one,
                                 jnp.float32) - np.float32(1.0)
    return (u < np.float32(keep_prob)).reshape(shape), keep_prob
  per_word = 32 // bits
  words = random_bits(key, -(-size // per_word))
  small = lax.bitcast_convert_type(words, jnp.uint16 if bits == 16 else jnp.uint8)
  threshold = int(round(keep_prob * 2 ** bits))
  return small.reshape(-1)[:size].reshape(shape) < threshold, threshold / 2 ** bits


def pack_mask(keep: jax.Array) -> jax.Array:
  """bool array -> uint8[ceil(size/8)], 8 elements per byte (little bit order)."""
  flat = keep.reshape(-1)
  flat = jnp.pad(flat, (0, -flat.size % 8)).reshape(-1, 8).astype(jnp.uint8)
  return jnp.sum(flat << np.arange(8, dtype=np.uint8), axis=-1, dtype=jnp.uint8)


def unpack_mask(packed: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """Inverse of `pack_mask`."""
  bits = (packed[:, None] >> np.arange(8, dtype=np.uint8)) & np.uint8(1)
  return bits.reshape(-1)[:int(np.prod(shape))].reshape(shape).astype(bool)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _select_packed(x, packed, keep_prob):
  return lax.select(unpack_mask(packed, x.shape), x / keep_prob, jnp.zeros_like(x))


def _select_packed_fwd(x, packed, keep_prob):
  return _select_packed(x, packed, keep_prob), packed


def _select_packed_bwd(keep_prob, packed, g):
  keep = unpack_mask(packed, g.shape)
  return lax.select(keep, g / keep_prob, jnp.zeros_like(g)), None


_select_packed.defvjp(_select_packed_fwd, _select_packed_bwd)


class Dropout(nn.Module):
  """flax's `nn.Dropout` with its mask drawn once and kept as packed bits.

      y = select(keep, x / (1 − rate), 0),    keep ~ Bernoulli(1 − rate)

  With `mask="compact"`, `rng="threefry"` and `bits=32` (the defaults) the mask, the values
  and the gradients are bitwise those of `nn.Dropout(rate)` under the same module name (the
  key comes from `make_rng("dropout")` as there). The random bits are hashed in one fused
  pass (`random_bits`), thresholded and packed 8 per byte; forward and backward read the
  packed mask, so no 32-bit random array is kept for the backward pass or re-thresholded
  in each consumer. `mask="flax"` is `nn.Dropout` as is (bits drawn with jax's threefry
  lowering, a while loop on CPU). Options that change the masks (the
  same rate, other random numbers): `rng="rbg" | "unsafe_rbg"` draws them with XLA's
  RngBitGenerator keyed from the threefry key; `bits=16 | 8` draws 2 or 4 mask elements
  from one 32-bit threefry word (see `keep_mask`).

  Attributes:
    rate: drop probability.
    mask: "compact" | "flax".
    rng: "threefry" | "rbg" | "unsafe_rbg".
    bits: random bits per mask element, 32 | 16 | 8.
  """
  rate: float
  mask: str = "compact"
  rng: str = "threefry"
  bits: int = 32

  @nn.compact
  def __call__(self, x, *, deterministic: bool):
    if self.rate == 0.0 or deterministic:
      return x
    if self.rate == 1.0:
      return jnp.zeros_like(x)
    key = self.make_rng("dropout")
    if self.rng != "threefry":
      key = jax.random.wrap_key_data(jax.random.bits(key, (4,), jnp.uint32), impl=self.rng)
    if self.mask == "flax":
      keep = jax.random.bernoulli(key, p=1.0 - self.rate, shape=x.shape)
      return lax.select(keep, x / (1.0 - self.rate), jnp.zeros_like(x))
    # The mask's only consumer is the packing, so XLA fuses the random-bit hash, the
    # threshold and the packing into one pass; forward and backward read 1 bit per element.
    keep, keep_prob = keep_mask(key, 1.0 - self.rate, x.shape, self.bits)
    return _select_packed(x, pack_mask(keep), keep_prob)


class MlpBlock(nn.Module):
  """FFN: Dense_0 -> GELU (exact erf by default) -> dropout -> Dense_1 -> dropout."""
  mlp_dim: int
  dropout: float
  gelu: str = "erf"
  dropout_mask: str = "compact"
  dropout_rng: str = "threefry"
  dropout_bits: int = 32
  dtype: Any = None

  @nn.compact
  def __call__(self, x, *, deterministic: bool):
    width = x.shape[-1]
    init = dict(kernel_init=nn.initializers.xavier_uniform(),
                bias_init=nn.initializers.normal(stddev=1e-6), dtype=self.dtype)
    drop = lambda y: Dropout(self.dropout, mask=self.dropout_mask, rng=self.dropout_rng,
                              bits=self.dropout_bits)(
        y, deterministic=deterministic)
    x = nn.Dense(self.mlp_dim, name="Dense_0", **init)(x)
    x = drop(activation(x, self.gelu))
    x = nn.Dense(width, name="Dense_1", **init)(x)
    return drop(x)


def heads_first_attention(query: jax.Array, key: jax.Array, value: jax.Array, *,
                          softmax_float32: bool = False) -> jax.Array:
  """softmax(q kᵀ / √d) v per head, with the heads moved in front of the tokens first.

  The function of `nn.dot_product_attention` without dropout or masks (`model.attention=
  "heads_first"`): q, k, v (..., tokens, heads, head_dim) are transposed to (..., heads,
  tokens, head_dim) before the two batched products, and the result back. Flax contracts in
  the (tokens, heads) layout, for which XLA:CPU picks slow batched-matmul kernels; here the
  products are plain per-head matrix products. Float rounding differs (~5e-7).

  Args:
    query, key, value: (..., tokens, heads, head_dim).
    softmax_float32: compute the softmax in float32 (for low-precision inputs).

  Returns:
    (..., tokens, heads, head_dim): the dtype of `query`, or float32 with
    `softmax_float32` (as `nn.dot_product_attention(force_fp32_for_softmax=True)`).
  """
  dtype = query.dtype
  query = query / jnp.sqrt(query.shape[-1]).astype(dtype)
  q, k, v = (jnp.swapaxes(t, -3, -2) for t in (query, key, value))
  scores = q @ jnp.swapaxes(k, -2, -1)
  if softmax_float32:  # as flax: the float32 weights make the output float32
    weights = jax.nn.softmax(scores.astype(jnp.float32), axis=-1)
  else:
    weights = jax.nn.softmax(scores, axis=-1).astype(dtype)
  return jnp.swapaxes(weights @ v, -3, -2)


class MultiHeadSelfAttention(nn.Module):
  """Self-attention with the parameters of flax's `MultiHeadDotProductAttention`.

  query/key/value are DenseGeneral (width -> heads x head_dim), `out` maps heads x head_dim
  back to width, so vit_jax checkpoints load by name. With the defaults the computation is
  flax's (`nn.dot_product_attention`, scores scaled by head_dim^-0.5); `qkv_bias=False`
  and `scale="width"` give the Face Transformer's bias-free qkv and width^-0.5 scale.
  With a low-precision `dtype` the softmax is computed in float32.
  """
  num_heads: int
  dropout_rate: float = 0.0
  qkv_bias: bool = True
  scale: str = "head_dim"
  layout: str = "flax"
  dtype: Any = None

  @nn.compact
  def __call__(self, x, *, deterministic: bool):
    width = x.shape[-1]
    head_dim = width // self.num_heads
    dense = lambda name, bias: nn.DenseGeneral(
        features=(self.num_heads, head_dim), axis=-1, use_bias=bias,
        kernel_init=nn.initializers.xavier_uniform(), dtype=self.dtype, name=name)
    query = dense("query", self.qkv_bias)(x)
    key = dense("key", self.qkv_bias)(x)
    value = dense("value", self.qkv_bias)(x)
    if self.scale == "width":
      # nn.dot_product_attention divides by sqrt(head_dim); this turns it into sqrt(width).
      query = query * jnp.asarray((head_dim / width) ** 0.5, query.dtype)
    dropout = self.dropout_rate > 0.0 and not deterministic
    low_precision = self.dtype is not None and jnp.dtype(self.dtype) != jnp.float32
    if self.layout == "heads_first" and not dropout:
      y = heads_first_attention(query, key, value, softmax_float32=low_precision)
    else:
      y = nn.dot_product_attention(
          query, key, value, dropout_rng=self.make_rng("dropout") if dropout else None,
          dropout_rate=self.dropout_rate, broadcast_dropout=False, deterministic=not dropout,
          dtype=self.dtype, **({"force_fp32_for_softmax": True} if low_precision else {}))
    return nn.DenseGeneral(features=width, axis=(-2, -1), dtype=self.dtype,
                           kernel_init=nn.initializers.xavier_uniform(), name="out")(y)


class Encoder1DBlock(nn.Module):
  """Pre-LN transformer block: x + MHSA(LN(x)), then x + MLP(LN(x)).

  `deterministic` may be passed by position (for `nn.remat`'s static_argnums); with
  `scanned=True` the block returns (x, None), the (carry, output) pair of `nn.scan`.
  """
  cfg: ViTConfig
  scanned: bool = False

  @nn.compact
  def __call__(self, x, deterministic: bool):
    cfg, dtype = self.cfg, self.cfg.compute_dtype
    eps = cfg.layer_norm_eps
    y = nn.LayerNorm(epsilon=eps, dtype=dtype, name="LayerNorm_0")(x)
    y = MultiHeadSelfAttention(
        num_heads=cfg.num_heads, dropout_rate=cfg.attention_dropout,
        qkv_bias=cfg.qkv_bias, scale=cfg.attention_scale, layout=cfg.attention, dtype=dtype,
        name="MultiHeadDotProductAttention_1")(y, deterministic=deterministic)
    x = x + Dropout(cfg.attention_output_dropout, mask=cfg.dropout_mask, rng=cfg.dropout_rng,
                    bits=cfg.dropout_bits)(
        y, deterministic=deterministic)
    y = nn.LayerNorm(epsilon=eps, dtype=dtype, name="LayerNorm_2")(x)
    x = x + MlpBlock(cfg.mlp_dim, cfg.dropout, gelu=cfg.gelu, dropout_mask=cfg.dropout_mask,
                     dropout_rng=cfg.dropout_rng, dropout_bits=cfg.dropout_bits, dtype=dtype,
                     name="MlpBlock_3")(
                         y, deterministic=deterministic)
    return (x, None) if self.scanned else x


class AddPositionEmbs(nn.Module):
  """Adds a learned (1, tokens, width) position embedding."""

  @nn.compact
  def __call__(self, x):
    pos = self.param("pos_embedding", nn.initializers.normal(stddev=0.02), (1,) + x.shape[1:])
    return x + pos.astype(x.dtype)


# Variable collections that carry one slice per block when the encoder is scanned: the
# parameters, and the LoRA tree that `kswap_jax.lora.apply` passes as a collection.
SCANNED_COLLECTIONS = ("params", "lora")


class Transformer(nn.Module):
  """The `Transformer` sub-tree of the checkpoints.

  Unscanned (default): blocks `encoderblock_{i}`. With `cfg.scan` one `encoderblock` under
  `nn.scan` whose parameters have a leading layer axis (`scan_params` converts). With
  `cfg.remat` each block is recomputed in the backward pass (policy `cfg.remat_policy`).
  """
  cfg: ViTConfig

  @nn.compact
  def __call__(self, x, *, deterministic: bool, train_blocks: int | None = None):
    """`train_blocks`: only blocks below this index use dropout (None: all of them)."""
    cfg = self.cfg
    if train_blocks is not None and cfg.scan:
      raise ValueError("train_blocks: needs the unscanned encoder (model.scan = False)")
    x = AddPositionEmbs(name="posembed_input")(x)
    x = Dropout(cfg.dropout, mask=cfg.dropout_mask, rng=cfg.dropout_rng,
                bits=cfg.dropout_bits)(x, deterministic=deterministic)
    block = Encoder1DBlock
    if cfg.remat:
      # static_argnums counts `self`: 2 is `deterministic`.
      block = nn.remat(block, static_argnums=(2,), prevent_cse=not cfg.scan,
                       policy=getattr(jax.checkpoint_policies, cfg.remat_policy))
    if cfg.scan:
      block = nn.scan(block, variable_axes={c: 0 for c in SCANNED_COLLECTIONS},
                      split_rngs={"params": True, "dropout": True}, in_axes=nn.broadcast,
                      length=cfg.depth)
      x, _ = block(cfg, scanned=True, name="encoderblock")(x, deterministic)
    else:
      for i in range(cfg.depth):
        frozen = train_blocks is not None and i >= train_blocks
        x = block(cfg, name=f"encoderblock_{i}")(x, deterministic or frozen)
    return nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=cfg.compute_dtype,
                        name="encoder_norm")(x)


_BLOCK = re.compile(r"encoderblock_(\d+)$")


def scan_params(tree: dict[str, Any]) -> dict[str, Any]:
  """Unscanned checkpoint layout -> the `model.scan` layout.

  `Transformer/encoderblock_{i}/<path>` (i = 0..depth-1) becomes
  `Transformer/encoderblock/<path>` holding the depth leaves stacked on a new leading axis;
  everything else is kept. Works on any tree with that naming (base parameters, a LoRA
  tree, optimizer moments).

  Args:
    tree: nested dict whose `Transformer` node holds `encoderblock_{i}` sub-trees.

  Returns:
    A new tree; inverse of `unscan_params`.

  Example:
    >>> scanned = vit.scan_params(params)   # then apply a model built with scan=True
  """
  if "Transformer" not in tree:
    return dict(tree)
  inner = dict(tree["Transformer"])
  blocks = sorted(((int(m.group(1)), k) for k in inner if (m := _BLOCK.match(k))))
  if not blocks:
    return dict(tree)
  if [i for i, _ in blocks] != list(range(len(blocks))):
    raise ValueError(f"tree: encoder blocks {[k for _, k in blocks]} are not numbered 0..n-1")
  stacked = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *(inner.pop(k) for _, k in blocks))
  inner["encoderblock"] = stacked
  return {**tree, "Transformer": inner}


def unscan_params(tree: dict[str, Any]) -> dict[str, Any]:
  """`model.scan` layout -> the unscanned checkpoint layout (inverse of `scan_params`).

  Args:
    tree: nested dict whose `Transformer/encoderblock` leaves have a leading layer axis.

  Returns:
    A new tree with `Transformer/encoderblock_{i}` sub-trees (vit_jax names).
  """
  if "Transformer" not in tree or "encoderblock" not in tree["Transformer"]:
    return dict(tree)
  inner = dict(tree["Transformer"])
  stacked = inner.pop("encoderblock")
  depths = {x.shape[0] for x in jax.tree_util.tree_leaves(stacked)}
  if len(depths) != 1:
    raise ValueError(f"tree: scanned leaves disagree on the layer axis ({sorted(depths)})")
  for i in range(depths.pop()):
    inner[f"encoderblock_{i}"] = jax.tree_util.tree_map(lambda x, i=i: x[i], stacked)
  return {**tree, "Transformer": inner}


class CheckpointLayout:
  """A scanned model that takes its variables in the unscanned (checkpoint) layout.

  `apply` stacks every collection with `scan_params` inside the traced function, so the
  trainable tree, optimizer state, group-lasso groups and checkpoints keep the vit_jax
  names; a tree that is already scanned (e.g. a frozen base converted once) passes through
  unchanged. Stacking a tree copies it once per call: convert large frozen trees up front.

  Example:
    >>> model = vit.CheckpointLayout(vit.build(cfg_with_scan))
    >>> logits = lora.apply(model, vit.scan_params(base), lora_tree, images, scale=s)
  """

  def __init__(self, model: "nn.Module | CheckpointLayout"):
    self.model = model.model if isinstance(model, CheckpointLayout) else model

  def apply(self, variables, *args, **kwargs):
    return self.model.apply({k: scan_params(v) for k, v in variables.items()}, *args, **kwargs)

  def __getattr__(self, name):
    if name == "model":  # not set yet (e.g. during copy/unpickling)
      raise AttributeError(name)
    return getattr(self.model, name)


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
               labels: jax.Array | None = None, train_blocks: int | None = None):
    """Logits (batch, num_classes); with `features=True`, the representation the head sees.

    `labels` matter only for the CosFace head, which subtracts its margin from the
    true-class cosine when they are given (training, and GS-LoRA's evaluation).
    `train_blocks`: with `train`, only the blocks below this index use dropout; the ones
    above run as in evaluation (LIRF's frozen upper half). Unscanned encoders only.
    """
    if images.ndim != 4:
      raise ValueError(f"images: expected a batch (batch, height, width, channels), got shape "
                       f"{images.shape}")
    x = nn.Conv(self.cfg.width, (self.cfg.patch_size,) * 2, strides=(self.cfg.patch_size,) * 2,
                padding="VALID", dtype=self.cfg.compute_dtype, name="embedding")(images)
    n, h, w, c = x.shape
    x = x.reshape(n, h * w, c)
    if self.cfg.pool == "cls":
      cls = self.param("cls", nn.initializers.zeros, (1, 1, c))
      x = jnp.concatenate([jnp.tile(cls, (n, 1, 1)).astype(x.dtype), x], axis=1)
      x = Transformer(self.cfg, name="Transformer")(x, deterministic=not train,
                                                    train_blocks=train_blocks)[:, 0]
    else:  # "gap": big_vision's global average pool over the normed patch tokens
      x = Transformer(self.cfg, name="Transformer")(x, deterministic=not train,
                                                    train_blocks=train_blocks).mean(axis=1)
    x = x.astype(jnp.float32)  # the representation, head and logits stay float32
    if self.cfg.representation_size:
      x = jnp.tanh(nn.Dense(self.cfg.representation_size, name="pre_logits")(x))
    if features:
      return x
    if self.cfg.head == "cosface":
      return CosFaceHead(self.cfg.num_classes, self.cfg.cosface_scale, self.cfg.cosface_margin,
                         name="head")(x, labels)
    return nn.Dense(self.cfg.num_classes, name="head", kernel_init=nn.initializers.zeros)(x)


def build(model_cfg: ml_collections.ConfigDict) -> VisionTransformer | CheckpointLayout:
  """Builds the model named by `model_cfg.variant`; raises ConfigError on bad fields.

  With `model.scan` the encoder is one `nn.scan`ned block wrapped in `CheckpointLayout`, so
  every method, checkpoint, LoRA tree and group-lasso grouping keeps the unscanned vit_jax
  layout (`init_variables` returns it too) and only the compiled program changes.
  """
  model = VisionTransformer(vit_config(model_cfg))
  return CheckpointLayout(model) if model.cfg.scan else model


def input_shape(model_cfg: ml_collections.ConfigDict, batch: int = 1) -> tuple[int, ...]:
  """(batch, image_size, image_size, channels) for `model.init` and shape checks."""
  return (batch, int(model_cfg.image_size), int(model_cfg.image_size), int(model_cfg.channels))


def init_variables(model: VisionTransformer | CheckpointLayout, model_cfg, rng
                   ) -> dict[str, Any]:
  """{"params": ...}: random parameters for an input of the configured shape, in the
  unscanned checkpoint layout for a `CheckpointLayout` model (`build` with `model.scan`)."""
  x = jnp.zeros(input_shape(model_cfg), jnp.float32)
  if isinstance(model, CheckpointLayout):
    return {"params": unscan_params(model.model.init(rng, x)["params"])}
  return {"params": model.init(rng, x)["params"]}


def init_params(model: VisionTransformer, model_cfg, rng) -> dict[str, Any]:
  """Random parameters (the `params` collection) for an input of the configured shape."""
  return init_variables(model, model_cfg, rng)["params"]
