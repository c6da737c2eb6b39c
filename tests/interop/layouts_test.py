"""Each layout: a small checkpoint written in its real file format, converted, loaded through
`checkpoint.load_npz` (what `init.checkpoint` uses), and our logits compared with a numpy
forward written from the layout's own description."""

import collections
import json

import jax
import numpy as np
import pytest

import _numpy_vit as ref
import _sources as S
import _torch_writer as tw
from kswap_jax import checkpoint, interop, lora, models
from kswap_jax.interop import safetensors_file


def _images(n=3, seed=0):
  return np.random.default_rng(seed).uniform(0, 1, (n, S.IMAGE, S.IMAGE, 3)).astype(np.float32)


def _ours(conv, out, images, labels=None):
  """Saves `conv`, loads it like `init.checkpoint` does, and runs our model (+ LoRA)."""
  written = interop.save(conv, str(out))
  cfg = models.default_config(conv.model["name"])
  cfg.update(conv.model)
  cfg.update(dict(dropout=0.0, attention_dropout=0.0, attention_output_dropout=0.0))
  model = models.build(cfg)
  abstract = jax.eval_shape(lambda: models.init_variables(model, cfg, jax.random.key(0))["params"])
  params = checkpoint.load_npz(written[0], abstract, head="keep")
  kw = {} if labels is None else {"labels": labels}
  if len(written) == 2:
    tree = interop.load_lora(written[1])
    rank = next(iter(jax.tree_util.tree_leaves(tree))).shape[1]
    return np.asarray(lora.apply(model, params, tree, images, scale=conv.lora_alpha / rank, **kw))
  return np.asarray(model.apply({"params": params}, images, **kw))


def _close(got, want, scale=1.0):
  np.testing.assert_allclose(got, want, rtol=0, atol=2e-5 * scale)
  assert np.abs(want).max() > 0.1  # logits far from trivial


def test_timm_zip_pickle_converts_to_equal_logits(tmp_path):
  sd = S.timm_state()
  src = tmp_path / "vit.pth"
  tw.save_zip(tw.state_dict(sd), src)
  conv = interop.convert(str(src), "timm", num_heads=S.HEADS)
  assert not conv.ignored and conv.lora == {}
  assert conv.model["num_heads"] == S.HEADS and conv.model["image_size"] == S.IMAGE
  images = _images()
  _close(_ours(conv, tmp_path / "o.npz", images), ref.timm_forward(sd, images, S.HEADS))


def test_a_headless_timm_checkpoint_gets_a_zero_head_of_num_classes(tmp_path):
  """timm's `num_classes=0` saves no head: --num_classes gives a zero head (as big_vision),
  and the backbone converts as it does with a head."""
  sd = {k: v for k, v in S.timm_state().items() if not k.startswith("head.")}
  src = tmp_path / "vit.safetensors"
  safetensors_file.save(dict(sd), str(src))
  with pytest.raises(ValueError, match=r"no head\.weight \(a headless model\); pass "
                     r"--num_classes"):
    interop.convert(str(src), "timm", num_heads=S.HEADS)
  conv = interop.convert(str(src), "timm", num_heads=S.HEADS, num_classes=5)
  assert conv.model["num_classes"] == 5 and any("zero head of 5" in n for n in conv.notes)
  assert not np.any(conv.params["head/kernel"]) and conv.params["head/kernel"].shape[1] == 5
  safetensors_file.save(dict(S.timm_state()), str(tmp_path / "h.safetensors"))
  with_head = interop.convert(str(tmp_path / "h.safetensors"), "timm", num_heads=S.HEADS)
  for name, x in with_head.params.items():
    if not name.startswith("head/"):
      np.testing.assert_array_equal(conv.params[name], x, err_msg=name)
  with pytest.raises(ValueError, match="has a head of"):
    interop.convert(str(tmp_path / "h.safetensors"), "timm", num_heads=S.HEADS, num_classes=5)


def test_timm_safetensors_without_qkv_bias(tmp_path):
  sd = S.timm_state(qkv_bias=False)
  src = tmp_path / "vit.safetensors"
  safetensors_file.save(dict(sd), str(src))
  conv = interop.convert(str(src), "timm", num_heads=S.HEADS)
  assert conv.model["qkv_bias"] is False
  images = _images()
  _close(_ours(conv, tmp_path / "o.npz", images), ref.timm_forward(sd, images, S.HEADS))


