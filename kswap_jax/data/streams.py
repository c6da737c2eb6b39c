"""Static-shape batch streams over subsets: the retain stream, the auxiliary stream, eval.

A stream is an infinite, random-access sequence of global batches 0, 1, 2, ...:

  - non-cycled (the retain stream, which defines the epoch): batch i is step
    j = i % S of epoch e = i // S, with S = ceil(N / batch_size), over the permutation
    `default_rng([seed, e]).permutation(N)`. The last batch of an epoch is padded to full
    size with repeats of its own valid records, which get mask 0.
  - cycled (the auxiliary stream): perm_0, perm_1, ... (one fresh permutation per pass)
    concatenated and cut into consecutive full batches; batches may straddle passes and
    the mask is all ones.
  - cycled in passes, restarted every R batches (`restart_every=R`; the Knowledge
    Swapping reference's auxiliary loader, re-created at every epoch of the retain
    stream): batch i is batch q of pass p of round e, with e, j = divmod(i, R) and
    p, q = divmod(j, S); pass p of round e is `default_rng([seed, e, p]).permutation(N)`,
    and the last batch of each pass is padded and masked like an epoch's.

Every batch is a pure function of its index, so resuming after k batches is `iterate(k)`
and no iterator state has to be checkpointed. Process p of P reads only slots
[p * B / P, (p + 1) * B / P) of each global batch.

Elements are preprocessed as in the reference (docs/knowledge_swapping.md): PIL bilinear resize to
image_size, grayscale <-> RGB, x / 255, then (x - mean) / std. Training streams may add
`kswap_jax.data.augment` (random crop, flip) on top, drawn per global batch index, so a
resumed stream is still a pure function of the index; evaluation passes never augment.
"""

from __future__ import annotations

import functools
import math
import sys
import threading
import weakref
from typing import Any, Iterator, Sequence

import grain
import numpy as np
from PIL import Image

from kswap_jax.data import augment as augment_lib
from kswap_jax.data import splits as splits_lib
from kswap_jax.data import sources as sources_lib
from kswap_jax.errors import ConfigError

Batch = dict[str, np.ndarray]

# ArraySource -> {(image_size, channels): converted uint8 images}; entries die with the source.
_PREPARED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_PREPARED_LOCK = threading.Lock()


def convert_channels(images: np.ndarray, channels: int) -> np.ndarray:
  """uint8 (..., H, W, C) with C in {1, 3, 4} to `channels` in {1, 3}, like PIL's convert.

  Grayscale -> RGB repeats the channel; RGB(A) -> L uses PIL's integer ITU-R 601-2 luma,
  L = (19595 R + 38470 G + 7471 B + 2^15) >> 16, so the result equals `convert("L")`; RGBA
  -> RGB drops alpha.

  Args:
    images: uint8 array with the channel axis last.
    channels: 1 or 3.

  Returns:
    uint8 array with `channels` channels.
  """
  have = images.shape[-1]
  if have == channels:
    return images
  if have == 1 and channels == 3:
    return np.repeat(images, 3, axis=-1)
  if have in (3, 4) and channels == 1:
    rgb = images[..., :3].astype(np.uint32)
    luma = (rgb[..., 0] * 19595 + rgb[..., 1] * 38470 + rgb[..., 2] * 7471 + 0x8000) >> 16
    return luma.astype(np.uint8)[..., None]
  if have == 4 and channels == 3:
    return images[..., :3]
  raise ValueError(f"cannot convert images with {have} channels to {channels}")


RESAMPLE = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}


def resize(image: np.ndarray, image_size: int, resample: str = "bilinear") -> np.ndarray:
  """PIL resize (`RESAMPLE`) of one uint8 (H, W, C) image to (image_size, image_size, C)."""
  if image.shape[0] == image_size and image.shape[1] == image_size:
    return image
  squeeze = image.shape[-1] == 1
  pil = Image.fromarray(image[..., 0] if squeeze else image)
  out = np.asarray(pil.resize((image_size, image_size), RESAMPLE[resample]))
  return out[..., None] if squeeze else out


