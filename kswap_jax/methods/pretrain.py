"""`pretrain`: full supervised training of the ViT on the old classes.

This produces the "pretrained model" that Knowledge Swapping starts from when no published
checkpoint is used (the bundled-digits demo): all parameters train with AdamW (decay on
kernels only, as timm), per-epoch warm-up + cosine LR, dropout on. The result is written
as a vit_jax-layout `params.npz` that `init.kind = "npz"/"pretrain"` loads.

Outputs in the workdir: `params.npz`, `results.json` ({"method": "pretrain", "stages":
[{"name": "pretrain", "acc": ...}], "final": {"acc": ...}}), `metrics.jsonl`, checkpoints.
"""

from __future__ import annotations

import logging
import os

import jax
import ml_collections

from kswap_jax import checkpoint as ckpt_lib
from kswap_jax import losses, train
from kswap_jax.data import splits
from kswap_jax.methods import common
from kswap_jax.models import vit
from kswap_jax.optim import schedules

log = logging.getLogger("kswap_jax")


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Pretrains on classes [0, swap.num_old_classes) of `data.old`; returns the results."""
  pcfg = config.pretrain
  num_classes = int(config.swap.num_old_classes)
  mesh = train.make_mesh()

  src = common.load_sources(config.data, roles=("old",))
  classes = tuple(range(num_classes))
  identity = {c: c for c in classes}
  train_set = splits.select(src["old_train"], classes, name="pretrain_train", label_map=identity,
                            field="swap.num_old_classes")
  test_set = splits.select(src["old_test"], classes, name="pretrain_test", label_map=identity,
                           field="swap.num_old_classes")

  stream = common.make_stream(config, [train_set], batch_size=int(pcfg.batch_size),
                              field="pretrain.batch_size", seed=int(config.seed), cycle=False,
                              mesh=mesh)
  common.check_batch_size(int(config.eval.batch_size), "eval.batch_size", mesh)
  model_cfg = common.model_config(config, num_classes)
  model = vit.build(model_cfg)
  params = vit.init_params(model, model_cfg, jax.random.key(int(config.seed)))
  run_ = train.Run(workdir, config)
  decay_mask = jax.tree_util.tree_map(lambda x: x.ndim >= 2, params)
  tx = common.adamw(pcfg.optim, mask=decay_mask)

  def loss_fn(params, frozen, batch, rng):
    del frozen
    b = batch["train"]
    logits = model.apply({"params": params}, b["image"], train=True, rngs={"dropout": rng})
    return losses.cross_entropy(logits, b["label"], b["mask"]), {}

  def logits_fn(params, model_state, frozen, batch):
    del model_state, frozen
    return model.apply({"params": params}, batch["image"])

  stage = train.Stage(
      name="pretrain", step_fn=train.make_train_step(loss_fn, tx, mesh),
      streams={"train": stream},
      epoch_stream="train", epochs=int(pcfg.epochs),
      hparams_fn=lambda e, _: {"learning_rate": schedules.warmup_epoch_cosine(
          e, base=float(pcfg.optim.lr), minimum=float(pcfg.optim.min_lr),
          epochs=int(pcfg.epochs), warmup_epochs=int(pcfg.warmup_epochs))})

  state = train.replicate(train.create_state(params, tx, int(config.seed)), mesh)
  state = run_.restore(state)
  state, _ = run_.run_stage(0, stage, state, {}, mesh)
  if "pretrain" not in run_.meta["results"]:
    eval_step = train.make_eval_step(logits_fn, mesh)
    acc = common.eval_accuracies(config, eval_step, state, {}, {"test": test_set}, mesh)
    run_.finish_stage(state, "pretrain", {"acc": acc["test"]})
  acc = run_.meta["results"]["pretrain"]["acc"]
  log.info("[pretrain] test accuracy on %d classes: %.2f%%", num_classes, acc)
  if run_.is_main:
    ckpt_lib.save_npz(jax.device_get(state.params), os.path.join(run_.workdir, "params.npz"))
  results = {"method": "pretrain", "config": config.to_dict(),
             "stages": [{"name": "pretrain", "acc": acc}], "final": {"acc": acc}}
  run_.write_results(results)
  run_.close()
  return results
