"""The continual-forgetting baselines: importances, penalties and distillation on hand-built
cases, the relabelling rules, SCRUB's schedule, bad input, and what a tiny run records (the
end-to-end runs, kills and resumptions are in tests/test_conformance.py)."""

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import load_config, method_run
from kswap_jax import checkpoint, losses, methods, models, train
from kswap_jax.errors import ConfigError
from kswap_jax.methods import common, gs_lora, trainable
from kswap_jax.methods.baselines import continual_forgetting as cf


# A two-parameter model: logits z = (w1·x, w2·x) for a scalar input x.
def _logits(params, batch):
  x = batch["image"]
  return jnp.stack([params["w1"] * x, params["w2"] * x], axis=-1)


# Two minibatches: x = (1, 2) and x = (1, padding); all labels 0.
BATCHES = [
    {"image": jnp.array([1.0, 2.0]), "label": jnp.array([0, 0]), "mask": jnp.array([1.0, 1.0])},
    {"image": jnp.array([1.0, 9.0]), "label": jnp.array([0, 0]), "mask": jnp.array([1.0, 0.0])},
]


def test_ewc_importance_is_the_size_weighted_mean_of_squared_minibatch_gradients():
  grad = jax.grad(lambda p, b: losses.cross_entropy(_logits(p, b), b["label"], b["mask"]))
  params = {"w1": jnp.array(0.0), "w2": jnp.array(0.0)}
  fisher = cf.ewc_importance(grad, params, BATCHES)
  # At w = 0, p(class 1) = 1/2, so dℓ_i/dw1 = −x_i/2 and dℓ_i/dw2 = +x_i/2.
  # Batch means: −0.75 (x = 1, 2) and −0.5 (x = 1); F = (2·0.75² + 1·0.5²)/2 = 0.6875.
  np.testing.assert_allclose(fisher["w1"], 0.6875, rtol=1e-6)
  np.testing.assert_allclose(fisher["w2"], 0.6875, rtol=1e-6)


def test_mas_importance_is_the_mean_absolute_gradient_of_the_squared_outputs():
  grad = jax.grad(lambda p, b: cf.squared_output_mean(_logits(p, b), b["mask"]))
  params = {"w1": jnp.array(1.0), "w2": jnp.array(-2.0)}
  omega = cf.mas_importance(grad, params, BATCHES)
  # m_b = mean_i (w1² + w2²) x_i² / 2 ⇒ ∂m_b/∂w = w · mean_i x_i²: 2.5 and 1 for the batches.
  # Ω_w1 = |1|·(2.5 + 1)/2 = 1.75; Ω_w2 = |−2|·(2.5 + 1)/2 = 3.5.
  np.testing.assert_allclose(omega["w1"], 1.75, rtol=1e-6)
  np.testing.assert_allclose(omega["w2"], 3.5, rtol=1e-6)


def test_importances_reject_an_empty_pass():
  grad = jax.grad(lambda p, b: cf.squared_output_mean(_logits(p, b), b["mask"]))
  empty = [{**BATCHES[0], "mask": jnp.zeros(2)}]
  with pytest.raises(ValueError, match="batches"):
    cf.mas_importance(grad, {"w1": jnp.array(1.0), "w2": jnp.array(1.0)}, empty)


def test_anchor_penalty_sums_weighted_importance_terms():
  params = {"a": jnp.array([1.0, 2.0]), "b": jnp.array(3.0)}
  anchors = {"a": jnp.array([[0.0, 0.0], [1.0, 1.0]]), "b": jnp.array([1.0, 2.0])}
  omega = {"a": jnp.array([[1.0, 2.0], [3.0, 4.0]]), "b": jnp.array([5.0, 6.0])}
  weights = jnp.array([1.0, 0.5])
  # term 0: 1·1 + 2·4 + 5·4 = 29; term 1: 3·0 + 4·1 + 6·1 = 10; 29 + 0.5·10 = 34.
  assert float(losses.anchor_penalty(params, anchors, omega, weights)) == pytest.approx(34.0)
  # Plain L2 (Ω ≡ 1): 9 + 0.5·2 = 10; all terms on: 9 + 2 = 11.
  assert float(losses.anchor_penalty(params, anchors, None, weights)) == pytest.approx(10.0)
  assert float(losses.anchor_penalty(params, anchors)) == pytest.approx(11.0)
  g = jax.grad(lambda p: losses.anchor_penalty(p, anchors, omega, weights))(params)
  # ∂/∂b = Σ_s w_s 2 Ω_s (b − b*_s) = 2·5·2 + 0.5·2·6·1 = 26.
  assert float(g["b"]) == pytest.approx(26.0)
  np.testing.assert_allclose(g["a"], [2 * 1 * 1 + 0.5 * 2 * 3 * 0, 2 * 2 * 2 + 0.5 * 2 * 4 * 1])


