"""SFR-on / UG-CLU method: request plan, the two reductions, bad input, a fused stage.

The tiny end-to-end runs of every method (and the kill/resume in the middle of a masked
stage) are in tests/test_conformance.py; the runs here reuse its session-scoped runs.
"""

import json
import math
import os
import shutil

import jax
import numpy as np
import pytest

from conftest import REPO, load_config, method_run
from kswap_jax import cli, losses, methods, metrics, models, report
from kswap_jax.data import sources
from kswap_jax.errors import ConfigError
from kswap_jax.methods import common, ug_clu

DIGITS = os.path.join(REPO, "configs", "ug_clu_digits.py")


def _plan(requests, labels, tasks, initial=(), seed=0):
  reqs = ug_clu.parse_requests(requests, len(tasks))
  return ug_clu.plan_stages(labels, tasks, reqs, initial,
                            ug_clu.random_permutation(len(labels), seed))


def test_random_requests_are_sequential_chunks_of_the_saved_permutation():
  labels = np.arange(100) % 10
  perm = ug_clu.random_permutation(100, 0)
  plans = _plan(("learn:1", "forget:random:0.1", "forget:random:0.1", "forget:random:5"),
                labels, (tuple(range(10)),))
  np.testing.assert_array_equal(plans[1].forget, np.sort(perm[:10]))   # random_idx[:10 %]
  np.testing.assert_array_equal(plans[2].forget, np.sort(perm[10:19]))  # 10 % of the 90 kept
  np.testing.assert_array_equal(plans[3].forget, np.sort(perm[19:24]))  # a count
  assert plans[3].kept_after.size == 76 and plans[3].retain.size == 76
  chunks = np.concatenate([p.forget for p in plans[1:]])
  assert np.unique(chunks).size == chunks.size  # never overlap


def test_cifar10_random_split_bookkeeping():
  labels = np.arange(50_000) % 10
  (plan,) = _plan(("forget:random:0.1",), labels, (tuple(range(10)),), initial=(0,))
  assert plan.forget.size == 5_000 and plan.retain.size == 45_000
  assert np.intersect1d(plan.forget, plan.retain).size == 0


def test_task_and_cross_task_class_requests_and_a_fused_stage():
  labels = np.arange(60) % 6
  plans = _plan(("learn:1", "learn:2", "forget:task:1", "learn:3+forget:class:2"), labels,
                ((0, 1), (2, 3), (4, 5)))
  assert [p.name for p in plans] == ["1_learn", "2_learn", "3_forget", "4_learn+forget"]
  np.testing.assert_array_equal(plans[2].forget, np.flatnonzero(labels < 2))
  assert plans[2].removed_classes == (0, 1) and plans[2].known_classes == (2, 3)
  fused = plans[3]
  np.testing.assert_array_equal(fused.forget, np.flatnonzero(labels == 2))
  np.testing.assert_array_equal(fused.retain, np.flatnonzero(labels == 3))
  np.testing.assert_array_equal(fused.learn, np.flatnonzero(labels >= 4))
  assert fused.known_classes == (3, 4, 5) and fused.learned_tasks == (0, 1, 2)


@pytest.mark.parametrize("requests, match", [
    (("learn:1", "forget:class:3"), r"class\(es\) \[3\] never learned"),
    (("learn:1", "forget:task:2"), "task 2, which was never learned"),
    (("learn:1", "learn:2", "forget:class:0", "forget:class:0,2"), r"\[0\] never learned"),
    (("learn:1", "forget:random:0.001"), "forget set is empty"),
    (("learn:1", "learn:1"), "already learned"),
    (("learn:4",), r"not in 1\.\.3"),
    (("learn:1", "forget:task:1"), "nothing to retain"),
    (("learn:1", "forget:cls:1"), "cannot parse"),
    (("learn:1", "forget:class:1,1"), "class 1 is listed twice"),
])
def test_bad_requests_name_the_entry(requests, match):
  with pytest.raises(ConfigError, match=rf"clu\.requests\[\d\]: .*{match}"):
    _plan(requests, np.arange(60) % 6, ((0, 1), (2, 3), (4, 5)))