class Preprocess:
  """uint8 images of any size/channels -> normalised float32 (n, S, S, C) batches.

  In-memory `ArraySource`s whose converted copy fits in `CACHE_BYTES` are converted once
  (per process, shared by all streams) and then gathered with numpy; other sources are
  converted element by element.

  Args:
    image_size: side S of the square output.
    channels: output channels, 1 or 3.
    mean: scalar or one value per channel, subtracted after x / 255.
    std: scalar or one value per channel, divides after the mean.
    field: config prefix used in error messages.
    resample: "bilinear" (default) or "bicubic" (PIL), for images of another size.
  """

  CACHE_BYTES = 256 * 2**20

  def __init__(self, image_size: int, channels: int, mean: Any, std: Any,
               field: str = "data", resample: str = "bilinear"):
    if resample not in RESAMPLE:
      raise ConfigError(f"data.resample: expected one of {', '.join(RESAMPLE)}, got "
                        f"{resample!r}")
    self.resample = resample
    if isinstance(image_size, bool) or int(image_size) != image_size or image_size < 1:
      raise ConfigError(f"{field}.image_size: expected a positive int, got {image_size!r}")
    if channels not in (1, 3):
      raise ConfigError(f"{field}.channels: expected 1 or 3, got {channels!r}")
    self.image_size = int(image_size)
    self.channels = int(channels)
    mean = self._per_channel(mean, f"{field}.mean")
    std = self._per_channel(std, f"{field}.std")
    if (std <= 0).any():
      raise ConfigError(f"{field}.std: expected positive values, got {std.tolist()}")
    # (x / 255 - mean) / std as one fused multiply-add per pixel.
    self._scale = (1.0 / (255.0 * std)).astype(np.float32)
    self._offset = (-mean / std).astype(np.float32)

  def _per_channel(self, value: Any, field: str) -> np.ndarray:
    expected = f"expected a scalar or {self.channels} values (one per channel)"
    try:
      array = np.asarray(value, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
      raise ConfigError(f"{field}: {expected}, got {value!r}") from None
    if array.size == 1:
      array = np.repeat(array, self.channels)
    if array.size != self.channels:
      raise ConfigError(f"{field}: {expected}, got {value!r}")
    return array

  def to_uint8(self, image: np.ndarray) -> np.ndarray:
    """One uint8 image at the target size and channel count (no normalisation)."""
    image = np.asarray(image)
    if image.ndim == 2:
      image = image[..., None]
    # Drop channels before resizing and add them after, so the resize touches fewer
    # channels (for gray -> RGB the pixels are identical either way).
    if image.shape[-1] > self.channels:
      return resize(convert_channels(image, self.channels), self.image_size, self.resample)
    return convert_channels(resize(image, self.image_size, self.resample), self.channels)

  @property
  def black(self) -> np.ndarray:
    """(C,) the value of a black pixel after normalisation, (0 − mean) / std."""
    return self._offset

  def normalise(self, images: np.ndarray) -> np.ndarray:
    """uint8 (..., C) -> float32 (x / 255 - mean) / std."""
    return images.astype(np.float32) * self._scale + self._offset

  def _prepared_array(self, source: sources_lib.ArraySource) -> np.ndarray:
    """The source's images at target size/channels, converted once if that is cheap."""
    images = source.images
    key = (self.image_size, self.channels, self.resample)
    if images.shape[1:] == (self.image_size, self.image_size, self.channels):
      return images
    if len(images) * self.image_size**2 * self.channels > self.CACHE_BYTES:
      return images
    with _PREPARED_LOCK:
      # Small in-memory datasets (the digits demo) are converted once, shared by every
      # stream and eval pass, instead of paying a PIL resize per element each time.
      per_source = _PREPARED.setdefault(source, {})
      if key not in per_source:
        per_source[key] = np.stack([self.to_uint8(image) for image in images])
      return per_source[key]

  def load(self, source: Any, records: np.ndarray) -> np.ndarray:
    """Normalised float32 (len(records), S, S, C) images of `source`."""
    if isinstance(source, sources_lib.ArraySource):
      raw = self._prepared_array(source)[records]
      if raw.shape[1:3] == (self.image_size, self.image_size):
        return self.normalise(convert_channels(raw, self.channels))
      images = [self.to_uint8(image) for image in raw]
    else:
      images = [self.to_uint8(source[int(r)]["image"]) for r in records]
    shape = (len(images), self.image_size, self.image_size, self.channels)
    return self.normalise(np.stack(images) if images else np.zeros(shape, np.uint8))


class _Union:
  """Concatenation of subsets, addressed by a flat position 0..N-1."""

  def __init__(self, subsets: Sequence[splits_lib.Subset]):
    if isinstance(subsets, splits_lib.Subset):
      subsets = [subsets]
    self.subsets = list(subsets)
    if not self.subsets:
      raise ValueError("a stream needs at least one subset")
    self.owner = np.concatenate([np.full(len(s), k, np.int64)
                                 for k, s in enumerate(self.subsets)])
    self.record = np.concatenate([s.indices for s in self.subsets]).astype(np.int64)
    self.label = np.concatenate([s.labels for s in self.subsets]).astype(np.int32)
    if self.label.size == 0:
      raise ValueError(f"subsets {[s.name for s in self.subsets]} are all empty")

  def __len__(self) -> int:
    return int(self.label.shape[0])

  def read(self, positions: np.ndarray, mask: np.ndarray, preprocess: Preprocess) -> Batch:
    """The batch dict for flat `positions`, in the order given."""
    image = np.empty((positions.size, preprocess.image_size, preprocess.image_size,
                      preprocess.channels), np.float32)
    owners = self.owner[positions]
    for k in np.unique(owners):
      where = np.flatnonzero(owners == k)
      image[where] = preprocess.load(self.subsets[k].source, self.record[positions[where]])
    return {"image": image, "label": self.label[positions],
            "mask": mask.astype(np.float32)}


def _local_slice(batch_size: int, process_index: int, process_count: int,
                 field: str) -> slice:
  """Slots of a global batch that one process reads."""
  if isinstance(batch_size, bool) or int(batch_size) != batch_size or batch_size < 1:
    raise ConfigError(f"{field}.batch_size: expected a positive int, got {batch_size!r}")
  if batch_size % process_count:
    raise ConfigError(f"{field}.batch_size: {batch_size} is not divisible by the number of "
                      f"processes {process_count}")
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} not in [0, {process_count})")
  local = batch_size // process_count
  return slice(process_index * local, (process_index + 1) * local)


