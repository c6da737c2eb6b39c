"""Pieces every method needs: data sources, streams, the model, the optimizer, evaluation.

Kept deliberately thin so that each method module reads top to bottom.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import ml_collections
import numpy as np
import optax

from kswap_jax import checkpoint as ckpt_lib
from kswap_jax import metrics, models, train
from kswap_jax.data import augment, sources, streams
from kswap_jax.errors import ConfigError

log = logging.getLogger("kswap_jax")


def load_sources(data_cfg: ml_collections.ConfigDict, roles=("old", "new")) -> dict[str, Any]:
  """{"old_train", "old_test", "new_train", "new_test"} for the given roles; a source
  shared by old and new is loaded once. The training augmentation is checked here, before
  a method touches its workdir."""
  augment.check(str(data_cfg.augment), data_cfg.crop_padding)
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
              mean=d.mean, std=d.std, resample=str(d.resample),
              process_index=jax.process_index(), process_count=jax.process_count())


def check_batch_size(value: int, field: str, mesh) -> int:
  n = mesh.devices.size
  if value <= 0 or value % n:
    raise ConfigError(f"{field}: batch size {value} must be a positive multiple of the "
                      f"{n} device(s)")
  return value


# How a cycled (auxiliary) stream paired with an epoch-defining stream forms its batches.
AUX_BATCHES = ("per_epoch", "continuous")


def aux_restart(mode: str, field: str, epoch_stream) -> int:
  """`restart_every` of a cycled stream paired with `epoch_stream`: "per_epoch" (the
  reference loaders, re-created at every epoch: a fresh shuffle each epoch and a partial,
  padded last batch each pass) or "continuous" (0: full batches straddling passes)."""
  if mode not in AUX_BATCHES:
    raise ConfigError(f"{field}: {mode!r} (expected one of {', '.join(AUX_BATCHES)})")
  return epoch_stream.steps_per_epoch if mode == "per_epoch" else 0


_WARNED: set[str] = set()


def make_stream(config, subsets, *, batch_size: int, field: str, seed: int, cycle: bool, mesh,
                restart_every: int = 0):
  """A training stream over `subsets` (`streams.make_stream`), with the batch size checked
  against the mesh and a warning when an epoch-defining or restarted stream holds fewer
  records than one batch (the batch is then padded, masked, to its full size at every
  step; a cycled stream repeats records instead)."""
  count = sum(len(s) for s in subsets)
  if count < int(batch_size) and (not cycle or restart_every):
    message = (f"warning: {'+'.join(str(getattr(s, 'name', '?')) for s in subsets)} has "
               f"{count} record(s), fewer than one batch of {int(batch_size)} ({field}): "
               f"every step pads it, masked, to the full batch; a smaller {field} computes "
               f"less")
    if message not in _WARNED:  # a method may build a stream of one subset twice
      _WARNED.add(message)
      log.warning("%s", message)
  note_conversion(config, [s.source for s in subsets if hasattr(s, "source")])
  return streams.make_stream(
      subsets, batch_size=check_batch_size(batch_size, field, mesh), seed=seed, cycle=cycle,
      num_threads=int(config.data.num_threads), augment=str(config.data.augment),
      crop_padding=int(config.data.crop_padding), restart_every=restart_every,
      **stream_kwargs(config))


def note_conversion(config, sources) -> None:
  """Logs, once per source, how its stored images become the model's input when they
  differ in size or channels: resized with `data.resample`; RGB(A) turned to grayscale (a
  warning: colour, if any, is lost), RGBA's alpha dropped, or grayscale repeated into
  three channels. Methods call it before `train.Run`, so that a dry run shows it too.

  Raises:
    ConfigError: a channel count the conversion does not take (1, 3 or 4 to 1 or 3).
  """
  size, channels = int(config.model.image_size), int(config.model.channels)
  for source in sources:
    shape = tuple(getattr(source, "image_shape", ()) or ())
    if len(shape) != 3:
      continue
    height, width, have = shape
    if have is not None and (have not in (1, 3, 4) or channels not in (1, 3)):
      raise ConfigError(f"model.channels: {channels}, but the images of {source.name} have "
                        f"{have} channel(s); the data layer turns 1, 3 or 4 channels into 1 "
                        f"or 3")
    parts = []
    if (height, width) != (size, size):
      parts.append(f"resized ({config.data.resample})" if None not in (height, width) else
                   f"resized where they differ ({config.data.resample})")
    if have is not None and have != channels:
      parts.append("turned to grayscale (colour, if any, is lost)" if channels == 1 else
                   "grayscale repeated into 3 channels" if have == 1 else "alpha dropped")
    if not parts:
      continue
    stored = "x".join("?" if d is None else str(d) for d in shape)
    free = " (the size is not fixed in the dataset)" if None in (height, width) else ""
    lost = channels == 1 and have in (3, 4)
    message = (f"{'warning: ' if lost else ''}data: the images of {source.name} are "
               f"{stored}{free}, the model "
               f"takes {size}x{size}x{channels} (model.image_size, model.channels): "
               + ", ".join(parts))
    if message not in _WARNED:
      _WARNED.add(message)
      (log.warning if lost else log.info)("%s", message)


def predict_splits(config, predict_step, state, frozen, subsets: dict, mesh
                   ) -> dict[str, dict[str, np.ndarray]]:
  """{name: {"logits", "label"}} for each subset: one evaluation pass, outputs on the host."""
  bs = check_batch_size(int(config.eval.batch_size), "eval.batch_size", mesh)
  return {name: train.predict(
      predict_step, state, frozen,
      streams.eval_batches(subset, batch_size=bs, **stream_kwargs(config)), mesh)
          for name, subset in subsets.items()}


def eval_accuracies(config, predict_step, state, frozen, subsets: dict, mesh
                    ) -> dict[str, float]:
  """{name: top-1 accuracy %} of each subset (arg-max over all head rows)."""
  return {name: metrics.top1(out["logits"], out["label"])
          for name, out in predict_splits(config, predict_step, state, frozen, subsets,
                                          mesh).items()}


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


def abstract_variables(model, model_cfg) -> dict:
  """The model's variables as shapes only (for validation before anything is computed)."""
  return jax.eval_shape(lambda: models.init_variables(model, model_cfg, jax.random.key(0)))