@pytest.mark.parametrize("mode", ["separate", "merge"])
def test_timm_lora_on_fused_qkv_and_fc1(tmp_path, mode):
  sd = S.timm_state(lora=True)
  src = tmp_path / "vit.pth"
  tw.save_zip(tw.state_dict(sd), src)
  with pytest.raises(ValueError, match="lora: the checkpoint holds loralib A/B for 8 module"):
    interop.convert(str(src), "timm", num_heads=S.HEADS)
  conv = interop.convert(str(src), "timm", num_heads=S.HEADS, lora=mode, lora_alpha=2.0)
  assert bool(conv.lora) == (mode == "separate")
  images = _images()
  want = ref.timm_forward(sd, images, S.HEADS, alpha=2.0)   # loralib, unmerged weights
  _close(_ours(conv, tmp_path / "o.npz", images), want)


def test_ks_vit_legacy_pickle_with_lora(tmp_path):
  sd = S.ks_vit_state(lora=True)
  src = tmp_path / "ks.bin"
  tw.save_legacy(tw.state_dict(sd), src)
  conv = interop.convert(str(src), "ks_vit", num_heads=S.HEADS, lora="separate")
  assert sorted(conv.lora) == sorted(
      f"Transformer/encoderblock_{i}/MlpBlock_3/Dense_{j}/{x}"
      for i in range(S.DEPTH) for j in (0, 1) for x in "ab")
  a = conv.lora["Transformer/encoderblock_1/MlpBlock_3/Dense_0/a"]
  np.testing.assert_array_equal(a, sd["transformer.encoder.layer.1.ffn.fc1.lora_A"].T)
  images = _images()
  _close(_ours(conv, tmp_path / "o.npz", images), ref.ks_vit_forward(sd, images, S.HEADS))


def test_ks_vit_pretrained_file_in_a_training_checkpoint(tmp_path):
  """A {"model": state_dict, "epoch": ...} file saved from a DataParallel model."""
  sd = S.ks_vit_state()
  src = tmp_path / "ckpt.pth"
  wrapped = collections.OrderedDict((f"module.{k}", v) for k, v in tw.state_dict(sd).items())
  tw.save_zip({"model": wrapped, "epoch": 7, "best_acc": 0.5}, src, prefix="ckpt")
  conv = interop.convert(str(src), "ks_vit", num_heads=S.HEADS)
  assert conv.ignored == {"epoch": "outside the prefix 'model.module.'",
                          "best_acc": "outside the prefix 'model.module.'"}
  assert "state dict found under prefix 'model.module.'" in conv.notes
  images = _images()
  _close(_ours(conv, tmp_path / "o.npz", images), ref.ks_vit_forward(sd, images, S.HEADS))


def test_gslora_face_takes_merged_weights_and_drops_ab(tmp_path):
  sd = S.face_state()
  src = tmp_path / "Backbone_task_1.pth"
  tw.save_zip(tw.state_dict(sd), src)
  conv = interop.convert(str(src), "gslora_face", num_heads=S.HEADS)   # lora="merged"
  assert conv.lora == {}
  dropped = [k for k, why in conv.ignored.items() if "already merged" in why]
  assert len(dropped) == 4 * S.DEPTH and all(".lora_" in k for k in dropped)
  assert conv.model["name"] == "vit_face" and conv.model["attention_scale"] == "width"
  assert conv.model["qkv_bias"] is False and conv.model["head"] == "cosface"
  images, labels = _images(4), np.array([0, 3, 6, 2])
  out = tmp_path / "o.npz"
  _close(_ours(conv, out, images), ref.face_forward(sd, images, S.HEADS), scale=3)
  _close(_ours(conv, out, images, labels), ref.face_forward(sd, images, S.HEADS, labels), scale=3)


def test_gslora_face_unmerge_recovers_previous_weights_plus_lora(tmp_path):
  sd = S.face_state(alpha=1.0)
  src = tmp_path / "f.pth"
  tw.save_zip(tw.state_dict(sd), src)
  conv = interop.convert(str(src), "gslora_face", num_heads=S.HEADS, lora="unmerge")
  assert len(conv.lora) == 4 * S.DEPTH
  images = _images()
  # base + LoRA (unmerged forward) == the stored merged model.
  _close(_ours(conv, tmp_path / "o.npz", images), ref.face_forward(sd, images, S.HEADS), scale=3)
  merged = interop.merged(conv)
  k = "Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel"
  np.testing.assert_allclose(merged[k], sd["transformer.layers.0.1.fn.fn.net.0.weight"].T,
                             atol=1e-6)
  assert np.abs(conv.params[k] - merged[k]).max() > 1e-3


