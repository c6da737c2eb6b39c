"""Forgetting task sequences: which classes each task forgets, retains, has forgotten before.

GS-LoRA's protocol (closed label space: the head keeps every class, forgotten classes simply
stop being predicted). Classes are taken in a fixed shuffled `order`; with N classes, K
classes forgotten per task, T tasks and M missing classes, task t = 0..T−1 has

    forget_t   = order[N − K(t+1) : N − Kt]       the classes to erase now (Acc_f)
    old_t      = order[N − Kt : N]                 forgotten in tasks 0..t−1 (Acc_o)
    retain_t   = order[0 : N − K(t+1)]             every class still kept (Acc_r)
    missing    = order[0 : M]                      kept, but no training data (Acc_m)

so single-step "100-Y" is T = 1, K = Y, and the continual benchmark is N = 100, K = 20,
T = 4 (columns "100-20, 80-20, 60-20, 40-20"). Explicit per-task forget lists may replace
the order-based ones. Training subsets (`task_splits`) are drawn per task from the retained
classes that have data and from the forget classes, by `data_ratio` (a share of the whole
split) or `shots` (per class).

The class order of the reference is Python's `random.seed(1337); random.shuffle(range(100))`,
hard-coded in `ORDER_SEED_1337` so it does not depend on the interpreter.

References: Zhao et al., arXiv 2403.11530 (GS-LoRA); arXiv 2501.09705 (GS-LoRA++).
"""

from __future__ import annotations

import dataclasses
import random
from typing import Any, Sequence

import numpy as np

from kswap_jax.data import splits as splits_lib
from kswap_jax.errors import ConfigError

# random.seed(1337); x = list(range(100)); random.shuffle(x)  (every GS-LoRA script).
ORDER_SEED_1337 = (
    83, 17, 10, 9, 89, 52, 7, 32, 37, 77, 61, 34, 78, 55, 56, 63, 69, 22, 75, 66,
    35, 72, 71, 23, 86, 38, 24, 5, 29, 30, 16, 11, 82, 19, 57, 14, 91, 27, 98, 53,
    0, 20, 59, 28, 47, 18, 6, 48, 12, 62, 1, 43, 3, 60, 41, 85, 4, 95, 97, 36,
    94, 65, 67, 99, 25, 33, 70, 40, 92, 31, 58, 15, 45, 2, 87, 76, 80, 44, 64, 8,
    51, 54, 13, 88, 84, 26, 50, 39, 96, 81, 49, 42, 21, 93, 74, 73, 46, 90, 68, 79)


def _short(ids: Sequence[int], n: int = 8) -> str:
  """`ids` as a list, the first `n` of a long one: "[3, 5]", "[0, 1, ... (+12)]"."""
  ids = list(ids)
  if len(ids) <= n:
    return str(ids)
  return "[" + ", ".join(map(str, ids[:n])) + f", ... (+{len(ids) - n})]"


def class_order(num_classes: int, seed: int | None = 1337) -> tuple[int, ...]:
  """The order in which classes are assigned to tasks.

  Args:
    num_classes: size of the label space N.
    seed: Python `random` seed of an in-place shuffle of 0..N−1 (the reference's
      procedure); None keeps the identity order. N = 100 with seed 1337 returns the
      hard-coded `ORDER_SEED_1337`.

  Returns:
    A permutation of 0..N−1.

  Example:
    >>> class_order(100)[:5]
    (83, 17, 10, 9, 89)
  """
  if num_classes <= 0:
    raise ValueError(f"num_classes must be positive, got {num_classes}")
  if seed is None:
    return tuple(range(num_classes))
  if num_classes == 100 and seed == 1337:
    return ORDER_SEED_1337
  order = list(range(num_classes))
  random.Random(seed).shuffle(order)
  return tuple(order)


