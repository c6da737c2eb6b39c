"""Method-agnostic training machinery: train state, the sharded jitted step, evaluation,
and a resumable host loop over stages.

Data flows one way: streams -> `make_train_step` (pure, jitted once per stage, donated
state, data-parallel over a 1-D "data" mesh) -> measurements -> `Run` (logging,
checkpoints, results). A method module builds its loss function, optimizer and stages on
top of these pieces (see `kswap_jax.methods.knowledge_swap`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from typing import Any, Callable, Iterator, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from kswap_jax import checkpoint as ckpt_lib
from kswap_jax import losses
from kswap_jax.errors import ConfigError, NonFiniteLossError

log = logging.getLogger("kswap_jax")

Tree = Any
# loss_fn(trainable, frozen, batch, rng) -> (scalar loss, {name: scalar}); with
# `mutable=True` also model_state in and (aux, new_model_state) out (e.g. BatchNorm stats).
LossFn = Callable[..., tuple[jax.Array, Any]]
# logits_fn(trainable, frozen, images) -> logits (evaluation mode)
LogitsFn = Callable[[Tree, Tree, jax.Array], jax.Array]


class TrainState(NamedTuple):
  """Everything that changes during training; the frozen tree is passed beside it.

  Attributes:
    step: int32 scalar, optimizer steps taken so far over all stages.
    params: the trainable tree (the LoRA tree, or the full model when pretraining).
    opt_state: optimizer state of `params` only.
    rng: uint32[2] key data; split once per step for dropout.
    model_state: non-trainable state the forward pass updates (e.g. BatchNorm
      `batch_stats`); an empty dict for the ViT methods.
  """
  step: jax.Array
  params: Tree
  opt_state: Tree
  rng: jax.Array
  model_state: Tree = {}


def create_state(params: Tree, tx: optax.GradientTransformation, seed: int,
                 model_state: Tree | None = None) -> TrainState:
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    rng=jax.random.key_data(jax.random.key(seed)),
                    model_state={} if model_state is None else model_state)


def make_mesh(devices=None) -> Mesh:
  """A 1-D data-parallel mesh ("data",) over all (or the given) devices."""
  devices = list(jax.devices() if devices is None else devices)
  return Mesh(np.asarray(devices), ("data",), axis_types=(AxisType.Auto,))


def _set_hparams(opt_state, hparams: dict):
  """Writes host-computed hyper-parameters (e.g. the epoch LR) into an injected state."""
  if not hparams:
    return opt_state
  if not hasattr(opt_state, "hyperparams"):
    raise ValueError("hparams given but the optimizer is not wrapped in optax.inject_hyperparams")
  hp = dict(opt_state.hyperparams)
  for k, v in hparams.items():
    if k not in hp:
      raise KeyError(f"optimizer has no injectable hyper-parameter {k!r}")
    hp[k] = jnp.asarray(v, dtype=jnp.asarray(hp[k]).dtype)
  return opt_state._replace(hyperparams=hp)


def make_train_step(loss_fn: LossFn, tx: optax.GradientTransformation, mesh: Mesh,
                    *, donate: bool = True, mutable: bool = False,
                    update_kwargs: dict | None = None) -> Callable:
  """The pure train step, jitted with explicit shardings.

  `step(state, frozen, batch, hparams) -> (state, measurements)`: state and frozen tree are
  replicated, every batch leaf is split along axis 0 over the "data" mesh axis, `hparams`
  (host scalars such as {"learning_rate": 1e-2}) are injected into the optimizer state.

  Args:
    loss_fn: (trainable, frozen, batch, rng) -> (loss, aux measurements).
    tx: optimizer over the trainable tree only.
    mesh: from `make_mesh`.
    donate: donate the incoming state buffers.
    mutable: the loss takes `state.model_state` as a fifth argument and returns
      (loss, (aux, new_model_state)), e.g. for BatchNorm statistics.
    update_kwargs: static keyword arguments for `tx.update` (an optax
      `GradientTransformationExtraArgs`), e.g. a fast/slow phase; one step per value.

  Returns:
    The jitted step; measurements hold "loss", the aux entries and "grad_norm".
  """
  def step(state: TrainState, frozen: Tree, batch: dict, hparams: dict):
    rng, key = jax.random.split(jax.random.wrap_key_data(state.rng))
    if mutable:
      (loss, (aux, model_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
          state.params, frozen, batch, key, state.model_state)
    else:
      (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(
          state.params, frozen, batch, key)
      model_state = state.model_state
    opt_state = _set_hparams(state.opt_state, hparams)
    updates, opt_state = tx.update(grads, opt_state, state.params, **(update_kwargs or {}))
    params = optax.apply_updates(state.params, updates)
    measurements = {"loss": loss, "grad_norm": optax.tree.norm(grads), **aux}
    return (TrainState(state.step + 1, params, opt_state, jax.random.key_data(rng), model_state),
            measurements)

  replicated, data = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
  return jax.jit(step, in_shardings=(replicated, replicated, data, replicated),
                 out_shardings=(replicated, replicated), donate_argnums=(0,) if donate else ())


def make_eval_step(logits_fn: LogitsFn, mesh: Mesh) -> Callable:
  """`eval_step(trainable, frozen, batch) -> {"correct", "count"}` (arg-max over all logits)."""
  def step(params, frozen, batch):
    logits = logits_fn(params, frozen, batch["image"])
    return losses.accuracy_counts(logits, batch["label"], batch["mask"])
  replicated, data = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
  return jax.jit(step, in_shardings=(replicated, replicated, data), out_shardings=replicated)


def to_global(batch: dict, mesh: Mesh) -> dict:
  """Per-process numpy batch -> global jax arrays sharded along axis 0 over "data"."""
  sharding = NamedSharding(mesh, P("data"))
  return jax.tree_util.tree_map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch)


def replicate(tree: Tree, mesh: Mesh) -> Tree:
  """A replicated copy on the mesh; never aliases `tree`, so donating it is safe.

  (`device_put(..., may_alias=False)` alone still let a multi-device replica share the
  source buffer on jax 0.10, and a donated step then deleted the caller's array.)
  """
  copied = jax.tree_util.tree_map(lambda x: np.array(x) if isinstance(x, np.ndarray)
                                  else jnp.array(x, copy=True), tree)
  return jax.device_put(copied, NamedSharding(mesh, P()), may_alias=False)


def evaluate(eval_step: Callable, params: Tree, frozen: Tree, batches: Iterator[dict],
             mesh: Mesh) -> float:
  """Top-1 accuracy (%) over one pass of padded eval batches."""
  correct = count = 0.0
  for batch in batches:
    out = jax.device_get(eval_step(params, frozen, to_global(batch, mesh)))
    correct += float(out["correct"])
    count += float(out["count"])
  return 100.0 * correct / count if count else float("nan")


# ----------------------------------------------------------------------------------------------
# The host loop: one `Run` per workdir, a list of `Stage`s, resumable at any step.

@dataclasses.dataclass
class Stage:
  """One training stage: `epochs` passes over `streams[epoch_stream]`.

  Attributes:
    name: stage name used in logs, checkpoints and results ("learn", "forget", ...).
    step_fn: a jitted step from `make_train_step`.
    streams: batch key -> stream (see `kswap_jax.data.streams`); the step receives
      {key: batch}. `epoch_stream` is not cycled and defines the epoch; the others cycle.
    epoch_stream: the key of the stream that defines the epoch.
    epochs: number of epochs.
    hparams_fn: epoch -> {"learning_rate": ...} injected into the optimizer.
  """
  name: str
  step_fn: Callable
  streams: dict[str, Any]
  epoch_stream: str
  epochs: int
  hparams_fn: Callable[[int], dict]

  @property
  def steps_per_epoch(self) -> int:
    return self.streams[self.epoch_stream].steps_per_epoch

  @property
  def num_steps(self) -> int:
    return self.epochs * self.steps_per_epoch


def _jsonable(x):
  if isinstance(x, dict):
    return {k: _jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  if isinstance(x, (np.generic, np.ndarray)):
    return x.tolist()
  return x


def write_json(path: str, obj: Any) -> None:
  """Atomic JSON write (tmp + rename): a reader never sees a half-written file."""
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(_jsonable(obj), f, indent=2)
    f.write("\n")
  os.replace(tmp, path)


class Run:
  """A workdir: config record, checkpoints, `metrics.jsonl`, progress output, results.

  Resuming: `restore(state)` returns the newest checkpoint's state and meta; `meta` holds
  "stage_index" (stages finished), "stage_step" (steps done in the current stage),
  "streams" (batches consumed per stream) and "results" (per-stage evaluations).
  A rerun of the same command therefore continues where the previous one stopped and ends
  with the same final metrics.
  """

  def __init__(self, workdir: str, config: ml_collections.ConfigDict, *, method: str):
    self.workdir = os.path.abspath(workdir)
    self.config = config
    self.method = method
    self.is_main = jax.process_index() == 0
    _prepare_workdir(self.workdir)
    self._check_config()
    tcfg = config.train
    self.log_every = int(tcfg.log_every_steps)
    self.checkpoint_every = int(tcfg.checkpoint_every_steps)
    self.interrupt_at_step = int(config.get("debug", {}).get("interrupt_at_step", 0) or 0)
    self.checkpointer = ckpt_lib.Checkpointer(os.path.join(self.workdir, "checkpoints"),
                                              max_to_keep=int(tcfg.max_checkpoints_to_keep))
    self.meta: dict = {"stage_index": 0, "stage_step": 0, "streams": {}, "results": {}}
    results = os.path.join(self.workdir, "results.json")
    if self.is_main and os.path.exists(results):
      os.remove(results)  # only a finished run (re)writes it

  # -- config record --------------------------------------------------------------------------
  def _check_config(self) -> None:
    path = os.path.join(self.workdir, "config.json")
    self._pending_config = None
    record = json.loads(self.config.to_json_best_effort())
    ignore = {"debug", "train"}  # may change between a run and its resumption
    if os.path.exists(path):
      with open(path) as f:
        old = json.load(f)
      diff = _first_difference({k: v for k, v in old.items() if k not in ignore},
                               {k: v for k, v in record.items() if k not in ignore})
      if diff:
        raise ConfigError(
            f"--workdir {self.workdir}: holds a run with a different config ({diff}); "
            f"use a new --workdir or delete this one")
    else:
      # Written with the first checkpoint, so a run that fails validation locks nothing.
      self._pending_config = (path, record)

  # -- checkpoints ----------------------------------------------------------------------------
  def restore(self, state: TrainState) -> TrainState:
    abstract = jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(np.shape(x), jnp.asarray(x).dtype), state)
    restored = self.checkpointer.restore_latest(abstract)
    if restored is None:
      return state
    state, self.meta = restored
    step = int(state.step)
    log.info("resumed from %s at step %d (stage %d, %d steps into it)",
             self.checkpointer.directory, step, self.meta["stage_index"],
             self.meta["stage_step"])
    self._truncate_metrics(step)
    return state

  def save(self, state: TrainState) -> None:
    if self._pending_config is not None and self.is_main:
      write_json(*self._pending_config)
      self._pending_config = None
    self.checkpointer.save(int(jax.device_get(state.step)), state, self.meta)

  def _truncate_metrics(self, step: int) -> None:
    """Drops metric lines logged after the checkpoint we resume from (they will be redone)."""
    path = os.path.join(self.workdir, "metrics.jsonl")
    if not (self.is_main and os.path.exists(path)):
      return
    with open(path) as f:
      lines = [ln for ln in f if ln.strip() and json.loads(ln).get("step", 0) <= step]
    with open(path, "w") as f:
      f.writelines(lines)

  # -- logging --------------------------------------------------------------------------------
  def log_metrics(self, record: dict) -> None:
    if self.is_main:
      with open(os.path.join(self.workdir, "metrics.jsonl"), "a") as f:
        f.write(json.dumps(_jsonable(record)) + "\n")

  # -- stages ---------------------------------------------------------------------------------
  def stage_done(self, index: int) -> bool:
    return self.meta["stage_index"] > index

  def run_stage(self, index: int, stage: Stage, state: TrainState, frozen: Tree, mesh: Mesh,
                extra_log: Callable[[TrainState], dict] | None = None,
                eval_fn: Callable[[TrainState], dict] | None = None,
                eval_every: int = 0) -> TrainState:
    """Trains `stage` from where the checkpoint left it; saves every N steps and at the end.

    Args:
      index: the stage's position in the run (for resumption).
      stage: what to run.
      state: current train state (already restored).
      frozen: the frozen tree (replicated).
      mesh: the data mesh.
      extra_log: state -> extra host measurements for logged steps (e.g. group norms).
      eval_fn: state -> {metric: value}, logged as an "eval" record every `eval_every`
        steps of the stage (the reference evaluates every 5 steps); 0 disables it.

    Returns:
      The state after the stage; the checkpoint written at its end records
      stage_index = index + 1.
    """
    if self.stage_done(index):
      return state
    start = self.meta["stage_step"] if self.meta["stage_index"] == index else 0
    total, spe = stage.num_steps, stage.steps_per_epoch
    log.info("[%s] %d epochs x %d steps (global batch %s)%s", stage.name, stage.epochs, spe,
             {k: s.batch_size for k, s in stage.streams.items()},
             f", resuming at step {start}" if start else "")
    iters = {k: s.iterate(start) for k, s in stage.streams.items()}
    t0, done_since = time.time(), 0
    for s in range(start, total):
      epoch = s // spe
      hparams = stage.hparams_fn(epoch)
      batch = to_global({k: next(it) for k, it in iters.items()}, mesh)
      state, measurements = stage.step_fn(state, frozen, batch, hparams)
      measurements = jax.device_get(measurements)  # blocks: also fail fast on NaN
      step = int(jax.device_get(state.step))
      if not math.isfinite(float(measurements["loss"])):
        raise NonFiniteLossError(
            f"stage '{stage.name}', step {step} (epoch {epoch + 1}, step {s % spe + 1} of "
            f"{spe}): loss is {float(measurements['loss'])}; nothing was saved for this step "
            f"(lower the learning rate or check the data)")
      done_since += 1
      self.meta.update(stage_index=index, stage_step=s + 1,
                       streams={k: s + 1 for k in stage.streams})
      if (s + 1) % self.log_every == 0 or s + 1 == total:
        record = {"step": step, "stage": stage.name, "epoch": epoch + 1,
                  **{k: float(v) for k, v in measurements.items()}, **hparams}
        if extra_log is not None:
          record.update(extra_log(state))
        self.log_metrics(record)
        rate = done_since / max(1e-9, time.time() - t0)
        log.info("[%s] epoch %d/%d step %d/%d loss %.4f lr %.3g (%.1f steps/s)", stage.name,
                 epoch + 1, stage.epochs, s + 1, total, float(measurements["loss"]),
                 float(hparams.get("learning_rate", float("nan"))), rate)
        t0, done_since = time.time(), 0
      if eval_fn is not None and eval_every and (s + 1) % eval_every == 0:
        self.log_metrics({"step": step, "stage": stage.name, "epoch": epoch + 1,
                          "eval": eval_fn(state)})
      if s + 1 < total and self.checkpoint_every and step % self.checkpoint_every == 0:
        self.save(state)
      if self.interrupt_at_step and step >= self.interrupt_at_step:
        self.checkpointer.wait()
        raise SystemExit(f"debug.interrupt_at_step: stopped at step {step} as requested")
    self.meta.update(stage_index=index + 1, stage_step=0, streams={})
    return state

  def finish_stage(self, state: TrainState, name: str, results: dict) -> None:
    """Records a finished stage's evaluation and checkpoints it (the resume point)."""
    self.meta["results"][name] = results
    self.save(state)
    self.checkpointer.wait()

  def write_results(self, results: dict) -> str:
    path = os.path.join(self.workdir, "results.json")
    self.checkpointer.wait()
    if self.is_main:
      write_json(path, results)
    return path

  def close(self) -> None:
    self.checkpointer.wait()
    self.checkpointer.close()


def _prepare_workdir(workdir: str) -> None:
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, ".write_probe")
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise ConfigError(f"--workdir {workdir}: not writable ({e.strerror or e})") from None


def _first_difference(a, b, prefix: str = "") -> str:
  if isinstance(a, dict) and isinstance(b, dict):
    for k in sorted(set(a) | set(b)):
      if k not in a or k not in b:
        return f"field {prefix}{k} is only in the {'new' if k in b else 'old'} config"
      d = _first_difference(a[k], b[k], f"{prefix}{k}.")
      if d:
        return d
    return ""
  if a != b:
    return f"{prefix.rstrip('.')}: was {a!r}, now {b!r}"
  return ""
