"""Tests for kswap_jax.data.sources: digits, synthetic, tfds (mocked) and load_source."""

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

from kswap_jax.data import sources
from kswap_jax.errors import ConfigError


def test_digits_split_is_deterministic_disjoint_and_complete():
  labels = sources._digits_arrays()[1]
  train = sources.digits_split_indices(labels, "train", seed=0, test_fraction=0.3)
  test = sources.digits_split_indices(labels, "test", seed=0, test_fraction=0.3)
  assert len(train) + len(test) == len(labels) == 1797
  assert not set(train.tolist()) & set(test.tolist())
  np.testing.assert_array_equal(train, np.sort(train))
  np.testing.assert_array_equal(
      test, sources.digits_split_indices(labels, "test", seed=0, test_fraction=0.3))
  # Stratified: each class holds round(0.3 n_c) test records.
  for c in range(10):
    assert (labels[test] == c).sum() == round(0.3 * (labels == c).sum())
  other = sources.digits_split_indices(labels, "test", seed=1, test_fraction=0.3)
  assert len(other) == len(test) and not np.array_equal(other, test)


def test_digits_source_images_and_labels():
  train, test = sources.digits_source("train"), sources.digits_source("test")
  assert len(train) + len(test) == 1797
  assert train.num_classes == 10 and train.name == test.name == "digits"
  example = train[0]
  assert example["image"].shape == (8, 8, 1) and example["image"].dtype == np.uint8
  assert train.images.max() == 255 and train.images.min() == 0
  # 0..16 gray levels map to round(v * 255 / 16): only 17 distinct values.
  assert len(np.unique(train.images)) <= 17
  assert example["label"] == train.labels[0] and train.labels.dtype == np.int64
  with pytest.raises(ConfigError, match=r"^data\.old: unknown split 'val'"):
    sources.digits_source("val", field="data.old")


def test_synthetic_is_deterministic_and_balanced():
  a = sources.SyntheticSource(5, 50, 16, 3, seed=7, split="train")
  b = sources.SyntheticSource(5, 50, 16, 3, seed=7, split="train")
  test = sources.SyntheticSource(5, 50, 16, 3, seed=7, split="test")
  np.testing.assert_array_equal(a[13]["image"], b[13]["image"])
  assert a[13]["image"].shape == (16, 16, 3) and a[13]["image"].dtype == np.uint8
  assert not np.array_equal(a[13]["image"], a[18]["image"])  # same class, new sample
  assert not np.array_equal(a[13]["image"], test[13]["image"])
  np.testing.assert_array_equal(np.bincount(a.labels), [10] * 5)
  assert a[13]["label"] == 3
  assert a.name == b.name != sources.SyntheticSource(5, 50, 16, 3, 8, "train").name


def test_synthetic_classes_are_separable():
  # Nearest class mean on raw pixels: a floor on what a small ViT can learn.
  train = sources.SyntheticSource(10, 200, 16, 1, seed=0, split="train")
  test = sources.SyntheticSource(10, 100, 16, 1, seed=0, split="test")
  x = np.stack([train[i]["image"] for i in range(len(train))]).astype(np.float32)
  means = np.stack([x[train.labels == c].mean(0) for c in range(10)])
  xt = np.stack([test[i]["image"] for i in range(len(test))]).astype(np.float32)
  dist = ((xt[:, None] - means[None]) ** 2).sum(axis=(2, 3, 4))
  assert (dist.argmin(1) == test.labels).mean() >= 0.9


def test_array_source_adds_channel_axis():
  source = sources.ArraySource(np.zeros((3, 4, 4), np.uint8), [0, 1, 1], 2, "toy")
  assert source[2]["image"].shape == (4, 4, 1) and source[2]["label"] == 1
  with pytest.raises(ValueError):
    sources.ArraySource(np.zeros((3, 4, 4), np.uint8), [0, 1, 2], 2, "toy")