@dataclasses.dataclass(frozen=True)
class ForgetTask:
  """The classes of one forgetting task (model label = class id).

  Attributes:
    index: 0-based task index t.
    forget: classes to forget in this task (Acc_f).
    retain: every class still kept after this task, missing ones included (Acc_r).
    missing: kept classes without training data (Acc_m); a subset of `retain`.
    old: classes forgotten in tasks 0..t−1 (Acc_o); empty for the first task.
  """
  index: int
  forget: tuple[int, ...]
  retain: tuple[int, ...]
  missing: tuple[int, ...] = ()
  old: tuple[int, ...] = ()

  @property
  def name(self) -> str:
    return f"task_{self.index + 1}"

  @property
  def retain_with_data(self) -> tuple[int, ...]:
    """Retained classes whose training images may be replayed."""
    missing = set(self.missing)
    return tuple(c for c in self.retain if c not in missing)

  @property
  def prototype_classes(self) -> tuple[int, ...]:
    """Classes with training data in this task: forget ∪ retain_with_data (sorted)."""
    return tuple(sorted(self.forget + self.retain_with_data))


def make_tasks(*, num_classes: int, num_tasks: int = 1, per_task: int = 0,
               order: Sequence[int] | None = None, forget_classes: Sequence[Any] = (),
               num_missing: int = 0, missing_classes: Sequence[int] = (),
               field: str = "tasks", source: Any = None) -> list[ForgetTask]:
  """The validated task sequence.

  Either `per_task` > 0 (forget K classes per task from the end of `order`) or
  `forget_classes` (one explicit tuple of class ids per task) defines what is forgotten;
  missing classes are `missing_classes` or, when empty, the first `num_missing` of `order`.

  Args:
    num_classes: N, the size of the label space (head rows).
    num_tasks: T ≥ 1.
    per_task: K classes per task (order-based tasks); 0 with explicit `forget_classes`.
    order: a permutation of 0..N−1 (default `class_order(N)`).
    forget_classes: T tuples of class ids, overriding `per_task`.
    num_missing: M, missing classes taken from the front of `order`.
    missing_classes: explicit missing class ids, overriding `num_missing`.
    field: config section named in errors (fields `<field>.<name>`).
    source: the source the ids index; class names in `order`, `forget_classes` and
      `missing_classes` are its `class_names` (`splits.class_ids`).

  Returns:
    T `ForgetTask`s.

  Raises:
    ConfigError: naming the field, for out-of-range, duplicate or overlapping classes, a
      forget list of the wrong length, a missing class that is also forgotten, or a task
      with no retained class left to train on.

  Example:
    >>> tasks = make_tasks(num_classes=100, num_tasks=4, per_task=20)
    >>> tasks[1].forget == class_order(100)[60:80]
    True
  """
  if isinstance(num_classes, bool) or int(num_classes) != num_classes or num_classes < 2:
    raise ConfigError(f"{field}.num_classes: expected an int >= 2, got {num_classes!r}")
  if isinstance(num_tasks, bool) or int(num_tasks) != num_tasks or num_tasks < 1:
    raise ConfigError(f"{field}.num_tasks: expected an int >= 1, got {num_tasks!r}")
  num_classes, num_tasks = int(num_classes), int(num_tasks)
  if order is None or len(order) == 0:
    order = class_order(num_classes)
  read = lambda value, name: splits_lib.class_ids(value, f"{field}.{name}", source)
  order = read(order, "order")
  if sorted(order) != list(range(num_classes)):
    twice = sorted({c for c in order if order.count(c) > 1})
    absent = sorted(set(range(num_classes)) - set(order))
    outside = sorted({c for c in order if not 0 <= c < num_classes})
    what = "; ".join(f"{name} {_short(ids)}" for name, ids in (
        ("twice:", twice), ("missing:", absent), ("outside:", outside)) if ids)
    raise ConfigError(f"{field}.order: expected a permutation of 0..{num_classes - 1}, got "
                      f"{len(order)} ids ({what})")
  if forget_classes:
    lists = [read(v, "forget_classes") for v in forget_classes]
    if len(lists) != num_tasks:
      raise ConfigError(f"{field}.forget_classes: expected {num_tasks} tuples (one per task, "
                        f"{field}.num_tasks), got {len(lists)}")
  else:
    if isinstance(per_task, bool) or int(per_task) != per_task or per_task < 1:
      raise ConfigError(f"{field}.per_task: expected an int >= 1 classes per task (or "
                        f"explicit {field}.forget_classes), got {per_task!r}")
    per_task = int(per_task)
    if per_task * num_tasks >= num_classes:
      raise ConfigError(f"{field}.per_task: {num_tasks} tasks x {per_task} classes leave no "
                        f"class of {num_classes} to retain")
    lists = [order[num_classes - per_task * (t + 1):num_classes - per_task * t]
             for t in range(num_tasks)]
  seen: dict[int, int] = {}
  for t, ids in enumerate(lists):
    if not ids:
      raise ConfigError(f"{field}.forget_classes: task {t + 1} forgets no class")
    bad = sorted(c for c in ids if not 0 <= c < num_classes)
    if bad:
      raise ConfigError(f"{field}.forget_classes: class ids {bad} of task {t + 1} are outside "
                        f"[0, {num_classes}) ({field}.num_classes)")
    for c in ids:
      if c in seen:
        where = "twice in" if seen[c] == t else f"in task {seen[c] + 1} and"
        raise ConfigError(f"{field}.forget_classes: class {splits_lib.class_label(source, c)} "
                          f"is forgotten {where} task {t + 1}")
      seen[c] = t
  if missing_classes:
    missing = read(missing_classes, "missing_classes")
    missing_field = f"{field}.missing_classes"
  else:
    if isinstance(num_missing, bool) or int(num_missing) != num_missing or num_missing < 0:
      raise ConfigError(f"{field}.num_missing: expected an int >= 0, got {num_missing!r}")
    missing = order[:int(num_missing)]
    missing_field = f"{field}.num_missing"
  bad = sorted(c for c in missing if not 0 <= c < num_classes)
  if bad:
    raise ConfigError(f"{missing_field}: class ids {bad} are outside [0, {num_classes})")
  if len(set(missing)) != len(missing):
    raise ConfigError(f"{missing_field}: duplicate class ids in {list(missing)}")
  clash = sorted(set(missing) & set(seen))
  if clash:
    raise ConfigError(f"{missing_field}: classes {splits_lib.shown(source, clash)} are missing "
                      f"(kept without data) but also forgotten in a task")

  tasks = []
  gone: list[int] = []
  rank = {c: i for i, c in enumerate(order)}
  for t, forget in enumerate(lists):
    retain = tuple(c for c in order if c not in seen or seen[c] > t)
    task = ForgetTask(index=t, forget=tuple(forget), retain=retain,
                      missing=tuple(sorted(missing, key=rank.get)), old=tuple(gone))
    if not task.retain_with_data:
      raise ConfigError(f"{field}.num_tasks: task {t + 1} has no retained class with "
                        f"training data left")
    tasks.append(task)
    gone = gone + list(forget)
  return tasks


