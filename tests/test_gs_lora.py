"""GS-LoRA / GS-LoRA++: the method's pieces on small literal trees, and tiny end-to-end runs
(continual, with a kill in the middle of task 2 and a rerun), frozen leaves, bad input."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from conftest import load_config, method_run
from kswap_jax import lora, losses, methods, report
from kswap_jax.data import tasks as data_tasks
from kswap_jax.errors import ConfigError
from kswap_jax.methods import continual, gs_lora
from kswap_jax.optim import group_lasso


def _tree(scale=1.0):
  """A LoRA tree of two blocks, one module each: a (3, 2), b (2, 4)."""
  k = jax.random.split(jax.random.key(0), 4)
  block = lambda i: {"MlpBlock_3": {"Dense_0": {
      "a": scale * jax.random.normal(k[2 * i], (3, 2)),
      "b": scale * jax.random.normal(k[2 * i + 1], (2, 4))}}}
  return {"Transformer": {"encoderblock_0": block(0), "encoderblock_1": block(1)}}


def _base():
  kernel = lambda i: jnp.full((3, 4), float(i))
  return {"Transformer": {f"encoderblock_{i}": {"MlpBlock_3": {"Dense_0": {
      "kernel": kernel(i), "bias": jnp.zeros(4)}}} for i in range(2)},
          "head": {"kernel": jnp.ones((4, 5))}}


def test_task_base_folds_the_recorded_tasks_in_order():
  base, t1, t2 = _base(), _tree(), _tree(2.0)
  stack = continual.stack_zeros(t1, 3)
  stack = continual.stack_set(stack, 0, t1)
  stack = continual.stack_set(stack, 1, t2)
  got = gs_lora.task_base(base, stack, 2, 0.125)
  want = lora.merge(lora.merge(base, t1, 0.125), t2, 0.125)
  jax.tree_util.tree_map(np.testing.assert_array_equal, got, want)
  # Task 1's base is the pretrained one; slot 2 (not done) is still zero.
  jax.tree_util.tree_map(np.testing.assert_array_equal,
                         gs_lora.task_base(base, stack, 0, 0.125), base)
  assert float(jnp.abs(stack["Transformer"]["encoderblock_0"]["MlpBlock_3"]["Dense_0"]["a"][2]
                       ).sum()) == 0.0
  np.testing.assert_array_equal(
      got["head"]["kernel"], base["head"]["kernel"])  # only targeted kernels change


def test_sparsity_counts_exact_zero_groups_and_nonzero_fraction():
  tree = _tree()
  tree["Transformer"]["encoderblock_1"] = jax.tree_util.tree_map(
      jnp.zeros_like, tree["Transformer"]["encoderblock_1"])
  s = gs_lora.sparsity(tree, "block")
  assert s["zero_groups"] == 1 and s["num_groups"] == 2
  assert s["nonzero_lora_fraction"] == pytest.approx(0.5)
  assert s["group_norms"][1] == 0.0 and s["group_norms"][0] > 0


def test_proximal_optimizer_zeroes_groups_and_follows_injected_alpha():
  cfg = ml_collections.ConfigDict(dict(lr=1e-2, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.05))
  tx = gs_lora.make_optimizer(cfg, proximal=True, grouping="block")
  params = _tree(1e-3)
  state = tx.init(params)
  grads = jax.tree_util.tree_map(jnp.zeros_like, params)
  hp = dict(state.hyperparams)
  hp["alpha"] = jnp.asarray(0.0, hp["alpha"].dtype)
  upd, _ = tx.update(grads, state._replace(hyperparams=hp), params)
  assert gs_lora.sparsity(jax.tree_util.tree_map(lambda p, u: p + u, params, upd),
                          "block")["zero_groups"] == 0
  hp["alpha"] = jnp.asarray(10.0, hp["alpha"].dtype)  # η·α = 0.1 > every group norm
  upd, _ = tx.update(grads, state._replace(hyperparams=hp), params)
  new = jax.tree_util.tree_map(lambda p, u: p + u, params, upd)
  assert gs_lora.sparsity(new, "block")["zero_groups"] == 2
  # Only the injected names: in penalty mode α must reach the loss, not the optimizer.
  for kwargs, names in ((dict(proximal=False), {"learning_rate"}),
                        (dict(proximal=True), {"learning_rate", "alpha"}),
                        (dict(proximal=False, ema_scale=0.125), {"learning_rate", "ema_mix"})):
    opt = gs_lora.make_optimizer(cfg, grouping="block", **kwargs)
    assert set(opt.init(params).hyperparams) == names, kwargs


def test_product_ema_is_the_ema_of_the_merged_update():
  cfg = ml_collections.ConfigDict(dict(lr=1e-2, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0))
  tx = gs_lora.make_optimizer(cfg, proximal=False, grouping="block", ema_scale=0.5)
  params = _tree()
  state = tx.init(params)
  grads = jax.tree_util.tree_map(jnp.ones_like, params)
  history, ema = [], None
  for mix in (0.0, 1.0, 0.1, 0.1):           # nothing, copy, then two EMA steps with d = 0.9
    hp = dict(state.hyperparams)
    hp["ema_mix"] = jnp.asarray(mix, hp["ema_mix"].dtype)
    upd, state = tx.update(grads, state._replace(hyperparams=hp), params)
    params = jax.tree_util.tree_map(lambda p, u: p + u, params, upd)
    m = params["Transformer"]["encoderblock_0"]["MlpBlock_3"]["Dense_0"]
    history.append(0.5 * np.asarray(m["a"] @ m["b"]))
  ema = history[1]
  for h in history[2:]:
    ema = 0.9 * ema + 0.1 * h
  got = gs_lora.ema_products(state)["Transformer"]["encoderblock_0"]["MlpBlock_3"]["Dense_0"]
  np.testing.assert_allclose(np.asarray(got), ema, rtol=1e-5, atol=1e-7)
  # Merged into a base: W + P.
  base = _base()
  merged = gs_lora.merge_products(base, gs_lora.ema_products(state))
  k = merged["Transformer"]["encoderblock_0"]["MlpBlock_3"]["Dense_0"]["kernel"]
  np.testing.assert_allclose(np.asarray(k), np.asarray(
      base["Transformer"]["encoderblock_0"]["MlpBlock_3"]["Dense_0"]["kernel"]) + ema,
                             rtol=1e-5, atol=1e-6)


def test_accuracies_apply_the_margin_on_the_host():
  # CosFace plain logits 64·cos; the margin rule subtracts 64·0.35 = 22.4 from the true class.
  logits = np.array([[64 * 0.8, 64 * 0.6], [64 * 0.95, 64 * 0.3], [0.0, 64 * 0.9]])
  preds = {"retain_test": {"logits": logits, "label": np.array([0, 0, 1])},
           "forget_test": {"logits": logits[:1], "label": np.array([1])}}
  acc = gs_lora.accuracies(preds, margin=22.4, use_margin=True)
  assert acc["acc_r"] == pytest.approx(200 / 3) and acc["acc_r_nomargin"] == 100.0
  assert acc["acc_f"] == 0.0 and acc["acc_f_margin"] == 0.0
  assert "acc_o" not in acc and "acc_m" not in acc
  assert gs_lora.accuracies(preds, margin=22.4, use_margin=False)["acc_r"] == 100.0
  np.testing.assert_array_equal(preds["retain_test"]["logits"], logits)  # not modified


def test_acc_o_split_by_the_task_that_forgot_the_classes():
  """`acc_o_tasks`: Acc_o on each earlier task's classes (the margin rule as `acc_o`);
  weighted by those classes' test images, they give Acc_o; None for a task without any."""
  logits = np.array([[9.0, 0, 0, 0], [0, 9.0, 0, 0], [9.0, 0, 0, 0], [0, 0, 9.0, 0],
                     [0, 0, 0, 9.0]])
  labels = np.array([0, 1, 1, 2, 3])  # task 1 forgot 0, 1 (2 of 3 right); task 2: 2 and 3
  preds = {"retain_test": {"logits": logits, "label": labels},
           "forget_test": {"logits": logits, "label": labels},
           "old_test": {"logits": logits, "label": labels}}
  acc = gs_lora.accuracies(preds, margin=0.0, use_margin=True,
                           old_tasks=[(0, 1), (2, 3), (7,)])
  assert acc["acc_o_tasks"][:2] == [pytest.approx(200 / 3), 100.0]
  assert acc["acc_o_tasks"][2] is None
  assert acc["acc_o"] == pytest.approx((3 * 200 / 3 + 2 * 100.0) / 5)
  margin = gs_lora.accuracies(preds, margin=20.0, use_margin=True, old_tasks=[(0, 1)])
  assert margin["acc_o_tasks"] == [0.0]  # every true logit 9 - 20 < 0: the margin rule
  assert "acc_o_tasks" not in gs_lora.accuracies(preds, margin=0.0, use_margin=True)


