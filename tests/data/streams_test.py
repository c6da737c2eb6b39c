"""Tests for kswap_jax.data.streams: epochs, cycling, resumption, sharding, preprocessing."""

import itertools
import threading

import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from kswap_jax.data import sources
from kswap_jax.data import splits
from kswap_jax.data import streams
from kswap_jax.errors import ConfigError

# mean 0, std 1: a pixel equal to the record id r comes back as r / 255.
RAW = dict(image_size=2, channels=1, mean=0.0, std=1.0)


def _indexed_subset(n, name="retain_train", offset=0, num_classes=3):
  """Subset whose record r is a 2x2 image filled with offset + r (its own id)."""
  ids = np.arange(n) + offset
  images = np.broadcast_to(ids[:, None, None, None], (n, 2, 2, 1)).astype(np.uint8)
  source = sources.ArraySource(images, ids % num_classes, num_classes, name)
  return splits.select(source, range(num_classes), name=name,
                       label_map={c: c for c in range(num_classes)})


def _ids(batch):
  """Record ids carried by the pixels of a RAW batch."""
  return np.rint(batch["image"][:, 0, 0, 0] * 255).astype(int)


def test_epoch_covers_every_record_once_and_pads_with_mask():
  stream = streams.make_stream([_indexed_subset(23)], batch_size=8, seed=3, cycle=False, **RAW)
  assert stream.steps_per_epoch == 3 and stream.num_examples == 23
  for epoch in range(3):
    batches = [stream.batch(epoch * 3 + j) for j in range(3)]
    valid = np.concatenate([_ids(b)[b["mask"] == 1] for b in batches])
    np.testing.assert_array_equal(valid, np.random.default_rng([3, epoch]).permutation(23))
    last = batches[-1]
    np.testing.assert_array_equal(last["mask"], [1] * 7 + [0])
    assert _ids(last)[-1] in _ids(last)[:7]  # padding repeats a valid record
    for b in batches:
      assert b["image"].dtype == np.float32 and b["image"].shape == (8, 2, 2, 1)
      assert b["label"].dtype == np.int32 and b["mask"].dtype == np.float32
      np.testing.assert_array_equal(b["label"], _ids(b) % 3)
  assert stream.epoch_and_step(7) == (2, 1)
  epoch0 = np.concatenate([_ids(stream.batch(j)) for j in range(2)])
  epoch1 = np.concatenate([_ids(stream.batch(3 + j)) for j in range(2)])
  assert not np.array_equal(epoch0, epoch1)  # reshuffled every epoch


def test_cycled_stream_straddles_passes_and_reshuffles():
  stream = streams.make_stream([_indexed_subset(5)], batch_size=8, seed=1, cycle=True, **RAW)
  ids = np.concatenate([_ids(stream.batch(i)) for i in range(5)])  # 40 slots = 8 passes
  passes = ids.reshape(8, 5)
  for k, order in enumerate(passes):
    np.testing.assert_array_equal(order, np.random.default_rng([1, k]).permutation(5))
  assert len({tuple(p) for p in passes}) > 1
  assert all((stream.batch(i)["mask"] == 1).all() for i in range(5))
  with pytest.raises(ValueError):
    stream.epoch_and_step(0)


def test_stream_restarted_every_r_batches_pads_each_pass_like_the_reference_loader():
  # The Knowledge Swapping reference re-creates its auxiliary loader (shuffle=True,
  # drop_last=False) at every retain epoch: 11 records in batches of 4 give passes of
  # 4 + 4 + 3; a retain epoch of 7 steps restarts it after two passes and one batch.
  stream = streams.make_stream([_indexed_subset(11)], batch_size=4, seed=5, cycle=True,
                               restart_every=7, **RAW)
  assert stream.steps_per_epoch == 3
  for rnd in range(2):
    batches = [stream.batch(rnd * 7 + j) for j in range(7)]
    for pass_, first in enumerate((0, 3, 6)):
      chunk = batches[first:first + 3]
      valid = np.concatenate([_ids(b)[b["mask"] == 1] for b in chunk])
      order = np.random.default_rng([5, rnd, pass_]).permutation(11)
      # The round's last batch is the first of a third pass, which the restart cuts short.
      np.testing.assert_array_equal(valid, order[:valid.size])
      if len(chunk) == 3:
        assert valid.size == 11
        np.testing.assert_array_equal(chunk[-1]["mask"], [1, 1, 1, 0])
        assert _ids(chunk[-1])[-1] in _ids(chunk[-1])[:3]
    assert (batches[6]["mask"] == 1).all()
  first_round = np.concatenate([_ids(stream.batch(j)) for j in range(7)])
  second_round = np.concatenate([_ids(stream.batch(7 + j)) for j in range(7)])
  assert not np.array_equal(first_round, second_round)  # a fresh shuffle every round
  # A set smaller than the batch: each batch holds it once, padded.
  small = streams.make_stream([_indexed_subset(3)], batch_size=4, seed=0, cycle=True,
                              restart_every=5, **RAW)
  for i in range(6):
    b = small.batch(i)
    assert sorted(_ids(b)[b["mask"] == 1]) == [0, 1, 2]
  with pytest.raises(ValueError, match="restart_every"):
    streams.make_stream([_indexed_subset(3)], batch_size=4, seed=0, cycle=False,
                        restart_every=5, **RAW)


