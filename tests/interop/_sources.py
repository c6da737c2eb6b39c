"""Small random checkpoints in each source layout (torch layouts as {key: ndarray})."""

from __future__ import annotations

import collections

import numpy as np

WIDTH, DEPTH, MLP, HEADS, PATCH, IMAGE, CLASSES, RANK = 64, 2, 96, 4, 4, 16, 7, 4
TOKENS = (IMAGE // PATCH) ** 2


class _Rng:
  def __init__(self, seed):
    self.rng = np.random.default_rng(seed)

  def w(self, *shape, scale=None):
    fan_in = shape[-1] if len(shape) > 1 else 1
    scale = scale if scale is not None else fan_in ** -0.5
    return (self.rng.standard_normal(shape) * scale).astype(np.float32)

  def ln(self, n):
    return (1 + 0.1 * self.rng.standard_normal(n)).astype(np.float32), self.w(n, scale=0.1)


def timm_state(seed=0, qkv_bias=True, lora=False):
  r = _Rng(seed)
  sd = collections.OrderedDict()
  sd["cls_token"] = r.w(1, 1, WIDTH, scale=0.5)
  sd["pos_embed"] = r.w(1, TOKENS + 1, WIDTH, scale=0.5)
  sd["patch_embed.proj.weight"] = r.w(WIDTH, 3, PATCH, PATCH, scale=0.2)
  sd["patch_embed.proj.bias"] = r.w(WIDTH, scale=0.1)
  for i in range(DEPTH):
    t = f"blocks.{i}"
    sd[f"{t}.norm1.weight"], sd[f"{t}.norm1.bias"] = r.ln(WIDTH)
    sd[f"{t}.attn.qkv.weight"] = r.w(3 * WIDTH, WIDTH)
    if qkv_bias:
      sd[f"{t}.attn.qkv.bias"] = r.w(3 * WIDTH, scale=0.1)
    if lora:  # loralib MergedLinear(enable_lora=[True, True, True])
      sd[f"{t}.attn.qkv.lora_A"] = r.w(3 * RANK, WIDTH)
      sd[f"{t}.attn.qkv.lora_B"] = r.w(3 * WIDTH, RANK, scale=0.5)
    sd[f"{t}.attn.proj.weight"], sd[f"{t}.attn.proj.bias"] = r.w(WIDTH, WIDTH), r.w(WIDTH, scale=0.1)
    sd[f"{t}.norm2.weight"], sd[f"{t}.norm2.bias"] = r.ln(WIDTH)
    sd[f"{t}.mlp.fc1.weight"], sd[f"{t}.mlp.fc1.bias"] = r.w(MLP, WIDTH), r.w(MLP, scale=0.1)
    if lora:
      sd[f"{t}.mlp.fc1.lora_A"], sd[f"{t}.mlp.fc1.lora_B"] = r.w(RANK, WIDTH), r.w(MLP, RANK, scale=0.5)
    sd[f"{t}.mlp.fc2.weight"], sd[f"{t}.mlp.fc2.bias"] = r.w(WIDTH, MLP), r.w(WIDTH, scale=0.1)
  sd["norm.weight"], sd["norm.bias"] = r.ln(WIDTH)
  sd["head.weight"], sd["head.bias"] = r.w(CLASSES, WIDTH), r.w(CLASSES, scale=0.1)
  return sd


def ks_vit_state(seed=1, lora=False):
  r = _Rng(seed)
  e = "transformer.embeddings"
  sd = collections.OrderedDict()
  sd[f"{e}.position_embeddings"] = r.w(1, TOKENS + 1, WIDTH, scale=0.5)
  sd[f"{e}.cls_token"] = r.w(1, 1, WIDTH, scale=0.5)
  sd[f"{e}.patch_embeddings.weight"] = r.w(WIDTH, 3, PATCH, PATCH, scale=0.2)
  sd[f"{e}.patch_embeddings.bias"] = r.w(WIDTH, scale=0.1)
  for i in range(DEPTH):
    t = f"transformer.encoder.layer.{i}"
    sd[f"{t}.attention_norm.weight"], sd[f"{t}.attention_norm.bias"] = r.ln(WIDTH)
    sd[f"{t}.ffn_norm.weight"], sd[f"{t}.ffn_norm.bias"] = r.ln(WIDTH)
    sd[f"{t}.ffn.fc1.weight"], sd[f"{t}.ffn.fc1.bias"] = r.w(MLP, WIDTH), r.w(MLP, scale=0.1)
    sd[f"{t}.ffn.fc2.weight"], sd[f"{t}.ffn.fc2.bias"] = r.w(WIDTH, MLP), r.w(WIDTH, scale=0.1)
    if lora:
      for fc, (n_in, n_out) in (("fc1", (WIDTH, MLP)), ("fc2", (MLP, WIDTH))):
        sd[f"{t}.ffn.{fc}.lora_A"] = r.w(RANK, n_in)
        sd[f"{t}.ffn.{fc}.lora_B"] = r.w(n_out, RANK, scale=0.5)
    for m in ("query", "key", "value", "out"):
      sd[f"{t}.attn.{m}.weight"], sd[f"{t}.attn.{m}.bias"] = r.w(WIDTH, WIDTH), r.w(WIDTH, scale=0.1)
  sd["transformer.encoder.encoder_norm.weight"], sd["transformer.encoder.encoder_norm.bias"] = r.ln(WIDTH)
  sd["head.weight"], sd["head.bias"] = r.w(CLASSES, WIDTH), r.w(CLASSES, scale=0.1)
  return sd


def face_state(seed=2, alpha=1.0):
  """A ViT_face state dict as GS-LoRA saves it after a task: W already holds +s·B·A."""
  r = _Rng(seed)
  sd = collections.OrderedDict()
  sd["pos_embedding"] = r.w(1, TOKENS + 1, WIDTH, scale=0.5)
  sd["patch_to_embedding.weight"] = r.w(WIDTH, PATCH * PATCH * 3, scale=0.2)
  sd["patch_to_embedding.bias"] = r.w(WIDTH, scale=0.1)
  sd["cls_token"] = r.w(1, 1, WIDTH, scale=0.5)
  for i in range(DEPTH):
    t = f"transformer.layers.{i}"
    sd[f"{t}.0.fn.norm.weight"], sd[f"{t}.0.fn.norm.bias"] = r.ln(WIDTH)
    sd[f"{t}.0.fn.fn.to_qkv.weight"] = r.w(3 * WIDTH, WIDTH, scale=0.5)
    sd[f"{t}.0.fn.fn.to_out.0.weight"], sd[f"{t}.0.fn.fn.to_out.0.bias"] = (
        r.w(WIDTH, WIDTH), r.w(WIDTH, scale=0.1))
    sd[f"{t}.1.fn.norm.weight"], sd[f"{t}.1.fn.norm.bias"] = r.ln(WIDTH)
    for net, (n_in, n_out) in (("net.0", (WIDTH, MLP)), ("net.3", (MLP, WIDTH))):
      k = f"{t}.1.fn.fn.{net}"
      w, a, b = r.w(n_out, n_in), r.w(RANK, n_in), r.w(n_out, RANK, scale=0.5)
      sd[f"{k}.weight"] = (w + (alpha / RANK) * (b @ a)).astype(np.float32)  # merged by eval()
      sd[f"{k}.bias"], sd[f"{k}.lora_A"], sd[f"{k}.lora_B"] = r.w(n_out, scale=0.1), a, b
  sd["mlp_head.0.weight"], sd["mlp_head.0.bias"] = r.ln(WIDTH)
  sd["loss.weight"] = r.w(CLASSES, WIDTH)
  return sd


def _flax_block(r, prefix, names, stack=None):
  ln1, att, ln2, mlp = names
  hd = WIDTH // HEADS
  s = (stack,) if stack else ()
  p = {}
  g = lambda *shape, scale=None: r.w(*(s + shape), scale=scale)
  for ln in (ln1, ln2):
    p[f"{prefix}/{ln}/scale"] = (1 + g(WIDTH, scale=0.1)).astype(np.float32)
    p[f"{prefix}/{ln}/bias"] = g(WIDTH, scale=0.1)
  for m in ("query", "key", "value"):
    p[f"{prefix}/{att}/{m}/kernel"] = g(WIDTH, HEADS, hd, scale=WIDTH ** -0.5)
    p[f"{prefix}/{att}/{m}/bias"] = g(HEADS, hd, scale=0.1)
  p[f"{prefix}/{att}/out/kernel"] = g(HEADS, hd, WIDTH, scale=WIDTH ** -0.5)
  p[f"{prefix}/{att}/out/bias"] = g(WIDTH, scale=0.1)
  p[f"{prefix}/{mlp}/Dense_0/kernel"] = g(WIDTH, MLP, scale=WIDTH ** -0.5)
  p[f"{prefix}/{mlp}/Dense_0/bias"] = g(MLP, scale=0.1)
  p[f"{prefix}/{mlp}/Dense_1/kernel"] = g(MLP, WIDTH, scale=MLP ** -0.5)
  p[f"{prefix}/{mlp}/Dense_1/bias"] = g(WIDTH, scale=0.1)
  return p


def vit_jax_params(seed=3):
  r = _Rng(seed)
  p = {"embedding/kernel": r.w(PATCH, PATCH, 3, WIDTH, scale=0.2),
       "embedding/bias": r.w(WIDTH, scale=0.1), "cls": r.w(1, 1, WIDTH, scale=0.5),
       "Transformer/posembed_input/pos_embedding": r.w(1, TOKENS + 1, WIDTH, scale=0.5),
       "Transformer/encoder_norm/scale": (1 + r.w(WIDTH, scale=0.1)).astype(np.float32),
       "Transformer/encoder_norm/bias": r.w(WIDTH, scale=0.1),
       "head/kernel": r.w(WIDTH, CLASSES, scale=WIDTH ** -0.5), "head/bias": r.w(CLASSES, scale=0.1)}
  for i in range(DEPTH):
    p.update(_flax_block(r, f"Transformer/encoderblock_{i}",
                         ("LayerNorm_0", "MultiHeadDotProductAttention_1", "LayerNorm_2",
                          "MlpBlock_3")))
  return p


BV_NAMES = ("LayerNorm_0", "MultiHeadDotProductAttention_0", "LayerNorm_1", "MlpBlock_0")


def big_vision_params(seed=4, pool="tok"):
  """A scanned big_vision ViT (`Transformer/encoderblock` with a leading layer axis)."""
  r = _Rng(seed)
  p = {"embedding/kernel": r.w(PATCH, PATCH, 3, WIDTH, scale=0.2),
       "embedding/bias": r.w(WIDTH, scale=0.1),
       "pos_embedding": r.w(1, TOKENS, WIDTH, scale=0.5),
       "Transformer/encoder_norm/scale": (1 + r.w(WIDTH, scale=0.1)).astype(np.float32),
       "Transformer/encoder_norm/bias": r.w(WIDTH, scale=0.1),
       "head/kernel": r.w(WIDTH, CLASSES, scale=WIDTH ** -0.5), "head/bias": r.w(CLASSES, scale=0.1)}
  if pool == "tok":
    p["cls"] = r.w(1, 1, WIDTH, scale=0.5)
  p.update(_flax_block(r, "Transformer/encoderblock", BV_NAMES, stack=DEPTH))
  return p


def unscan(params):
  """big_vision's scan_to_pyloop on flat names."""
  out = {}
  for k, v in params.items():
    if k.startswith("Transformer/encoderblock/"):
      for i in range(v.shape[0]):
        out[k.replace("encoderblock/", f"encoderblock_{i}/")] = v[i]
    else:
      out[k] = v
  return out


def torchvision_state(seed=5, lora=False):
  r = _Rng(seed)
  layer = "encoder.layers.encoder_layer_"
  sd = collections.OrderedDict()
  sd["class_token"] = r.w(1, 1, WIDTH, scale=0.5)
  sd["conv_proj.weight"] = r.w(WIDTH, 3, PATCH, PATCH, scale=0.2)
  sd["conv_proj.bias"] = r.w(WIDTH, scale=0.1)
  sd["encoder.pos_embedding"] = r.w(1, TOKENS + 1, WIDTH, scale=0.5)
  for i in range(DEPTH):
    t = f"{layer}{i}"
    sd[f"{t}.ln_1.weight"], sd[f"{t}.ln_1.bias"] = r.ln(WIDTH)
    sd[f"{t}.self_attention.in_proj_weight"] = r.w(3 * WIDTH, WIDTH)
    sd[f"{t}.self_attention.in_proj_bias"] = r.w(3 * WIDTH, scale=0.1)
    sd[f"{t}.self_attention.out_proj.weight"] = r.w(WIDTH, WIDTH)
    sd[f"{t}.self_attention.out_proj.bias"] = r.w(WIDTH, scale=0.1)
    sd[f"{t}.ln_2.weight"], sd[f"{t}.ln_2.bias"] = r.ln(WIDTH)
    for fc, (n_in, n_out) in (("mlp.0", (WIDTH, MLP)), ("mlp.3", (MLP, WIDTH))):
      sd[f"{t}.{fc}.weight"], sd[f"{t}.{fc}.bias"] = r.w(n_out, n_in), r.w(n_out, scale=0.1)
      if lora:
        sd[f"{t}.{fc}.lora_A"], sd[f"{t}.{fc}.lora_B"] = r.w(RANK, n_in), r.w(n_out, RANK, scale=0.5)
  sd["encoder.ln.weight"], sd["encoder.ln.bias"] = r.ln(WIDTH)
  sd["heads.head.weight"], sd["heads.head.bias"] = r.w(CLASSES, WIDTH), r.w(CLASSES, scale=0.1)
  return sd
