"""Tests for kswap_jax.data.tasks: the class order, task sequences, per-task lists, subsets."""

import random

import ml_collections
import numpy as np
import pytest

from kswap_jax.data import sources
from kswap_jax.data import tasks
from kswap_jax.errors import ConfigError

ORDER = tasks.ORDER_SEED_1337


def test_hard_coded_order_equals_python_random_seed_1337():
  random.seed(1337)
  order = list(range(100))
  random.shuffle(order)
  assert tuple(order) == ORDER
  assert ORDER[:10] == (83, 17, 10, 9, 89, 52, 7, 32, 37, 77)
  assert ORDER[-3:] == (90, 68, 79)
  assert tasks.class_order(100) == ORDER


def test_class_order_other_sizes_and_identity():
  rng = random.Random(7)
  want = list(range(10))
  rng.shuffle(want)
  assert tasks.class_order(10, seed=7) == tuple(want)
  assert tasks.class_order(5, seed=None) == (0, 1, 2, 3, 4)


def test_single_step_100_minus_y():
  (task,) = tasks.make_tasks(num_classes=100, num_tasks=1, per_task=10)
  assert task.forget == ORDER[90:] and task.retain == ORDER[:90]
  assert task.old == () and task.missing == () and task.name == "task_1"
  assert task.retain_with_data == ORDER[:90]
  assert task.prototype_classes == tuple(range(100))


def test_continual_4x20_matches_the_reference_slices():
  ts = tasks.make_tasks(num_classes=100, num_tasks=4, per_task=20)
  for t, task in enumerate(ts):
    assert task.forget == ORDER[80 - 20 * t:100 - 20 * t]
    assert task.retain == ORDER[:80 - 20 * t]
    assert sorted(task.old) == sorted(ORDER[100 - 20 * t:])
  assert ts[3].name == "task_4" and len(ts[3].retain) == 20 and len(ts[3].old) == 60


def test_missing_classes_are_retained_without_data():
  ts = tasks.make_tasks(num_classes=100, num_tasks=4, per_task=20, num_missing=5)
  for t, task in enumerate(ts):
    assert task.missing == ORDER[:5]
    assert task.retain == ORDER[:80 - 20 * t]          # Acc_r includes the missing classes
    assert task.retain_with_data == ORDER[5:80 - 20 * t]
    assert not set(task.missing) & set(task.prototype_classes)


def test_explicit_forget_lists_and_retain_keeps_future_forget_classes():
  ts = tasks.make_tasks(num_classes=10, num_tasks=2, forget_classes=((9, 8), (1,)),
                        order=tuple(range(10)))
  assert ts[0].retain == (0, 1, 2, 3, 4, 5, 6, 7)       # 1 is forgotten only later
  assert ts[1].retain == (0, 2, 3, 4, 5, 6, 7) and ts[1].old == (9, 8)


@pytest.mark.parametrize("kwargs,field", [
    (dict(forget_classes=((1, 2), (2, 3))), "tasks.forget_classes"),     # overlap across tasks
    (dict(forget_classes=((1, 1), (3,))), "tasks.forget_classes"),       # duplicate in a task
    (dict(forget_classes=((1, 12), (3,))), "tasks.forget_classes"),      # out of range
    (dict(forget_classes=((1,),)), "tasks.forget_classes"),              # wrong count
    (dict(per_task=5), "tasks.per_task"),                                 # 2 x 5 = all classes
    (dict(per_task=0), "tasks.per_task"),
    (dict(per_task=2, missing_classes=(11,)), "tasks.missing_classes"),
    (dict(per_task=2, missing_classes=(3,), order=tuple(range(10))[::-1]),
     "tasks.missing_classes"),                             # 3 is forgotten in task 2
    (dict(per_task=4, num_missing=2), "tasks.num_tasks"),                 # nothing to replay
    (dict(per_task=2, order=(0, 1, 2)), "tasks.order"),
])
def test_bad_task_configs_raise_config_error_naming_the_field(kwargs, field):
  with pytest.raises(ConfigError, match=f"^{field}:"):
    tasks.make_tasks(num_classes=10, num_tasks=2, **kwargs)


def test_tasks_from_config_reads_the_section():
  cfg = ml_collections.ConfigDict(dict(num_classes=100, num_tasks=4, per_task=20,
                                       order_seed=1337, order=(), forget_classes=(),
                                       num_missing=0, missing_classes=()))
  assert tasks.tasks_from_config(cfg)[2].forget == ORDER[40:60]
  cfg.order_seed = None
  assert tasks.tasks_from_config(cfg)[0].forget == tuple(range(80, 100))