def check_init_files(config) -> None:
  """`init.kind` and the files `init` names, before a run touches its workdir or pretrains:
  a missing checkpoint should cost seconds, not a pretraining run. (Its shapes:
  `check_init_checkpoint`; its values are read when it is loaded.)"""
  init = config.get("init")
  if init is None:
    return
  _check_init_kind(init.get("kind", "random"))
  if init.get("kind") == "npz":
    if not init.get("checkpoint"):
      raise ConfigError("init.checkpoint: empty; init.kind=npz needs the path of a .npz "
                        "checkpoint (python -m kswap_jax.convert writes one); without one, "
                        "init.kind=pretrain pretrains a model here first")
    _require_file("init.checkpoint", str(init.checkpoint), "a .npz checkpoint in our layout")
    problem = ckpt_lib.npz_problem(str(init.checkpoint))
    if problem:
      raise ConfigError(f"init.checkpoint: {str(init.checkpoint)!r} {problem}")
  elif init.get("checkpoint"):  # would be ignored: the run would not start from it
    raise ConfigError(f"init.checkpoint: {init.checkpoint} is set, but init.kind="
                      f"{init.get('kind')} does not read it; add --config.init.kind=npz to "
                      f"start from it, or leave init.checkpoint empty")
  if init.get("lora_checkpoint"):
    _require_file("init.lora_checkpoint", str(init.lora_checkpoint), _LORA_FILE)


def export_model(run_, params, model_state, name: str = "merged_params.npz") -> str:
  """Writes a run's model into its workdir as `name` in our checkpoint layout, with the
  model state (BatchNorm statistics) beside it (`model_state_path`), which `init.kind=npz`
  with `init.checkpoint` loads again; the first process only. Returns the path."""
  path = os.path.join(run_.workdir, name)
  if run_.is_main:  # the parameters last: a file there has its statistics beside it
    if model_state:
      ckpt_lib.save_npz(jax.device_get(model_state), model_state_path(path))
    ckpt_lib.save_npz(jax.device_get(params), path)
  return path


def model_state_path(path: str) -> str:
  """Where the model state (e.g. BatchNorm statistics) of the checkpoint `path` is saved."""
  return path[:-len(".npz")] + ".model_state.npz" if path.endswith(".npz") else path


