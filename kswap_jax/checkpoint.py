"""Checkpoints: the orbax manager for resumable runs, vit_jax `.npz` import and export.

A run checkpoint holds the whole train state (trainable tree, optimizer state, step, RNG)
plus JSON metadata (stage index, steps done in the stage, data-stream positions, results
of the stages already finished). Orbax writes each checkpoint to a temporary directory and
renames it when complete, so a run killed mid-save restarts from the previous one.

`.npz` files use the vit_jax / AugReg layout: one array per "/"-joined parameter name
(`Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel`, ...).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import os
import signal
import threading
import zipfile
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from kswap_jax import lora as lora_lib
from kswap_jax.errors import ConfigError

log = logging.getLogger("kswap_jax")

# Training steps this process has asked jax's preemption sync about (`stop_requested`).
_SYNC_CALLS = itertools.count(1)
# This process's stop request (`train.stop_on_signals`): one process stops at its next
# training step once it is set; in a multi-process run it only records a first Ctrl-C (jax's
# preemption sync decides the step).
STOP = threading.Event()
# Set on `train.stop_on_signals`' Ctrl-C handler: its first Ctrl-C asks for a stop, the
# next one raises (held by `_interrupts_deferred` until a save returns).
STOPS_ON_CTRL_C = "kswap_stops_on_ctrl_c"


class _Manager(ocp.CheckpointManager):
  """orbax's manager, kept away from jax's preemption sync: its `save` and its finalize
  thread ask `reached_preemption` with the train state's step, and the sync keeps only the
  last id it was given, so those calls would move the step at which a stop request is
  honoured (`Checkpointer.stop_requested`, which passes its own count). Its save-decision
  policy is not used: every save is forced, when `Checkpointer.should_save` or the loop
  says so."""

  def reached_preemption(self, step: int) -> bool:
    del step
    return False


class Checkpointer:
  """An orbax `CheckpointManager` over `<workdir>/checkpoints` with state + JSON meta items.

  Periodic saves: whenever the optimizer step count has crossed a multiple of
  `every_steps` since the last save (`should_save`; orbax's fixed-interval policy needs
  `step % every_steps == 0`, which a stage whose iterations take several optimizer steps,
  UG-CLU's FAST + SLOW, can jump over). A stop request (a preemption notice or Ctrl-C in a
  multi-process run, SIGTERM or Ctrl-C to a single process: `train.stop_on_signals`) is the
  training loop's, through `stop_requested`.
  """

  def __init__(self, directory: str, max_to_keep: int = 2, every_steps: int = 0):
    self.directory = os.path.abspath(directory)
    self.every_steps = int(every_steps)
    self.manager = _Manager(
        self.directory,
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "meta": ocp.JsonCheckpointHandler()},
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                             cleanup_tmp_directories=True))

  def should_save(self, step: int) -> bool:
    """Whether `step` is past a multiple of `every_steps` that the last save is not."""
    last = self.manager.latest_step() or 0
    return self.every_steps > 0 and step // self.every_steps > last // self.every_steps

  def save(self, step: int, state: Any, meta: dict) -> None:
    """Saves asynchronously, whatever the policy says; a checkpoint at `step` is replaced.

    `meta` must not be mutated afterwards (orbax serialises it in the background): pass
    a snapshot.
    """
    with _interrupts_deferred():
      if step in self.manager.all_steps():
        self.manager.wait_until_finished()
        self.manager.delete(step)
      self.manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)

  @staticmethod
  def stop_requested() -> bool:
    """Whether every process of a multi-process run has reached the training step at which
    a stop request is honoured: after a preemption notice (SIGTERM) or `request_stop`
    reached any process, jax's preemption sync picks the same step on all of them (one past
    the furthest any had reached). Every process must call this the same number of times:
    the stage loop asks once per training step and once after each due evaluation, and
    `Run.finish_stage` once per finished stage. A single
    process stops at the first step after `STOP` is set (SIGTERM, Ctrl-C).

    The steps are counted per process from its first call, not by the train state's step:
    a request that arrives before the first call (while a resumed run compiles) is then due
    at the first call; with the state's step it would wait for a step already passed."""
    if jax.process_count() == 1:
      return STOP.is_set()
    try:
      return multihost_utils.reached_preemption_sync_point(next(_SYNC_CALLS))
    except RuntimeError:  # jax_enable_preemption_service is off: no stop requests
      return False

  def restore_latest(self, abstract_state: Any) -> tuple[Any, dict] | None:
    """(state, meta) from the newest complete checkpoint, or None when there is none.

    Raises:
      ConfigError: the saved shapes do not fit `abstract_state` (a different model or
        LoRA config was used in this workdir).
    """
    step = self.manager.latest_step()
    if step is None:
      return None
    # Compare shapes from the metadata first, so a mismatch is reported before any read.
    saved = {_path_name(p): np.shape(x) for p, x in jax.tree_util.tree_flatten_with_path(
        self.manager.item_metadata(step)["state"])[0]}
    for path, want in jax.tree_util.tree_flatten_with_path(abstract_state)[0]:
      name = _path_name(path)
      if name not in saved:
        raise ConfigError(f"{self.directory}/{step}: checkpoint has no {name} (it belongs to "
                          f"another model/LoRA config); use a new --workdir")
      if tuple(saved[name]) != tuple(np.shape(want)):
        raise ConfigError(f"{self.directory}/{step}: {name} has shape {tuple(saved[name])} but "
                          f"the model expects {tuple(np.shape(want))}; use a new --workdir")
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
    except (ValueError, TypeError, KeyError) as e:
      raise ConfigError(
          f"{self.directory}/{step}: checkpoint does not fit the model/LoRA of this config "
          f"({str(e).splitlines()[0][:200]}); use a new --workdir") from None
    return restored["state"], dict(restored["meta"])

  def wait(self) -> None:
    with _interrupts_deferred():
      self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()