def test_per_task_lists():
  assert tasks.per_task(0.2, 3, "gs_lora.beta") == (0.2, 0.2, 0.2)
  assert tasks.per_task((1, 2, 3, 4, 5), 4, "gs_lora.beta") == (1.0, 2.0, 3.0, 4.0)
  assert tasks.per_task((0.3,), 2, "gs_lora.beta") == (0.3, 0.3)
  with pytest.raises(ConfigError, match=r"^gs_lora.beta: expected one value for every task or "
                     r"one per task \(4 tasks\), got 2"):
    tasks.per_task((0.3, 0.4), 4, "gs_lora.beta")
  with pytest.raises(ConfigError, match="^gs_lora.beta:"):
    tasks.per_task("abc", 2, "gs_lora.beta")


def _source(num_classes, per_class, name):
  labels = np.tile(np.arange(num_classes), per_class)
  return sources.ArraySource(np.zeros((labels.size, 2, 2, 1), np.uint8), labels,
                             num_classes, name)


def test_task_splits_ratio_shots_and_test_sets():
  train, test = _source(10, 20, "train"), _source(10, 3, "test")
  ts = tasks.make_tasks(num_classes=10, num_tasks=2, per_task=2, num_missing=1,
                        order=tuple(range(10)))
  s = tasks.task_splits(train, test, ts[1], data_ratio=0.5, seed=3)
  assert set(s) == {"retain_train", "forget_train", "retain_test", "forget_test", "old_test",
                    "missing_test"}
  assert s["forget_train"].classes == (6, 7) and len(s["forget_train"]) == 20
  assert s["retain_train"].classes == (1, 2, 3, 4, 5) and len(s["retain_train"]) == 50
  assert s["retain_test"].classes == (0, 1, 2, 3, 4, 5) and len(s["retain_test"]) == 18
  assert s["old_test"].classes == (8, 9) and s["missing_test"].classes == (0,)
  np.testing.assert_array_equal(s["forget_train"].labels,
                                train.labels[s["forget_train"].indices])   # identity labels
  # Re-drawn per task, reproducible for a seed.
  again = tasks.task_splits(train, test, ts[1], data_ratio=0.5, seed=3)
  np.testing.assert_array_equal(again["retain_train"].indices, s["retain_train"].indices)
  first = tasks.task_splits(train, test, ts[0], data_ratio=0.5, seed=3)
  assert "old_test" not in first
  few = tasks.task_splits(train, test, ts[0], shots=4, seed=3)
  assert len(few["forget_train"]) == 8
  np.testing.assert_array_equal(np.bincount(few["retain_train"].labels, minlength=10),
                                [0, 4, 4, 4, 4, 4, 4, 4, 0, 0])
  with pytest.raises(ConfigError, match="^tasks.shots:"):
    tasks.task_splits(train, test, ts[0], shots=25)
  # Tasks over more classes than the data has (tasks.num_classes too large): one line that
  # names the field, not a traceback from the label map.
  wide = tasks.make_tasks(num_classes=12, num_tasks=2, per_task=2, order=tuple(range(12)))
  with pytest.raises(ConfigError, match=r"^tasks\.num_classes: the tasks use classes 10, 11, "
                                        r"but the data has 10 classes \(labels 0\.\.9\); set tasks\.num_classes to 10$"):
    tasks.task_splits(train, test, wide[0])


def test_tasks_may_name_classes_by_the_source_s_class_names():
  names = tuple(f"class_{c}" for c in range(10))
  source = sources.ArraySource(np.zeros((10, 2, 2, 1), np.uint8), np.arange(10), 10, "named",
                               class_names=names)
  by_ids = tasks.make_tasks(num_classes=10, num_tasks=2, forget_classes=((1, 2), (3,)),
                            missing_classes=(9,))
  by_names = tasks.make_tasks(num_classes=10, num_tasks=2, source=source,
                              forget_classes=(("class_1", "class_2"), "class_3"),
                              missing_classes=("class_9",))
  assert by_names == by_ids
  with pytest.raises(ConfigError, match=r"^tasks\.forget_classes: no class named 'class_11' "
                                        r"in source 'named' \(10 classes; nearest: 'class_1'"):
    tasks.make_tasks(num_classes=10, num_tasks=1, forget_classes=(("class_11",),),
                     source=source)
