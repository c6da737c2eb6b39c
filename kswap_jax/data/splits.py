"""Forget / retain / learn splits as seeded, sorted index lists over sources.

A `Subset` is a source plus the record indices it keeps and the map from source labels to
model labels. Knowledge Swapping's label convention: retain and forget classes
keep their pretrained ids 0..num_old-1; learn class c of the new source becomes

    num_old_classes + rank of c in sorted(learn_classes).

Sub-sampling is reproducible on any machine (docs/knowledge_swapping.md): candidates are
sorted record ids, and the only randomness is `np.random.default_rng` with explicit seeds.

References: Xing et al., arXiv 2502.08075 (Knowledge Swapping).
"""

from __future__ import annotations

import collections
import dataclasses
import difflib
import functools
import logging
import re
from typing import Any, Iterable, Mapping

import numpy as np

from kswap_jax.errors import ConfigError

log = logging.getLogger(__name__)

SPLIT_NAMES = ("retain_train", "forget_train", "learn_train",
               "retain_test", "forget_test", "learn_test")


@dataclasses.dataclass(frozen=True, eq=False)
class Subset:
  """Records of one source that form one split, with their model labels.

  Attributes:
    name: split name, e.g. "forget_train".
    source: the random-access source the indices point into.
    indices: int64 sorted record indices into `source`.
    label_map: source label -> model label, for every class in the subset.
  """

  name: str
  source: Any
  indices: np.ndarray
  label_map: Mapping[int, int]

  def __len__(self) -> int:
    return int(self.indices.shape[0])

  @functools.cached_property
  def labels(self) -> np.ndarray:
    """int64 model labels of the subset's records, in index order."""
    return map_labels(self.source.labels[self.indices], self.label_map)

  @property
  def classes(self) -> tuple[int, ...]:
    """Sorted source classes the subset draws from."""
    return tuple(sorted(self.label_map))

  def __repr__(self) -> str:
    return (f"Subset(name={self.name!r}, source={self.source.name!r}, n={len(self)}, "
            f"classes={list(self.classes)})")


def map_labels(labels: np.ndarray, label_map: Mapping[int, int]) -> np.ndarray:
  """Vectorised `label_map[l]` for every l in `labels` (all must be keys)."""
  labels = np.asarray(labels, dtype=np.int64)
  if labels.size == 0:
    return labels.copy()
  table = np.full(max(max(label_map), int(labels.max())) + 1, -1, dtype=np.int64)
  for source_label, model_label in label_map.items():
    table[source_label] = model_label
  mapped = table[labels]
  if (mapped < 0).any():
    missing = sorted(set(labels[mapped < 0].tolist()))
    raise ValueError(f"labels {missing} are not in the label map")
  return mapped


def select(source: Any, classes: Iterable[int], *, name: str,
           label_map: Mapping[int, int] | None = None, ratio: float = 1.0,
           n_per_class: int = 0, seed: int = 0,
           field: str = "") -> Subset:
  """Records of `source` whose label is in `classes`, optionally sub-sampled.

  Sub-sampling, applied to the sorted candidate record ids:
    - few-shot (`n_per_class > 0`): for each class c, the first `n_per_class` ids of
      `default_rng([seed, c]).permutation(ids of c)`;
    - otherwise, ratio < 1: the first int(ratio * n) ids of
      `default_rng(seed).permutation(candidates)`, over all candidates, not per class
      (docs/knowledge_swapping.md).

  Args:
    source: random-access source with a `labels` array.
    classes: source labels to keep.
    name: split name stored on the subset.
    label_map: source label -> model label; must cover `classes` (default: the identity).
    ratio: kept share of the candidates, in (0, 1]; ignored when n_per_class > 0.
    n_per_class: exact number of records per class (0 = off).
    seed: sub-sampling seed.
    field: config field named in error messages (e.g. "swap.forget_classes").

  Returns:
    A `Subset` with sorted int64 indices.

  Example:
    >>> forget = select(old_train, (3, 7), name="forget_train", ratio=0.1, seed=0,
    ...                 field="swap.forget_classes")
  """
  field = field or name
  classes = sorted({int(c) for c in classes})
  label_map = {c: c for c in classes} if label_map is None else label_map
  missing = [c for c in classes if c not in label_map]
  if missing:
    raise ConfigError(f"{field}: classes {missing} have no model label in split {name!r} "
                      f"(its label map covers {len(label_map)} classes)")
  if not 0.0 < ratio <= 1.0:
    raise ConfigError(f"{field}: ratio for split {name!r} must be in (0, 1], got {ratio}")
  if n_per_class < 0:
    raise ConfigError(f"{field}: shots for split {name!r} must be >= 0, got {n_per_class}")
  labels = np.asarray(source.labels)
  candidates = np.flatnonzero(np.isin(labels, classes)).astype(np.int64)
  if n_per_class > 0:
    chosen = []
    for c in classes:
      ids = candidates[labels[candidates] == c]
      if ids.size < n_per_class:
        raise ConfigError(f"{field}: class {c} has {ids.size} records in source "
                          f"{source.name!r}, fewer than the {n_per_class} shots requested "
                          f"for split {name!r}")
      chosen.append(np.random.default_rng([seed, c]).permutation(ids)[:n_per_class])
    indices = np.concatenate(chosen) if chosen else candidates[:0]
  elif ratio < 1.0:
    perm = np.random.default_rng(seed).permutation(candidates.size)
    indices = candidates[perm[:int(ratio * candidates.size)]]
  else:
    indices = candidates
  if indices.size == 0:
    raise ConfigError(f"{field}: split {name!r} is empty (classes {classes} have "
                      f"{candidates.size} records in source {source.name!r}, ratio {ratio}, "
                      f"shots {n_per_class})")
  return Subset(name=name, source=source, indices=np.sort(indices).astype(np.int64),
                label_map={int(c): int(label_map[c]) for c in classes})