@contextlib.contextmanager
def _interrupts_deferred():
  """Ctrl-C inside the block is raised when it ends (a second one at once): an orbax save
  or wait cut short in the main thread leaves its background commit failing."""
  # Several processes keep the default: one holding an interrupt inside a save could wait at
  # orbax's barrier for another that has already stopped. With the command line's handler
  # (`train.stop_on_signals`) a Ctrl-C that only asks for a stop goes to it; the one that
  # would raise is held.
  previous = signal.getsignal(signal.SIGINT)
  stops = getattr(previous, STOPS_ON_CTRL_C, False)
  if (threading.current_thread() is not threading.main_thread()
      or not (previous is signal.default_int_handler or stops)
      or jax.process_count() > 1):
    yield
    return
  caught = []

  def handler(signum, frame):
    if stops and not STOP.is_set():
      previous(signum, frame)  # a stop request: the run saves and stops at its next step
      return
    caught.append(signum)
    if len(caught) > 1:
      raise KeyboardInterrupt
  signal.signal(signal.SIGINT, handler)
  try:
    yield
  finally:
    signal.signal(signal.SIGINT, signal.default_int_handler if caught else previous)
  if caught:
    raise KeyboardInterrupt


def _path_name(path) -> str:
  return jax.tree_util.keystr(path, simple=True, separator="/")


# ----------------------------------------------------------------------------------------------
# vit_jax .npz import / export.

def flatten(params: dict) -> dict[str, np.ndarray]:
  """{"a/b/c": array} in the vit_jax npz naming."""
  return {name: np.asarray(x) for name, x in lora_lib.named_leaves(params)}


def unflatten(flat: dict[str, Any]) -> dict:
  tree: dict = {}
  for name, x in flat.items():
    lora_lib.set_by_name(tree, name.split("/"), x)
  return tree


def save_npz(params: dict, path: str) -> None:
  """Writes params as a vit_jax-layout `.npz`, atomically (tmp file + rename).

  Raises:
    TypeError: the arguments in `load_npz`'s order (path first).
  """
  if isinstance(params, (str, os.PathLike)) or not isinstance(path, (str, os.PathLike)):
    raise TypeError(f"save_npz(params, path): expected a parameter tree and a path, got "
                    f"{type(params).__name__} and {type(path).__name__}")
  path = os.fspath(path)
  tmp = path + ".tmp.npz"
  np.savez(tmp, **flatten(params))
  os.replace(tmp, path)


def _resize_posemb(posemb: np.ndarray, target_shape: tuple[int, ...],
                   has_cls: bool = True) -> np.ndarray:
  """Bilinear resize of the position-embedding grid, keeping the CLS token (vit_jax recipe).

  With `has_cls=False` (a `model.pool = "gap"` ViT) every position is on the grid.
  """
  n_cls = int(has_cls)
  cls, grid = posemb[:, :n_cls], posemb[0, n_cls:]
  g_old, g_new = math.isqrt(grid.shape[0]), math.isqrt(target_shape[1] - n_cls)
  if g_old ** 2 != grid.shape[0] or g_new ** 2 != target_shape[1] - n_cls:
    raise ValueError("not a square grid")
  grid = grid.reshape(g_old, g_old, -1)
  grid = np.asarray(jax.image.resize(jnp.asarray(grid), (g_new, g_new, grid.shape[-1]),
                                     "bilinear"))
  log.info("resized position embeddings from %dx%d to %dx%d", g_old, g_old, g_new, g_new)
  return np.concatenate([cls, grid.reshape(1, g_new * g_new, -1)], axis=1)