def test_distillation_is_a_kl_zero_only_when_student_agrees():
  teacher = jnp.array([[math.log(3.0), 0.0]])
  # T = 1: q = (3/4, 1/4), p = (1/2, 1/2): KL = 3/4·ln 1.5 + 1/4·ln 0.5.
  want = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
  assert float(losses.distillation_kl(jnp.zeros((1, 2)), teacher, 1.0)) == pytest.approx(
      want, rel=1e-5)
  assert float(losses.distillation_kl(teacher, teacher, 2.0)) == pytest.approx(0.0, abs=1e-7)
  student = jnp.array([[0.0, 1.0], [2.0, -1.0]])
  teachers = jnp.array([[1.0, 0.0], [2.0, -1.0]])
  kd = lambda s: losses.distillation_kl(s, teachers, 2.0, jnp.array([1.0, 1.0]))
  assert float(kd(student)) > 0.01
  g = jax.grad(kd)(student)
  assert float(jnp.abs(g[0]).sum()) > 0 and float(jnp.abs(g[1]).sum()) < 1e-7


def test_the_reference_lwf_kd_is_zero_with_zero_gradient():
  student = jnp.array([[0.0, 1.0, -2.0], [3.0, 0.5, 0.1]])
  teacher = jnp.array([[2.0, -1.0, 0.0], [0.0, 0.0, 4.0]])
  value, g = jax.value_and_grad(lambda s: cf.reference_lwf_kd(s, teacher, 2.0))(student)
  assert float(value) == 0.0
  assert bool(jnp.all(g == 0.0))  # finite: no NaN leaks through the masked log
  assert float(losses.distillation_kl(student, teacher, 2.0)) > 0.1


@pytest.mark.parametrize("rule,low,high", [("reference", 0, 3), ("other", 0, 10)])
def test_relabelled_forget_labels_are_wrong_fresh_and_in_range(rule, low, high):
  is_forget = jnp.zeros(10).at[jnp.array([2, 5, 7])].set(1.0)
  labels = jnp.array([2, 5, 7, 0, 1, 2, 7] * 30)
  draws = [cf.relabel(jax.random.key(i), labels, is_forget, rule=rule, num_forget=3,
                      num_classes=10) for i in range(2)]
  forget = np.asarray(is_forget)[np.asarray(labels)] > 0
  for y in draws:
    y = np.asarray(y)
    assert np.all(y[forget] != np.asarray(labels)[forget])
    assert np.all((y[forget] >= low) & (y[forget] < high))
    np.testing.assert_array_equal(y[~forget], np.asarray(labels)[~forget])
  assert np.any(np.asarray(draws[0]) != np.asarray(draws[1]))  # a fresh draw per access
  again = cf.relabel(jax.random.key(0), labels, is_forget, rule=rule, num_forget=3,
                     num_classes=10)
  np.testing.assert_array_equal(again, draws[0])  # a pure function of the key


def test_reference_relabel_fixes_a_collision_with_the_true_label():
  # Label 1 of 2 forget classes: (1 + r) mod 2 = 1 for every even r -> (1 + 1) mod 2 = 0.
  y = cf.relabel(jax.random.key(3), jnp.array([1] * 64), jnp.ones(4), rule="reference",
                 num_forget=2, num_classes=4)
  assert set(np.asarray(y).tolist()) == {0}


