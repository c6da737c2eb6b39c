"""End-to-end runs of every method on tiny configs, and the kill-and-resume guarantee."""

import json
import os
import shutil

import jax
import numpy as np
import pytest

from conftest import load_config as _config
from conftest import method_run
from kswap_jax import cli, methods
from kswap_jax.errors import ConfigError

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def lbf_run(tmp_path_factory):
  """The uninterrupted runlocal LBF run of the demo config (pretrain + learn + forget),
  shared with the conformance suite."""
  return method_run(tmp_path_factory, "demo", "runlocal")


def test_lbf_writes_results_metrics_plot_and_checkpoints(lbf_run):
  workdir, results = lbf_run
  on_disk = json.load(open(os.path.join(workdir, "results.json")))
  assert on_disk["method"] == "lbf" and on_disk["final"] == results["final"]
  assert [s["name"] for s in on_disk["stages"]] == ["before", "learn", "forget"]
  assert set(on_disk["final"]) == {"acc_r", "acc_f", "acc_n", "h_mean"}
  assert on_disk["config"]["swap"]["learn_classes"] == [8, 9]
  # Before the swap the learn rows are random: Acc_n is ~0 (here: exactly what chance gives).
  assert on_disk["stages"][0]["acc_n"] < 50
  lines = [json.loads(x) for x in open(os.path.join(workdir, "metrics.jsonl"))]
  assert {x["stage"] for x in lines} == {"learn", "forget"}
  steps = [x["step"] for x in lines]
  assert steps == sorted(steps) and len(set(steps)) == len(steps)
  assert all(len(x["group_norms"]) == 2 and "learning_rate" in x for x in lines)
  # The knock-on profiles at every logged step; the last one of a stage is its end.
  for key in ("block_n", "block_delta_w", "block_grad_abs"):
    assert all(len(x[key]) == 2 for x in lines), key
  assert all(min(x["block_grad_abs"]) > 0 for x in lines)
  for stage in ("learn", "forget"):
    last = [x for x in lines if x["stage"] == stage][-1]
    ends = on_disk["block_norms"][stage]
    np.testing.assert_allclose(last["block_n"], list(ends["sum_frobenius"].values()),
                               atol=2e-6)
    np.testing.assert_allclose(last["block_delta_w"], list(ends["delta_w"].values()),
                               atol=2e-6)
  # The masked arg-max (an extra): over the 10 rows in use, never below the 16-row rule,
  # whose true class is always among those rows.
  masked = on_disk["masked_argmax"]
  assert masked["rows"] == 10 and [s["name"] for s in masked["stages"]] == \
      ["before", "learn", "forget"]
  for plain, restricted in zip(on_disk["stages"], masked["stages"]):
    assert all(restricted[k] >= plain[k] for k in ("acc_r", "acc_f", "acc_n")), restricted
  assert masked["final"] == {k: masked["stages"][-1][k] for k in ("acc_r", "acc_f", "acc_n")}
  assert any(m["acc_r"] > p["acc_r"] for p, m in zip(on_disk["stages"], masked["stages"]))
  first = [x for x in lines if x["stage"] == "learn"][0]
  assert max(first["block_delta_w"]) < max(last["block_delta_w"])  # ΔW grows from 0
  # The learning side's harmonic mean (an extra): the gain in Acc_n against Acc_r.
  gain = on_disk["final"]["acc_n"] - on_disk["stages"][0]["acc_n"]
  r = on_disk["final"]["acc_r"]
  assert on_disk["h_mean_learn"] == pytest.approx(2 * gain * r / (gain + r + 1e-8))
  for name in ("lora_norms.png", "block_profiles.png", "lora_learn.npz", "lora_forget.npz", "merged_params.npz",
               "config.json", "pretrain/params.npz", "pretrain/results.json"):
    assert os.path.exists(os.path.join(workdir, name)), name
  assert os.listdir(os.path.join(workdir, "checkpoints"))
  # LoRA moved during the run; the learn-stage norms differ from the forget-stage ones.
  norms = on_disk["block_norms"]
  assert norms["learn"]["delta_w"] != norms["forget"]["delta_w"]
  assert all(v > 0 for v in norms["forget"]["delta_w"].values())


