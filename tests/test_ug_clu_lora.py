"""The UG-CLU family with `clu.params = "lora"`: the trainable/frozen split
(`kswap_jax.methods.trainable`), a LoRA stream run and a LoRA baseline run, kill/resume in
LoRA mode, bad input, and the Fisher passes' `unlearn.fisher_augment` switch."""

import math
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import load_config, resumable_copy
from kswap_jax import checkpoint as ckpt_lib
from kswap_jax import lora, methods, models
from kswap_jax.data import sources, streams
from kswap_jax.errors import ConfigError
from kswap_jax.methods import common, trainable as trainable_lib, ug_clu
from kswap_jax.optim import saliency

FFN = r"lora/Transformer/encoderblock_\d/MlpBlock_3/Dense_[01]/(a|b)"


def lora_config(method="ug_clu"):
  """The ViT stream in LoRA mode, cut to two tasks, one request and 4 iterations a stage."""
  config = load_config("ug_clu_tinyimagenet", f"runlocal,params=lora,method={method}")
  config.clu.tasks = ((0, 1, 2, 3, 4), (5, 6, 7, 8, 9))
  config.clu.requests = ("learn:1", "learn:2", "forget:class:0,5")
  config.learn.iterations = config.oracle.iterations = config.unlearn.iterations = 4
  config.unlearn.forget_every = 2
  config.train.log_every_steps = 2
  return config


_RUNS = {}


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
  """(workdir, results) of one uninterrupted `ug_clu` LoRA run, shared by this module; it
  keeps every checkpoint, so a test can resume it from any stage's start."""
  if "run" not in _RUNS:
    workdir = str(tmp_path_factory.mktemp("ug_clu_lora"))
    config = lora_config()
    config.train.max_checkpoints_to_keep = 1000
    _RUNS["run"] = (workdir, methods.run(config, workdir))
  return _RUNS["run"]


def _restore_params(workdir):
  """The trainable tree of the last checkpoint of `workdir`."""
  checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"))
  manager = checkpointer.manager
  step = manager.latest_step()
  abstract = jax.tree_util.tree_map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype),
                                    manager.item_metadata(step)["state"])
  state = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract)))["state"]
  checkpointer.close()
  return state["params"]


def _start(config):
  """(model, trainable, the model's starting params, trainable tree, frozen tree)."""
  model_cfg = common.model_config(config)
  model = models.build(model_cfg)
  params = models.init_variables(model, model_cfg, jax.random.key(config.seed))["params"]
  trainable = ug_clu.make_trainable(config, model, params)
  tp, frozen = trainable.split(params, jax.random.fold_in(jax.random.key(config.seed), 1))
  return model, trainable, params, tp, frozen


@pytest.mark.slow
def test_lora_run_trains_only_the_lora_tree_and_the_head(lora_run):
  workdir, results = lora_run
  config = lora_config()
  _, trainable, start, tp0, frozen = _start(config)
  end = _restore_params(workdir)
  names = [n for n, _ in lora.named_leaves(end)]
  assert set(names) == {"base/head/bias", "base/head/kernel"} | {
      n for n in names if re.fullmatch(FFN, n)}
  assert len(names) == 2 + 8  # 2 blocks x 2 FFN kernels x (a, b)
  assert results["num_trainable"] == lora.count(end) == lora.count(tp0)
  assert results["params"] == "lora" and results["config"]["clu"]["params"] == "lora"
  # Folded back into the model's names: every leaf but the head and the FFN kernels is
  # bitwise the starting one; those moved (b left 0, the head trained).
  merged = dict(lora.named_leaves(trainable.full(end, frozen)))
  before = dict(lora.named_leaves(start))
  assert set(merged) == set(before)
  moved = {n for n in before if not np.array_equal(np.asarray(merged[n]), before[n])}
  assert moved == {"head/bias", "head/kernel"} | {
      f"Transformer/encoderblock_{i}/MlpBlock_3/Dense_{j}/kernel" for i in (0, 1)
      for j in (0, 1)}
  assert all(np.any(np.asarray(x) != 0) for n, x in lora.named_leaves(end) if n.endswith("/b"))


