"""Dry runs (`methods.run(..., dry_run=True)`, `run.py --dry_run`): every check a run makes
before it writes, then nothing written; one method of each module, on its shipped config."""

import json
import logging
import os
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest

from conftest import load_config, method_run
from kswap_jax import methods
from kswap_jax.errors import ConfigError

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# One per method module: (config file, config arg, the start of a plan line its data gives).
MODULES = {
    "pretrain": ("demo", "runlocal,method=pretrain", "pretrain: classes 0..7, "),
    "knowledge_swap": ("demo", "runlocal", "split retain_train "),
    "gs_lora": ("gs_lora_casia100", "runlocal", "task 1: forget "),
    "continual_forgetting": ("gs_lora_casia100", "runlocal,method=cf_ewc", "task 2: forget "),
    "ug_clu": ("ug_clu_digits", "runlocal", "stage 3_forget "),
    "unlearning": ("ug_clu_digits", "runlocal,method=clu_salun", "stage 1_learn "),
}


def _tree(root):
  return sorted((p, os.path.getsize(os.path.join(p, f))) for p, _, files in os.walk(root)
                for f in files)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_a_dry_run_writes_nothing_and_says_whether_the_workdir_resumes(module, tmp_path,
                                                                        caplog):
  caplog.set_level(logging.INFO, logger="kswap_jax")
  config_file, arg, plan = MODULES[module]
  config = load_config(config_file, arg)
  fresh = tmp_path / "new" / "run"
  assert methods.run(config, str(fresh), dry_run=True) is None
  assert not (tmp_path / "new").exists()
  said = [r.getMessage() for r in caplog.records]
  done = [m for m in said if m.startswith("dry run:")]
  assert len(done) == 1 and f"would start afresh in {fresh}" in done[0], done
  assert any(m.startswith(plan) for m in said), said  # the method read its data
  # A workdir that is a file, refused as the run refuses it.
  (tmp_path / "a_file").write_text("")
  with pytest.raises(ConfigError, match=r"^--workdir .*a_file: a file; expected a folder"):
    methods.run(config, str(tmp_path / "a_file"), dry_run=True)
  assert os.listdir(tmp_path) == ["a_file"]  # the writability probe left nothing
  if os.path.isdir("/proc/self"):  # where no folder can be made, even by root
    with pytest.raises(ConfigError, match=r"^--workdir /proc/x: not a writable folder"):
      methods.run(config, "/proc/x", dry_run=True)


def test_a_dry_run_checks_the_pretraining_it_would_run_first(tmp_path, caplog):
  caplog.set_level(logging.INFO, logger="kswap_jax")
  workdir = tmp_path / "run"
  assert methods.run(load_config("demo", "runlocal"), str(workdir), dry_run=True) is None
  said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("dry run:")]
  assert said[-1].endswith(f"it would first pretrain in {workdir / 'pretrain'}, whose checks "
                           f"passed too; nothing written"), said
  assert not workdir.exists()
  # An unfinished pretraining of another config there: refused now, not after the swap's
  # own set-up.
  other = load_config("demo", "runlocal")
  other.pretrain.epochs = 9
  other.init.pretrain_workdir = str(workdir / "pretrain")  # as the run fills it in
  (workdir / "pretrain").mkdir(parents=True)
  (workdir / "pretrain" / "config.json").write_text(other.to_json_best_effort())
  with pytest.raises(ConfigError, match=r"pretrain: holds a run with a different config "
                     r"\(pretrain\.epochs"):
    methods.run(load_config("demo", "runlocal"), str(workdir), dry_run=True)
  # A pretrained head the run could not load is refused before pretraining (both runs).
  bad = load_config("ug_clu_digits", "runlocal")
  bad.init.kind, bad.pretrain.num_classes = "pretrain", 12
  with pytest.raises(ConfigError, match=r"^pretrain\.num_classes: 12, but the run's model"):
    methods.run(bad, str(tmp_path / "w"), dry_run=True)


@pytest.mark.slow
def test_a_dry_run_on_a_finished_workdir_reads_its_record(tmp_path_factory, caplog):
  caplog.set_level(logging.INFO, logger="kswap_jax")
  workdir, _ = method_run(tmp_path_factory, "ug_clu_digits", "runlocal")
  before = _tree(workdir)
  with open(os.path.join(workdir, "config.json")) as f:
    recorded = json.load(f)
  assert methods.run(ml_collections.ConfigDict(recorded), workdir, dry_run=True) is None
  assert any("holds a finished run of this config (the command rewrites its results)"
             in r.getMessage() for r in caplog.records)
  other = ml_collections.ConfigDict(recorded)
  other.unlearn.gamma = 2.0
  with pytest.raises(ConfigError, match=r"holds a run with a different config \(unlearn\.gamma"):
    methods.run(other, workdir, dry_run=True)
  assert _tree(workdir) == before


