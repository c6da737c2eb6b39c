"""Pieces every method needs: data sources, streams, the model, the optimizer, evaluation.

Kept deliberately thin so that each method module reads top to bottom.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import ml_collections
import optax

from kswap_jax import checkpoint as ckpt_lib
from kswap_jax import train
from kswap_jax.data import sources, streams
from kswap_jax.errors import ConfigError
from kswap_jax.models import vit

log = logging.getLogger("kswap_jax")


def load_sources(data_cfg: ml_collections.ConfigDict, roles=("old", "new")) -> dict[str, Any]:
  """{"old_train", "old_test", "new_train", "new_test"} for the given roles; a source
  shared by old and new is loaded once."""
  out = {}
  for role in roles:
    cfg = data_cfg[role]
    same = role == "new" and "old" in data_cfg and cfg.to_dict() == data_cfg.old.to_dict()
    for split in ("train", "test"):
      out[f"{role}_{split}"] = (out[f"old_{split}"] if same else
                                sources.load_source(cfg, split, field=f"data.{role}"))
  return out


def stream_kwargs(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Preprocessing and sharding arguments shared by all streams of a run."""
  d = config.data
  return dict(image_size=int(config.model.image_size), channels=int(config.model.channels),
              mean=d.mean, std=d.std, process_index=jax.process_index(),
              process_count=jax.process_count())


def check_batch_size(value: int, field: str, mesh) -> int:
  n = mesh.devices.size
  if value <= 0 or value % n:
    raise ConfigError(f"{field}: batch size {value} must be a positive multiple of the "
                      f"{n} device(s)")
  return value


def make_stream(config, subsets, *, batch_size: int, field: str, seed: int, cycle: bool, mesh):
  return streams.make_stream(
      subsets, batch_size=check_batch_size(batch_size, field, mesh), seed=seed, cycle=cycle,
      num_threads=int(config.data.num_threads), **stream_kwargs(config))


def eval_accuracies(config, eval_step, state, frozen, subsets: dict, mesh) -> dict[str, float]:
  """{name: accuracy %} of each subset under the arg-max over all head rows."""
  bs = check_batch_size(int(config.eval.batch_size), "eval.batch_size", mesh)
  return {name: train.evaluate(
      eval_step, state, frozen,
      streams.eval_batches(subset, batch_size=bs, **stream_kwargs(config)), mesh)
          for name, subset in subsets.items()}


def adamw(cfg: ml_collections.ConfigDict, *, extra: list | None = None, mask=None
          ) -> optax.GradientTransformation:
  """AdamW (decoupled decay, as torch/timm) with an injectable `learning_rate`.

  `extra(learning_rate)` may append transforms (e.g. the group-lasso proximal step) that
  need the same injected learning rate.
  """
  def make(learning_rate):
    parts = [optax.adamw(learning_rate, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                         weight_decay=cfg.weight_decay, mask=mask)]
    if extra is not None:
      parts += extra(learning_rate)
    return optax.chain(*parts)
  return optax.inject_hyperparams(make)(learning_rate=float(cfg.lr))


def model_config(config, num_classes: int | None = None) -> ml_collections.ConfigDict:
  cfg = ml_collections.ConfigDict(config.model.to_dict())
  if num_classes is not None:
    cfg.num_classes = num_classes
  return cfg


def load_base(config, model_cfg, model, rng) -> dict:
  """Base parameters per `config.init`: "npz" (a vit_jax checkpoint), "pretrain" (this
  repo's pretrain method, run into `<workdir>/pretrain` first if needed) or "random"."""
  kind = config.init.kind
  abstract = jax.eval_shape(lambda: vit.init_params(model, model_cfg, jax.random.key(0)))
  if kind == "random":
    return vit.init_params(model, model_cfg, rng)
  if kind == "npz":
    return ckpt_lib.load_npz(config.init.checkpoint, abstract, head=config.init.head, rng=rng)
  if kind == "pretrain":
    path = os.path.join(config.init.pretrain_workdir, "params.npz")
    if not os.path.exists(path):
      from kswap_jax.methods import pretrain  # pylint: disable=import-outside-toplevel
      log.info("no pretrained model at %s: running the pretrain method first", path)
      pretrain.run(config, config.init.pretrain_workdir)
    return ckpt_lib.load_npz(path, abstract, head=config.init.head, rng=rng,
                             field="init.pretrain_workdir")
  raise ConfigError(f"init.kind: unknown value {kind!r} (expected npz, pretrain or random)")
