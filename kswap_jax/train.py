"""Method-agnostic training machinery: train state, the sharded jitted step, evaluation,
and a resumable host loop over stages.

Data flows one way: streams -> `make_train_step` (pure, jitted once per stage, donated
state, data-parallel over a 1-D "data" mesh) -> measurements -> `Run` (logging,
checkpoints, results). A method module builds its loss function, optimizer and stages on
top of these pieces (see `kswap_jax.methods.knowledge_swap`).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import inspect
import json
import logging
import math
import os
import re
import signal
import tempfile
import threading
import time
import weakref
from typing import Any, Callable, Iterator, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from kswap_jax import checkpoint as ckpt_lib
from kswap_jax import tensorboard
from kswap_jax.errors import ConfigError, DryRunComplete, NonFiniteLossError, StopRequested

log = logging.getLogger("kswap_jax")

# Runs whose checkpointer is open, so an interrupted program can let their pending saves
# finish (`finish_pending_saves`) before it exits.
_OPEN_RUNS: "weakref.WeakSet[Run]" = weakref.WeakSet()
_DRY_RUN = False  # set by `dry_run()`: `Run` raises DryRunComplete instead of starting


@contextlib.contextmanager
def dry_run(enabled: bool = True):
  """Within it, creating a `Run` raises `DryRunComplete` before the workdir is touched: a
  method's run then stops after every check it makes before writing (config, data, model
  shapes, LoRA targets, batch sizes against the devices, a workdir's config record)."""
  global _DRY_RUN
  before, _DRY_RUN = _DRY_RUN, enabled
  try:
    yield
  finally:
    _DRY_RUN = before

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
    carry: method state carried across stages, with a structure fixed when the state is
      created (e.g. GS-LoRA's per-task LoRA trees stacked on a leading task axis, EWC's
      importances). It is checkpointed with everything else; the train step passes it
      through untouched. Rule: a stage's `on_start` derives all it needs (a merged base,
      a fresh LoRA, a saliency mask) from the restored state alone, never from an earlier
      stage's `on_start` having run in this process.
  """
  step: jax.Array
  params: Tree
  opt_state: Tree
  rng: jax.Array
  model_state: Tree
  carry: Tree = {}


def create_state(params: Tree, tx: optax.GradientTransformation, seed: int,
                 model_state: Tree | None = None, carry: Tree | None = None) -> TrainState:
  """A step-0 train state: `params` (the trainable tree), `tx.init(params)`, a key from
  `seed`, and the optional model state (e.g. BatchNorm statistics) and carry. For
  evaluating plain parameters with `predict`, `create_state(params, optax.identity(), 0)`.
  """
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    rng=jax.random.key_data(jax.random.key(seed)),
                    model_state={} if model_state is None else model_state,
                    carry={} if carry is None else carry)


def initialize_distributed(config: ml_collections.ConfigDict) -> bool:
  """Joins a multi-process run when `distributed.*` (or JAX_COORDINATOR_ADDRESS,
  JAX_NUM_PROCESSES, JAX_PROCESS_ID) say so; must run before any JAX computation.

  Every process then runs the same program: each reads only its slice of every global
  batch (`data.streams`), the step is one SPMD computation over all processes' devices,
  process 0 writes the logs and results, and orbax writes the checkpoints together.

  Returns:
    Whether the process is part of a multi-process run.
  """
  d = config.get("distributed", None)
  if d is None:
    return False
  address = str(d.coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS", ""))
  if not (address or d.auto):
    return False
  if jax.distributed.is_initialized():
    return True
  num = int(d.num_processes or os.environ.get("JAX_NUM_PROCESSES", 0) or 0)
  pid = int(d.process_id if d.process_id >= 0 else os.environ.get("JAX_PROCESS_ID", -1))
  if address and (num < 1 or not 0 <= pid < num):
    raise ConfigError(f"distributed.num_processes/process_id: {num} process(es), id {pid} "
                      f"(expected num_processes >= 1 and 0 <= process_id < num_processes "
                      f"with coordinator {address})")
  if d.cpu_collectives:  # only the CPU backend reads it; no device may be touched before init
    jax.config.update("jax_cpu_collectives_implementation", str(d.cpu_collectives))
  if address:
    jax.distributed.initialize(address, num_processes=num, process_id=pid)
  else:
    jax.distributed.initialize()
  log.info("process %d of %d, %d device(s) in all", jax.process_index(), jax.process_count(),
           jax.device_count())
  return True


_PREVIOUS_HANDLERS: dict[int, Any] = {}


def _say(message: str) -> None:
  """A line on stderr from a signal handler: os.write, as the main thread may be inside a
  buffered write to the same stream when the signal lands."""
  os.write(2, f"{time.strftime('%H:%M:%S')} {message}\n".encode())


def stop_on_signals() -> str:
  """Makes stopping a run save its place first; the command line calls it after
  `initialize_distributed` (in the main thread) and `restore_signals` when the command
  ends. Returns what it set up:

  - "processes": a multi-process run. Ctrl-C becomes a stop request for all processes
    (`request_stop`), as a preemption notice (SIGTERM) already is through jax's preemption
    sync: each trains on to the step the sync picks, saves a checkpoint there and raises
    `StopRequested`. A second Ctrl-C raises KeyboardInterrupt at once. Without it,
    processes interrupted at different steps wait for each other's collectives or
    checkpoint barriers, and each ends killed or hung.
  - "process": one process. SIGTERM (`kill`, `timeout`, a spot VM's or a scheduler's
    notice) and Ctrl-C stop the run at its next training step after a checkpoint there
    (`StopRequested`), so no step since the last periodic checkpoint is lost; a second
    SIGTERM ends it at once, a second Ctrl-C raises KeyboardInterrupt at once.
  - "": outside the main thread, or several processes without jax's preemption service.
  """
  ckpt_lib.STOP.clear()
  if threading.current_thread() is not threading.main_thread():
    return ""
  alone = jax.process_count() == 1

  def on_sigint(signum, frame):
    del signum, frame
    if ckpt_lib.STOP.is_set():  # the second Ctrl-C (one process: or one after SIGTERM)
      signal.signal(signal.SIGINT, signal.default_int_handler)
      raise KeyboardInterrupt
    # Several processes: here only a record of the first; the sync decides when to stop.
    ckpt_lib.STOP.set()
    _say("Ctrl-C: the run stops at its next training step, after a checkpoint there "
         "(Ctrl-C again stops it at once)" if alone else
         "stop requested: every process saves a checkpoint at the next step all of them "
         "reach, then stops (Ctrl-C again stops this process at once)")
    request_stop()
  setattr(on_sigint, ckpt_lib.STOPS_ON_CTRL_C, True)

  if alone:
    terms = []  # SIGTERMs so far: a Ctrl-C's stop request does not make the first one kill

    def on_sigterm(signum, frame):
      del frame
      if terms:
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
      terms.append(signum)
      ckpt_lib.STOP.set()
      _say("SIGTERM: the run stops at its next training step, after a checkpoint there "
           "(a second SIGTERM ends it at once)")
    _PREVIOUS_HANDLERS.setdefault(signal.SIGTERM, signal.signal(signal.SIGTERM, on_sigterm))
    _PREVIOUS_HANDLERS.setdefault(signal.SIGINT, signal.signal(signal.SIGINT, on_sigint))
    return "process"
  if not (jax.distributed.is_initialized() and jax.config.jax_enable_preemption_service):
    return ""
  _PREVIOUS_HANDLERS.setdefault(signal.SIGINT, signal.signal(signal.SIGINT, on_sigint))
  return "processes"


def restore_signals() -> None:
  """Puts back the handlers `stop_on_signals` replaced and clears a pending request (the
  command is over; user code in the same process gets its own handlers back)."""
  if threading.current_thread() is threading.main_thread():
    while _PREVIOUS_HANDLERS:
      signum, handler = _PREVIOUS_HANDLERS.popitem()
      signal.signal(signum, handler)
  ckpt_lib.STOP.clear()


def request_stop() -> None:
  """Asks the run to stop at its next training step after a checkpoint there: one process
  sets `checkpoint.STOP`; several send this process the preemption notice jax's preemption
  sync listens for (SIGTERM), which reaches the others through the coordination service,
  so all stop at the same step.

  Raises:
    RuntimeError: several processes without jax's preemption service (nothing would
      catch the SIGTERM: it would kill the process).
  """
  if jax.process_count() == 1:
    ckpt_lib.STOP.set()
    return
  if not (jax.distributed.is_initialized() and jax.config.jax_enable_preemption_service):
    raise RuntimeError("request_stop: several processes need jax's preemption service "
                       "(jax_enable_preemption_service) to stop together")
  os.kill(os.getpid(), signal.SIGTERM)


def make_mesh(devices=None) -> Mesh:
  """A 1-D data-parallel mesh ("data",) over all (or the given) devices."""
  devices = list(jax.devices() if devices is None else devices)
  return Mesh(np.asarray(devices), ("data",), axis_types=(AxisType.Auto,))


def mesh_for(config: ml_collections.ConfigDict) -> Mesh:
  """The run's mesh: every device, or the first `train.num_devices` (> 0) of them."""
  n = int(config.train.get("num_devices", 0) or 0)
  devices = jax.devices()
  if n < 0 or n > len(devices):
    raise ConfigError(f"train.num_devices: {n} (this process sees {len(devices)} device(s); "
                      f"0 uses all)")
  return make_mesh(devices[:n] if n else devices)