def test_a_dry_run_reads_the_data_the_config_printer_does_not(tmp_path):
  """A class the data does not have passes the printer's checks (no data read) and is
  refused by the dry run, from the command line, with one line and exit 2."""
  args = ["--config=demo:runlocal", "--config.swap.forget_classes=(1,2,99)"]
  printer = subprocess.run([sys.executable, "-m", "kswap_jax.config", *args],
                           capture_output=True, text=True, cwd=ROOT)
  assert printer.returncode == 0, printer.stderr
  workdir = tmp_path / "w"
  dry = subprocess.run([sys.executable, "run.py", "--dry_run", f"--workdir={workdir}", *args],
                       capture_output=True, text=True, cwd=ROOT)
  assert dry.returncode == 2 and dry.stderr.startswith("error: swap.forget_classes"), dry.stderr
  assert dry.stderr.count("\n") == 1 and not workdir.exists()
  ok = subprocess.run([sys.executable, "run.py", "--dry_run", f"--workdir={workdir}",
                       "--config=demo:runlocal"], capture_output=True, text=True, cwd=ROOT)
  assert ok.returncode == 0 and "dry run: lbf passed" in ok.stdout and not workdir.exists()


def test_a_comparison_dry_runs_every_method_and_seed(tmp_path, caplog):
  from kswap_jax import compare  # pylint: disable=import-outside-toplevel
  caplog.set_level(logging.INFO, logger="kswap_jax")
  workdir = tmp_path / "cmp"
  assert compare.run(load_config("demo", "runlocal"), str(workdir), ["lbf", "laf"], [0, 1],
                     dry_run=True) is None
  said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("dry run:")]
  assert [s.split()[2] for s in said] == ["lbf", "lbf", "laf", "laf"]
  assert not workdir.exists()


def test_the_dry_run_flag_takes_absls_boolean_forms():
  from kswap_jax import cli  # pylint: disable=import-outside-toplevel
  base = ["run.py", "--config=demo"]
  for flag, want in (("--dry_run", True), ("-dry_run", True), ("--dry_run=true", True),
                     ("--dry_run=False", False), ("--nodry_run", False)):
    assert cli.pop_dry_run([*base, flag]) == (want, base), flag
  assert cli.pop_dry_run(base) == (False, base)
  with pytest.raises(ConfigError, match=r"^--dry_run: 'maybe' \(expected"):
    cli.pop_dry_run([*base, "--dry_run=maybe"])


def test_a_comparison_checks_every_methods_values_before_the_first_trains(tmp_path):
  """A bad value of the last method's section stops `compare` before anything trains
  (it surfaced after the first methods had trained)."""
  from kswap_jax import compare  # pylint: disable=import-outside-toplevel
  config = load_config("gs_lora_digits", "runlocal")
  config.cf_lirf.kd_rows = "x"
  with pytest.raises(ConfigError, match=r"^cf_lirf\.kd_rows: 'x'"):
    compare.run(config, str(tmp_path / "cmp"), ["cf_ft", "cf_lirf"], [0])
  assert not any((tmp_path / "cmp").rglob("*.npz")) and not (tmp_path / "cmp" / "cf_ft").exists()


def test_a_dry_run_refuses_a_checkpoint_of_another_width(tmp_path):
  """Its shapes are read from the file's array headers before anything is written (the run
  found it only when it loaded the checkpoint)."""
  from kswap_jax import checkpoint, models  # pylint: disable=import-outside-toplevel
  cfg = load_config("demo", "runlocal").model
  cfg.width, cfg.num_heads, cfg.num_classes = 96, 2, 8
  model = models.build(cfg)
  params = jax.device_get(models.init_variables(model, cfg, jax.random.key(0))["params"])
  checkpoint.save_npz(params, str(tmp_path / "wide.npz"))
  config = load_config("demo", "runlocal")
  config.init.kind, config.init.checkpoint = "npz", str(tmp_path / "wide.npz")
  with pytest.raises(ConfigError, match=r"^init.checkpoint: .*wide.npz: .* has shape \(96,\) "
                                        r"but the model expects \(64,\) \(a checkpoint of "
                                        r"width 96"):
    methods.run(config, str(tmp_path / "w"), dry_run=True)
  assert not (tmp_path / "w").exists()


