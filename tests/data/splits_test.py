"""Tests for kswap_jax.data.splits: select and the Knowledge Swapping splits."""

import ml_collections
import numpy as np
import pytest

from kswap_jax.data import sources
from kswap_jax.data import splits
from kswap_jax.errors import ConfigError


def _source(num_classes, per_class, name, present=None):
  """ArraySource with interleaved labels; `present` restricts the classes that occur."""
  present = list(range(num_classes)) if present is None else present
  labels = np.tile(present, per_class)
  return sources.ArraySource(np.zeros((labels.size, 2, 2, 1), np.uint8), labels,
                             num_classes, name)


def _swap_cfg(**overrides):
  cfg = dict(num_old_classes=10, forget_classes=(2, 5), retain_classes=(),
             learn_classes=(4, 1), retain_ratio=1.0, forget_ratio=1.0, learn_ratio=1.0,
             retain_shots=0, forget_shots=0, learn_shots=0, seed=0)
  cfg.update(overrides)
  return ml_collections.ConfigDict(cfg)


def test_select_ratio_is_seeded_sorted_and_sized():
  source = _source(10, 20, "old")
  identity = {c: c for c in range(10)}
  sub = splits.select(source, (3, 1), name="x", label_map=identity, ratio=0.25, seed=4)
  candidates = np.flatnonzero(np.isin(source.labels, (1, 3)))
  assert len(sub) == int(0.25 * candidates.size) == 10
  np.testing.assert_array_equal(sub.indices, np.sort(sub.indices))
  assert sub.indices.dtype == np.int64 and set(sub.indices) <= set(candidates)
  expected = np.sort(candidates[np.random.default_rng(4).permutation(candidates.size)[:10]])
  np.testing.assert_array_equal(sub.indices, expected)
  again = splits.select(source, (1, 3), name="x", label_map=identity, ratio=0.25, seed=4)
  np.testing.assert_array_equal(sub.indices, again.indices)
  other = splits.select(source, (1, 3), name="x", label_map=identity, ratio=0.25, seed=5)
  assert not np.array_equal(sub.indices, other.indices)
  full = splits.select(source, (1, 3), name="x", label_map=identity)
  np.testing.assert_array_equal(full.indices, candidates)


def test_select_few_shot_and_label_map():
  source = _source(10, 20, "old")
  sub = splits.select(source, (7, 2), name="x", label_map={2: 10, 7: 11}, n_per_class=3,
                      seed=1)
  assert len(sub) == 6
  np.testing.assert_array_equal(np.bincount(source.labels[sub.indices], minlength=10)[[2, 7]],
                                [3, 3])
  np.testing.assert_array_equal(sub.labels, np.where(source.labels[sub.indices] == 2, 10, 11))
  plain = splits.select(source, (7, 2), name="x", n_per_class=3, seed=1)  # identity map
  np.testing.assert_array_equal(plain.indices, sub.indices)
  np.testing.assert_array_equal(plain.labels, source.labels[sub.indices])
  with pytest.raises(ConfigError, match=r"^swap\.learn_shots: class 2 has 20 records"):
    splits.select(source, (2,), name="x", label_map={2: 2}, n_per_class=21,
                  field="swap.learn_shots")


def test_knowledge_swap_label_convention():
  old_train, old_test = _source(10, 20, "old"), _source(10, 5, "old")
  new_train, new_test = _source(6, 8, "new"), _source(6, 4, "new")
  s = splits.knowledge_swap_splits(old_train, old_test, new_train, new_test,
                                   _swap_cfg(retain_ratio=0.5, forget_shots=4))
  assert list(s) == list(splits.SPLIT_NAMES)
  assert s["forget_train"].label_map == {2: 2, 5: 5}
  assert s["retain_train"].classes == (0, 1, 3, 4, 6, 7, 8, 9)
  assert s["learn_train"].label_map == {1: 10, 4: 11}  # num_old + rank in sorted order
  assert set(s["learn_test"].labels.tolist()) == {10, 11}
  assert len(s["retain_train"]) == int(0.5 * 8 * 20)
  assert len(s["forget_train"]) == 8
  assert len(s["learn_train"]) == 2 * 8
  # Test splits keep every test record of their classes.
  assert len(s["retain_test"]) == 8 * 5 and len(s["forget_test"]) == 2 * 5
  assert len(s["learn_test"]) == 2 * 4
  assert s["learn_train"].source is new_train and s["forget_test"].source is old_test