def test_replay_buffer_is_class_balanced_and_seeded():
  labels = np.repeat(np.arange(4), [50, 30, 10, 40])
  idx = np.flatnonzero(labels != 3)
  buf = ug_clu.replay_buffer(labels, idx, 30, seed=1)
  np.testing.assert_array_equal(np.bincount(labels[buf], minlength=4), [10, 10, 10, 0])
  np.testing.assert_array_equal(buf, ug_clu.replay_buffer(labels, idx, 30, seed=1))
  assert np.all(np.isin(buf, idx))
  np.testing.assert_array_equal(ug_clu.replay_buffer(labels, idx, 0, seed=1), idx)


_STREAM = ("learn:1", "learn:2", "forget:class:1", "learn:3", "forget:random:0.2")


def test_persistent_replay_memory_never_reads_old_data_again():
  labels = np.repeat(np.arange(6), 30)
  plans = _plan(_STREAM, labels, ((0, 1), (2, 3), (4, 5)))
  buffers = ug_clu.replay_buffers(labels, plans, 20, seed=3)
  counts = [np.bincount(labels[buffers[p.index]], minlength=6).tolist() for p in plans]
  # 20 // 2 per class after task 1; 20 // 4 after task 2, then class 1 removed and its
  # slots left free (its data is gone, the other classes' data outside the memory too);
  # 20 // 5 after task 3, then the random request's samples leave the memory.
  assert counts[:4] == [[0] * 6, [10, 10, 0, 0, 0, 0], [5, 0, 5, 5, 0, 0], [5, 0, 5, 5, 0, 0]]
  assert all(c <= 4 for c in counts[4]) and sum(counts[4]) < 20
  for prev, p in zip(plans, plans[1:]):
    # Only what the memory held or the previous stage learned: old data is not re-read.
    assert np.all(np.isin(buffers[p.index], np.union1d(buffers[prev.index], prev.learn)))
    assert np.all(np.isin(buffers[p.index], p.retain))  # nothing forgotten is replayed
  np.testing.assert_array_equal(buffers[4], ug_clu.replay_buffers(labels, plans, 20, 3)[4])
  # resample draws every stage afresh from all of D_R: the same class counts need not be
  # a subset of the previous buffer.
  fresh = ug_clu.replay_buffers(labels, plans, 20, 3, kind="resample")
  assert not np.all(np.isin(fresh[3], np.union1d(fresh[2], plans[2].learn)))
  assert np.bincount(labels[fresh[2]], minlength=6).tolist() == [6, 0, 6, 6, 0, 0]
  full = ug_clu.replay_buffers(labels, plans, 0, 3)
  assert all(np.array_equal(full[p.index], p.retain) for p in plans)


def test_persistent_memory_starts_with_the_tasks_the_init_weights_know():
  labels = np.repeat(np.arange(6), 30)
  plans = _plan(("forget:class:0", "learn:3"), labels, ((0, 1), (2, 3), (4, 5)),
                initial=(0, 1))  # 0-based here
  buffers = ug_clu.replay_buffers(labels, plans, 40, seed=0)
  # Four classes known at the start: 10 each, class 0 then forgotten.
  assert np.bincount(labels[buffers[0]], minlength=6).tolist() == [0, 10, 10, 10, 0, 0]
  assert np.bincount(labels[buffers[1]], minlength=6).tolist() == [0, 10, 10, 10, 0, 0]