_CONVERT_FIRST = ("convert it first: python -m kswap_jax.convert SRC --layout ... --out "
                  "OUT.npz")


def npz_problem(path: str) -> str | None:
  """Why the file at `path` is not an `.npz` of parameters (None when it may be one): a
  torch checkpoint (a zip holding `data.pkl`) and a `.safetensors` file are named as such,
  since both are converted, not loaded."""
  if not zipfile.is_zipfile(path):  # numpy would call it pickled data and suggest unpickling
    return f"is not an .npz file (a .safetensors or torch checkpoint? {_CONVERT_FIRST})"
  try:
    with zipfile.ZipFile(path) as z:
      names = z.namelist()
  except (OSError, zipfile.BadZipFile) as e:
    return f"is not a readable .npz file ({e})"
  if any(n == "data.pkl" or n.endswith("/data.pkl") for n in names):
    return f"is a PyTorch checkpoint, not an .npz ({_CONVERT_FIRST})"
  return None


def npz_shapes(path: str) -> dict[str, tuple[int, ...]]:
  """{name: shape} of the arrays in an `.npz`, read from their headers only (a B/16 file's
  hundreds of MB are not loaded)."""
  out = {}
  with zipfile.ZipFile(path) as z:
    for info in z.infolist():
      if not info.filename.endswith(".npy"):
        continue
      with z.open(info) as f:
        version = np.lib.format.read_magic(f)
        read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                else np.lib.format.read_array_header_2_0)
        out[info.filename[:-len(".npy")]] = tuple(int(d) for d in read(f)[0])
  return out


HEAD_MODES = ("extend", "replace", "keep")


def _check_shapes(where: str, path: str, found: dict, wanted: dict, head: str) -> None:
  """The shape rules of `load_npz` (ConfigError on the first violation): every parameter
  of the model present; the position embedding of another grid resized (same width, square
  grids); the head of another class count adapted unless `head = "keep"`; every other shape
  equal."""
  if head not in HEAD_MODES:
    raise ConfigError(f"init.head: unknown mode {head!r} (expected {', '.join(HEAD_MODES)})")
  missing = [n for n in wanted if n not in found]
  if missing:
    hint = ("pass the model's variables['params'], not the variables dict"
            if any(n.startswith("params/") for n in wanted)
            else "is it a checkpoint of this architecture?")
    raise ConfigError(f"{where}{path} lacks {len(missing)} parameter(s) of the model, e.g. "
                      f"{missing[0]!r} ({hint})")
  for name, shape in wanted.items():
    got = found[name]
    if got == shape:
      continue
    if name == "Transformer/posembed_input/pos_embedding" and got[-1:] == shape[-1:]:
      n_cls = int("cls" in wanted)
      if all(math.isqrt(n - n_cls) ** 2 == n - n_cls for n in (got[1], shape[1])):
        continue  # resized
    if name.startswith("head/") and head != "keep" and got[:-1] == shape[:-1]:
      if head == "extend" and got[-1] > shape[-1]:
        raise ConfigError(f"init.head: the checkpoint head has {got[-1]} classes, more than "
                          f"model.num_classes = {shape[-1]}; use init.head='replace'")
      continue  # adapted
    raise ConfigError(f"{where}{path}: {name} has shape {got} but the model expects {shape}"
                      + _width_hint(name, got, shape))


def _width_hint(name: str, got: tuple, shape: tuple) -> str:
  """What the model fields would have to be when the checkpoint is of another size."""
  if name.endswith("encoder_norm/bias") and got != shape:
    return (f" (a checkpoint of width {got[0]}: set model.variant, or model.width, to the "
            f"model it was trained as; python -m kswap_jax.convert prints them)")
  return ""


