"""The method conformance suite: every registered method passes the same checks on a tiny
config (the shape of optax's shared optimizer tests).

For each entry of `CASES` (method name -> how to build its tiny config, a step to kill it
at, and which trainable leaves it may have):

  - it runs end to end through `methods.run` (every step under `jax.jit` via
    `train.make_train_step`) and writes the shared results envelope, complete;
  - killed at a step in the middle and rerun with the same command, it ends with the same
    stages and final metrics as the uninterrupted run (so it is deterministic for a seed
    and resumes exactly); the killed run starts from the uninterrupted run's checkpoint at
    the start of the stage it is killed in;
  - its checkpointed trainable tree holds only the leaves it may train;
  - resumed on 8 simulated devices at the start of its own stage (same global batch), it
    logs the same losses, step by step, as on 1 (data parallelism changes nothing but
    speed).

Methods measured against a Retrain oracle share one per config file (`conftest.method_config`).
A new method joins by adding one entry to `CASES`.
"""

import json
import math
import os
import re
import subprocess
import sys

import jax
import pytest

from conftest import method_config, method_run, one_multidevice_process, resumable_copy
from kswap_jax import checkpoint as ckpt_lib
from kswap_jax import methods

pytestmark = pytest.mark.slow

HERE = os.path.dirname(os.path.abspath(__file__))

# name -> (config file, config arg, debug.interrupt_at_step for the kill, trainable regex)
CASES = {
    "pretrain": ("demo", "runlocal,method=pretrain", 10, r".*"),
    "lbf": ("demo", "runlocal", 40, r".*/(a|b)"),           # in the forget stage
    "laf": ("demo", "runlocal,method=laf", 45, r".*/(a|b)"),  # in the learn stage
    # 4 tasks x 6 steps: step 8 is inside task 2.
    "gs_lora": ("gs_lora_casia100", "runlocal", 8, r".*/(a|b)"),
    "gs_lora_pp": ("gs_lora_casia100", "runlocal,method=gs_lora_pp", 8, r".*/(a|b)"),
    "sfr_on": ("ug_clu_digits", "runlocal,method=sfr_on", 16, r".*"),  # masked, mid-forget
    "ug_clu": ("ug_clu_digits", "runlocal", 16, r".*"),                  # masked, mid-forget
    "clu_joint": ("ug_clu_digits", "runlocal,method=clu_joint", 15, r".*"),  # mid-forget
    "clu_retrain": ("ug_clu_digits", "runlocal,method=clu_retrain", 9, r".*"),  # 2nd oracle
    # Unlearning baselines: steps 13-18 are the first unlearning stage; the kill at 17
    # resumes from the checkpoint at 16, inside it (SalUn's mask comes back restored).
    "clu_ft": ("ug_clu_digits", "runlocal,method=clu_ft", 17, r".*"),
    "clu_ga": ("ug_clu_digits", "runlocal,method=clu_ga", 17, r".*"),
    "clu_rl": ("ug_clu_digits", "runlocal,method=clu_rl", 17, r".*"),
    "clu_salun": ("ug_clu_digits", "runlocal,method=clu_salun", 17, r".*"),
    "clu_l1_sparse": ("ug_clu_digits", "runlocal,method=clu_l1_sparse", 17, r".*"),
    # Continual-forgetting baselines: 2 tasks; everything but the frozen head trains
    # (Retrain: a fresh model, head included). Batch 24: replay ("*") methods 3 + 2 steps,
    # a checkpoint at step 4 inside task 2 with the task-1 and task-2 anchors/importances
    # in the carry, killed at 5; retain-only 2 + 2 (killed at 3, resumed from the task-1
    # end); forget-epoch methods 1 + 1; SCRUB 3 + 3 (killed at 5, resumed inside task 2).
    **{f"cf_{m}": ("gs_lora_casia100", f"runlocal,method=cf_{m}", kill, trainable)
       for m, kill, trainable in (
           ("retrain", 3, r".*"), ("ft", 3, r"(?!head/).*"), ("l2", 5, r"(?!head/).*"),
           ("ewc", 5, r"(?!head/).*"), ("mas", 5, r"(?!head/).*"), ("lwf", 2, r"(?!head/).*"),
           ("der", 2, r"(?!head/).*"), ("der_pp", 2, r"(?!head/).*"),
           ("fdr", 2, r"(?!head/).*"), ("scrub", 5, r"(?!head/).*"),
           ("scrub_s", 5, r"(?!head/).*"),
           # LIRF: the lower half of the 2-block test ViT only.
           ("lirf", 2, r"embedding/.*|cls|Transformer/(posembed_input|encoderblock_0)/.*"))},
}


def _cases(names):
  """The cases as parameters with ids "<config file>/<method>": the test scheduler
  (`conftest.pytest_xdist_make_scheduler`) gives each config file's tests to one worker,
  which runs its methods and then checks them on 8 devices, reusing the runs it made."""
  return [pytest.param(n, id=f"{CASES[n][0]}/{n}") for n in names]


CONFIG_FILES = sorted({case[0] for case in CASES.values()})


def test_every_registered_method_has_a_conformance_case():
  assert set(CASES) == set(methods.METHODS)


def _numbers(d: dict):
  for v in d.values():
    if isinstance(v, (int, float)) and not isinstance(v, bool):
      yield v


