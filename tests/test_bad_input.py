"""Bad input through `run.py`: exit code 2, one `error:` line on stderr, no result written.

Every case runs the command line's `main` in a subprocess with the `:runlocal` demo (the
`test/4` ViT on bundled digits). One valid run, the positive control, pretrains once;
cases that get past data validation reuse its `pretrain/params.npz` instead of
pretraining again. The control and the multi-command cases are real `python run.py`
processes; the single-command cases run one after another in one process
(`cli_batch.py`), about 3 s of start-up saved per case. Commands run two at a time: the
cases that do not need the control's output share the second core with it.
"""

import concurrent.futures
import functools
import json
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest

pytestmark = pytest.mark.slow

_REPO = pathlib.Path(__file__).resolve().parents[1]
_RUNLOCAL = "--config=configs/demo.py:runlocal"
_TIMEOUT_S = 300
_MLP_KERNEL = "Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel"


def _run(workdir, *flags, config=_RUNLOCAL):
  """Runs `python run.py <config> --workdir=<workdir> <flags>` on CPU."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run(
      [sys.executable, "run.py", config, f"--workdir={workdir}", *flags],
      cwd=_REPO, env=env, capture_output=True, text=True, timeout=_TIMEOUT_S)


def _copy_pretrain(workdir, params_npz):
  """Puts only the pretrained params (no results.json) where the swap stage looks."""
  os.makedirs(workdir / "pretrain")
  shutil.copy(params_npz, workdir / "pretrain" / "params.npz")


def _results_files(workdir):
  return sorted(str(p) for p in pathlib.Path(workdir).rglob("results.json"))


def _assert_clean_failure(proc, workdir, *names):
  """Exit 2, stderr one `error:` line naming every string in `names`, no results.json."""
  report = f"exit {proc.returncode}\nstderr:\n{proc.stderr[-3000:]}"
  assert proc.returncode == 2, report
  lines = proc.stderr.splitlines()
  assert len(lines) == 1, report
  assert lines[0].startswith("error: ") and lines[0][len("error: "):].strip(), report
  assert "Traceback" not in proc.stderr, report
  for name in names:
    assert name in lines[0], f"{name!r} not named in: {lines[0]}"
  assert not _results_files(workdir), _results_files(workdir)


# ----------------------------------------------------------------------------------------------
# Single-command cases: flags, strings the error line must contain, and whether the case
# needs the control's output (pretrained params, or a file made from them). "{tmp}" is the
# directory that holds the workdirs and input files.

_CASES = {
    "retain_overlaps_forget": (  # the demo forgets 4 and 6
        ["--config.swap.retain_classes=(1,4,3)"], ["swap.retain_classes"], False),
    "learn_overlaps_old_classes": (
        ["--config.swap.learn_classes=(7,8)"], ["swap.learn_classes", "7"], False),
    "forget_id_outside_old_label_space": (
        ["--config.swap.forget_classes=(2,50)"], ["swap.forget_classes", "50"], False),
    "learn_id_outside_dataset": (
        ["--config.swap.learn_classes=(8,12)"], ["swap.learn_classes", "12"], False),
    "ratio_gives_empty_split": (
        ["--config.swap.retain_ratio=0.0001"], ["swap.retain_ratio", "empty"], False),
    "more_shots_than_records": (
        ["--config.swap.forget_shots=100000"], ["swap.forget_shots", "100000"], False),
    "lora_rank_zero": (["--config.lora.rank=0"], ["lora.rank"], True),
    "lora_targets_match_nothing": (
        ["--config.lora.targets=nothing_matches"], ["lora.targets"], True),
    "unknown_data_kind": (["--config.data.old.kind=nope"], ["data.old.kind", "nope"], False),
    "unknown_augmentation": (["--config.data.augment=rotate"], ["data.augment", "rotate"],
                             False),
    "tfds_dataset_not_prepared": (
        ["--config={tmp}/tfds_config.py:runlocal"], ["data.old.data_dir", "does not exist",
                                                      "tfds build"], False),
    "unknown_model_variant": (["--config.model.variant=Q/16"], ["model.variant", "Q/16"], False),
    "unknown_method_override": (["--config.method=nope"], ["method", "nope"], False),
    "unknown_method_config_arg": (
        ["--config=configs/demo.py:method=nope"], ["method", "nope"], False),
    "unknown_config_arg_key": (["--config=configs/demo.py:bogus=1"], ["bogus"], False),
    "unknown_override_field": (["--config.nope=1"], ["--config.nope"], False),
    # ml_collections' own hint survives in the one line.
    "misspelled_field": (["--config.ks.betta=0.3"],
                         ["--config.ks.betta", 'did you mean "beta"'], False),
    "misspelled_section": (["--config.kss.beta=0.3"], ["--config.kss.beta", '"ks"'], False),
    # A field of the method's defaults that this file's section does not have.
    "field_the_file_does_not_set": (
        ["--config.data.old.name=pets"],
        ["data.old has no field 'name'", "its fields: kind, seed, test_fraction"], False),
    "bad_bool_config_arg": (["--config=configs/demo.py:runlocal=maybe"],
                            ["runlocal", "maybe", "bool"], False),
    "method_of_another_family": (["--config=configs/ug_clu_digits.py:method=lbf"],
                                 ["method", "lbf", "ug_clu"], False),
    # An arg the chosen setting would ignore is refused.
    "arg_the_setting_ignores": (
        ["--config=configs/gs_lora_casia100.py:setting=continual,forget=50"],
        ["forget", "setting=continual"], False),
    "arg_runlocal_ignores": (["--config=configs/sfr_on_cifar10.py:runlocal,pretrained=/x.npz"],
                             ["pretrained", "runlocal"], False),
    "workdir_url": (["--workdir=gs://bucket/run"], ["--workdir", "gs://bucket/run"], False),
    # File inputs are checked before the workdir or a pretraining run (which the demo would
    # start first: it has no pretrained model yet).
    "missing_lora_checkpoint": (["--config.init.lora_checkpoint={tmp}/missing.lora.npz"],
                                ["init.lora_checkpoint", "{tmp}/missing.lora.npz"], False),
    "npz_init_without_checkpoint": (["--config.init.kind=npz"], ["init.checkpoint", "empty"],
                                    False),
    "missing_config_file": (
        ["--config=configs/no_such_config.py"],
        ["configs/no_such_config.py", "does not exist", "a shipped config: demo,"], False),
    "misspelled_shipped_config": (["--config=demoo:runlocal"],
                                  ["'demoo'", "did you mean --config=demo?"], False),
    # A field flag without its value (absl would take the next flag as the value).
    "override_without_value": (["--config.seed", "--config.ks.beta=0.3"],
                               ["--config.seed: expected a value (--config.seed=VALUE)"], False),
    "override_without_value_at_the_end": (["--config.ks.beta"], ["--config.ks.beta",
                                                                 "expected a value"], False),
    "override_with_empty_value": (["--config.ks.beta="],
                                  ["--config.ks.beta", "expected a value after '='"], False),
    "bool_override_not_true_or_false": (["--config.model.remat=yes"],
                                        ["--config.model.remat", "'yes'",
                                         "expected true or false"], False),
    "checkpoint_that_is_a_folder": (
        ["--config.init.kind=npz", "--config.init.checkpoint={tmp}"],
        ["init.checkpoint", "is a folder", ".npz"], False),
    "missing_npz_checkpoint": (
        ["--config.init.kind=npz", "--config.init.checkpoint={tmp}/missing.npz"],
        ["init.checkpoint", "{tmp}/missing.npz"], False),
    # A config set up for one method, run as another (it used to end in a traceback).
    "method_override_of_another_family": (
        ["--config.method=gs_lora"], ["method", "'gs_lora'", "configs/gs_lora_digits.py"], False),
    "negative_seed": (["--config.seed=-1"], ["seed", "-1"], False),
    "argument_that_is_not_a_flag": (["configs/gs_lora_digits.py"],
                                    ["unexpected argument", "--config=configs/gs_lora_digits.py"],
                                    False),
    "misspelled_flag": (["--workdr={tmp}/x"], ["--workdr", "did you mean --workdir"], False),
    "misspelled_dry_run": (["--dryrun"], ["--dryrun", "or --dry_run); did you mean --dry_run?"],
                           False),
    "config_file_raises": (["--config={tmp}/raising_config.py"],
                           ["raising_config.py, line 3", "ZeroDivisionError"], False),
    # After other files in the same process (ml_collections reloads into one module name).
    "config_file_without_get_config": (["--config={tmp}/no_get_config.py"],
                                       ["no_get_config.py has no get_config"], False),
    # absl's space form, given after the default --config=: the last one counts.
    "config_flag_space_form": (["--config", "configs/gs_lora_digits.py:runlocal",
                                "--config.gs_lora.nope=1"],
                               ["--config.gs_lora.nope", "this config's gs_lora has no field"],
                               False),
    # The one-step ablation has no sub-steps (it used to ignore D_L and size the schedule
    # for twice the steps).
    "clu_joint_with_substeps": (["--config=configs/ug_clu_digits.py:runlocal,method=clu_joint",
                                 "--config.clu.slow_batches=substeps"],
                                ["clu.slow_batches", "clu_joint"], False),
    "negative_eval_interval": (["--config.eval.every_steps=-3"], ["eval.every_steps", "-3"],
                               False),
    "zero_log_interval": (["--config.train.log_every_steps=0"],
                          ["train.log_every_steps", ">= 1"], False),
    "checkpoint_the_init_kind_ignores": (  # the demo pretrains its own model
        ["--config.init.checkpoint=/x/vit.npz"], ["init.checkpoint", "init.kind=pretrain"],
        False),
    "tuple_override_without_parentheses": (
        ["--config=configs/ug_clu_digits.py:runlocal",
         "--config.clu.requests=learn:1,forget:bogus:1"],
        ["--config.clu.requests", "a tuple is written as Python"], False),
    "negative_swap_epochs": (["--config.ks.forget_epochs=-1"], ["ks.forget_epochs", "-1"],
                             False),
    "negative_pretrain_epochs": (["--config.pretrain.epochs=-2"], ["pretrain.epochs", "-2"],
                                 False),
    "adam_beta_out_of_range": (["--config.optim.b1=2.0"], ["optim.b1", "[0, 1)"], False),
    # A torch checkpoint (a zip holding data.pkl) named where an .npz belongs.
    "torch_checkpoint_as_npz": (
        ["--config.init.kind=npz", "--config.init.checkpoint={tmp}/model.pth"],
        ["init.checkpoint", "is a PyTorch checkpoint", "python -m kswap_jax.convert"], False),
    # The new classes' rows start at row num_old_classes: inside an 8-row trained head.
    "npz_head_rows_differ_from_num_old_classes": (
        ["--config.init.kind=npz", "--config.init.checkpoint={tmp}/control/pretrain/params.npz",
         "--config.swap.num_old_classes=7"],
        ["swap.num_old_classes: 7", "8 rows", "set swap.num_old_classes = 8"], True),
    "npz_checkpoint_wrong_shape": (
        ["--config.init.kind=npz", "--config.init.checkpoint={tmp}/wrong_shape.npz"],
        ["init.checkpoint", _MLP_KERNEL], True),
}


def _case_args(name, tmp, params_npz):
  """(workdir, run.py's arguments) of a single-command case, its workdir prepared."""
  flags, _, needs_control = _CASES[name]
  workdir = tmp / name
  if needs_control:
    _copy_pretrain(workdir, params_npz)
  flags = [f.format(tmp=tmp) for f in flags]
  config = [f for f in flags if f.startswith("--config=")] or [_RUNLOCAL]
  flags = [f for f in flags if not f.startswith("--config=")]
  return workdir, [config[0], f"--workdir={workdir}", *flags]


def _single_case(name, tmp, params_npz):
  """One case as its own `python run.py` process."""
  workdir, args = _case_args(name, tmp, params_npz)
  return {name: (workdir, [_run(workdir, *args[2:], config=args[0])])}


def _batch(names, tmp, params_npz):
  """Single-command cases run one after another in one process (`cli_batch.py`: the same
  `main` as run.py's, without a start-up per case). The multi-command cases below run as
  real `run.py` processes."""
  cases = {name: _case_args(name, tmp, params_npz) for name in names}
  proc = subprocess.run(
      [sys.executable, str(_REPO / "tests" / "cli_batch.py"),
       json.dumps([args for _, args in cases.values()])],
      cwd=_REPO, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True,
      timeout=_TIMEOUT_S)
  assert proc.returncode == 0, proc.stderr[-3000:]
  outcomes = json.loads(proc.stdout.strip().splitlines()[-1])
  return {name: (workdir, [subprocess.CompletedProcess(args, o["rc"], "", o["stderr"])])
          for (name, (workdir, args)), o in zip(cases.items(), outcomes)}


def _write_tfds_config(tmp):
  """A config file: the demo with data.old an unprepared tfds dataset."""
  demo = str(_REPO / "configs" / "demo.py")
  (tmp / "tfds_config.py").write_text(
      "import importlib.util\n\n\n"
      "def get_config(arg=None):\n"
      f"  spec = importlib.util.spec_from_file_location('demo', {demo!r})\n"
      "  demo = importlib.util.module_from_spec(spec)\n"
      "  spec.loader.exec_module(demo)\n"
      "  c = demo.get_config(arg)\n"
      "  c.data.old = dict(kind='tfds', name='kswap_no_such_dataset',\n"
      f"                    data_dir={str(tmp / 'tfds_data')!r})\n"
      "  return c\n")


def _write_raising_config(tmp):
  (tmp / "raising_config.py").write_text("def get_config(arg=None):\n  n = 0\n  return 1 / n\n")
  (tmp / "no_get_config.py").write_text("CONFIG = None\n")
  import zipfile  # pylint: disable=import-outside-toplevel
  with zipfile.ZipFile(tmp / "model.pth", "w") as z:  # torch.save's layout, in outline
    z.writestr("model/data.pkl", b"not read")
    z.writestr("model/version", b"3")


def _write_wrong_shape_npz(tmp, params_npz):
  """The pretrained params with one FFN kernel 7 wide instead of the model's mlp_dim."""
  with np.load(params_npz) as f:
    params = {k: f[k] for k in f.files}
  assert params[_MLP_KERNEL].shape[-1] != 7
  params[_MLP_KERNEL] = np.zeros(params[_MLP_KERNEL].shape[:-1] + (7,), np.float32)
  np.savez(tmp / "wrong_shape.npz", **params)


# ----------------------------------------------------------------------------------------------
# Multi-command cases; each returns {case: (workdir, [CompletedProcess, ...])}.

def _resume_with_other_lora_rank(tmp, params_npz):
  """An interrupted run (checkpoint at step 3), then reruns of it with lora.rank=4.

  In "resume_other_rank" the workdir's config record catches the change; in a copy of the
  workdir without config.json ("orbax_other_rank") the checkpoint restore itself must.
  """
  workdir = tmp / "resume_other_rank"
  _copy_pretrain(workdir, params_npz)
  interrupted = _run(workdir, "--config.debug.interrupt_at_step=3",
                     "--config.train.checkpoint_every_steps=1")
  copy = tmp / "orbax_other_rank"
  shutil.copytree(workdir, copy)
  orbax_runs = []
  for _ in range(3):  # whether the restore leaks output depends on timing: try thrice
    (copy / "config.json").unlink(missing_ok=True)
    orbax_runs.append(_run(copy, "--config.lora.rank=4"))
  return {"resume_other_rank": (workdir, [interrupted, _run(workdir, "--config.lora.rank=4")]),
          "orbax_other_rank": (copy, [interrupted, *orbax_runs])}


def _rerun_after_bad_input(tmp, params_npz):
  """A bad-input run, then a different bad input in the same workdir."""
  out = _single_case("retain_overlaps_forget", tmp, params_npz)
  workdir, (first,) = out["retain_overlaps_forget"]
  second = _run(workdir, "--config.swap.learn_classes=(7,8)")
  return {**out, "rerun_after_bad_input": (workdir, [first, second])}


def _lora_rank_zero_fresh_workdir(tmp, params_npz):
  """No pretrained params yet: the bad LoRA config must be caught before pretraining."""
  del params_npz
  workdir = tmp / "lora_rank_zero_fresh"
  return {"lora_rank_zero_fresh": (workdir, [_run(workdir, "--config.lora.rank=0")])}


def _unwritable_workdir(tmp, params_npz):
  del params_npz
  (tmp / "afile").write_text("a regular file, not a directory\n")
  workdir = tmp / "afile" / "sub"
  return {"unwritable_workdir": (workdir, [_run(workdir)])}


# Longest first within each group.
_INDEPENDENT_JOBS = [_lora_rank_zero_fresh_workdir, _rerun_after_bad_input,
                     _unwritable_workdir, functools.partial(_batch, [
                         name for name, (_, _, needs_control) in _CASES.items()
                         if not needs_control and name != "retain_overlaps_forget"])]
_DEPENDENT_JOBS = [_resume_with_other_lora_rank, functools.partial(_batch, [
    name for name, (_, _, needs_control) in _CASES.items() if needs_control])]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """{case: (workdir, [CompletedProcess, ...])}; "control" is the valid run."""
  tmp = tmp_path_factory.mktemp("runs")
  _write_tfds_config(tmp)
  _write_raising_config(tmp)
  control_dir = tmp / "control"
  params_npz = control_dir / "pretrain" / "params.npz"
  out = {}
  with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
    control = pool.submit(_run, control_dir)
    futures = [pool.submit(job, tmp, params_npz) for job in _INDEPENDENT_JOBS]
    out["control"] = (control_dir, [control.result()])
    if params_npz.is_file():
      _write_wrong_shape_npz(tmp, params_npz)
      futures += [pool.submit(job, tmp, params_npz) for job in _DEPENDENT_JOBS]
    for future in futures:
      out.update(future.result())
  return out


def _get(runs, case):
  if case not in runs:
    pytest.fail(f"not run: the positive control failed:\n{runs['control'][1][0].stderr[-3000:]}")
  return runs[case]


# ----------------------------------------------------------------------------------------------
# Tests.

def test_valid_input_exits_zero_and_writes_results(runs):
  workdir, (proc,) = runs["control"]
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "error:" not in proc.stderr
  with open(workdir / "results.json") as f:
    results = json.load(f)
  assert results["method"] == "lbf"
  assert [s["name"] for s in results["stages"]] == ["before", "learn", "forget"]
  assert set(results["final"]) >= {"acc_r", "acc_f", "acc_n", "h_mean"}
  assert (workdir / "pretrain" / "params.npz").is_file()


@pytest.mark.parametrize("case", sorted(_CASES))
def test_bad_input_exits_2_with_one_line(runs, case):
  workdir, (proc,) = _get(runs, case)
  names = [n.format(tmp=workdir.parent) for n in _CASES[case][1]]
  _assert_clean_failure(proc, workdir, *names)


def test_resume_with_different_lora_rank_names_the_field(runs):
  workdir, (interrupted, rerun) = _get(runs, "resume_other_rank")
  assert interrupted.returncode not in (0, 2), interrupted.stderr[-3000:]
  assert (workdir / "checkpoints" / "3").is_dir(), os.listdir(workdir / "checkpoints")
  _assert_clean_failure(rerun, workdir, "--workdir", "lora.rank")


def test_orbax_checkpoint_with_other_shapes_exits_2_with_one_line(runs):
  workdir, (interrupted, *reruns) = _get(runs, "orbax_other_rank")
  assert interrupted.returncode not in (0, 2), interrupted.stderr[-3000:]
  for rerun in reruns:
    _assert_clean_failure(rerun, workdir, str(workdir / "checkpoints"))


def test_failed_run_does_not_lock_its_workdir(runs):
  workdir, (first, second) = runs["rerun_after_bad_input"]
  _assert_clean_failure(first, workdir, "swap.retain_classes")
  # The second bad input is reported as itself, not as a change of the workdir's config.
  _assert_clean_failure(second, workdir, "swap.learn_classes")
  assert second.stderr.startswith("error: swap.learn_classes"), second.stderr


def test_bad_lora_config_fails_before_pretraining(runs):
  workdir, (proc,) = runs["lora_rank_zero_fresh"]
  _assert_clean_failure(proc, workdir, "lora.rank")
  assert not (workdir / "pretrain" / "params.npz").exists()


def test_bad_input_files_fail_before_the_workdir_is_touched(runs):
  for case in ("missing_lora_checkpoint", "npz_init_without_checkpoint"):
    workdir, _ = _get(runs, case)
    assert not workdir.exists(), (case, sorted(os.listdir(workdir)))
  # A URL workdir used to become a folder named after it, relative to the working directory.
  _get(runs, "workdir_url")
  assert not (_REPO / "gs:").exists()


def test_a_run_refused_after_it_started_leaves_no_empty_folders(runs):
  """The wrong-shape checkpoint is found once the run has made its checkpoint folder."""
  workdir, _ = _get(runs, "npz_checkpoint_wrong_shape")
  assert sorted(os.listdir(workdir)) == ["pretrain"]  # what the case put there


def test_only_new_empty_folders_are_removed(tmp_path, monkeypatch):
  """`methods.run`'s clean-up after a refusal: new empty folders go (deepest first, the new
  workdir itself too); pre-existing ones, and new ones holding a file, stay."""
  from kswap_jax import methods  # pylint: disable=import-outside-toplevel
  monkeypatch.chdir(tmp_path)
  (tmp_path / "run" / "old_empty").mkdir(parents=True)
  before = methods._folders("run")  # pylint: disable=protected-access
  for new in ("run/checkpoints", "run/pretrain/checkpoints", "run/kept"):
    (tmp_path / new).mkdir(parents=True)
  (tmp_path / "run" / "kept" / "file").write_text("x")
  methods._remove_new_empty_folders("run", before)  # pylint: disable=protected-access
  assert sorted(os.listdir(tmp_path / "run")) == ["kept", "old_empty"]
  fresh = methods._folders("new")  # pylint: disable=protected-access
  (tmp_path / "new" / "checkpoints").mkdir(parents=True)
  methods._remove_new_empty_folders("new", fresh)  # pylint: disable=protected-access
  assert not (tmp_path / "new").exists()


def test_a_refused_run_removes_the_parent_folders_it_created(tmp_path, monkeypatch):
  """`--workdir=/new/parents/run`: makedirs made /new and /new/parents too; a refusal
  removes them when empty, and nothing above them."""
  import types  # pylint: disable=import-outside-toplevel
  from kswap_jax import methods  # pylint: disable=import-outside-toplevel
  from kswap_jax.errors import ConfigError  # pylint: disable=import-outside-toplevel

  def refusing_run(config, workdir):
    os.makedirs(os.path.join(workdir, "checkpoints"))
    raise ConfigError("init.checkpoint: wrong shapes")
  config = methods.default_config("lbf")
  config.init.kind = "random"
  monkeypatch.setattr(methods, "get", lambda name: types.SimpleNamespace(run=refusing_run))
  monkeypatch.setattr(methods, "check_sections", lambda config: None)
  (tmp_path / "kept").mkdir()
  with pytest.raises(ConfigError, match="wrong shapes"):
    methods.run(config, str(tmp_path / "kept" / "new" / "parents" / "run"))
  assert os.listdir(tmp_path) == ["kept"] and os.listdir(tmp_path / "kept") == []


def test_a_run_leaves_the_callers_config_as_given(tmp_path, monkeypatch):
  """A default the run fills in (the demo's `init.pretrain_workdir`) must not carry into the
  caller's next run with the same ConfigDict: it silently reused the first workdir's
  pretrained model, and a resume check blamed that field instead of the one changed."""
  import types  # pylint: disable=import-outside-toplevel
  from kswap_jax import methods  # pylint: disable=import-outside-toplevel
  from kswap_jax.methods import pretrain  # pylint: disable=import-outside-toplevel
  seen = []

  def filling_run(config, workdir):
    with config.unlocked():
      config.init.pretrain_workdir = os.path.join(workdir, "pretrain")
    seen.append(config.init.pretrain_workdir)
    return {}
  config = methods.default_config("lbf")
  monkeypatch.setattr(methods, "get", lambda name: types.SimpleNamespace(run=filling_run))
  monkeypatch.setattr(pretrain, "check_pretrained", lambda config, workdir: None)
  monkeypatch.setattr(methods, "check_sections", lambda config: None)
  config.init.kind = "pretrain"
  assert config.init.pretrain_workdir == ""
  for name in ("a", "b"):
    methods.run(config, str(tmp_path / name))
  assert seen == [str(tmp_path / "a" / "pretrain"), str(tmp_path / "b" / "pretrain")]
  assert config.init.pretrain_workdir == ""
  as_dict = config.to_dict()  # a plain dict is taken too
  methods.run(as_dict, str(tmp_path / "c"))
  assert seen[-1] == str(tmp_path / "c" / "pretrain") and as_dict == config.to_dict()


def test_workdir_that_is_a_file_is_named(tmp_path):
  from kswap_jax import train  # pylint: disable=import-outside-toplevel
  from kswap_jax.errors import ConfigError  # pylint: disable=import-outside-toplevel
  (tmp_path / "afile").write_text("x")
  with pytest.raises(ConfigError, match=r"^--workdir .*afile: a file; expected a folder"):
    train.prepare_workdir(str(tmp_path / "afile"))


def test_overrides_apply_to_the_last_config_file_wherever_they_stand():
  """absl reads an override only after a --config=, and failed on a second --config=
  followed by an override; the last file is the one used and every override applies to it,
  in absl's space and single-dash forms too. `sys.argv` is left as it was."""
  from kswap_jax import cli  # pylint: disable=import-outside-toplevel
  before = list(sys.argv)
  for argv in (["run.py", "--config.seed=3", "--config=configs/demo.py:runlocal"],
               ["run.py", "--config=configs/demo.py", "--config=configs/demo.py:runlocal",
                "--config.seed=3"],
               ["run.py", "--config.seed", "3", "--config", "configs/demo.py:runlocal",
                "--config.model.remat"],
               ["run.py", "--config.model.remat", "-config", "configs/demo.py:runlocal",
                "-config.seed=3"]):
    config, workdir = cli.load_config(argv)
    assert (config.seed, workdir, config.swap.forget_classes) == (3, "workdir/demo_runlocal",
                                                                   (4, 6)), argv
    assert config.model.remat == ("--config.model.remat" in argv)
    assert sys.argv == before
  assert cli.workdir_given(["run.py", "-workdir", "/tmp/x"])
  assert not cli.workdir_given(["run.py", "--config=configs/demo.py"])
  for argv, said in (
      (["run.py", "--workdir", "--config.seed=3"], r"^--workdir: expected a value"),
      # Given before --config (reordered for absl), a bare override is still named.
      (["run.py", "--config.seed", "--config=configs/demo.py:runlocal"],
       r"^--config\.seed: expected a value \(--config\.seed=VALUE\)$"),
      (["run.py", "--config.seed", "--config=configs/demo.py", "--workdir=/tmp/x"],
       r"^--config\.seed: expected a value"),
      # An empty value is a string field's right; the flag absl refused is named.
      (["run.py", "--config=configs/demo.py", "--config.init.pretrain_workdir=",
        "--config.seed=x"], r"^--config\.seed: cannot use 'x'")):
    with pytest.raises(cli.ConfigError, match=said):
      cli.load_config(argv)
    assert sys.argv == before


def test_a_repeated_tuple_override_keeps_its_last_value_as_any_other(caplog):
  """ml_collections would join a tuple field's repeated values ('learn:1', 'learn:2')."""
  from kswap_jax import cli  # pylint: disable=import-outside-toplevel
  argv = ["run.py", "--config=configs/ug_clu_digits.py:runlocal",
          "--config.clu.requests=('learn:1',)", "--config.clu.requests=('learn:2',)"]
  with caplog.at_level("WARNING", logger="kswap_jax.cli"):
    config, _ = cli.load_config(argv)
  assert config.clu.requests == ("learn:2",)
  assert [r.getMessage() for r in caplog.records] == [
      "warning: --config.clu.requests given 2 times (('learn:1',), ('learn:2',)); the last, "
      "('learn:2',), is used"]


def test_a_workdir_of_another_method_is_named_before_anything_else(tmp_path):
  from kswap_jax import methods  # pylint: disable=import-outside-toplevel
  from kswap_jax.errors import ConfigError  # pylint: disable=import-outside-toplevel
  from conftest import load_config  # pylint: disable=import-outside-toplevel
  (tmp_path / "config.json").write_text(json.dumps({"method": "gs_lora"}))
  with pytest.raises(ConfigError, match=r"holds a run of method 'gs_lora', not 'lbf'; use a "
                     r"new --workdir"):
    methods.run(load_config("demo", "runlocal"), str(tmp_path))


def test_a_run_stopped_by_a_non_finite_loss_leaves_no_empty_folders(tmp_path):
  """Nothing to resume: the checkpoint folder it made is removed, the logged lines stay."""
  from kswap_jax import methods  # pylint: disable=import-outside-toplevel
  from kswap_jax.errors import NonFiniteLossError  # pylint: disable=import-outside-toplevel
  from conftest import load_config  # pylint: disable=import-outside-toplevel
  config = load_config("demo", "runlocal")
  config.init.kind, config.optim.lr, config.ks.bound = "random", 1e30, 1e30
  with pytest.raises(NonFiniteLossError, match=r"stage 'learn', step \d+ .*loss is"):
    methods.run(config, str(tmp_path / "w"))
  left = sorted(os.listdir(tmp_path / "w"))
  assert left[1:] == ["metrics.jsonl"] and left[0].startswith("events.out.tfevents."), left


def test_config_prints_what_a_command_line_runs(capsys):
  """`python -m kswap_jax.config --config=FILE[:ARG] [overrides]`: the resolved config,
  checked as a run checks it; bad input is one line and exit 2."""
  from kswap_jax import config  # pylint: disable=import-outside-toplevel
  assert config.main(["--config=ug_clu_digits:runlocal", "--config.seed=4"]) == 0
  out = capsys.readouterr().out.splitlines()
  assert out[0].startswith("# python run.py --config=ug_clu_digits:runlocal") and \
      "(method=ug_clu)" in out[0]
  # Each field with the comment beside its default in the source, after "  # ".
  assert "clu.tasks = ((0, 1, 2), (3, 4, 5))  # default ((0, 1), (2, 3), (4, 5), (6, 7), " \
      "(8, 9)): [R] class-incremental split: tuple of tasks, each a tuple of class ids." \
      in out  # the file's value: the comment is the default's, and says so
  assert "# ga: GA: SGD lr 1e-4, 9 epochs on D_U, constant lr, raw gradient clipped at 0.1, " \
      "eval mode." in out  # a section's comment, on a line of its own
  lines = [line.split("  # ")[0] for line in out]
  assert "seed = 4" in lines and "model.name = 'resnet18_cifar'" in lines
  assert "learn.iterations = 6" in lines  # the file's runlocal value, not the default
  header = next(i for i, line in enumerate(lines) if line.startswith("# not read by ug_clu"))
  assert any(line.startswith("clu.") for line in lines[:header]) and \
      any(line.startswith("salun.") for line in lines[header:])  # the baselines' sections
  assert config.main(["--config=gs_lora_digits"]) == 0
  lines = [line.split("  # ")[0] for line in capsys.readouterr().out.splitlines()]
  header = next(i for i, line in enumerate(lines) if line.startswith("# not read by gs_lora"))
  sections = lambda part: {line.split(".")[0] for line in part
                           if " = " in line and not line.startswith("#")}
  assert {"gs_lora", "tasks", "lora", "data"} <= sections(lines[:header])
  assert not any(s.startswith("cf") for s in sections(lines[:header]))
  named = lines[header].split(": ")[-1].split(", ")  # whole sections, then single fields
  assert {"cf", "cf_ft", "cf_scrub_s", "gs_lora.prototype.bound"} <= set(named)
  below = [line.split(" = ")[0] for line in lines[header + 1:]
           if " = " in line and not line.startswith("#")]
  assert below and all(f in named or f.split(".")[0] in named for f in below)
  assert "gs_lora.bound = 105.0" in lines[:header]  # GS-LoRA's own, but not its prototypes':
  assert not any(line.startswith("gs_lora.prototype.") for line in lines[:header])
  for argv, said in ((["--config=demo", "--config.seed=-1"], "error: seed: expected an int"),
                     (["--config=demo", "--config.sed=1"], "error: --config.sed: "),
                     (["--config=demo", "--config.init.kind=npz"], "error: init.checkpoint: ")):
    assert config.main(argv) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith(said), err


def test_an_unquoted_comma_list_of_names_is_the_tuple_of_its_items(capsys):
  """`--config.swap.forget_classes=cat,dog` is ('cat', 'dog'), as `=1,2` is (1, 2): one
  spelling in the config, its record and a sweep (ml_collections kept ('cat,dog',)). A
  string field keeps its commas; a list Python cannot read names the quoted form."""
  from kswap_jax import config  # pylint: disable=import-outside-toplevel
  for value, want in (("cat,dog", "('cat', 'dog')"), ("(cat,5)", "('cat', 5)"),
                      ("1,2", "(1, 2)"), ("cat", "('cat',)")):
    assert config.main(["--config=demo", f"--config.swap.forget_classes={value}"]) == 0
    values = [line.split("  # ")[0] for line in capsys.readouterr().out.splitlines()]
    assert f"swap.forget_classes = {want}" in values
  for value, want in (("(cat,dog),(eel,)", "(('cat', 'dog'), ('eel',))"),  # a list of lists
                      ("((cat,dog),(eel,5))", "(('cat', 'dog'), ('eel', 5))"),
                      ("((cat,dog))", "(('cat', 'dog'),)"), ("((1,2),(3,))", "((1, 2), (3,))")):
    assert config.main(["--config=gs_lora_digits", f"--config.tasks.forget_classes={value}",
                        "--config.tasks.num_tasks=2"]) == 0
    values = [line.split("  # ")[0] for line in capsys.readouterr().out.splitlines()]
    assert f"tasks.forget_classes = {want}" in values, value
  assert config.main(["--config=ug_clu_digits", "--config.clu.lora_train=a,b"]) == 0
  assert "clu.lora_train = 'a,b'" in [
      line.split("  # ")[0] for line in capsys.readouterr().out.splitlines()]
  assert config.main(["--config=demo", "--config.swap.forget_classes=0_n014,1_n015"]) == 2
  assert capsys.readouterr().err.endswith(
      "(a tuple is written as Python, its strings quoted: --config.swap.forget_classes="
      "\"('0_n014','1_n015')\", quoted for the shell)\n")


@pytest.mark.parametrize("argv, said", [
    (["--config=demo", "--config.group_lasso.mode=lasso"], "group_lasso.mode: 'lasso'"),
    (["--config=demo", "--config.ks.forget_epochs=0"], "ks.forget_epochs: "),
    (["--config=demo", "--config.group_lasso.alpha=-1"],  # ran to the end before
     "group_lasso.alpha: expected a value >= 0, got -1.0"),
    (["--config=gs_lora_digits", "--config.gs_lora.ema_decay=2"], "gs_lora.ema_decay: "),
    (["--config=gs_lora_digits", "--config.gs_lora.beta=(0.1,0.2)"],  # 3 tasks: needed data
     "gs_lora.beta: expected one value for every task or one per task (3 tasks), got 2"),
    (["--config=gs_lora_digits:method=cf_scrub", "--config.cf.teacher=self"], "cf.teacher: "),
    (["--config=gs_lora_digits:method=cf_lirf", "--config.cf_lirf.split_blocks=99"],
     "cf_lirf.split_blocks: 99 (expected 1 .. "),
    (["--config=gs_lora_digits:method=cf_scrub_s", "--config.cf_scrub_s.max_epochs=0",
      "--config.cf_scrub_s.min_epochs=0"], "cf_scrub_s.max_epochs: "),
    (["--config=ug_clu_digits", "--config.clu.buffer_kind=fifo"], "clu.buffer_kind: 'fifo'"),
    (["--config=ug_clu_digits:method=clu_salun", "--config.salun.fraction=2"],
     "salun.fraction: "),
])
def test_config_printer_makes_each_methods_own_value_checks(argv, said, capsys):
  """Each family's `validate` runs in `methods.check`: the printer refuses a bad method
  value as a run would, before any data is read."""
  from kswap_jax import config  # pylint: disable=import-outside-toplevel
  assert config.main(argv) == 2
  out, err = capsys.readouterr()
  assert out == "" and err.startswith(f"error: {said}") and err.count("\n") == 1, err


def test_a_flag_given_twice_keeps_the_last_value_and_says_so(caplog):
  from kswap_jax import cli  # pylint: disable=import-outside-toplevel
  argv = ["run.py", "--config=configs/demo.py:runlocal", "--config.seed=1", "--workdir=/tmp/a",
          "--config.seed=2", "--workdir=/tmp/b", "--config.ks.beta=0.3", "--config.ks.beta=0.3"]
  with caplog.at_level("WARNING", logger="kswap_jax.cli"):
    config, workdir = cli.load_config(argv)
  assert (config.seed, workdir) == (2, "/tmp/b")
  warned = [r.getMessage() for r in caplog.records]
  assert warned == ["warning: --config.seed given 2 times (1, 2); the last, 2, is used",
                    "warning: --workdir given 2 times (/tmp/a, /tmp/b); the last, /tmp/b, "
                    "is used"]  # the same value twice is no surprise: no warning


def test_unwritable_workdir(runs):
  workdir, (proc,) = runs["unwritable_workdir"]
  _assert_clean_failure(proc, workdir, "--workdir", str(workdir))
  assert workdir.parent.is_file()


@pytest.mark.parametrize("module", ["cli", "compare"])
def test_help_prints_usage_and_exits_0(module, capsys):
  """`python run.py --help` and `python -m kswap_jax.compare --help` (their `main`)."""
  import importlib  # pylint: disable=import-outside-toplevel
  main = importlib.import_module(f"kswap_jax.{module}").main
  for flag in ("--help", "-h"):
    assert main(["prog", "--config=configs/demo.py:runlocal", flag]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage:" if module == "cli" else "One command") and "--workdir" in out
    assert "--config.FIELD=VALUE" in out and ("--methods" in out) == (module == "compare")


def test_config_listing_help_and_unknown_method(capsys):
  """`python -m kswap_jax.config --help` is usage (it was read as a method name)."""
  from kswap_jax import config  # pylint: disable=import-outside-toplevel
  assert config.main(["--help"]) == 0
  out = capsys.readouterr().out
  assert out.startswith("usage: python -m kswap_jax.config [METHOD ...] | --config=") and \
      "ug_clu" in out
  assert config.main(["bogus"]) == 2
  assert capsys.readouterr().err.startswith("error: method: unknown method 'bogus'")
  # Every name is checked before anything is listed; an option is not a method name.
  assert config.main(["lbf", "bogus"]) == 2
  out, err = capsys.readouterr()
  assert out == "" and err.startswith("error: method: unknown method 'bogus'")
  assert config.main(["gs_lora", "--foo"]) == 2
  assert capsys.readouterr().err.startswith("error: unknown option --foo")


@pytest.mark.parametrize("value", [-1.0, float("nan"), "x", True, float("inf")])
def test_a_loss_weight_must_be_a_number_at_least_zero(value):
  from kswap_jax.errors import ConfigError, require_nonnegative  # pylint: disable=import-outside-toplevel
  expected = ("a number" if value == "x" else "a finite value >= 0" if value == float("inf")
              else "a value >= 0")
  with pytest.raises(ConfigError, match=rf"^ks\.beta: expected {expected}, got "):
    require_nonnegative(value, "ks.beta")
  assert require_nonnegative(0, "ks.beta") == 0.0 and require_nonnegative(2.5, "x") == 2.5
  from kswap_jax.errors import require_number  # pylint: disable=import-outside-toplevel
  with pytest.raises(ConfigError, match=r"^n: expected a finite number, got inf$"):
    require_number(float("inf"), "n", int)  # int(inf) overflows: one line, not a traceback