@pytest.mark.parametrize("override, field", [
    ("--config.clu.requests=('learn:1','forget:class:9')", "clu.requests[1]"),
    ("--config.clu.requests=('learn:1','forget:random:0.0001')", "clu.requests[1]"),
    ("--config.unlearn.gamma=0", "unlearn.gamma"),
    ("--config.unlearn.gamma=-1", "unlearn.gamma"),
    ("--config.unlearn.forget_every=0", "unlearn.forget_every"),
    ("--config.clu.params=bogus", "clu.params"),
    ("--config.clu.params=lora", "lora.targets"),  # the ResNet has no FFN kernel
    ("--config.clu.random_seed=-1", "clu.random_seed"),
    ("--config.data.old.seed=-1", "data.old.seed"),
])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path, capsys, monkeypatch,
                                                            override, field):
  workdir = tmp_path / "run"
  argv = ["run.py", f"--config={DIGITS}:runlocal", f"--workdir={workdir}", override]
  code = cli.main(argv)
  err = capsys.readouterr().err.strip()
  assert code == 2 and len(err.splitlines()) == 1 and field in err, err
  assert not workdir.exists()


@pytest.mark.parametrize("case", ["a_file", "another_oracle"])
def test_unusable_oracle_workdir_fails_before_any_stage_trains(tmp_path, capsys, monkeypatch,
                                                                case):
  """The oracle trains after the learning stages; its folder (a path under a file, or the
  unfinished oracle of another config) is checked before them, and the failed run records
  no config and leaves no empty checkpoint folder, so the same workdir takes a corrected
  path."""
  if case == "a_file":
    (tmp_path / "a_file").write_text("")
    oracle_dir, message = tmp_path / "a_file" / "oracle", "not a writable folder"
  else:
    other = ug_clu.oracle_config(load_config("ug_clu_digits", "runlocal"))
    other.learn.lr = 0.5
    oracle_dir, message = tmp_path / "oracle", "holds the oracle of another stream"
    oracle_dir.mkdir()
    (oracle_dir / "config.json").write_text(other.to_json_best_effort())
  workdir = tmp_path / "run"
  argv = ["run.py", f"--config={DIGITS}:runlocal", f"--workdir={workdir}",
          f"--config.oracle.workdir={oracle_dir}"]
  code = cli.main(argv)
  err = capsys.readouterr().err.strip()
  assert code == 2 and err.startswith("error: oracle.workdir ") and message in err, err
  assert not (workdir / "config.json").exists() and not (workdir / "checkpoints").exists()
  assert not (workdir / "random_idx.npy").exists()


@pytest.mark.parametrize("method", ["sfr_on", "clu_rl"])
def test_methods_without_fused_stages_refuse_one(method):
  """SFR-on and the unlearning baselines take no fused learn+forget stage (D_L = ∅)."""
  config = load_config("ug_clu_digits", f"runlocal,method={method}")
  config.clu.requests = ("learn:1", "learn:2+forget:class:1")
  with pytest.raises(ConfigError, match=rf"clu\.requests\[1\]: .*{method} takes no fused"):
    methods.run(config, "/nonexistent/never/written")


@pytest.mark.slow
def test_without_new_data_ug_clu_is_sfr_on(tmp_path_factory):
  """D_L = ∅ at every unlearning stage: UG-CLU's mask and loop are SFR-on's, exactly."""
  _, a = method_run(tmp_path_factory, "ug_clu_digits", "runlocal")
  _, b = method_run(tmp_path_factory, "ug_clu_digits", "runlocal,method=sfr_on")
  assert [s["name"] for s in a["stages"]] == ["1_learn", "2_learn", "3_forget", "4_forget"]
  assert a["stages"] == b["stages"] and a["final"] == b["final"]
  for s in a["stages"][2:]:
    assert 0.0 < s["mask_kept_fraction"] < 1.0 and math.isfinite(s["avg_gap"])
    assert set(s["oracle"]) >= {"ua", "ra", "ta", "mia_efficacy"}
  matrix = a["acc_matrix"]
  assert matrix["tasks"] == [1, 2] and len(matrix["raw"]) == 2
  assert "bwt" in a["final"] and "forgetting_max" in a["final"]
  assert matrix["random_init"] == matrix["before"]  # a random start is FWT's baseline