def test_lora_loss_and_gradients_equal_the_merged_full_model(tiny):
  """The LoRA-mode phase loss on (LoRA + head, frozen) is the full-parameter loss of the
  merged model, and its gradients are the chain rule through W + s·a b."""
  _, model, params = tiny
  spec = lora.LoraSpec(targets=f"{lora.FFN_TARGETS}|{lora.ATTENTION_TARGETS}", rank=2,
                       alpha=4.0)
  t = trainable_lib.Trainable(model, "lora", spec, train=r"head/.*")
  tp, frozen = t.split(params, jax.random.key(1))
  assert set(frozen["base"]) | set(tp["base"]) == set(params) and set(tp["base"]) == {"head"}
  # b ≠ 0 so that the merge matters.
  draw = np.random.default_rng(2)
  tp["lora"] = jax.tree_util.tree_map_with_path(
      lambda path, x: x if path[-1].key == "a" else jnp.asarray(
          0.3 * draw.standard_normal(x.shape), jnp.float32), tp["lora"])
  config = methods.default_config("ug_clu")
  batch = {"retain": {"image": jnp.asarray(draw.standard_normal((4, 16, 16, 3)), jnp.float32),
                      "label": jnp.array([0, 3, 7, 9]), "mask": jnp.array([1.0, 1, 1, 0])}}
  rng = jax.random.key(4)
  slow = ug_clu.make_losses(t, config)["slow"]
  slow_full = ug_clu.make_losses(trainable_lib.Trainable(model), config)["slow"]
  merged = t.full(tp, frozen)
  grad = lambda f: jax.jit(jax.value_and_grad(f, has_aux=True))
  (l_lora, _), g_lora = grad(slow)(tp, frozen, batch, rng, {})
  (l_full, _), g_full = grad(slow_full)(merged, {}, batch, rng, {})
  np.testing.assert_allclose(float(l_lora), float(l_full), rtol=1e-5)
  for name in ("kernel", "bias"):
    np.testing.assert_allclose(g_lora["base"]["head"][name], g_full["head"][name],
                               rtol=1e-4, atol=1e-6)
  targets = lora.target_kernels(params, spec)
  assert len(targets) == 2 * 6
  for kernel_name, _ in targets:
    module = kernel_name.rsplit("/", 1)[0]
    a = lora.leaf_by_name(tp["lora"], module + "/a")
    b = lora.leaf_by_name(tp["lora"], module + "/b")
    g = lora.leaf_by_name(g_full, kernel_name).reshape(a.shape[0], b.shape[1])
    np.testing.assert_allclose(lora.leaf_by_name(g_lora["lora"], module + "/a"),
                               spec.scale * g @ b.T, rtol=1e-3, atol=1e-6)
    np.testing.assert_allclose(lora.leaf_by_name(g_lora["lora"], module + "/b"),
                               spec.scale * a.T @ g, rtol=1e-3, atol=1e-6)


def test_lora_forward_keeps_batchnorm_statistics():
  """With BatchNorm (the CIFAR ResNet, LoRA on its `linear` head) the LoRA forward in train
  mode returns the same logits and updated statistics as the merged model."""
  config = load_config("ug_clu_digits", "runlocal")
  model_cfg = common.model_config(config)
  model = models.build(model_cfg)
  abstract = common.abstract_variables(model, model_cfg)  # shapes only: no slow init
  draw = np.random.default_rng(0)  # numpy: a jax.random call per shape compiles each time
  params = jax.tree_util.tree_map(
      lambda x: jnp.asarray(0.3 * draw.standard_normal(x.shape), jnp.float32),
      abstract["params"])
  ms = {"batch_stats": jax.tree_util.tree_map(lambda x: jnp.ones(x.shape),
                                              abstract["batch_stats"])}
  spec = lora.LoraSpec(targets="linear/kernel", rank=2, alpha=2.0)
  t = trainable_lib.Trainable(model, "lora", spec, train="")
  tp, frozen = t.split(params, jax.random.key(1))
  tp["lora"]["linear"]["b"] = jnp.ones_like(tp["lora"]["linear"]["b"])
  images = jnp.asarray(draw.standard_normal((4, 16, 16, 1)), jnp.float32)
  mask = jnp.array([1.0, 1.0, 1.0, 0.0])
  kw = dict(train=True, mask=mask, mutable=["batch_stats"])

  @jax.jit
  def forwards(tp, frozen, ms):
    full = trainable_lib.Trainable(model).apply(t.full(tp, frozen), {}, ms, images, **kw)
    return t.apply(tp, frozen, ms, images, **kw), full
  (y, new), (y_full, new_full) = forwards(tp, frozen, ms)
  np.testing.assert_allclose(y, y_full, rtol=1e-5, atol=1e-5)
  for a, b, old in zip(jax.tree_util.tree_leaves(new), jax.tree_util.tree_leaves(new_full),
                       jax.tree_util.tree_leaves(ms)):
    np.testing.assert_allclose(a, b, rtol=1e-6)
    assert not np.allclose(a, old)  # the running statistics moved