CYCLES = (dict(cycle=False), dict(cycle=True), dict(cycle=True, restart_every=4))


def test_iterate_resumes_exactly():
  for cycle in CYCLES:
    stream = streams.make_stream([_indexed_subset(11)], batch_size=4, seed=0, **cycle,
                                 **RAW)
    full = list(itertools.islice(stream.iterate(0), 9))
    resumed = list(itertools.islice(stream.iterate(5), 4))
    for a, b in zip(full[5:], resumed):
      for key in ("image", "label", "mask"):
        np.testing.assert_array_equal(a[key], b[key])
    before = set(threading.enumerate())
    next(stream.iterate(0))
    assert not set(threading.enumerate()) - before  # num_threads=0 reads in this thread
    threaded = streams.make_stream([_indexed_subset(11)], batch_size=4, seed=0, **cycle,
                                   num_threads=2, **RAW)
    for a, b in zip(full, itertools.islice(threaded.iterate(0), 9)):
      np.testing.assert_array_equal(a["image"], b["image"])


def test_process_shards_reassemble_the_global_batch():
  subset = _indexed_subset(21)
  for cycle in CYCLES:
    full = streams.make_stream([subset], batch_size=8, seed=2, **cycle, **RAW)
    shards = [streams.make_stream([subset], batch_size=8, seed=2, **cycle,
                                  process_index=p, process_count=4, **RAW) for p in range(4)]
    assert shards[0].local_batch_size == 2
    for i in range(5):
      glob = full.batch(i)
      local = [s.batch(i) for s in shards]
      for key in ("image", "label", "mask"):
        np.testing.assert_array_equal(np.concatenate([b[key] for b in local]), glob[key])
  with pytest.raises(ConfigError, match=r"^data\.batch_size: 6 is not divisible"):
    streams.make_stream([subset], batch_size=6, seed=0, cycle=False, process_count=4, **RAW)


def test_union_of_subsets_keeps_each_label_map():
  retain = _indexed_subset(10)
  learn_images = np.full((4, 2, 2, 1), 100, np.uint8)
  learn_source = sources.ArraySource(learn_images, [0, 1, 0, 1], 2, "new")
  learn = splits.select(learn_source, (0, 1), name="learn_train", label_map={0: 8, 1: 9})
  stream = streams.make_stream([retain, learn], batch_size=4, seed=0, cycle=False, **RAW)
  assert stream.num_examples == 14 and stream.steps_per_epoch == 4
  batches = [stream.batch(i) for i in range(4)]
  ids = np.concatenate([_ids(b)[b["mask"] == 1] for b in batches])
  labels = np.concatenate([b["label"][b["mask"] == 1] for b in batches])
  assert sorted(labels[ids == 100].tolist()) == [8, 8, 9, 9]
  assert sorted(ids[ids != 100].tolist()) == list(range(10))


def test_eval_batches_in_order_with_padding():
  subset = _indexed_subset(10)
  assert streams.num_eval_batches(subset, batch_size=4) == 3
  batches = list(streams.eval_batches(subset, batch_size=4, **RAW))
  assert len(batches) == 3
  np.testing.assert_array_equal(np.concatenate([_ids(b) for b in batches])[:10], range(10))
  np.testing.assert_array_equal(batches[-1]["mask"], [1, 1, 0, 0])
  halves = [list(streams.eval_batches(subset, batch_size=4, process_index=p, process_count=2,
                                      **RAW)) for p in range(2)]
  np.testing.assert_array_equal(
      np.concatenate([halves[0][2]["mask"], halves[1][2]["mask"]]), [1, 1, 0, 0])