@pytest.mark.slow
def test_fwt_baseline_is_a_random_model_also_when_the_run_starts_trained(tmp_path):
  # GEM's b_i is a randomly initialised model's accuracy on task i; a pretrained start
  # knows the tasks already, so it cannot serve.
  config = load_config("ug_clu_digits", "runlocal,method=sfr_on")
  config.init.kind = "pretrain"
  config.pretrain.epochs = 12
  config.oracle.enabled = False
  results = methods.run(config, str(tmp_path / "w"))
  matrix = results["acc_matrix"]
  assert matrix["random_init"] != matrix["before"]
  assert max(matrix["before"]) > 50 > max(matrix["random_init"])  # trained vs chance-level
  order = [t - 1 for t in matrix["tasks"]]
  want = metrics.fwt(np.asarray(matrix["raw"]), [matrix["random_init"][t] for t in order])
  assert results["final"]["fwt"] == pytest.approx(want)


@pytest.mark.slow
def test_report_shows_the_oracle_table_and_plots_as_the_run(tmp_path_factory, tmp_path, capsys):
  workdir, results = method_run(tmp_path_factory, "ug_clu_digits", "runlocal")
  shutil.copy(os.path.join(workdir, "results.json"), tmp_path)
  capsys.readouterr()  # the run's own output, when it ran in this test
  assert report.main([str(tmp_path)]) == 0
  out, plots = capsys.readouterr().out.rstrip("\n").rsplit("\n", 1)
  assert plots.startswith("plots: ") and plots.endswith(f" (in {tmp_path})")
  head, oracle = out.split("\n\nRetrain oracle (")
  finals = [line for line in head.splitlines() if line.startswith("final: ")]
  assert len(finals) == 1 and finals[0].startswith("final: UA ")
  assert head.splitlines()[-1].startswith(" " * len("final: "))  # the wrapped rest
  assert max(map(len, head.splitlines())) <= report.FINAL_WIDTH
  rows = oracle.splitlines()
  assert rows[0] == f"{results['oracle_workdir']})" and rows[1].split() == [
      "stage", "UA", "RA", "TA", "MIA"]
  for row, stage in zip(rows[2:], results["stages"][2:], strict=True):
    o = stage["oracle"]
    assert row.split() == [stage["name"]] + [f"{o[k]:.2f}" for k in ("ua", "ra", "ta",
                                                                       "mia_efficacy")]
  assert sorted(p.name for p in tmp_path.glob("*.png")) == [
      "acc_matrix.png", "stages.png", "stages_vs_oracle.png"]


@pytest.mark.slow
def test_without_forget_data_a_stage_is_replay_fine_tuning(tmp_path):
  """D_U = ∅: the losses of every step equal a hand-written SGD loop (momentum 0.9,
  coupled weight decay, cosine over the stage, a fresh buffer per stage, BatchNorm in
  train mode) on the same batches of D_R ∪ D_L."""
  config = load_config("ug_clu_digits", "runlocal")
  config.clu.requests = ("learn:1", "learn:2")
  config.train.log_every_steps = 1
  assert config.oracle.enabled and config.oracle.stages == "unlearn"
  results = methods.run(config, str(tmp_path))
  # No stage to compare with the oracle: none trained, no folder made for it.
  assert not (tmp_path / "oracle").exists() and "oracle_workdir" not in results
  with open(tmp_path / "metrics.jsonl") as f:
    logged = [json.loads(line)["loss"] for line in f if '"loss"' in line]

  model_cfg = common.model_config(config)
  model = models.build(model_cfg)
  variables = models.init_variables(model, model_cfg, jax.random.key(config.seed))
  params, ms = variables.pop("params"), variables
  train_src = sources.load_source(config.data.old, "train")
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ("data",))
  lc = config.learn

  @jax.jit
  def grad(params, ms, b):
    def loss(p):
      logits, new = model.apply({"params": p, **ms}, b["image"], train=True, mask=b["mask"],
                                mutable=["batch_stats"])
      return losses.cross_entropy(logits, b["label"], b["mask"]), new
    (value, new), g = jax.value_and_grad(loss, has_aux=True)(params)
    return value, g, new

  expected = []
  plans = _plan(config.clu.requests, np.asarray(train_src.labels), config.clu.tasks)
  for k, plan in enumerate(plans):
    stream = common.make_stream(config, [ug_clu._subset(train_src, plan.kept_after, "x")],
                                batch_size=lc.batch_size, field="f", cycle=True, mesh=mesh,
                                seed=config.seed + 1000 * (k + 1) + 0)
    total, buf = lc.iterations, None
    for t, batch in zip(range(total), stream.iterate(0)):
      value, g, ms = grad(params, ms, batch)
      expected.append(float(value))
      d = jax.tree_util.tree_map(lambda gi, p: gi + lc.weight_decay * p, g, params)
      buf = d if buf is None else jax.tree_util.tree_map(
          lambda b, x: lc.momentum * b + x, buf, d)
      lr = lc.lr * 0.5 * (1 + math.cos(math.pi * t / total))
      params = jax.tree_util.tree_map(lambda p, b: p - lr * b, params, buf)
  np.testing.assert_allclose(logged, expected, rtol=2e-4)