def same_data(a: Any, b: Any) -> bool:
  """Whether two sources hold the same underlying data (same name and same labels)."""
  return (a is b or (a.name == b.name and len(a) == len(b)
                     and np.array_equal(np.asarray(a.labels), np.asarray(b.labels))))


def as_id(text: str) -> int | None:
  """The class id a string spells (digits, an optional sign, surrounding spaces), else
  None: "3" -> 3, "1_0" and "cat" -> None."""
  return int(text) if re.fullmatch(r"\s*[+-]?\d+\s*", text) else None


def class_ids(value: Any, field: str, source: Any = None) -> tuple[int, ...]:
  """Class ids from a config value: an int, a name, or a tuple of them (None -> ()).

  An int, or a string that reads as one ("3"), is a class id. Any other string names a
  class of `source` (its `class_names`: a tfds dataset's ClassLabel names, an image
  folder's class folders); a string that is no name but whose comma-separated parts all
  are, "cat,dog" (as `--config.swap.forget_classes=cat,dog` arrives), names each part.
  Ranges and duplicates are the caller's checks.

  Args:
    value: the config value.
    field: the config field, named in errors.
    source: the source whose label space the ids index (None: names are refused).

  Raises:
    ConfigError: naming the field, for a value that is neither ids nor names, a name where
      the source has none, or a name the source does not have (with the nearest names).

  Example:
    >>> class_ids(("cat", 5), "swap.forget_classes", cifar10_train)
    (3, 5)
  """
  if value is None:
    return ()
  if isinstance(value, (int, np.integer, str)):
    value = (value,)
  if isinstance(value, (bool, np.bool_)) or not isinstance(value, Iterable):
    raise ConfigError(f"{field}: expected class ids (ints) or class names, got {value!r}")
  names = getattr(source, "class_names", None)
  lookup = {n: i for i, n in enumerate(names or ())}
  ids = []
  for v in value:
    if isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_)):
      ids.append(int(v))
      continue
    if not isinstance(v, str):
      raise ConfigError(f"{field}: expected class ids (ints) or class names, got {value!r}")
    if as_id(v) is not None:
      ids.append(as_id(v))
      if lookup.get(v.strip(), ids[-1]) != ids[-1]:  # also another class's name
        log.warning("warning: %s: %r is read as class id %d; the class named %r is id %d "
                    "(a string that reads as an int is an id)", field, v, ids[-1],
                    v.strip(), lookup[v.strip()])
      continue
    if not names:
      raise ConfigError(f"{field}: {v!r} names a class, but source "
                        f"{getattr(source, 'name', '?')!r} has no class names; give class "
                        f"ids (ints)")
    parts = [v] if v in lookup else [p.strip() for p in v.split(",") if p.strip()]
    for part in parts:
      if part in lookup:
        ids.append(lookup[part])
      elif as_id(part) is not None and len(parts) > 1:
        ids.append(as_id(part))
      else:
        near = difflib.get_close_matches(part, list(lookup), n=3)
        listed = ", ".join(map(repr, near)) if near else ", ".join(map(repr, names[:5])) + (
            ", ..." if len(names) > 5 else "")
        quote = ("; names inside brackets are quoted: \"(('cat','dog'),('eel',))\""
                 if part[:1] in "([" or part[-1:] in ")]" else "")
        raise ConfigError(f"{field}: no class named {part!r} in source {source.name!r} "
                          f"({len(names)} classes; {'nearest' if near else 'e.g.'}: {listed})"
                          f"{quote}")
  return tuple(ids)


