r"""Measures the speed of one training step and of the input pipeline; asserts nothing.

    python -m kswap_jax.bench                          # KS forget step, ViT-B/16, batch fitted to the machine
    python -m kswap_jax.bench --step=learn --batch_size=4 --json=/tmp/learn.json
    python -m kswap_jax.bench --variant=S/16 --dtype=bfloat16 --remat     # accelerator options
    python -m kswap_jax.bench --compare_torch          # the same step in plain PyTorch, alternating
    python -m kswap_jax.bench --pipeline_only

A step is one optimizer step of the named method on a frozen ViT with LoRA (rank 8 on the
FFN layers, as Knowledge Swapping) and a random, non-zero head, so every LoRA factor gets a
gradient and AdamW moves it:

    forget  L = CE(b_r) + β·ReLU(BND − CE(b_f)) + α·Ω     (two forward/backward passes, the default)
    learn   L = CE(b_n) + β·CE(b_r) + α·Ω                   (two passes)
    ce      L = CE(b)                                      (one pass)

`--batch_size` is per stream, so forget/learn steps see 2 × batch images. Figures: compile
time, median and range of the step time over `--steps` timed steps after `--warmup` untimed
ones, images/s, XLA's FLOP count of the compiled step (`cost_analysis`), the achieved FLOP/s
and its fraction of a square matmul's rate measured in the same process (`matmul_peak_fraction`),
the time the step's FLOPs would take at that matmul rate (`matmul_floor_s`, a lower bound for
the step on this machine), peak memory (host RSS and minor page faults on CPU, device memory
statistics on accelerators) and the input pipeline's images/s. `--json PATH` writes them all.
The step runs sharded over every device (`--batch_size` is the global batch): FLOPs are the
whole step's, and the peak is one device's times the number of accelerators (simulated CPU
devices share the host's cores: one device's peak).

Model options are the `model` config fields of `kswap_jax.models.vit` (`--gelu`,
`--dropout_mask`, `--dropout_rng`, `--dtype`, `--remat`, `--scan`), so each speed option can
be measured against its reference path; docs/speed.md records the figures.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import glob
import io
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from typing import Any, Callable

import jax
import ml_collections
import numpy as np

from kswap_jax import errors, hostmem, lora, losses, train
from kswap_jax.errors import ConfigError
from kswap_jax.methods import common, knowledge_swap
from kswap_jax.models import vit

NUM_CLASSES = 200
# Knowledge Swapping's loss weights and AdamW (the method's defaults, methods/knowledge_swap.py).
KS = dict(beta=0.2, bound=105.0)
ALPHA = 0.005
OPTIM = dict(lr=1e-2, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.05, min_lr=1e-5)
# GS-LoRA's continual CASIA scripts (methods/gs_lora.py defaults).
GS_LORA = dict(beta=0.2, bound=105.0, alpha=1e-4)


class NotAvailable(Exception):
  """A step whose method does not exist in the package."""


# ----------------------------------------------------------------------------------------------
# Steps by name: name -> (builder, stream names). A builder(model, scale) returns either the
# loss function `loss_fn(lora_tree, base, batch, rng) -> (loss, aux)` of
# `train.make_train_step` (AdamW, injectable learning rate) or a `Bench` with the method's
# own optimizer, host hyper-parameters and static `tx.update` keywords.

@dataclasses.dataclass
class Bench:
  loss_fn: Callable
  tx: Any = None                      # None: AdamW with OPTIM
  hparams: dict | None = None         # host hyper-parameters of the step (None: the LR)
  update_kwargs: dict | None = None   # e.g. the fast/slow phase
  mask_fraction: float | None = None  # install a random saliency mask keeping this share


def _ks_step(kind: str):
  def build(model, scale):
    config = ml_collections.ConfigDict({"ks": KS, "group_lasso": {"grouping": "block"}})
    return knowledge_swap.LOSSES[kind](model, scale, config, ALPHA)
  return build


def _ce_step(model, scale):
  def loss_fn(params, base, batch, rng):
    b = batch["retain"]
    logits = lora.apply(model, base, params, b["image"], scale=scale, train=True,
                        rngs={"dropout": rng})
    return losses.cross_entropy(logits, b["label"], b["mask"]), {}
  return loss_fn


def _gs_lora_step(proximal: bool):
  """GS-LoRA's task step (retain CE + β·bounded forget CE + α·Ω, or the proximal group
  lasso after AdamW), with the continual CASIA scripts' β, BND and α."""
  def build(model, scale):
    from kswap_jax.methods import gs_lora  # pylint: disable=import-outside-toplevel
    loss = gs_lora.make_loss(model, scale, "block", bound=GS_LORA["bound"],
                             penalty=not proximal, prototype=None)
    hp = {"beta": GS_LORA["beta"], "alpha": GS_LORA["alpha"]}
    wrapped = lambda p, base, batch, rng: loss(p, {"base": base}, batch, rng, hp)
    if not proximal:
      return wrapped
    tx = gs_lora.make_optimizer(ml_collections.ConfigDict(OPTIM), proximal=True,
                                grouping="block")
    return Bench(wrapped, tx=tx, hparams={"learning_rate": OPTIM["lr"],
                                          "alpha": GS_LORA["alpha"]})
  return build