def _augmented(batch: Batch, kind: str, padding: int, seed: int, index: int,
               batch_size: int, local: slice, black: np.ndarray) -> Batch:
  """`batch` (this process's `local` slots of global batch `index`) with the training
  augmentation `kind` drawn over the whole global batch."""
  if kind == "none":
    return batch
  flip, offsets = augment_lib.draws(seed, index, batch_size, padding=padding)
  batch["image"] = augment_lib.apply(batch["image"], flip[local],
                                     offsets[local] if kind == "crop_flip" else None,
                                     padding=padding, pad_value=black)
  return batch


def _prefetched(batch_fn: Any, start: int, stop: int, num_threads: int) -> Iterator[Batch]:
  """batch_fn(start), batch_fn(start + 1), ... computed ahead by grain's thread pool."""
  dataset = grain.MapDataset.range(start, stop).map(batch_fn)
  # num_threads=0 reads synchronously in the caller's thread: no background threads.
  options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=2 * num_threads)
  iterator = iter(dataset.to_iter_dataset(options))
  try:
    yield from iterator
  finally:
    iterator.close()


class Stream:
  """An infinite, random-access sequence of padded, masked, per-process batches.

  Build it with `make_stream`; see the module docstring for the batch order.

  Attributes:
    num_examples: N, the number of records in the union of the subsets.
    batch_size: global batch size B.
    local_batch_size: B / process_count, the leading dimension of every batch.
    steps_per_epoch: ceil(N / B).
    cycle: whether the stream cycles (auxiliary stream) or pads each epoch.
    restart_every: R > 0: a cycled stream that pads each pass and starts afresh every R
      batches (0: batches straddle passes).
    augment: the training augmentation (`kswap_jax.data.augment.KINDS`).
  """

  def __init__(self, subsets: Sequence[splits_lib.Subset], *, batch_size: int, seed: int,
               cycle: bool, image_size: int, channels: int, mean: Any, std: Any,
               process_index: int = 0, process_count: int = 1, num_threads: int = 0,
               field: str = "data", augment: str = "none", crop_padding: int = 4,
               restart_every: int = 0, resample: str = "bilinear"):
    augment_lib.check(augment, crop_padding)
    if restart_every < 0 or (restart_every and not cycle):
      raise ValueError(f"restart_every: expected 0, or > 0 for a cycled stream, got "
                       f"{restart_every} (cycle={cycle})")
    self.restart_every = int(restart_every)
    self.augment = augment
    self.crop_padding = int(crop_padding)
    self._local = _local_slice(batch_size, process_index, process_count, field)
    self._union = _Union(subsets)
    self._preprocess = Preprocess(image_size, channels, mean, std, field, resample)
    self.subsets = self._union.subsets
    self.num_examples = len(self._union)
    self.batch_size = int(batch_size)
    self.local_batch_size = self._local.stop - self._local.start
    self.steps_per_epoch = math.ceil(self.num_examples / self.batch_size)
    self.seed = int(seed)
    self.cycle = bool(cycle)
    self.num_threads = int(num_threads)
    # A few recent passes cover every batch in flight, even for prefetching threads.
    self._permutation = functools.lru_cache(maxsize=4)(self._draw_permutation)

  def _draw_permutation(self, *key: int) -> np.ndarray:
    return np.random.default_rng([self.seed, *key]).permutation(self.num_examples)

  def epoch_and_step(self, i: int) -> tuple[int, int]:
    """(epoch, step within the epoch) of global batch i of a non-cycled stream."""
    if self.cycle:
      raise ValueError("a cycled stream has no epochs; ask the stream that defines them")
    return divmod(int(i), self.steps_per_epoch)

  def positions(self, i: int) -> tuple[np.ndarray, np.ndarray]:
    """Flat union positions and mask of this process's slots of global batch i."""
    i = int(i)
    if i < 0:
      raise IndexError(f"batch index must be >= 0, got {i}")
    n, b = self.num_examples, self.batch_size
    if self.restart_every:
      rnd, j = divmod(i, self.restart_every)
      pass_, step = divmod(j, self.steps_per_epoch)
      return self._padded(self._permutation(rnd, pass_), step)
    if self.cycle:
      flat = i * b + np.arange(self._local.start, self._local.stop, dtype=np.int64)
      passes, offsets = np.divmod(flat, n)
      positions = np.empty_like(flat)
      for p in np.unique(passes):
        where = passes == p
        positions[where] = self._permutation(int(p))[offsets[where]]
      return positions, np.ones(flat.shape, np.float32)
    epoch, step = divmod(i, self.steps_per_epoch)
    return self._padded(self._permutation(epoch), step)

  def _padded(self, permutation: np.ndarray, step: int) -> tuple[np.ndarray, np.ndarray]:
    """Batch `step` of one pass over `permutation`, padded to full size and masked."""
    b = self.batch_size
    valid = permutation[step * b:(step + 1) * b]
    mask = (np.arange(b) < valid.size).astype(np.float32)
    # Padding repeats valid records so every slot holds a real, loadable example.
    positions = np.resize(valid, b)
    return positions[self._local], mask[self._local]

  def batch(self, i: int) -> Batch:
    """Global batch i as this process's slice: image float32, label int32, mask float32."""
    positions, mask = self.positions(i)
    batch = self._union.read(positions, mask, self._preprocess)
    return _augmented(batch, self.augment, self.crop_padding, self.seed, i, self.batch_size,
                      self._local, self._preprocess.black)

  def iterate(self, start: int = 0) -> Iterator[Batch]:
    """Batches start, start + 1, ... forever, prefetched with `num_threads` threads.

    Args:
      start: index of the first batch; resume with the number of batches consumed.

    Returns:
      An iterator of batch dicts, identical to `batch(start), batch(start + 1), ...`.
    """
    return _prefetched(self.batch, int(start), sys.maxsize, self.num_threads)

  def __repr__(self) -> str:
    return (f"Stream(subsets={[s.name for s in self.subsets]}, N={self.num_examples}, "
            f"batch_size={self.batch_size}, steps_per_epoch={self.steps_per_epoch}, "
            f"cycle={self.cycle}, restart_every={self.restart_every}, "
            f"augment={self.augment!r})")