def test_same_dataset_for_old_and_new():
  train, test = _source(10, 6, "digits"), _source(10, 3, "digits")
  cfg = _swap_cfg(num_old_classes=8, forget_classes=(2, 5), learn_classes=(8, 9))
  s = splits.knowledge_swap_splits(train, test, train, test, cfg)
  assert s["retain_train"].classes == (0, 1, 3, 4, 6, 7)
  assert s["learn_train"].label_map == {8: 8, 9: 9}
  with pytest.raises(ConfigError, match=r"^swap\.learn_classes: class ids \[1\]"):
    splits.knowledge_swap_splits(train, test, train, test,
                                 _swap_cfg(num_old_classes=8, learn_classes=(1, 9)))


@pytest.mark.parametrize("overrides, field", [
    (dict(forget_classes=(2, 2)), "swap.forget_classes"),
    (dict(retain_classes=(0, 1, 1)), "swap.retain_classes"),
    (dict(learn_classes=(3, 3)), "swap.learn_classes"),
    (dict(retain_classes=(0, 2)), "swap.retain_classes"),
    (dict(forget_classes=(10,)), "swap.forget_classes"),
    (dict(retain_classes=(-1,)), "swap.retain_classes"),
    (dict(learn_classes=(6,)), "swap.learn_classes"),
    (dict(forget_classes=()), "swap.forget_classes"),
    (dict(forget_classes=(9,)), "swap.forget_classes"),  # absent from the old source
    (dict(forget_ratio=0.01), "swap.forget_ratio"),      # int(0.01 * 40) = 0 records
    (dict(retain_ratio=0.0), "swap.retain_ratio"),
    (dict(learn_ratio=1.5), "swap.learn_ratio"),
    (dict(learn_shots=-1), "swap.learn_shots"),
    (dict(learn_shots=100), "swap.learn_shots"),
    (dict(num_old_classes=0), "swap.num_old_classes"),
])
def test_knowledge_swap_bad_config(overrides, field):
  old_train = _source(10, 20, "old", present=list(range(9)))
  old_test = _source(10, 5, "old", present=list(range(9)))
  new_train, new_test = _source(6, 8, "new"), _source(6, 4, "new")
  # Class 9 has no old records, so the default retains the others explicitly.
  overrides = dict(dict(retain_classes=(0, 1, 3, 4, 6, 7, 8)), **overrides)
  with pytest.raises(ConfigError) as e:
    splits.knowledge_swap_splits(old_train, old_test, new_train, new_test,
                                 _swap_cfg(**overrides))
  assert str(e.value).startswith(f"{field}: "), str(e.value)
  assert "\n" not in str(e.value)


def test_empty_split_message():
  source = _source(10, 20, "old")
  with pytest.raises(ConfigError) as e:
    splits.select(source, (2,), name="forget_train", label_map={2: 2}, ratio=0.01,
                  field="swap.forget_classes")
  assert str(e.value).startswith("swap.forget_classes: split 'forget_train' is empty (")


def test_a_class_missing_from_one_split_names_that_split():
  old_train, old_test = _source(10, 20, "old"), _source(10, 5, "old")
  new_train, new_test = _source(6, 8, "new"), _source(6, 4, "new", present=[0, 1, 2, 3])
  new_train.split, new_test.split = "train", "test"  # as the tfds sources carry them
  with pytest.raises(ConfigError, match=r"^swap\.learn_classes: class ids \[4\] have no "
                                        r"records in source 'new' split 'test' \(16 records\)"):
    splits.knowledge_swap_splits(old_train, old_test, new_train, new_test, _swap_cfg())


ANIMALS = ("ant", "bee", "cat", "dog", "eel", "fox", "gnu", "hen", "ibis", "jay")


def _named(num_classes, per_class, name, names):
  labels = np.tile(range(num_classes), per_class)
  return sources.ArraySource(np.zeros((labels.size, 2, 2, 1), np.uint8), labels,
                             num_classes, name, class_names=names)