@pytest.mark.slow
def test_lora_stream_results_and_its_oracle(lora_run):
  workdir, results = lora_run
  assert [s["name"] for s in results["stages"]] == ["1_learn", "2_learn", "3_forget"]
  forget = results["stages"][-1]
  for key in ("ua", "ra", "ta", "mia_efficacy", "avg_gap", "js_to_retrain"):
    assert math.isfinite(forget[key]), key
  assert 0.0 < forget["mask_kept_fraction"] < 1.0
  # The oracle follows clu.params (oracle.params = "clu"): a LoRA run as well.
  import json  # pylint: disable=import-outside-toplevel
  with open(os.path.join(workdir, "oracle", "results.json")) as f:
    oracle = json.load(f)
  assert oracle["params"] == "lora" and oracle["num_trainable"] == results["num_trainable"]
  # oracle.params = "full": a full-parameter oracle, the same as a full-parameter method's.
  full_oracle = ug_clu.oracle_config(_with(lora_config(), "oracle.params", "full"))
  assert full_oracle.clu.params == "full"
  assert full_oracle == ug_clu.oracle_config(_with(lora_config(), "clu.params", "full"))


def _with(config, field, value):
  section, key = field.split(".")
  config[section][key] = value
  return config


@pytest.mark.slow
def test_lora_baseline_run(tmp_path):
  """SalUn in LoRA mode: the mask and the update are over the LoRA tree and the head."""
  config = lora_config("clu_salun")
  config.oracle.enabled = False
  config.salun.iterations = 4
  config.salun.batch_size = config.salun.mask_batch_size = 32
  results = methods.run(config, str(tmp_path))
  assert results["params"] == "lora" and results["config"]["clu"]["params"] == "lora"
  _, _, _, tp0, _ = _start(config)
  assert results["num_trainable"] == lora.count(tp0) == 2 * 2 * 8 * (64 + 128) + 64 * 20 + 20
  forget = results["stages"][-1]
  assert forget["mask_kept_fraction"] == pytest.approx(0.2, abs=1e-3)
  assert math.isfinite(forget["ua"]) and math.isfinite(forget["ra"])
  names = [n for n, _ in lora.named_leaves(_restore_params(str(tmp_path)))]
  assert all(re.fullmatch(f"{FFN}|base/head/(kernel|bias)", n) for n in names), names


@pytest.mark.slow
def test_lora_run_killed_mid_forget_resumes_to_the_same_results(lora_run, tmp_path):
  """Killed in the masked stage (steps 9-12 after 4 + 4 learning steps) and rerun. The
  killed run starts from the uninterrupted run's checkpoint at step 8, its oracle done."""
  reference_dir, reference = lora_run
  workdir = str(tmp_path / "killed")
  assert resumable_copy(reference_dir, workdir, 12) == 8
  config = lora_config()
  config.debug.interrupt_at_step = 12
  config.train.checkpoint_every_steps = 2  # a checkpoint inside the masked stage, at 10
  with pytest.raises(SystemExit, match="interrupt_at_step"):
    methods.run(config, workdir)
  resumed = methods.run(lora_config(), workdir)
  strip = lambda stages: [{k: v for k, v in s.items() if k != "seconds"} for s in stages]
  assert strip(resumed["stages"]) == strip(reference["stages"])
  assert resumed["final"] == reference["final"]