def test_a_split_smaller_than_one_batch_is_named_once(tmp_path, caplog):
  config = load_config("demo", "runlocal")
  config.ks.batch_size = 400  # learn_train has 248 records, forget_train 254
  with caplog.at_level(logging.WARNING, logger="kswap_jax"):
    methods.run(config, str(tmp_path / "w"), dry_run=True)
  said = [r.getMessage() for r in caplog.records if "fewer than one batch" in r.getMessage()]
  assert [s.split(" has ")[0] for s in said] == ["warning: learn_train", "warning: forget_train"]
  assert said[0].endswith("(ks.batch_size): every step pads it, masked, to the full batch; "
                          "a smaller ks.batch_size computes less")


def test_a_dry_run_checks_a_batchnorm_models_saved_state_too(tmp_path):
  """A ResNet's checkpoint is two files (`load_base` reads `<name>.model_state.npz`
  beside it); the dry run checks both, and the head mode, from the files' headers."""
  from kswap_jax import checkpoint, models  # pylint: disable=import-outside-toplevel
  config = load_config("ug_clu_digits", "runlocal")
  variables = jax.device_get(models.init_variables(models.build(config.model), config.model,
                                                   jax.random.key(0)))
  checkpoint.save_npz(variables.pop("params"), str(tmp_path / "base.npz"))
  config.init.kind, config.init.checkpoint = "npz", str(tmp_path / "base.npz")
  with pytest.raises(ConfigError, match=r"^init.checkpoint: '.*base.model_state.npz' does "
                                        r"not exist \(expected the model state"):
    methods.run(config, str(tmp_path / "w"), dry_run=True)
  checkpoint.save_npz(variables, str(tmp_path / "base.model_state.npz"))
  methods.run(config, str(tmp_path / "w"), dry_run=True)
  config.init.head = "Extend"  # a typo the loader alone used to find
  with pytest.raises(ConfigError, match=r"^init.head: unknown mode 'Extend' \(expected "
                                        r"extend, replace, keep\)"):
    methods.run(config, str(tmp_path / "w"), dry_run=True)
  assert not (tmp_path / "w").exists()


def test_images_of_another_shape_than_the_model_s_are_reported_once(caplog):
  """Stored images the model takes in another size or channel count are converted on the
  fly: one line per dataset says how, a warning when colour is lost."""
  from kswap_jax.data import sources  # pylint: disable=import-outside-toplevel
  from kswap_jax.methods import common  # pylint: disable=import-outside-toplevel
  config = load_config("demo", "runlocal")
  config.model.channels, config.model.image_size = 1, 16
  array = lambda name, c: sources.ArraySource(np.zeros((2, 32, 32, c), np.uint8), [0, 1], 2,
                                              name)

  class Folder:  # a tfds image folder kept at its images' sizes
    name, image_shape = "folder", (None, None, 3)

  with caplog.at_level("INFO", logger="kswap_jax"):
    for _ in range(2):  # once per dataset
      common.note_conversion(config, [array("rgb", 3), Folder()])
    config.model.channels = 3
    common.note_conversion(config, [array("rgba", 4), array("gray", 1),
                                    sources.ArraySource(np.zeros((2, 16, 16, 3), np.uint8),
                                                        [0, 1], 2, "same")])
  assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
      ("WARNING", "warning: data: the images of rgb are 32x32x3, the model takes 16x16x1 "
                  "(model.image_size, model.channels): resized (bilinear), turned to "
                  "grayscale (colour, if any, is lost)"),
      ("WARNING", "warning: data: the images of folder are ?x?x3 (the size is not fixed in "
                  "the dataset), the model takes 16x16x1 (model.image_size, model.channels): resized where they "
                  "differ (bilinear), turned to grayscale (colour, if any, is lost)"),
      ("INFO", "data: the images of rgba are 32x32x4, the model takes 16x16x3 "
               "(model.image_size, model.channels): resized (bilinear), alpha dropped"),
      ("INFO", "data: the images of gray are 32x32x1, the model takes 16x16x3 "
               "(model.image_size, model.channels): resized (bilinear), grayscale "
               "repeated into 3 channels")]
  with pytest.raises(ConfigError, match=r"^model\.channels: 3, but the images of two have 2 "):
    common.note_conversion(config, [array("two", 2)])