def test_preprocess_matches_pil_and_normalises_per_channel():
  rng = np.random.default_rng(0)
  rgb = rng.integers(0, 256, (3, 5, 6, 3), dtype=np.uint8)
  source = sources.ArraySource(rgb, [0, 1, 2], 3, "rgb")
  subset = splits.select(source, range(3), name="x", label_map={0: 0, 1: 1, 2: 2})
  mean, std = (0.1, 0.2, 0.3), (0.5, 0.25, 2.0)
  batch = streams.make_stream([subset], batch_size=3, seed=0, cycle=False, image_size=8,
                              channels=3, mean=mean, std=std).batch(0)
  order = np.argsort(np.random.default_rng([0, 0]).permutation(3))
  expected = np.stack([np.asarray(Image.fromarray(x).resize((8, 8), Image.BILINEAR))
                       for x in rgb])
  expected = (expected / 255.0 - np.array(mean)) / np.array(std)
  np.testing.assert_allclose(batch["image"][order], expected, atol=1e-5)
  np.testing.assert_array_equal(streams.convert_channels(rgb, 1)[..., 0],
                                [np.asarray(Image.fromarray(x).convert("L")) for x in rgb])
  gray = streams.Preprocess(6, 1, 0.0, 1.0).to_uint8(rgb[0])
  pil_gray = Image.fromarray(rgb[0]).convert("L").resize((6, 6), Image.BILINEAR)
  np.testing.assert_array_equal(gray[..., 0], np.asarray(pil_gray))
  np.testing.assert_array_equal(streams.convert_channels(gray, 3), np.repeat(gray, 3, -1))
  with pytest.raises(ConfigError, match=r"^data\.mean: expected a scalar or 3 values"):
    streams.Preprocess(8, 3, (0.5, 0.5), 0.5)
  with pytest.raises(ConfigError, match=r"^data\.channels: expected 1 or 3"):
    streams.Preprocess(8, 2, 0.5, 0.5)


def test_generic_source_path_synthetic():
  source = sources.SyntheticSource(4, 12, 8, 3, seed=0, split="train")
  subset = splits.select(source, range(4), name="x", label_map={c: c for c in range(4)})
  batch = streams.make_stream([subset], batch_size=5, seed=0, cycle=True, image_size=16,
                              channels=1, mean=0.5, std=0.5).batch(0)
  assert batch["image"].shape == (5, 16, 16, 1)
  assert -1.0 <= batch["image"].min() and batch["image"].max() <= 1.0


def test_tfds_mock_through_stream(tmp_path):
  with tfds.testing.mock_data(num_examples=10):
    source = sources.TfdsSource("mnist", "train", str(tmp_path))
    subset = splits.select(source, range(10), name="x", label_map={c: c for c in range(10)})
    stream = streams.make_stream([subset], batch_size=4, seed=0, cycle=False, image_size=14,
                                 channels=3, mean=0.5, std=0.5)
    batches = [stream.batch(i) for i in range(stream.steps_per_epoch)]
    exact = streams.make_stream([subset], batch_size=4, seed=0, cycle=False, image_size=28,
                                channels=1, mean=0.5, std=0.5).batch(0)
    records = np.random.default_rng([0, 0]).permutation(10)[:4]
    raw = np.stack([source[r]["image"] for r in records]).astype(np.float32)
  np.testing.assert_allclose(exact["image"], (raw / 255 - 0.5) / 0.5, atol=1e-6)
  np.testing.assert_array_equal(exact["label"], source.labels[records])
  assert len(batches) == 3
  for b in batches:
    assert b["image"].shape == (4, 14, 14, 3) and b["image"].dtype == np.float32
    assert -1.0 <= b["image"].min() and b["image"].max() <= 1.0
  labels = np.concatenate([b["label"][b["mask"] == 1] for b in batches])
  np.testing.assert_array_equal(np.sort(labels), np.sort(source.labels))


def test_resample_bicubic_and_a_bad_value():
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (2, 5, 5, 3), dtype=np.uint8)
  source = sources.ArraySource(images, np.array([0, 1]), 2, "toy")
  subset = splits.select(source, range(2), name="t", label_map={0: 0, 1: 1})
  kw = dict(image_size=9, channels=3, mean=0.0, std=1.0)
  for resample, pil in (("bilinear", Image.BILINEAR), ("bicubic", Image.BICUBIC)):
    batch = next(streams.eval_batches(subset, batch_size=2, resample=resample, **kw))
    want = np.stack([np.asarray(Image.fromarray(x).resize((9, 9), pil)) for x in images])
    np.testing.assert_allclose(batch["image"] * 255, want, atol=1e-3)
  with pytest.raises(ConfigError, match=r"^data\.resample: expected one of bilinear, "
                                        r"bicubic, got 'nearest'$"):
    streams.make_stream([subset], batch_size=2, seed=0, cycle=False, resample="nearest", **kw)
