"""Turn image folders into a tfds dataset stored as array_record, without TensorFlow.

    python -m kswap_jax.data.image_folder --root DIR [--root DIR2 ...] --name NAME \\
        --data_dir OUT [--label_rule sorted_rank|imagenet_prefix] [--image_size N]
        [--resize_shorter R]

Layouts: `root/<split>/<class>/<image>` (the splits are the subfolders, e.g. train/test)
or `root/<class>/<image>` (one split, "train"; `--test_fraction F` holds out round(F·n) of
each class's n images as a "test" split, drawn by a seeded permutation). Several roots are
merged split by split, e.g. the reference's separate retain and forget folders into one
ImageNet-100 dataset.

Labels (docs/knowledge_swapping.md):
  sorted_rank      rank of the class folder among all class folders, sorted by name;
  imagenet_prefix  int(folder[:-10]): `17_n01530575` -> 17 (ImageNet-100 index + wnid).

Files are read in sorted order and written unshuffled, so record i of a split is the i-th
sorted file and subsets (stored as record indices) are reproducible on any machine.

How it works without TF: a `tfds.core.GeneratorBasedBuilder` prepared with
`file_format="array_record"` serialises examples with tfds' own copy of the tf.Example
proto, and `tfds.features.Image` encodes PIL images with PIL. (Encoding numpy images would
need TF, and so does `tfds.dataset_builders.store_as_tfds_dataset`, which probes for
`tf.data.Dataset`.) Images are stored as they are on disk when no conversion is needed,
else re-encoded (PNG by default, lossless).

The result reads back with `tfds.data_source(NAME, data_dir=OUT)`, hence with
`kswap_jax.data.sources.TfdsSource` and a config `data.<old|new>.kind = "tfds"`.
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import pathlib
import re
import shutil
import sys
import time
import types
from typing import Iterator, NamedTuple, Sequence

import numpy as np
from PIL import Image

from kswap_jax.errors import ConfigError

log = logging.getLogger(__name__)
PROGRESS_EVERY_S = 10.0  # a progress line per split this often while images are read
MAX_LISTED = 5  # unreadable files named in the error (the warnings name every one)

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif",
                            ".tiff", ".ppm", ".pgm"})
LABEL_RULES = ("sorted_rank", "imagenet_prefix")
VERSION = "1.0.0"
# Formats whose on-disk bytes tfds can store as is (PIL decodes them back).
_PASSTHROUGH = {"JPEG", "PNG"}


class _Listing(NamedTuple):
  """One folder's entries, read once (an ImageNet class folder holds ~1,300 files): its
  sub-folders, its image files and its other files, each sorted; hidden entries left out."""
  dirs: list[pathlib.Path]
  images: list[pathlib.Path]
  others: list[str]


def _is(test) -> bool:
  """`DirEntry.is_dir`/`is_file`, False where the entry cannot be followed (a symbolic link
  loop), as `pathlib`'s."""
  try:
    return test()
  except OSError:
    return False


def _list(path: pathlib.Path) -> _Listing:
  dirs, images, others = [], [], []
  with os.scandir(path) as entries:
    for entry in entries:
      if entry.name.startswith("."):
        continue
      if _is(entry.is_dir):
        dirs.append(pathlib.Path(entry.path))
      elif _is(entry.is_file):
        if os.path.splitext(entry.name)[1].lower() in IMAGE_SUFFIXES:
          images.append(pathlib.Path(entry.path))
        else:
          others.append(entry.name)
  return _Listing(sorted(dirs), sorted(images), sorted(others))


def _count(n: int, noun: str) -> str:
  return f"{n} {noun}" + ("" if n == 1 else "es" if noun.endswith("s") else "s")