def _ug_clu_step(phase: str):
  """One phase of SFR-on / UG-CLU's fast-slow update on the LoRA tree: FAST = masked
  adaptive ascent on a forget batch, SLOW = CE descent on a retain batch, SGD as SFR-on,
  with a random mask keeping half of the entries (the mask's cost does not depend on it)."""
  def build(model, scale):
    from kswap_jax.optim import fast_slow  # pylint: disable=import-outside-toplevel
    tx = fast_slow.fast_slow(0.01, 1500, forget_alpha=25.0)
    name = "forget" if phase == "fast" else "retain"

    def loss_fn(params, base, batch, rng):
      b = batch[name]
      logits = lora.apply(model, base, params, b["image"], scale=scale, train=True,
                          rngs={"dropout": rng})
      if phase == "fast":
        return losses.adaptive_ascent_loss(logits, b["label"], b["mask"], lambd=0.5), {}
      return losses.cross_entropy(logits, b["label"], b["mask"]), {}
    return Bench(loss_fn, tx=tx, hparams={},
                 update_kwargs={"phase": fast_slow.FAST if phase == "fast" else fast_slow.SLOW},
                 mask_fraction=0.5)
  return build


STEPS: dict[str, tuple[Callable, tuple[str, ...]]] = {
    "forget": (_ks_step("forget"), ("forget", "retain")),
    "learn": (_ks_step("learn"), ("learn", "retain")),
    "ce": (_ce_step, ("retain",)),
    "gs_lora": (_gs_lora_step(proximal=False), ("retain", "forget")),
    "gs_lora_prox": (_gs_lora_step(proximal=True), ("retain", "forget")),
    "ug_clu_fast": (_ug_clu_step("fast"), ("forget",)),
    "ug_clu_slow": (_ug_clu_step("slow"), ("retain",)),
}


# ----------------------------------------------------------------------------------------------
# Machine figures.

def on_cpu() -> bool:
  return jax.devices()[0].platform == "cpu"


