"""`python -m kswap_jax.convert`: summary, bad input (one line, exit 2, nothing written),
and bitwise round trips import -> export -> import."""

import os
import pickle
import re
import subprocess
import sys

import numpy as np
import pytest

import _sources as S
import _torch_writer as tw
from conftest import REPO
from kswap_jax import convert, interop
from kswap_jax.errors import ConfigError
from kswap_jax.interop import safetensors_file


def _cli(capsys, *argv):
  code = convert.main([str(a) for a in argv])
  out, err = capsys.readouterr()
  return code, out, err


def _timm_file(tmp_path, **kw):
  path = tmp_path / "vit.pth"
  tw.save_zip(tw.state_dict(S.timm_state(**kw)), path)
  return path


def test_cli_converts_and_prints_a_summary(tmp_path, capsys):
  sd = S.face_state()
  src = tmp_path / "face.pth"
  tw.save_zip({"state": tw.state_dict(sd), "task": 2}, src)
  out = tmp_path / "face.npz"
  code, stdout, err = _cli(capsys, src, "--layout", "gslora_face", "--out", out, "--num_heads", 4)
  assert code == 0, err
  assert f"-> {out}" in stdout
  n = sum(v.size for k, v in sd.items() if ".lora_" not in k)
  # fused qkv is split in three: 2 more arrays per block, the same parameter count
  assert f"base: {len(sd) - 4 * S.DEPTH + 2 * S.DEPTH} arrays, {n:,} parameters" in stdout
  assert "LoRA: none kept" in stdout
  assert "dropped (weights already merged)" in stdout
  assert "model: name=vit_face" in stdout and "attention_scale=width" in stdout
  assert "transformer.layers.0.1.fn.fn.net.0.lora_A: LoRA A, already merged" in stdout
  assert "task: outside the prefix 'state.'" in stdout
  with np.load(out) as f:
    assert "Transformer/encoderblock_1/MultiHeadDotProductAttention_1/query/kernel" in f.files
  assert not os.path.exists(interop.lora_path(str(out)))
  code, stdout, _ = _cli(capsys, src, "--layout", "gslora_face", "--out", out, "--num_heads", 4,
                         "--lora", "unmerge")
  assert code == 0 and os.path.exists(tmp_path / "face.lora.npz")
  assert f"LoRA: {2 * S.DEPTH} modules, rank {S.RANK}" in stdout


def _bad(tmp_path, capsys, *argv):
  out = tmp_path / "out.npz"
  code, stdout, err = _cli(capsys, *argv, "--out", out)
  assert code == 2
  assert err.startswith("error: ") and err.count("\n") == 1, err
  assert not any(p.name.startswith("out.") for p in tmp_path.iterdir())  # nothing half-written
  return err