@pytest.fixture(scope="module")
def tiny_face():
  from kswap_jax import models  # pylint: disable=import-outside-toplevel
  cfg = models.default_config("vit_face")
  cfg.update(dict(variant="test/4", image_size=16, num_classes=6, dropout=0.0,
                  attention_output_dropout=0.0))
  model = models.build(cfg)
  base = jax.jit(lambda k: models.init_variables(model, cfg, k))(jax.random.key(0))["params"]
  return model, base


def test_loss_is_the_sum_of_its_terms(tiny_face):
  model, base = tiny_face
  spec = lora.LoraSpec(init_slope=5 ** 0.5)
  params = jax.tree_util.tree_map(lambda x: x + 0.01, lora.init(base, spec, jax.random.key(1)))
  img = jax.random.uniform(jax.random.key(2), (4, 16, 16, 3))
  batch = {"retain": {"image": img, "label": jnp.array([0, 1, 2, 3]), "mask": jnp.ones(4)},
           "forget": {"image": img[::-1], "label": jnp.array([4, 5, 4, 5]),
                      "mask": jnp.array([1.0, 1.0, 1.0, 0.0])}}
  protos = jax.random.normal(jax.random.key(3), (6, 64))
  frozen = {"base": base, "prototypes": protos}
  pro = ml_collections.ConfigDict(dict(forget_weight=0.5, retain_weight=0.1, bound=18.0))
  hp = {"beta": 0.2, "alpha": 0.01, "pro_forget_weight": 0.5}
  fn = gs_lora.make_loss(model, spec.scale, "block", bound=110.0, penalty=True, prototype=pro)
  loss, aux = jax.jit(fn)(params, frozen, batch, jax.random.key(4), hp)
  apply = lambda b: lora.apply(model, base, params, b["image"], scale=spec.scale,
                               features=True)
  e_r, e_f = apply(batch["retain"]), apply(batch["forget"])
  ce = lambda e, b: losses.cross_entropy(gs_lora.head_logits(model, base, e, b["label"]),
                                         b["label"], b["mask"])
  ce_r, ce_f = ce(e_r, batch["retain"]), ce(e_f, batch["forget"])
  kl_f = losses.prototype_kl(e_f, protos[batch["forget"]["label"]], batch["forget"]["mask"])
  kl_r = losses.prototype_kl(e_r, protos[batch["retain"]["label"]])
  want = (ce_r + 0.2 * jax.nn.relu(110.0 - ce_f)
          + 0.01 * group_lasso.group_lasso_penalty(params)
          + 0.5 * jax.nn.relu(18.0 - kl_f) + 0.1 * kl_r)
  assert float(loss) == pytest.approx(float(want), rel=1e-5)
  assert float(aux["ce_forget"]) == pytest.approx(float(ce_f), rel=1e-5)
  # The margin is on: the CE uses s·(cos − m) on the true class.
  plain = losses.cross_entropy(gs_lora.head_logits(model, base, e_r, None),
                               batch["retain"]["label"])
  assert float(ce_r) > float(plain)
  # Penalty off (proximal mode): no α·Ω in the loss.
  fn_p = gs_lora.make_loss(model, spec.scale, "block", bound=110.0, penalty=False,
                           prototype=None)
  loss_p, _ = jax.jit(fn_p)(params, frozen, batch, jax.random.key(4), hp)
  assert float(loss_p) == pytest.approx(float(ce_r + 0.2 * jax.nn.relu(110.0 - ce_f)), rel=1e-5)