def check_npz(path: str, abstract_params: dict, *, head: str = "extend",
              field: str | None = None) -> None:
  """The structure and shape checks of `load_npz`, from the file's array headers only:
  what a dry run can know of a checkpoint without loading it.

  Raises:
    ConfigError: as `load_npz` would, naming `field` (when given), the path and the first
      parameter that does not fit.
  """
  where = f"{field}: " if field else ""
  if not os.path.isfile(path):
    what = "is a folder" if os.path.isdir(path) else "does not exist"
    raise ConfigError(f"{where}{path!r} {what} (expected a vit_jax .npz file)")
  problem = npz_problem(path)
  if problem:
    raise ConfigError(f"{where}{path!r} {problem}")
  try:
    found = npz_shapes(path)
  except Exception as e:  # noqa: BLE001 - any unreadable file (zlib.error...) is a user error
    raise ConfigError(f"{where}cannot read {path!r} as .npz ({e})") from None
  _check_shapes(where, path, found, {n: tuple(x.shape) for n, x in
                                     lora_lib.named_leaves(abstract_params)}, head)


def head_rows(path: str) -> int | None:
  """The number of classes of the `head/kernel` in a vit_jax `.npz` (None without one),
  from its array header."""
  shape = npz_shapes(path).get("head/kernel")
  return None if shape is None else int(shape[-1])


def load_npz(path: str, abstract_params: dict, *, head: str = "extend",
             rng: jax.Array | None = None, field: str | None = None) -> dict:
  """Loads base parameters from a vit_jax `.npz`, adapting head and resolution.

  Args:
    path: the `.npz` file.
    abstract_params: the model's params (or `jax.eval_shape` of them) to fill.
    head: what to do when the checkpoint head has a different number of classes:
      "extend": keep the checkpoint rows as rows 0..k-1 and fill the rest with
        xavier-uniform computed on the new rows' own (width, n − k) slice, bias 0
        (Knowledge Swapping); "replace": a zero head (vit_jax fine-tuning);
      "keep": the head must match exactly.
    rng: PRNG key for the "extend" rows.
    field: config field that errors name before the path (e.g. "init.checkpoint"); by
      default they start with the path.

  Returns:
    A params tree with the structure and shapes of `abstract_params`.

  Raises:
    ConfigError: missing file, missing parameters, or shapes that do not fit.
  """
  check_npz(path, abstract_params, head=head, field=field)  # the arrays' headers
  where = f"{field}: " if field else ""
  try:
    with np.load(path, allow_pickle=False) as f:
      flat = {k: f[k] for k in f.files}
  except Exception as e:  # noqa: BLE001 - any unreadable file is a user error here
    raise ConfigError(f"{where}cannot read {path!r} as .npz ({e})") from None
  shapes = {n: tuple(x.shape) for n, x in lora_lib.named_leaves(abstract_params)}
  extra = sorted(set(flat) - set(shapes))
  if extra:
    log.warning("%s: ignoring %d checkpoint parameter(s) the model does not have, e.g. %s",
                path, len(extra), extra[0])
  out = {}
  for name, shape in shapes.items():  # every difference left is one `_check_shapes` allows
    x = flat[name]
    if name == "Transformer/posembed_input/pos_embedding" and x.shape != shape:
      x = _resize_posemb(x, shape, has_cls="cls" in shapes)
    elif name.startswith("head/") and x.shape != shape:
      x = _adapt_head(name, x, shape, head, flat["head/kernel"].shape, rng)
    out[name] = x.astype(np.float32)
  return unflatten(out)


def _adapt_head(name, x, shape, mode, ckpt_kernel_shape, rng):
  """A head of another class count under `mode` "replace" or "extend" (k <= rows)."""
  k = x.shape[-1]
  if mode == "replace":
    return np.zeros(shape, np.float32)
  new = np.zeros(shape, np.float32)
  new[..., :k] = x
  if name.endswith("kernel"):
    if rng is None:
      raise ValueError("load_npz(head='extend') needs an rng for the new head rows")
    width, n_new = ckpt_kernel_shape[0], shape[-1] - k
    # torch's xavier_uniform_(w[k:, :]) on the new rows: fan_in = width, fan_out = n − k
    # (0.083141 for ViT-B/16's 100 new rows).
    bound = math.sqrt(6.0 / (width + n_new))
    new[:, k:] = np.asarray(jax.random.uniform(rng, (width, n_new), jnp.float32, -bound, bound))
  return new


def export_merged(base: dict, lora: dict | None, scale: float, path: str) -> None:
  """Writes base + s·a·b (LoRA folded into the kernels) as a vit_jax `.npz`."""
  params = lora_lib.merge(base, lora, scale) if lora else base
  save_npz(jax.device_get(params), path)
