"""CIFAR ResNet-18 in Flax linen (the network of the SFR-on / SalUn CIFAR experiments).

The CIFAR variant of He et al.'s ResNet-18: a 3x3 stride-1 stem convolution without
max-pool, four stages of two BasicBlocks with 64, 128, 256 and 512 channels (stride 2 from
the second stage on, a 1x1 convolution + BatchNorm shortcut where the shape changes), a
global average pool (the 4x4 pool of the reference on 32x32 inputs) and a linear head. For
10 classes it has 11,173,962 parameters. Names follow the common PyTorch implementation
(`conv1`, `bn1`, `layer{s}_{b}/{conv1, bn1, conv2, bn2, shortcut_conv, shortcut_bn}`,
`linear`), so its weights map one to one.

BatchNorm statistics are computed over the VALID samples only: `mask` (batch,) marks the
real slots of a padded partial batch, and padded slots change neither the normalisation
statistics nor `batch_stats`. Two conventions (`model.batch_norm`):
  * "torch" (default): running = 0.9·running + 0.1·batch, the running variance from the
    UNBIASED batch variance (n/(n−1)), eps 1e-5; normalisation with the biased variance.
    This is `torch.nn.BatchNorm2d`, for parity with PyTorch runs.
  * "flax": `flax.linen.BatchNorm` with its defaults (running = 0.99·running + 0.01·batch,
    biased variance, eps 1e-5).

    >>> cfg = models.default_config("resnet18_cifar")
    >>> model = models.build(cfg)
    >>> variables = models.init_variables(model, cfg, jax.random.key(0))
    >>> logits, updates = model.apply(variables, images, train=True, mask=batch["mask"],
    ...                               mutable=["batch_stats"])

References: He et al., arXiv 1512.03385; the CIFAR layout of Fan et al., arXiv 2310.12508
(SalUn) and Huang et al., arXiv 2409.19732 (SFR-on).
"""

from __future__ import annotations

import re
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from kswap_jax.errors import ConfigError

BATCH_NORMS = ("torch", "flax")

# `model` config fields of the CIFAR ResNet-18 and their defaults.
DEFAULTS = dict(
    name="resnet18_cifar",
    num_classes=10,
    image_size=32,
    channels=3,
    width=64,              # channels of the stem and first stage (then 2x, 4x, 8x)
    stage_blocks=(2, 2, 2, 2),  # BasicBlocks per stage (ResNet-18)
    batch_norm="torch",    # torch | flax: running-statistics convention (module docstring)
)

_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")  # He, fan-out


class MaskedBatchNorm(nn.Module):
  """BatchNorm over (batch, H, W) with PyTorch's running-statistics convention and a mask.

      μ, σ² = mean and biased variance over the valid samples (n values per channel)
      y = (x − μ)/√(σ² + ε)·scale + bias
      running_mean ← (1 − m)·running_mean + m·μ
      running_var  ← (1 − m)·running_var + m·σ²·n/(n − 1)     (unbiased; torch)

  Variables are named like `flax.linen.BatchNorm`'s (params scale, bias; batch_stats
  mean, var). A batch with no valid sample leaves the running statistics unchanged.

  Attributes:
    momentum: m, the weight of the NEW batch value (torch: 0.1).
    epsilon: ε (1e-5).
    unbiased_running_var: update the running variance with n/(n−1)·σ² (torch).
  """
  momentum: float = 0.1
  epsilon: float = 1e-5
  unbiased_running_var: bool = True

  @nn.compact
  def __call__(self, x, *, train: bool, mask: jax.Array | None = None):
    c = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
    ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
    ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
    xf = x.astype(jnp.float32)
    if train:
      axes = tuple(range(x.ndim - 1))
      per_sample = 1
      for d in x.shape[1:-1]:
        per_sample *= d
      if mask is None:
        w = jnp.ones((x.shape[0],) + (1,) * (x.ndim - 1), jnp.float32)
      else:
        w = mask.astype(jnp.float32).reshape((x.shape[0],) + (1,) * (x.ndim - 1))
      n = jnp.sum(w) * per_sample
      safe_n = jnp.maximum(n, 1.0)
      mean = jnp.sum(xf * w, axis=axes) / safe_n
      var = jnp.sum(jnp.square(xf - mean) * w, axis=axes) / safe_n
      if not self.is_initializing():
        unbiased = var * n / jnp.maximum(n - 1.0, 1.0) if self.unbiased_running_var else var
        m = self.momentum
        keep = n > 0
        ra_mean.value = jnp.where(keep, (1 - m) * ra_mean.value + m * mean, ra_mean.value)
        ra_var.value = jnp.where(keep, (1 - m) * ra_var.value + m * unbiased, ra_var.value)
    else:
      mean, var = ra_mean.value, ra_var.value
    y = (xf - mean) * jax.lax.rsqrt(var + self.epsilon) * scale + bias
    return y.astype(x.dtype)