# ----------------------------------------------------------------------------------------------
# End to end (slow): the conformance suite's tiny continual run (4 tasks x 2 classes of 10,
# killed and resumed in task 2 there), inspected here; bad input.

CASE = ("gs_lora_casia100", "runlocal")


@pytest.mark.slow
def test_continual_run_writes_the_results_envelope(tmp_path_factory):
  workdir, results = method_run(tmp_path_factory, *CASE)
  on_disk = json.load(open(os.path.join(workdir, "results.json")))
  assert on_disk["final"] == results["final"]
  assert [s["name"] for s in on_disk["stages"]] == ["pretrained", "task_1", "task_2", "task_3",
                                                    "task_4"]
  t1, t2 = on_disk["stages"][1], on_disk["stages"][2]
  for key in ("acc_r", "acc_f", "h_mean", "zero_groups", "nonzero_lora_fraction", "seconds",
              "acc_r_nomargin", "acc_f_nomargin", "acc_f_before", "forget_classes",
              "group_norms", "best_h"):
    assert key in t2, key
  assert "acc_o" not in t1 and "acc_o" in t2 and "acc_o_nomargin" in t2
  # Acc_o by the task that forgot the classes: one value per earlier task.
  assert "acc_o_tasks" not in t1
  assert [len(s["acc_o_tasks"]) for s in on_disk["stages"][2:]] == [1, 2, 3]
  assert all(0 <= v <= 100 for s in on_disk["stages"][2:] for v in s["acc_o_tasks"])
  assert "Acc_o ↓ by the task that forgot the classes" in gs_lora.present(on_disk, None)
  assert t1["forget_classes"] != t2["forget_classes"] and len(t2["group_norms"]) == 2
  assert 0 < t2["nonzero_lora_fraction"] <= 1
  for name in ("gs_lora.png", "metrics.jsonl", "merged_params.npz", "config.json"):
    assert os.path.exists(os.path.join(workdir, name)), name
  evals = [json.loads(x) for x in open(os.path.join(workdir, "metrics.jsonl")) if '"eval"' in x]
  assert evals and all("h_mean" in x["eval"] for x in evals)
  # The weights at each task's best H, merged, in the layout of merged_params.npz.
  final = np.load(os.path.join(workdir, "merged_params.npz"))
  with_evals = [s for s in on_disk["stages"][1:] if "best_h" in s]
  assert with_evals
  for stage in on_disk["stages"][1:]:
    path = os.path.join(workdir, f"merged_best_h_{stage['name']}.npz")
    assert os.path.exists(path) == (stage in with_evals), stage["name"]
  for stage in with_evals:
    best = np.load(os.path.join(workdir, f"merged_best_h_{stage['name']}.npz"))
    assert sorted(best.files) == sorted(final.files)
    assert all(best[k].shape == final[k].shape for k in final.files)