def _split_hparams(opt_state, hparams: dict) -> tuple[Any, dict]:
  """Writes the optimizer's injectable hyper-parameters (e.g. the epoch LR) into its state,
  wherever an `optax.inject_hyperparams` state sits in it (also inside a wrapping
  transform such as `fast_slow`); returns (opt_state, the rest, which go to the loss)."""
  injectable, rest = {}, {}
  for k, v in hparams.items():
    found = optax.tree.get_all_with_path(
        opt_state, k, filtering=lambda path, _: _in_hyperparams(path))
    if found:
      injectable[k] = jnp.asarray(v, dtype=jnp.asarray(found[0][1]).dtype)
    else:
      rest[k] = v
  if injectable:
    opt_state = optax.tree.set(opt_state, lambda path, _: _in_hyperparams(path), **injectable)
  return opt_state, rest


def _in_hyperparams(path) -> bool:
  """Whether a key path ends in `....hyperparams[<name>]` (an inject_hyperparams state)."""
  return len(path) >= 2 and getattr(path[-2], "name", None) == "hyperparams"


def in_passes(passes: Sequence[LossFn], combine: Callable[..., tuple[jax.Array, Any]]
              ) -> LossFn:
  """A loss made of separate passes whose gradients are taken one pass after another.

      L(θ) = combine(f_1(θ), …, f_n(θ)),   each f_i(trainable, frozen, batch, rng) a scalar

  The returned loss function computes L as written; its `value_and_grad` attribute (used
  by `make_train_step`) runs f_1's forward and backward pass, then f_2's, …, with
  ∇L = Σ_i ∂combine/∂v_i · ∇f_i. An optimisation barrier makes each pass's inputs wait
  for the gradients accumulated so far, so one pass's activations are alive at a time;
  differentiated as one function, XLA schedules both forward passes before both backward
  passes unless its scheduler orders them otherwise. For the Knowledge Swapping forget step
  at depth 4 (ViT-B/16 blocks, 8 + 8 images, 2 CPU cores) the step went from 2.76x to
  2.34x the CPU time of one 8-image CE step; at full depth XLA:CPU's memory-optimised
  scheduler already ordered the passes so (docs/speed.md), and the barrier keeps that
  order on every scheduler. Gradients equal those of `jax.value_and_grad(loss_fn)` up to
  the order of the float additions; the loss value is the same. Losses that take
  `hparams=` are not supported.

  Args:
    passes: the f_i; each draws its own keys from `rng` (the same rng for all).
    combine: (v_1, …, v_n) -> (loss, aux measurements). ∂combine/∂v_i must depend on v_i
      alone (a sum of per-pass terms such as β·ReLU(BND − v_i)): it is evaluated before
      the later passes have run, with zeros in their place.

  Returns:
    `loss_fn(trainable, frozen, batch, rng) -> (loss, aux)` with `.value_and_grad`.
  """
  def loss_fn(params, frozen, batch, rng):
    return combine(*(f(params, frozen, batch, rng) for f in passes))

  def value_and_grad(params, frozen, batch, rng):
    values, grads = [], None
    for i, f in enumerate(passes):
      if i:
        params, batch, grads = jax.lax.optimization_barrier((params, batch, grads))
      value, vjp = jax.vjp(lambda p, f=f, batch=batch: f(p, frozen, batch, rng), params)
      later = [jnp.zeros_like(value)] * (len(passes) - i - 1)
      weight = jax.grad(lambda v: combine(*values, v, *later)[0])(value)
      (g,) = vjp(weight.astype(value.dtype))
      grads = g if grads is None else jax.tree_util.tree_map(jnp.add, grads, g)
      values.append(value)
    return combine(*values), grads

  loss_fn.value_and_grad = value_and_grad
  return loss_fn