def _batch_norm(convention: str, name: str, x, train: bool, mask):
  if convention == "torch":
    return MaskedBatchNorm(name=name)(x, train=train, mask=mask)
  m = None if mask is None else mask.astype(bool).reshape((x.shape[0],) + (1,) * (x.ndim - 1))
  return nn.BatchNorm(use_running_average=not train, name=name)(x, mask=m)


class BasicBlock(nn.Module):
  """conv3x3(stride)-BN-ReLU-conv3x3-BN plus the (projected) shortcut, then ReLU."""
  features: int
  strides: int
  batch_norm: str

  @nn.compact
  def __call__(self, x, *, train: bool, mask=None):
    conv = lambda f, k, s, name: nn.Conv(f, (k, k), strides=(s, s), padding=k // 2,
                                         use_bias=False, kernel_init=_conv_init, name=name)
    y = conv(self.features, 3, self.strides, "conv1")(x)
    y = nn.relu(_batch_norm(self.batch_norm, "bn1", y, train, mask))
    y = conv(self.features, 3, 1, "conv2")(y)
    y = _batch_norm(self.batch_norm, "bn2", y, train, mask)
    if self.strides != 1 or x.shape[-1] != self.features:
      x = conv(self.features, 1, self.strides, "shortcut_conv")(x)
      x = _batch_norm(self.batch_norm, "shortcut_bn", x, train, mask)
    return nn.relu(x + y)


class ResNetCifar(nn.Module):
  """CIFAR ResNet; `__call__(images, train=False, features=False, labels=None, mask=None)`.

  `labels` is accepted for the common model interface and unused. `mask` (batch,) marks
  the valid slots for the BatchNorm statistics in train mode.
  """
  num_classes: int = 10
  width: int = 64
  stage_blocks: Sequence[int] = (2, 2, 2, 2)
  batch_norm: str = "torch"

  @nn.compact
  def __call__(self, images, *, train: bool = False, features: bool = False,
               labels: jax.Array | None = None, mask: jax.Array | None = None):
    del labels
    x = nn.Conv(self.width, (3, 3), padding=1, use_bias=False, kernel_init=_conv_init,
                name="conv1")(images)
    x = nn.relu(_batch_norm(self.batch_norm, "bn1", x, train, mask))
    for s, blocks in enumerate(self.stage_blocks):
      for b in range(blocks):
        x = BasicBlock(self.width * 2 ** s, 2 if (s > 0 and b == 0) else 1, self.batch_norm,
                       name=f"layer{s + 1}_{b}")(x, train=train, mask=mask)
    x = jnp.mean(x, axis=(1, 2))   # = the reference's 4x4 average pool on 32x32 inputs
    if features:
      return x
    return nn.Dense(self.num_classes, name="linear")(x)