@pytest.mark.slow
def test_report_shows_the_sparsity_table_and_plot_as_the_run(tmp_path_factory, tmp_path,
                                                            capsys):
  workdir, results = method_run(tmp_path_factory, *CASE)
  shutil.copy(os.path.join(workdir, "results.json"), tmp_path)
  capsys.readouterr()  # the run's own output, when it ran in this test
  assert report.main([str(tmp_path)]) == 0
  *rows, plots = capsys.readouterr().out.splitlines()
  assert plots == f"plots: gs_lora.png (in {tmp_path})"
  start = rows.index(f"{'task':<10}{'zero groups':>13}{'non-zero LoRA':>15}{'seconds':>10}")
  # Between the stage table and the sparsity table: Acc_o by the task that forgot the classes.
  title = rows.index("Acc_o ↓ by the task that forgot the classes")
  assert rows[title - 1].startswith("final: Acc_r ")
  later = [s for s in results["stages"] if s.get("acc_o_tasks")]
  assert start == title + 2 + len(later)
  for row, stage in zip(rows[title + 2:start], later, strict=True):
    assert row.split() == [stage["name"], *(f"{v:.2f}" for v in stage["acc_o_tasks"])]
  for row, stage in zip(rows[start + 1:], results["stages"][1:], strict=True):
    assert row.split() == [stage["name"], str(stage["zero_groups"]), "/",
                           str(stage["num_groups"]), f"{stage['nonzero_lora_fraction']:.4f}",
                           f"{stage['seconds']:.1f}"]
  assert [p.name for p in tmp_path.glob("*.png")] == ["gs_lora.png"]
  os.remove(tmp_path / "gs_lora.png")
  os.mkdir(tmp_path / "gs_lora.png")  # where the plot cannot be written: one line, exit 2
  assert report.main([str(tmp_path)]) == 2
  err = capsys.readouterr().err
  assert err.startswith(f"error: {tmp_path}: cannot write the run's plots there (") and \
      err.count("\n") == 1, err