def test_vit_jax_npz(tmp_path):
  p = S.vit_jax_params()
  src = tmp_path / "augreg.npz"
  np.savez(src, **p, **{"optimizer/step": np.zeros(())})
  conv = interop.convert(str(src), "vit_jax")
  assert conv.ignored == {"optimizer/step": "not part of the vit_jax layout"}
  assert conv.model["gelu"] == "tanh" and conv.model["num_heads"] == S.HEADS
  images = _images()
  _close(_ours(conv, tmp_path / "o.npz", images), ref.vit_jax_forward(p, images))


def test_vit_jax_npz_of_our_run_takes_unrecorded_fields_from_its_config_json(tmp_path):
  """A run's merged_params.npz (or a pretraining run's params.npz): the fields the file
  cannot hold come from the run's config.json beside it, and only when that run's model
  (with the pretraining head) has the file's sizes."""
  src = tmp_path / "merged_params.npz"
  np.savez(src, **S.vit_jax_params())
  guessed = interop.convert(str(src), "vit_jax")
  assert any("not stored in the file" in n for n in guessed.notes)
  run_model = dict(guessed.model, gelu="erf", layer_norm_eps=1e-5, attention_scale="width")
  (tmp_path / "config.json").write_text(json.dumps({"method": "lbf", "model": run_model}))
  conv = interop.convert(str(src), "vit_jax")
  assert conv.model == run_model
  assert any(n.endswith(f"from the run's {tmp_path / 'config.json'}") for n in conv.notes)
  # Another run's record (another head size) says nothing about this file.
  (tmp_path / "config.json").write_text(json.dumps(
      {"model": dict(run_model, num_classes=S.CLASSES + 1)}))
  assert interop.convert(str(src), "vit_jax").model == guessed.model
  # A pretraining run's params.npz: its head is pretrain.num_classes, not model.num_classes.
  (tmp_path / "config.json").write_text(json.dumps(
      {"method": "pretrain", "model": dict(run_model, num_classes=S.CLASSES + 1),
       "pretrain": {"num_classes": S.CLASSES}}))
  assert interop.convert(str(src), "vit_jax").model == run_model


@pytest.mark.parametrize("pool", ["tok", "gap"])
def test_big_vision_scanned_npz(tmp_path, pool):
  p = S.big_vision_params(pool=pool)
  src = tmp_path / "bv.npz"
  np.savez(src, **p)
  if pool == "gap":
    with pytest.raises(ValueError, match="pool: .*no cls token.*--pool gap"):
      interop.convert(str(src), "big_vision")
  conv = interop.convert(str(src), "big_vision", pool=pool)
  assert not conv.ignored
  assert conv.model["pool"] == ("cls" if pool == "tok" else "gap")
  images = _images()
  _close(_ours(conv, tmp_path / "o.npz", images), ref.big_vision_forward(p, images, pool))
  # The per-block (unscanned) file converts to the very same arrays.
  np.savez(tmp_path / "bv_loop.npz", **S.unscan(p))
  loop = interop.convert(str(tmp_path / "bv_loop.npz"), "big_vision", pool=pool)
  assert loop.params.keys() == conv.params.keys()
  for k in conv.params:
    np.testing.assert_array_equal(loop.params[k], conv.params[k])