def test_scrub_schedule_and_retrain_lr():
  kinds, epochs = cf.scrub_schedule(epochs=4, max_epochs=1, min_epochs=1, forget_steps=2,
                                    retain_steps=3)
  assert kinds == ["max"] * 2 + ["min"] * 3 + ["min"] * 3 + ["max"] * 2 + ["min"] * 3 + ["min"] * 3
  assert epochs == [0] * 5 + [1] * 3 + [2] * 5 + [3] * 3
  lr = cf.retrain_lr(base=3e-4, minimum=1e-5, epochs=100, warmup_epochs=5, warmup_lr=1e-6)
  assert lr(0) == pytest.approx(1e-6) and lr(4) == pytest.approx(1e-6 + 4 * (3e-4 - 1e-6) / 5)
  assert lr(50) == pytest.approx(1e-5 + 0.5 * (3e-4 - 1e-5))


def test_decay_mask_follows_timm():
  params = {"Dense": {"kernel": jnp.ones((2, 3)), "bias": jnp.ones((3,))},
            "Attn": {"bias": jnp.ones((2, 4))}, "LayerNorm": {"scale": jnp.ones((3,))},
            "cls": jnp.ones((1, 1, 3))}
  mask = cf.decay_mask(params)
  assert mask["Dense"]["kernel"] and mask["cls"]
  assert not (mask["Dense"]["bias"] or mask["Attn"]["bias"] or mask["LayerNorm"]["scale"])


@pytest.mark.parametrize("change,field", [
    (lambda c: setattr(c.cf, "relabel", "random"), "cf.relabel"),
    (lambda c: setattr(c.cf, "teacher", "old"), "cf.teacher"),
    (lambda c: setattr(c.cf, "epochs", 0), "cf.epochs"),
    (lambda c: setattr(c.cf_ewc, "weight", -1.0), "cf_ewc.weight"),
    (lambda c: setattr(c.cf_ewc, "lr", 0.0), "cf_ewc.lr"),
    (lambda c: setattr(c.cf, "importance_data", "half"), "cf.importance_data"),
    (lambda c: setattr(c.cf, "aux_batches", "epoch"), "cf.aux_batches"),
    (lambda c: c.tasks.update(dict(per_task=0, forget_classes=((1,), (2,)))), "cf.relabel"),
])
def test_bad_input_is_one_config_error_and_leaves_nothing(change, field, tmp_path):
  config = load_config("gs_lora_casia100", "runlocal,method=cf_ewc")
  change(config)
  workdir = str(tmp_path / "w")
  with pytest.raises(ConfigError, match=f"^{field}:"):
    methods.run(config, workdir)
  assert not os.path.exists(workdir) or not os.listdir(workdir)


def test_scrub_and_config_arg_errors():
  config = load_config("gs_lora_casia100", "runlocal,method=cf_scrub")
  config.cf_scrub.update(dict(max_epochs=0, min_epochs=0))
  with pytest.raises(ConfigError, match="^cf_scrub.max_epochs:"):
    methods.run(config, "/nonexistent/never")
  with pytest.raises(ConfigError, match="method="):
    load_config("gs_lora_digits", "method=cf_nope")


@pytest.mark.parametrize("method", ["cf_der", "cf_der_pp"])
def test_the_cycled_retain_stream_restarts_every_epoch_and_der_pp_reads_it_twice(method):
  # The reference re-creates the retain prefetcher in every train_one_epoch_* and DER++
  # takes its CE batch as the next read of that same loader.
  config = load_config("gs_lora_digits", f"runlocal,method={method}")
  _, subsets = gs_lora.task_data(config)
  streams_, epoch = cf.make_task_streams(config, subsets, train.mesh_for(config))[0]
  forget, retain = streams_["forget"], streams_["retain"]
  assert epoch == "forget"
  if method == "cf_der":
    assert retain.restart_every == forget.steps_per_epoch and "retain_plus" not in streams_
    return
  base = retain.stream
  assert base.restart_every == 2 * forget.steps_per_epoch
  plus = streams_["retain_plus"]
  for i in range(3):
    for view, read in ((retain, 2 * i), (plus, 2 * i + 1)):
      np.testing.assert_array_equal(view.batch(i)["image"], base.batch(read)["image"])
  config.cf.aux_batches = "continuous"
  streams_, _ = cf.make_task_streams(config, subsets, train.mesh_for(config))[0]
  assert streams_["retain"].stream.restart_every == 0


