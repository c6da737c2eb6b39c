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
from typing import Any, Callable, Iterator, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from kswap_jax import checkpoint as ckpt_lib
from kswap_jax import losses, metrics
from kswap_jax.errors import ConfigError, NonFiniteLossError

log = logging.getLogger("kswap_jax")

Tree = Any
# loss_fn(trainable, frozen, batch, rng) -> (scalar loss, {name: scalar}). Optional extras:
# with `make_train_step(mutable=True)` a fifth argument `model_state` and the return value
# (loss, (aux, new_model_state)); host hyper-parameters that the optimizer does not have
# arrive as the keyword argument `hparams` (e.g. an epoch-gated loss weight).
LossFn = Callable[..., tuple[jax.Array, Any]]
# logits_fn(trainable, model_state, frozen, batch) -> logits, in evaluation mode; it sees the
# whole batch, so a margin on the true class (GS-LoRA's CosFace evaluation) is possible.
LogitsFn = Callable[[Tree, Tree, Tree, dict], jax.Array]


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
  model_state: Tree


def create_state(params: Tree, tx: optax.GradientTransformation, seed: int,
                 model_state: Tree | None = None) -> TrainState:
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    rng=jax.random.key_data(jax.random.key(seed)),
                    model_state={} if model_state is None else model_state)


def make_mesh(devices=None) -> Mesh:
  """A 1-D data-parallel mesh ("data",) over all (or the given) devices."""
  devices = list(jax.devices() if devices is None else devices)
  return Mesh(np.asarray(devices), ("data",), axis_types=(AxisType.Auto,))


def _split_hparams(opt_state, hparams: dict) -> tuple[Any, dict]:
  """Writes the optimizer's injectable hyper-parameters (e.g. the epoch LR) into its state;
  returns (opt_state, the remaining hyper-parameters, which go to the loss)."""
  injectable = getattr(opt_state, "hyperparams", {})
  rest = {k: v for k, v in hparams.items() if k not in injectable}
  if len(rest) == len(hparams):
    return opt_state, rest
  hp = dict(injectable)
  for k, v in hparams.items():
    if k in hp:
      hp[k] = jnp.asarray(v, dtype=jnp.asarray(hp[k]).dtype)
  return opt_state._replace(hyperparams=hp), rest


