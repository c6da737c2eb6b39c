"""`pretrain`: full supervised training of a model on the old classes.

This produces the "pretrained model" the forgetting methods start from when no published
checkpoint is used (the bundled-digits demos): all parameters train with AdamW (decay on
kernels only, as timm), per-epoch warm-up + cosine LR, dropout on; BatchNorm statistics
(ResNet) are updated in train mode. With a CosFace head the training logits carry the
margin, as the Face Transformer's pretraining. The result is written as `params.npz` in
the vit_jax naming (plus `params.model_state.npz` for BatchNorm statistics), which
`init.kind = "npz"/"pretrain"` loads.

Outputs in the workdir: `params.npz`, `results.json` ({"method": "pretrain", "stages":
[{"name": "pretrain", "acc": ...}], "final": {"acc": ...}}), `metrics.jsonl`, checkpoints.
"""

from __future__ import annotations

import json
import logging
import os

import jax
import ml_collections

from kswap_jax import checkpoint as ckpt_lib
from kswap_jax import losses, models, report, train
from kswap_jax.data import splits
from kswap_jax.errors import ConfigError, DryRunComplete
from kswap_jax.methods import common
from kswap_jax.optim import schedules

log = logging.getLogger("kswap_jax")


def sections() -> dict[str, ml_collections.ConfigDict]:
  """Pretraining uses only the shared sections (`pretrain`, `data.old`, `model`)."""
  return {}


def num_classes(config) -> int:
  return int(config.pretrain.num_classes) or int(config.model.num_classes)


# The config fields pretraining reads (not data.new, the swap's, nor the resumable ones):
# a pretrained model is reused by a run whose config agrees with its own in all of them.
PRETRAIN_FIELDS = ("seed", "model", "data.old", "data.mean", "data.std", "data.augment",
                   "data.crop_padding", "data.resample", "pretrain")
# Model fields that change how the model computes, not its parameters' names or values:
# a model pretrained unscanned is reused by a scanned run (its checkpoint is converted).
PRETRAIN_LAYOUT = ("model.scan", "model.remat", "model.remat_policy")


