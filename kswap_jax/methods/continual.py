"""The continual task loop that GS-LoRA and the continual baselines share.

    for each task t:  start (derive from the checkpointed state) -> train -> evaluate
                      -> record -> fold the task into the carried state -> checkpoint

A task is a `train.Stage` (whose `on_start(state, frozen, fresh)` derives everything it
needs — the merged base of the earlier tasks, a fresh LoRA, a fresh optimizer state — from
the restored `TrainState` alone), an `evaluate` function, and a `finish` function that
folds the finished task into `TrainState.carry` (e.g. GS-LoRA stores the task's LoRA tree
in a stack with a leading task axis; EWC adds its importances) before the task's
checkpoint is written. A run killed anywhere therefore resumes from the newest checkpoint
with exactly the state an uninterrupted run had at that point.

Periodic in-stage evaluation (`eval_fn`, every `eval_every` iterations) is stored in the
checkpoint metadata; `best_eval` reads it back, e.g. for GS-LoRA's best-H record.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from kswap_jax import train

Tree = Any


@dataclasses.dataclass
class Task:
  """One task of a continual sequence.

  Attributes:
    name: results key, e.g. "task_1".
    stage: the training stage; its `on_start` derives its frozen tree and fresh trainable
      state from the restored state only.
    evaluate: (state, frozen) -> {metric: value} after training.
    finish: (state, frozen) -> state, run after `evaluate` and before the task's
      checkpoint, e.g. to fold the task into `state.carry`.
    eval_fn: optional (state, frozen) -> {metric: value} for periodic in-stage evaluation.
  """
  name: str
  stage: train.Stage
  evaluate: Callable[[train.TrainState, Tree], dict]
  finish: Callable[[train.TrainState, Tree], train.TrainState] | None = None
  eval_fn: Callable[[train.TrainState, Tree], dict] | None = None


def run_tasks(run_: train.Run, tasks: Sequence[Task], state: train.TrainState, frozen: Tree,
              mesh, *, first_index: int = 0, eval_every: int = 0,
              extra_log: Callable[[train.TrainState], dict] | None = None
              ) -> tuple[train.TrainState, Tree]:
  """Runs the tasks in order from wherever the checkpoint left off.

  Args:
    run_: the workdir's `train.Run` (already restored).
    tasks: the task sequence.
    state: the restored train state.
    frozen: the frozen tree (tasks derive their own in `on_start`).
    mesh: the data mesh.
    first_index: stage index of the first task (stages before it belong to the method).
    eval_every: periodic evaluation interval in iterations (0: off).
    extra_log: extra host measurements for logged iterations.

  Returns:
    (state, frozen) after the last task. `run_.meta["results"][task.name]` holds each
    task's evaluation plus "seconds" (training + evaluation wall time, across attempts:
    `train.Run.stage_seconds`).
  """
  results = run_.meta["results"]
  for index, task in enumerate(tasks, first_index):
    if task.name in results:
      continue
    run_.stage_seconds(task.name)  # starts the task's clock, or continues a resumed one
    state, frozen = run_.run_stage(index, task.stage, state, frozen, mesh, extra_log=extra_log,
                                   eval_fn=task.eval_fn, eval_every=eval_every)
    record = dict(task.evaluate(state, frozen))
    if task.finish is not None:
      state = task.finish(state, frozen)
    record["seconds"] = round(run_.stage_seconds(task.name), 3)
    run_.finish_stage(state, task.name, record)
  return state, frozen


def best_eval(run_: train.Run, stage_name: str, key: str) -> dict | None:
  """The periodic evaluation of `stage_name` with the largest `key` (e.g. "h_mean")."""
  evals = [e for e in run_.meta["evals"].get(stage_name, []) if key in e]
  return max(evals, key=lambda e: e[key]) if evals else None


# Per-task trees in a fixed-structure carry: a stack with a leading task axis.

def stack_zeros(tree: Tree, num_tasks: int) -> Tree:
  """Zeros shaped (num_tasks, *leaf.shape) for every leaf of `tree`."""
  return jax.tree_util.tree_map(lambda x: jnp.zeros((num_tasks,) + tuple(x.shape), x.dtype),
                                tree)


def stack_set(stack: Tree, index: int, tree: Tree) -> Tree:
  """`stack` with entry `index` replaced by `tree` (functional)."""
  return jax.tree_util.tree_map(lambda s, x: s.at[index].set(x.astype(s.dtype)), stack, tree)


def stack_get(stack: Tree, index: int) -> Tree:
  """Entry `index` of a stack."""
  return jax.tree_util.tree_map(lambda s: s[index], stack)