def test_a_run_s_lora_over_its_rebuilt_base_is_its_merged_model(lbf_run, tmp_path):
  """`knowledge_swap.run_base` rebuilds the frozen base (with the head's random new rows)
  from the workdir: merged with the run's final LoRA it is `merged_params.npz`, bitwise."""
  from kswap_jax import checkpoint, interop, lora  # pylint: disable=import-outside-toplevel
  from kswap_jax.methods import knowledge_swap  # pylint: disable=import-outside-toplevel
  workdir, _ = lbf_run
  model, base, spec = knowledge_swap.run_base(workdir)
  tree = interop.load_lora(os.path.join(workdir, "lora_forget.npz"))
  merged = lora.merge(base, tree, spec.scale)
  saved = checkpoint.load_npz(os.path.join(workdir, "merged_params.npz"),
                              jax.eval_shape(lambda: merged), head="keep")
  jax.tree_util.tree_map(np.testing.assert_array_equal, merged, saved)
  model_cfg = json.load(open(os.path.join(workdir, "config.json")))["model"]
  images = jax.random.normal(jax.random.key(0), (3, model_cfg["image_size"],
                                                 model_cfg["image_size"], model_cfg["channels"]))
  np.testing.assert_allclose(lora.apply(model, base, tree, images, scale=spec.scale),
                             model.apply({"params": saved}, images), atol=1e-4)
  # The pretraining run's workdir records the swap's config it served: still refused.
  pretrained = os.path.join(workdir, "pretrain")  # init.pretrain_workdir's default
  assert json.load(open(os.path.join(pretrained, "config.json")))["method"] == "lbf"
  unfinished = tmp_path / "unfinished"  # no results.json yet: its metrics say so
  shutil.copytree(pretrained, unfinished, ignore=shutil.ignore_patterns("results.json"))
  for folder in (pretrained, unfinished):
    with pytest.raises(ConfigError, match="the pretraining run of a Knowledge Swapping run"):
      knowledge_swap.run_base(str(folder))


def test_kill_in_pretraining_then_in_the_swap_resumes_to_identical_results(lbf_run, tmp_path):
  reference = lbf_run[1]
  workdir = str(tmp_path / "resumed")
  # Killed in the pretraining run (step 10 of 32), then in the swap's forget stage (step 40
  # of 56): each rerun of the same command resumes from the newest checkpoint.
  for interrupt in (10, 40):
    config = _config("demo", "runlocal")
    config.train.checkpoint_every_steps = 4
    config.debug.interrupt_at_step = interrupt
    with pytest.raises(SystemExit, match="interrupt_at_step"):
      cli.dispatch(config, workdir)
    assert not os.path.exists(os.path.join(workdir, "results.json"))
  resumed = cli.dispatch(_config("demo", "runlocal"), workdir)
  assert resumed["final"] == reference["final"]
  assert resumed["stages"] == reference["stages"]
  lines = [json.loads(x) for x in open(os.path.join(workdir, "metrics.jsonl"))]
  steps = [x["step"] for x in lines]
  assert steps == sorted(steps) and len(set(steps)) == len(steps)  # nothing logged twice
  ref = np.load(os.path.join(lbf_run[0], "lora_forget.npz"))
  got = np.load(os.path.join(workdir, "lora_forget.npz"))
  for k in ref.files:
    np.testing.assert_array_equal(got[k], ref[k])


def test_laf_runs_forget_then_learn(lbf_run, tmp_path):
  workdir = str(tmp_path / "laf")
  shutil.copytree(os.path.join(lbf_run[0], "pretrain"), os.path.join(workdir, "pretrain"))
  results = cli.dispatch(_config("demo", "runlocal,method=laf"), workdir)
  assert [s["name"] for s in results["stages"]] == ["before", "forget", "learn"]
  # Same pretrained model and seed: the before-swap evaluation is identical to LBF's.
  assert results["stages"][0] == lbf_run[1]["stages"][0]


def test_pretrain_method(tmp_path):
  results = cli.dispatch(_config("demo", "runlocal,method=pretrain"), str(tmp_path))
  assert results["method"] == "pretrain" and 0 <= results["final"]["acc"] <= 100
  with np.load(tmp_path / "params.npz") as f:
    assert f["head/kernel"].shape == (64, 8)  # the old classes only


def test_paper_config_runlocal_on_synthetic_data(tmp_path):
  results = cli.dispatch(_config("ks_imagenet100", "runlocal"), str(tmp_path))
  assert results["final"]["acc_r"] >= 0 and len(results["stages"]) == 3
  assert results["prediction_rule"] == "argmax over all 40 head rows"


def test_proximal_group_lasso_mode_runs(lbf_run, tmp_path):
  workdir = str(tmp_path / "prox")
  shutil.copytree(os.path.join(lbf_run[0], "pretrain"), os.path.join(workdir, "pretrain"))
  config = _config("demo", "runlocal")
  config.group_lasso.mode = "proximal"
  config.group_lasso.alpha = 100.0  # threshold lr*alpha = 1 per step: groups hit exactly 0
  results = cli.dispatch(config, workdir)
  lines = [json.loads(x) for x in open(os.path.join(workdir, "metrics.jsonl"))]
  assert min(min(x["group_norms"]) for x in lines) == 0.0
  assert len(results["stages"]) == 3