def fill_pretrain_workdir(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Sets an empty `init.pretrain_workdir` to its default, `<workdir>/pretrain`."""
  if not config.init.get("pretrain_workdir"):
    with config.unlocked():
      config.init.pretrain_workdir = os.path.join(workdir, "pretrain")


def ensure_pretrained(config: ml_collections.ConfigDict, workdir: str) -> None:
  """With `init.kind = "pretrain"`, runs (or resumes) pretraining into
  `init.pretrain_workdir` (default `<workdir>/pretrain`) unless its params exist.

  Methods call this after validating their own config, so bad input never costs a
  pretraining run.
  """
  if config.init.kind != "pretrain":
    return
  fill_pretrain_workdir(config, workdir)
  path = os.path.join(config.init.pretrain_workdir, "params.npz")
  if not os.path.exists(path):
    log.info("no pretrained model at %s: running the pretrain method first",
             os.path.abspath(path))
    run(config, config.init.pretrain_workdir)
    return
  check_pretrained(config, workdir)


def check_head(config: ml_collections.ConfigDict) -> None:
  """With `init.kind = "pretrain"`, the pretrained head must fit the run's model under
  `init.head` (checked before pretraining, which would otherwise run first and then fail to
  load): "keep" needs pretrain.num_classes = model.num_classes, "extend" at most as many
  (ViT heads; other models' heads are not extended), "replace" any.

  Raises:
    ConfigError: naming pretrain.num_classes.
  """
  if config.init.kind != "pretrain" or config.method == "pretrain":
    return
  n, m, mode = num_classes(config), int(config.model.num_classes), str(config.init.head)
  extendable = mode == "extend" and str(config.model.get("name", "vit")).startswith("vit")
  if (mode == "keep" or (mode == "extend" and not extendable)) and n != m:
    how = ("loads the pretrained head as it is" if mode == "keep" else
           f"extends ViT heads only, not {config.model.get('name')}'s")
    raise ConfigError(f"pretrain.num_classes: {n}, but the run's model has "
                      f"model.num_classes = {m} and init.head = {mode!r} {how}; set them equal")
  if extendable and n > m:
    raise ConfigError(f"pretrain.num_classes: {n}, more than model.num_classes = {m}: the "
                      f"pretrained head could not be extended to the run's (init.head = "
                      f"'extend')")


def dry_run_note(config: ml_collections.ConfigDict, workdir: str) -> str:
  """For a method's dry run: what its start from a pretrained model would do, with a dry
  run of the pretraining when it would run first ("" when `init.kind` is not "pretrain")."""
  if config.init.kind != "pretrain" or config.method == "pretrain":
    return ""
  fill_pretrain_workdir(config, workdir)
  folder = os.path.abspath(str(config.init.pretrain_workdir))
  if os.path.exists(os.path.join(folder, "params.npz")):
    return f"; it starts from the model pretrained in {folder}"
  try:
    with train.dry_run():
      run(config, folder)
  except DryRunComplete as done:
    return (f"; it would first pretrain in {folder}" +
            (" (resuming the pretraining there)" if done.resumes else "") +
            ", whose checks passed too")
  return ""


def check_pretrained(config: ml_collections.ConfigDict, workdir: str) -> None:
  """With `init.kind = "pretrain"`, a finished pretraining run in `init.pretrain_workdir`
  (default `<workdir>/pretrain`) must have pretrained the way `config` would
  (`PRETRAIN_FIELDS`, less `PRETRAIN_LAYOUT`); `methods.run` checks it before the method
  starts.

  Raises:
    ConfigError: naming the first field that differs.
  """
  if config.init.kind != "pretrain":
    return
  folder = str(config.init.pretrain_workdir or os.path.join(workdir, "pretrain"))
  record = os.path.join(folder, "config.json")
  if not (os.path.exists(os.path.join(folder, "params.npz")) and os.path.exists(record)):
    return
  with open(record) as f:
    diff = train.config_difference(json.load(f), config, PRETRAIN_FIELDS, PRETRAIN_LAYOUT)
  if diff:
    raise ConfigError(f"init.pretrain_workdir {folder}: holds a model pretrained with "
                      f"another config ({diff}); use another init.pretrain_workdir, or "
                      f"delete it to pretrain again")


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Pretrains on classes [0, pretrain.num_classes) of `data.old`; returns the results."""
  pcfg = config.pretrain
  n = num_classes(config)
  mesh = train.mesh_for(config)

  src = common.load_sources(config.data, roles=("old",))
  classes = tuple(range(n))
  identity = {c: c for c in classes}
  train_set = splits.select(src["old_train"], classes, name="pretrain_train", label_map=identity,
                            field="pretrain.num_classes")
  test_set = splits.select(src["old_test"], classes, name="pretrain_test", label_map=identity,
                           field="pretrain.num_classes")

  stream = common.make_stream(config, [train_set], batch_size=int(pcfg.batch_size),
                              field="pretrain.batch_size", seed=int(config.seed), cycle=False,
                              mesh=mesh)
  common.check_batch_size(int(config.eval.batch_size), "eval.batch_size", mesh)
  model_cfg = common.model_config(config, n)
  model = models.build(model_cfg)
  variables = models.init_variables(model, model_cfg, jax.random.key(int(config.seed)))
  params = variables.pop("params")
  log.info("pretrain: classes 0..%d, %d training and %d test images", n - 1, len(train_set),
           len(test_set))
  run_ = train.Run(workdir, config)
  decay_mask = jax.tree_util.tree_map(lambda x: x.ndim >= 2, params)
  tx = common.adamw(pcfg.optim, mask=decay_mask)
  mutable = bool(variables)  # BatchNorm statistics

  def loss_fn(params, frozen, batch, rng, model_state=None):
    del frozen
    b = batch["train"]
    kwargs = dict(train=True, rngs={"dropout": rng}, labels=b["label"])
    if mutable:
      logits, new_state = model.apply({"params": params, **model_state}, b["image"],
                                      mask=b["mask"], mutable=list(model_state), **kwargs)
      return losses.cross_entropy(logits, b["label"], b["mask"]), ({}, new_state)
    logits = model.apply({"params": params}, b["image"], **kwargs)
    return losses.cross_entropy(logits, b["label"], b["mask"]), {}

  def logits_fn(params, model_state, frozen, batch):
    del frozen
    return model.apply({"params": params, **model_state}, batch["image"],
                       labels=batch["label"])

  epochs, warmup = int(pcfg.epochs), int(pcfg.warmup_epochs)
  lr = schedules.warmup_epoch_cosine(base=float(pcfg.optim.lr), minimum=float(pcfg.optim.min_lr),
                                     epochs=epochs, warmup_epochs=warmup)
  stage = train.Stage(
      name="pretrain", step_fn=train.make_train_step(loss_fn, tx, mesh, mutable=mutable),
      streams={"train": stream}, epoch_stream="train", epochs=epochs,
      hparams_fn=lambda e, _: {"learning_rate": lr(e)})

  state = train.replicate(train.create_state(params, tx, int(config.seed),
                                             model_state=variables), mesh)
  state = run_.restore(state)
  state, _ = run_.run_stage(0, stage, state, {}, mesh)
  if "pretrain" not in run_.meta["results"]:
    predict_step = train.make_predict_step(logits_fn, mesh)
    acc = common.eval_accuracies(config, predict_step, state, {}, {"test": test_set}, mesh)
    run_.finish_stage(state, "pretrain", {"acc": acc["test"]})
  acc = run_.meta["results"]["pretrain"]["acc"]
  log.info("[pretrain] test accuracy on classes 0..%d (argmax over the pretraining head's %d "
           "rows; a method's own evaluation may use more): %.2f%%", n - 1, n, acc)
  if run_.is_main:
    path = os.path.join(run_.workdir, "params.npz")
    if state.model_state:
      ckpt_lib.save_npz(jax.device_get(state.model_state),
                        os.path.join(run_.workdir, "params.model_state.npz"))
    ckpt_lib.save_npz(jax.device_get(state.params), path)  # last: its presence means done
  results = {"method": "pretrain", "config": config.to_dict(),
             "stages": [{"name": "pretrain", "acc": acc}], "final": {"acc": acc}}
  run_.announce(report.stage_table(results), run_.write_results(results))
  run_.close()
  return results
