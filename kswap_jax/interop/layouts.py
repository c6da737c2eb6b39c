"""Checkpoint layouts of other code bases -> our ViT parameter tree (base, LoRA, head).

Each layout function takes a flat `{source key: ndarray}` (from `kswap_jax.interop.read`)
and returns a `Converted`: our parameters by vit_jax name, a LoRA tree when the source has
loralib `lora_A`/`lora_B`, the `model` config fields that describe the source architecture,
and what happened to every source key (used, or ignored with a reason).

Layouts (`LAYOUTS`):

  vit_jax      google-research/vision_transformer and AugReg `.npz`: our names already.
  big_vision   big_vision `.npz`: `pos_embedding` at the top without a CLS slot (added to the
               patches before the optional `cls` token is prepended), "gap" or "tok" pooling,
               blocks either as `Transformer/encoderblock_{i}` or scanned as one
               `Transformer/encoderblock` with a leading layer axis; block modules named
               `LayerNorm_0, MultiHeadDotProductAttention_0, LayerNorm_1, MlpBlock_0`.
  timm         timm `VisionTransformer` state dicts: fused `attn.qkv` split into q/k/v,
               `cls_token`, `pos_embed`, `norm`, `head`.
  ks_vit       the ViT-pytorch layout of the Knowledge Swapping release
               (`transformer.encoder.layer.{i}...`), with loralib A/B on any Linear.
  gslora_face  GS-LoRA's Face Transformer `ViT_face` (`transformer.layers.{i}.{0,1}.fn...`),
               its CosFace `loss.weight`, loralib A/B on the FFN (and on qkv in the ablation).
  torchvision  torchvision's `VisionTransformer` (`vit_b_16`: `encoder.layers.encoder_layer_{i}`,
               fused `in_proj_weight`), GS-LoRA's ImageNet backbone, loralib A/B on the MLP.

PyTorch Linear weights (out, in) become kernels (in, out); attention projections are
reshaped to flax's (width, heads, head_dim) and (heads, head_dim, width); convolutions
OIHW become HWIO. loralib's A (r, in) and B (out, r) become a = Aᵀ (in, r), b = Bᵀ (r, out),
so that W_torch + s·B·A corresponds to kernel + s·a·b (s = alpha / r).

What shapes cannot tell (the number of heads of a fused or square projection, whether
stored weights already include the LoRA update, big_vision's pooling when there is no CLS
token, the face head's margin type) is an argument; a missing or inconsistent one raises
`ValueError` naming it.

Example:
  >>> conv = layouts.timm(interop.read("vit_small.safetensors"), num_heads=6)
  >>> conv.params["Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/kernel"].shape
  (384, 6, 64)

References: Dosovitskiy et al., arXiv 2010.11929 (ViT); Steiner et al., arXiv 2106.10270
(AugReg); Hu et al., arXiv 2106.09685 (LoRA, loralib); Xing et al., arXiv 2502.08075
(Knowledge Swapping); Zhao et al., arXiv 2403.11530 (GS-LoRA); Zhong & Deng, arXiv
2103.14803 (Face Transformer).
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable, NamedTuple

import numpy as np

from kswap_jax.models import vit as vit_lib

LORA_MODES = ("separate", "merged", "unmerge", "merge")


class Converted(NamedTuple):
  """Result of a layout conversion.

  Attributes:
    params: {our "/"-joined name: float32 array}, the base parameters (vit_jax names).
    lora: {".../<module>/a" or "/b": float32 array}; empty when none is kept.
    model: `model` config fields describing the source architecture (name, variant, widths,
      num_heads, qkv_bias, attention_scale, layer_norm_eps, gelu, pool, head, ...).
    lora_alpha: the alpha the LoRA tree is meant to be scaled with (scale = alpha / rank).
    used: source keys that went into `params` or `lora`.
    ignored: {source key: why it was not used}.
    notes: one-line remarks for the summary (prefix stripped, LoRA merged, ...).
  """
  params: dict[str, np.ndarray]
  lora: dict[str, np.ndarray]
  model: dict[str, Any]
  lora_alpha: float
  used: list[str]
  ignored: dict[str, str]
  notes: list[str]


class _Source:
  """The source tensors with bookkeeping of which keys were used."""

  def __init__(self, tensors: dict[str, Any], layout: str):
    self.tensors, self.layout = tensors, layout
    self.used: set[str] = set()
    self.ignored: dict[str, str] = {}

  def has(self, key: str) -> bool:
    return key in self.tensors

  def take(self, key: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
    if key not in self.tensors:
      sample = ", ".join(sorted(self.tensors)[:3])
      raise ValueError(f"source: no {key!r} — not a {self.layout} checkpoint? (its keys "
                       f"start {sample}; check --layout and --prefix)")
    x = self.tensors[key]
    if not isinstance(x, np.ndarray) or not np.issubdtype(x.dtype, np.floating) and \
        x.dtype.name != "bfloat16":
      raise ValueError(f"source: {key} is {getattr(x, 'dtype', type(x).__name__)}, expected "
                       f"a floating-point tensor")
    if shape is not None and tuple(x.shape) != tuple(shape):
      raise ValueError(f"source: {key} has shape {tuple(x.shape)}, expected {tuple(shape)} "
                       f"(shape mismatch: wrong --layout or --num_heads?)")
    self.used.add(key)
    return np.asarray(x, np.float32)

  def drop(self, key: str, reason: str) -> None:
    self.used.discard(key)
    self.ignored[key] = reason

  def indices(self, pattern: str) -> list[int]:
    """Sorted distinct integers captured by `pattern` (one group) over the keys."""
    rx = re.compile(pattern)
    found = sorted({int(m.group(1)) for k in self.tensors if (m := rx.fullmatch(k))})
    if found != list(range(len(found))):
      raise ValueError(f"source: block indices {found} are not 0..n-1")
    return found

  def finish(self, params, lora, model, alpha, notes) -> Converted:
    for k in self.tensors:
      if k not in self.used and k not in self.ignored:
        self.ignored[k] = f"not part of the {self.layout} layout"
    return Converted(params, lora, model, alpha, sorted(self.used), dict(sorted(
        self.ignored.items())), notes)


_HEADS_EXAMPLE = {"gslora_face": "8 for GS-LoRA's Face Transformer",
                  "timm": "6 for ViT-S, 12 for ViT-B"}


def _heads(num_heads: int | None, width: int, layout: str) -> int:
  if num_heads is None:
    raise ValueError(f"num_heads: the {layout} layout stores attention as square or fused "
                     f"matrices, so the number of heads cannot be read from shapes; pass it "
                     f"(e.g. --num_heads {_HEADS_EXAMPLE.get(layout, '12 for ViT-B')})")
  if num_heads <= 0 or width % num_heads:
    raise ValueError(f"num_heads: {num_heads} does not divide the width {width}")
  return int(num_heads)


def _grid(tokens: int, what: str) -> int:
  g = math.isqrt(tokens)
  if g * g != tokens:
    raise ValueError(f"source: {what} has {tokens} patch positions, not a square grid")
  return g


def model_fields(name: str, *, width: int, depth: int, mlp_dim: int, num_heads: int,
                 patch: int, num_classes: int, image_size: int, channels: int = 3,
                 **extra) -> dict[str, Any]:
  """`model` config fields for these sizes: a named variant when one fits, else overrides."""
  sizes = dict(width=width, depth=depth, mlp_dim=mlp_dim, num_heads=num_heads)
  fields = dict(name=name, num_classes=num_classes, image_size=image_size, channels=channels,
                **dict.fromkeys(vit_lib.VARIANT_FIELDS, 0))
  for variant, known in vit_lib.VARIANTS.items():
    if known == tuple(sizes[f] for f in vit_lib.VARIANT_FIELDS):
      fields["variant"] = f"{variant}/{patch}"
      break
  else:
    fields.update(variant=f"B/{patch}", **sizes)
  fields.update(extra)
  return fields


# ----------------------------------------------------------------------------------------------
# LoRA pairs (torch layout) -> our tree, according to the mode.

class _Lora:
  """Collects loralib (A, B) pairs per our module and applies `mode` at the end."""

  def __init__(self, src: _Source, mode: str | None, alpha: float, default_mode: str | None):
    self.src, self.mode, self.alpha, self.default_mode = src, mode, alpha, default_mode
    self.pairs: list[tuple[str, str, str, np.ndarray, np.ndarray]] = []
    if mode is not None and mode not in LORA_MODES:
      raise ValueError(f"lora: unknown mode {mode!r} (expected one of {', '.join(LORA_MODES)})")

  def find(self, src_module: str, ours: str, out_slices: list[tuple[str, slice, slice]] | None
           = None) -> None:
    """Records `<src_module>.lora_A/lora_B` for our module(s) when present.

    `out_slices` splits a fused (MergedLinear) pair: [(our module, A rows, B rows), ...].
    """
    ka, kb = src_module + ".lora_A", src_module + ".lora_B"
    if not (self.src.has(ka) or self.src.has(kb)):
      return
    a, b = self.src.take(ka), self.src.take(kb)
    for name, rows_a, rows_b in out_slices or [(ours, slice(None), slice(None))]:
      self.pairs.append((name, ka, kb, a[rows_a], b[rows_b]))

  def resolve(self, params: dict[str, np.ndarray], notes: list[str]) -> dict[str, np.ndarray]:
    if not self.pairs:
      return {}
    mode = self.mode or self.default_mode
    if mode is None:
      raise ValueError(
          f"lora: the checkpoint holds loralib A/B for {len(self.pairs)} module(s); say whether "
          f"its weights already include s·B·A: --lora separate (they do not: keep A/B as a "
          f"LoRA tree), merged (they do: drop A/B), unmerge (they do: subtract and keep A/B) or "
          f"merge (they do not: fold A/B in)")
    out: dict[str, np.ndarray] = {}
    ranks = set()
    for name, ka, kb, a_t, b_t in self.pairs:
      r = a_t.shape[0]
      ranks.add(r)
      kernel = params[name + "/kernel"]
      fan_in = math.prod(kernel.shape[:kernel.ndim - 1 if name.endswith("/out") else 1])
      fan_out = kernel.size // fan_in
      if a_t.shape != (r, fan_in) or b_t.shape != (fan_out, r):
        raise ValueError(f"source: {ka} {a_t.shape} / {kb} {b_t.shape} do not fit {name} "
                         f"(expected ({r}, {fan_in}) and ({fan_out}, {r}))")
      a, b = np.ascontiguousarray(a_t.T), np.ascontiguousarray(b_t.T)
      if mode == "merged":
        self.src.drop(ka, "LoRA A, already merged into the weights (lora=merged)")
        self.src.drop(kb, "LoRA B, already merged into the weights (lora=merged)")
        continue
      delta = ((self.alpha / r) * (a @ b)).reshape(kernel.shape).astype(np.float32)
      if mode == "unmerge":
        params[name + "/kernel"] = kernel - delta
      elif mode == "merge":
        params[name + "/kernel"] = kernel + delta
        continue
      out[name + "/a"], out[name + "/b"] = a, b
    verb = {"separate": "kept as a LoRA tree", "merged": "dropped (weights already merged)",
            "unmerge": "subtracted from the weights and kept as a LoRA tree",
            "merge": "folded into the weights"}[mode]
    notes.append(f"LoRA: {len(self.pairs)} module(s), rank {sorted(ranks)}, alpha "
                 f"{self.alpha:g}: {verb}")
    return out


# ----------------------------------------------------------------------------------------------
# torch Linear / LayerNorm helpers.

def _dense(src: _Source, key: str, n_in: int, n_out: int, bias: bool = True):
  w = src.take(key + ".weight", (n_out, n_in))
  out = {"kernel": np.ascontiguousarray(w.T)}
  if bias:
    out["bias"] = src.take(key + ".bias", (n_out,))
  return out


def _norm(src: _Source, key: str, width: int):
  return {"scale": src.take(key + ".weight", (width,)), "bias": src.take(key + ".bias", (width,))}


def _attn_in(kernel_t: np.ndarray, bias: np.ndarray | None, heads: int):
  """(out=width, in=width) torch rows -> flax DenseGeneral (width, heads, head_dim)."""
  width = kernel_t.shape[1]
  out = {"kernel": np.ascontiguousarray(kernel_t.T).reshape(width, heads, -1)}
  if bias is not None:
    out["bias"] = bias.reshape(heads, -1)
  return out


def _attn_out(weight: np.ndarray, bias: np.ndarray, heads: int):
  width = weight.shape[0]
  return {"kernel": np.ascontiguousarray(weight.T).reshape(heads, -1, width), "bias": bias}


def _put(flat: dict[str, np.ndarray], prefix: str, module: dict[str, np.ndarray]) -> None:
  for k, v in module.items():
    flat[f"{prefix}/{k}"] = np.ascontiguousarray(v, np.float32)


def _split_qkv(flat: dict[str, np.ndarray], block: str, qkv: np.ndarray,
               bias: np.ndarray | None, width: int, heads: int) -> None:
  """A fused torch (3·width, width) qkv weight (and bias) as our query/key/value."""
  for j, m in enumerate(("query", "key", "value")):
    rows = slice(j * width, (j + 1) * width)
    _put(flat, f"{block}/{ATTN}/{m}",
         _attn_in(qkv[rows], None if bias is None else bias[rows], heads))


def _attention_out(src: "_Source", flat: dict[str, np.ndarray], block: str, key: str,
                   width: int, heads: int) -> None:
  """A torch Linear `key` (width -> width) as our attention `out` projection."""
  _put(flat, f"{block}/{ATTN}/out", _attn_out(src.take(f"{key}.weight", (width, width)),
                                              src.take(f"{key}.bias", (width,)), heads))


def _mlp(src: "_Source", flat: dict[str, np.ndarray], lr: "_Lora", block: str,
         fc1: str, fc2: str, width: int, mlp_dim: int) -> None:
  """The two FFN Linears `fc1`, `fc2` as MlpBlock_3/Dense_0/1, with their LoRA if any."""
  for key, name, n_in, n_out in ((fc1, "Dense_0", width, mlp_dim),
                                 (fc2, "Dense_1", mlp_dim, width)):
    _put(flat, f"{block}/MlpBlock_3/{name}", _dense(src, key, n_in, n_out))
    lr.find(key, f"{block}/MlpBlock_3/{name}")


def _classifier(src: "_Source", flat: dict[str, np.ndarray], pre_logits: str, head: str,
                width: int, notes: list[str] | None = None,
                num_classes: int | None = None) -> tuple[int, int]:
  """Optional `pre_logits` Linear + `head` Linear; returns (representation size, classes).
  A checkpoint without a head (timm's `num_classes=0`) gets a zero head of `num_classes`."""
  rep = 0
  if src.has(f"{pre_logits}.weight"):
    rep = src.take(f"{pre_logits}.weight").shape[0]
    _put(flat, "pre_logits", _dense(src, pre_logits, width, rep))
  if not src.has(f"{head}.weight") and notes is not None:
    if not num_classes:
      raise ValueError(f"num_classes: the checkpoint has no {head}.weight (a headless model); "
                       f"pass --num_classes for a zero head")
    _put(flat, "head", {"kernel": np.zeros((rep or width, int(num_classes)), np.float32),
                        "bias": np.zeros((int(num_classes),), np.float32)})
    notes.append(f"no head in the checkpoint: a zero head of {int(num_classes)} classes")
    return rep, int(num_classes)
  n_cls = src.take(f"{head}.weight").shape[0]
  if num_classes and int(num_classes) != n_cls:
    raise ValueError(f"num_classes: the checkpoint has a head of {n_cls} classes; "
                     f"--num_classes is only for a headless one")
  _put(flat, "head", _dense(src, head, rep or width, n_cls))
  return rep, n_cls


def _block(i: int) -> str:
  return f"Transformer/encoderblock_{i}"


ATTN = "MultiHeadDotProductAttention_1"


# ----------------------------------------------------------------------------------------------
# vit_jax / AugReg.

def vit_jax(tensors: dict[str, Any], *, num_heads: int | None = None) -> Converted:
  """vit_jax / AugReg `.npz`: names are ours; checks shapes and reports extra keys."""
  src = _Source(tensors, "vit_jax")
  kernel = src.take("embedding/kernel")
  if kernel.ndim != 4:
    raise ValueError(f"source: embedding/kernel has shape {kernel.shape}, expected (p, p, c, w)")
  patch, _, channels, width = kernel.shape
  depth = len(src.indices(r"Transformer/encoderblock_(\d+)/.*"))
  q = src.take(f"{_block(0)}/{ATTN}/query/kernel")
  heads = q.shape[1]
  if num_heads is not None and num_heads != heads:
    raise ValueError(f"num_heads: {num_heads}, but the checkpoint's query kernel {q.shape} has "
                     f"{heads} heads")
  pos = src.take("Transformer/posembed_input/pos_embedding")
  grid = _grid(pos.shape[1] - 1, "Transformer/posembed_input/pos_embedding")
  mlp_dim = src.take(f"{_block(0)}/MlpBlock_3/Dense_0/kernel").shape[1]
  qkv_bias = src.has(f"{_block(0)}/{ATTN}/query/bias")
  want = _vit_shapes(width, depth, heads, mlp_dim, patch, channels, pos.shape[1], qkv_bias)
  params = {}
  for name, shape in want.items():
    params[name] = src.take(name, shape)
  rep = 0
  if src.has("pre_logits/kernel"):
    rep = src.take("pre_logits/kernel").shape[1]
    params["pre_logits/kernel"] = src.take("pre_logits/kernel", (width, rep))
    params["pre_logits/bias"] = src.take("pre_logits/bias", (rep,))
  head_in = rep or width
  num_classes = src.take("head/kernel").shape[1]
  params["head/kernel"] = src.take("head/kernel", (head_in, num_classes))
  params["head/bias"] = src.take("head/bias", (num_classes,))
  model = model_fields("vit", width=width, depth=depth, mlp_dim=mlp_dim, num_heads=heads,
                       patch=patch, num_classes=num_classes, image_size=grid * patch,
                       channels=channels, representation_size=rep, qkv_bias=qkv_bias,
                       attention_scale="head_dim", layer_norm_eps=1e-6, gelu="tanh",
                       pool="cls", head="linear")
  return src.finish(params, {}, model, 1.0, [])


def _vit_shapes(width, depth, heads, mlp_dim, patch, channels, tokens, qkv_bias, cls=True):
  hd = width // heads
  want = {"embedding/kernel": (patch, patch, channels, width), "embedding/bias": (width,),
          "Transformer/posembed_input/pos_embedding": (1, tokens, width),
          "Transformer/encoder_norm/scale": (width,), "Transformer/encoder_norm/bias": (width,)}
  if cls:
    want["cls"] = (1, 1, width)
  for i in range(depth):
    b = _block(i)
    for ln in ("LayerNorm_0", "LayerNorm_2"):
      want[f"{b}/{ln}/scale"] = want[f"{b}/{ln}/bias"] = (width,)
    for m in ("query", "key", "value"):
      want[f"{b}/{ATTN}/{m}/kernel"] = (width, heads, hd)
      if qkv_bias:
        want[f"{b}/{ATTN}/{m}/bias"] = (heads, hd)
    want[f"{b}/{ATTN}/out/kernel"] = (heads, hd, width)
    want[f"{b}/{ATTN}/out/bias"] = (width,)
    want[f"{b}/MlpBlock_3/Dense_0/kernel"] = (width, mlp_dim)
    want[f"{b}/MlpBlock_3/Dense_0/bias"] = (mlp_dim,)
    want[f"{b}/MlpBlock_3/Dense_1/kernel"] = (mlp_dim, width)
    want[f"{b}/MlpBlock_3/Dense_1/bias"] = (width,)
  return want


# ----------------------------------------------------------------------------------------------
# big_vision.

_BV_BLOCK = {"LayerNorm_0": "LayerNorm_0", "MultiHeadDotProductAttention_0": ATTN,
             "LayerNorm_1": "LayerNorm_2", "MlpBlock_0": "MlpBlock_3"}


def posemb_sincos_2d(h: int, w: int, width: int, temperature: float = 10_000.0) -> np.ndarray:
  """big_vision's fixed 2-D sin-cos position embedding (MoCo v3), shape (1, h·w, width)."""
  if width % 4:
    raise ValueError(f"posemb: sincos2d needs a width divisible by 4, got {width}")
  y, x = np.mgrid[:h, :w]
  omega = 1.0 / temperature ** (np.arange(width // 4) / (width // 4 - 1))
  y = np.einsum("m,d->md", y.flatten(), omega)
  x = np.einsum("m,d->md", x.flatten(), omega)
  pe = np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1)
  return pe.astype(np.float32)[None]


def big_vision(tensors: dict[str, Any], *, num_heads: int | None = None, pool: str | None = None,
               posemb: str = "learn", image_size: int | None = None,
               num_classes: int | None = None) -> Converted:
  """big_vision ViT `.npz` (learned or sincos2d posemb; tok or gap pooling; scanned or not).

  Args:
    tensors: flat "/"-joined names.
    num_heads: optional check; the heads are read from the query kernel.
    pool: "tok" or "gap"; inferred as "tok" when a `cls` token is present. Without one it
      must be given ("gap"); "map" (attention pooling) and "0" have no counterpart here.
    posemb: "learn" (the checkpoint's `pos_embedding`) or "sincos2d" (computed; needs
      `image_size`).
    image_size: the input resolution, needed only with posemb="sincos2d".
    num_classes: only for checkpoints without a `head`: a zero head of this many classes.
  """
  src = _Source(tensors, "big_vision")
  if any(k.startswith("MAPHead_0/") for k in tensors):
    raise ValueError("pool: the checkpoint has a MAPHead (attention pooling), which our ViT "
                     "does not implement")
  has_cls = src.has("cls")
  if pool is None:
    if not has_cls:
      raise ValueError("pool: the checkpoint has no cls token, so it pools by 'gap' or '0' "
                       "(big_vision pool_type); pass --pool gap")
    pool = "tok"
  if pool not in ("tok", "gap"):
    raise ValueError(f"pool: {pool!r} is not supported (expected tok or gap)")
  if (pool == "tok") != has_cls:
    raise ValueError(f"pool: {pool!r} but the checkpoint {'has' if has_cls else 'has no'} "
                     f"cls token")
  kernel = src.take("embedding/kernel")
  if kernel.ndim != 4:
    raise ValueError(f"source: embedding/kernel has shape {kernel.shape}, expected (p, p, c, w)")
  patch, _, channels, width = kernel.shape
  scanned = any(k.startswith("Transformer/encoderblock/") for k in tensors)
  notes = [f"big_vision: pool {pool}, posemb {posemb}, {'scanned' if scanned else 'per-block'} "
           f"encoder"]
  params = {"embedding/kernel": kernel, "embedding/bias": src.take("embedding/bias", (width,))}
  if scanned:  # one tree with a leading layer axis: slice it into per-block trees
    stacked = {k[len("Transformer/encoderblock/"):]: src.take(k) for k in tensors
               if k.startswith("Transformer/encoderblock/")}
    depth = stacked["LayerNorm_0/scale"].shape[0] if "LayerNorm_0/scale" in stacked else 0
    for rest, x in stacked.items():
      if x.ndim == 0 or x.shape[0] != depth:
        raise ValueError(f"source: Transformer/encoderblock/{rest} has shape {x.shape}, expected "
                         f"a leading layer axis of {depth}")
    blocks = [{rest: x[i] for rest, x in stacked.items()} for i in range(depth)]
  else:
    depth = len(src.indices(r"Transformer/encoderblock_(\d+)/.*"))
    blocks = [{k[len(_block(i)) + 1:]: src.take(k) for k in tensors
               if k.startswith(_block(i) + "/")} for i in range(depth)]
  if not depth:
    raise ValueError("source: no Transformer/encoderblock[_i] parameters — not a big_vision ViT?")
  for i, block in enumerate(blocks):
    for rest, x in block.items():
      module, _, leaf = rest.partition("/")
      if module not in _BV_BLOCK:
        raise ValueError(f"source: {rest} in block {i}: unknown big_vision block module {module!r}")
      params[f"{_block(i)}/{_BV_BLOCK[module]}/{leaf}"] = x
  heads = params[f"{_block(0)}/{ATTN}/query/kernel"].shape[1]
  if num_heads is not None and num_heads != heads:
    raise ValueError(f"num_heads: {num_heads}, but the query kernel has {heads} heads")
  mlp_dim = params[f"{_block(0)}/MlpBlock_3/Dense_0/kernel"].shape[1]
  qkv_bias = f"{_block(0)}/{ATTN}/query/bias" in params
  if posemb == "learn":
    pe = src.take("pos_embedding")
    tokens = pe.shape[1]
    if pool == "tok" and math.isqrt(tokens - 1) ** 2 == tokens - 1:
      # Pre-2022 big_vision: cls concatenated first, posemb with a cls slot, as ours.
      grid = _grid(tokens - 1, "pos_embedding")
      notes.append("pos_embedding already has a cls slot (old big_vision layout)")
    else:
      grid = _grid(tokens, "pos_embedding")
  elif posemb == "sincos2d":
    if not image_size:
      raise ValueError("image_size: posemb=sincos2d needs the input resolution (--image_size)")
    if image_size % patch:
      raise ValueError(f"image_size: {image_size} is not divisible by the patch size {patch}")
    grid = image_size // patch
    pe = posemb_sincos_2d(grid, grid, width)
    notes.append("position embedding: computed sincos2d grid stored as a parameter")
  else:
    raise ValueError(f"posemb: {posemb!r} (expected learn or sincos2d)")
  if pool == "tok":
    params["cls"] = src.take("cls", (1, 1, width))
    if pe.shape[1] == grid * grid:
      # big_vision adds the posemb before prepending cls: a zero posemb slot for cls is the same.
      pe = np.concatenate([np.zeros((1, 1, width), np.float32), pe], axis=1)
  params["Transformer/posembed_input/pos_embedding"] = pe
  params["Transformer/encoder_norm/scale"] = src.take("Transformer/encoder_norm/scale", (width,))
  params["Transformer/encoder_norm/bias"] = src.take("Transformer/encoder_norm/bias", (width,))
  rep = 0
  if src.has("pre_logits/kernel"):
    rep = src.take("pre_logits/kernel").shape[1]
    params["pre_logits/kernel"] = src.take("pre_logits/kernel", (width, rep))
    params["pre_logits/bias"] = src.take("pre_logits/bias", (rep,))
  head_in = rep or width
  if src.has("head/kernel"):
    n_cls = src.take("head/kernel").shape[1]
    params["head/kernel"] = src.take("head/kernel", (head_in, n_cls))
    params["head/bias"] = src.take("head/bias", (n_cls,))
  elif num_classes:
    n_cls = int(num_classes)
    params["head/kernel"] = np.zeros((head_in, n_cls), np.float32)
    params["head/bias"] = np.zeros((n_cls,), np.float32)
    notes.append(f"no head in the checkpoint: a zero head of {n_cls} classes")
  else:
    raise ValueError("num_classes: the checkpoint has no head; pass --num_classes for a zero head")
  want = _vit_shapes(width, depth, heads, mlp_dim, patch, channels, pe.shape[1], qkv_bias,
                     cls=pool == "tok")
  for name, shape in want.items():
    if name not in params:
      raise ValueError(f"source: the big_vision checkpoint lacks the parameter for {name}")
    if params[name].shape != shape:
      raise ValueError(f"source: {name} has shape {params[name].shape}, expected {shape}")
  model = model_fields("vit", width=width, depth=depth, mlp_dim=mlp_dim, num_heads=heads,
                       patch=patch, num_classes=n_cls, image_size=grid * patch, channels=channels,
                       representation_size=rep, qkv_bias=qkv_bias, attention_scale="head_dim",
                       layer_norm_eps=1e-6, gelu="tanh",
                       pool="cls" if pool == "tok" else "gap", head="linear")
  params = {k: np.ascontiguousarray(v, np.float32) for k, v in params.items()}
  return src.finish(params, {}, model, 1.0, notes)


# ----------------------------------------------------------------------------------------------
# timm.

_TIMM_UNSUPPORTED = {
    r"fc_norm\..*": "fc_norm (average pooling with a norm after pooling)",
    r"blocks\.\d+\.ls[12]\..*": "LayerScale (ls1/ls2)",
    r"blocks\.\d+\.attn\.[qk]_norm\..*": "q/k normalisation (qk_norm)",
    r"norm_pre\..*": "a pre-encoder norm (norm_pre)",
    r"reg_token": "register tokens",
    r"attn_pool\..*": "attention pooling",
    r"patch_embed\.norm\..*": "a norm in the patch embedding",
}


def timm(tensors: dict[str, Any], *, num_heads: int | None = None, lora: str | None = None,
         lora_alpha: float = 1.0, num_classes: int | None = None) -> Converted:
  """timm `VisionTransformer` state dict (class token, learned posemb, token pooling).

  Args:
    tensors: flat "."-joined state-dict keys.
    num_heads: heads of the fused qkv projection (required).
    lora: what to do with loralib A/B if present (see `LORA_MODES`); required when present.
    lora_alpha: loralib alpha (scale = alpha / r), default 1 as in loralib.
    num_classes: only for a headless checkpoint (timm's `num_classes=0`): a zero head of
      this many classes.
  """
  src = _Source(tensors, "timm")
  for pattern, what in _TIMM_UNSUPPORTED.items():
    hit = next((k for k in tensors if re.fullmatch(pattern, k)), None)
    if hit:
      raise ValueError(f"source: {hit}: this timm model uses {what}, which our ViT does not have")
  conv = src.take("patch_embed.proj.weight")
  if conv.ndim != 4:
    raise ValueError(f"source: patch_embed.proj.weight has shape {conv.shape}, expected OIHW")
  width, channels, patch, _ = conv.shape
  heads = _heads(num_heads, width, "timm")
  depth = len(src.indices(r"blocks\.(\d+)\..*"))
  mlp_dim = src.take("blocks.0.mlp.fc1.weight").shape[0]
  qkv_bias = src.has("blocks.0.attn.qkv.bias")
  lr = _Lora(src, lora, lora_alpha, None)
  flat: dict[str, np.ndarray] = {}
  _put(flat, "embedding", {"kernel": conv.transpose(2, 3, 1, 0),
                           "bias": src.take("patch_embed.proj.bias", (width,))})
  flat["cls"] = src.take("cls_token", (1, 1, width))
  pos = src.take("pos_embed")
  if pos.ndim != 3 or pos.shape[2] != width:
    raise ValueError(f"source: pos_embed has shape {pos.shape}, expected (1, tokens, {width})")
  notes = []
  if math.isqrt(pos.shape[1]) ** 2 == pos.shape[1]:  # no_embed_class: no slot for the CLS token
    pos = np.concatenate([np.zeros((1, 1, width), np.float32), pos], axis=1)
    notes.append("pos_embed has no class-token slot (no_embed_class): a zero slot was added")
  grid = _grid(pos.shape[1] - 1, "pos_embed")
  flat["Transformer/posembed_input/pos_embedding"] = pos
  for i in range(depth):
    t, b = f"blocks.{i}", _block(i)
    _put(flat, f"{b}/LayerNorm_0", _norm(src, f"{t}.norm1", width))
    qkv = src.take(f"{t}.attn.qkv.weight", (3 * width, width))
    bias = src.take(f"{t}.attn.qkv.bias", (3 * width,)) if qkv_bias else None
    _split_qkv(flat, b, qkv, bias, width, heads)
    _merged_linear_lora(src, lr, f"{t}.attn.qkv", b, width)
    _attention_out(src, flat, b, f"{t}.attn.proj", width, heads)
    lr.find(f"{t}.attn.proj", f"{b}/{ATTN}/out")
    _put(flat, f"{b}/LayerNorm_2", _norm(src, f"{t}.norm2", width))
    _mlp(src, flat, lr, b, f"{t}.mlp.fc1", f"{t}.mlp.fc2", width, mlp_dim)
  _put(flat, "Transformer/encoder_norm", _norm(src, "norm", width))
  rep, num_classes = _classifier(src, flat, "pre_logits.fc", "head", width, notes, num_classes)
  lora_tree = lr.resolve(flat, notes)
  model = model_fields("vit", width=width, depth=depth, mlp_dim=mlp_dim, num_heads=heads,
                       patch=patch, num_classes=num_classes, image_size=grid * patch,
                       channels=channels, representation_size=rep, qkv_bias=qkv_bias,
                       attention_scale="head_dim", layer_norm_eps=1e-6, gelu="erf",
                       pool="cls", head="linear")
  return src.finish(flat, lora_tree, model, lora_alpha, notes)


def _merged_linear_lora(src: _Source, lr: _Lora, key: str, block: str, width: int) -> None:
  """loralib `MergedLinear(enable_lora=[True, True, True])` on a fused qkv: A (3r, in) and
  B (3·width, r) hold one (A_j, B_j) pair per q, k, v."""
  if not src.has(key + ".lora_A"):
    return
  a_rows, b_rows = src.tensors[key + ".lora_A"].shape[0], src.tensors.get(
      key + ".lora_B", np.zeros((0, 0))).shape[0]
  if a_rows % 3 or b_rows != 3 * width:
    raise ValueError(f"source: {key}.lora_A/lora_B: only a MergedLinear LoRA on all of q, k "
                     f"and v is supported (A rows {a_rows}, B rows {b_rows})")
  r = a_rows // 3
  lr.find(key, "", [(f"{block}/{ATTN}/{m}", slice(j * r, (j + 1) * r),
                     slice(j * width, (j + 1) * width))
                    for j, m in enumerate(("query", "key", "value"))])


# ----------------------------------------------------------------------------------------------
# Knowledge Swapping (ViT-pytorch layout).

def ks_vit(tensors: dict[str, Any], *, num_heads: int | None = None, lora: str | None = None,
           lora_alpha: float = 1.0) -> Converted:
  """The ViT-pytorch (jeonsworld) layout used by the Knowledge Swapping release.

  Keys: `transformer.embeddings.{patch_embeddings, position_embeddings, cls_token}`,
  `transformer.encoder.layer.{i}.{attention_norm, attn.{query,key,value,out}, ffn_norm,
  ffn.{fc1,fc2}}`, `transformer.encoder.encoder_norm`, `head`; loralib `lora_A`/`lora_B`
  on any of those Linears.

  Args:
    tensors: flat "."-joined state-dict keys.
    num_heads: attention heads (required; 12 for ViT-B/16).
    lora: what to do with A/B if present (see `LORA_MODES`); required when present.
    lora_alpha: loralib alpha, 1 in the release (scale 1/8 at r = 8).
  """
  src = _Source(tensors, "ks_vit")
  e = "transformer.embeddings"
  conv = src.take(f"{e}.patch_embeddings.weight")
  if conv.ndim != 4:
    raise ValueError(f"source: {e}.patch_embeddings.weight has shape {conv.shape}, expected OIHW")
  width, channels, patch, _ = conv.shape
  heads = _heads(num_heads, width, "ks_vit")
  depth = len(src.indices(r"transformer\.encoder\.layer\.(\d+)\..*"))
  mlp_dim = src.take("transformer.encoder.layer.0.ffn.fc1.weight").shape[0]
  lr = _Lora(src, lora, lora_alpha, None)
  flat: dict[str, np.ndarray] = {}
  _put(flat, "embedding", {"kernel": conv.transpose(2, 3, 1, 0),
                           "bias": src.take(f"{e}.patch_embeddings.bias", (width,))})
  flat["cls"] = src.take(f"{e}.cls_token", (1, 1, width))
  pos = src.take(f"{e}.position_embeddings")
  grid = _grid(pos.shape[1] - 1, f"{e}.position_embeddings")
  flat["Transformer/posembed_input/pos_embedding"] = src.take(f"{e}.position_embeddings",
                                                              (1, grid * grid + 1, width))
  for i in range(depth):
    t, b = f"transformer.encoder.layer.{i}", _block(i)
    _put(flat, f"{b}/LayerNorm_0", _norm(src, f"{t}.attention_norm", width))
    for m in ("query", "key", "value"):
      d = _dense(src, f"{t}.attn.{m}", width, width)
      _put(flat, f"{b}/{ATTN}/{m}", _attn_in(d["kernel"].T, d["bias"], heads))
      lr.find(f"{t}.attn.{m}", f"{b}/{ATTN}/{m}")
    _attention_out(src, flat, b, f"{t}.attn.out", width, heads)
    lr.find(f"{t}.attn.out", f"{b}/{ATTN}/out")
    _put(flat, f"{b}/LayerNorm_2", _norm(src, f"{t}.ffn_norm", width))
    _mlp(src, flat, lr, b, f"{t}.ffn.fc1", f"{t}.ffn.fc2", width, mlp_dim)
  _put(flat, "Transformer/encoder_norm", _norm(src, "transformer.encoder.encoder_norm", width))
  num_classes = src.take("head.weight").shape[0]
  _put(flat, "head", _dense(src, "head", width, num_classes))
  notes: list[str] = []
  lora_tree = lr.resolve(flat, notes)
  model = model_fields("vit", width=width, depth=depth, mlp_dim=mlp_dim, num_heads=heads,
                       patch=patch, num_classes=num_classes, image_size=grid * patch,
                       channels=channels, representation_size=0, qkv_bias=True,
                       attention_scale="head_dim", layer_norm_eps=1e-6, gelu="erf",
                       pool="cls", head="linear")
  return src.finish(flat, lora_tree, model, lora_alpha, notes)


# ----------------------------------------------------------------------------------------------
# GS-LoRA Face Transformer.

FACE_HEADS = ("cosface", "softmax")


def gslora_face(tensors: dict[str, Any], *, num_heads: int | None = None,
                lora: str | None = "merged", lora_alpha: float = 1.0, face_head: str = "cosface",
                channels: int = 3) -> Converted:
  """GS-LoRA's `ViT_face` (lucidrains-style blocks, fused bias-free qkv, CosFace `loss`).

  Keys: `patch_to_embedding` (Linear on (p1, p2, c)-ordered patches), `cls_token`,
  `pos_embedding`, `transformer.layers.{i}.0.fn.{norm, fn.to_qkv, fn.to_out.0}`,
  `transformer.layers.{i}.1.fn.{norm, fn.net.0, fn.net.3}`, `mlp_head.0` (the final
  LayerNorm), `loss.weight` (classes, width).

  Args:
    tensors: flat "."-joined state-dict keys.
    num_heads: attention heads (required; 8 in GS-LoRA).
    lora: GS-LoRA saves merged FFN weights *and* the A/B that were merged, so the default
      "merged" keeps the weights as they are and drops A/B (reported); "unmerge" recovers
      the previous task's weights plus this task's LoRA; "separate"/"merge" are for files
      saved with unmerged weights.
    lora_alpha: loralib alpha (1 in GS-LoRA: scale 1/8 at r = 8).
    face_head: "cosface" (GS-LoRA's `-head CosFace`; `loss.weight` only) or "softmax"
      (`loss.weight` and `loss.bias`: a linear head). ArcFace/SFace heads are not supported,
      and cannot be told from CosFace by shapes, hence the argument.
    channels: image channels, to split the patch Linear's input p·p·c (3 for RGB).
  """
  if face_head not in FACE_HEADS:
    raise ValueError(f"face_head: {face_head!r} (expected one of {', '.join(FACE_HEADS)})")
  src = _Source(tensors, "gslora_face")
  w_patch = src.take("patch_to_embedding.weight")
  if w_patch.ndim != 2:
    raise ValueError(f"source: patch_to_embedding.weight has shape {w_patch.shape}, expected 2-D")
  width, patch_dim = w_patch.shape
  patch = math.isqrt(patch_dim // channels)
  if patch * patch * channels != patch_dim:
    raise ValueError(f"channels: patch_to_embedding takes {patch_dim} inputs, not p·p·{channels}")
  heads = _heads(num_heads, width, "gslora_face")
  depth = len(src.indices(r"transformer\.layers\.(\d+)\..*"))
  mlp_dim = src.take("transformer.layers.0.1.fn.fn.net.0.weight").shape[0]
  lr = _Lora(src, lora, lora_alpha, None)
  flat: dict[str, np.ndarray] = {}
  # Linear on (p1, p2, c)-ordered patches == a stride-p conv with kernel (p, p, c, w).
  _put(flat, "embedding", {"kernel": w_patch.T.reshape(patch, patch, channels, width),
                           "bias": src.take("patch_to_embedding.bias", (width,))})
  flat["cls"] = src.take("cls_token", (1, 1, width))
  pos = src.take("pos_embedding")
  grid = _grid(pos.shape[1] - 1, "pos_embedding")
  flat["Transformer/posembed_input/pos_embedding"] = src.take(
      "pos_embedding", (1, grid * grid + 1, width))
  for i in range(depth):
    t, b = f"transformer.layers.{i}", _block(i)
    _put(flat, f"{b}/LayerNorm_0", _norm(src, f"{t}.0.fn.norm", width))
    qkv = src.take(f"{t}.0.fn.fn.to_qkv.weight")
    if qkv.shape != (3 * width, width):
      raise ValueError(f"source: {t}.0.fn.fn.to_qkv.weight has shape {qkv.shape}, expected "
                       f"{(3 * width, width)} (heads x dim_head must equal the width)")
    if src.has(f"{t}.0.fn.fn.to_qkv.bias"):
      raise ValueError(f"source: {t}.0.fn.fn.to_qkv.bias: ViT_face's qkv has no bias")
    _split_qkv(flat, b, qkv, None, width, heads)
    _merged_linear_lora(src, lr, f"{t}.0.fn.fn.to_qkv", b, width)  # the Attention ablation
    _attention_out(src, flat, b, f"{t}.0.fn.fn.to_out.0", width, heads)
    _put(flat, f"{b}/LayerNorm_2", _norm(src, f"{t}.1.fn.norm", width))
    _mlp(src, flat, lr, b, f"{t}.1.fn.fn.net.0", f"{t}.1.fn.fn.net.3", width, mlp_dim)
  _put(flat, "Transformer/encoder_norm", _norm(src, "mlp_head.0", width))
  num_classes = src.take("loss.weight").shape[0]
  head = "linear" if face_head == "softmax" else "cosface"
  _put(flat, "head", _dense(src, "loss", width, num_classes, bias=head == "linear"))
  notes: list[str] = []
  lora_tree = lr.resolve(flat, notes)
  model = model_fields("vit_face", width=width, depth=depth, mlp_dim=mlp_dim, num_heads=heads,
                       patch=patch, num_classes=num_classes, image_size=grid * patch,
                       channels=channels, representation_size=0, qkv_bias=False,
                       attention_scale="width", layer_norm_eps=1e-5, gelu="erf",
                       pool="cls", head=head)
  return src.finish(flat, lora_tree, model, lora_alpha, notes)


# ----------------------------------------------------------------------------------------------
# torchvision VisionTransformer (GS-LoRA's ImageNet-100 ViT-B/16).

def torchvision(tensors: dict[str, Any], *, num_heads: int | None = None, lora: str | None = None,
                lora_alpha: float = 1.0) -> Converted:
  """torchvision `vit_b_16`-style state dict (GS-LoRA's ImageNet ViT-B/16 backbone).

  Keys: `conv_proj`, `class_token`, `encoder.pos_embedding`,
  `encoder.layers.encoder_layer_{i}.{ln_1, self_attention.{in_proj_weight, in_proj_bias,
  out_proj}, ln_2, mlp.{0,3}}` (older files: `mlp.linear_1/linear_2`), `encoder.ln`,
  `heads.head` (and `heads.pre_logits` with a tanh representation layer); loralib A/B on
  the MLP Linears as GS-LoRA's `replace_ffn_with_lora` puts them.

  Args:
    tensors: flat "."-joined state-dict keys.
    num_heads: attention heads (required; 12 for ViT-B/16).
    lora: what to do with A/B if present (see `LORA_MODES`); required when present.
    lora_alpha: loralib alpha (1 in GS-LoRA).
  """
  src = _Source(tensors, "torchvision")
  conv = src.take("conv_proj.weight")
  if conv.ndim != 4:
    raise ValueError(f"source: conv_proj.weight has shape {conv.shape}, expected OIHW")
  width, channels, patch, _ = conv.shape
  heads = _heads(num_heads, width, "torchvision")
  layer = "encoder.layers.encoder_layer_"
  depth = len(src.indices(r"encoder\.layers\.encoder_layer_(\d+)\..*"))
  fc = ("mlp.0", "mlp.3") if src.has(f"{layer}0.mlp.0.weight") else ("mlp.linear_1", "mlp.linear_2")
  mlp_dim = src.take(f"{layer}0.{fc[0]}.weight").shape[0]
  lr = _Lora(src, lora, lora_alpha, None)
  flat: dict[str, np.ndarray] = {}
  _put(flat, "embedding", {"kernel": conv.transpose(2, 3, 1, 0),
                           "bias": src.take("conv_proj.bias", (width,))})
  flat["cls"] = src.take("class_token", (1, 1, width))
  pos = src.take("encoder.pos_embedding")
  grid = _grid(pos.shape[1] - 1, "encoder.pos_embedding")
  flat["Transformer/posembed_input/pos_embedding"] = src.take(
      "encoder.pos_embedding", (1, grid * grid + 1, width))
  for i in range(depth):
    t, b = f"{layer}{i}", _block(i)
    _put(flat, f"{b}/LayerNorm_0", _norm(src, f"{t}.ln_1", width))
    qkv = src.take(f"{t}.self_attention.in_proj_weight", (3 * width, width))
    bias = src.take(f"{t}.self_attention.in_proj_bias", (3 * width,))
    _split_qkv(flat, b, qkv, bias, width, heads)
    _attention_out(src, flat, b, f"{t}.self_attention.out_proj", width, heads)
    _put(flat, f"{b}/LayerNorm_2", _norm(src, f"{t}.ln_2", width))
    _mlp(src, flat, lr, b, f"{t}.{fc[0]}", f"{t}.{fc[1]}", width, mlp_dim)
  _put(flat, "Transformer/encoder_norm", _norm(src, "encoder.ln", width))
  rep, num_classes = _classifier(src, flat, "heads.pre_logits", "heads.head", width)
  notes: list[str] = []
  lora_tree = lr.resolve(flat, notes)
  model = model_fields("vit", width=width, depth=depth, mlp_dim=mlp_dim, num_heads=heads,
                       patch=patch, num_classes=num_classes, image_size=grid * patch,
                       channels=channels, representation_size=rep, qkv_bias=True,
                       attention_scale="head_dim", layer_norm_eps=1e-6, gelu="erf",
                       pool="cls", head="linear")
  return src.finish(flat, lora_tree, model, lora_alpha, notes)


LAYOUTS: dict[str, Callable[..., Converted]] = {
    "vit_jax": vit_jax, "big_vision": big_vision, "timm": timm, "ks_vit": ks_vit,
    "gslora_face": gslora_face, "torchvision": torchvision,
}

# A key each torch-style layout must have, to find the state dict inside a larger checkpoint.
ANCHORS = {
    "vit_jax": "embedding/kernel", "big_vision": "embedding/kernel",
    "timm": "patch_embed.proj.weight", "ks_vit": "transformer.embeddings.patch_embeddings.weight",
    "gslora_face": "patch_to_embedding.weight", "torchvision": "conv_proj.weight",
}


# ----------------------------------------------------------------------------------------------
# Export: our (merged) parameters -> timm state dict.

def to_timm(params: dict[str, np.ndarray], model: dict[str, Any] | None = None
            ) -> dict[str, np.ndarray]:
  """Our flat parameters (LoRA merged) as a timm `VisionTransformer` state dict.

  Args:
    params: {our "/"-joined name: array}, e.g. `checkpoint.flatten(merged_params)`.
    model: optional `model` fields; an attention_scale other than "head_dim", a head
      other than "linear", pool "gap", or layer_norm_eps != 1e-6 has no timm counterpart
      and raises ValueError.

  Returns:
    {timm key: float32 array} (fused qkv, (out, in) weights, OIHW patch conv).
  """
  model = dict(model or {})
  for field, ok in (("attention_scale", "head_dim"), ("head", "linear"), ("pool", "cls")):
    if model.get(field, ok) != ok:
      raise ValueError(f"model.{field}: {model[field]!r} has no timm counterpart "
                       f"(timm's ViT uses {field} = {ok!r})")
  if float(model.get("layer_norm_eps", 1e-6)) != 1e-6:
    raise ValueError(f"model.layer_norm_eps: {model['layer_norm_eps']} (timm's ViT uses 1e-6)")
  p = {k: np.asarray(v, np.float32) for k, v in params.items()}
  if "cls" not in p:
    raise ValueError("params: no cls token (a gap-pooled model has no timm counterpart)")
  out = {"cls_token": p["cls"], "pos_embed": p["Transformer/posembed_input/pos_embedding"],
         "patch_embed.proj.weight": p["embedding/kernel"].transpose(3, 2, 0, 1),
         "patch_embed.proj.bias": p["embedding/bias"],
         "norm.weight": p["Transformer/encoder_norm/scale"],
         "norm.bias": p["Transformer/encoder_norm/bias"]}
  block = re.compile(r"Transformer/encoderblock_(\d+)/")
  depth = len({int(m.group(1)) for k in p if (m := block.match(k))})
  for i in range(depth):
    b, t = _block(i), f"blocks.{i}"
    for norm, ln in (("norm1", "LayerNorm_0"), ("norm2", "LayerNorm_2")):
      out[f"{t}.{norm}.weight"] = p[f"{b}/{ln}/scale"]
      out[f"{t}.{norm}.bias"] = p[f"{b}/{ln}/bias"]
    qkv = [p[f"{b}/{ATTN}/{m}/kernel"] for m in ("query", "key", "value")]
    width = qkv[0].shape[0]
    out[f"{t}.attn.qkv.weight"] = np.concatenate([k.reshape(width, -1).T for k in qkv])
    if f"{b}/{ATTN}/query/bias" in p:
      out[f"{t}.attn.qkv.bias"] = np.concatenate(
          [p[f"{b}/{ATTN}/{m}/bias"].reshape(-1) for m in ("query", "key", "value")])
    k_out = p[f"{b}/{ATTN}/out/kernel"]
    out[f"{t}.attn.proj.weight"] = k_out.reshape(-1, k_out.shape[-1]).T
    out[f"{t}.attn.proj.bias"] = p[f"{b}/{ATTN}/out/bias"]
    for j, fc in ((0, "fc1"), (1, "fc2")):
      out[f"{t}.mlp.{fc}.weight"] = p[f"{b}/MlpBlock_3/Dense_{j}/kernel"].T
      out[f"{t}.mlp.{fc}.bias"] = p[f"{b}/MlpBlock_3/Dense_{j}/bias"]
  if "pre_logits/kernel" in p:
    out["pre_logits.fc.weight"] = p["pre_logits/kernel"].T
    out["pre_logits.fc.bias"] = p["pre_logits/bias"]
  out["head.weight"], out["head.bias"] = p["head/kernel"].T, p["head/bias"]
  return {k: np.ascontiguousarray(v, np.float32) for k, v in out.items()}
