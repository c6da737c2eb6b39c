"""Random-access image-classification sources: tfds (array_record), bundled digits, synthetic.

A source follows grain's `RandomAccessDataSource` protocol:

    len(source)        number of records
    source[i]          {"image": uint8 (H, W, C), "label": int}

plus the attributes that splits and streams rely on:

    source.labels      int64 (len(source),), every label in record order, held in memory
    source.num_classes size of the source's own label space
    source.name        identifies the underlying dataset (same name + same labels = same data)
    source.image_shape (H, W, C) as stored, None where it varies (optional: what
                       `methods.common.note_conversion` reports)
    source.class_names the name of each label (optional; tfds ClassLabel names, an image
                       folder's class folders): configs may name classes by them

Sources know nothing about forget / retain / learn; `splits.py` selects records from them
and `streams.py` turns the selections into batches.
"""

from __future__ import annotations

import functools
import glob
import os
import re
from typing import Any

import numpy as np

from kswap_jax.errors import ConfigError

SPLITS = ("train", "test")


class ArraySource:
  """Numpy-backed source: the whole image array sits in memory.

  Args:
    images: uint8 array (N, H, W, C), or (N, H, W) for grayscale.
    labels: integer array (N,) with values in [0, num_classes).
    num_classes: size of the label space.
    name: dataset name; two sources with the same name and labels are the same data.
    class_names: the name of each label (optional).

  Example:
    >>> source = ArraySource(np.zeros((4, 8, 8, 1), np.uint8), [0, 1, 0, 1], 2, "toy")
    >>> source[1]["label"]
    1
  """

  def __init__(self, images: np.ndarray, labels: Any, num_classes: int, name: str,
               class_names: Any = None):
    images = np.asarray(images)
    if images.ndim == 3:
      images = images[..., None]
    if images.ndim != 4 or images.dtype != np.uint8:
      raise ValueError(f"ArraySource '{name}': images must be uint8 (N, H, W, C), got "
                       f"{images.dtype} {images.shape}")
    labels = np.asarray(labels, dtype=np.int64)
    if labels.shape != (images.shape[0],):
      raise ValueError(f"ArraySource '{name}': {labels.shape[0]} labels for "
                       f"{images.shape[0]} images")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
      raise ValueError(f"ArraySource '{name}': labels must lie in [0, {num_classes})")
    self.images = images
    self.labels = labels
    self.num_classes = int(num_classes)
    self.name = name
    self.image_shape = tuple(images.shape[1:])
    self.class_names = None if class_names is None else tuple(str(n) for n in class_names)
    if self.class_names is not None and len(self.class_names) != self.num_classes:
      raise ValueError(f"ArraySource '{name}': {len(self.class_names)} class names for "
                       f"{num_classes} classes")

  def __len__(self) -> int:
    return self.labels.shape[0]

  def __getitem__(self, index: int) -> dict[str, Any]:
    return {"image": self.images[index], "label": int(self.labels[index])}

  def __repr__(self) -> str:
    return (f"ArraySource(name={self.name!r}, n={len(self)}, "
            f"image_shape={self.images.shape[1:]}, num_classes={self.num_classes})")


@functools.cache
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
  """The 1,797 scikit-learn digits as uint8 (N, 8, 8, 1) images and int64 labels."""
  from sklearn import datasets  # pylint: disable=g-import-not-at-top  (slow import)
  digits = datasets.load_digits()
  # Values are 0..16 gray levels; spread them over the full uint8 range.
  images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
  return images, digits.target.astype(np.int64)


