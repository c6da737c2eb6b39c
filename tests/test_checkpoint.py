"""vit_jax .npz import/export: round trip, head extension, position-embedding resize, errors."""

import math

import jax
import numpy as np
import pytest

from conftest import tiny_model_config
from kswap_jax import checkpoint, lora
from kswap_jax.errors import ConfigError
from kswap_jax.models import vit


def _abstract(cfg):
  model = vit.build(cfg)
  return model, jax.eval_shape(lambda: vit.init_params(model, cfg, jax.random.key(0)))


def test_npz_round_trip_uses_vit_jax_names(tiny, tmp_path):
  cfg, model, params = tiny
  path = str(tmp_path / "p.npz")
  checkpoint.save_npz(params, path)
  with np.load(path) as f:
    assert "Transformer/encoderblock_1/MlpBlock_3/Dense_0/kernel" in f.files
    assert "Transformer/posembed_input/pos_embedding" in f.files
  loaded = checkpoint.load_npz(path, _abstract(cfg)[1], head="keep")
  jax.tree_util.tree_map(np.testing.assert_array_equal, loaded, params)
  with pytest.raises(TypeError, match=r"save_npz\(params, path\): expected a parameter tree "
                     r"and a path, got str and dict"):
    checkpoint.save_npz(path, params)  # load_npz's order


def test_head_extend_keeps_old_rows_and_adds_xavier_rows(tiny, tmp_path):
  cfg, model, params = tiny  # 10 classes, width 64
  path = str(tmp_path / "p.npz")
  params = jax.tree_util.tree_map(np.asarray, params)
  params["head"]["kernel"] = np.random.default_rng(0).normal(size=(64, 10)).astype(np.float32)
  params["head"]["bias"] = np.arange(10, dtype=np.float32)
  checkpoint.save_npz(params, path)
  big = tiny_model_config(num_classes=20)
  loaded = checkpoint.load_npz(path, _abstract(big)[1], head="extend", rng=jax.random.key(3))
  k, b = np.asarray(loaded["head"]["kernel"]), np.asarray(loaded["head"]["bias"])
  np.testing.assert_array_equal(k[:, :10], params["head"]["kernel"])
  np.testing.assert_array_equal(b[:10], params["head"]["bias"])
  np.testing.assert_array_equal(b[10:], 0.0)
  bound = math.sqrt(6 / (64 + 10))   # xavier on the new rows' (width, 20 - 10) slice
  assert np.abs(k[:, 10:]).max() <= bound and np.abs(k[:, 10:]).max() > 0.9 * bound
  assert math.sqrt(6 / (768 + 100)) == pytest.approx(0.083141, rel=1e-5)  # docs/knowledge_swapping.md
  replaced = checkpoint.load_npz(path, _abstract(big)[1], head="replace")
  np.testing.assert_array_equal(replaced["head"]["kernel"], 0.0)
  with pytest.raises(ConfigError, match="head/(kernel|bias)"):
    checkpoint.load_npz(path, _abstract(big)[1], head="keep")


def test_position_embeddings_are_resized_for_another_resolution(tiny, tmp_path):
  cfg, model, params = tiny  # 16x16 images, patch 4: 4x4 grid
  path = str(tmp_path / "p.npz")
  checkpoint.save_npz(params, path)
  big = tiny_model_config(image_size=32)  # 8x8 grid
  loaded = checkpoint.load_npz(path, _abstract(big)[1], head="keep")
  pe = np.asarray(loaded["Transformer"]["posembed_input"]["pos_embedding"])
  old = np.asarray(params["Transformer"]["posembed_input"]["pos_embedding"])
  assert pe.shape == (1, 65, 64)
  np.testing.assert_array_equal(pe[:, 0], old[:, 0])  # the CLS embedding is kept
  # Bilinear upsampling preserves the mean of the grid closely.
  assert abs(pe[0, 1:].mean() - old[0, 1:].mean()) < 0.02
  x = np.zeros((1, 32, 32, 3), np.float32)
  _abstract(big)[0].apply({"params": loaded}, x)  # and the model runs with it