@pytest.mark.slow
def test_a_baseline_run_trains_all_but_the_head_and_records_the_tasks(tmp_path_factory):
  _, results = method_run(tmp_path_factory, "gs_lora_casia100", "runlocal,method=cf_ewc")
  config = load_config("gs_lora_casia100", "runlocal,method=cf_ewc")
  width = 64  # the test/4 model: the CosFace head is (width, classes), frozen
  model_classes = int(config.model.num_classes)
  total = results["num_trainable"] + width * model_classes
  assert results["num_trainable"] > 0 and total > results["num_trainable"]
  assert [s["name"] for s in results["stages"]] == ["pretrained", "task_1", "task_2"]
  assert "acc_o" in results["stages"][2] and set(results["final"]) >= {
      "acc_r", "acc_f", "acc_o", "h_mean"}


def _restored_leaf(workdir, key):
  """A leaf of the newest checkpoint's train state, found by its field name."""
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  manager = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"),
                                  item_names=("state", "meta"))
  state = manager.restore(manager.latest_step(), args=ocp.args.Composite(
      state=ocp.args.StandardRestore()))["state"]
  manager.close()
  found = []

  def walk(t):
    if isinstance(t, dict):
      for k, v in t.items():
        found.extend([v] if k == key else [])
        walk(v)
    elif isinstance(t, (list, tuple)):
      for v in t:
        walk(v)
  walk(state)
  return found


def _scrub_run(tmp_path, method, name=None, **section):
  """The training rows of metrics.jsonl (periodic evaluations left out)."""
  config = load_config("gs_lora_casia100", f"runlocal,method={method}")
  config.cf.epochs = 3  # 3 super-epochs of one max + min inner epoch per task
  config.train.log_every_steps = 1
  config[method].update(section)
  workdir = tmp_path / (name or method)
  methods.run(config, str(workdir))
  with open(workdir / "metrics.jsonl") as f:
    return [x for x in map(json.loads, f) if "learning_rate" in x]


@pytest.mark.slow
def test_scrub_s_refreshes_its_average_after_every_super_epoch_across_tasks(tmp_path):
  lines = _scrub_run(tmp_path, "cf_scrub_s")
  # Per task 3 inner epochs of 1 max + 2 min steps; θ̄ is refreshed at the first step of
  # every super-epoch but the run's first (the reference: after each one, tasks included).
  refresh = [(x["stage"], x["average_refresh"]) for x in lines]
  assert refresh == [("task_1", float(i in (3, 6))) for i in range(9)] + \
      [("task_2", float(i in (0, 3, 6))) for i in range(9)]
  # The average lives across tasks: 2 refreshes in task 1 and 3 in task 2.
  assert [int(n) for n in _restored_leaf(tmp_path / "cf_scrub_s", "num_averaged")] == [5]


@pytest.mark.slow
def test_scrub_s_without_smoothing_is_scrub_and_with_it_moves_after_the_first_step(tmp_path):
  scrub = _scrub_run(tmp_path, "cf_scrub")
  plain = _scrub_run(tmp_path, "cf_scrub_s", "plain", smoothing=0.0)
  smooth = _scrub_run(tmp_path, "cf_scrub_s", "smooth", smoothing=0.5)
  losses_of = lambda lines: np.array([x.get("max/loss", x.get("min/loss")) for x in lines])
  # The added gradient is exactly 0 (the two programs may round differently).
  np.testing.assert_allclose(losses_of(plain), losses_of(scrub), rtol=1e-5)
  # θ = θ̄ at the first step (no term), then the smoothing pulls the weights back.
  assert losses_of(smooth)[0] == losses_of(scrub)[0]
  gap = np.abs(losses_of(smooth) - losses_of(scrub)) / np.abs(losses_of(scrub))
  print("relative loss gaps, smoothing 0.5 vs SCRUB:", np.round(gap, 4).tolist())
  assert gap[2:].max() > 5e-3