@pytest.mark.parametrize("name", _cases(sorted(CASES)))
def test_results_envelope_is_complete(name, tmp_path_factory):
  workdir, results = method_run(tmp_path_factory, *CASES[name][:2])
  assert results["method"] == name
  assert results["config"]["method"] == name
  assert results["stages"] and all(s.get("name") for s in results["stages"])
  assert results["final"] and all(math.isfinite(v) for v in _numbers(results["final"]))
  assert results["wall_seconds"] > 0
  assert os.path.exists(os.path.join(workdir, "results.json"))


def _deterministic(stages: list[dict]) -> list[dict]:
  """Stages without their wall-clock times ("seconds"), the one thing a rerun may change."""
  return [{k: v for k, v in s.items() if k != "seconds"} for s in stages]


@pytest.mark.parametrize("name", _cases(sorted(CASES)))
def test_kill_and_rerun_gives_the_same_results(name, tmp_path_factory, tmp_path):
  """Killed in the stage that holds its kill step, then rerun: the results of the run that
  was never killed. The killed run starts where the uninterrupted one began that stage (a
  copy of it without its later checkpoints: the earlier stages are not run again)."""
  config_name, arg, interrupt, _ = CASES[name]
  reference_dir, reference = method_run(tmp_path_factory, config_name, arg)
  shared = str(tmp_path_factory.getbasetemp())
  workdir = str(tmp_path / "killed")
  resumable_copy(reference_dir, workdir, interrupt)
  config = method_config(config_name, arg, shared)
  config.debug.interrupt_at_step = interrupt
  config.train.checkpoint_every_steps = 4  # resume from the middle of a stage
  with pytest.raises(SystemExit, match="interrupt_at_step"):
    methods.run(config, workdir)
  assert not os.path.exists(os.path.join(workdir, "results.json"))
  resumed = methods.run(method_config(config_name, arg, shared), workdir)
  assert _deterministic(resumed["stages"]) == _deterministic(reference["stages"])
  assert resumed["final"] == reference["final"]


@pytest.mark.parametrize("name", _cases(sorted(CASES)))
def test_trains_only_the_leaves_it_may(name, tmp_path_factory):
  workdir, _ = method_run(tmp_path_factory, *CASES[name][:2])
  checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"))
  metadata = checkpointer.manager.item_metadata(checkpointer.manager.latest_step())["state"]
  checkpointer.close()
  names = [jax.tree_util.keystr(p, simple=True, separator="/")
           for p, _ in jax.tree_util.tree_flatten_with_path(metadata["params"])[0]]
  pattern = re.compile(CASES[name][3])
  assert names and all(pattern.fullmatch(n) for n in names), names[:5]


def _losses(workdir) -> dict:
  """{(stage, step): {name: value}} of the training records (those with a `*loss` field)."""
  out = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for record in map(json.loads, f):
      losses = {k: v for k, v in record.items() if k.endswith("loss")}
      if losses:
        out[(record["stage"], record["step"])] = losses
  return out


@pytest.mark.parametrize("config_file", CONFIG_FILES)
def test_every_method_trains_identically_on_1_and_8_devices(config_file, tmp_path_factory,
                                                            tmp_path):
  """Data parallelism changes nothing but speed. Each method's run above, resumed on 8
  simulated devices from the start of the stage that holds its kill step (the stage that is
  the method's own: the unlearning baselines' first unlearning stage, UG-CLU's masked
  forgetting, the second GS-LoRA task, ...), logs the same losses, step by step, as it did
  on 1 device, for at least 3 steps or to its end.

  Last in this file, one test per config file, so that the 1-device runs are the ones the
  tests above made (the test scheduler keeps a config file's tests in one worker); the
  8-device runs of a config file's methods share one subprocess.
  """
  names = sorted(n for n, case in CASES.items() if case[0] == config_file)
  spec = {"out": str(tmp_path), "shared": str(tmp_path_factory.getbasetemp()), "methods": {
      name: {"config": CASES[name][:2], "kill": CASES[name][2],
             "reference": method_run(tmp_path_factory, *CASES[name][:2])[0]}
      for name in names}}
  with one_multidevice_process():
    proc = subprocess.run([sys.executable, os.path.join(HERE, "multidevice_check.py"),
                           json.dumps(spec)], capture_output=True, text=True, timeout=900,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 0, proc.stderr[-3000:]
  runs = json.loads(proc.stdout.strip().splitlines()[-1])
  assert names and set(runs) == set(names)
  for name, case in spec["methods"].items():
    start = runs[name]["resumed_from"]
    want = {k: v for k, v in _losses(case["reference"]).items() if k[1] > start}
    got = {k: v for k, v in _losses(tmp_path / name).items() if k[1] > start}
    # The steps after the resumed one, at least 3 of them (or all there are).
    assert got and list(got) == list(want)[:len(got)], (name, list(got), list(want))
    assert len(got) >= min(3, len(want)), (name, list(got), list(want))
    for key, losses in got.items():
      assert losses.keys() == want[key].keys(), (name, key)
      for k, v in losses.items():
        assert v == pytest.approx(want[key][k], rel=1e-5, abs=1e-6), (name, key, k, v, want[key])