@pytest.mark.slow
def test_only_lora_targets_change_and_they_are_the_folded_tasks(tmp_path_factory):
  workdir, _ = method_run(tmp_path_factory, *CASE)
  pre = np.load(os.path.join(workdir, "pretrain", "params.npz"))
  merged = np.load(os.path.join(workdir, "merged_params.npz"))
  assert set(pre.files) == set(merged.files)
  changed = sorted(n for n in pre.files if not np.array_equal(pre[n], merged[n]))
  assert changed and all(n.endswith(("MlpBlock_3/Dense_0/kernel", "MlpBlock_3/Dense_1/kernel"))
                         for n in changed)


def _tiny():
  return load_config(*CASE)


@pytest.mark.parametrize("change,field", [
    (lambda c: setattr(c.gs_lora, "beta", (0.2, 0.3)), "gs_lora.beta"),
    (lambda c: setattr(c.tasks, "forget_classes", ((1, 2), (2, 3), (4,), (5,))),
     "tasks.forget_classes"),
    (lambda c: setattr(c.tasks, "forget_classes", ((1, 2), (12,), (4,), (5,))),
     "tasks.forget_classes"),
    (lambda c: setattr(c.gs_lora, "epoch_stream", "forget"), "gs_lora.epoch_stream"),
    (lambda c: setattr(c.group_lasso, "mode", "prox"), "group_lasso.mode"),
    (lambda c: setattr(c.tasks, "num_classes", 20), "tasks.num_classes"),
])
def test_bad_input_is_one_config_error_and_leaves_nothing(change, field, tmp_path):
  config = _tiny()
  change(config)
  workdir = str(tmp_path / "w")
  with pytest.raises(ConfigError, match=f"^{field}:"):
    methods.run(config, workdir)
  assert not os.path.exists(workdir) or not os.listdir(workdir)


@pytest.mark.parametrize("order,named", [
    ((0, 1, 1, 3), r"twice: \[1\]; missing: \[2\]"),
    ((0, 1, 2, 9), r"missing: \[3\]; outside: \[9\]"),
    (tuple(range(20)), r"outside: \[4, 5, 6, 7, 8, 9, 10, 11, \.\.\. \(\+8\)\]"),
])
def test_a_class_order_that_is_no_permutation_names_the_ids(order, named):
  with pytest.raises(ConfigError, match=rf"^tasks\.order: .*\({named}\)$"):
    data_tasks.make_tasks(num_classes=4, per_task=1, order=order)


def test_runlocal_single_step_honours_the_forget_arg():
  assert load_config("gs_lora_casia100", "setting=single,runlocal").tasks.per_task == 3
  assert load_config("gs_lora_casia100", "setting=single,runlocal,forget=5").tasks.per_task == 5
  with pytest.raises(ConfigError, match="forget=10 with runlocal"):
    load_config("gs_lora_casia100", "setting=single,runlocal,forget=10")


@pytest.mark.slow
@pytest.mark.parametrize("config_name,arg,num_tasks", [
    ("gs_lora_casia100", "setting=single,runlocal", 1),
    ("gs_lora_casia100", "setting=single_fewshot,runlocal,method=gs_lora_pp", 1),
    ("gs_lora_casia100", "setting=continual_fewshot,runlocal,method=gs_lora_pp", 4),
    ("gs_lora_casia100", "setting=missing,runlocal", 4),
    ("gs_lora_imagenet100", "runlocal", 4),
])
def test_every_shipped_setting_runs_end_to_end(config_name, arg, num_tasks, tmp_path_factory,
                                               tmp_path):
  config = load_config(config_name, arg)
  # One pretrained model per config file (the settings share model, data and pretraining).
  config.init.pretrain_workdir = str(tmp_path_factory.getbasetemp() / f"pre_{config_name}")
  results = methods.run(config, str(tmp_path / "run"))
  names = [s["name"] for s in results["stages"]]
  assert names == ["pretrained"] + [f"task_{i + 1}" for i in range(num_tasks)]
  last = results["stages"][-1]
  assert ("acc_m" in last) == ("missing" in arg)
  assert ("acc_o" in last) == (num_tasks > 1)
  assert last["num_groups"] == 2 and 0 <= last["nonzero_lora_fraction"] <= 1
  assert ("ema" in last) == ("missing" not in arg)   # the shipped scripts' EMA settings
  if "missing" in arg:  # the missing class is retained (in Acc_r's split) but never trained on
    assert config.tasks.num_missing == 1