def test_load_source_kinds_and_errors():
  cfg = ml_collections.ConfigDict(dict(kind="digits", seed=0, test_fraction=0.3))
  assert len(sources.load_source(cfg, "test", field="data.old")) == 539
  syn = ml_collections.ConfigDict(dict(kind="synthetic", num_classes=4, image_size=8,
                                       channels=1, train_per_class=3, test_per_class=2,
                                       seed=0))
  source = sources.load_source(syn, "test", field="data.new")
  assert len(source) == 8 and source.num_classes == 4 and source[0]["image"].shape == (8, 8, 1)
  with pytest.raises(ConfigError) as e:
    sources.load_source(ml_collections.ConfigDict(dict(kind="x")), "train", field="data.old")
  assert str(e.value) == ("data.old.kind: unknown source kind 'x' (expected one of: digits, "
                          "synthetic, tfds)")
  with pytest.raises(ConfigError, match=r"^data\.new\.num_classes: required"):
    sources.load_source(dict(kind="synthetic", image_size=8), "train", field="data.new")
  with pytest.raises(ConfigError, match=r"^data\.old\.name: required"):
    sources.load_source(dict(kind="tfds", name="", data_dir=""), "train", field="data.old")


def test_tfds_source_reads_mocked_mnist(tmp_path):
  with tfds.testing.mock_data(num_examples=12):
    source = sources.TfdsSource("mnist", "train", str(tmp_path), field="data.old")
    assert len(source) == 12 and source.num_classes == 10
    assert source.labels.dtype == np.int64 and source.labels.shape == (12,)
    example = source[3]
    assert example["image"].shape == (28, 28, 1) and example["image"].dtype == np.uint8
    assert [source[i]["label"] for i in range(12)] == source.labels.tolist()


@pytest.mark.parametrize("name", ["mnist", "no_such_dataset_xyz"])
def test_tfds_source_missing_dataset(tmp_path, name):
  cfg = dict(kind="tfds", name=name, data_dir=str(tmp_path), train_split="train")
  with pytest.raises(ConfigError) as e:
    sources.load_source(cfg, "train", field="data.old")
  assert str(e.value) == (
      f"data.old.name: tfds dataset '{name}' not found in data_dir '{tmp_path}' (it holds no "
      f"prepared dataset; prepare it "
      f"once with: pip install -e '.[tf]' && tfds build {name} --data_dir {tmp_path} "
      "--file_format array_record; a dataset tfds does not ship, e.g. ImageNet-100 or "
      "CASIA-100, from a folder of images: python -m kswap_jax.data.image_folder --help)")


def test_a_missing_or_misplaced_data_dir_is_named(tmp_path):
  load = lambda data_dir: sources.load_source(
      dict(kind="tfds", name="mnist", data_dir=str(data_dir), train_split="train"), "train",
      field="data.old")
  with pytest.raises(ConfigError, match=r"^data\.old\.data_dir: '.*/nowhere' does not exist, "
                                        r"so tfds dataset 'mnist' is not there \(a typo\? .*"
                                        r"tfds build mnist"):
    load(tmp_path / "nowhere")  # a typo, or a dataset still to be built there
  (tmp_path / "myfolder" / "1.0.0").mkdir(parents=True)
  (tmp_path / "myfolder" / "1.0.0" / "dataset_info.json").write_text("{}")
  with pytest.raises(ConfigError, match=r"not found in data_dir .* \(it holds myfolder; "):
    load(tmp_path)
  (tmp_path / "mnist" / "3.0.1").mkdir(parents=True)  # a version folder given as data_dir
  with pytest.raises(ConfigError, match=(rf"data_dir is the folder of 'mnist' itself or of one "
                                         rf"of its versions: give the folder above it, "
                                         rf"{tmp_path}; ")):
    load(tmp_path / "mnist" / "3.0.1")


def test_tfds_source_half_built_dataset(tmp_path):
  """A version folder whose dataset_info.json is empty (an interrupted `tfds build`)."""
  (tmp_path / "cifar10" / "3.0.2").mkdir(parents=True)
  (tmp_path / "cifar10" / "3.0.2" / "dataset_info.json").write_text("{}")
  cfg = dict(kind="tfds", name="cifar10", data_dir=str(tmp_path), train_split="train")
  with pytest.raises(ConfigError, match=(
      rf"^data\.old\.name: tfds dataset 'cifar10' in '{tmp_path}' cannot be opened \(.*\); if "
      rf"a build of it was interrupted, remove that build's version folder under "
      rf"{tmp_path}/cifar10 and build it again")):
    sources.load_source(cfg, "train", field="data.old")