def scan(roots: Sequence[str | os.PathLike[str]]) -> dict[str, dict[str, list[pathlib.Path]]]:
  """{split: {class folder name: sorted image paths}} over one or more roots.

  Args:
    roots: folders in either layout (all roots must use the same one).

  Returns:
    Splits in sorted order, each mapping class folder names (sorted) to image files.
  """
  layout = {}
  split_layouts = set()
  listings: dict[pathlib.Path, _Listing] = {}
  for root in roots:
    root = pathlib.Path(root)
    if not root.is_dir():
      raise ConfigError(f"--root: {str(root)!r} is not a directory")
    listings[root] = _list(root)
    top = listings[root].dirs
    if not top:
      raise ConfigError(f"--root: no class folders in {str(root)!r} (expected "
                        "root/<class>/<image> or root/<split>/<class>/<image>)")
    # A split folder holds only class folders; a class folder holds the images.
    listings.update((d, _list(d)) for d in top)
    nested = [bool(listings[d].dirs) and not listings[d].images for d in top]
    if all(nested):
      layout[root] = {d.name: d for d in top}
    elif not any(nested):
      layout[root] = {"train": root}
    else:
      mixed = [d.name for d, n in zip(top, nested) if n]
      raise ConfigError(f"--root: {str(root)!r} mixes split folders ({', '.join(mixed)}) "
                        "with class folders holding images")
    split_layouts.add(all(nested))
  if len(split_layouts) > 1:
    raise ConfigError(f"--root: the roots {[str(r) for r in layout]} mix the "
                      "root/<split>/<class> and root/<class> layouts")
  merged: dict[str, dict[str, list[pathlib.Path]]] = {}
  for splits in layout.values():
    for split, split_dir in splits.items():
      classes = merged.setdefault(split, {})
      for class_dir in listings[split_dir].dirs:
        if class_dir.name in classes:
          raise ConfigError(f"--root: class folder {class_dir.name!r} of split {split!r} "
                            f"appears in more than one root ({str(class_dir)!r})")
        listing = listings.get(class_dir) or _list(class_dir)
        if not listing.images:
          raise ConfigError(f"--root: class folder {str(class_dir)!r} holds no images "
                            f"(suffixes: {', '.join(sorted(IMAGE_SUFFIXES))})")
        if listing.others:  # e.g. a .txt label file, or an image format not in IMAGE_SUFFIXES
          log.warning("%s: skipping %s without an image suffix: %s%s", class_dir,
                      _count(len(listing.others), "file"),
                      ", ".join(listing.others[:MAX_LISTED]),
                      ", ..." if len(listing.others) > MAX_LISTED else "")
        classes[class_dir.name] = listing.images
  return {split: dict(sorted(merged[split].items())) for split in sorted(merged)}


def hold_out(classes: dict[str, list[pathlib.Path]], fraction: float, seed: int = 0
             ) -> dict[str, dict[str, list[pathlib.Path]]]:
  """{"test": ..., "train": ...} from one split's {class: sorted files}: round(fraction·n)
  of each class's n files go to test, chosen by numpy's default_rng([seed, class rank])
  over the sorted files; both splits keep sorted file order."""
  out: dict[str, dict[str, list[pathlib.Path]]] = {"test": {}, "train": {}}
  for rank, (name, files) in enumerate(sorted(classes.items())):
    perm = np.random.default_rng([seed, rank]).permutation(len(files))
    test = set(perm[:int(round(fraction * len(files)))].tolist())
    out["test"][name] = [f for i, f in enumerate(files) if i in test]
    out["train"][name] = [f for i, f in enumerate(files) if i not in test]
  for split in out:
    out[split] = {name: files for name, files in out[split].items() if files}
  return out


def class_labels(class_names: Sequence[str], rule: str) -> dict[str, int]:
  """Label of every class folder name under a labelling rule.

  Args:
    class_names: class folder names over all splits.
    rule: "sorted_rank" or "imagenet_prefix".

  Returns:
    {folder name: int label}.
  """
  names = sorted(set(class_names))
  if rule == "sorted_rank":
    ranks = {name: rank for rank, name in enumerate(names)}
    moved = [n for n in names if n.isdigit() and int(n) != ranks[n]]
    if moved and all(n.isdigit() for n in names):  # a trap: "2" names class id 2, not "2"
      label = ranks[moved[0]]
      log.warning("warning: the class folders are numbers, but their labels follow their "
                  "sorted names (%s): a config names them by label, so class %d is folder "
                  "%r, not %r", ", ".join(f"{n} -> {ranks[n]}" for n in moved[:3]), label,
                  moved[0], str(label))
    return ranks
  if rule != "imagenet_prefix":
    raise ConfigError(f"--label_rule: unknown rule {rule!r} (expected one of: "
                      f"{', '.join(LABEL_RULES)})")
  labels = {}
  for name in names:
    prefix = name[:-10]
    if len(name) <= 10 or not re.fullmatch(r"\d+", prefix):
      raise ConfigError(f"--label_rule: class folder {name!r} is not '<index>' + 10 "
                        "characters (like '17_n01530575'), as imagenet_prefix expects")
    labels[name] = int(prefix)
  by_label = {}
  for name, label in labels.items():
    if label in by_label:
      raise ConfigError(f"--label_rule: class folders {by_label[label]!r} and {name!r} both "
                        f"map to label {label}")
    by_label[label] = name
  return labels