def build(model_cfg: ml_collections.ConfigDict) -> ResNetCifar:
  """The CIFAR ResNet of `model_cfg`; raises ConfigError naming a bad field."""
  get = lambda field: model_cfg.get(field, DEFAULTS[field])
  convention = str(get("batch_norm"))
  if convention not in BATCH_NORMS:
    raise ConfigError(f"model.batch_norm: {convention!r} (expected one of "
                      f"{', '.join(BATCH_NORMS)})")
  num_classes, width = int(get("num_classes")), int(get("width"))
  if num_classes <= 0:
    raise ConfigError(f"model.num_classes: expected a positive head size, got {num_classes}")
  if width <= 0:
    raise ConfigError(f"model.width: expected a positive channel count, got {width}")
  blocks = tuple(int(b) for b in get("stage_blocks"))
  if not blocks or min(blocks) < 1:
    raise ConfigError(f"model.stage_blocks: expected positive block counts, got {blocks}")
  return ResNetCifar(num_classes=num_classes, width=width, stage_blocks=blocks,
                     batch_norm=convention)


def input_shape(model_cfg: ml_collections.ConfigDict, batch: int = 1) -> tuple[int, ...]:
  """(batch, image_size, image_size, channels)."""
  return (batch, int(model_cfg.image_size), int(model_cfg.image_size), int(model_cfg.channels))


def init_variables(model: ResNetCifar, model_cfg, rng) -> dict[str, Any]:
  """{"params", "batch_stats"}: random weights, running mean 0 and variance 1."""
  variables = model.init(rng, jnp.zeros(input_shape(model_cfg), jnp.float32), train=False)
  return {"params": variables["params"], "batch_stats": variables["batch_stats"]}


_TORCH_BN = {"weight": ("params", "scale"), "bias": ("params", "bias"),
             "running_mean": ("batch_stats", "mean"), "running_var": ("batch_stats", "var")}


def from_torch_state_dict(state_dict: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """{"params", "batch_stats"} from a PyTorch CIFAR ResNet `state_dict` (numpy arrays).

  Maps `conv1`, `bn1`, `layer{s}.{b}.{conv1,bn1,conv2,bn2}`, `layer{s}.{b}.shortcut.{0,1}`
  and `linear` to this module's names; convolution kernels go from (O, I, H, W) to
  (H, W, I, O) and the linear weight is transposed. `num_batches_tracked` is dropped.

  Args:
    state_dict: name -> array (e.g. `{k: v.numpy() for k, v in torch_sd.items()}`).
    prefix: stripped from every key first (e.g. "module." of a DataParallel checkpoint).

  Returns:
    Variables for `ResNetCifar.apply`.

  Raises:
    ValueError: a key that is not part of the architecture (named in the message).
  """
  out: dict[str, Any] = {"params": {}, "batch_stats": {}}

  def put(collection, path, value):
    node = out[collection]
    for p in path[:-1]:
      node = node.setdefault(p, {})
    node[path[-1]] = np.asarray(value, np.float32)

  for key, value in state_dict.items():
    name = key[len(prefix):] if prefix and key.startswith(prefix) else key
    value = np.asarray(value)
    m = re.fullmatch(r"(?:layer(\d+)\.(\d+)\.)?(conv1|conv2|bn1|bn2|shortcut\.0|shortcut\.1|"
                     r"linear)\.(weight|bias|running_mean|running_var|num_batches_tracked)",
                     name)
    if m is None:
      raise ValueError(f"state_dict: unexpected key {key!r} for a CIFAR ResNet")
    stage, block, module, field = m.groups()
    if field == "num_batches_tracked":
      continue
    scope = [f"layer{stage}_{block}"] if stage else []
    module = {"shortcut.0": "shortcut_conv", "shortcut.1": "shortcut_bn"}.get(module, module)
    if module == "linear":
      put("params", ["linear", "kernel" if field == "weight" else "bias"],
          value.T if field == "weight" else value)
    elif module.startswith("conv") or module == "shortcut_conv":
      put("params", scope + [module, "kernel"], value.transpose(2, 3, 1, 0))
    else:
      collection, leaf = _TORCH_BN[field]
      put(collection, scope + [module, leaf], value)
  return out