def test_scanned_encoder_run_matches_the_unrolled_one(lbf_run, tmp_path):
  """`model.scan` changes the compiled program, not the method: the same evaluation before
  training (the pretrained weights through the scanned encoder), the same first loss up to
  the dropout masks (nn.scan splits the keys per layer) and LoRA trees and merged weights
  written in the checkpoint layout (encoderblock_{i})."""
  workdir, results = lbf_run
  scan_dir = tmp_path / "scan"
  shutil.copytree(os.path.join(workdir, "pretrain"), scan_dir / "pretrain")
  config = _config("demo", "runlocal")
  config.model.scan = True
  scanned = methods.run(config, str(scan_dir))
  assert scanned["stages"][0] == results["stages"][0]  # "before": no training, no dropout
  read = lambda d: [json.loads(x) for x in open(os.path.join(d, "metrics.jsonl"))]
  ref, got = read(workdir), read(scan_dir)
  assert [x["step"] for x in got] == [x["step"] for x in ref]
  # Step 1's loss is computed from the same weights: only the dropout masks differ there
  # (measured: 3.1 % apart on this batch of 32); later the trajectories drift apart as any
  # two dropout draws do.
  assert ref[0]["step"] == got[0]["step"] == 1
  assert abs(ref[0]["loss"] - got[0]["loss"]) <= 0.05 * abs(ref[0]["loss"])
  assert all(np.isfinite(x["loss"]) for x in got)
  for name in ("lora_forget.npz", "merged_params.npz"):
    with np.load(scan_dir / name) as got_npz, np.load(os.path.join(workdir, name)) as ref_npz:
      assert {k: got_npz[k].shape for k in got_npz.files} == \
          {k: ref_npz[k].shape for k in ref_npz.files}, name


def test_ctrl_c_stops_a_run_after_a_checkpoint_and_the_rerun_resumes_there_and_stops_on_sigterm(
    tmp_path):
  """SIGINT to `python run.py` (as Ctrl-C sends it to the process group) while it trains:
  the run stops at its next training step after a checkpoint there, exit 130, one line
  naming the step and how to resume, no traceback and no crash at exit. The same command
  then resumes from exactly that step (nothing trained is lost), and SIGTERM stops it the
  same way."""
  import re, signal, subprocess, sys  # pylint: disable=import-outside-toplevel,multiple-imports
  from conftest import REPO  # pylint: disable=import-outside-toplevel
  command = [sys.executable, "run.py", "--config=configs/demo.py:runlocal",
             f"--workdir={tmp_path / 'run'}", "--config.train.log_every_steps=1",
             "--config.train.checkpoint_every_steps=1000"]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, env=env, start_new_session=True)
  seen = []
  try:
    for line in proc.stdout:
      seen.append(line)
      if "[pretrain] epoch 1/2 iteration 3/" in line:  # training, a few steps in
        os.killpg(proc.pid, signal.SIGINT)
        break
    out = "".join(seen) + proc.communicate(timeout=120)[0]
  finally:
    if proc.poll() is None:
      os.killpg(proc.pid, signal.SIGKILL)
  final = r"^interrupted: \[pretrain\] stopped at step (\d+) on a stop request; " \
          r"its checkpoint is written; rerun the same command to resume from it$"
  stopped = re.search(final, out.rstrip().splitlines()[-1])
  assert proc.returncode == 130 and stopped and "Traceback" not in out, out[-3000:]
  assert "Ctrl-C: the run stops at its next training step" in out, out[-3000:]
  first_stop = int(stopped.group(1))
  assert first_stop >= 3
  # The rerun gets SIGTERM once it says where it resumed (`kill`, a scheduler's or a spot
  # VM's notice): it stops at its next training step after a checkpoint there, exit 130.
  # (Resumed runs finishing are tested elsewhere; this saves the suite the rest of the demo.)
  rerun = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True)
  seen, resumed = [], None
  try:
    for line in rerun.stdout:
      seen.append(line)
      resumed = re.search(r"resumed from \S+/pretrain/checkpoints at step (\d+)", line)
      if resumed or "iteration" in line:  # resumed, or training without having resumed
        break
    assert resumed and int(resumed.group(1)) == first_stop, "".join(seen)[-3000:]
    rerun.send_signal(signal.SIGTERM)
    out = "".join(seen) + rerun.communicate(timeout=120)[0]
  finally:
    if rerun.poll() is None:
      os.killpg(rerun.pid, signal.SIGKILL)
      rerun.communicate(timeout=60)
  stopped = re.search(final, out.rstrip().splitlines()[-1])
  assert rerun.returncode == 130 and stopped and "Traceback" not in out, out[-3000:]
  step = int(stopped.group(1))
  assert step > int(resumed.group(1))
  assert str(step) in os.listdir(tmp_path / "run" / "pretrain" / "checkpoints")