def make_train_step(loss_fn: LossFn, tx: optax.GradientTransformation, mesh: Mesh,
                    *, donate: bool = True, mutable: bool = False,
                    update_kwargs: dict | None = None) -> Callable:
  """The pure train step, jitted with explicit shardings.

  `step(state, frozen, batch, hparams) -> (state, measurements)`: state and frozen tree are
  replicated, every batch leaf is split along axis 0 over the "data" mesh axis. `hparams`
  are host scalars: those the optimizer was `optax.inject_hyperparams`-ed with (e.g.
  {"learning_rate": 1e-2}) go into its state, the others to `loss_fn(..., hparams=...)`.

  Args:
    loss_fn: (trainable, frozen, batch, rng) -> (loss, aux measurements); see `LossFn`.
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
    opt_state, loss_hparams = _split_hparams(state.opt_state, hparams)
    kwargs = {"hparams": loss_hparams} if loss_hparams else {}
    if mutable:
      (loss, (aux, model_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
          state.params, frozen, batch, key, state.model_state, **kwargs)
    else:
      (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(
          state.params, frozen, batch, key, **kwargs)
      model_state = state.model_state
    updates, opt_state = tx.update(grads, opt_state, state.params, **(update_kwargs or {}))
    params = optax.apply_updates(state.params, updates)
    measurements = {"loss": loss, "grad_norm": optax.tree.norm(grads), **aux}
    return (TrainState(state.step + 1, params, opt_state, jax.random.key_data(rng), model_state),
            measurements)

  replicated, data = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
  return jax.jit(step, in_shardings=(replicated, replicated, data, replicated),
                 out_shardings=(replicated, replicated), donate_argnums=(0,) if donate else ())


def make_eval_step(logits_fn: LogitsFn, mesh: Mesh) -> Callable:
  """`eval_step(state, frozen, batch) -> {"correct", "count"}` (arg-max over all logits)."""
  def step(state: TrainState, frozen, batch):
    logits = logits_fn(state.params, state.model_state, frozen, batch)
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


def evaluate(eval_step: Callable, state: TrainState, frozen: Tree, batches: Iterator[dict],
             mesh: Mesh) -> float:
  """Top-1 accuracy (%) over one pass of padded eval batches; NaN for an empty split."""
  correct = count = 0.0
  for batch in batches:
    out = jax.device_get(eval_step(state, frozen, to_global(batch, mesh)))
    correct += float(out["correct"])
    count += float(out["count"])
  return metrics.accuracy(correct, count)


# ----------------------------------------------------------------------------------------------
# The host loop: one `Run` per workdir, a list of `Stage`s, resumable at any step.

# One sub-step of an iteration: (label, jitted step, the streams whose next batch it takes).
SubStep = tuple[str, Callable, tuple[str, ...]]


@dataclasses.dataclass
class Stage:
  """One training stage: `epochs` passes over `streams[epoch_stream]`, or `iterations`.

  By default every iteration is one step on the next batch of every stream. A `plan`
  changes that per iteration, e.g. UG-CLU's FAST step on a forget batch every N_f
  iterations followed by a SLOW step on a remain batch; each stream then advances only
  when a sub-step takes a batch from it (and resumes from its own position).

  Attributes:
    name: stage name used in logs, checkpoints and results ("learn", "forget", ...).
    step_fn: a jitted step from `make_train_step` (the default plan).
    streams: batch key -> stream (see `kswap_jax.data.streams`); a step receives
      {key: batch} for the keys it consumes.
    epoch_stream: the non-cycled stream whose pass defines the epoch (None: `iterations`).
    epochs: number of epochs when `epoch_stream` is set.
    hparams_fn: (epoch, iteration) -> host hyper-parameters for that iteration, e.g.
      {"learning_rate": ...} (see `make_train_step`).
    iterations: the stage length when there is no epoch stream.
    plan: iteration -> [(label, step_fn, stream keys), ...]; measurements of a labelled
      sub-step are logged as "<label>/<name>".
    on_start: (state, frozen, fresh) -> (state, frozen), called when the stage starts or
      resumes (`fresh` is False when resuming mid-stage), e.g. to reset an optimizer,
      merge LoRA into the base or compute a saliency mask.
  """
  name: str
  step_fn: Callable | None
  streams: dict[str, Any]
  epoch_stream: str | None = None
  epochs: int = 1
  hparams_fn: Callable[[int, int], dict] = lambda epoch, iteration: {}
  iterations: int = 0
  plan: Callable[[int], Sequence[SubStep]] | None = None
  on_start: Callable[[TrainState, Tree, bool], tuple[TrainState, Tree]] | None = None

  @property
  def steps_per_epoch(self) -> int:
    if self.epoch_stream is None:
      return self.iterations
    return self.streams[self.epoch_stream].steps_per_epoch

  @property
  def num_steps(self) -> int:
    """Iterations in the stage (an iteration may hold several sub-steps)."""
    return self.iterations if self.epoch_stream is None else self.epochs * self.steps_per_epoch

  def substeps(self, iteration: int) -> Sequence[SubStep]:
    if self.plan is not None:
      return self.plan(iteration)
    return [("", self.step_fn, tuple(self.streams))]


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

  def __init__(self, workdir: str, config: ml_collections.ConfigDict):
    self.workdir = os.path.abspath(workdir)
    self.config = config
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
        lambda x: jax.ShapeDtypeStruct(np.shape(x), jnp.asarray(x).dtype,
                                       sharding=getattr(x, "sharding", None)), state)
    restored = self.checkpointer.restore_latest(abstract)
    if restored is None:
      self._truncate_metrics(0)  # lines of an attempt killed before its first checkpoint
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
    kept = []
    with open(path) as f:
      for line in f:
        try:
          if json.loads(line).get("step", 0) <= step:
            kept.append(line)
        except json.JSONDecodeError:
          pass  # a line torn by the kill
    with open(path, "w") as f:
      f.writelines(kept)

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
                eval_every: int = 0) -> tuple[TrainState, Tree]:
    """Trains `stage` from where the checkpoint left it; saves every N steps and at the end.

    Args:
      index: the stage's position in the run (for resumption).
      stage: what to run.
      state: current train state (already restored).
      frozen: the frozen tree (replicated).
      mesh: the data mesh.
      extra_log: state -> extra host measurements for logged iterations (e.g. group norms).
      eval_fn: state -> {metric: value}, logged as an "eval" record every `eval_every`
        iterations of the stage (the reference evaluates every 5 steps); 0 disables it.

    Returns:
      (state, frozen) after the stage; the checkpoint written at its end records
      stage_index = index + 1.
    """
    if self.stage_done(index):
      return state, frozen
    resuming = self.meta["stage_index"] == index and self.meta["stage_step"] > 0
    start = self.meta["stage_step"] if resuming else 0
    positions = {k: int(self.meta["streams"].get(k, 0)) if resuming else 0
                 for k in stage.streams}
    if stage.on_start is not None:
      state, frozen = stage.on_start(state, frozen, not resuming)
    total, spe = stage.num_steps, max(1, stage.steps_per_epoch)
    epochs = stage.epochs if stage.epoch_stream is not None else 1
    log.info("[%s] %d epoch(s) x %d iterations (global batch %s)%s", stage.name, epochs, spe,
             {k: st.batch_size for k, st in stage.streams.items()},
             f", resuming at iteration {start}" if start else "")
    iters = {k: st.iterate(positions[k]) for k, st in stage.streams.items()}
    t0, done_since = time.time(), 0
    step = int(jax.device_get(state.step))
    for s in range(start, total):
      epoch = s // spe
      hparams = stage.hparams_fn(epoch, s)
      before = step
      measurements = {}
      for label, step_fn, keys in stage.substeps(s):
        batch = to_global({k: next(iters[k]) for k in keys}, mesh)
        for k in keys:
          positions[k] += 1
        state, m = step_fn(state, frozen, batch, hparams)
        m = jax.device_get(m)  # blocks: also fail fast on NaN
        if not math.isfinite(float(m["loss"])):
          raise NonFiniteLossError(
              f"stage '{stage.name}', step {int(jax.device_get(state.step))} (epoch "
              f"{epoch + 1}, iteration {s % spe + 1} of {spe}{', ' + label if label else ''}): "
              f"loss is {float(m['loss'])}; nothing was saved for this step (lower the "
              f"learning rate or check the data)")
        measurements.update({(f"{label}/{k}" if label else k): float(v) for k, v in m.items()})
      step = int(jax.device_get(state.step))
      done_since += 1
      self.meta.update(stage_index=index, stage_step=s + 1, streams=dict(positions))
      if (s + 1) % self.log_every == 0 or s + 1 == total:
        record = {"step": step, "stage": stage.name, "epoch": epoch + 1, **measurements,
                  **hparams}
        if extra_log is not None:
          record.update(extra_log(state))
        self.log_metrics(record)
        loss = measurements.get("loss", next(
            (v for k, v in measurements.items() if k.endswith("/loss")), float("nan")))
        log.info("[%s] epoch %d/%d iteration %d/%d loss %.4f lr %.3g (%.1f it/s)", stage.name,
                 epoch + 1, epochs, s + 1, total, loss,
                 float(hparams.get("learning_rate", float("nan"))),
                 done_since / max(1e-9, time.time() - t0))
        t0, done_since = time.time(), 0
      if eval_fn is not None and eval_every and (s + 1) % eval_every == 0:
        self.log_metrics({"step": step, "stage": stage.name, "epoch": epoch + 1,
                          "eval": eval_fn(state)})
      if (s + 1 < total and self.checkpoint_every
          and step // self.checkpoint_every > before // self.checkpoint_every):
        self.save(state)
      if self.interrupt_at_step and step >= self.interrupt_at_step:
        self.checkpointer.wait()
        raise SystemExit(f"debug.interrupt_at_step: stopped at step {step} as requested")
    self.meta.update(stage_index=index + 1, stage_step=0, streams={})
    return state, frozen

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