def test_class_ids_read_ints_int_strings_and_the_source_s_class_names():
  source = _named(10, 2, "zoo", ANIMALS)
  ids = lambda value: splits.class_ids(value, "swap.forget_classes", source)
  assert ids(None) == () and ids(4) == (4,) and ids("4") == (4,)
  assert ids(("cat", 5, "7")) == (2, 5, 7)
  assert ids("cat,dog") == (2, 3)  # how --config.swap.forget_classes=cat,dog arrives
  assert ids(("cat,dog", "eel")) == (2, 3, 4)
  comma = _named(3, 2, "commas", ("tench, Tinca tinca", "goldfish", "shark"))
  assert splits.class_ids(("tench, Tinca tinca", "shark"), "f", comma) == (0, 2)  # whole name
  assert splits.classes_text(source, (2, 3)) == "2 (cat), 3 (dog)"
  assert splits.classes_text(source, range(10), limit=2) == "0 (ant), 1 (bee), ... (10 classes)"
  assert splits.names_classes(("cat", 1)) and not splits.names_classes((1, "2"))
  for value, said in (
      ("kat", r"^swap\.forget_classes: no class named 'kat' in source 'zoo' \(10 classes; "
              r"nearest: 'cat', 'ant'\)$"),
      (("cat", "zebra"), r"no class named 'zebra' in source 'zoo' \(10 classes; e\.g\.: "
                         r"'ant', 'bee', 'cat', 'dog', 'eel', \.\.\.\)$"),
      (2.5, r"^swap\.forget_classes: expected class ids \(ints\) or class names, got 2\.5$"),
      ((True,), r"expected class ids \(ints\) or class names")):
    with pytest.raises(ConfigError, match=said):
      ids(value)
  assert splits.as_id(" 7 ") == 7 and splits.as_id("1_0") is None and splits.as_id("7a") is None
  with pytest.raises(ConfigError, match=r"^f: 'cat' names a class, but source 'old' has no "
                                        r"class names; give class ids \(ints\)$"):
    splits.class_ids(("cat",), "f", _source(10, 2, "old"))


def test_knowledge_swap_splits_by_class_names_are_those_by_ids():
  old_train, old_test = _named(10, 20, "zoo", ANIMALS), _named(10, 5, "zoo", ANIMALS)
  new_train, new_test = _source(6, 8, "new"), _source(6, 4, "new")
  by_ids = splits.knowledge_swap_splits(old_train, old_test, new_train, new_test, _swap_cfg())
  by_names = splits.knowledge_swap_splits(old_train, old_test, new_train, new_test,
                                          _swap_cfg(forget_classes=("cat", "fox")))
  for name, subset in by_ids.items():
    np.testing.assert_array_equal(by_names[name].indices, subset.indices)
    assert by_names[name].label_map == subset.label_map
  with pytest.raises(ConfigError, match=r"^swap\.learn_classes: 'cat' names a class, but "
                                        r"source 'new' has no class names"):
    splits.knowledge_swap_splits(old_train, old_test, new_train, new_test,
                                 _swap_cfg(learn_classes=("cat",)))  # names of data.new
  with pytest.raises(ConfigError, match=r"^swap\.retain_classes: class ids \[2 \(cat\)\] are "
                                        r"also in swap\.forget_classes"):  # names shown too
    splits.knowledge_swap_splits(old_train, old_test, new_train, new_test,
                                 _swap_cfg(retain_classes=("ant", 2)))


def test_a_string_that_reads_as_an_int_is_an_id_with_a_warning_when_it_names_another(caplog):
  """Class folders named by numbers ("1", "10", "2": labels by sorted name): "1" is id 1,
  and the warning says which id the class named "1" has; "2" is id 2 and its name, silently."""
  source = _named(3, 2, "numbers", ("1", "10", "2"))
  with caplog.at_level("WARNING", logger=splits.log.name):
    assert splits.class_ids(("2", "1"), "f", source) == (2, 1)
  assert [r.getMessage() for r in caplog.records] == [
      "warning: f: '1' is read as class id 1; the class named '1' is id 0 (a string that "
      "reads as an int is an id)"]