def default_batch_size() -> int:
  """Per-stream batch that fits the machine: 8 on a CPU with ≥ 16 GB (ViT-B/16 forget
  step ≈ 7 GB before the speed options), fewer below; 64 per device on accelerators."""
  if not on_cpu():
    return 64 * jax.device_count()
  try:
    import psutil  # pylint: disable=import-outside-toplevel
    gb = psutil.virtual_memory().total / 2**30
  except ImportError:
    gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
  return int(max(1, min(8, gb // 2)))


def matmul_peak(dtype: str = "float32", size: int | None = None, reps: int = 5) -> dict:
  """The best FLOP/s of a square jnp matmul (n³·2 FLOPs) over `reps` timed runs."""
  n = size or (2048 if on_cpu() else 8192)
  k1, k2 = jax.random.split(jax.random.key(0))
  a = jax.random.normal(k1, (n, n), dtype)
  b = jax.random.normal(k2, (n, n), dtype)
  f = jax.jit(lambda a, b: a @ b)
  f(a, b).block_until_ready()
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    f(a, b).block_until_ready()
    times.append(time.perf_counter() - t0)
  return {"n": n, "dtype": dtype, "flops_per_s": 2 * n ** 3 / min(times),
          "median_flops_per_s": 2 * n ** 3 / statistics.median(times)}


def _peak_devices() -> int:
  """The devices whose matmul peaks add up: every accelerator; simulated CPU devices share
  the host's cores, which one device's matmul already uses."""
  return 1 if on_cpu() else jax.device_count()


def device_memory() -> dict | None:
  stats = jax.devices()[0].memory_stats()
  if not stats:
    return None
  return {k: stats[k] for k in ("peak_bytes_in_use", "bytes_in_use", "bytes_limit") if k in stats}


def _cost(compiled) -> dict:
  """XLA's cost analysis of the whole step. For a program partitioned over the mesh (every
  device of the process: `train.make_mesh`) XLA counts one device's share, so the figures
  are that share times the number of devices (measured: 170, 85, 42.5 and 21.3 GFLOP on 1,
  2, 4 and 8 simulated devices for the same global batch)."""
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older jax: one dict per computation
    cost = cost[0] if cost else {}
  return {k: float(v) * jax.device_count() for k, v in (cost or {}).items()
          if k in ("flops", "bytes accessed", "transcendentals")}


# ----------------------------------------------------------------------------------------------
# The step.

def model_config(args) -> ml_collections.ConfigDict:
  cfg = ml_collections.ConfigDict(vit.DEFAULTS)
  cfg.update(variant=args.variant, depth=args.depth, num_classes=NUM_CLASSES,
             image_size=args.image_size,
             dropout=args.dropout, gelu=args.gelu, attention=args.attention,
             dropout_mask=args.dropout_mask,
             dropout_rng=args.dropout_rng, dropout_bits=args.dropout_bits, dtype=args.dtype,
             remat=args.remat,
             remat_policy=args.remat_policy, scan=args.scan)
  return cfg


def setup(args) -> dict[str, Any]:
  """Model, frozen base (random non-zero head), LoRA tree, optimizer, batch, jitted step."""
  builder, stream_names = STEPS[args.step]
  model_cfg = model_config(args)
  model = vit.build(model_cfg)
  k_base, k_head, k_lora = jax.random.split(jax.random.key(args.seed), 3)
  # With --scan, `vit.build` wraps the scanned model in `CheckpointLayout`: the trainable
  # LoRA tree stays in the checkpoint layout (the group lasso's block groups need it) and is
  # stacked inside the step; the frozen base is stacked once, up front, in `bench_step`.
  base = vit.init_params(model, model_cfg, k_base)
  # vit.py zero-initialises the head (fine-tuning convention); a zero head makes every LoRA
  # gradient exactly 0, so the benchmark uses a random one like a trained model's.
  head = base["head"]["kernel"]
  base["head"]["kernel"] = jax.nn.initializers.xavier_uniform()(k_head, head.shape, head.dtype)
  spec = lora.LoraSpec(rank=args.rank)
  tree = lora.init(base, spec, k_lora)
  built = builder(model, spec.scale)
  if not isinstance(built, Bench):
    built = Bench(built)
  loss_fn = built.loss_fn
  tx = built.tx or common.adamw(ml_collections.ConfigDict(OPTIM))
  hp = {"learning_rate": OPTIM["lr"]} if built.hparams is None else dict(built.hparams)
  mesh = train.make_mesh()
  step = train.make_train_step(loss_fn, tx, mesh, update_kwargs=built.update_kwargs)
  opt_state = tx.init(tree)
  if built.mask_fraction is not None:
    from kswap_jax.optim import fast_slow  # pylint: disable=import-outside-toplevel
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    keys = jax.random.split(jax.random.fold_in(k_lora, 1), len(leaves))
    mask = treedef.unflatten([jax.random.bernoulli(k, built.mask_fraction, x.shape)
                              for k, x in zip(keys, leaves)])
    opt_state = fast_slow.set_mask(opt_state, mask)
  rng = np.random.default_rng(args.seed)
  b = args.batch_size
  shape = (b, args.image_size, args.image_size, 3)
  mk = lambda: {"image": rng.normal(size=shape).astype(np.float32),
                "label": rng.integers(0, NUM_CLASSES, b).astype(np.int32),
                "mask": np.ones(b, np.float32)}
  host_batch = {name: mk() for name in stream_names}
  batch = train.to_global(host_batch, mesh)
  return dict(model=model, model_cfg=model_cfg, base=base, tree=tree, spec=spec, tx=tx,
              opt_state=opt_state, hp=hp, mesh=mesh, step=step, batch=batch, host_batch=host_batch,
              images=b * len(stream_names), loss_fn=loss_fn, lora_tree_unscanned=tree)


def _state(s: dict, seed: int) -> train.TrainState:
  return train.create_state(s["tree"], s["tx"], seed)._replace(opt_state=s["opt_state"])


def _summary(xs: list[float]) -> dict:
  return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "all": xs}


def _frozen(s: dict, args, mesh):
  """The frozen base on the mesh, stacked for `--scan`. It is never donated, so it goes
  there without a second copy (`train.replicate` copies, for donated state)."""
  return jax.device_put(vit.scan_params(s["base"]) if args.scan else s["base"],
                        jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()),
                        may_alias=True)


def compiler_options(args) -> dict | None:
  """XLA options of the benchmarked step (`train.compiler_options`): on CPU the scheduler
  named by `--cpu_scheduler`, "memory" by default like a run's train step."""
  return train.compiler_options(jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",)),
                                args.cpu_scheduler)


def bench_step(args, s: dict | None = None,
               timed_other: Callable[[], tuple[float, float]] | None = None) -> dict:
  """Compiles and times the step of `setup(args)`.

  With `timed_other` (a function running one PyTorch step and returning its wall and CPU
  seconds) the two alternate in blocks of `args.block` steps, first ours, then theirs, until
  each has `args.steps` timed steps; the first step of every block is run but not timed.
  Blocks keep both frameworks in the steady state of a training loop, where steps follow
  each other without a gap, while a changing machine load still hits both alike. (A step
  that follows seconds of idleness is not representative: XLA:CPU's next step then spends
  seconds more in the kernel re-faulting its freed buffers, see docs/speed.md.)"""
  s = s or setup(args)
  mesh = s["mesh"]
  state = train.replicate(_state(s, args.seed), mesh)
  frozen = _frozen(s, args, mesh)
  hp = s["hp"]
  # The compiled initialisers (B/16: ~0.15 GB) are not needed by the steps: drop them, as a
  # training process that has loaded its weights would not hold them either.
  jax.clear_caches()
  t0 = time.perf_counter()
  lowered = s["step"].lower(state, frozen, s["batch"], hp)
  compiled = lowered.compile(compiler_options=compiler_options(args))
  compile_s = time.perf_counter() - t0
  hostmem.release_free_memory()  # the compiler's freed heap, before the peak is measured
  cost = _cost(compiled)
  for _ in range(args.warmup):
    state, m = compiled(state, frozen, s["batch"], hp)
    jax.block_until_ready(m)
  # Peak memory of the steps themselves (weights, optimizer state, batch and the step's
  # buffers), not of the compilation before them.
  hostmem.reset_peak_rss()
  faults0 = hostmem.minor_faults()
  times, cpu, system, other, other_cpu = [], [], [], [], []
  block = args.block if timed_other is not None else 1
  while len(times) < args.steps:
    for i in range(block):
      c0, k0 = hostmem.cpu_seconds(), hostmem.system_seconds()
      t0 = time.perf_counter()
      state, m = compiled(state, frozen, s["batch"], hp)
      jax.block_until_ready(m)
      if (i > 0 or block == 1) and len(times) < args.steps:
        times.append(time.perf_counter() - t0)
        cpu.append(hostmem.cpu_seconds() - c0)
        system.append(hostmem.system_seconds() - k0)
    for i in range(block if timed_other is not None else 0):
      wall, cpu_s = timed_other()
      if i > 0 and len(other) < args.steps:
        other.append(wall)
        other_cpu.append(cpu_s)
  peak_rss, faults = hostmem.peak_rss_bytes(), hostmem.minor_faults() - faults0
  m = jax.device_get(m)
  med = statistics.median(times)
  out = {
      "step": args.step,
      "model": {k: v for k, v in s["model_cfg"].to_dict().items()},
      "batch_size_per_stream": args.batch_size,
      "images_per_step": s["images"],
      "lora_rank": args.rank,
      "trainable_parameters": lora.count(s["tree"]),
      "compile_s": compile_s,
      "cpu_scheduler": args.cpu_scheduler,
      "step_s": _summary(times),
      # CPU seconds (user + system, all threads) per step: on a shared machine this moves
      # far less than the wall time when other processes compete for the cores.
      "step_cpu_s": _summary(cpu),
      # The kernel's share of it: page zeroing for freshly mapped buffers (docs/speed.md,
      # "Host memory"), which `hostmem`'s `retain` mode removes.
      "step_system_cpu_s": _summary(system),
      "images_per_s": s["images"] / med,
      "flops_per_step": cost.get("flops"),
      "bytes_accessed_per_step": cost.get("bytes accessed"),
      "achieved_flops_per_s": cost["flops"] / med if cost.get("flops") else None,
      "last_loss": float(m["loss"]),
      "last_grad_norm": float(m["grad_norm"]),
      "memory": {"host_peak_rss_bytes": peak_rss,
                 "minor_faults_per_step": faults / args.steps,
                 "device": None if on_cpu() else device_memory()},
  }
  if other:
    out["other_step_s"], out["other_cpu_s"] = other, other_cpu
  if args.profile:
    # `state` was donated to the last step: profile one more from its output.
    out["profile"] = profile_step(compiled, (state, frozen, s["batch"], hp), args.profile)
  return out


_INSTRUCTION = re.compile(
    r"^\s+%?([\w.\-]+) = \S+ ([\w\-]+)\((.*)$", re.M)
_COMPUTATION = re.compile(r"^%?([\w.\-]+) [^\n]*\{\n(.*?)\n\}", re.M | re.S)


def _hlo_ops(hlo: str) -> dict[str, tuple[str, str]]:
  """{instruction name: (kind, jax op name)} for the instructions of an optimised HLO text;
  kind is "matmul" (a dot or convolution, alone or in a fusion), "transpose/copy" or
  "elementwise/other"."""
  bodies = {m.group(1): m.group(2) for m in _COMPUTATION.finditer(hlo)}
  ops = {}
  for m in _INSTRUCTION.finditer(hlo):
    name, opcode, rest = m.groups()
    called = re.search(r"calls=%?([\w.\-]+)", rest)
    body = bodies.get(called.group(1), "") if called else ""
    text = f" {opcode}(" + body
    if any(f" {k}(" in text for k in ("dot", "convolution")):
      kind = "matmul"
    elif opcode in ("copy", "transpose") or (opcode == "fusion" and re.search(
        r"ROOT[^\n]*= \S+ (copy|transpose|bitcast)\(", body) and " transpose(" in body):
      kind = "transpose/copy"
    else:
      kind = "elementwise/other"
    op_name = re.search(r'op_name="([^"]*)"', rest)
    ops[name] = (kind, op_name.group(1) if op_name else "")
  return ops


def profile_step(compiled, args_: tuple, directory: str, top: int = 15) -> dict:
  """Traces one step of `compiled(*args_)` with `jax.profiler` into `directory` (readable
  by TensorBoard / XProf) and sums the time of every HLO instruction in the trace.

  On CPU the per-instruction events need `--xla_cpu_enable_xprof_traceme=true` in
  XLA_FLAGS before jax starts (`main` sets it for `--profile`). Instructions that run
  concurrently on different threads are each counted in full, so the sum can exceed the
  step's wall time.

  Returns:
    {"wall_s", "by_kind": {kind: seconds}, "top": [{"name", "kind", "op", "s"}, ...]}.
  """
  ops = _hlo_ops(compiled.as_text())
  t0 = time.perf_counter()
  with jax.profiler.trace(directory):
    jax.block_until_ready(compiled(*args_))
  wall = time.perf_counter() - t0
  traces = sorted(glob.glob(os.path.join(directory, "**", "*.xplane.pb"), recursive=True),
                  key=os.path.getmtime)
  data = jax.profiler.ProfileData.from_file(traces[-1])
  seconds: dict[str, float] = collections.Counter()
  for plane in data.planes:
    for line in plane.lines:
      for event in line.events:
        if event.name in ops:
          seconds[event.name] += event.duration_ns / 1e9
  by_kind: dict[str, float] = collections.Counter()
  for name, sec in seconds.items():
    by_kind[ops[name][0]] += sec
  return {"wall_s": wall, "trace": traces[-1], "by_kind": dict(by_kind),
          "top": [{"name": n, "kind": ops[n][0], "op": ops[n][1], "s": sec}
                  for n, sec in seconds.most_common(top)]}


def bench_compare(args) -> dict:
  """Interleaved A/B: every variant compiled in this process, then one step of each in
  turn, `--steps` rounds, so a shared machine's changing load hits all variants alike.

  `--compare "before=--dropout_mask=flax;after="` gives each variant's
  flags on top of the command line's. Host memory is per process, so it is not split
  per variant here (run the variants alone for that).
  """
  variants = []
  for name, flags, vargs in args.variants:
    vargs.batch_size = vargs.batch_size or args.batch_size
    s = setup(vargs)
    mesh = s["mesh"]
    state = train.replicate(_state(s, args.seed), mesh)
    frozen = _frozen(s, vargs, mesh)
    hp = s["hp"]
    t0 = time.perf_counter()
    compiled = s["step"].lower(state, frozen, s["batch"], hp).compile(
        compiler_options=compiler_options(vargs))
    compile_s = time.perf_counter() - t0
    for _ in range(args.warmup):
      state, m = compiled(state, frozen, s["batch"], hp)
      jax.block_until_ready(m)
    variants.append(dict(name=name, flags=flags, compiled=compiled,
                         state=state, frozen=frozen, batch=s["batch"], hp=hp,
                         compile_s=compile_s, flops=_cost(compiled).get("flops"),
                         images=s["images"], wall=[], cpu=[]))
  for _ in range(args.steps):
    for v in variants:
      c0 = hostmem.cpu_seconds()
      t0 = time.perf_counter()
      v["state"], m = v["compiled"](v["state"], v["frozen"], v["batch"], v["hp"])
      jax.block_until_ready(m)
      v["wall"].append(time.perf_counter() - t0)
      v["cpu"].append(hostmem.cpu_seconds() - c0)
  out = []
  for v in variants:
    out.append({"name": v["name"], "flags": v["flags"], "compile_s": v["compile_s"],
                "flops_per_step": v["flops"], "images_per_step": v["images"],
                "step_s": _summary(v["wall"]), "step_cpu_s": _summary(v["cpu"])})
  return {"variants": out}


def report_compare(res: dict) -> None:
  rows = res["compare"]["variants"]
  base = rows[0]
  print(f"interleaved A/B, {len(base['step_s']['all'])} rounds "
        f"(ratios against '{base['name']}'):")
  for r in rows:
    w, c = r["step_s"], r["step_cpu_s"]
    print(f"  {r['name']:>14s}: wall median {w['median']:.3f} s (min {w['min']:.3f}, max "
          f"{w['max']:.3f}) x{w['median'] / base['step_s']['median']:.2f} | CPU median "
          f"{c['median']:.3f} s (min {c['min']:.3f}) x{c['median'] / base['step_cpu_s']['median']:.2f}"
          f" | {r['flops_per_step'] / 1e9:.1f} GFLOP  [{r['flags'] or 'defaults'}]")


# ----------------------------------------------------------------------------------------------
# Input pipeline.

JPEG_IMAGES, JPEG_SIZE = 256, (500, 375)  # ImageNet's typical photo size (width, height)


def _jpeg_dataset(folder: str) -> Any:
  """A tfds array_record dataset of `JPEG_IMAGES` JPEGs written into `folder` (smooth
  colour fields plus noise, which compress about as photos do); returns its train source."""
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  from PIL import Image  # pylint: disable=import-outside-toplevel
  from kswap_jax.data import image_folder, sources  # pylint: disable=import-outside-toplevel
  tfds.disable_progress_bar()
  rng = np.random.default_rng(0)
  w, h = JPEG_SIZE
  yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
  for i in range(JPEG_IMAGES):
    fx, fy, phase = rng.uniform(0.005, 0.05, 3) * (1, 1, 600)
    base = np.stack([np.sin(fx * xx + phase), np.cos(fy * yy - phase),
                     np.sin(fx * xx + fy * yy)], -1)
    pixels = 127.5 + 90 * base + rng.normal(0, 12, (h, w, 3))
    path = os.path.join(folder, "images", f"c{i % 10}")
    os.makedirs(path, exist_ok=True)
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(
        os.path.join(path, f"{i}.jpg"), quality=90)
  image_folder.build([os.path.join(folder, "images")], "bench_jpeg", os.path.join(folder, "tfds"))
  return sources.TfdsSource("bench_jpeg", "train", os.path.join(folder, "tfds"))


def bench_pipeline(args, n_batches: int = 20) -> dict:
  """images/s of the training stream on this host: images read, resized to the model's
  size, normalised and batched. `--pipeline_data synthetic` (default): decode-free 64 px
  arrays in memory; `jpeg`: 500 x 375 JPEGs in an array_record tfds dataset (written to a
  temporary folder first), read and decoded as a real dataset is."""
  from kswap_jax.data import sources, splits, streams  # pylint: disable=import-outside-toplevel
  with tempfile.TemporaryDirectory(prefix="kswap_bench_") as folder:
    if args.pipeline_data == "jpeg":
      src, source = _jpeg_dataset(folder), f"JPEG {JPEG_SIZE[0]}x{JPEG_SIZE[1]} array_record"
    else:
      src = sources.SyntheticSource(num_classes=10, num_examples=4000, image_size=64,
                                    channels=3, seed=0, split="train")
      source = "synthetic 64px"
    subset = splits.select(src, range(10), name="bench", label_map={c: c for c in range(10)})
    stream = streams.make_stream([subset], batch_size=args.batch_size, seed=0, cycle=True,
                                 image_size=args.image_size, channels=3, mean=0.5, std=0.5,
                                 num_threads=args.num_threads)
    it = stream.iterate(0)
    next(it)
    t0 = time.perf_counter()
    for _ in range(n_batches):
      next(it)
    dt = time.perf_counter() - t0
  return {"source": f"{source} -> {args.image_size}px", "num_threads": args.num_threads,
          "batch_size": args.batch_size, "images_per_s": n_batches * args.batch_size / dt}


# ----------------------------------------------------------------------------------------------
# Report.

def _fmt_flops(x):
  return "n/a" if x is None else f"{x / 1e9:.1f} GFLOP/s"


def report(res: dict) -> None:
  if "devices" in res:
    print(f"devices: {res['devices']}   jax {res['jax']}")
  if "host_memory" in res:
    print(res["host_memory"])
  if "matmul_peak" in res:
    mp = res["matmul_peak"]
    per = f" per device, x {_peak_devices()} devices" if _peak_devices() > 1 else ""
    print(f"matmul peak ({mp['n']}x{mp['n']} {mp['dtype']}): {_fmt_flops(mp['flops_per_s'])}"
          f"{per}")
  st = res.get("step_result")
  if st:
    mc = st["model"]
    opts = ", ".join(f"{k}={mc[k]}" for k in ("gelu", "attention", "dropout_mask", "dropout_rng",
                                              "dropout_bits", "dtype", "remat", "scan"))
    depth = f" depth {mc['depth']}" if mc["depth"] else ""
    print(f"model {mc['variant']}{depth} @ {mc['image_size']}px, dropout {mc['dropout']}, {opts}")
    if mc["variant"].startswith("test/"):
      print("  (the test ViT: its step is too small for the speed figures below to say anything "
            "about a real model; it checks the wiring)")
    print(f"step {st['step']}: batch {st['batch_size_per_stream']} per stream "
          f"({st['images_per_step']} images), LoRA r{st['lora_rank']} "
          f"({st['trainable_parameters']:,} trainable)")
    print(f"  compile: {st['compile_s']:.2f} s")
    t = st["step_s"]
    print(f"  step: median {t['median']:.3f} s (range {t['min']:.3f}-{t['max']:.3f}, "
          f"{len(t['all'])} steps)  {st['images_per_s']:.2f} images/s")
    c = st["step_cpu_s"]
    print(f"  CPU time (user+sys, all threads): median {c['median']:.3f} s/step "
          f"(range {c['min']:.3f}-{c['max']:.3f}), of which system "
          f"{st['step_system_cpu_s']['median']:.3f}")
    if st["flops_per_step"]:
      print(f"  XLA cost: {st['flops_per_step'] / 1e12:.3f} TFLOP/step -> "
            f"{_fmt_flops(st['achieved_flops_per_s'])} = "
            f"{100 * res['matmul_peak_fraction']:.1f}% of the matmul peak; "
            f"matmul floor {res['matmul_floor_s']:.3f} s/step")
    mem = st["memory"]
    print(f"  peak host RSS: {mem['host_peak_rss_bytes'] / 2**30:.2f} GiB, "
          f"minor page faults/step: {mem['minor_faults_per_step']:,.0f}")
    if mem["device"]:
      print(f"  device memory: {mem['device']}")
    print(f"  last loss {st['last_loss']:.4f}, grad norm {st['last_grad_norm']:.4g}")
    if "profile" in st:
      pr = st["profile"]
      total = sum(pr["by_kind"].values())
      print(f"  profile of one step ({pr['wall_s']:.3f} s wall; trace {pr['trace']}):")
      for kind, sec in sorted(pr["by_kind"].items(), key=lambda kv: -kv[1]):
        print(f"    {kind:18s} {sec:8.3f} s  {100 * sec / total:5.1f}%")
      for op in pr["top"]:
        print(f"    {op['s']:8.3f} s  {op['kind']:18s} {op['name']:28s} {op['op'][-80:]}")
  if "torch" in res:
    tr = res["torch"]
    print(f"torch {tr['version']} ({tr['threads']} threads, own process), same step, "
          f"alternating: median {tr['step_s']['median']:.3f} s (range "
          f"{tr['step_s']['min']:.3f}-{tr['step_s']['max']:.3f}); peak RSS "
          f"{tr['peak_rss_bytes'] / 2**30:.2f} GiB")
    print(f"  CPU time (user+sys, all threads): median {tr['step_cpu_s']['median']:.3f} s/step")
    print(f"  jax/torch step-time ratio: {tr['jax_over_torch']:.2f} "
          f"({'jax faster' if tr['jax_over_torch'] < 1 else 'torch faster'}); CPU-time ratio "
          f"{tr['jax_over_torch_cpu']:.2f} (the figure to read on a shared machine); "
          f"peak-RSS ratio {tr['jax_over_torch_peak_rss']:.2f}")
  if "pipeline" in res:
    p = res["pipeline"]
    line = f"input pipeline ({p['source']}, {p['num_threads']} threads): {p['images_per_s']:.0f} images/s"
    if st:
      line += f"  (the step consumes {st['images_per_s']:.2f})"
    print(line)


def parse_args(argv=None):
  p = errors.ArgumentParser(prog="python -m kswap_jax.bench",
                            description=__doc__.splitlines()[0],
                            formatter_class=argparse.RawDescriptionHelpFormatter,
                            epilog=__doc__.split("\n", 2)[2])
  p.add_argument("--variant", default="B/16", help="ViT variant '<name>/<patch>' (vit.VARIANTS)")
  p.add_argument("--depth", type=int, default=0,
                 help="number of encoder blocks; 0 = the variant's (a shallower model of the "
                      "same width compiles and runs faster for A/B comparisons)")
  p.add_argument("--image_size", type=int, default=224)
  p.add_argument("--step", default="forget", choices=sorted(STEPS))
  p.add_argument("--batch_size", type=int, default=0,
                 help="per stream; 0 = fitted to the machine (8 on a CPU with >= 16 GB)")
  p.add_argument("--rank", type=int, default=8)
  p.add_argument("--steps", type=int, default=5, help="timed steps (after the warm-up)")
  p.add_argument("--warmup", type=int, default=1, help="untimed steps after compilation")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--dropout", type=float, default=0.1)
  p.add_argument("--gelu", default="erf", choices=vit.GELUS)
  p.add_argument("--attention", default=vit.DEFAULTS["attention"], choices=vit.ATTENTIONS)
  p.add_argument("--dropout_mask", default="compact", choices=vit.DROPOUT_MASKS)
  p.add_argument("--dropout_rng", default="threefry", choices=vit.DROPOUT_RNGS)
  p.add_argument("--dropout_bits", type=int, default=32, choices=vit.DROPOUT_BITS)
  p.add_argument("--dtype", default="float32", choices=vit.DTYPES)
  p.add_argument("--remat", action="store_true")
  p.add_argument("--remat_policy", default="nothing_saveable")
  p.add_argument("--scan", action="store_true")
  p.add_argument("--cpu_scheduler", default="memory", choices=sorted(train.CPU_SCHEDULERS),
                 help="XLA:CPU's instruction scheduler (memory: the train step's default, "
                      "keeps fewer buffers alive)")
  p.add_argument("--num_threads", type=int, default=0, help="input pipeline threads")
  p.add_argument("--pipeline_only", action="store_true")
  p.add_argument("--pipeline_data", default="synthetic", choices=("synthetic", "jpeg"),
                 help="input pipeline data: in-memory arrays, or JPEGs in an array_record "
                      "tfds dataset (decoded as a real dataset is)")
  p.add_argument("--no_pipeline", action="store_true")
  p.add_argument("--compare_torch", action="store_true",
                 help="time the same step in plain PyTorch, in its own process, alternating in "
                      "blocks (needs the [torch] extra)")
  p.add_argument("--block", type=int, default=3,
                 help="--compare_torch: steps per framework per turn (>= 2; the first of each "
                      "turn is not timed)")
  p.add_argument("--compare", default="",
                 help="interleaved A/B in one process: 'name=flags;name=flags' (each "
                      "variant's flags on top of the others given)")
  p.add_argument("--json", default="", help="write the figures to this path")
  p.add_argument("--profile", default="",
                 help="trace one more step with jax.profiler into this folder and print "
                      "where its time went, per HLO instruction")
  args = p.parse_args(argv)
  if args.block < 2:
    p.error(f"--block: expected an int >= 2 (the first step of each turn is not timed), "
            f"got {args.block}")
  for flag, least in (("batch_size", 0), ("rank", 1), ("steps", 1), ("warmup", 0),
                      ("depth", 0), ("image_size", 1), ("num_threads", 0)):
    if getattr(args, flag) < least:
      p.error(f"--{flag}: expected an int >= {least}, got {getattr(args, flag)}")
  if not 0 <= args.dropout < 1:
    p.error(f"--dropout: expected a rate in [0, 1), got {args.dropout}")
  if args.pipeline_only and args.no_pipeline:
    p.error("--pipeline_only with --no_pipeline leaves nothing to measure; pass one")
  # Output paths are checked now, not after minutes of benchmarking.
  for flag, path, kind in (("--json", args.json, "file"), ("--profile", args.profile, "folder")):
    if path:
      problem = _unwritable(path, kind)
      if problem:
        p.error(f"{flag} {path}: {problem}")
  args.argv = _without(list(sys.argv[1:] if argv is None else argv), ("--compare", "--json"))
  args.variants = _compare_variants(p, args) if args.compare else []
  return args


def _compare_variants(p: argparse.ArgumentParser, args) -> list[tuple[str, str, Any]]:
  """[(name, flags, parsed args)] of `--compare 'name=flags;name=flags'`: two or more named
  variants, names distinct, each variant's flags valid on top of the command line's
  (checked now, before any compile)."""
  items = [x.strip() for x in args.compare.split(";") if x.strip()]
  variants: list[tuple[str, str, Any]] = []
  for item in items:
    name, eq, flags = (x.strip() for x in item.partition("="))
    if not eq or not name:
      p.error(f"--compare: {item!r} is not NAME=FLAGS (e.g. 'before=--dropout_mask=flax;"
              f"after=')")
    if name in [v[0] for v in variants]:
      p.error(f"--compare: variant name {name!r} given twice")
    if "--compare" in flags or "--json" in flags:
      p.error(f"--compare: variant {name!r}: its flags cannot hold --compare or --json")
    said = io.StringIO()
    try:
      with contextlib.redirect_stderr(said):
        variants.append((name, flags, parse_args(args.argv + flags.split())))
    except SystemExit:
      why = said.getvalue().strip().splitlines()[-1:] or ["refused"]
      why = why[0].removeprefix("error: ").removesuffix(" (see --help)")
      p.error(f"--compare: variant {name!r}: {why}")
  if len(items) < 2:
    p.error(f"--compare: expected two or more variants 'NAME=FLAGS;NAME=FLAGS', got "
            f"{len(items)}")
  return variants


def _unwritable(path: str, kind: str) -> str:
  """Why `path` (a file or a folder to write) cannot be written, or ""."""
  path = os.path.abspath(path)
  if kind == "file" and os.path.isdir(path):
    return "is a folder; expected a file path"
  if kind == "folder" and os.path.exists(path) and not os.path.isdir(path):
    return "is a file; expected a folder"
  parent = os.path.dirname(path)
  while not os.path.exists(parent):  # the nearest existing ancestor must be a writable folder
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent):
    return f"{parent} is a file, not a folder"
  if not os.access(parent, os.W_OK):
    return f"{parent} is not writable"
  return ""