@pytest.mark.slow
@pytest.mark.parametrize("variant, slow_batches, learn_lambda", [("B", "mixed", 0.0),
                                                                 ("A", "substeps", 0.5)])
def test_fused_stage_with_a_buffer_and_a_task_request(tmp_path, variant, slow_batches,
                                                      learn_lambda):
  config = load_config("ug_clu_digits", "runlocal")
  config.clu.tasks = ((0, 1, 2), (3, 4, 5), (6, 7))
  config.clu.requests = ("learn:1", "learn:2", "learn:3+forget:task:1")
  config.clu.variant = variant
  config.clu.slow_batches = slow_batches
  config.clu.learn_lambda = learn_lambda
  config.clu.buffer_size = 60
  config.clu.partition_weights = "data_share"
  config.train.log_every_steps = 1
  results = methods.run(config, str(tmp_path))
  with open(tmp_path / "metrics.jsonl") as f:
    fused_lines = [json.loads(x) for x in f if '"3_learn+forget"' in x]
  # Sub-steps per iteration: B = FAST (forget + learn batches) + SLOW; A-substeps = FAST +
  # SLOW on D_L + SLOW on D_R, the schedules spanning 2T slow steps.
  keys = set().union(*fused_lines)
  assert ("slow_learn/loss" in keys) == (slow_batches == "substeps")
  assert ("fast/ce_learn" in keys) == (variant == "B")
  assert fused_lines[-1]["eta_next"] == pytest.approx(0.0, abs=1e-9)
  fused = results["stages"][-1]
  assert fused["name"] == "3_learn+forget" and fused["request"] == "learn:3+forget:task:1"
  for key in ("ua", "ra", "ta", "mia_efficacy", "mia_member_rate_entropy_logreg",
              "acc_learn_test", "acc_forget_test", "avg_gap", "js_to_retrain",
              "kl_to_retrain", "mask_kept_fraction"):
    assert math.isfinite(fused[key]), key
  assert fused["task_acc_kept"][0] is None  # task 1 is forgotten entirely
  # The persistent memory: 20 per class of task 1, then 10 per class of tasks 1-2, of
  # which task 1's leave with the request (resample would draw 20 per class of task 2).
  assert results["replay_sizes"] == {"1_learn": 0, "2_learn": 60, "3_learn+forget": 30}
  for png in ("acc_matrix.png", "stages_vs_oracle.png", "stages.png"):
    assert os.path.getsize(tmp_path / png) > 0
  assert os.path.exists(tmp_path / "oracle" / "results.json")
  np.testing.assert_array_equal(np.load(tmp_path / "random_idx.npy"),
                                ug_clu.random_permutation(len(np.load(
                                    tmp_path / "random_idx.npy")), 0))


