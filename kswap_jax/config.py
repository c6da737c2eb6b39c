"""Default config fields shared by every run, and the `arg` string parser for configs.

Every field a user may override (`--config.<field>=value`) is here with its default.
Defaults follow the Knowledge Swapping reference code (spec `knowledge_swapping.md`);
fields for reconstructed choices say so in their comment.
"""

from __future__ import annotations

import math

import ml_collections

from kswap_jax import models
from kswap_jax.errors import ConfigError
from kswap_jax.lora import FFN_TARGETS


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """Parses a config arg like "method=laf,runlocal" into a ConfigDict over `defaults`.

  A bare word sets a boolean to True. Values are converted to the default's type.

  Raises:
    ConfigError: unknown key or unparsable value.
  """
  out = ml_collections.ConfigDict(defaults)
  for part in filter(None, (arg or "").split(",")):
    key, eq, value = part.partition("=")
    key = key.strip()
    if key not in defaults:
      raise ConfigError(f"--config arg: unknown key {key!r} (known: {', '.join(defaults)})")
    kind = type(defaults[key])
    if not eq:
      if kind is not bool:
        raise ConfigError(f"--config arg: {key} needs a value ({key}=...)")
      out[key] = True
      continue
    try:
      out[key] = (value.lower() in ("1", "true", "yes")) if kind is bool else kind(value)
    except ValueError:
      raise ConfigError(f"--config arg: {key}={value!r} is not a valid {kind.__name__}") from None
  return out


def base_config() -> ml_collections.ConfigDict:
  """All fields with reference defaults; a config file then sets data, model and classes."""
  c = ml_collections.ConfigDict()
  c.method = "lbf"          # pretrain | lbf | laf
  c.seed = 1337             # the reference's torch.manual_seed(1337)

  # Architecture fields and defaults belong to the model (kswap_jax/models/vit.py DEFAULTS).
  c.model = models.default_config("vit")

  c.lora = ml_collections.ConfigDict(dict(
      targets=FFN_TARGETS,   # regex over "/"-joined kernel names; FFN fc1/fc2 of every block
      rank=8,
      alpha=1.0,             # scale = alpha / rank = 1/8 (loralib default alpha 1)
      init_slope=math.sqrt(50.0),  # kaiming-uniform slope of A: the reference's sqrt(50)
  ))

  c.group_lasso = ml_collections.ConfigDict(dict(
      mode="penalty",        # penalty: α·Ω in the loss (reference); proximal: exact prox step
      alpha=0.005,
      grouping="block",      # block | module | leaf
  ))

  c.optim = ml_collections.ConfigDict(dict(
      lr=1e-2, min_lr=1e-5, weight_decay=0.05, b1=0.9, b2=0.999, eps=1e-8))

  c.ks = ml_collections.ConfigDict(dict(
      beta=0.2,              # retain weight when learning, forget weight when forgetting
      bound=105.0,           # BND of ReLU(BND − CE_f)
      learn_epochs=5,
      forget_epochs=5,
      batch_size=80,         # global batch of every stream
      reset_optimizer_between_stages=False,  # ablation; the reference carries the state over
  ))

  c.swap = ml_collections.ConfigDict(dict(
      num_old_classes=100,   # pretrained label space [0, num_old_classes)
      forget_classes=(0, 1, 2, 3, 4),  # [unknown] in the paper: the authors' folders fix them
      retain_classes=(),     # empty = every old class not forgotten
      learn_classes=(0, 1, 2, 3, 4),   # ids of data.new; become num_old + rank
      retain_ratio=0.1, forget_ratio=0.1, learn_ratio=1.0,
      retain_shots=0, forget_shots=0, learn_shots=0,   # >0: exactly n per class
      seed=1337,             # subset draw (numpy default_rng over sorted ids)
  ))

  c.data = ml_collections.ConfigDict(dict(
      old=dict(kind="tfds", name="", data_dir="", train_split="train", test_split="test",
               image_key="image", label_key="label"),
      new=dict(kind="tfds", name="", data_dir="", train_split="train", test_split="test",
               image_key="image", label_key="label"),
      mean=0.5, std=0.5,     # (x/255 − 0.5)/0.5 as the reference
      num_threads=0,         # grain read threads; 0 reads in the main thread
  ))

  c.eval = ml_collections.ConfigDict(dict(
      batch_size=80,
      every_steps=0,         # >0: also evaluate every N steps of a stage (the reference: 5)
  ))

  c.init = ml_collections.ConfigDict(dict(
      kind="npz",            # npz | pretrain | random
      checkpoint="",         # the vit_jax .npz for kind=npz
      head="extend",         # extend | replace | keep (see checkpoint.load_npz)
      pretrain_workdir="",   # kind=pretrain: default <workdir>/pretrain
  ))

  c.pretrain = ml_collections.ConfigDict(dict(
      epochs=30, warmup_epochs=2, batch_size=64,
      optim=dict(lr=1e-3, min_lr=1e-5, weight_decay=0.05, b1=0.9, b2=0.999, eps=1e-8),
  ))

  c.train = ml_collections.ConfigDict(dict(
      log_every_steps=10,
      checkpoint_every_steps=100,
      max_checkpoints_to_keep=2,
  ))

  c.export = ml_collections.ConfigDict(dict(merged_npz=True))
  c.debug = ml_collections.ConfigDict(dict(interrupt_at_step=0))  # simulate a kill (tests)
  return c
