"""Shared fixtures: tiny model configs (depth 2, width 64) so every test is fast on CPU."""

import os

import atexit
import contextlib
import fcntl
import json
import shutil
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Subprocesses (the multi-device and multi-process checks, the CLI tests) import this
# checkout's kswap_jax, whatever is installed.
os.environ["PYTHONPATH"] = os.pathsep.join(
    [REPO] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
# One XLA compilation cache for the whole session, subprocesses included: the suite runs
# the same tiny programs many times (a method's reference, killed and resumed runs), and
# compiling them dominates its time on CPU (measured: gs_lora's three conformance tests
# 46 s -> 34 s cold). A fresh directory per session, so nothing leaks between runs;
# KSWAP_TEST_XLA_CACHE=<dir> keeps one across sessions.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  if os.environ.get("KSWAP_TEST_XLA_CACHE"):
    os.environ["JAX_COMPILATION_CACHE_DIR"] = os.environ["KSWAP_TEST_XLA_CACHE"]
  else:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="kswap_jax_xla_cache_")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")
# Compiling is a large share of the suite's time (one full run's compile log: 585 s of XLA
# compilation and 176 s of tracing and lowering in the two workers, which ran for about
# 1800 s together), and LLVM's expensive optimisation passes are over a third of a step's
# compile: the tests build XLA:CPU programs without them, as their subprocesses do (they
# inherit XLA_FLAGS). Measured: a GS-LoRA baseline's step compiles in 2.5 s instead of
# 3.9 s with bitwise the same losses, the bitwise-logits test still passes, and the full
# suite's busy time (both workers) went 1495 -> 1465 s in the same hour. LLVM's
# optimisation level 0 goes further: the GS-LoRA family's 8-device conformance subprocess
# compiled its 259 programs in 49 s instead of 74 s, that test (its 14 one-device runs
# included) took 152 s instead of 209 s, and the full suite 613-678 s instead of 784 s. The
# tiny models' time is in compilation, not in the code LLVM would optimise. Results then
# round differently from a user's process (losses in the 7th digit): bitwise comparisons
# are between programs the suite compiles alike, and a claim of bitwise equality with a
# reference program is tested under the user's flags (`users_xla_flags`). On CPU only (the
# device checks of `.ci/device` run the option tests on the GPU as users compile them). An
# XLA_FLAGS that names a flag wins.
# The flags before the suite's, kept in the environment for the xdist workers (they start
# with the controller's XLA_FLAGS, the suite's flags added).
os.environ.setdefault("KSWAP_TEST_USERS_XLA_FLAGS", os.environ.get("XLA_FLAGS", ""))
_USERS_XLA_FLAGS = os.environ["KSWAP_TEST_USERS_XLA_FLAGS"]
_SUITE_XLA_FLAGS = (os.environ["JAX_PLATFORMS"] == "cpu"
                    and not os.environ.get("KSWAP_TEST_UNDER_USERS_XLA_FLAGS"))
if _SUITE_XLA_FLAGS:
  for _flag in ("--xla_llvm_disable_expensive_passes=true",
                "--xla_backend_optimization_level=0"):
    if _flag.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
      os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), _flag]).strip()

import jax  # noqa: E402
import ml_collections  # noqa: E402
import pytest  # noqa: E402

from kswap_jax.models import vit  # noqa: E402



def tiny_model_config(num_classes=10, image_size=16, channels=3, variant="test/4"):
  return ml_collections.ConfigDict(dict(
      variant=variant, num_classes=num_classes, image_size=image_size, channels=channels,
      dropout=0.0, attention_dropout=0.0, attention_output_dropout=0.0, representation_size=0, width=0, depth=0,
      mlp_dim=0, num_heads=0))


@pytest.fixture(scope="session")
def tiny():
  """(model_cfg, model, params) of the 2-block, width-64 test ViT."""
  cfg = tiny_model_config()
  model = vit.build(cfg)
  params = vit.init_params(model, cfg, jax.random.key(0))
  return cfg, model, params


def load_config(name, arg=None):
  """`get_config(arg)` of configs/<name>.py, logging every step (`train.log_every_steps=1`)
  so that two runs' trajectories compare step by step."""
  import importlib.util  # pylint: disable=import-outside-toplevel
  spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "configs",
                                                                   f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(arg)
  config.train.log_every_steps = 1
  return config


