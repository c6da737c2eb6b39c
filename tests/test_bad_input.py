"""Bad input through `run.py`: exit code 2, one `error:` line on stderr, no result written.

Every case runs the real command line in a subprocess with the `:runlocal` demo (the
`test/4` ViT on bundled digits). One valid run (the positive control) pretrains once; the
cases that get past data validation reuse its `pretrain/params.npz` so that they do not
pretrain again. The bad-input runs are independent, so they run two at a time.
"""

import concurrent.futures
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
# The positive control: valid input runs to the end.

@pytest.fixture(scope="module")
def control(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("control") / "run"
  return workdir, _run(workdir)


@pytest.fixture(scope="module")
def params_npz(control):
  workdir, proc = control
  path = workdir / "pretrain" / "params.npz"
  if proc.returncode != 0 or not path.is_file():
    pytest.fail(f"positive control failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
  return path


def test_valid_input_exits_zero_and_writes_results(control):
  workdir, proc = control
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "error:" not in proc.stderr
  with open(workdir / "results.json") as f:
    results = json.load(f)
  assert results["method"] == "lbf"
  assert [s["name"] for s in results["stages"]] == ["before", "learn", "forget"]
  assert set(results["final"]) >= {"acc_r", "acc_f", "acc_n", "h_mean"}
  assert (workdir / "pretrain" / "params.npz").is_file()


# ----------------------------------------------------------------------------------------------
# Single-command cases: (flags, strings the error line must contain, needs pretrained params).

_CASES = {
    "retain_overlaps_forget": (
        ["--config.swap.retain_classes=(1,2,3)"], ["swap.retain_classes"], False),
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
    "lora_rank_not_an_int": (["--config.lora.rank=abc"], ["lora.rank"], False),
    "unknown_data_kind": (["--config.data.old.kind=nope"], ["data.old.kind", "nope"], False),
    "tfds_kind_without_name": (["--config.data.old.kind=tfds"], ["data.old.name"], False),
    "unknown_model_variant": (["--config.model.variant=Q/16"], ["model.variant", "Q/16"], False),
    "unknown_method_override": (["--config.method=nope"], ["method", "nope"], False),
    "unknown_method_config_arg": (
        ["--config=configs/demo.py:method=nope"], ["method", "nope"], False),
    "unknown_config_arg_key": (["--config=configs/demo.py:bogus=1"], ["bogus"], False),
    "unknown_override_field": (["--config.nope=1"], ["--config.nope"], False),
    "missing_config_file": (
        ["--config=configs/no_such_config.py"], ["configs/no_such_config.py"], False),
    "missing_npz_checkpoint": (
        ["--config.init.kind=npz", "--config.init.checkpoint={tmp}/missing.npz"],
        ["init.checkpoint", "{tmp}/missing.npz"], False),
    "npz_checkpoint_not_an_npz": (
        ["--config.init.kind=npz", "--config.init.checkpoint={tmp}/garbage.npz"],
        ["init.checkpoint", "{tmp}/garbage.npz"], False),
    "npz_checkpoint_wrong_shape": (
        ["--config.init.kind=npz", "--config.init.checkpoint={tmp}/wrong_shape.npz"],
        ["init.checkpoint", _MLP_KERNEL], False),
    "tfds_dataset_not_prepared": (
        ["--config={tmp}/tfds_config.py:runlocal"], ["data.old.name", "tfds build"], False),
}


def _write_inputs(tmp, params_npz):
  """The bad files the cases point at."""
  (tmp / "garbage.npz").write_text("not an npz archive\n")
  with np.load(params_npz) as f:
    params = {k: f[k] for k in f.files}
  assert params[_MLP_KERNEL].shape[-1] != 7
  params[_MLP_KERNEL] = np.zeros(params[_MLP_KERNEL].shape[:-1] + (7,), np.float32)
  np.savez(tmp / "wrong_shape.npz", **params)
  (tmp / "tfds_config.py").write_text(
      "import importlib.util\n\n\n"
      "def get_config(arg=None):\n"
      f"  spec = importlib.util.spec_from_file_location('demo', {str(_REPO / 'configs' / 'demo.py')!r})\n"
      "  demo = importlib.util.module_from_spec(spec)\n"
      "  spec.loader.exec_module(demo)\n"
      "  c = demo.get_config(arg)\n"
      "  c.data.old = dict(kind='tfds', name='kswap_no_such_dataset',\n"
      f"                    data_dir={str(tmp / 'tfds_data')!r})\n"
      "  return c\n")


def _single_case(name, tmp, params_npz):
  flags, names, needs_pretrain = _CASES[name]
  workdir = tmp / name
  if needs_pretrain:
    _copy_pretrain(workdir, params_npz)
  flags = [f.format(tmp=tmp) for f in flags]
  config = [f for f in flags if f.startswith("--config=")]
  flags = [f for f in flags if not f.startswith("--config=")]
  proc = _run(workdir, *flags, config=config[0] if config else _RUNLOCAL)
  return workdir, [proc]


# ----------------------------------------------------------------------------------------------
# Multi-command cases.

def _resume_with_other_lora_rank(tmp, params_npz):
  """Interrupted run (checkpoint at step 3), then the same workdir with lora.rank=4."""
  workdir = tmp / "resume_other_rank"
  _copy_pretrain(workdir, params_npz)
  first = _run(workdir, "--config.debug.interrupt_at_step=3",
               "--config.train.checkpoint_every_steps=1")
  second = _run(workdir, "--config.lora.rank=4")
  return workdir, [first, second]


def _orbax_checkpoint_of_other_rank(tmp, params_npz):
  """As above, but config.json is gone: the orbax restore itself must catch the shapes."""
  workdir = tmp / "orbax_other_rank"
  _copy_pretrain(workdir, params_npz)
  first = _run(workdir, "--config.debug.interrupt_at_step=3",
               "--config.train.checkpoint_every_steps=1")
  os.remove(workdir / "config.json")
  second = _run(workdir, "--config.lora.rank=4")
  return workdir, [first, second]


def _rerun_after_bad_input(tmp, params_npz):
  """A failed run must not lock its workdir to the bad config."""
  del params_npz
  workdir = tmp / "rerun_after_bad_input"
  first = _run(workdir, "--config.swap.retain_classes=(1,2,3)")
  second = _run(workdir, "--config.swap.learn_classes=(7,8)")
  return workdir, [first, second]


def _lora_rank_zero_fresh_workdir(tmp, params_npz):
  """No pretrained params yet: the bad LoRA config must be caught before pretraining."""
  del params_npz
  workdir = tmp / "lora_rank_zero_fresh"
  return workdir, [_run(workdir, "--config.lora.rank=0")]


def _unwritable_workdir(tmp, params_npz):
  del params_npz
  (tmp / "afile").write_text("a regular file, not a directory\n")
  workdir = tmp / "afile" / "sub"
  return workdir, [_run(workdir)]


_JOBS = {
    "resume_other_rank": _resume_with_other_lora_rank,
    "orbax_other_rank": _orbax_checkpoint_of_other_rank,
    "rerun_after_bad_input": _rerun_after_bad_input,
    "lora_rank_zero_fresh": _lora_rank_zero_fresh_workdir,
    "unwritable_workdir": _unwritable_workdir,
}


@pytest.fixture(scope="module")
def bad_runs(tmp_path_factory, params_npz):
  """{case: (workdir, [CompletedProcess, ...])} for every case, run two at a time."""
  tmp = tmp_path_factory.mktemp("bad")
  _write_inputs(tmp, params_npz)
  import time
  def timed(n, f):
    t = time.time(); r = f(); print(f"TIME {n} {time.time()-t:.1f}", flush=True); return r
  jobs = {name: (lambda n=name: _single_case(n, tmp, params_npz)) for name in _CASES}
  jobs.update({name: (lambda f=fn: f(tmp, params_npz)) for name, fn in _JOBS.items()})
  # Long jobs first so that they overlap with the many short ones.
  order = list(_JOBS) + list(_CASES)
  with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
    t0=time.time(); futures = {name: pool.submit(timed, name, jobs[name]) for name in order}
    out = {name: future.result() for name, future in futures.items()}
  print('POOL', time.time()-t0); return out


@pytest.mark.parametrize("case", sorted(_CASES))
def test_bad_input_exits_2_with_one_line(bad_runs, case):
  workdir, (proc,) = bad_runs[case]
  tmp = workdir.parent
  names = [n.format(tmp=tmp) for n in _CASES[case][1]]
  _assert_clean_failure(proc, workdir, *names)


def test_resume_with_different_lora_rank_names_the_field(bad_runs):
  workdir, (first, second) = bad_runs["resume_other_rank"]
  assert first.returncode not in (0, 2), first.stderr[-3000:]
  assert (workdir / "checkpoints" / "3").is_dir(), os.listdir(workdir / "checkpoints")
  _assert_clean_failure(second, workdir, "lora.rank", "--workdir")


def test_orbax_checkpoint_with_other_shapes_exits_2_with_one_line(bad_runs):
  workdir, (first, second) = bad_runs["orbax_other_rank"]
  assert first.returncode not in (0, 2), first.stderr[-3000:]
  _assert_clean_failure(second, workdir, "checkpoints")


def test_failed_run_does_not_lock_its_workdir(bad_runs):
  workdir, (first, second) = bad_runs["rerun_after_bad_input"]
  _assert_clean_failure(first, workdir, "swap.retain_classes")
  # The second bad input is reported as itself, not as a change of the workdir's config.
  _assert_clean_failure(second, workdir, "swap.learn_classes")
  assert second.stderr.startswith("error: swap.learn_classes"), second.stderr


def test_bad_lora_config_fails_before_pretraining(bad_runs):
  workdir, (proc,) = bad_runs["lora_rank_zero_fresh"]
  _assert_clean_failure(proc, workdir, "lora.rank")
  assert not (workdir / "pretrain" / "params.npz").exists()


def test_unwritable_workdir(bad_runs):
  workdir, (proc,) = bad_runs["unwritable_workdir"]
  _assert_clean_failure(proc, workdir, "--workdir", str(workdir))
  assert workdir.parent.is_file()