def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
  timm = _timm_file(tmp_path)
  assert "no such file" in _bad(tmp_path, capsys, tmp_path / "nope.pth", "--layout", "timm")
  err = _bad(tmp_path, capsys, timm, "--layout", "timm")
  assert "num_heads" in err and "cannot be read from shapes" in err
  assert "does not divide" in _bad(tmp_path, capsys, timm, "--layout", "timm", "--num_heads", 5)
  err = _bad(tmp_path, capsys, timm, "--layout", "ks_vit", "--num_heads", 4)
  assert "not a ks_vit checkpoint" in err and "its keys look like the timm layout" in err
  err = _bad(tmp_path, capsys, timm, "--layout", "gslora_face", "--num_heads", 4)
  assert "not a gslora_face checkpoint" in err
  # Shape mismatch: one block's fc2 has the wrong input size.
  sd = S.timm_state()
  sd["blocks.1.mlp.fc2.weight"] = sd["blocks.1.mlp.fc2.weight"][:, :50]
  tw.save_zip(tw.state_dict(sd), tmp_path / "bad_shape.pth")
  err = _bad(tmp_path, capsys, tmp_path / "bad_shape.pth", "--layout", "timm", "--num_heads", 4)
  assert "blocks.1.mlp.fc2.weight has shape (64, 50), expected (64, 96)" in err
  # Truncated zip, truncated safetensors, a hostile pickle.
  data = timm.read_bytes()
  (tmp_path / "cut.pth").write_bytes(data[: len(data) * 2 // 3])
  assert "zip" in _bad(tmp_path, capsys, tmp_path / "cut.pth", "--layout", "timm", "--num_heads", 4)
  safetensors_file.save(dict(S.timm_state()), str(tmp_path / "v.safetensors"))
  data = (tmp_path / "v.safetensors").read_bytes()
  (tmp_path / "cut.safetensors").write_bytes(data[:-100])
  err = _bad(tmp_path, capsys, tmp_path / "cut.safetensors", "--layout", "timm", "--num_heads", 4)
  assert "truncated" in err
  marker = tmp_path / "pwned"
  evil = tmp_path / "evil.pth"
  tw.save_zip(None, evil, data_pkl=pickle.dumps(_Hostile(marker), protocol=2))
  err = _bad(tmp_path, capsys, evil, "--layout", "timm", "--num_heads", 4)
  assert "refusing to load global posix.system" in err and not marker.exists()
  # LoRA present but no --lora; a layout that does not exist is argparse's usage error.
  _timm_file(tmp_path, lora=True)
  err = _bad(tmp_path, capsys, timm, "--layout", "timm", "--num_heads", 4)
  assert "--lora separate" in err
  for argv in (["--layout", "nope"], ["--num_heads", "four", "--layout", "timm"], []):
    with pytest.raises(SystemExit) as e:
      convert.main([str(timm), *argv, "--out", str(tmp_path / "x.npz")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err


def test_bad_out_and_num_heads_are_named(tmp_path, capsys):
  timm = _timm_file(tmp_path)
  args = [timm, "--layout", "timm", "--num_heads", "4"]
  for out, to, message in (
      ("", "ours", "--out '': expected a file path ending in .npz"),
      (tmp_path, "ours", f"--out '{tmp_path}': expected a file path"),
      (tmp_path / "y.npz", "timm", "--to timm writes a .safetensors file"),
      (tmp_path / "no" / "x.npz", "ours", f"its folder {tmp_path / 'no'} does not exist")):
    code, _, err = _cli(capsys, *args, "--to", to, "--out", out)
    assert code == 2 and err.startswith("error: ") and message in err, err
  code, _, err = _cli(capsys, timm, "--layout", "timm", "--num_heads", "-2",
                      "--out", tmp_path / "x.npz")
  assert code == 2 and "--num_heads: expected a positive int, got -2" in err, err
  assert sorted(p.name for p in tmp_path.iterdir()) == [timm.name]


class _Hostile:
  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (os.system, (f"touch {self.marker}",))


def test_module_entry_point_exits_2(tmp_path):
  """The real `python -m kswap_jax.convert` process: status 2, one stderr line."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  p = subprocess.run([sys.executable, "-m", "kswap_jax.convert", str(tmp_path / "none.pth"),
                      "--layout", "timm", "--out", str(tmp_path / "o.npz")],
                     capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
  assert p.returncode == 2 and p.stderr.strip().startswith("error: ")
  assert p.stderr.count("\n") == 1


def test_round_trip_timm_is_bitwise(tmp_path, capsys):
  src = _timm_file(tmp_path)
  first = interop.convert(str(src), "timm", num_heads=S.HEADS)
  code, _, err = _cli(capsys, src, "--layout", "timm", "--num_heads", S.HEADS, "--to", "timm",
                      "--out", tmp_path / "back.safetensors")
  assert code == 0, err
  tensors, meta = safetensors_file.load(str(tmp_path / "back.safetensors"))
  assert meta == {"format": "pt"}
  sd = S.timm_state()
  assert tensors.keys() == sd.keys()
  for k in sd:
    np.testing.assert_array_equal(tensors[k], sd[k])  # export gives back the source exactly
  again = interop.convert(str(tmp_path / "back.safetensors"), "timm", num_heads=S.HEADS)
  assert again.params.keys() == first.params.keys()
  for k in first.params:
    assert again.params[k].tobytes() == first.params[k].tobytes()


def test_round_trip_vit_jax_and_merged_lora_export(tmp_path, capsys):
  p = S.vit_jax_params()
  np.savez(tmp_path / "a.npz", **p)
  code, _, err = _cli(capsys, tmp_path / "a.npz", "--layout", "vit_jax", "--out", tmp_path / "b.npz")
  assert code == 0, err
  with np.load(tmp_path / "b.npz") as f:
    assert sorted(f.files) == sorted(p)
    for k in p:
      assert f[k].tobytes() == p[k].tobytes()
  # Our own base + LoRA tree, exported merged to timm and read back.
  rng = np.random.default_rng(0)
  name = "Transformer/encoderblock_0/MlpBlock_3/Dense_0"
  lora = {f"{name}/a": rng.normal(size=(S.WIDTH, 2)).astype(np.float32),
          f"{name}/b": rng.normal(size=(2, S.MLP)).astype(np.float32)}
  np.savez(tmp_path / "b.lora.npz", **lora)
  code, _, err = _cli(capsys, tmp_path / "b.npz", "--layout", "vit_jax", "--to", "timm",
                      "--lora_file", tmp_path / "b.lora.npz", "--lora_alpha", 4,
                      "--out", tmp_path / "m.safetensors")
  assert code == 0, err
  back = interop.convert(str(tmp_path / "m.safetensors"), "timm", num_heads=S.HEADS)
  want = p[f"{name}/kernel"] + 2.0 * lora[f"{name}/a"] @ lora[f"{name}/b"]
  np.testing.assert_allclose(back.params[f"{name}/kernel"], want, rtol=1e-6, atol=1e-6)
  assert back.params["cls"].tobytes() == p["cls"].tobytes()
  # A run's lora_<stage>.npz names its leaves .../lora_a, .../lora_b: merged the same way.
  np.savez(tmp_path / "lora_forget.npz", **{f"{name}/lora_{k[-1]}": v for k, v in lora.items()})
  code, _, err = _cli(capsys, tmp_path / "b.npz", "--layout", "vit_jax", "--to", "vit_jax",
                      "--lora_file", tmp_path / "lora_forget.npz", "--lora_alpha", 4,
                      "--out", tmp_path / "m.npz")
  assert code == 0, err
  with np.load(tmp_path / "m.npz") as f:
    np.testing.assert_allclose(f[f"{name}/kernel"], want, rtol=1e-6, atol=1e-6)
  # Not a LoRA file: one line naming the flag and the file, nothing written.
  code, _, err = _cli(capsys, tmp_path / "b.npz", "--layout", "vit_jax", "--lora_file",
                      tmp_path / "a.npz", "--out", tmp_path / "n.npz")
  assert code == 2 and err.startswith(f"error: --lora_file {tmp_path / 'a.npz'}: ") and (
      "is not a LoRA leaf" in err), err
  assert not (tmp_path / "n.npz").exists()


def test_export_refuses_what_timm_cannot_express(tmp_path):
  conv = interop.convert(str(_face_file(tmp_path)), "gslora_face", num_heads=S.HEADS)
  with pytest.raises(ValueError, match="attention_scale"):
    interop.export(conv.params, str(tmp_path / "f.safetensors"), to="timm", model=conv.model)
  assert not (tmp_path / "f.safetensors").exists()


def _face_file(tmp_path):
  path = tmp_path / "face.pth"
  tw.save_zip(tw.state_dict(S.face_state()), path)
  return path


def test_options_a_layout_does_not_take_are_errors(tmp_path, capsys):
  timm = _timm_file(tmp_path)
  err = _bad(tmp_path, capsys, timm, "--layout", "timm", "--num_heads", 4, "--pool", "gap")
  assert "pool: the timm layout takes no pool option" in err
  with pytest.raises(ValueError, match="face_head: the ks_vit layout takes no face_head"):
    interop.convert(str(timm), "ks_vit", num_heads=4, face_head="cosface")


def test_head_rows_keep_the_named_rows_in_order(tmp_path, capsys):
  # GS-LoRA's ImageNet-100 model: torchvision's 1000-row head cut to the 100 classes' rows.
  src, out = _timm_file(tmp_path), tmp_path / "cut.npz"
  full = tmp_path / "full.npz"
  assert _cli(capsys, src, "--layout", "timm", "--out", full, "--num_heads", S.HEADS)[0] == 0
  (tmp_path / "rows.txt").write_text("4\n1, 3\n")
  code, stdout, err = _cli(capsys, src, "--layout", "timm", "--out", out, "--num_heads",
                           S.HEADS, "--head_rows", f"@{tmp_path / 'rows.txt'}")
  assert code == 0, err
  assert "head cut to 3 of its" in stdout and "num_classes=3" in stdout
  with np.load(full) as f, np.load(out) as g:
    np.testing.assert_array_equal(g["head/kernel"], f["head/kernel"][:, [4, 1, 3]])
    np.testing.assert_array_equal(g["head/bias"], f["head/bias"][[4, 1, 3]])
    assert all(np.array_equal(f[k], g[k]) for k in f.files if not k.startswith("head/"))
  n = S.CLASSES
  for rows, match in ((f"0,{n}", rf"expected distinct rows in \[0, {n}\)"),
                      ("1,1", "a repeated row"), ("a,b", "expected ints"),
                      ("@/nonexistent", "no such file")):
    err = _bad(tmp_path, capsys, src, "--layout", "timm", "--num_heads", S.HEADS,
               "--head_rows", rows)
    assert match in err or re.search(match, err), err


def test_the_printed_flags_start_a_run_from_the_converted_checkpoint(tmp_path, capsys):
  """The summary's "start a run from it" line, pasted after a config, gives a model whose
  names and shapes the checkpoint fits (`checkpoint.check_npz`, as the run checks it)."""
  from kswap_jax import cli  # pylint: disable=import-outside-toplevel
  from kswap_jax.methods import common  # pylint: disable=import-outside-toplevel
  src, out = _timm_file(tmp_path), tmp_path / "vit.npz"
  code, stdout, err = _cli(capsys, src, "--layout", "timm", "--out", out, "--num_heads", 2)
  assert code == 0, err
  line = next(x for x in stdout.splitlines() if "start a run from it:" in x)
  flags = line.split("start a run from it: ")[1].split(" (and model.num_classes")[0].split()
  assert f"--config.init.checkpoint={out}" in flags
  assert not any(f.startswith("--config.model.num_classes=") for f in flags)
  config, _ = cli.load_config(["run.py", "--config=configs/demo.py:runlocal", *flags,
                               "--config.model.num_classes=16", "--config.init.head=extend"])
  common.check_init_checkpoint(config)  # raises on a mismatch
  config.model.depth = 3  # without the printed flags' depth: another architecture
  with pytest.raises(ConfigError, match="^init.checkpoint: .* lacks .*encoderblock_2"):
    common.check_init_checkpoint(config)