def check_init_checkpoint(config) -> None:
  """An `.npz` `init.checkpoint`'s parameter names and shapes against the configured model,
  from the file's array headers (`checkpoint.check_npz`): the printer and a dry run find a
  checkpoint of another size, which the run would find only when it loads it."""
  init = config.get("init")
  if init is None or init.get("kind") != "npz" or "model" not in config:
    return
  model_cfg = model_config(config)
  abstract = abstract_variables(models.build(model_cfg), model_cfg)
  path = str(init.checkpoint)
  ckpt_lib.check_npz(path, abstract["params"], head=str(init.get("head", "extend")),
                     field="init.checkpoint")
  rest = {k: v for k, v in abstract.items() if k != "params"}
  if rest:  # e.g. BatchNorm statistics, in the file `load_base` reads beside it
    state_path = model_state_path(path)
    _require_file("init.checkpoint", state_path,
                  "the model state saved beside the checkpoint (e.g. BatchNorm statistics)")
    ckpt_lib.check_npz(state_path, rest, head="keep", field="init.checkpoint")


_INIT_KINDS = ("npz", "pretrain", "random")
_LORA_FILE = "the .lora.npz written by python -m kswap_jax.convert"


def _check_init_kind(kind) -> None:
  if kind not in _INIT_KINDS:
    raise ConfigError(f"init.kind: unknown value {kind!r} (expected {', '.join(_INIT_KINDS)})")


def _require_file(field: str, path: str, expected: str) -> None:
  if not os.path.isfile(path):
    what = "is a folder" if os.path.isdir(path) else "does not exist"
    raise ConfigError(f"{field}: {path!r} {what} (expected {expected})")


def load_base(config, model_cfg, model, rng) -> tuple[dict, dict]:
  """(params, model_state) per `config.init`: "npz" (a checkpoint in our layout),
  "pretrain" (the pretrain method's output in `init.pretrain_workdir`) or "random".

  This only loads: a method that wants a pretrained model calls
  `pretrain.ensure_pretrained` first, after validating its own config.
  """
  kind = config.init.kind
  abstract = abstract_variables(model, model_cfg)
  rest = {k: v for k, v in abstract.items() if k != "params"}
  if kind == "random":
    variables = models.init_variables(model, model_cfg, rng)
    return variables["params"], {k: v for k, v in variables.items() if k != "params"}
  if kind == "npz":
    path, field = config.init.checkpoint, "init.checkpoint"
  elif kind == "pretrain":
    path, field = os.path.join(config.init.pretrain_workdir, "params.npz"), "init.pretrain_workdir"
  else:
    _check_init_kind(kind)
  params = ckpt_lib.load_npz(path, abstract["params"], head=config.init.head, rng=rng,
                             field=field)
  model_state = {}
  if rest:  # e.g. BatchNorm statistics, saved beside the parameters
    model_state = ckpt_lib.load_npz(model_state_path(path), rest, head="keep", field=field)
  return params, model_state


def initial_lora(config, base: dict, spec, rng) -> dict:
  """The LoRA tree a run starts from: `init.lora_checkpoint` when set (its structure and
  shapes must be those `spec` gives on `base`), else a fresh `lora.init`."""
  from kswap_jax import interop, lora  # pylint: disable=import-outside-toplevel
  fresh = lora.init(base, spec, rng)
  path = str(config.init.get("lora_checkpoint", "") or "")
  if not path:
    return fresh
  _require_file("init.lora_checkpoint", path, _LORA_FILE)
  try:
    loaded = interop.load_lora(path)
  except (ValueError, OSError) as e:
    raise ConfigError(f"init.lora_checkpoint: {e}") from None
  want = {n: x.shape for n, x in lora.named_leaves(fresh)}
  got = {n: np.shape(x) for n, x in lora.named_leaves(loaded)}
  if want != got:
    diff = sorted(set(want) ^ set(got)) or [n for n in want if want[n] != got[n]]
    raise ConfigError(f"init.lora_checkpoint: {path} does not fit lora.targets/lora.rank of "
                      f"this config (first difference: {diff[0]})")
  return jax.tree_util.tree_map(lambda x: jax.numpy.asarray(x, jax.numpy.float32), loaded)