def resize_shorter_center_crop(image: Image.Image, shorter: int, size: int) -> Image.Image:
  """torchvision's `Resize(shorter)` then `CenterCrop(size)` on a PIL image (bilinear)."""
  w, h = image.size
  if (w <= h and w != shorter) or (h < w and h != shorter):
    # torchvision: the shorter side becomes `shorter`, the longer int(shorter·long/short).
    w, h = (shorter, int(shorter * h / w)) if w <= h else (int(shorter * w / h), shorter)
    image = image.resize((w, h), Image.BILINEAR)
  left, top = int(round((w - size) / 2.0)), int(round((h - size) / 2.0))
  return image.crop((left, top, left + size, top + size))


def _load(path: pathlib.Path, mode: str, image_size: int | None,
          encoding: str, resize_shorter: int | None = None) -> bytes | Image.Image:
  """What tfds should store for one file: its own bytes, or a converted PIL image."""
  try:
    with Image.open(path) as image:
      image.load()
      if (image.format in _PASSTHROUGH and image.mode == mode and resize_shorter is None
          and (image_size is None or image.size == (image_size, image_size))):
        return path.read_bytes()
      image = image.convert(mode)
      if resize_shorter is not None:
        image = resize_shorter_center_crop(image, resize_shorter, image_size)
      elif image_size is not None and image.size != (image_size, image_size):
        image = image.resize((image_size, image_size), Image.BILINEAR)
  except OSError as e:
    raise ConfigError(f"--root: cannot read image {str(path)!r} ({e})") from None
  if encoding == "jpeg":
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()
  return image