def tasks_from_config(cfg: Any, field: str = "tasks", source: Any = None) -> list[ForgetTask]:
  """`make_tasks` from a config section with fields num_classes, num_tasks, per_task,
  order_seed (None = identity order), order (explicit, overrides the seed),
  forget_classes, num_missing, missing_classes; class names are `source`'s."""
  get = lambda k, d=None: cfg[k] if k in cfg and cfg[k] is not None else d
  num_classes = get("num_classes")
  if num_classes is None:
    raise ConfigError(f"{field}.num_classes: required")
  order = get("order", ())
  if not order:
    seed = cfg["order_seed"] if "order_seed" in cfg else 1337
    order = class_order(int(num_classes), None if seed is None else int(seed))
  return make_tasks(num_classes=num_classes, num_tasks=get("num_tasks", 1),
                    per_task=get("per_task", 0), order=order,
                    forget_classes=get("forget_classes", ()),
                    num_missing=get("num_missing", 0),
                    missing_classes=get("missing_classes", ()), field=field, source=source)


def per_task(values: Any, num_tasks: int, field: str) -> tuple[float, ...]:
  """One value per task from a number or a one-value tuple (the same for every task), or a
  tuple of at least `num_tasks` values.

  The reference's per-task lists (`cl_beta_list`, `cl_prof_list`) may be longer than the
  number of tasks (the extra entries are unused); shorter lists are an error here instead
  of an index error mid-run.

  Example:
    >>> per_task((0.2, 0.25, 0.25, 0.2), 4, "gs_lora.beta")
    (0.2, 0.25, 0.25, 0.2)
    >>> per_task((0.2,), 3, "gs_lora.beta")
    (0.2, 0.2, 0.2)
  """
  if isinstance(values, (int, float, np.integer, np.floating)) and not isinstance(values, bool):
    values = (values,)
  try:
    out = tuple(float(v) for v in values)
  except (TypeError, ValueError):
    raise ConfigError(f"{field}: expected a number or a tuple of numbers, got {values!r}"
                      ) from None
  if len(out) == 1:
    return out * num_tasks
  if len(out) < num_tasks:
    raise ConfigError(f"{field}: expected one value for every task or one per task "
                      f"({num_tasks} tasks), got {len(out)}: {list(out)}")
  return out[:num_tasks]