def test_gs_lora_from_a_random_model_is_warned_about_in_the_dry_run(tmp_path, caplog):
  """GS-LoRA trains LoRA only under a frozen head, which an untrained ViT has at zero: every
  LoRA gradient is 0, so such a run learns and forgets nothing (a trial ran one)."""
  config = load_config("gs_lora_casia100", "runlocal")
  config.init.kind = "random"
  with caplog.at_level("WARNING", logger="kswap_jax"):
    methods.run(config, str(tmp_path / "run"), dry_run=True)
  assert any("init.kind=random: GS-LoRA trains LoRA only" in r.getMessage()
             for r in caplog.records)
  assert not (tmp_path / "run").exists()


@pytest.fixture(scope="module", name="zoo")
def fixture_zoo(tmp_path_factory):
  """A tfds dataset built from an image folder of ten named classes (ant .. jay), three
  train and three test images each: the `data.old` of a config that names classes."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  from kswap_jax.data import image_folder  # pylint: disable=import-outside-toplevel
  root, rng = tmp_path_factory.mktemp("zoo"), np.random.default_rng(0)
  for name in ("ant", "bee", "cat", "dog", "eel", "fox", "gnu", "hen", "ibis", "jay"):
    (root / "images" / name).mkdir(parents=True)
    for k in range(6):
      Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(
          root / "images" / name / f"{k}.png")
  image_folder.build([root / "images"], "zoo", root / "tfds", test_fraction=0.5)
  return dict(kind="tfds", name="zoo", data_dir=str(root / "tfds"))


def _named_config(family: str, data: dict) -> ml_collections.ConfigDict:
  if family == "knowledge_swap":
    config = load_config("demo", "runlocal")
    config.data.old = config.data.new = data
    config.swap.num_old_classes = config.pretrain.num_classes = 6
    config.swap.forget_classes = ("bee", "dog")
    config.swap.learn_classes = ("hen,ibis",)  # as --config.swap.learn_classes=hen,ibis reads
  elif family == "gs_lora":
    config = load_config("gs_lora_casia100", "runlocal")
    config.data.old = data
    config.tasks.forget_classes = (("bee",), ("cat", 4), ("gnu",), ("jay",))
  else:
    config = load_config("ug_clu_digits", "runlocal")
    config.data.old = data
    config.clu.tasks = (("ant", "bee", "cat"), ("dog", "eel", 5))
    config.clu.requests = ("learn:1", "learn:2", "forget:class:bee,3")
  return config


@pytest.mark.parametrize("family, said", [
    ("knowledge_swap", ["split forget_train      6 images, classes 1 (bee), 3 (dog)",
                        "split learn_train       6 images, classes 7 (hen), 8 (ibis)"]),
    ("gs_lora", ["task 1: forget 1 (bee); ", "task 2: forget 2 (cat), 4 (eel); "]),
    ("ug_clu", ["tasks: 1: 0 (ant), 1 (bee), 2 (cat); 2: 3 (dog), 4 (eel), 5 (fox)",
                "stage 3_forget         forget:class:bee,3           D_R     12  D_U      6  "
                "D_L      0  classes 1 (bee), 3 (dog)"]),
])
def test_a_config_names_classes_by_the_data_s_class_names(zoo, family, said, tmp_path, caplog):
  """Each family reads class names where it reads class ids (swap.*_classes,
  tasks.forget_classes, clu.tasks and forget:class: requests), resolved against the data
  (here an image folder's class folders); a name the data lacks is one line naming the
  field and the nearest names."""
  caplog.set_level(logging.INFO, logger="kswap_jax")
  config = _named_config(family, zoo)
  assert methods.run(config, str(tmp_path / "run"), dry_run=True) is None
  lines = [r.getMessage() for r in caplog.records]
  for line in said:
    assert any(m.startswith(line) for m in lines), (line, lines)
  assert not (tmp_path / "run").exists()
  if family == "knowledge_swap":
    config.swap.forget_classes = ("bee", "dgo")
    field = r"swap\.forget_classes"
  elif family == "gs_lora":
    config.tasks.forget_classes = (("bee",), ("cat", 4), ("gnu",), ("jya",))
    field = r"tasks\.forget_classes"
  else:
    config.clu.requests = ("learn:1", "learn:2", "forget:class:bee,dgo")
    field = r"clu\.requests\[2\]: 'forget:class:bee,dgo'"
  with pytest.raises(ConfigError, match=rf"^{field}: no class named '(dgo|jya)' in source "
                                        rf"'zoo' \(10 classes; nearest: '(dog|jay)'"):
    methods.run(config, str(tmp_path / "run"), dry_run=True)