@contextlib.contextmanager
def one_multidevice_process():
  """Held while a test's subprocess runs on several simulated devices (or processes): one
  at a time on this machine, whichever pytest worker starts it. Two at once on 2 cores can
  starve each other's collectives."""
  with open(os.path.join(tempfile.gettempdir(), "kswap_jax_multidevice_tests.lock"), "a") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def method_config(config_name, arg, shared_dir):
  """`load_config(config_name, arg)` for `method_run` and the runs that resume it: methods
  measured against a Retrain oracle share one per config file, trained once in
  `shared_dir` (as `python -m kswap_jax.compare` shares it; a method that finds another
  stream's oracle there fails, so sharing cannot hide a difference)."""
  config = load_config(config_name, arg)
  if "oracle" in config:
    config.oracle.workdir = os.path.join(shared_dir, f"oracle_{config_name}")
  return config


_METHOD_RUNS = {}


def method_run(tmp_path_factory, config_name, arg):
  """(workdir, results) of one uninterrupted run of `method_config(config_name, arg)`,
  made once per test session and shared by the tests that inspect it. It keeps every
  checkpoint (each stage's end is one), so a test can resume it from any stage."""
  from kswap_jax import methods  # pylint: disable=import-outside-toplevel
  key = (config_name, arg)
  if key not in _METHOD_RUNS:
    workdir = str(tmp_path_factory.mktemp(f"{config_name}_{arg}".replace(",", "_")
                                          .replace("=", "-")))
    config = method_config(config_name, arg, str(tmp_path_factory.getbasetemp()))
    config.train.max_checkpoints_to_keep = 1000
    _METHOD_RUNS[key] = (workdir, methods.run(config, workdir))
  return _METHOD_RUNS[key]


def resumable_copy(reference: str, workdir: str, step: int) -> int:
  """Copies the run in `reference` to `workdir` without its checkpoints from `step` on, as
  if it had been stopped there after its last checkpoint; returns that checkpoint's step
  (0: none left, a rerun starts from step 1)."""
  shutil.copytree(reference, workdir)
  checkpoints = os.path.join(workdir, "checkpoints")
  steps = sorted(int(d) for d in os.listdir(checkpoints) if d.isdigit())
  start = max((s for s in steps if s < step), default=0)
  for s in steps:
    if s > start:
      shutil.rmtree(os.path.join(checkpoints, str(s)))
  return start


# The files that take longest (minutes on 2 CPU cores), longest first. This is the order of
# an `-n 0` run. Under xdist it decides only ties: xdist hands out work units with the most
# tests first (its `--loadscope-reorder`, on by default). Handing out the longest units
# first instead, with the multi-device lock holders kept apart, measured slower (two
# orders, full runs of 904 and 880 s, against 804 and 868 s with xdist's order, same machine
# and day); runs on this machine vary by a minute or more.
_LONGEST_FIRST = ("test_conformance.py", "test_speed_options.py", "test_bad_input.py",
                  "test_devices.py", "test_end_to_end.py", "test_gs_lora.py")


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(_LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: order kept within


_USERS_FLAGS_OUTCOMES: dict[str, tuple[str, str]] = {}  # nodeid -> (outcome, skip reason)


def pytest_pyfunc_call(pyfuncitem):
  """A test marked `users_xla_flags` runs in a subprocess with the XLA flags a user's
  process has, not the suite's faster-compiling ones: all such tests of the session in one
  subprocess, at the first of them; each then reports its own outcome there (a skip as a
  skip, a test the subprocess never ran, or a subprocess that timed out, as a failure)."""
  if not pyfuncitem.get_closest_marker("users_xla_flags") or not _SUITE_XLA_FLAGS:
    return None
  if pyfuncitem.nodeid not in _USERS_FLAGS_OUTCOMES:
    ids = [item.nodeid for item in pyfuncitem.session.items
           if item.get_closest_marker("users_xla_flags")]
    with tempfile.TemporaryDirectory() as tmp:
      outcomes = os.path.join(tmp, "outcomes.jsonl")
      env = dict(os.environ, KSWAP_TEST_UNDER_USERS_XLA_FLAGS="1",
                 KSWAP_TEST_OUTCOMES=outcomes, XLA_FLAGS=_USERS_XLA_FLAGS)
      try:
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-n0", "-p",
                               "no:cacheprovider", *ids], cwd=pyfuncitem.config.rootpath,
                              env=env, capture_output=True, text=True,
                              timeout=float(os.environ.get("KSWAP_TEST_USERS_XLA_TIMEOUT",
                                                           600)))
        output = (f"exit code {proc.returncode}\n" + proc.stdout[-6000:]
                  + proc.stderr[-2000:])
      except subprocess.TimeoutExpired as e:
        stdout = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else e.stdout
        output = f"timed out after {e.timeout:g} s\n" + (stdout or "")[-6000:]
      if os.path.exists(outcomes):
        with open(outcomes) as f:
          for record in map(json.loads, f):
            if _USERS_FLAGS_OUTCOMES.get(record["nodeid"], ("passed",))[0] == "passed":
              _USERS_FLAGS_OUTCOMES[record["nodeid"]] = (record["outcome"], record["reason"])
    _USERS_FLAGS_OUTCOMES["output"] = ("", output)
    for nodeid in ids:
      _USERS_FLAGS_OUTCOMES.setdefault(nodeid, ("not run", ""))
  outcome, reason = _USERS_FLAGS_OUTCOMES[pyfuncitem.nodeid]
  if outcome == "skipped":
    pytest.skip(f"under the user's XLA flags: {reason}")
  assert outcome == "passed", (f"{outcome} under the user's XLA flags "
                               f"({_USERS_XLA_FLAGS or 'none'}):\n"
                               + _USERS_FLAGS_OUTCOMES["output"][1])
  return True