class Strided:
  """Every `stride`-th batch of a stream, from `offset`: batch i is `stream.batch(stride·i +
  offset)`. Two views (offsets 0 and 1) of one stream take its batches in turns, as two
  reads per step from one loader do (DER++'s second retain batch).

  Attributes: those of `stream` that a stage reads (batch_size, local_batch_size,
  num_examples, subsets, seed, cycle).
  """

  def __init__(self, stream: Stream, stride: int, offset: int):
    if not 0 <= offset < stride:
      raise ValueError(f"offset: expected 0 <= offset < stride = {stride}, got {offset}")
    self.stream, self.stride, self.offset = stream, int(stride), int(offset)
    for name in ("batch_size", "local_batch_size", "num_examples", "subsets", "seed", "cycle"):
      setattr(self, name, getattr(stream, name))

  def batch(self, i: int) -> Batch:
    return self.stream.batch(self.stride * int(i) + self.offset)

  def iterate(self, start: int = 0) -> Iterator[Batch]:
    """Batches start, start + 1, ... of the view (resume with the number consumed)."""
    return _prefetched(self.batch, int(start), sys.maxsize, self.stream.num_threads)

  def __repr__(self) -> str:
    return f"Strided({self.stream!r}, stride={self.stride}, offset={self.offset})"


