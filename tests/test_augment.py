"""Training augmentation: crop and flip on hand-built images, the draws' distribution, and
streams that stay a pure function of the batch index with it (resume, processes)."""

import numpy as np
import pytest

from kswap_jax.data import augment, sources, splits, streams
from kswap_jax.errors import ConfigError


def _image(n=2, size=4, channels=1):
  return np.arange(n * size * size * channels, dtype=np.float32).reshape(n, size, size, channels)


def test_centre_crop_without_flip_is_the_identity():
  x = _image()
  out = augment.apply(x, np.zeros(2, bool), np.full((2, 2), 3), padding=3,
                      pad_value=np.array([-9.0]))
  np.testing.assert_array_equal(out, x)


def test_corner_crop_shifts_the_image_and_fills_black():
  x = _image(n=1, size=4)
  # P = 2, top = 0, left = 2: the crop starts P rows above the image and at its left edge,
  # so rows 0-1 are black and rows 2-3 are the image's rows 0-1.
  out = augment.apply(x, np.zeros(1, bool), np.array([[0, 2]]), padding=2,
                      pad_value=np.array([-1.0]))
  expected = np.full_like(x, -1.0)
  expected[0, 2:, :] = x[0, :2, :]
  np.testing.assert_array_equal(out, expected)
  # bottom-right corner (top = left = 2P): the image moves up-left by P.
  out = augment.apply(x, np.zeros(1, bool), np.array([[4, 4]]), padding=2,
                      pad_value=np.array([-1.0]))
  expected = np.full_like(x, -1.0)
  expected[0, :2, :2] = x[0, 2:, 2:]
  np.testing.assert_array_equal(out, expected)


def test_flip_mirrors_only_the_chosen_images():
  x = _image(n=3, channels=3)
  flip = np.array([True, False, True])
  out = augment.apply(x, flip, None, padding=0, pad_value=np.zeros(3))
  np.testing.assert_array_equal(out[0], x[0, :, ::-1])
  np.testing.assert_array_equal(out[1], x[1])
  np.testing.assert_array_equal(out[2], x[2, :, ::-1])
  np.testing.assert_array_equal(x, _image(n=3, channels=3))  # the input is untouched


def test_draws_are_fair_and_cover_every_offset():
  flips, offsets = [], []
  for i in range(200):
    f, o = augment.draws(seed=0, index=i, batch_size=64, padding=4)
    flips.append(f)
    offsets.append(o)
  flips, offsets = np.concatenate(flips), np.concatenate(offsets)
  assert abs(flips.mean() - 0.5) < 0.02                    # 12,800 draws: 4.5 sigma
  counts = np.bincount(offsets.ravel(), minlength=9)
  assert counts.size == 9 and counts.min() > 0.9 * counts.mean()  # uniform on {0..8}
  f1, o1 = augment.draws(seed=0, index=3, batch_size=8, padding=4)
  f2, o2 = augment.draws(seed=0, index=3, batch_size=8, padding=4)
  np.testing.assert_array_equal(o1, o2)
  np.testing.assert_array_equal(f1, f2)


def _subset():
  source = sources.SyntheticSource(num_classes=4, num_examples=40, image_size=8, channels=3,
                                   seed=0, split="train")
  return splits.Subset("train", source, np.arange(40), {c: c for c in range(4)})


def _stream(augment_kind, **kw):
  return streams.make_stream([_subset()], batch_size=8, seed=1, cycle=False, image_size=8,
                             channels=3, mean=0.5, std=0.5, augment=augment_kind, **kw)


def test_augmented_stream_is_a_pure_function_of_the_index():
  plain, aug = _stream("none"), _stream("crop_flip")
  a = [aug.batch(i)["image"] for i in range(6)]
  resumed = list(zip(range(3), _stream("crop_flip").iterate(start=3)))
  for k, b in resumed:
    np.testing.assert_array_equal(b["image"], a[3 + k])
  changed = [not np.array_equal(a[i], plain.batch(i)["image"]) for i in range(6)]
  assert all(changed)
  # Same records and labels, only the pixels move; black padding is (0 - 0.5) / 0.5 = -1.
  np.testing.assert_array_equal(aug.batch(2)["label"], plain.batch(2)["label"])
  assert (a[0] == -1.0).any()


def test_processes_see_slices_of_the_same_augmented_batch():
  whole = _stream("crop_flip").batch(4)["image"]
  halves = [_stream("crop_flip", process_index=p, process_count=2).batch(4)["image"]
            for p in range(2)]
  np.testing.assert_array_equal(np.concatenate(halves), whole)


@pytest.mark.parametrize("kind,padding,field", [("rotate", 4, "data.augment"),
                                                ("crop_flip", -1, "data.crop_padding")])
def test_bad_augmentation_names_the_field(kind, padding, field):
  with pytest.raises(ConfigError, match=field):
    _stream(kind, crop_padding=padding)


def test_method_streams_follow_the_data_section():
  from kswap_jax import config as config_lib, train  # pylint: disable=import-outside-toplevel
  from kswap_jax.methods import common  # pylint: disable=import-outside-toplevel
  config = config_lib.base_config()
  config.model.image_size, config.model.channels = 8, 3
  config.data.augment, config.data.crop_padding = "crop_flip", 2
  stream = common.make_stream(config, [_subset()], batch_size=8, field="x.batch_size", seed=1,
                              cycle=True, mesh=train.mesh_for(config))
  assert (stream.augment, stream.crop_padding) == ("crop_flip", 2)


def test_eval_pass_augments_only_when_asked():
  kw = dict(batch_size=8, image_size=8, channels=3, mean=0.5, std=0.5)
  plain = [b["image"] for b in streams.eval_batches(_subset(), **kw)]
  again = [b["image"] for b in streams.eval_batches(_subset(), **kw, augment="crop_flip",
                                                    seed=3)]
  same = [b["image"] for b in streams.eval_batches(_subset(), **kw, augment="crop_flip",
                                                   seed=3)]
  assert len(plain) == len(again) == 5
  assert all(not np.array_equal(a, b) for a, b in zip(plain, again))
  for a, b in zip(again, same):
    np.testing.assert_array_equal(a, b)