@pytest.mark.parametrize("epoch_stream", ["retain", "longer"])
def test_the_cycled_stream_restarts_every_epoch_in_whole_passes(epoch_stream):
  # The reference re-creates the forget loader (drop_last=False) at every epoch.
  config = load_config("gs_lora_digits", "runlocal")
  config.gs_lora.epoch_stream = epoch_stream
  if epoch_stream == "longer":  # a forget set longer than the retain set swaps the roles
    config.tasks.update(dict(num_tasks=1, per_task=6))
  _, subsets = gs_lora.task_data(config)
  mesh = gs_lora.train.mesh_for(config)
  for (streams, epoch), sub in zip(gs_lora.make_task_streams(config, subsets, mesh), subsets):
    assert epoch == ("forget" if epoch_stream == "longer" else "retain")
    cycled = streams["retain" if epoch == "forget" else "forget"]
    assert cycled.restart_every == streams[epoch].steps_per_epoch
    assert cycled.cycle and not streams[epoch].cycle
    n, passes = cycled.num_examples, cycled.restart_every // cycled.steps_per_epoch
    for e in range(2):
      masks = [cycled.batch(e * cycled.restart_every + i)["mask"]
               for i in range(passes * cycled.steps_per_epoch)]
      assert sum(m.sum() for m in masks) == passes * n  # whole passes, each record once
  config.gs_lora.aux_batches = "continuous"
  streams, epoch = gs_lora.make_task_streams(config, subsets, mesh)[0]
  assert streams["retain" if epoch == "forget" else "forget"].restart_every == 0
  config.gs_lora.aux_batches = "per_pass"
  with pytest.raises(ConfigError, match=r"^gs_lora\.aux_batches: 'per_pass' \(expected one "
                                        r"of per_epoch, continuous\)$"):
    gs_lora.make_task_streams(config, subsets, mesh)


def test_periodic_record_has_acc_m_only_with_missing_classes():
  before = {"acc_f": 90.0, "acc_r": 80.0}
  plain = gs_lora.periodic_record({"acc_r": 85.0, "acc_f": 0.0}, before)
  assert set(plain) == {"acc_r", "acc_f", "h_mean"}
  with_m = gs_lora.periodic_record({"acc_r": 85.0, "acc_f": 0.0, "acc_m": 70.0}, before)
  assert with_m["acc_m"] == 70.0 and with_m["h_mean"] == plain["h_mean"]


def test_the_ema_is_evaluated_beside_the_weights_at_every_periodic_evaluation(tmp_path):
  """From `ema_epoch`'s end on, each periodic evaluation also evaluates the EMA of the merged
  weights (`ema_*` keys; the reference logs it every epoch): equal to the weights when it
  has just copied them, unchanged within an epoch (it moves at epoch ends only), absent
  before it starts."""
  config = load_config("gs_lora_digits", "runlocal")
  config.tasks.num_tasks, config.gs_lora.epochs, config.gs_lora.ema_epoch = 1, 2, 0
  config.eval.every_steps = 16
  results = methods.run(config, str(tmp_path))
  with open(tmp_path / "metrics.jsonl") as f:
    evals = [(r["step"], r["eval"]) for r in map(json.loads, f) if "eval" in r]
  assert [s for s, _ in evals] == [16, 32, 48, 64]  # 2 epochs of 32 iterations
  first, copied, within, last = (e for _, e in evals)
  assert not any(k.startswith("ema_") for k in first)
  assert copied["ema_acc_r"] == pytest.approx(copied["acc_r"], abs=0.5)
  assert {k: within[k] for k in within if k.startswith("ema_")} == {
      k: copied[k] for k in copied if k.startswith("ema_")}
  assert last["ema_acc_r"] != last["acc_r"] and "ema" in results["stages"][-1]