def digits_split_indices(labels: np.ndarray, split: str, *, seed: int = 0,
                         test_fraction: float = 0.3, field: str = "digits") -> np.ndarray:
  """Sorted record indices of a stratified, seeded train/test split.

  For each class c (in sorted order), that class's indices are permuted with
  `np.random.default_rng([seed, c])`; the first round(test_fraction * n_c) are test, the
  rest train. Only sorted ids and explicit seeds are involved, so the split is the same on
  every machine.

  Args:
    labels: int array of all labels.
    split: "train" or "test".
    seed: split seed.
    test_fraction: share of each class that goes to test, in [0, 1].
    field: config prefix used in error messages.

  Returns:
    int64 array of sorted indices into `labels`.
  """
  if split not in SPLITS:
    raise ConfigError(f"{field}: unknown split {split!r} (expected one of: "
                      f"{', '.join(SPLITS)})")
  if not 0.0 <= test_fraction <= 1.0:
    raise ConfigError(f"{field}.test_fraction: expected a value in [0, 1], got "
                      f"{test_fraction}")
  chosen = []
  for c in np.unique(labels):
    class_indices = np.flatnonzero(labels == c)
    perm = np.random.default_rng([seed, int(c)]).permutation(class_indices)
    num_test = int(round(test_fraction * class_indices.size))
    chosen.append(perm[:num_test] if split == "test" else perm[num_test:])
  return np.sort(np.concatenate(chosen)).astype(np.int64)


def digits_source(split: str, *, seed: int = 0, test_fraction: float = 0.3,
                  field: str = "digits") -> ArraySource:
  """scikit-learn's bundled 8x8 digits (10 classes, 1,797 images), no download needed.

  Args:
    split: "train" or "test" (see `digits_split_indices` for how records are assigned).
    seed: split seed.
    test_fraction: share of each class held out for test.
    field: config prefix used in error messages.

  Returns:
    An `ArraySource` named "digits" with uint8 (8, 8, 1) images.
  """
  images, labels = _digits_arrays()
  indices = digits_split_indices(labels, split, seed=seed, test_fraction=test_fraction,
                                 field=field)
  return ArraySource(images[indices], labels[indices], 10, "digits")


def _linear_upsample_matrix(coarse: int, size: int) -> np.ndarray:
  """(size, coarse) matrix whose rows linearly interpolate a coarse grid."""
  pos = np.linspace(0.0, coarse - 1.0, size)
  lo = np.minimum(np.floor(pos).astype(int), coarse - 2)
  frac = pos - lo
  weights = np.zeros((size, coarse))
  weights[np.arange(size), lo] = 1.0 - frac
  weights[np.arange(size), lo + 1] = frac
  return weights