def names_classes(value: Any) -> bool:
  """Whether a class field's value names a class (a string that is not an int): its ids
  are known only once the source is read."""
  items = value if isinstance(value, (tuple, list)) else (value,)
  return any(isinstance(v, str) and as_id(v.strip()) is None for v in items)


def class_label(source: Any, class_id: int) -> str:
  """`class_id`, with its name when the source has names: "3 (cat)"."""
  names = getattr(source, "class_names", None)
  return f"{class_id} ({names[class_id]})" if names and 0 <= class_id < len(names) else (
      str(class_id))


def classes_text(source: Any, ids: Iterable[int], limit: int = 8) -> str:
  """`ids` as a log shows them, with names where the source has them, the first `limit`
  of a longer list: "3 (cat), 5 (dog)", "0, 1, 2, ... (95 classes)"."""
  ids = list(ids)
  text = ", ".join(class_label(source, c) for c in ids[:limit])
  return text + (f", ... ({len(ids)} classes)" if len(ids) > limit else "")


def shown(source: Any, ids: Iterable[int]) -> str:
  """Class ids as an error message shows them, with the source's names where it has them:
  "[1 (cat), 3 (fish)]", or "[1, 3]"."""
  return f"[{classes_text(source, ids, limit=20)}]"


def _class_ids(cfg: Any, key: str, source: Any) -> tuple[int, ...]:
  """The class ids of cfg.swap.<key> (None or missing -> empty), names resolved against
  `source`."""
  ids = class_ids(cfg[key] if key in cfg else None, f"swap.{key}", source)
  duplicates = sorted(c for c, n in collections.Counter(ids).items() if n > 1)
  if duplicates:
    raise ConfigError(f"swap.{key}: duplicate class ids {shown(source, duplicates)}")
  return ids


def _check_range(ids: tuple[int, ...], key: str, upper: int, what: str, source: Any) -> None:
  bad = sorted(c for c in ids if not 0 <= c < upper)
  if bad:
    raise ConfigError(f"swap.{key}: class ids {shown(source, bad)} are outside [0, {upper}) "
                      f"({what})")


def _check_present(ids: tuple[int, ...], key: str, sources: Iterable[Any]) -> None:
  """Every class must have records in every source (train and test)."""
  for source in sources:
    absent = sorted(set(ids) - set(np.unique(source.labels).tolist()))
    if absent:
      split = getattr(source, "split", None)  # the one that lacks them (train or test)
      raise ConfigError(f"swap.{key}: class ids {shown(source, absent)} have no records in "
                        f"source "
                        f"{source.name!r}{f' split {split!r}' if split else ''} "
                        f"({len(source)} records)")


def _ratio(cfg: Any, key: str) -> float:
  value = float(cfg[key]) if key in cfg and cfg[key] is not None else 1.0
  if not 0.0 < value <= 1.0:
    raise ConfigError(f"swap.{key}: expected a float in (0, 1], got {value}")
  return value


def _shots(cfg: Any, key: str) -> int:
  value = cfg[key] if key in cfg and cfg[key] is not None else 0
  if isinstance(value, bool) or int(value) != value or value < 0:
    raise ConfigError(f"swap.{key}: expected an int >= 0 (0 = off), got {value!r}")
  return int(value)