def test_accuracy_matrix_rows_are_the_model_before_the_next_task():
  plans = _plan(("learn:1", "learn:2", "forget:class:1", "learn:3"), np.arange(60) % 6,
                ((0, 1), (2, 3), (4, 5)))
  rows = [[80.0, 10.0, 5.0], [85.0, 90.0, 7.0], [70.0, 91.0, 8.0], [60.0, 75.0, 88.0]]
  records = [{"task_acc": r} for r in rows]
  order, raw = ug_clu.accuracy_matrix(records, plans, {"task_acc": [1, 2, 3]}, ())
  assert order == [0, 1, 2]
  assert raw == [rows[0], rows[2], rows[3]]  # the unlearning stage ends task 2's row
  m = ug_clu.cl_measures(order, raw, [10.0, 10.0, 10.0])
  assert m["bwt"] == pytest.approx(((60 - 80) + (75 - 91)) / 2)
  assert m["fwt"] == pytest.approx(((10 - 10) + (8 - 10)) / 2)
  assert m["forgetting_max"] == pytest.approx(((80 - 60) + (91 - 75)) / 2)
  assert ug_clu.cl_measures(order, [[1.0, None, 2.0]] * 3, [0, 0, 0]) == {}
  # The average incremental accuracy weighs by test samples when the sizes are given:
  # A_2 = (70·100 + 91·300) / 400, not (70 + 91) / 2.
  equal = m["cl_avg_incremental_acc"]
  weighted = ug_clu.cl_measures(order, raw, [10.0] * 3, test_sizes=[100, 300, 100])
  a2, a3 = (70 * 100 + 91 * 300) / 400, (60 * 100 + 75 * 300 + 88 * 100) / 500
  assert weighted["cl_avg_incremental_acc"] == pytest.approx((80 + a2 + a3) / 3)
  assert equal == pytest.approx((80 + (70 + 91) / 2 + (60 + 75 + 88) / 3) / 3)


def test_clu_joint_clips_its_summed_step_and_sfr_on_its_fast_step_only():
  # The reference's `joint` clips the summed gradient at its fast step's bound; SFR-on's
  # SLOW step is never clipped.
  from kswap_jax.optim import fast_slow  # pylint: disable=import-outside-toplevel
  config = methods.default_config("clu_joint")
  config.unlearn.weight_decay = 0.0
  params, grads = {"w": np.zeros(4, np.float32)}, {"w": np.full(4, 100.0, np.float32)}
  lr, bound = float(config.unlearn.lr), float(config.unlearn.max_norm)
  for joint, slow_norm in ((True, lr * bound), (False, lr * 200.0)):
    tx = ug_clu._unlearn_tx(config, 10, joint=joint)
    update, _ = tx.update(grads, tx.init(params), params, phase=fast_slow.SLOW)
    assert float(np.linalg.norm(update["w"])) == pytest.approx(slow_norm, rel=1e-5), joint
  fast, _ = ug_clu._unlearn_tx(config, 10).update(grads, tx.init(params), params,
                                                  phase=fast_slow.FAST)
  assert float(np.linalg.norm(fast["w"])) == pytest.approx(lr * bound, rel=1e-5)


