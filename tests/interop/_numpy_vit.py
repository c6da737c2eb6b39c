"""Numpy forwards written from each source layout's own description, on its own keys.

They share only primitives (LayerNorm, GELU, softmax attention); every layout gathers its
weights by its own key names and follows its own order of operations (where the position
embedding is added, how patches are flattened, how q/k/v are stored, the attention scale,
the pooling and the head), so a conversion mistake shows up as a logit mismatch.
Images are NHWC float64 arrays; the outputs are float64 logits.
"""

from __future__ import annotations

import numpy as np
from scipy.special import erf


def layer_norm(x, g, b, eps):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * g + b


def gelu(x, approximate=False):
  if approximate:
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))
  return 0.5 * x * (1 + erf(x / np.sqrt(2)))


def softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def attention(q, k, v, heads, scale):
  """q, k, v: (n, t, width) -> (n, t, width), heads split as (h d) on the last axis."""
  n, t, w = q.shape
  split = lambda x: x.reshape(n, t, heads, w // heads).transpose(0, 2, 1, 3)
  q, k, v = split(q), split(k), split(v)
  a = softmax(np.einsum("nhid,nhjd->nhij", q, k) * scale)
  return np.einsum("nhij,nhjd->nhid", a, v).transpose(0, 2, 1, 3).reshape(n, t, w)


def linear(x, sd, key, bias=True):
  """torch Linear: x Wᵀ + b with W (out, in)."""
  y = x @ np.asarray(sd[key + ".weight"], np.float64).T
  return y + np.asarray(sd[key + ".bias"], np.float64) if bias else y


def lora_linear(x, sd, key, alpha=1.0, bias=True):
  """loralib Linear in train mode (weights unmerged): x Wᵀ + b + (alpha/r)·x Aᵀ Bᵀ."""
  y = linear(x, sd, key, bias)
  if key + ".lora_A" in sd:
    a = np.asarray(sd[key + ".lora_A"], np.float64)
    b = np.asarray(sd[key + ".lora_B"], np.float64)
    r = b.shape[1]
    groups = a.shape[0] // r   # loralib MergedLinear: A (g·r, in), B (g·out_g, r), per group j
    xa = np.split(x @ a.T, groups, axis=-1)                      # x A_jᵀ
    y = y + (alpha / r) * np.concatenate(
        [xa_j @ b_j.T for xa_j, b_j in zip(xa, np.split(b, groups))], axis=-1)
  return y


def conv_patches(images, weight, bias):
  """A stride-p, p x p torch Conv2d (weight OIHW) on NHWC images -> (n, h·w, out)."""
  o, c, p, _ = weight.shape
  n, hh, ww, _ = images.shape
  x = images.reshape(n, hh // p, p, ww // p, p, c)
  y = np.einsum("nhiwjc,ocij->nhwo", x, np.asarray(weight, np.float64)) + bias
  return y.reshape(n, -1, o)


def _f(sd, key):
  return np.asarray(sd[key], np.float64)


def timm_forward(sd, images, heads, alpha=1.0):
  """timm VisionTransformer (class token, pos_embed incl. its slot, fused qkv, token pool)."""
  x = conv_patches(images, _f(sd, "patch_embed.proj.weight"), _f(sd, "patch_embed.proj.bias"))
  n, _, w = x.shape
  x = np.concatenate([np.broadcast_to(_f(sd, "cls_token"), (n, 1, w)), x], 1) + _f(sd, "pos_embed")
  depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
  for i in range(depth):
    t = f"blocks.{i}"
    y = layer_norm(x, _f(sd, f"{t}.norm1.weight"), _f(sd, f"{t}.norm1.bias"), 1e-6)
    qkv = lora_linear(y, sd, f"{t}.attn.qkv", alpha, bias=f"{t}.attn.qkv.bias" in sd)
    q, k, v = np.split(qkv, 3, axis=-1)
    x = x + lora_linear(attention(q, k, v, heads, (w // heads) ** -0.5), sd, f"{t}.attn.proj", alpha)
    y = layer_norm(x, _f(sd, f"{t}.norm2.weight"), _f(sd, f"{t}.norm2.bias"), 1e-6)
    x = x + lora_linear(gelu(lora_linear(y, sd, f"{t}.mlp.fc1", alpha)), sd, f"{t}.mlp.fc2", alpha)
  x = layer_norm(x, _f(sd, "norm.weight"), _f(sd, "norm.bias"), 1e-6)[:, 0]
  return linear(x, sd, "head")


def ks_vit_forward(sd, images, heads, alpha=1.0):
  """ViT-pytorch (jeonsworld) / Knowledge Swapping ViT_bird, loralib on any Linear."""
  e = "transformer.embeddings"
  x = conv_patches(images, _f(sd, f"{e}.patch_embeddings.weight"),
                   _f(sd, f"{e}.patch_embeddings.bias"))
  n, _, w = x.shape
  x = np.concatenate([np.broadcast_to(_f(sd, f"{e}.cls_token"), (n, 1, w)), x], 1)
  x = x + _f(sd, f"{e}.position_embeddings")
  depth = len({k.split(".")[3] for k in sd if k.startswith("transformer.encoder.layer.")})
  for i in range(depth):
    t = f"transformer.encoder.layer.{i}"
    y = layer_norm(x, _f(sd, f"{t}.attention_norm.weight"), _f(sd, f"{t}.attention_norm.bias"),
                   1e-6)
    q, k, v = (lora_linear(y, sd, f"{t}.attn.{m}", alpha) for m in ("query", "key", "value"))
    x = x + lora_linear(attention(q, k, v, heads, (w // heads) ** -0.5), sd, f"{t}.attn.out", alpha)
    y = layer_norm(x, _f(sd, f"{t}.ffn_norm.weight"), _f(sd, f"{t}.ffn_norm.bias"), 1e-6)
    x = x + lora_linear(gelu(lora_linear(y, sd, f"{t}.ffn.fc1", alpha)), sd, f"{t}.ffn.fc2", alpha)
  x = layer_norm(x, _f(sd, "transformer.encoder.encoder_norm.weight"),
                 _f(sd, "transformer.encoder.encoder_norm.bias"), 1e-6)[:, 0]
  return linear(x, sd, "head")


def face_forward(sd, images, heads, labels=None, s=64.0, m=0.35):
  """GS-LoRA ViT_face (weights as stored: merged), CosFace `loss` with optional margin."""
  p2c = sd["patch_to_embedding.weight"].shape[1]
  n, hh, ww, c = images.shape
  p = int(round((p2c / c) ** 0.5))
  # rearrange 'b c (h p1) (w p2) -> b (h w) (p1 p2 c)' on NCHW == this on NHWC:
  x = images.reshape(n, hh // p, p, ww // p, p, c).transpose(0, 1, 3, 2, 4, 5).reshape(
      n, (hh // p) * (ww // p), p * p * c)
  x = linear(x, sd, "patch_to_embedding")
  w = x.shape[-1]
  x = np.concatenate([np.broadcast_to(_f(sd, "cls_token"), (n, 1, w)), x], 1)
  x = x + _f(sd, "pos_embedding")[:, :x.shape[1]]
  depth = len({k.split(".")[2] for k in sd if k.startswith("transformer.layers.")})
  for i in range(depth):
    t = f"transformer.layers.{i}"
    y = layer_norm(x, _f(sd, f"{t}.0.fn.norm.weight"), _f(sd, f"{t}.0.fn.norm.bias"), 1e-5)
    q, k, v = np.split(linear(y, sd, f"{t}.0.fn.fn.to_qkv", bias=False), 3, axis=-1)
    x = x + linear(attention(q, k, v, heads, w ** -0.5), sd, f"{t}.0.fn.fn.to_out.0")
    y = layer_norm(x, _f(sd, f"{t}.1.fn.norm.weight"), _f(sd, f"{t}.1.fn.norm.bias"), 1e-5)
    x = x + linear(gelu(linear(y, sd, f"{t}.1.fn.fn.net.0")), sd, f"{t}.1.fn.fn.net.3")
  emb = layer_norm(x[:, 0], _f(sd, "mlp_head.0.weight"), _f(sd, "mlp_head.0.bias"), 1e-5)
  wt = _f(sd, "loss.weight")
  norm = lambda z: z / np.maximum(np.linalg.norm(z, axis=-1, keepdims=True), 1e-12)
  cos = norm(emb) @ norm(wt).T
  if labels is not None:
    cos = cos - m * np.eye(wt.shape[0])[labels]
  return s * cos


def _flax_block(x, blk, names, heads, eps=1e-6, gelu_approximate=True):
  """A flax pre-LN block; `names` = (ln1, attention, ln2, mlp) module names in `blk`."""
  ln1, att, ln2, mlp = names
  g = lambda k: np.asarray(blk[k], np.float64)
  y = layer_norm(x, g(f"{ln1}/scale"), g(f"{ln1}/bias"), eps)
  n, t, w = y.shape
  qkv = [np.einsum("ntw,whd->nthd", y, g(f"{att}/{m}/kernel")) + g(f"{att}/{m}/bias")
         for m in ("query", "key", "value")]
  hd = qkv[0].shape[-1]
  a = softmax(np.einsum("nihd,njhd->nhij", qkv[0], qkv[1]) * hd ** -0.5)
  o = np.einsum("nhij,njhd->nihd", a, qkv[2])
  x = x + np.einsum("nthd,hdw->ntw", o, g(f"{att}/out/kernel")) + g(f"{att}/out/bias")
  y = layer_norm(x, g(f"{ln2}/scale"), g(f"{ln2}/bias"), eps)
  y = gelu(y @ g(f"{mlp}/Dense_0/kernel") + g(f"{mlp}/Dense_0/bias"), gelu_approximate)
  return x + y @ g(f"{mlp}/Dense_1/kernel") + g(f"{mlp}/Dense_1/bias")


def _flax_conv(images, kernel, bias):
  p, _, c, o = kernel.shape
  n, hh, ww, _ = images.shape
  x = images.reshape(n, hh // p, p, ww // p, p, c)
  return (np.einsum("nhiwjc,ijco->nhwo", x, kernel) + bias).reshape(n, -1, o)


def vit_jax_forward(params, images):
  """vision_transformer `.npz`: cls then posemb (with its cls slot), tanh GELU, token pool."""
  g = lambda k: np.asarray(params[k], np.float64)
  x = _flax_conv(images, g("embedding/kernel"), g("embedding/bias"))
  n, _, w = x.shape
  x = np.concatenate([np.broadcast_to(g("cls"), (n, 1, w)), x], 1)
  x = x + g("Transformer/posembed_input/pos_embedding")
  depth = len({k.split("/")[1] for k in params if k.startswith("Transformer/encoderblock_")})
  for i in range(depth):
    blk = {k.split("/", 2)[2]: v for k, v in params.items()
           if k.startswith(f"Transformer/encoderblock_{i}/")}
    x = _flax_block(x, blk, ("LayerNorm_0", "MultiHeadDotProductAttention_1", "LayerNorm_2",
                             "MlpBlock_3"), None)
  x = layer_norm(x, g("Transformer/encoder_norm/scale"), g("Transformer/encoder_norm/bias"), 1e-6)
  return x[:, 0] @ g("head/kernel") + g("head/bias")


def big_vision_forward(params, images, pool):
  """big_vision ViT: posemb added to the patches, then cls ("tok"), scanned blocks, tanh GELU."""
  g = lambda k: np.asarray(params[k], np.float64)
  x = _flax_conv(images, g("embedding/kernel"), g("embedding/bias")) + g("pos_embedding")
  n, _, w = x.shape
  if pool == "tok":
    x = np.concatenate([np.broadcast_to(g("cls"), (n, 1, w)), x], 1)
  stacked = {k.split("/", 2)[2]: v for k, v in params.items()
             if k.startswith("Transformer/encoderblock/")}
  depth = stacked["LayerNorm_0/scale"].shape[0]
  for i in range(depth):
    blk = {k: v[i] for k, v in stacked.items()}
    x = _flax_block(x, blk, ("LayerNorm_0", "MultiHeadDotProductAttention_0", "LayerNorm_1",
                             "MlpBlock_0"), None)
  x = layer_norm(x, g("Transformer/encoder_norm/scale"), g("Transformer/encoder_norm/bias"), 1e-6)
  x = x[:, 0] if pool == "tok" else x.mean(1)
  return x @ g("head/kernel") + g("head/bias")


def torchvision_forward(sd, images, heads, alpha=1.0):
  """torchvision VisionTransformer: cls concatenated, then `encoder.pos_embedding` added;
  nn.MultiheadAttention with in_proj rows [q; k; v]; LayerNorm eps 1e-6; exact GELU."""
  x = conv_patches(images, _f(sd, "conv_proj.weight"), _f(sd, "conv_proj.bias"))
  n, _, w = x.shape
  x = np.concatenate([np.broadcast_to(_f(sd, "class_token"), (n, 1, w)), x], 1)
  x = x + _f(sd, "encoder.pos_embedding")
  layers = {k.split(".")[2] for k in sd if k.startswith("encoder.layers.")}
  for i in range(len(layers)):
    t = f"encoder.layers.encoder_layer_{i}"
    y = layer_norm(x, _f(sd, f"{t}.ln_1.weight"), _f(sd, f"{t}.ln_1.bias"), 1e-6)
    qkv = y @ _f(sd, f"{t}.self_attention.in_proj_weight").T + _f(sd, f"{t}.self_attention.in_proj_bias")
    q, k, v = np.split(qkv, 3, axis=-1)
    x = x + linear(attention(q, k, v, heads, (w // heads) ** -0.5), sd, f"{t}.self_attention.out_proj")
    y = layer_norm(x, _f(sd, f"{t}.ln_2.weight"), _f(sd, f"{t}.ln_2.bias"), 1e-6)
    x = x + lora_linear(gelu(lora_linear(y, sd, f"{t}.mlp.0", alpha)), sd, f"{t}.mlp.3", alpha)
  x = layer_norm(x, _f(sd, "encoder.ln.weight"), _f(sd, "encoder.ln.bias"), 1e-6)[:, 0]
  return linear(x, sd, "heads.head")