def knowledge_swap_splits(old_train: Any, old_test: Any, new_train: Any, new_test: Any,
                          cfg: Any) -> dict[str, Subset]:
  """The six Knowledge Swapping splits, validated against the config.

  Retain and forget come from the old (pretraining) source and keep their ids; learn comes
  from the new source and maps to num_old_classes + rank. Train splits are sub-sampled by
  ratio or shots (shots win when both are set), each drawn once with `swap.seed`
  (docs/knowledge_swapping.md); test splits keep every test record of their classes. When
  old and new are the same dataset (same name and labels, as in the digits demo), learn
  classes must not be old classes.

  Args:
    old_train: old source, train split.
    old_test: old source, test split.
    new_train: new source, train split.
    new_test: new source, test split.
    cfg: the `swap` ConfigDict (or mapping): num_old_classes, forget_classes,
      retain_classes (empty/None = every old id not forgotten), learn_classes,
      {retain,forget,learn}_ratio, {retain,forget,learn}_shots, seed.

  Returns:
    dict with keys retain_train, forget_train, learn_train, retain_test, forget_test,
    learn_test, each a `Subset`.

  Example:
    >>> splits = knowledge_swap_splits(old_tr, old_te, new_tr, new_te, config.swap)
    >>> len(splits["forget_train"])
  """
  num_old = cfg["num_old_classes"] if "num_old_classes" in cfg else None
  if isinstance(num_old, bool) or not isinstance(num_old, (int, np.integer)) or num_old < 1:
    raise ConfigError(f"swap.num_old_classes: expected a positive int, got {num_old!r}")
  num_old = int(num_old)
  forget = _class_ids(cfg, "forget_classes", old_train)
  retain = _class_ids(cfg, "retain_classes", old_train)
  learn = _class_ids(cfg, "learn_classes", new_train)
  for key, ids in (("forget_classes", forget), ("learn_classes", learn)):
    if not ids:
      raise ConfigError(f"swap.{key}: expected at least one class id")
  _check_range(forget, "forget_classes", num_old, f"swap.num_old_classes = {num_old}",
               old_train)
  _check_range(retain, "retain_classes", num_old, f"swap.num_old_classes = {num_old}",
               old_train)
  _check_range(learn, "learn_classes", new_train.num_classes,
               f"classes of the new source {new_train.name!r}", new_train)
  overlap = sorted(set(forget) & set(retain))
  if overlap:
    raise ConfigError(f"swap.retain_classes: class ids {shown(old_train, overlap)} are also in "
                      "swap.forget_classes")
  if not retain:
    retain = tuple(c for c in range(num_old) if c not in set(forget))
    if not retain:
      raise ConfigError("swap.retain_classes: every old class is forgotten, nothing to "
                        "retain")
  if same_data(old_train, new_train):
    # One dataset serves both roles (the digits demo): a class cannot be old and new.
    clash = sorted(set(learn) & (set(forget) | set(retain)))
    if clash:
      raise ConfigError(f"swap.learn_classes: class ids {shown(new_train, clash)} are also old "
                        f"classes of the "
                        f"same dataset {new_train.name!r} (forget or retain)")
  _check_present(forget, "forget_classes", (old_train, old_test))
  _check_present(retain, "retain_classes", (old_train, old_test))
  _check_present(learn, "learn_classes", (new_train, new_test))

  seed = int(cfg["seed"]) if "seed" in cfg and cfg["seed"] is not None else 0
  old_map = {c: c for c in forget + retain}
  learn_map = {c: num_old + rank for rank, c in enumerate(sorted(learn))}
  plan = {
      "retain": (old_train, old_test, retain, old_map),
      "forget": (old_train, old_test, forget, old_map),
      "learn": (new_train, new_test, learn, learn_map),
  }
  splits = {}
  for role, (train, test, ids, label_map) in plan.items():
    field = f"swap.{role}_classes"
    label_map = {c: label_map[c] for c in ids}
    ratio, shots = _ratio(cfg, f"{role}_ratio"), _shots(cfg, f"{role}_shots")
    # With shots on, the only way selection fails is too few records for the shots.
    splits[f"{role}_train"] = select(
        train, ids, name=f"{role}_train", label_map=label_map, ratio=ratio,
        n_per_class=shots, seed=seed,
        field=(f"swap.{role}_shots" if shots else
               f"swap.{role}_ratio" if ratio < 1 else field))
    splits[f"{role}_test"] = select(test, ids, name=f"{role}_test", label_map=label_map,
                                    seed=seed, field=field)
  return {name: splits[name] for name in SPLIT_NAMES}
