"""GS-LoRA / GS-LoRA++: the method's pieces on small literal trees, and tiny end-to-end runs
(continual, with a kill in the middle of task 2 and a rerun), frozen leaves, bad input."""

import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from conftest import REPO
from kswap_jax import lora, losses
from kswap_jax.errors import ConfigError
from kswap_jax.methods import gs_lora
from kswap_jax.optim import group_lasso


def _config(name, arg):
  spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "configs", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


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
  stack = gs_lora.stack_zeros(t1, 3)
  stack = gs_lora.record_task(stack, t1, 0)
  stack = gs_lora.record_task(stack, t2, 1)
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
  assert not hasattr(gs_lora.make_optimizer(cfg, proximal=False, grouping="block")
                     .init(params).hyperparams, "alpha")


def test_accuracies_name_both_prediction_rules():
  counts = {"retain_test": {"correct_margin": 3.0, "correct_nomargin": 4.0, "count": 4.0},
            "forget_test": {"correct_margin": 0.0, "correct_nomargin": 1.0, "count": 2.0}}
  acc = gs_lora.accuracies(counts, margin=True)
  assert acc["acc_r"] == 75.0 and acc["acc_r_nomargin"] == 100.0 and acc["acc_f"] == 0.0
  assert "acc_o" not in acc and "acc_m" not in acc
  assert gs_lora.accuracies(counts, margin=False)["acc_f"] == 50.0


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
# End to end (slow): a tiny continual run, its resumption, frozen leaves.

def _tiny(arg="setting=continual,runlocal"):
  config = _config("gs_lora_casia100", arg)
  config.tasks.num_tasks = 3
  config.gs_lora.beta = (0.2, 0.25, 0.25)
  config.gs_lora.epochs = 2
  config.train.checkpoint_every_steps = 3
  return config


@pytest.fixture(scope="module")
def continual_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("gs_cl"))
  config = _tiny()
  config.init.pretrain_workdir = os.path.join(workdir, "pretrain")
  return workdir, gs_lora.run(config, workdir)


@pytest.mark.slow
def test_continual_run_writes_the_results_envelope(continual_run):
  workdir, results = continual_run
  on_disk = json.load(open(os.path.join(workdir, "results.json")))
  assert on_disk["final"] == results["final"]
  assert [s["name"] for s in on_disk["stages"]] == ["pretrained", "task_1", "task_2", "task_3"]
  t1, t2 = on_disk["stages"][1], on_disk["stages"][2]
  for key in ("acc_r", "acc_f", "h_mean", "zero_groups", "nonzero_lora_fraction", "seconds",
              "acc_r_nomargin", "acc_f_nomargin", "acc_f_before", "forget_classes",
              "group_norms", "best_h"):
    assert key in t2, key
  assert "acc_o" not in t1 and "acc_o" in t2 and "acc_o_nomargin" in t2
  assert t1["forget_classes"] != t2["forget_classes"] and len(t2["group_norms"]) == 2
  assert 0 < t2["nonzero_lora_fraction"] <= 1
  for name in ("gs_lora.png", "metrics.jsonl", "merged_params.npz", "config.json"):
    assert os.path.exists(os.path.join(workdir, name)), name
  evals = [json.loads(x) for x in open(os.path.join(workdir, "metrics.jsonl")) if '"eval"' in x]
  assert evals and all("h_mean" in x["eval"] for x in evals)


@pytest.mark.slow
def test_only_lora_targets_change_and_they_equal_the_folded_tasks(continual_run):
  workdir, _ = continual_run
  pre = np.load(os.path.join(workdir, "pretrain", "params.npz"))
  merged = np.load(os.path.join(workdir, "merged_params.npz"))
  assert set(pre.files) == set(merged.files)
  changed = sorted(n for n in pre.files if not np.array_equal(pre[n], merged[n]))
  assert changed and all(n.endswith(("MlpBlock_3/Dense_0/kernel", "MlpBlock_3/Dense_1/kernel"))
                         for n in changed)


@pytest.mark.slow
def test_kill_in_task_2_and_rerun_gives_the_same_final_metrics(continual_run, tmp_path):
  reference = continual_run[1]
  workdir = str(tmp_path / "resumed")
  config = _tiny()
  config.init.pretrain_workdir = os.path.join(continual_run[0], "pretrain")  # reuse it
  steps_per_task = None
  with open(os.path.join(continual_run[0], "metrics.jsonl")) as f:
    lines = [json.loads(x) for x in f]
  steps_per_task = max(x["step"] for x in lines if x.get("stage") == "task_1")
  config.debug.interrupt_at_step = steps_per_task + 2           # inside task 2
  with pytest.raises(SystemExit):
    gs_lora.run(config, workdir)
  assert not os.path.exists(os.path.join(workdir, "results.json"))
  config.debug.interrupt_at_step = 0
  resumed = gs_lora.run(config, workdir)
  assert resumed["final"] == reference["final"]
  for a, b in zip(resumed["stages"], reference["stages"]):
    assert {k: v for k, v in a.items() if k != "seconds"} == \
        {k: v for k, v in b.items() if k != "seconds"}


@pytest.mark.parametrize("change,field", [
    (lambda c: setattr(c.gs_lora, "beta", (0.2, 0.3)), "gs_lora.beta"),
    (lambda c: setattr(c.tasks, "forget_classes", ((1, 2), (2, 3), (4,))),
     "tasks.forget_classes"),
    (lambda c: setattr(c.tasks, "forget_classes", ((1, 2), (12,), (4,))),
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
    gs_lora.run(config, workdir)
  assert not os.path.exists(workdir) or not os.listdir(workdir)