def test_lirf_splits_the_lower_half_off_and_merges_it_back():
  params = {"embedding": {"kernel": 1}, "cls": 2, "head": {"kernel": 3},
            "Transformer": {"posembed_input": {"pos_embedding": 4},
                            **{f"encoderblock_{i}": {"w": 10 + i} for i in range(6)},
                            "encoder_norm": {"scale": 5}}}
  lower, rest = cf.split_lower(params, 3)
  assert sorted(lower["Transformer"]) == ["encoderblock_0", "encoderblock_1",
                                          "encoderblock_2", "posembed_input"]
  assert set(lower) == {"embedding", "cls", "Transformer"}
  assert sorted(rest["Transformer"]) == ["encoder_norm", "encoderblock_3", "encoderblock_4",
                                         "encoderblock_5"] and rest["head"] == {"kernel": 3}
  assert trainable.join(lower, rest) == params


def test_lirf_attention_transfer_is_the_references_at_loss():
  rng = np.random.default_rng(0)
  s = rng.normal(size=(3, 5, 4)).astype(np.float32)
  t = rng.normal(size=(3, 5, 4)).astype(np.float32)

  def att(x):  # the reference: F.normalize(x.pow(2).mean(1)); att[att < 0.005] = 0
    a = (x ** 2).mean(1)
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    return np.where(a < 0.005, 0.0, a)
  want = ((att(s) - att(t)) ** 2).mean()
  got = cf.lirf_attention(jnp.asarray(s), jnp.asarray(t), jnp.ones(3))
  np.testing.assert_allclose(got, want, rtol=1e-5)
  assert float(cf.lirf_attention(jnp.asarray(s), jnp.asarray(s), jnp.ones(3))) == 0.0
  # A padded slot counts for nothing; the teacher gets no gradient.
  padded = cf.lirf_attention(jnp.asarray(s), jnp.asarray(t), jnp.array([1.0, 1.0, 0.0]))
  np.testing.assert_allclose(padded, ((att(s) - att(t)) ** 2)[:2].mean(), rtol=1e-5)
  g = jax.grad(lambda y: cf.lirf_attention(jnp.asarray(s), y, jnp.ones(3)))(jnp.asarray(t))
  assert not np.any(np.asarray(g))


@pytest.mark.slow
def test_lirf_trains_the_lower_half_only_and_refuses_a_split_outside_the_model(tmp_path):
  config = load_config("gs_lora_casia100", "runlocal,method=cf_lirf")
  config.cf_lirf.split_blocks = 2  # the test ViT has 2 blocks
  with pytest.raises(ConfigError, match=r"^cf_lirf\.split_blocks: 2 \(expected 1 \.\. 1"):
    methods.run(config, str(tmp_path / "bad"))
  config.cf_lirf.split_blocks = 0
  config.train.log_every_steps = 1
  results = methods.run(config, str(tmp_path / "ok"))
  whole = models.init_variables(models.build(config.model), config.model, jax.random.key(0))
  total = sum(np.size(x) for x in jax.tree_util.tree_leaves(whole["params"]))
  assert 0.3 * total < results["num_trainable"] < 0.6 * total  # the lower half
  with open(tmp_path / "ok" / "metrics.jsonl") as f:
    rows = [json.loads(x) for x in f if '"at"' in x]
  assert rows and all(r["at"] >= 0 and r["kd"] >= 0 for r in rows)
  # The exported model: the trained lower half joined with the frozen rest, in the
  # checkpoint layout the model loads (every name and shape), the rest as pretrained.
  exported = checkpoint.load_npz(str(tmp_path / "ok" / "merged_params.npz"), whole["params"],
                                 head="keep")
  model_cfg = common.model_config(config)  # the run's start: init.kind random, its key
  start, _ = common.load_base(config, model_cfg, models.build(model_cfg),
                              jax.random.split(jax.random.key(int(config.seed)))[0])
  block = lambda p, i: p["Transformer"][f"encoderblock_{i}"]["MlpBlock_3"]["Dense_0"]["kernel"]
  assert not np.array_equal(block(exported, 0), block(start, 0))  # trained
  np.testing.assert_array_equal(block(exported, 1), block(start, 1))  # frozen