def test_mismatched_and_missing_checkpoints_raise_config_errors(tiny, tmp_path):
  cfg, model, params = tiny
  path = str(tmp_path / "p.npz")
  checkpoint.save_npz(params, path)
  wide = tiny_model_config()
  wide.width, wide.num_heads = 96, 2
  with pytest.raises(ConfigError, match=r"p\.npz.*shape"):
    checkpoint.load_npz(path, _abstract(wide)[1], head="keep")
  deep = tiny_model_config()
  deep.depth = 3
  with pytest.raises(ConfigError, match="encoderblock_2"):
    checkpoint.load_npz(path, _abstract(deep)[1], head="keep")
  with pytest.raises(ConfigError, match="^'.*missing.npz' does not exist"):  # no field
    checkpoint.load_npz(str(tmp_path / "missing.npz"), _abstract(cfg)[1])
  with pytest.raises(ConfigError, match="^init.checkpoint: '.*missing.npz' does not exist"):
    checkpoint.load_npz(str(tmp_path / "missing.npz"), _abstract(cfg)[1],
                        field="init.checkpoint")
  with pytest.raises(ConfigError, match=r"pass the model's variables\['params'\]"):
    checkpoint.load_npz(path, {"params": _abstract(cfg)[1]}, head="keep")
  # A .safetensors file (or any non-zip) is named as such, not as numpy's "pickled data".
  (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}" + bytes(8))
  with pytest.raises(ConfigError, match=r"model\.safetensors' is not an \.npz file .*"
                                        r"python -m kswap_jax\.convert"):
    checkpoint.load_npz(str(tmp_path / "model.safetensors"), _abstract(cfg)[1])
  import zipfile  # pylint: disable=import-outside-toplevel
  with zipfile.ZipFile(tmp_path / "junk.npz", "w") as z:
    z.writestr("cls.npy", b"\x93NUMPY\x01\x00garbage")
  with pytest.raises(ConfigError, match="cannot read"):
    checkpoint.load_npz(str(tmp_path / "junk.npz"), _abstract(cfg)[1])
  # Compressed, with its deflate stream damaged (zlib.error inside the header read).
  np.savez_compressed(tmp_path / "bad.npz", cls=np.arange(20000.0))
  data = bytearray((tmp_path / "bad.npz").read_bytes())
  data[60:90] = bytes(30)
  (tmp_path / "bad.npz").write_bytes(bytes(data))
  with pytest.raises(ConfigError, match="cannot read .*bad.npz' as .npz"):
    checkpoint.load_npz(str(tmp_path / "bad.npz"), _abstract(cfg)[1])


def test_the_header_only_check_agrees_with_loading(tiny, tmp_path):
  """`check_npz` (a dry run's check, array headers only) accepts and refuses what
  `load_npz` does: other widths and depths, a head of more classes, a resizable grid."""
  cfg, model, params = tiny
  path = str(tmp_path / "p.npz")
  checkpoint.save_npz(params, path)
  assert checkpoint.npz_shapes(path)["head/kernel"] == tuple(params["head"]["kernel"].shape)
  wide, deep, bigger, fewer = (tiny_model_config() for _ in range(4))
  wide.width, wide.num_heads = 96, 2
  deep.depth = 3
  bigger.image_size = 32  # the position-embedding grid is resized
  fewer.num_classes = 4   # a head of more classes than the model has
  for model_cfg, head, error in ((cfg, "keep", None), (bigger, "keep", None),
                                 (wide, "keep", r"encoder_norm/bias has shape \(64,\) .*"
                                                r"\(a checkpoint of width 64"),
                                 (deep, "keep", "lacks 16 parameter.*encoderblock_2"),
                                 (fewer, "extend", "init.head: the checkpoint head has"),
                                 (fewer, "keep", "head/(kernel|bias) has shape")):
    abstract = _abstract(model_cfg)[1]
    if error is None:
      checkpoint.check_npz(path, abstract, head=head)
      checkpoint.load_npz(path, abstract, head=head)
      continue
    for check in (checkpoint.check_npz, checkpoint.load_npz):
      with pytest.raises(ConfigError, match=error):
        check(path, abstract, head=head)


def test_export_merged_folds_lora_into_kernels(tiny, tmp_path):
  cfg, model, params = tiny
  spec = lora.LoraSpec(rank=2)
  tree = jax.tree_util.tree_map(lambda a: a + 0.1, lora.init(params, spec, jax.random.key(1)))
  path = str(tmp_path / "merged.npz")
  checkpoint.export_merged(params, tree, spec.scale, path)
  merged = checkpoint.load_npz(path, _abstract(cfg)[1], head="keep")
  x = np.random.default_rng(0).normal(size=(2, 16, 16, 3)).astype(np.float32)
  np.testing.assert_allclose(model.apply({"params": merged}, x, features=True),
                             lora.apply(model, params, tree, x, scale=spec.scale, features=True),
                             atol=1e-5)


def test_gap_model_position_embeddings_resize_without_a_cls_slot(tmp_path):
  cfg = tiny_model_config()
  cfg.pool = "gap"
  model = vit.build(cfg)
  params = vit.init_params(model, cfg, jax.random.key(0))
  path = str(tmp_path / "p.npz")
  checkpoint.save_npz(params, path)
  big = tiny_model_config(image_size=32)
  big.pool = "gap"
  loaded = checkpoint.load_npz(path, _abstract(big)[1], head="keep")
  pe = np.asarray(loaded["Transformer"]["posembed_input"]["pos_embedding"])
  old = np.asarray(params["Transformer"]["posembed_input"]["pos_embedding"])
  assert pe.shape == (1, 64, 64)
  # Corner tokens of the 4x4 grid stay near the corners of the 8x8 grid (no cls shift).
  assert np.abs(pe[0, 0] - old[0, 0]).max() < np.abs(pe[0, 0] - old[0, 15]).max()