TEST_SPLITS = ("retain_test", "forget_test", "old_test", "missing_test")


def _shown(classes: list[int]) -> str:
  """Class ids for a message: all of a few, the first and last of many."""
  return (", ".join(map(str, classes)) if len(classes) <= 6 else
          f"{', '.join(map(str, classes[:3]))}, ..., {classes[-1]} ({len(classes)})")


def task_splits(train: Any, test: Any, task: ForgetTask, *, data_ratio: float = 1.0,
                shots: int = 0, seed: int = 0, field: str = "tasks"
                ) -> dict[str, splits_lib.Subset]:
  """Training subsets and test splits of one task; labels are the class ids.

  Training subsets are drawn per task (sub-sampling seed 1000·seed + task.index) and
  per split, as the reference re-draws them for every task:
    - retain_train: the retained classes with data, `data_ratio` of their images or
      `shots` per class;
    - forget_train: the forget classes, same rule.
  Test splits keep every test image: retain_test (all retained classes, missing ones
  included: Acc_r), forget_test (Acc_f), and when non-empty old_test (Acc_o) and
  missing_test (Acc_m).

  Args:
    train: training source.
    test: test source.
    task: the task.
    data_ratio: share of the training images kept, in (0, 1].
    shots: images per class (0 = off; wins over data_ratio).
    seed: sub-sampling seed.
    field: config section named in errors.

  Returns:
    dict name -> `Subset` with keys retain_train, forget_train, retain_test, forget_test
    and, when defined, old_test, missing_test.
  """
  have = max(train.num_classes, test.num_classes)
  beyond = sorted({c for c in (*task.retain, *task.forget) if c >= have})
  if beyond:
    raise ConfigError(f"{field}.num_classes: the tasks use classes {_shown(beyond)}, but the "
                      f"data has {have} classes (labels 0..{have - 1}); set "
                      f"{field}.num_classes to {have}")
  label_map = {c: c for c in range(have)}
  task_seed = int(seed) * 1000 + task.index
  sub = dict(ratio=float(data_ratio), n_per_class=int(shots), seed=task_seed,
             field=f"{field}.shots" if shots else f"{field}.data_ratio")
  out = {
      "retain_train": splits_lib.select(train, task.retain_with_data, name="retain_train",
                                        label_map=label_map, **sub),
      "forget_train": splits_lib.select(train, task.forget, name="forget_train",
                                        label_map=label_map, **sub),
  }
  for name, classes in (("retain_test", task.retain), ("forget_test", task.forget),
                        ("old_test", task.old), ("missing_test", task.missing)):
    if classes:
      out[name] = splits_lib.select(test, classes, name=name, label_map=label_map,
                                    field=f"{field}.num_classes")
  return out
