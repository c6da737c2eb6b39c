"""Tests for kswap_jax.data.image_folder: folders -> tfds array_record -> TfdsSource."""

import os
import pathlib
import re

import numpy as np
from PIL import Image
import pytest

from kswap_jax.data import image_folder
from kswap_jax.data import sources
from kswap_jax.errors import ConfigError

CLASSES = ("3_n01440764", "17_n01530575", "42_n01601694")


def _write(folder: pathlib.Path, rng, count=2, size=(6, 7), mode="RGB", fmt="png"):
  """Writes `count` random images into folder; returns them in sorted file order."""
  folder.mkdir(parents=True, exist_ok=True)
  shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
  arrays = []
  for k in range(count):
    array = rng.integers(0, 256, shape, dtype=np.uint8)
    Image.fromarray(array, mode).save(folder / f"img{k}.{fmt}")
    arrays.append(array)
  return arrays


@pytest.fixture(name="split_root")
def fixture_split_root(tmp_path):
  """root/<split>/<class>/<image> with three ImageNet-style class folders."""
  rng = np.random.default_rng(0)
  root = tmp_path / "root"
  expected = {}
  for split in ("train", "test"):
    for cls in sorted(CLASSES):  # the record order: folders sorted by name, then files
      for array in _write(root / split / cls, rng, count=2 if split == "train" else 1):
        expected.setdefault(split, []).append((cls, array))
  return root, expected


def test_split_layout_imagenet_prefix_roundtrip(split_root, tmp_path):
  root, expected = split_root
  out = tmp_path / "tfds"
  path = image_folder.build([root], "toy_swap", out, label_rule="imagenet_prefix",
                            num_classes=100)
  assert path == out / "toy_swap" / "1.0.0"
  for split in ("train", "test"):
    source = sources.TfdsSource("toy_swap", split, str(out))
    assert source.num_classes == 100 and len(source) == len(expected[split])
    assert [source.class_names[int(cls.split("_")[0])] for cls in CLASSES] == list(CLASSES)
    np.testing.assert_array_equal(source.labels,
                                  [int(cls.split("_")[0]) for cls, _ in expected[split]])
    for i, (_, array) in enumerate(expected[split]):
      np.testing.assert_array_equal(source[i]["image"], array)
  with pytest.raises(ConfigError, match=r"^data\.old\.test_split: unknown split 'val' .*"
                                        r"\(available: test, train\)$"):
    sources.load_source(dict(kind="tfds", name="toy_swap", data_dir=str(out),
                             test_split="val"), "test", field="data.old")


def test_flat_layout_sorted_rank_grayscale_resized(tmp_path):
  rng = np.random.default_rng(1)
  root = tmp_path / "flat"
  for cls in ("zebra", "ant", "moose"):
    _write(root / cls, rng, mode="L", size=(9, 5), fmt="jpg")
  out = tmp_path / "tfds"
  image_folder.build([root], "toy_flat", out, channels=1, image_size=4)
  source = sources.TfdsSource("toy_flat", "train", str(out))
  assert source.num_classes == 3 and len(source) == 6
  assert source.class_names == ("ant", "moose", "zebra")  # configs may name classes by them
  # A train split only: a config reading "test" is told how to get one.
  with pytest.raises(ConfigError, match=r"^data\.old\.test_split: unknown split 'test' .*"
                                        r"\(available: train\); .* --test_fraction F"):
    sources.load_source(dict(kind="tfds", name="toy_flat", data_dir=str(out)), "test",
                        field="data.old")
  np.testing.assert_array_equal(source.labels, [0, 0, 1, 1, 2, 2])  # ant, moose, zebra
  for i, cls in enumerate(["ant", "ant", "moose", "moose", "zebra", "zebra"]):
    with Image.open(root / cls / f"img{i % 2}.jpg") as original:
      resized = np.asarray(original.convert("L").resize((4, 4), Image.BILINEAR))
    image = source[i]["image"]
    assert image.shape == (4, 4, 1) and image.dtype == np.uint8
    # JPEG is lossy: compare with the decoded file, converted as the tool does.
    np.testing.assert_array_equal(image[..., 0], resized)


def test_flat_layout_test_fraction_holds_out_each_class(tmp_path):
  """A flat folder gets a per-class test split: round(0.4 * 5) = 2 of each class's 5 images,
  drawn by the seed, the same on a rebuild; train and test share no file."""
  rng = np.random.default_rng(2)
  root = tmp_path / "flat"
  for cls in ("b", "a"):
    _write(root / cls, rng, count=5)
  read = {}
  for name, seed in (("toy_hold", 0), ("toy_hold_again", 0), ("toy_hold_seed1", 1)):
    image_folder.build([root], name, tmp_path / "tfds", test_fraction=0.4, split_seed=seed)
    read[name] = {split: sources.TfdsSource(name, split, str(tmp_path / "tfds"))
                  for split in ("train", "test")}
  hold = read["toy_hold"]
  assert hold["test"].labels.tolist() == [0, 0, 1, 1]
  assert hold["train"].labels.tolist() == [0, 0, 0, 1, 1, 1]
  images = lambda src: {src[i]["image"].tobytes() for i in range(len(src))}
  assert not images(hold["test"]) & images(hold["train"])
  assert len(images(hold["test"]) | images(hold["train"])) == 10
  assert images(read["toy_hold_again"]["test"]) == images(hold["test"])
  assert images(read["toy_hold_seed1"]["test"]) != images(hold["test"])
  with pytest.raises(ConfigError, match="--test_fraction: expected a value in"):
    image_folder.build([root], "toy_bad", tmp_path / "tfds", test_fraction=1.5)