@pytest.mark.slow
def test_an_oracle_trained_in_the_run_s_process_trains_as_one_trained_alone(tmp_path,
                                                                            caplog):
  """The run and its oracle share one process's compiled steps. A learning stage and an
  oracle stage of equal length but different epoch sizes take different per-epoch cosine
  schedules, so they must not share a compiled step: the oracle trained inside the run
  (after the run's learning stage compiled its step) gives the losses of the oracle
  trained alone."""
  config = load_config("ug_clu_digits", "runlocal")
  config.clu.requests = ("learn:1", "forget:class:1")
  config.learn.schedule_unit = "epoch"
  train_src = sources.load_source(config.data.old, "train")
  plans = _plan(config.clu.requests, np.asarray(train_src.labels), config.clu.tasks)
  per_epoch = lambda n: math.ceil(n / int(config.learn.batch_size))
  learn_epoch, oracle_epoch = per_epoch(plans[0].learn.size), per_epoch(plans[1].kept_after.size)
  assert learn_epoch != oracle_epoch
  # Equal lengths (learn_epoch * oracle_epoch iterations), different epoch sizes.
  config.learn.iterations = config.oracle.iterations = 0
  config.learn.epochs, config.oracle.epochs = oracle_epoch, learn_epoch
  config.train.log_every_steps = 1
  config.train.checkpoint_every_steps = 0

  def losses_of(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      return [json.loads(line)["loss"] for line in f if '"loss"' in line]
  ug_clu._CACHE.clear()
  with caplog.at_level("INFO", logger="kswap_jax"):
    methods.run(config, str(tmp_path / "run"))
  # The oracle's lines are labelled (its stages have the run's names), the run's are not.
  lines = [r.getMessage() for r in caplog.records]
  start = lines.index(f"training the Retrain oracle in {tmp_path / 'run' / 'oracle'}")
  end = lines.index("the Retrain oracle is trained; back to ug_clu")
  assert all(line.startswith("oracle: ") for line in lines[start + 1:end])
  assert any(line.startswith("oracle: [2_forget] epoch") for line in lines[start + 1:end])
  assert not any(line.startswith("oracle: ") for line in lines[:start] + lines[end:])
  ug_clu._CACHE.clear()
  methods.run(ug_clu.oracle_config(config), str(tmp_path / "alone"))
  inside, alone = losses_of(tmp_path / "run" / "oracle"), losses_of(tmp_path / "alone")
  assert len(alone) == learn_epoch * oracle_epoch
  np.testing.assert_array_equal(inside, alone)


@pytest.mark.slow
def test_a_stop_while_the_oracle_trains_inside_the_run_keeps_the_stage(tmp_path, monkeypatch,
                                                                         tmp_path_factory):
  """The oracle trains lazily, between an unlearning stage's training and its checkpoint:
  a stop request honoured in the oracle's run must not lose that stage. The rerun ends
  with the uninterrupted run's results."""
  from kswap_jax import checkpoint  # pylint: disable=import-outside-toplevel
  from kswap_jax.errors import StopRequested  # pylint: disable=import-outside-toplevel
  _, whole = method_run(tmp_path_factory, "ug_clu_digits", "runlocal")
  inner = ug_clu._oracle

  def oracle_stopped(config, oracle_dir):
    checkpoint.STOP.set()  # as if it arrived while the oracle was starting
    return inner(config, oracle_dir)
  monkeypatch.setattr(ug_clu, "_oracle", oracle_stopped)
  config = load_config("ug_clu_digits", "runlocal")
  try:
    with pytest.raises(StopRequested, match=r"^the Retrain oracle \(.*\): \[3_forget\] stopped "
                       r"at step 1 .*; 3_forget's training is checkpointed too$"):
      methods.run(config, str(tmp_path))
  finally:
    checkpoint.STOP.clear()
  monkeypatch.setattr(ug_clu, "_oracle", inner)
  with open(tmp_path / "metrics.jsonl") as f:
    trained = [json.loads(x)["step"] for x in f if '"3_forget"' in x]
  # The stage's last step is checkpointed (before the fix: only the periodic ones).
  saved = [int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit()]
  assert max(saved) == trained[-1], (saved, trained)
  with open(tmp_path / "checkpoints" / str(max(saved)) / "meta" / "metadata") as f:
    trained_seconds = json.load(f)["stopped_clocks"]["3_forget"]
  resumed = methods.run(load_config("ug_clu_digits", "runlocal"), str(tmp_path))
  drop = lambda stages: [{k: v for k, v in s.items() if k != "seconds"} for s in stages]
  assert drop(resumed["stages"]) == drop(whole["stages"])
  # The stage's training time as saved before the oracle, not a clock that ran on.
  assert resumed["timing_seconds"]["3_forget"] == trained_seconds > 0


def test_the_retrain_oracle_resumes_whatever_its_unlearn_section_says(tmp_path):
  """clu_retrain never unlearns (`FIELDS_UNREAD`: unlearn.*), so its unused unlearning
  optimizer slot is built from the defaults: a run stopped and resumed with another
  unlearn.base (adamw has other state than sgd) restores, and finishes as one that ran
  through."""
  config = load_config("ug_clu_digits", "runlocal,method=clu_retrain")
  config.oracle.enabled = False
  whole = methods.run(config, str(tmp_path / "whole"))
  config.train.checkpoint_every_steps = config.debug.interrupt_at_step = 3
  with pytest.raises(SystemExit, match="interrupt_at_step"):
    methods.run(config, str(tmp_path / "stopped"))
  config.debug.interrupt_at_step, config.unlearn.base = 0, "adamw"
  resumed = methods.run(config, str(tmp_path / "stopped"))
  assert resumed["final"] == whole["final"]


@pytest.mark.parametrize("tasks", [(0, 1, 2, 3, 4), ("0,1", (2, 3), (4, 5), 6, (7,))])
def test_clu_tasks_must_be_a_tuple_of_tuples(tasks, tmp_path):
  """A flat tuple is not read as one-class tasks (it was refused before class names)."""
  config = load_config("ug_clu_digits", "runlocal")
  config.clu.tasks = tasks
  with pytest.raises(ConfigError, match=r"^clu\.tasks: expected a tuple of tuples of class "
                                        r"ids or names \(one per task\), got "):
    methods.run(config, str(tmp_path / "run"), dry_run=True)


@pytest.mark.slow
def test_periodic_evaluation_and_the_exported_model(tmp_path):
  """`eval.every_steps` logs a stage's accuracies while it trains (the evaluation at its
  last iteration is the stage's own ra/ta/ua: the same model) and changes no training
  step; `merged_params.npz` is the final model: a run that starts from it measures, before
  training, the per-task accuracies the first run ended with."""
  config = load_config("ug_clu_digits", "runlocal,method=sfr_on")
  config.oracle.enabled = False
  config.eval.every_steps = 3  # stages of 6 iterations: evaluated after 3 and 6
  first = methods.run(config, str(tmp_path / "a"))
  lines = [json.loads(x) for x in open(tmp_path / "a" / "metrics.jsonl")]
  evals = {}
  for line in lines:
    if "eval" in line:
      evals.setdefault(line["stage"], []).append(line["eval"])
  assert list(evals) == [s["name"] for s in first["stages"]]
  for stage in first["stages"]:
    assert len(evals[stage["name"]]) == 2
    last = evals[stage["name"]][-1]
    keys = ("ra", "ta", "ua") if "ua" in stage else ("ra", "ta")
    assert "ua" in last if "ua" in stage else "ua" not in last
    assert {k: last[k] for k in keys} == {k: stage[k] for k in keys}
  config.eval.every_steps = 0
  plain = methods.run(config, str(tmp_path / "b"))
  losses_of = lambda d: [x["loss"] for x in map(json.loads, open(tmp_path / d / "metrics.jsonl"))
                         if "loss" in x]
  assert losses_of("a") == losses_of("b") and first["stages"] == plain["stages"]

  export = tmp_path / "a" / "merged_params.npz"
  assert export.exists() and (tmp_path / "a" / "merged_params.model_state.npz").exists()
  again = load_config("ug_clu_digits", "runlocal,method=sfr_on")
  again.oracle.enabled = False
  again.init.kind, again.init.checkpoint, again.init.head = "npz", str(export), "keep"
  resumed = methods.run(again, str(tmp_path / "c"))
  assert resumed["acc_matrix"]["before"] == first["stages"][-1]["task_acc"] != \
      first["acc_matrix"]["before"]  # the trained model, not the run's start