class SyntheticSource:
  """Procedural image classification, generated on the fly in `__getitem__`.

  Each class c has a smooth prototype (a random 4x4 grid drawn from
  `default_rng([seed, c])`, linearly upsampled). Record i has label i % num_classes and
  image = roll(prototype, small random shift) + Gaussian noise, with the shift and noise
  drawn from `default_rng([seed, split_id, i])`, clipped to uint8. Prototypes differ in
  coarse structure while the noise is per pixel, so a small ViT separates the classes in a
  few hundred steps. Nothing is stored; the same (seed, split, index) always gives the same
  image.

  Args:
    num_classes: number of classes.
    num_examples: number of records (balanced: labels cycle through the classes).
    image_size: side of the square images.
    channels: 1 or 3.
    seed: seed of the prototypes and samples.
    split: "train" or "test"; the two splits share prototypes but not samples.
    field: config prefix used in error messages.
  """

  _GRID = 4
  _NOISE_STD = 24.0

  def __init__(self, num_classes: int, num_examples: int, image_size: int, channels: int,
               seed: int, split: str, *, field: str = "synthetic"):
    if split not in SPLITS:
      raise ConfigError(f"{field}: unknown split {split!r} (expected one of: "
                        f"{', '.join(SPLITS)})")
    if num_classes < 1:
      raise ConfigError(f"{field}.num_classes: expected a positive int, got {num_classes}")
    if num_examples < 1:
      raise ConfigError(f"{field}.{split}_per_class: expected a positive number of "
                        f"examples, got {num_examples} in total")
    if image_size < self._GRID:
      raise ConfigError(f"{field}.image_size: expected at least {self._GRID}, got "
                        f"{image_size}")
    if channels not in (1, 3):
      raise ConfigError(f"{field}.channels: expected 1 or 3, got {channels}")
    self.num_classes = int(num_classes)
    self.image_size = int(image_size)
    self.channels = int(channels)
    self.image_shape = (self.image_size, self.image_size, self.channels)
    self.seed = int(seed)
    self.split = split
    self.name = (f"synthetic(seed={seed},classes={num_classes},size={image_size},"
                 f"channels={channels})")
    self.labels = np.arange(num_examples, dtype=np.int64) % num_classes
    self.class_names = None
    up = _linear_upsample_matrix(self._GRID, image_size)
    coarse = np.stack([
        np.random.default_rng([self.seed, c]).uniform(size=(self._GRID, self._GRID,
                                                            channels))
        for c in range(num_classes)])
    # Mid-range prototypes leave head-room for the noise before clipping.
    self._prototypes = (40.0 + 175.0 * np.einsum("ig,jh,nghc->nijc", up, up, coarse)
                        ).astype(np.float32)
    self._max_shift = max(1, image_size // 16)
    self._split_id = SPLITS.index(split)

  def __len__(self) -> int:
    return self.labels.shape[0]

  def __getitem__(self, index: int) -> dict[str, Any]:
    index = int(index)
    if not 0 <= index < len(self):
      raise IndexError(f"index {index} out of range for {len(self)} records")
    label = int(self.labels[index])
    rng = np.random.default_rng([self.seed, self._split_id, index])
    shift = rng.integers(-self._max_shift, self._max_shift + 1, size=2)
    image = np.roll(self._prototypes[label], tuple(shift), axis=(0, 1))
    image = image + self._NOISE_STD * rng.standard_normal(image.shape, dtype=np.float32)
    return {"image": np.clip(np.rint(image), 0, 255).astype(np.uint8), "label": label}

  def __repr__(self) -> str:
    return f"SyntheticSource({self.name}, split={self.split!r}, n={len(self)})"


def _datasets_in(data_dir: str) -> list[str]:
  """The prepared datasets under a tfds data_dir: `NAME` (or `NAME/CONFIG`) folders that
  hold a version folder with a `dataset_info.json`."""
  found = []
  for info in sorted(glob.glob(os.path.join(data_dir, "*", "*", "dataset_info.json"))
                     + glob.glob(os.path.join(data_dir, "*", "*", "*", "dataset_info.json"))):
    rel = os.path.relpath(os.path.dirname(os.path.dirname(info)), data_dir)
    if rel not in found:
      found.append(rel)
  return found


def _own_folder_hint(data_dir: str, name: str) -> str:
  """For a dataset not found: a data_dir that is the dataset's own folder or one of its
  version folders, and the folder above it to give instead."""
  parts = os.path.normpath(data_dir).split(os.sep)
  for depth in (1, 2):  # <root>/<name> or <root>/<name>/<version>
    if len(parts) > depth and parts[-depth] == name:
      return (f"; data_dir is the folder of {name!r} itself or of one of its versions: give "
              f"the folder above it, {os.sep.join(parts[:-depth]) or os.sep}")
  return ""


def _split_names(split: str) -> list[str]:
  """Base split names of a tfds split expression ("train[:80%]+test" -> train, test)."""
  return [re.split(r"[\[(]", part, maxsplit=1)[0].strip() for part in split.split("+")]


class TfdsSource:
  """A tfds dataset stored as array_record, read with `tfds.data_source` (no TensorFlow).

  Images are decoded with PIL by tfds; grayscale images come out as (H, W, 1). All labels
  are read once at construction with the image feature left undecoded, so `labels` is
  cheap afterwards.

  Args:
    name: tfds name, optionally with config/version ("imagenet100_swap:1.0.0").
    split: tfds split expression ("train", "test", "train[:90%]").
    data_dir: tfds data_dir that holds the prepared dataset (None: tfds' default).
    image_key: feature holding the image.
    label_key: feature holding the class label (a `tfds.features.ClassLabel`).
    field: config prefix used in error messages, e.g. "data.old".
    split_field: config field the split came from, used in error messages.
  """

  def __init__(self, name: str, split: str, data_dir: str | os.PathLike[str] | None,
               image_key: str = "image", label_key: str = "label", *, field: str = "tfds",
               split_field: str = "split"):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  (slow import)

    self.name = name
    self.split = split
    self.image_key = image_key
    self.label_key = label_key
    data_dir = os.path.expanduser(os.fspath(data_dir)) if data_dir else None
    shown_dir = data_dir or tfds.core.constants.DATA_DIR
    base_name = name.split(":")[0].split("/")[0]
    prepare = (f"prepare it once with: pip install -e '.[tf]' && tfds build {base_name} "
               f"--data_dir {shown_dir} --file_format array_record; a dataset tfds does not "
               f"ship, e.g. ImageNet-100 or CASIA-100, from a folder of images: python -m "
               f"kswap_jax.data.image_folder --help")
    if data_dir is not None and not os.path.isdir(data_dir):
      what = "is a file" if os.path.exists(data_dir) else "does not exist"
      raise ConfigError(f"{field}.data_dir: {data_dir!r} {what}, so tfds dataset {name!r} "
                        f"is not there (a typo? the folder that holds <dataset name>/"
                        f"<version>/; or {prepare})")

    def not_found() -> ConfigError:  # the data_dir is listed only when it is needed
      present = _datasets_in(shown_dir)
      return ConfigError(
          f"{field}.name: tfds dataset {name!r} not found in data_dir {shown_dir!r} "
          f"(it holds {', '.join(present) if present else 'no prepared dataset'}"
          f"{_own_folder_hint(shown_dir, base_name)}; {prepare})")
    try:
      builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
      raise not_found() from None
    except Exception as e:  # noqa: BLE001 - a folder tfds cannot open is the user's data
      reason = " ".join(str(e).split("\n")[0].split()) or type(e).__name__
      raise ConfigError(
          f"{field}.name: tfds dataset {name!r} in {shown_dir!r} cannot be opened ({reason}); "
          f"if a build of it was interrupted, remove that build's version folder under "
          f"{os.path.join(shown_dir, base_name)} and build it again") from None
    try:
      self._data = builder.as_data_source(split=split)
    except (NotImplementedError, ValueError, FileNotFoundError) as e:
      # tfds reports a missing dataset as a format or file problem; diagnose it here.
      if not builder.is_prepared():
        raise not_found() from None
      available = sorted(builder.info.splits)
      if any(s not in available for s in _split_names(split)):
        hint = ("; python -m kswap_jax.data.image_folder writes a test split of each "
                "class's images with --test_fraction F" if available == ["train"] else "")
        raise ConfigError(f"{field}.{split_field}: unknown split {split!r} of tfds dataset "
                          f"{name!r} (available: {', '.join(available)}){hint}") from None
      if isinstance(e, NotImplementedError):
        raise ConfigError(
            f"{field}.name: tfds dataset {name!r} in {shown_dir!r} is stored as "
            f"{builder.info.file_format.value}, not array_record (rebuild it with: tfds build "
            f"{base_name} --data_dir {shown_dir} --file_format array_record)") from None
      raise
    features = builder.info.features
    if image_key not in features:
      raise ConfigError(f"{field}.image_key: no feature {image_key!r} in tfds dataset "
                        f"{name!r} (features: {', '.join(features.keys())})")
    if label_key not in features or not hasattr(features[label_key], "num_classes"):
      raise ConfigError(f"{field}.label_key: {label_key!r} is not a ClassLabel feature of "
                        f"tfds dataset {name!r} (features: {', '.join(features.keys())})")
    self.num_classes = int(features[label_key].num_classes)
    self.class_names = tuple(str(n) for n in getattr(features[label_key], "names", ()) or ()
                             ) or None
    # (H, W, C) as stored; None where it varies (e.g. an image folder kept at full size).
    shape = tuple(getattr(features[image_key], "shape", ()) or ())
    self.image_shape = shape + (1,) if len(shape) == 2 else shape
    self.labels = self._read_labels(builder, tfds)

  def _read_labels(self, builder: Any, tfds: Any) -> np.ndarray:
    """All labels, read with the image feature left as encoded bytes."""
    skip = builder.as_data_source(split=self.split,
                                  decoders={self.image_key: tfds.decode.SkipDecoding()})
    try:
      return np.fromiter((skip[i][self.label_key] for i in range(len(skip))), np.int64,
                         count=len(skip))
    except ModuleNotFoundError:
      # `tfds.testing.mock_data` fakes undecoded features by encoding them with TF; real
      # array_record files never need it. Decoding everything is fine for mock sizes.
      return np.fromiter((self._data[i][self.label_key] for i in range(len(self._data))),
                         np.int64, count=len(self._data))

  def __len__(self) -> int:
    return len(self._data)

  def __getitem__(self, index: int) -> dict[str, Any]:
    example = self._data[int(index)]
    image = np.asarray(example[self.image_key])
    if image.ndim == 2:
      image = image[..., None]
    return {"image": image, "label": int(example[self.label_key])}

  def __repr__(self) -> str:
    return f"TfdsSource(name={self.name!r}, split={self.split!r}, n={len(self)})"


_KINDS = ("digits", "synthetic", "tfds")


def _field(cfg: Any, key: str, field: str, default: Any = ConfigError) -> Any:
  """cfg[key] for a ConfigDict or mapping; None or "" count as unset."""
  if key in cfg and cfg[key] is not None and cfg[key] != "":
    return cfg[key]
  if default is ConfigError:
    raise ConfigError(f"{field}.{key}: required for source kind {cfg['kind']!r}")
  return default


def load_source(cfg: Any, split: str, *, field: str = "data") -> Any:
  """Builds the source a data config describes.

  Args:
    cfg: `ml_collections.ConfigDict` or mapping with `kind` in {"digits", "synthetic",
      "tfds"} and that kind's fields. tfds: name, data_dir, train_split ("train"),
      test_split ("test"), image_key ("image"), label_key ("label"). digits: seed (0),
      test_fraction (0.3). synthetic: num_classes, image_size, channels, train_per_class,
      test_per_class, seed (0).
    split: "train" or "test".
    field: config path of `cfg`, prefixed to error messages (e.g. "data.old").

  Returns:
    An `ArraySource`, `SyntheticSource` or `TfdsSource`.

  Example:
    >>> old_train = load_source(config.data.old, "train", field="data.old")
  """
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
  kind = cfg["kind"] if "kind" in cfg else None
  if kind in ("digits", "synthetic") and int(_field(cfg, "seed", field, 0)) < 0:
    raise ConfigError(f"{field}.seed: expected an int >= 0, got {cfg['seed']}")
  if kind == "digits":
    return digits_source(split, seed=int(_field(cfg, "seed", field, 0)),
                         test_fraction=float(_field(cfg, "test_fraction", field, 0.3)),
                         field=field)
  if kind == "synthetic":
    num_classes = int(_field(cfg, "num_classes", field))
    per_class = int(_field(cfg, f"{split}_per_class", field))
    return SyntheticSource(num_classes=num_classes, num_examples=num_classes * per_class,
                           image_size=int(_field(cfg, "image_size", field)),
                           channels=int(_field(cfg, "channels", field, 3)),
                           seed=int(_field(cfg, "seed", field, 0)), split=split,
                           field=field)
  if kind == "tfds":
    split_field = f"{split}_split"
    return TfdsSource(str(_field(cfg, "name", field)),
                      str(_field(cfg, split_field, field, split)),
                      _field(cfg, "data_dir", field, None),
                      image_key=str(_field(cfg, "image_key", field, "image")),
                      label_key=str(_field(cfg, "label_key", field, "label")),
                      field=field, split_field=split_field)
  raise ConfigError(f"{field}.kind: unknown source kind {kind!r} (expected one of: "
                    f"{', '.join(_KINDS)})")