def test_jpeg_bytes_are_kept_when_no_conversion_is_needed(tmp_path):
  rng = np.random.default_rng(2)
  _write(tmp_path / "root" / "cat", rng, count=1, fmt="jpg")
  image_folder.build([tmp_path / "root"], "toy_jpeg", tmp_path / "tfds")
  source = sources.TfdsSource("toy_jpeg", "train", str(tmp_path / "tfds"))
  with Image.open(tmp_path / "root" / "cat" / "img0.jpg") as original:
    np.testing.assert_array_equal(source[0]["image"], np.asarray(original))


def test_two_roots_are_merged(split_root, tmp_path):
  root, _ = split_root
  rng = np.random.default_rng(3)
  other = tmp_path / "forget"
  for split in ("train", "test"):
    _write(other / split / "7_n01518878", rng, count=1)
  image_folder.build([root, other], "toy_merged", tmp_path / "tfds",
                     label_rule="imagenet_prefix")
  source = sources.TfdsSource("toy_merged", "test", str(tmp_path / "tfds"))
  assert source.num_classes == 43
  np.testing.assert_array_equal(source.labels, [17, 3, 42, 7])


def test_cli_and_bad_inputs(split_root, tmp_path, capsys):
  root, _ = split_root
  out = str(tmp_path / "tfds")
  assert image_folder.main(["--root", str(tmp_path / "missing"), "--name", "x",
                            "--data_dir", out]) == 2
  assert f"{tmp_path / 'missing'}" in capsys.readouterr().err
  assert image_folder.main(["--root", str(root), "--name", "toy_cli", "--data_dir", out,
                            "--label_rule", "sorted_rank"]) == 0
  assert sources.TfdsSource("toy_cli", "train", out).labels.tolist() == [0, 0, 1, 1, 2, 2]
  # What was read and how the folders became labels, progress per split, where it went;
  # not tfds' "Downloading and preparing dataset Unknown size" (nothing downloads).
  printed = capsys.readouterr().out.splitlines()
  assert printed[0].startswith("toy_cli: 3 class folders (") and "label space 3" in printed[0]
  assert [line for line in printed if "/6 images" in line] == [
      line for line in printed if line.startswith("train: ")]
  assert printed[-2:] == [f"wrote {out}/toy_cli/1.0.0", f"read it with data.old (or data.new)"
                          f" = dict(kind='tfds', name='toy_cli', data_dir='{out}') (README, "
                          f"'Data'); class names by label: {out}/toy_cli/1.0.0/label.labels.txt"]
  # sorted_rank: labels 0, 1, 2 are the folders in sorted order, one name per line.
  assert (pathlib.Path(out) / "toy_cli" / "1.0.0" / "label.labels.txt").read_text().split() == \
      sorted(CLASSES)
  assert not any("Downloading" in line or "%|" in line for line in printed), printed

  # One class folder holding one image (one task's data may be a single class).
  _write(tmp_path / "one" / "cat", np.random.default_rng(1), count=1)
  assert image_folder.main(["--root", str(tmp_path / "one"), "--name", "toy_one",
                            "--data_dir", out]) == 0
  printed = capsys.readouterr().out.splitlines()
  assert printed[0].startswith("toy_one: 1 class folder (cat -> 0)"), printed
  assert printed[0].endswith("; train 1 image") and "train: 1/1 image (" in printed[1], printed

  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(ConfigError, match="no class folders in"):
    image_folder.build([empty], "toy_empty", out)
  with pytest.raises(ConfigError, match="already exists"):
    image_folder.build([root], "toy_cli", out)
  (tmp_path / "a_file").write_text("")
  with pytest.raises(ConfigError, match=r"^--data_dir .*a_file/tfds: not a writable folder"):
    image_folder.build([root], "toy_x", str(tmp_path / "a_file" / "tfds"))
  with pytest.raises(ConfigError, match="already a tfds catalog dataset"):
    image_folder.build([root], "mnist", out)
  with pytest.raises(ConfigError, match="^--label_rule: class folder 'ant'"):
    _write(tmp_path / "plain" / "ant", np.random.default_rng(0), count=1)
    image_folder.build([tmp_path / "plain"], "toy_plain", out, label_rule="imagenet_prefix")
  bad = root / "test" / CLASSES[0] / "broken.png"
  bad.write_bytes(b"not an image")
  also = root / "train" / CLASSES[1] / "truncated.png"
  good = sorted((root / "train" / CLASSES[1]).iterdir())[0]
  also.write_bytes(good.read_bytes()[:60])  # a PNG cut short
  # Every unreadable file of every split is named (the error once all are read; each with
  # its reason in a warning), and nothing is written.
  with pytest.raises(ConfigError, match=r"^--root: 2 images cannot be read: ") as e:
    image_folder.build([root], "toy_broken", out)
  assert f"'{bad}'" in str(e.value) and f"'{also}'" in str(e.value), e.value
  assert not (pathlib.Path(out) / "toy_broken").exists()