def build(roots: Sequence[str | os.PathLike[str]], name: str,
          data_dir: str | os.PathLike[str], *, label_rule: str = "sorted_rank",
          image_size: int | None = None, channels: int = 3, num_classes: int | None = None,
          encoding: str = "png", overwrite: bool = False, test_fraction: float = 0.0,
          split_seed: int = 0, resize_shorter: int | None = None) -> pathlib.Path:
  """Writes the image folders as tfds dataset NAME (version 1.0.0) under data_dir.

  Args:
    roots: one or more image folders (see the module docstring for layouts).
    name: tfds dataset name (lower-case letters, digits, underscores).
    data_dir: tfds data_dir to write into.
    label_rule: "sorted_rank" or "imagenet_prefix".
    image_size: resize every image to (image_size, image_size) with PIL bilinear; None
      keeps the original sizes.
    resize_shorter: R: resize the shorter side to R (bilinear, aspect kept) and centre-crop
      image_size × image_size instead, as torchvision's Resize(R) + CenterCrop(image_size)
      (the GS-LoRA ImageNet-100 reference: 256 then 224); needs image_size <= R.
    channels: 3 (RGB) or 1 (grayscale); images are converted with PIL.
    num_classes: size of the label space; default max label + 1.
    encoding: "png" (lossless) or "jpeg" for images that have to be re-encoded.
    overwrite: replace an existing dataset of the same name and version.
    test_fraction: for roots without split folders, the share of each class's images held
      out as the "test" split (`hold_out`); 0 writes "train" only.
    split_seed: the seed of that draw.

  Returns:
    The dataset's version folder.

  Example:
    >>> build(["imagenet100_retain", "imagenet100_forget"], "imagenet100_swap", "~/tfds",
    ...       label_rule="imagenet_prefix", image_size=224, num_classes=100)
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  (slow import)

  if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
    raise ConfigError(f"--name: {name!r} is not a valid tfds name (lower-case letters, "
                      "digits and underscores, starting with a letter)")
  if name in tfds.list_builders(with_community_datasets=False):
    # tfds would resolve the name to its own builder, not to the files written here.
    raise ConfigError(f"--name: {name!r} is already a tfds catalog dataset; pick another "
                      "name")
  if channels not in (1, 3):
    raise ConfigError(f"--channels: expected 1 or 3, got {channels}")
  if image_size is not None and image_size < 1:
    raise ConfigError(f"--image_size: expected a positive int, got {image_size}")
  if resize_shorter is not None and (image_size is None or not image_size <= resize_shorter):
    raise ConfigError(f"--resize_shorter: {resize_shorter} needs --image_size N with "
                      f"N <= {resize_shorter} (the centre crop), got {image_size}")
  if encoding not in ("png", "jpeg"):
    raise ConfigError(f"--encoding: expected png or jpeg, got {encoding!r}")
  layout = scan(roots)
  if test_fraction:
    if not 0 < test_fraction < 1:
      raise ConfigError(f"--test_fraction: expected a value in (0, 1), got {test_fraction}")
    if set(layout) != {"train"}:
      raise ConfigError(f"--test_fraction: the roots already have split folders "
                        f"({', '.join(layout)}); it applies to root/<class>/<image> only")
    if split_seed < 0:
      raise ConfigError(f"--split_seed: expected an int >= 0, got {split_seed}")
    layout = hold_out(layout["train"], test_fraction, split_seed)
    if not layout["test"]:
      raise ConfigError(f"--test_fraction: {test_fraction} holds out no image (classes "
                        f"too small); use a larger fraction")
  labels = class_labels([c for classes in layout.values() for c in classes], label_rule)
  for split, classes in layout.items():
    missing = sorted(set(labels) - set(classes))
    if missing and len(layout) > 1:  # a class no test (or train) image represents
      log.warning("warning: split %r has no image of %s the other splits have: %s%s",
                  split, _count(len(missing), "class"), ", ".join(missing[:MAX_LISTED]),
                  ", ..." if len(missing) > MAX_LISTED else "")
  needed = max(labels.values()) + 1
  if num_classes is None:
    num_classes = needed
  elif num_classes < needed:
    raise ConfigError(f"--num_classes: {num_classes} is too small for label "
                      f"{needed - 1} ({label_rule})")
  names = [f"unused_{i}" for i in range(num_classes)]
  for folder, label in labels.items():
    names[label] = folder
  shown = ", ".join(f"{folder} -> {label}" for folder, label in list(labels.items())[:4])
  log.info("%s: %s (%s%s), label space %d; %s", name, _count(len(labels), "class folder"), shown,
           ", ..." if len(labels) > 4 else "", num_classes, ", ".join(
               f"{split} {_count(sum(len(files) for files in classes.values()), 'image')}"
               for split, classes in layout.items()))

  version_dir = pathlib.Path(data_dir).expanduser() / name / VERSION
  try:
    os.makedirs(version_dir.parent.parent, exist_ok=True)
    if not os.access(version_dir.parent.parent, os.W_OK):
      raise PermissionError(13, "Permission denied")
  except OSError as e:
    raise ConfigError(f"--data_dir {data_dir}: not a writable folder "
                      f"({e.strerror or e})") from None
  if version_dir.exists():
    if not overwrite:
      raise ConfigError(f"--name: {str(version_dir)!r} already exists (pass --overwrite to "
                        "replace it)")
    shutil.rmtree(version_dir)

  mode = "RGB" if channels == 3 else "L"
  shape = (image_size, image_size, channels) if image_size else (None, None, channels)
  features = tfds.features.FeaturesDict({
      "image": tfds.features.Image(shape=shape, encoding_format=encoding),
      "label": tfds.features.ClassLabel(names=names),
  })

  unreadable: list[str] = []  # every split's, reported together once all are read
  pending = set(layout)

  def examples(split: str, classes: dict[str, list[pathlib.Path]]
               ) -> Iterator[tuple[str, dict]]:
    total, done = sum(len(files) for files in classes.values()), 0
    start = last = time.monotonic()
    for folder, files in classes.items():
      for path in files:
        try:
          image = _load(path, mode, image_size, encoding, resize_shorter)
        except ConfigError as e:  # read the rest: the error lists every unreadable file
          log.warning("warning: %s", e)
          unreadable.append(str(path))
        else:
          yield f"{folder}/{path.name}", {"image": image, "label": labels[folder]}
        done += 1
        if time.monotonic() - last >= PROGRESS_EVERY_S or done == total:
          last = time.monotonic()
          log.info("%s: %d/%s (%.0f s)", split, done, _count(total, "image"), last - start)
    pending.discard(split)
    if unreadable and not pending:
      shown = ", ".join(repr(p) for p in unreadable[:MAX_LISTED])
      more = f" and {len(unreadable) - MAX_LISTED} more" if len(unreadable) > MAX_LISTED else ""
      raise ConfigError(f"--root: {_count(len(unreadable), 'image')} cannot be read: "
                        f"{shown}{more} (each with its reason in the warnings above); "
                        f"fix or remove them, nothing was written")

  description = (f"Image folders {[os.fspath(r) for r in roots]} converted by "
                 f"kswap_jax.data.image_folder (label_rule={label_rule}, "
                 f"image_size={image_size}, channels={channels}"
                 + (f", resize_shorter={resize_shorter}" if resize_shorter else "")
                 + (f", test_fraction={test_fraction}, split_seed={split_seed}"
                    if test_fraction else "") + ").")

  def info(self):
    # Unshuffled, so record order is the sorted file order.
    return tfds.core.DatasetInfo(builder=self, description=description, features=features,
                                 disable_shuffling=True)

  def split_generators(self, dl_manager):
    del self, dl_manager  # Everything is local.
    return {split: examples(split, classes) for split, classes in layout.items()}

  def generate_examples(self):
    raise NotImplementedError  # `split_generators` hands tfds the generators directly.

  # One builder class per call: tfds reads the dataset name from the class.
  builder_cls = types.new_class(
      "ImageFolderBuilder", (tfds.core.GeneratorBasedBuilder,), {"skip_registration": True},
      lambda ns: ns.update(name=name, VERSION=tfds.core.Version(VERSION), _info=info,
                           _split_generators=split_generators,
                           _generate_examples=generate_examples,
                           # tfds prints "Downloading and preparing ... Unknown size" and
                           # "downloaded"; nothing downloads here (our log line says what).
                           _log_download_bytes=lambda self: None,
                           _log_download_done=lambda self: None))
  builder = builder_cls(data_dir=os.fspath(pathlib.Path(data_dir).expanduser()),
                        file_format="array_record")
  try:
    builder.download_and_prepare()
  except ConfigError:
    # tfds already removed its incomplete folder; drop the empty dataset folder too.
    if version_dir.parent.is_dir() and not any(version_dir.parent.iterdir()):
      version_dir.parent.rmdir()
    raise
  return version_dir


def main(argv: Sequence[str] | None = None) -> int:
  """Command-line entry point; a `ConfigError` becomes one line on stderr and exit 2."""
  parser = argparse.ArgumentParser(
      prog="python -m kswap_jax.data.image_folder",
      description="Convert image folders to a tfds array_record dataset (no TensorFlow).")
  parser.add_argument("--root", action="append", required=True,
                      help="image folder; repeat to merge several (e.g. retain + forget)")
  parser.add_argument("--name", required=True, help="tfds dataset name to write")
  parser.add_argument("--data_dir", required=True, help="tfds data_dir to write into")
  parser.add_argument("--label_rule", choices=LABEL_RULES, default="sorted_rank")
  parser.add_argument("--image_size", type=int, default=None,
                      help="resize to N x N (PIL bilinear); default keeps sizes")
  parser.add_argument("--resize_shorter", type=int, default=None,
                      help="resize the shorter side to R, then centre-crop --image_size "
                           "(torchvision Resize(R) + CenterCrop(N))")
  parser.add_argument("--channels", type=int, choices=(1, 3), default=3)
  parser.add_argument("--num_classes", type=int, default=None,
                      help="label space size; default max label + 1")
  parser.add_argument("--encoding", choices=("png", "jpeg"), default="png",
                      help="format of re-encoded images (originals are kept when possible)")
  parser.add_argument("--overwrite", action="store_true")
  parser.add_argument("--test_fraction", type=float, default=0.0,
                      help="root/<class>/<image> only: hold out this share of each class "
                           "as the test split (default 0: train only)")
  parser.add_argument("--split_seed", type=int, default=0, help="seed of that hold-out")
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stdout,
                      force=True)
  log.setLevel(logging.INFO)
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  (slow import)
  tfds.disable_progress_bar()  # ours: a line per split every PROGRESS_EVERY_S and at its end
  try:
    path = build(args.root, args.name, args.data_dir, label_rule=args.label_rule,
                 image_size=args.image_size, channels=args.channels,
                 num_classes=args.num_classes, encoding=args.encoding,
                 overwrite=args.overwrite, test_fraction=args.test_fraction,
                 split_seed=args.split_seed, resize_shorter=args.resize_shorter)
  except ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"wrote {path}")
  print(f"read it with data.old (or data.new) = dict(kind='tfds', name='{args.name}', "
        f"data_dir='{args.data_dir}') (README, 'Data'); class names by label: "
        f"{os.path.join(path, 'label.labels.txt')}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
