"""Training-time augmentation of normalised image batches, a pure function of (seed, batch).

    kind = "none"        the image as preprocessed
    kind = "flip"        x ← flip_W(x) with probability 1/2
    kind = "crop_flip"   pad P pixels on every side with black, take a random S×S crop
                         (top and left uniform in {0, …, 2P}), then flip with probability 1/2

`crop_flip` with P = 4 is the CIFAR training transform of the unlearning references
(torchvision `RandomCrop(32, padding=4)` + `RandomHorizontalFlip()`). The padding is black
*before* normalisation, i.e. the value (0 − mean) / std per channel in the normalised batch.

The draws of global batch i come from `default_rng([seed, SALT, i])` over the whole global
batch and each process keeps its own slots, so a batch is identical however many processes
read it and a resumed run sees exactly the augmentations of an uninterrupted one.
"""

from __future__ import annotations

import numpy as np

from kswap_jax.errors import ConfigError

KINDS = ("none", "flip", "crop_flip")
SALT = 0x5EED  # separates the augmentation draws from the stream's shuffling draws


def check(kind: str, padding: int, field: str = "data") -> None:
  """ConfigError unless `kind` is a known augmentation and `padding` an int >= 0."""
  if kind not in KINDS:
    raise ConfigError(f"{field}.augment: {kind!r} (expected one of {', '.join(KINDS)})")
  if isinstance(padding, bool) or int(padding) != padding or padding < 0:
    raise ConfigError(f"{field}.crop_padding: expected an int >= 0, got {padding!r}")


def draws(seed: int, index: int, batch_size: int, *, padding: int
          ) -> tuple[np.ndarray, np.ndarray]:
  """(flip (B,) bool, offsets (B, 2) int: top, left) of global batch `index`."""
  rng = np.random.default_rng([int(seed), SALT, int(index)])
  flip = rng.random(batch_size) < 0.5
  offsets = rng.integers(0, 2 * padding + 1, size=(batch_size, 2))
  return flip, offsets


def apply(images: np.ndarray, flip: np.ndarray, offsets: np.ndarray | None, *,
          padding: int, pad_value: np.ndarray) -> np.ndarray:
  """Crops (when `offsets` is given) and flips a batch.

  Args:
    images: float32 (n, S, S, C), already normalised.
    flip: (n,) bool, which images to mirror left-right.
    offsets: (n, 2) top/left of each crop in the padded image, or None for no crop.
    padding: P, pixels added on every side before cropping.
    pad_value: (C,) value of a black pixel after normalisation.

  Returns:
    float32 (n, S, S, C).

  Example:
    >>> flip, offsets = draws(seed, i, batch_size, padding=4)
    >>> batch["image"] = apply(batch["image"], flip, offsets, padding=4, pad_value=offset)
  """
  out = images
  if offsets is not None and padding > 0:
    n, size = images.shape[0], images.shape[1]
    padded = np.empty((n, size + 2 * padding, size + 2 * padding, images.shape[3]),
                      images.dtype)
    padded[...] = np.asarray(pad_value, images.dtype)
    padded[:, padding:padding + size, padding:padding + size] = images
    out = np.stack([padded[k, t:t + size, l:l + size] for k, (t, l) in enumerate(offsets)])
  if flip.any():
    out = out.copy() if out is images else out
    out[flip] = out[flip, :, ::-1]
  return out