def test_trainable_split_errors_name_the_field(tiny):
  _, model, params = tiny
  cfg = ug_clu.sections()["lora"]

  def make(kind="lora", train=r"head/.*", targets=None):
    section = cfg.copy_and_resolve_references()
    if targets is not None:
      section.targets = targets
    return trainable_lib.from_config(model, kind, section, train, params,
                                     kind_field="clu.params", train_field="clu.lora_train")
  with pytest.raises(ConfigError, match=r"^clu\.params: 'bogus'"):
    make("bogus")
  with pytest.raises(ConfigError, match=r"^lora\.targets: regex .* matches no kernel"):
    make(targets=r"nothing/kernel")
  with pytest.raises(ConfigError, match=r"^clu\.lora_train: regex 'heads/.\*' matches no"):
    make(train=r"heads/.*")
  with pytest.raises(ConfigError, match=r"^clu\.lora_train: .*Dense_0/kernel is also a LoRA"):
    make(train=r"head/.*|.*MlpBlock_3/Dense_0/kernel")
  with pytest.raises(ConfigError, match=r"^clu\.lora_train: invalid regex"):
    make(train="head/(")
  assert make(train="").split(params, jax.random.key(0))[0]["base"] == {}
  assert make("full").split(params)[1] == {}


def test_lora_oracle_from_random_weights_under_a_pretrained_base_is_refused(tmp_path):
  config = load_config("ug_clu_digits", "runlocal")
  config.clu.params = "lora"
  config.init.kind = "npz"
  config.init.checkpoint = str(tmp_path / "base.npz")  # an .npz (`methods.run` checks first);
  np.savez(tmp_path / "base.npz", unused=np.zeros(1))  # refused before it is read
  with pytest.raises(ConfigError, match=r"^oracle\.start: 'random' with clu\.params='lora'"):
    methods.run(config, "/nonexistent/never/written")


class _Stop(Exception):
  pass


@pytest.mark.slow
def test_fisher_augment_switches_the_training_augmentation_of_the_fisher_passes(
    monkeypatch, tmp_path):
  """The first Fisher pass (D_U) sees `data.augment` (crop_flip) with
  unlearn.fisher_augment=True, and exactly the plain evaluation images without it; the
  two give different Fisher diagonals F_U."""
  config = lora_config()  # after `lora_run` in this module: its compiled steps are reused
  config.data.augment = "crop_flip"
  config.clu.requests = ("learn:1", "forget:class:0")
  config.oracle.enabled = False
  train_src = sources.load_source(config.data.old, "train")
  plans = ug_clu.plan_stages(np.asarray(train_src.labels), config.clu.tasks,
                             ug_clu.parse_requests(config.clu.requests, 2), (),
                             ug_clu.random_permutation(len(train_src), 0))
  plain = list(streams.eval_batches(ug_clu._subset(train_src, plans[1].forget, "u"),
                                    batch_size=config.unlearn.fisher_batch_size,
                                    **common.stream_kwargs(config)))
  real, seen = saliency.fisher_diagonal, {}

  def first_pass(grad_fn, params, batches):
    seen["batches"] = list(batches)
    seen["fisher"] = real(grad_fn, params, iter(seen["batches"]))
    raise _Stop
  monkeypatch.setattr(saliency, "fisher_diagonal", first_pass)
  fisher = {}
  for augment in (True, False):
    config.unlearn.fisher_augment = augment
    with pytest.raises(_Stop):
      methods.run(config, str(tmp_path / str(augment)))
    got = seen["batches"]
    assert len(got) == len(plain) >= 1
    for g, p in zip(got, plain):
      np.testing.assert_array_equal(np.asarray(g["label"]), p["label"])
    same = [np.array_equal(np.asarray(g["image"]), p["image"]) for g, p in zip(got, plain)]
    assert all(same) if not augment else not any(same)
    fisher[augment] = seen["fisher"]
  diff = jax.tree_util.tree_map(lambda a, b: float(jnp.max(jnp.abs(a - b))), fisher[True],
                                fisher[False])
  assert max(jax.tree_util.tree_leaves(diff)) > 0
