"""Models by name: `model.name` -> the module that builds it, lazily imported.

Every model module provides

    build(model_cfg) -> flax.linen.Module
    init_variables(model, model_cfg, rng) -> {"params": ..., ["batch_stats": ...]}
    input_shape(model_cfg, batch) -> (batch, H, W, C)

and its `model.apply(variables, images, train=..., features=..., labels=...)` returns
logits (or the representation the head sees with `features=True`). A new model is a new
module plus one entry in `MODELS`.

Example:
  >>> model_cfg = models.default_config("vit_face")
  >>> model = models.build(model_cfg)
  >>> variables = models.init_variables(model, model_cfg, jax.random.key(0))
"""

from __future__ import annotations

import importlib
from typing import Any

import ml_collections

from kswap_jax.errors import ConfigError

# name -> (module, name of its dict of default `model` fields)
MODELS = {
    "vit": ("kswap_jax.models.vit", "DEFAULTS"),
    "vit_face": ("kswap_jax.models.vit", "FACE_DEFAULTS"),
    "resnet18_cifar": ("kswap_jax.models.resnet", "DEFAULTS"),
}


def _entry(name: str):
  if name not in MODELS:
    raise ConfigError(f"model.name: unknown model {name!r} (expected one of "
                      f"{', '.join(MODELS)})")
  module, defaults = MODELS[name]
  return importlib.import_module(module), defaults


def module(model_cfg: Any):
  """The module that implements `model_cfg.name` (default "vit")."""
  return _entry(str(model_cfg.get("name", "vit")))[0]


def default_config(name: str = "vit") -> ml_collections.ConfigDict:
  """The `model` config section of model `name` with its documented defaults."""
  mod, defaults = _entry(name)
  return ml_collections.ConfigDict(dict(getattr(mod, defaults)))


def build(model_cfg: Any):
  """The linen module for `model_cfg` (the `model` section, a ConfigDict or a dict);
  ConfigError names a bad field."""
  model_cfg = _section(model_cfg)
  return module(model_cfg).build(model_cfg)


def _section(model_cfg: Any) -> ml_collections.ConfigDict:
  """`model_cfg` as a ConfigDict; ConfigError for a whole run config instead of its `model`."""
  if isinstance(model_cfg, dict):
    model_cfg = ml_collections.ConfigDict(model_cfg)
  if not isinstance(model_cfg, ml_collections.ConfigDict):
    raise ConfigError(f"model: expected the model section (a ConfigDict or dict), got "
                      f"{type(model_cfg).__name__}")
  if "model" in model_cfg and "variant" not in model_cfg:
    raise ConfigError("model: got a whole run config; pass its model section (config.model)")
  return model_cfg


def init_variables(model: Any, model_cfg: Any, rng) -> dict[str, Any]:
  """Random variables {"params", ...} for the configured input shape. The ViT's linear head
  starts at zero, as vit_jax's: with a frozen head, gradients of everything below it are 0
  until trained or loaded weights replace it."""
  model_cfg = _section(model_cfg)
  return module(model_cfg).init_variables(model, model_cfg, rng)


def input_shape(model_cfg: Any, batch: int = 1) -> tuple[int, ...]:
  return (batch, int(model_cfg.image_size), int(model_cfg.image_size),
          int(model_cfg.channels))