def _without(argv: list[str], flags: tuple[str, ...]) -> list[str]:
  """argv minus the given flags and their values ("--f=v" or "--f v")."""
  out, skip = [], False
  for a in argv:
    if skip:
      skip = False
    elif a in flags:
      skip = True
    elif not a.startswith(tuple(f + "=" for f in flags)):
      out.append(a)
  return out


def main(argv=None) -> int:
  args = parse_args(argv)
  try:
    return _main(args, argv)
  except ConfigError as e:  # a model option the model refuses (variant, depth, image size)
    print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
    return 2


def _main(args, argv) -> int:
  if args.profile and "xla_cpu_enable_xprof_traceme" not in os.environ.get("XLA_FLAGS", ""):
    # Per-instruction trace events on CPU; read when the backend starts (below).
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_cpu_enable_xprof_traceme=true").strip()
  if not args.batch_size:
    args.batch_size = default_batch_size()
  res: dict[str, Any] = {
      "command": " ".join(["python -m kswap_jax.bench"] + list(sys.argv[1:] if argv is None
                                                                 else argv)),
      "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
      "jax": jax.__version__, "host": platform.node(), "cpu_count": os.cpu_count(),
      "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
      "host_memory": hostmem.describe(verbose=True),
  }
  if args.compare:
    res["compare"] = bench_compare(args)
    report_compare(res)
  elif not args.pipeline_only:
    try:
      s = setup(args)
    except NotAvailable as e:
      print(f"error: {e}", file=sys.stderr)
      return 2
    torch_bench = None
    if args.compare_torch:
      from kswap_jax import bench_torch  # pylint: disable=import-outside-toplevel
      try:
        torch_bench = bench_torch.TorchProcess(args, s)  # its own process, stepped in turn
      except bench_torch.TorchMissing as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
      for _ in range(args.warmup + 1):  # torch's first steps allocate and tune
        torch_bench.time_step()
      torch_bench.reset_peak_rss()
    try:
      peak_before = matmul_peak(args.dtype)
      st = bench_step(args, s, timed_other=(
          (lambda: (torch_bench.time_step(), torch_bench.cpu_s[-1])) if torch_bench else None))
      peak_after = matmul_peak(args.dtype)
    finally:
      torch_end = torch_bench.close() if torch_bench else None
    best = max(peak_before, peak_after, key=lambda d: d["flops_per_s"])
    res["matmul_peak"] = dict(best, before=peak_before["flops_per_s"],
                              after=peak_after["flops_per_s"])
    res["step_result"] = st
    if st["achieved_flops_per_s"]:  # against the peak of every device the step runs on
      peak = best["flops_per_s"] * _peak_devices()
      res["matmul_peak_fraction"] = st["achieved_flops_per_s"] / peak
      res["matmul_floor_s"] = st["flops_per_step"] / peak
    if torch_bench is not None:
      times, cpu = st.pop("other_step_s"), st.pop("other_cpu_s")
      med = statistics.median(times)
      res["torch"] = {"version": torch_bench.version, "threads": torch_bench.threads,
                      "step_s": _summary(times), "step_cpu_s": _summary(cpu),
                      "peak_rss_bytes": torch_end["peak_rss_bytes"],
                      "jax_over_torch": st["step_s"]["median"] / med,
                      "jax_over_torch_peak_rss": (st["memory"]["host_peak_rss_bytes"]
                                                  / torch_end["peak_rss_bytes"]),
                      "jax_over_torch_cpu": (st["step_cpu_s"]["median"]
                                             / statistics.median(cpu)),
                      "last_loss": torch_bench.last_loss}
  if not args.no_pipeline and not args.compare:
    res["pipeline"] = bench_pipeline(args)
  if not args.compare:
    report(res)
  if args.json:
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
      json.dump(res, f, indent=2)
      f.write("\n")
    print(f"figures written to {args.json}")
  return 0


if __name__ == "__main__":
  hostmem.reexec_with_tunables()
  sys.exit(main())