def test_initial_lora_from_a_converted_file_or_a_config_error(tiny, tmp_path):
  from kswap_jax import methods  # pylint: disable=import-outside-toplevel
  from kswap_jax.methods import common  # pylint: disable=import-outside-toplevel
  _, _, base = tiny
  spec = lora.LoraSpec(rank=4)
  tree = lora.init(base, spec, jax.random.key(3))
  path = str(tmp_path / "run.lora.npz")
  checkpoint.save_npz(jax.device_get(tree), path)
  config = methods.default_config("lbf")
  config.init.lora_checkpoint = path
  got = common.initial_lora(config, base, spec, jax.random.key(1))
  for a, b in zip(jax.tree_util.tree_leaves(tree), jax.tree_util.tree_leaves(got)):
    np.testing.assert_array_equal(a, b)
  with pytest.raises(ConfigError, match="init.lora_checkpoint"):
    common.initial_lora(config, base, lora.LoraSpec(rank=8), jax.random.key(1))
  # A run's own lora_<stage>.npz (leaves .../lora_a, .../lora_b) is read the same way.
  run_file = str(tmp_path / "lora_forget.npz")
  checkpoint.save_npz(jax.device_get(lora.join({}, tree)), run_file)
  assert any(k.endswith("/lora_a") for k in np.load(run_file).files)
  config.init.lora_checkpoint = run_file
  got = common.initial_lora(config, base, spec, jax.random.key(1))
  for a, b in zip(jax.tree_util.tree_leaves(tree), jax.tree_util.tree_leaves(got)):
    np.testing.assert_array_equal(a, b)
  config.init.lora_checkpoint = str(tmp_path / "missing.npz")
  with pytest.raises(ConfigError, match="init.lora_checkpoint"):
    common.initial_lora(config, base, spec, jax.random.key(1))


@pytest.fixture
def default_sigint():
  """Python's own SIGINT handler for the test (an xdist worker starts with SIGINT ignored,
  as a background job does), the one before it put back after."""
  import signal  # pylint: disable=import-outside-toplevel
  before = signal.signal(signal.SIGINT, signal.default_int_handler)
  yield
  signal.signal(signal.SIGINT, before)


def test_ctrl_c_inside_a_save_is_raised_after_it(default_sigint):
  """An interrupt while orbax saves or waits is held until the save call returns (cut short,
  orbax's background commit fails with a traceback); a second one is raised at once."""
  import signal  # pylint: disable=import-outside-toplevel
  reached = []
  with pytest.raises(KeyboardInterrupt):
    with checkpoint._interrupts_deferred():  # pylint: disable=protected-access
      signal.raise_signal(signal.SIGINT)
      for _ in range(1000):  # the Python handler runs between bytecodes
        pass
      reached.append(True)
  assert reached and signal.getsignal(signal.SIGINT) is signal.default_int_handler
  with pytest.raises(KeyboardInterrupt):
    with checkpoint._interrupts_deferred():  # pylint: disable=protected-access
      signal.raise_signal(signal.SIGINT)
      signal.raise_signal(signal.SIGINT)
      for _ in range(1000):
        pass
      reached.append(False)
  assert reached == [True]


def test_with_the_command_line_s_handler_ctrl_c_in_a_save_asks_for_a_stop_then_is_held(
    default_sigint):
  """Under `train.stop_on_signals` the first Ctrl-C inside a save only asks for a stop (the
  save and the run go on to the next step); the second is held until the save returns."""
  import signal  # pylint: disable=import-outside-toplevel
  from kswap_jax import train  # pylint: disable=import-outside-toplevel
  reached = []
  try:
    assert train.stop_on_signals() == "process"
    ours = signal.getsignal(signal.SIGINT)
    with checkpoint._interrupts_deferred():  # pylint: disable=protected-access
      signal.raise_signal(signal.SIGINT)
      for _ in range(1000):
        pass
      reached.append(checkpoint.STOP.is_set())
    assert reached == [True] and signal.getsignal(signal.SIGINT) is ours
    with pytest.raises(KeyboardInterrupt):
      with checkpoint._interrupts_deferred():  # pylint: disable=protected-access
        signal.raise_signal(signal.SIGINT)
        for _ in range(1000):
          pass
        reached.append("save finished")
    assert reached == [True, "save finished"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
  finally:
    train.restore_signals()