def test_resize_shorter_then_centre_crop_as_torchvision(tmp_path):
  # torchvision Resize(R) + CenterCrop(N): the shorter side becomes R, the longer
  # int(R·long/short); the crop starts at int(round((side − N) / 2)).
  rng = np.random.default_rng(3)
  root = tmp_path / "flat"
  wide = _write(root / "a", rng, count=1, size=(12, 8))[0]    # (h, w) = (8, 12): no resize
  tall = _write(root / "b", rng, count=1, size=(8, 12))[0]    # (12, 8) -> (15, 10) at R = 10
  out = tmp_path / "tfds"
  image_folder.build([root], "toy_crop8", out, image_size=6, resize_shorter=8)
  source = sources.TfdsSource("toy_crop8", "train", str(out))
  np.testing.assert_array_equal(source[0]["image"], wide[1:7, 3:9])
  np.testing.assert_array_equal(source[1]["image"], tall[3:9, 1:7])
  image_folder.build([root], "toy_crop10", out, image_size=6, resize_shorter=10)
  source = sources.TfdsSource("toy_crop10", "train", str(out))
  resized = np.asarray(Image.fromarray(tall).resize((10, 15), Image.BILINEAR))
  np.testing.assert_array_equal(source[1]["image"], resized[4:10, 2:8])  # round(4.5) = 4
  with pytest.raises(ConfigError, match=r"^--resize_shorter: 4 needs --image_size N with "
                                        r"N <= 4 \(the centre crop\), got 6$"):
    image_folder.build([root], "toy_crop_bad", out, image_size=6, resize_shorter=4)


def test_a_class_missing_from_one_split_is_named(tmp_path, caplog):
  rng = np.random.default_rng(0)
  root = tmp_path / "root"
  for split, classes in (("train", ("ant", "bee", "cat")), ("test", ("ant",))):
    for cls in classes:
      _write(root / split / cls, rng, count=1)
  with caplog.at_level("WARNING", logger=image_folder.log.name):
    image_folder.build([root], "toy_partial", tmp_path / "tfds")
  said = [r.getMessage() for r in caplog.records if "has no image" in r.getMessage()]
  assert said == ["warning: split 'test' has no image of 2 classes the other splits have: "
                  "bee, cat"]


def test_files_that_are_not_images_are_named_when_skipped(tmp_path, caplog):
  rng = np.random.default_rng(0)
  _write(tmp_path / "root" / "ant", rng, count=1)
  (tmp_path / "root" / "ant" / "labels.txt").write_text("ant\n")
  (tmp_path / "root" / "ant" / ".DS_Store").write_text("")  # hidden: not named
  with caplog.at_level("WARNING", logger=image_folder.log.name):
    layout = image_folder.scan([tmp_path / "root"])
  assert [p.name for p in layout["train"]["ant"]] != [] and "labels.txt" not in str(layout)
  said = [r.getMessage() for r in caplog.records if "skipping" in r.getMessage()]
  assert said == [f"{tmp_path / 'root' / 'ant'}: skipping 1 file without an image suffix: "
                  f"labels.txt"]


def test_a_symbolic_link_loop_is_passed_over(tmp_path):
  rng = np.random.default_rng(0)
  _write(tmp_path / "root" / "ant", rng, count=1)
  os.symlink("loop", tmp_path / "root" / "loop")  # a link to itself: not a folder
  os.symlink("loop2", tmp_path / "root" / "ant" / "loop2.png")
  layout = image_folder.scan([tmp_path / "root"])
  assert list(layout["train"]) == ["ant"] and len(layout["train"]["ant"]) == 1


def test_class_folders_named_by_numbers_that_are_not_their_labels_are_warned_of(caplog):
  """Labels follow the folders' sorted names ("10" before "2"), and a config's class 2 is a
  label, not the folder "2": said once, with where the two part."""
  with caplog.at_level("WARNING", logger=image_folder.log.name):
    labels = image_folder.class_labels(["1", "2", "3", "10", "11"], "sorted_rank")
    image_folder.class_labels(["0", "1", "2"], "sorted_rank")  # labels = names: no warning
  assert labels == {"1": 0, "10": 1, "11": 2, "2": 3, "3": 4}
  assert [r.getMessage() for r in caplog.records] == [
      "warning: the class folders are numbers, but their labels follow their sorted names "
      "(1 -> 0, 10 -> 1, 11 -> 2): a config names them by label, so class 0 is folder '1', "
      "not '0'"]