CPU_SCHEDULERS = {"default": "CPU_SCHEDULER_TYPE_DEFAULT",
                  "memory": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"}


def compiler_options(mesh: Mesh, cpu_scheduler: str | None = None) -> dict | None:
  """XLA options of the train step: on CPU, XLA's memory-optimised instruction order.

  XLA:CPU's default scheduler runs independent instructions early, so it starts the
  backward pass's recomputations (and keeps their outputs) long before they are needed;
  the memory-optimised order keeps fewer buffers alive. For the ViT-B/16 Knowledge
  Swapping step (8 + 8 images) it needs 2.67 GiB of temporaries instead of 4.51 and runs
  ~17 % faster on 2 cores (docs/speed.md). A scheduler named in XLA_FLAGS
  (`--xla_cpu_scheduler_type=...`) is left to win; accelerators get no options.

  Args:
    mesh: the step's mesh; options apply when all its devices are CPUs.
    cpu_scheduler: "memory" | "default" (a key of `CPU_SCHEDULERS`); None = "memory"
      unless XLA_FLAGS sets one.
  """
  if any(d.platform != "cpu" for d in mesh.devices.flat):
    return None
  if cpu_scheduler is None:
    if "xla_cpu_scheduler_type" in os.environ.get("XLA_FLAGS", ""):
      return None
    cpu_scheduler = "memory"
  return {"xla_cpu_scheduler_type": CPU_SCHEDULERS[cpu_scheduler]}


def make_train_step(loss_fn: LossFn, tx: optax.GradientTransformation, mesh: Mesh,
                    *, donate: bool = True, mutable: bool = False,
                    update_kwargs: dict | None = None,
                    grad_measurements: Callable[[Tree], dict] | None = None) -> Callable:
  """The pure train step, jitted with explicit shardings.

  `step(state, frozen, batch, hparams=None) -> (state, measurements)`: state and frozen
  tree are replicated; `batch` is {stream: {"image", "label", ...}} (what the loss reads,
  e.g. `batch["retain"]["image"]`), and every batch leaf is split along axis 0 over the
  "data" mesh axis. `hparams` are host scalars: those the optimizer was
  `optax.inject_hyperparams`-ed with (e.g. {"learning_rate": 1e-2}) go into its state, the
  others to `loss_fn(..., hparams=...)`, or, for a loss without an `hparams` argument, a
  ValueError naming them.

  Args:
    loss_fn: (trainable, frozen, batch, rng) -> (loss, aux measurements); see `LossFn`.
    tx: optimizer over the trainable tree only.
    mesh: from `make_mesh`.
    donate: donate the incoming state buffers.
    mutable: the loss takes `state.model_state` as a fifth argument and returns
      (loss, (aux, new_model_state)), e.g. for BatchNorm statistics.
    update_kwargs: static keyword arguments for `tx.update` (an optax
      `GradientTransformationExtraArgs`), e.g. a fast/slow phase; one step per value.
    grad_measurements: grads -> {name: array}, computed inside the step and added to the
      measurements (e.g. per-block gradient magnitudes); arrays are logged as lists.

  Returns:
    The jitted step; measurements hold "loss", the aux entries and "grad_norm".
  """
  def step(state: TrainState, frozen: Tree, batch: dict, hparams: dict):
    rng, key = jax.random.split(jax.random.wrap_key_data(state.rng))
    opt_state, loss_hparams = _split_hparams(state.opt_state, hparams)
    if loss_hparams and not _takes_hparams(loss_fn):
      raise ValueError(
          f"hparams {sorted(loss_hparams)}: no optax.inject_hyperparams state of the "
          f"optimizer holds them, and the loss takes no `hparams` argument to read them")
    if "learning_rate" in loss_hparams:
      log.warning("hparams 'learning_rate' goes to the loss: the optimizer has no injected "
                  "learning rate (build it with optax.inject_hyperparams to set it per step)")
    kwargs = {"hparams": loss_hparams} if loss_hparams else {}
    if mutable:
      (loss, (aux, model_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
          state.params, frozen, batch, key, state.model_state, **kwargs)
    else:
      value_and_grad = (getattr(loss_fn, "value_and_grad", None)  # see `in_passes`
                        or jax.value_and_grad(loss_fn, has_aux=True))
      (loss, aux), grads = value_and_grad(state.params, frozen, batch, key, **kwargs)
      model_state = state.model_state
    updates, opt_state = tx.update(grads, opt_state, state.params, **(update_kwargs or {}))
    params = optax.apply_updates(state.params, updates)
    measurements = {"loss": loss, "grad_norm": optax.tree.norm(grads), **aux}
    if grad_measurements is not None:
      measurements.update(grad_measurements(grads))
    return (TrainState(state.step + 1, params, opt_state, jax.random.key_data(rng), model_state,
                       state.carry), measurements)

  replicated, data = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
  jitted = jax.jit(step, in_shardings=(replicated, replicated, data, replicated),
                   out_shardings=(replicated, replicated), donate_argnums=(0,) if donate else (),
                   compiler_options=compiler_options(mesh))

  def train_step(state: TrainState, frozen: Tree, batch: dict, hparams: dict | None = None):
    return jitted(state, frozen, batch, {} if hparams is None else hparams)
  # The jitted function's ahead-of-time API (cost and memory analysis in `bench`).
  train_step.lower = lambda state, frozen, batch, hparams=None: jitted.lower(
      state, frozen, batch, {} if hparams is None else hparams)
  return train_step


def _takes_hparams(loss_fn: Callable) -> bool:
  """Whether `loss_fn` accepts an `hparams` keyword (True when its signature is unknown)."""
  try:
    params = inspect.signature(loss_fn).parameters.values()
  except (TypeError, ValueError):
    return True
  return any(p.name == "hparams" or p.kind is p.VAR_KEYWORD for p in params)


def make_predict_step(logits_fn: LogitsFn, mesh: Mesh) -> Callable:
  """`predict_step(state, frozen, batch) -> {"logits", "label", "mask"}`, per sample.

  Evaluation keeps the model's raw outputs (float32 logits) so that every metric — top-1
  accuracies, the continual-learning accuracy matrix, membership inference, divergences to
  an oracle — is computed on the host from one pass (see `predict` and `metrics`).
  """
  def step(state: TrainState, frozen, batch):
    logits = logits_fn(state.params, state.model_state, frozen, batch)
    return {"logits": logits.astype(jnp.float32), "label": batch["label"],
            "mask": batch["mask"]}
  replicated, data = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
  return jax.jit(step, in_shardings=(replicated, replicated, data), out_shardings=data)


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


def _to_host(x: jax.Array) -> np.ndarray:
  if jax.process_count() > 1:
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


def predict(predict_step: Callable, state: TrainState, frozen: Tree, batches: Iterator[dict],
            mesh: Mesh) -> dict[str, np.ndarray]:
  """{"logits": (n, classes), "label": (n,)} over one pass of padded eval batches.

  Padded slots are dropped, so row i is the i-th real example of the split in order.
  Every process receives all rows.
  """
  logits, labels = [], []
  for batch in batches:
    out = predict_step(state, frozen, to_global(batch, mesh))
    valid = _to_host(out["mask"]) > 0
    logits.append(_to_host(out["logits"])[valid])
    labels.append(_to_host(out["label"])[valid])
  if not logits:
    return {"logits": np.zeros((0, 0), np.float32), "label": np.zeros((0,), np.int64)}
  return {"logits": np.concatenate(logits), "label": np.concatenate(labels)}


# ----------------------------------------------------------------------------------------------
# The host loop: one `Run` per workdir, a list of `Stage`s, resumable at any step.

# One sub-step of an iteration: (label, jitted step, the streams whose next batch it takes).
SubStep = tuple[str, Callable, tuple[str, ...]]


@dataclasses.dataclass
class Stage:
  """One training stage: `epochs` passes over `streams[epoch_stream]`, or `iterations`.

  By default every iteration is one step on the next batch of every stream. A `plan`
  changes that per iteration, e.g. UG-CLU's FAST step on a forget batch every N_f
  iterations followed by a SLOW step on a retain batch; each stream then advances only
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
    log_first: log iterations 0, n, 2n, ... (n = `train.log_every_steps`) instead of
      n-1, 2n-1, ...: a plan whose rarer sub-step falls on iteration 0 mod N (UG-CLU's FAST)
      then has it in every logged row when n is a multiple of N. The last iteration is
      always logged.
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
  log_first: bool = False

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


def _duration(seconds: float) -> str:
  """'45s', '12m05s' or '3h07m' (a progress line's estimate of the time left)."""
  seconds = int(round(seconds))
  if seconds < 60:
    return f"{seconds}s"
  if seconds < 3600:
    return f"{seconds // 60}m{seconds % 60:02d}s"
  return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


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
  "streams" (batches consumed per stream), "results" (per-stage evaluations), "evals"
  (periodic in-stage evaluations per stage), "seconds" (the run's wall time up to the
  checkpoint, across attempts), "clocks" (each `stage_seconds` name's start on that
  clock) and "stopped_clocks" (the seconds of those stopped). A rerun of the same command
  therefore continues where the previous one stopped and ends with the same final
  metrics.

  Guarantees of the stage loop (`run_stage`): the host never waits for the device between
  steps, except at log steps and checkpoints (and on CPU in `hostmem`'s `retain` mode,
  where single-device computations run inline: each step returns when it is done); every
  step's loss is checked for finiteness at the next log step and before the next checkpoint, so a non-finite loss stops the run
  (exit 1, naming the first bad step) before anything computed after it is saved.
  """

  def __init__(self, workdir: str, config: ml_collections.ConfigDict):
    self.workdir = os.path.abspath(workdir)
    self.config = config
    self.is_main = jax.process_index() == 0
    if _DRY_RUN:  # everything before the first write has passed: stop here
      check_writable(self.workdir)
      resumes = os.path.isfile(os.path.join(self.workdir, "config.json"))
      if resumes:
        self._check_config()  # a workdir of another config is refused as a run refuses it
      raise DryRunComplete(self.workdir, resumes,
                           os.path.isfile(os.path.join(self.workdir, "results.json")))
    prepare_workdir(self.workdir)
    self._check_config()
    tcfg = config.train
    self.log_every = int(tcfg.log_every_steps)
    self.interrupt_at_step = int(config.get("debug", {}).get("interrupt_at_step", 0) or 0)
    self._events = None  # the TensorBoard view of metrics.jsonl, made when the run restores
    self._tensorboard = bool(tcfg.get("tensorboard", True)) and self.is_main
    self.checkpointer = ckpt_lib.Checkpointer(
        os.path.join(self.workdir, "checkpoints"), max_to_keep=int(tcfg.max_checkpoints_to_keep),
        every_steps=int(tcfg.checkpoint_every_steps))
    _OPEN_RUNS.add(self)
    self.meta: dict = {"stage_index": 0, "stage_step": 0, "streams": {}, "results": {},
                       "evals": {}, "seconds": 0.0, "clocks": {}, "stopped_clocks": {}}
    self._clock, self._seconds_before = time.time(), 0.0
    self._steps_this_attempt, self._finished_seconds = 0, None
    results = os.path.join(self.workdir, "results.json")
    self._was_finished = os.path.exists(results)  # (the first process removes it below)
    if self.is_main and self._was_finished:
      try:  # a rerun of a finished run keeps its wall time (`write_results`)
        with open(results) as f:
          self._finished_seconds = json.load(f).get("wall_seconds")
      except (OSError, ValueError, AttributeError):
        pass
      os.remove(results)  # only a finished run (re)writes it

  # -- config record --------------------------------------------------------------------------
  def _check_config(self) -> None:
    path = os.path.join(self.workdir, "config.json")
    self._pending_config = None
    record = json.loads(self.config.to_json_best_effort())
    if os.path.exists(path):
      with open(path) as f:
        diff = config_difference(json.load(f), self.config)
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
      # Lines of an attempt killed before its first checkpoint go.
      self._rebuild_events(self._truncate_metrics(0))
      return state
    state, meta = restored
    self.meta = {"evals": {}, "seconds": 0.0, "clocks": {}, "stopped_clocks": {}, **meta}
    self._seconds_before = float(self.meta["seconds"])
    step = int(state.step)
    if self._was_finished:
      log.info("resumed from %s at step %d: the run had finished; its results are presented "
               "again", self.checkpointer.directory, step)
    else:
      log.info("resumed from %s at step %d (%d stage(s) finished, %d steps into the next)",
               self.checkpointer.directory, step, self.meta["stage_index"],
               self.meta["stage_step"])
    self._rebuild_events(self._truncate_metrics(step))
    return state

  def save(self, state: TrainState, step: int | None = None) -> None:
    """Checkpoints `state` with a snapshot of `meta` (orbax writes asynchronously, so the
    dict the loop keeps updating must not be handed over by reference)."""
    if self._pending_config is not None and self.is_main:
      write_json(*self._pending_config)
      self._pending_config = None
    step = int(jax.device_get(state.step)) if step is None else step
    self.meta["seconds"] = round(self.wall_seconds(), 3)
    self.checkpointer.save(step, state, json.loads(json.dumps(_jsonable(self.meta))))

  # -- wall time ------------------------------------------------------------------------------
  def wall_seconds(self) -> float:
    """The run's wall time across attempts: this attempt's since the `Run` was made, plus
    the previous attempts' up to the checkpoint this one resumed from. Time an interrupted
    attempt spent after its last checkpoint is not counted; the steps it redoes are."""
    return self._seconds_before + time.time() - self._clock

  def stage_seconds(self, name: str, stop: bool = False) -> float:
    """Wall seconds since the first call with `name`, on `wall_seconds`'s clock: the first
    call starts it (0.0), and a resumed run continues it when a checkpoint was written in
    between (e.g. a task's training and evaluation across an interruption). With `stop`
    the clock stops: every later call, in this attempt or a resumed one, returns the same
    seconds (e.g. a stage's training time, read again after a Retrain oracle trained)."""
    stopped = self.meta["stopped_clocks"]
    if name in stopped:
      return stopped[name]
    start = self.meta["clocks"].setdefault(name, round(self.wall_seconds(), 3))
    seconds = self.wall_seconds() - start
    if stop:
      stopped[name] = round(seconds, 3)
    return seconds

  def _truncate_metrics(self, step: float) -> list[dict]:
    """Drops metric lines logged after the checkpoint we resume from (they will be redone);
    returns the lines kept (none on the processes that do not write them)."""
    path = os.path.join(self.workdir, "metrics.jsonl")
    if not (self.is_main and os.path.exists(path)):
      return []
    kept, records = [], []
    with open(path) as f:
      for line in f:
        try:
          record = json.loads(line)
        except json.JSONDecodeError:
          continue  # a line torn by the kill
        if record.get("step", 0) <= step:
          kept.append(line)
          records.append(record)
    with open(path + ".tmp", "w") as f:  # replaced at once: an interrupt loses no line
      f.writelines(kept)
    os.replace(path + ".tmp", path)
    return records

  def _rebuild_events(self, records: list[dict]) -> None:
    """The event file afresh from `records`, `metrics.jsonl` as it now is, and the stages
    the restored checkpoint has finished, each at its last step (with TensorBoard off, an
    earlier attempt's event files are removed: they would show redone steps)."""
    if not self.is_main:
      return
    if self._tensorboard:
      finished = [_result_record(name, step, self.meta["results"][name])
                  for name, step in self.meta.get("result_steps", {}).items()
                  if name in self.meta["results"]]
      # The config as the Text tab shows it: an indented (code) block of its JSON.
      text = "\n".join("    " + line for line in self.config.to_json_best_effort(
          indent=2, sort_keys=True).splitlines())
      self._events = tensorboard.EventWriter(self.workdir, config_text=text)
      # A stage's results after the lines of its last step (sorted is stable).
      self._events.rebuild(sorted(records + finished, key=lambda r: r.get("step", 0)))
    else:
      tensorboard.remove_event_files(self.workdir)

  # -- logging --------------------------------------------------------------------------------
  def log_metrics(self, record: dict) -> None:
    if self.is_main:
      record = _jsonable(record)
      with open(os.path.join(self.workdir, "metrics.jsonl"), "a") as f:
        f.write(json.dumps(record) + "\n")
      if self._tensorboard:
        if self._events is None:  # a run that logs without restoring first: the file
          self._rebuild_events(self._truncate_metrics(math.inf))  # afresh, this line too
        else:
          self._events.write(record)

  # -- stages ---------------------------------------------------------------------------------
  def stage_done(self, index: int) -> bool:
    return self.meta["stage_index"] > index

  def run_stage(self, index: int, stage: Stage, state: TrainState, frozen: Tree, mesh: Mesh,
                extra_log: Callable[[TrainState], dict] | None = None,
                eval_fn: Callable[[TrainState, Tree], dict] | None = None,
                eval_every: int = 0) -> tuple[TrainState, Tree]:
    """Trains `stage` from where the checkpoint left it; saves every N steps and at the end.

    Args:
      index: the stage's position in the run (for resumption).
      stage: what to run.
      state: current train state (already restored).
      frozen: the frozen tree (replicated).
      mesh: the data mesh.
      extra_log: state -> extra host measurements for logged iterations (e.g. group norms).
      eval_fn: (state, frozen) -> {metric: value}, run every `eval_every` iterations of
        the stage (the GS-LoRA reference evaluates every 100 steps), logged as an "eval"
        record and kept in `meta["evals"][stage.name]` (checkpointed), so a method can act
        on them after the stage (e.g. keep the best-H record); 0 disables it.

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
    if not resuming:
      self.meta["evals"].pop(stage.name, None)
    if stage.on_start is not None:
      state, frozen = stage.on_start(state, frozen, not resuming)
    total, spe = stage.num_steps, max(1, stage.steps_per_epoch)
    epochs = stage.epochs if stage.epoch_stream is not None else 1
    log.info("[%s] %d epoch(s) x %d iterations (global batch %s)%s", stage.name, epochs, spe,
             {k: st.batch_size for k, st in stage.streams.items()},
             f", resuming at iteration {start}" if start else "")
    iters = {k: st.iterate(positions[k]) for k, st in stage.streams.items()}
    t0, done_since, first_log = time.time(), 0, True
    step = int(jax.device_get(state.step))  # from here on counted on the host
    eval_due = lambda s: bool(eval_fn is not None and eval_every and (s + 1) % eval_every == 0)
    if resuming and eval_due(start - 1) and not any(
        e["step"] == step for e in self.meta["evals"].get(stage.name, [])):
      # The run stopped at an evaluation step before evaluating (a stop request is honoured
      # first): the restored state is the one the evaluation was due on.
      self._periodic_eval(stage.name, (start - 1) // spe, step, state, frozen, eval_fn)
    unchecked: list[tuple] = []  # (step, epoch, iteration, label, device loss)
    for s in range(start, total):
      epoch = s // spe
      hparams = stage.hparams_fn(epoch, s)
      measurements = {}
      for label, step_fn, keys in stage.substeps(s):
        batch = to_global({k: next(iters[k]) for k in keys}, mesh)
        for k in keys:
          positions[k] += 1
        state, m = step_fn(state, frozen, batch, hparams)
        step += 1
        self._steps_this_attempt += 1
        unchecked.append((step, epoch, s, label, m["loss"]))
        measurements[label] = m
      done_since += 1
      self.meta.update(stage_index=index, stage_step=s + 1, streams=dict(positions))
      last = s + 1 == total
      log_now = (s + (0 if stage.log_first else 1)) % self.log_every == 0 or last
      # Every process asks at every step (jax's preemption sync needs it), the last too.
      stop = self.checkpointer.stop_requested()
      if log_now:
        self._check_finite(unchecked, stage.name, spe)
        unchecked = []
        flat = {(f"{label}/{k}" if label else k): v.tolist() if np.ndim(v) else float(v)
                for label, m in jax.device_get(measurements).items() for k, v in m.items()}
        record = {"step": step, "stage": stage.name, "epoch": epoch + 1, **flat, **hparams}
        if extra_log is not None:
          record.update(extra_log(state))
        self.log_metrics(record)
        # One loss, or each labelled sub-step's ("fast/loss 1.2 slow/loss 0.3").
        losses = " ".join(f"{k} {v:.4f}" for k, v in flat.items() if k.endswith("/loss"))
        losses = f"loss {flat['loss']:.4f}" if "loss" in flat else losses or "loss nan"
        # The injected learning rate, or the schedule's next η that a method logs itself
        # (fast-slow stages); nothing when neither is known.
        lr = hparams.get("learning_rate", record.get("eta_next"))
        rate = done_since / max(1e-9, time.time() - t0)
        # No estimate from a stage's first interval in an attempt: it holds the compilation.
        left = (f", stage done in ~{_duration((total - s - 1) / rate)}"
                if s + 1 < total and not first_log else "")
        first_log = False
        log.info("[%s] epoch %d/%d iteration %d/%d %s%s (%.1f it/s%s)", stage.name,
                 epoch + 1, epochs, s + 1, total, losses,
                 "" if lr is None else f" lr {float(lr):.3g}", rate, left)
        t0, done_since = time.time(), 0
      # A stop request is honoured before an evaluation (the resumed run evaluates first),
      # and one that arrives during an evaluation right after it: every process evaluates
      # at the same steps, so all of them ask the same number of times.
      skipped_eval = eval_due(s) and stop
      if eval_due(s) and not stop:
        self._periodic_eval(stage.name, epoch, step, state, frozen, eval_fn)
        stop = self.checkpointer.stop_requested()
      save_now = stop or (not last and self.checkpointer.should_save(step))
      if save_now:
        self._check_finite(unchecked, stage.name, spe)
        unchecked = []
        self.save(state, step)
      if stop:
        self.checkpointer.wait()
        together = ", all processes together" if jax.process_count() > 1 else ""
        pending = "; the evaluation due at this step runs when it resumes" if skipped_eval else ""
        ckpt_lib.STOP.clear()  # honoured: a later run in this process is not stopped by it
        raise StopRequested(f"[{stage.name}] stopped at step {step} on a stop request"
                            f"{together}; its checkpoint is written{pending}")
      if self.interrupt_at_step and step >= self.interrupt_at_step:
        self.checkpointer.wait()
        raise SystemExit(f"debug.interrupt_at_step: stopped at step {step} as requested")
    self._check_finite(unchecked, stage.name, spe)
    self.meta.update(stage_index=index + 1, stage_step=0, streams={})
    return state, frozen

  def _periodic_eval(self, name: str, epoch: int, step: int, state: TrainState, frozen: Tree,
                     eval_fn: Callable[[TrainState, Tree], dict]) -> None:
    result = _jsonable(eval_fn(state, frozen))
    self.meta["evals"].setdefault(name, []).append({"step": step, **result})
    self.log_metrics({"step": step, "stage": name, "epoch": epoch + 1, "eval": result})

  @staticmethod
  def _check_finite(unchecked: list[tuple], stage: str, steps_per_epoch: int) -> None:
    """Raises NonFiniteLossError naming the first step whose loss was not finite."""
    if not unchecked:
      return
    values = jax.device_get([u[-1] for u in unchecked])
    for (step, epoch, s, label, _), value in zip(unchecked, values):
      if not math.isfinite(float(value)):
        raise NonFiniteLossError(
            f"stage '{stage}', step {step} (epoch {epoch + 1}, iteration "
            f"{s % steps_per_epoch + 1} of {steps_per_epoch}{', ' + label if label else ''}): "
            f"loss is {float(value)}; nothing after the last good checkpoint was saved "
            f"(lower the learning rate or check the data)")

  def finish_stage(self, state: TrainState, name: str, results: dict) -> None:
    """Records a finished stage's evaluation and checkpoints it (the resume point). A stop
    request that arrived since the stage's last training step (during its evaluation) is
    honoured here, once that checkpoint is written: the next stage's set-up (compilation,
    a saliency pass) would delay it. Every process asks once per finished stage."""
    self.meta["results"][name] = results
    step = int(jax.device_get(state.step))
    self.meta.setdefault("result_steps", {})[name] = step  # where the event file shows it
    self.save(state, step)
    if self._events is not None:
      self._events.write(_result_record(name, step, _jsonable(results)))
    self.checkpointer.wait()
    if self.checkpointer.stop_requested():
      together = ", all processes together" if jax.process_count() > 1 else ""
      ckpt_lib.STOP.clear()
      raise StopRequested(f"[{name}] stopped after the stage on a stop request{together}; "
                          f"its checkpoint is written")

  def write_results(self, results: dict) -> str:
    """Writes the results envelope atomically as `results.json` (a finished run only), with
    the run's `wall_seconds` added."""
    missing = [k for k in ("method", "config", "stages", "final") if k not in results]
    if missing or not all("name" in s for s in results["stages"]):
      raise ValueError(f"results envelope lacks {missing or 'a stage name'}")
    # A rerun of a finished run that trained nothing re-presents it: its time stays the run's.
    rerun = self._finished_seconds is not None and not self._steps_this_attempt
    results["wall_seconds"] = (self._finished_seconds if rerun  # also in what the method returns
                               else round(self.wall_seconds(), 3))
    path = os.path.join(self.workdir, "results.json")
    self.checkpointer.wait()
    if self.is_main:
      write_json(path, results)
    return path

  def announce(self, text: str, path: str) -> None:
    """Prints a finished run's table and where its results went (the first process only:
    the others wrote nothing and would repeat it)."""
    if self.is_main:
      print(text, flush=True)
      plots = sorted(f for f in os.listdir(self.workdir) if f.endswith(".png"))
      log.info("results written to %s%s", path,
               f"; plots: {', '.join(plots)}" if plots else "")

  def close(self) -> None:
    self.checkpointer.wait()
    self.checkpointer.close()
    _OPEN_RUNS.discard(self)


def _result_record(name: str, step: int, results: dict) -> dict:
  """A finished stage's results as the event file takes them (`stage/<key>`)."""
  return {"step": step, "stage": name, "result": results}


def finish_pending_saves() -> None:
  """Waits for the checkpoint saves still being written by open runs (after an interrupt:
  a save that was under way completes; a later one never started)."""
  for run in list(_OPEN_RUNS):
    run.checkpointer.wait()


def close_runs_under(folder: str) -> None:
  """Closes the open runs whose workdir is `folder` or below it (a refused run's, before
  its empty folders are removed: orbax's background clean-up would list them)."""
  root = os.path.join(os.path.abspath(folder), "")
  for run in list(_OPEN_RUNS):
    if os.path.join(os.path.abspath(run.workdir), "").startswith(root):
      try:
        run.close()
      except Exception:  # pylint: disable=broad-except  (the refusal is what is reported)
        _OPEN_RUNS.discard(run)


def check_workdir(workdir: str, field: str = "--workdir") -> None:
  """A workdir is a filesystem path: checkpoints, metrics and results are written with the
  os module, so a URL (`gs://...`) would become a local folder named after it."""
  if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", os.fspath(workdir)):
    raise ConfigError(f"{field} {workdir}: a URL; expected a filesystem path (mount a bucket "
                      f"with Cloud Storage FUSE and give the mounted path)")


def check_writable(workdir: str, field: str = "--workdir") -> None:
  """What `prepare_workdir` checks, leaving nothing behind (a dry run's check): a
  filesystem path, not a file, and its nearest existing folder writable: an empty
  temporary folder is made there and removed at once (`os.access` alone says yes to root
  on a read-only mount or in /proc)."""
  check_workdir(workdir, field)
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ConfigError(f"{field} {workdir}: a file; expected a folder (or a path to create one)")
  above = os.path.abspath(workdir)
  while not os.path.exists(above) and os.path.dirname(above) != above:
    above = os.path.dirname(above)
  try:
    os.rmdir(tempfile.mkdtemp(prefix=".kswap_jax_probe_", dir=above))
  except OSError as e:  # not a folder, not writable, or no folder can be made there
    raise ConfigError(f"{field} {workdir}: not a writable folder ({above}: "
                      f"{e.strerror or e})") from None


def prepare_workdir(workdir: str, field: str = "--workdir") -> None:
  """Creates `workdir` (after `check_writable`) and checks that this process can write into
  it."""
  check_writable(workdir, field)
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, f".write_probe_{jax.process_index()}")
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise ConfigError(f"{field} {workdir}: not a writable folder ({e.strerror or e})") from None


# Config sections that may change between a run and its resumption (and differ between
# processes); every other field must match the workdir's record.
RESUMABLE_SECTIONS = ("debug", "train", "distributed")
# Fields added after records were written, and the value an older record is read as
# having: the behaviour before the field existed (data.resample), or the default of a field
# that changes no trained value (save_best_h only writes extra files), or a function of
# the record's section giving either (clu.buffer_kind: the former per-stage draw is
# "resample", and with no buffer the kind changes nothing). Such a record still matches a
# config at that value, so a run started before the field existed resumes.
ADDED_FIELDS = {"data.resample": "bilinear", "gs_lora.save_best_h": True,
                "clu.buffer_kind": lambda clu: "resample" if clu.get("buffer_size") else
                "persistent"}


def _with_added_fields(recorded: dict) -> dict:
  """`recorded` with each `ADDED_FIELDS` entry filled in where its section exists."""
  out = json.loads(json.dumps(recorded))
  for path, value in ADDED_FIELDS.items():
    *parents, leaf = path.split(".")
    node = out
    for key in parents:
      node = node.get(key) if isinstance(node, dict) else None
    if isinstance(node, dict):
      node.setdefault(leaf, value(node) if callable(value) else value)
  return out


def config_difference(recorded: dict, config: ml_collections.ConfigDict,
                      fields: Sequence[str] | None = None, ignore: Sequence[str] = ()) -> str:
  """The first field in which `config` differs from `recorded` (a config's JSON record),
  outside `RESUMABLE_SECTIONS`, as "field: was X, now Y"; "" when they agree.

  `fields`: compare only these (dotted paths: "seed", "data.old", "pretrain"), less the
  dotted paths in `ignore`.
  """
  new = json.loads(config.to_json_best_effort())
  recorded = _with_added_fields(recorded)
  # Another method's sections (a config file sets up its whole family), in either config:
  # a record written when the file set up one more method's section compares as well.
  from kswap_jax import methods  # pylint: disable=import-outside-toplevel
  unread = methods.unread_sections(new) | methods.unread_sections(recorded)
  if unread:
    recorded = {k: v for k, v in recorded.items() if k not in unread}
    new = {k: v for k, v in new.items() if k not in unread}
  # Fields of read sections that the method's results never depend on (`fields_unread`):
  # a run of that method is the same run whatever their values. Not for a comparison of
  # chosen `fields` (a shared pretraining's, whichever method's record it holds).
  unread_fields = (methods.unread_fields(str(new.get("method")))
                   if fields is None and recorded.get("method") == new.get("method") else ())
  if unread_fields:
    recorded, new = copy.deepcopy(recorded), copy.deepcopy(new)
    for path in unread_fields:
      _drop(recorded, path)
      _drop(new, path)
  if fields is not None:
    a, b = _pick(recorded, fields), _pick(new, fields)
    for path in ignore:
      _drop(a, path)
      _drop(b, path)
    return _first_difference(a, b)
  return _first_difference({k: v for k, v in recorded.items() if k not in RESUMABLE_SECTIONS},
                           {k: v for k, v in new.items() if k not in RESUMABLE_SECTIONS})


def _drop(record: dict, path: str) -> None:
  """Removes the dotted `path` from the nested dict `record`, where it is there."""
  *parents, leaf = path.split(".")
  for key in parents:
    record = record.get(key, {}) if isinstance(record, dict) else {}
  if isinstance(record, dict):
    record.pop(leaf, None)


def _pick(record: dict, fields: Sequence[str]) -> dict:
  """The nested dict of `record` holding only the dotted `fields` it has."""
  out: dict = {}
  for field in fields:
    node, target, keys = record, out, field.split(".")
    for key in keys[:-1]:
      node = node.get(key, {}) if isinstance(node, dict) else {}
      target = target.setdefault(key, {})
    if isinstance(node, dict) and keys[-1] in node:
      target[keys[-1]] = node[keys[-1]]
  return out


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