def pytest_runtest_logreport(report):
  """In the `users_xla_flags` subprocess: each test's outcome, for the suite's process."""
  path = os.environ.get("KSWAP_TEST_OUTCOMES")
  if not path or (report.when != "call" and report.passed):
    return
  reason = (report.longrepr[2].removeprefix("Skipped: ")
            if report.skipped and isinstance(report.longrepr, tuple) else "")
  with open(path, "a") as f:
    f.write(json.dumps({"nodeid": report.nodeid, "outcome": report.outcome,
                        "reason": reason}) + "\n")


# Units handed out before xdist's order (most tests first), one to each worker at the start.
# Both hold the multi-device lock for a long time, and under xdist's order they ran where it
# cost a worker: UG-CLU's 8-device check started while GS-LoRA's held the lock, and its
# worker waited 50-58 s for it (3 full runs of 3), and test_devices (3 tests, ~90 s) came
# last, so one worker ran on alone for 67-89 s. Started first (one full run): the 2-process
# test at 0-134 s, UG-CLU's check at 165-253 s, GS-LoRA's at 542-718 s; no wait.
_START_FIRST = ("tests/test_conformance.py::ug_clu_digits", "tests/test_devices.py")


def pytest_xdist_make_scheduler(config, log):
  """`--dist loadfile` (a file's tests in one worker, so module-scoped fixtures and
  `method_run` are made once), except for the conformance suite: its tests are
  parametrized by "<config file>/<method>" (the 8-device check by "<config file>"), and
  each config file's share is a unit of its own, so its three families spread over the
  workers. A scheduler of our own because xdist's `loadgroup` silently stops grouping
  under pytest 9.2 (pytest-xdist issue 1386)."""
  if config.getvalue("dist") != "loadfile":
    return None
  from xdist.scheduler import LoadFileScheduling  # pylint: disable=import-outside-toplevel

  class ConformanceByConfigFile(LoadFileScheduling):
    def _split_scope(self, nodeid: str) -> str:
      scope = super()._split_scope(nodeid)
      if scope.endswith("test_conformance.py") and nodeid.endswith("]"):
        return scope + "::" + nodeid[nodeid.rindex("[") + 1:-1].split("/")[0]
      return scope

    def _assign_work_unit(self, node) -> None:
      for scope in self.workqueue:  # the first unit of _START_FIRST still waiting
        if scope.endswith(_START_FIRST):
          self.workqueue.move_to_end(scope, last=False)
          break
      super()._assign_work_unit(node)
  return ConformanceByConfigFile(config, log)


@pytest.hookimpl(tryfirst=True)
def pytest_sessionfinish(session):
  """On an xdist worker, after its last test: freeze the heap for the garbage collector.

  Once the last worker reports its end, xdist gives each worker 5 s to finish (execnet's
  gateway), then sends it SIGINT. The remaining work was pytest's final garbage collections
  (5 passes over ~1.2 M objects, ~1.1 s each, each also running jax's collector hook): in
  4 of 10 full runs here the SIGINT arrived inside jax's hook and the run ended with an
  ignored `KeyboardInterrupt` traceback (in a CI log too), and the controller
  waited ~11 s for its workers. Frozen objects are not scanned again; the process is about
  to exit, so nothing is left uncollected that matters."""
  del session
  if os.environ.get("PYTEST_XDIST_WORKER"):
    import gc  # pylint: disable=import-outside-toplevel
    gc.freeze()