def test_big_vision_sincos_posemb_is_computed(tmp_path):
  p = S.big_vision_params(pool="tok")
  del p["pos_embedding"]
  np.savez(tmp_path / "bv.npz", **p)
  with pytest.raises(ValueError, match="image_size"):
    interop.convert(str(tmp_path / "bv.npz"), "big_vision", posemb="sincos2d")
  conv = interop.convert(str(tmp_path / "bv.npz"), "big_vision", posemb="sincos2d",
                         image_size=S.IMAGE)
  pe = conv.params["Transformer/posembed_input/pos_embedding"]
  assert pe.shape == (1, S.TOKENS + 1, S.WIDTH)
  np.testing.assert_array_equal(pe[0, 0], 0.0)
  g = S.IMAGE // S.PATCH
  # token (row 1, col 2) -> index 1*g + 2; first quarter sin(x·ω), ω_0 = 1.
  assert pe[0, 1 + g + 2, 0] == pytest.approx(np.sin(2.0), abs=1e-6)
  assert pe[0, 1 + g + 2, S.WIDTH // 2] == pytest.approx(np.sin(1.0), abs=1e-6)


def test_torch_forward_matches_when_torch_is_installed(tmp_path):
  torch = pytest.importorskip("torch")
  import torch.nn.functional as F  # noqa: N812
  sd = S.timm_state()
  src = tmp_path / "vit.pth"
  torch.save(collections.OrderedDict((k, torch.from_numpy(v)) for k, v in sd.items()), src)
  conv = interop.convert(str(src), "timm", num_heads=S.HEADS)
  images = _images()
  t = {k: torch.from_numpy(v).double() for k, v in sd.items()}
  x = torch.from_numpy(images).double().permute(0, 3, 1, 2)
  x = F.conv2d(x, t["patch_embed.proj.weight"], t["patch_embed.proj.bias"], stride=S.PATCH)
  x = x.flatten(2).transpose(1, 2)
  x = torch.cat([t["cls_token"].expand(len(x), -1, -1), x], 1) + t["pos_embed"]
  for i in range(S.DEPTH):
    b = f"blocks.{i}"
    y = F.layer_norm(x, (S.WIDTH,), t[f"{b}.norm1.weight"], t[f"{b}.norm1.bias"], 1e-6)
    q, k, v = F.linear(y, t[f"{b}.attn.qkv.weight"], t[f"{b}.attn.qkv.bias"]).chunk(3, -1)
    split = lambda z: z.unflatten(-1, (S.HEADS, -1)).transpose(1, 2)
    a = F.scaled_dot_product_attention(split(q), split(k), split(v)).transpose(1, 2).flatten(2)
    x = x + F.linear(a, t[f"{b}.attn.proj.weight"], t[f"{b}.attn.proj.bias"])
    y = F.layer_norm(x, (S.WIDTH,), t[f"{b}.norm2.weight"], t[f"{b}.norm2.bias"], 1e-6)
    y = F.gelu(F.linear(y, t[f"{b}.mlp.fc1.weight"], t[f"{b}.mlp.fc1.bias"]))
    x = x + F.linear(y, t[f"{b}.mlp.fc2.weight"], t[f"{b}.mlp.fc2.bias"])
  x = F.layer_norm(x, (S.WIDTH,), t["norm.weight"], t["norm.bias"], 1e-6)[:, 0]
  want = F.linear(x, t["head.weight"], t["head.bias"]).numpy()
  _close(_ours(conv, tmp_path / "o.npz", images), want)


def test_big_vision_pre_2022_posemb_with_cls_slot(tmp_path):
  p = S.big_vision_params(pool="tok")
  np.savez(tmp_path / "new.npz", **p)
  old = dict(p, pos_embedding=np.concatenate([np.zeros((1, 1, S.WIDTH), np.float32),
                                              p["pos_embedding"]], axis=1))
  np.savez(tmp_path / "old.npz", **old)
  a = interop.convert(str(tmp_path / "new.npz"), "big_vision")
  b = interop.convert(str(tmp_path / "old.npz"), "big_vision")
  for k in a.params:
    np.testing.assert_array_equal(a.params[k], b.params[k])
  assert any("cls slot" in n for n in b.notes)


def test_half_and_bfloat16_checkpoints_convert_to_float32(tmp_path):
  import ml_dtypes
  for dtype in (np.float16, ml_dtypes.bfloat16):
    sd = collections.OrderedDict((k, v.astype(dtype)) for k, v in S.ks_vit_state().items())
    tw.save_zip(tw.state_dict(sd), tmp_path / "m.pth")
    conv = interop.convert(str(tmp_path / "m.pth"), "ks_vit", num_heads=S.HEADS)
    k = conv.params["Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel"]
    assert k.dtype == np.float32
    np.testing.assert_array_equal(k, sd["transformer.encoder.layer.0.ffn.fc1.weight"].astype(
        np.float32).T)


@pytest.mark.parametrize("mode", ["separate", "merge"])
def test_torchvision_vit_with_gslora_ffn_lora(tmp_path, mode):
  sd = S.torchvision_state(lora=True)
  src = tmp_path / "vit_b16.pth"
  tw.save_zip(tw.state_dict(sd), src)
  conv = interop.convert(str(src), "torchvision", num_heads=S.HEADS, lora=mode)
  assert not conv.ignored and bool(conv.lora) == (mode == "separate")
  images = _images()
  _close(_ours(conv, tmp_path / "o.npz", images), ref.torchvision_forward(sd, images, S.HEADS))