def make_stream(subsets: Sequence[splits_lib.Subset], *, batch_size: int, seed: int,
                cycle: bool, image_size: int, channels: int, mean: Any, std: Any,
                process_index: int = 0, process_count: int = 1, num_threads: int = 0,
                field: str = "data", augment: str = "none", crop_padding: int = 4,
                restart_every: int = 0, resample: str = "bilinear") -> Stream:
  """A training stream over the union of `subsets`.

  Args:
    subsets: subsets whose records are pooled, e.g. [retain_train, learn_train] for LBF's
      stage-2 retain stream (docs/knowledge_swapping.md).
    batch_size: global batch size.
    seed: shuffling seed; pass k gets `default_rng([seed, k]).permutation(N)`.
    cycle: False for the retain stream (padded epochs), True for the auxiliary stream.
    image_size: side of the square model input.
    channels: model input channels, 1 or 3.
    mean: normalisation mean, scalar or per channel.
    std: normalisation std, scalar or per channel.
    process_index: this process (jax.process_index()).
    process_count: number of processes (jax.process_count()).
    num_threads: grain prefetch threads; 0 reads in the calling thread.
    field: config prefix used in error messages.
    augment: "none", "flip" or "crop_flip" (`kswap_jax.data.augment`).
    crop_padding: P of "crop_flip".
    restart_every: with `cycle`, R > 0 pads the last batch of every pass and restarts the
      stream with fresh shuffles every R batches (e.g. at every epoch of the stream it is
      paired with); 0 cuts the concatenated passes into full batches.
    resample: "bilinear" or "bicubic", for images that are not image_size already.

  Returns:
    A `Stream`.

  Example:
    >>> retain = make_stream([s["retain_train"]], batch_size=80, seed=0, cycle=False,
    ...                      image_size=224, channels=3, mean=0.5, std=0.5)
    >>> for batch in retain.iterate(start=resume_step): ...
  """
  return Stream(subsets, batch_size=batch_size, seed=seed, cycle=cycle,
                image_size=image_size, channels=channels, mean=mean, std=std,
                process_index=process_index, process_count=process_count,
                num_threads=num_threads, field=field, augment=augment,
                crop_padding=crop_padding, restart_every=restart_every, resample=resample)


def num_eval_batches(subset: splits_lib.Subset, *, batch_size: int) -> int:
  """Number of batches `eval_batches` yields for `subset`."""
  return math.ceil(len(subset) / batch_size)


def eval_batches(subset: splits_lib.Subset, *, batch_size: int, image_size: int,
                 channels: int, mean: Any, std: Any, process_index: int = 0,
                 process_count: int = 1, num_threads: int = 0,
                 field: str = "data", augment: str = "none", crop_padding: int = 4,
                 seed: int = 0, resample: str = "bilinear") -> Iterator[Batch]:
  """One pass over `subset` in index order; the last batch is padded with mask 0.

  Evaluation never augments; a pass that should see the training transform (SFR-on's
  Fisher diagonals are taken over training-augmented loaders) passes `augment`, drawn per
  batch index from `seed` as in a training stream.

  Args:
    subset: the split to evaluate.
    batch_size: global batch size.
    image_size: side of the square model input.
    channels: model input channels, 1 or 3.
    mean: normalisation mean, scalar or per channel.
    std: normalisation std, scalar or per channel.
    process_index: this process.
    process_count: number of processes.
    num_threads: grain prefetch threads; 0 reads in the calling thread.
    field: config prefix used in error messages.
    augment: "none" (evaluation), "flip" or "crop_flip".
    crop_padding: P of "crop_flip".
    seed: seed of the augmentation draws.
    resample: "bilinear" or "bicubic", for images that are not image_size already.

  Returns:
    An iterator of `num_eval_batches(subset, batch_size=batch_size)` batch dicts, each
    this process's slice of the global batch.
  """
  augment_lib.check(augment, crop_padding)
  local = _local_slice(batch_size, process_index, process_count, field)
  union = _Union([subset])
  preprocess = Preprocess(image_size, channels, mean, std, field, resample)
  n = len(union)

  def batch(i: int) -> Batch:
    valid = np.arange(i * batch_size, min((i + 1) * batch_size, n), dtype=np.int64)
    mask = (np.arange(batch_size) < valid.size).astype(np.float32)
    positions = np.resize(valid, batch_size)
    return _augmented(union.read(positions[local], mask[local], preprocess), augment,
                      int(crop_padding), seed, i, batch_size, local, preprocess.black)

  return _prefetched(batch, 0, num_eval_batches(subset, batch_size=batch_size),
                     int(num_threads))
