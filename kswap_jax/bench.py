r"""Prints speed figures for the Knowledge Swapping step and the input pipeline.

    python -m kswap_jax.bench                                  # ViT-B/16, batch 80, LoRA r8
    python -m kswap_jax.bench --variant=test/4 --image_size=16 --batch_size=32 --steps=50
    python -m kswap_jax.bench --pipeline_only --image_size=224

Figures: compile time, seconds per optimizer step (each step = two forward/backward passes,
retain + auxiliary batch, as the reference), images/s, and the data pipeline's images/s on
synthetic 224x224 sources. Nothing is asserted: this is for measuring, not testing.
"""

from __future__ import annotations

import argparse
import time

import jax
import ml_collections
import numpy as np

from kswap_jax import lora, train
from kswap_jax.data import sources, splits, streams
from kswap_jax.methods import common, knowledge_swap
from kswap_jax.models import vit


def _model_config(args) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      variant=args.variant, num_classes=200, image_size=args.image_size, channels=3,
      dropout=0.1, attention_dropout=0.0, attention_output_dropout=0.0, representation_size=0, width=0, depth=0, mlp_dim=0,
      num_heads=0))


def bench_step(args) -> None:
  mesh = train.make_mesh()
  model_cfg = _model_config(args)
  model = vit.build(model_cfg)
  base = vit.init_params(model, model_cfg, jax.random.key(0))
  spec = lora.LoraSpec(rank=args.rank)
  tree = lora.init(base, spec, jax.random.key(1))
  ks = ml_collections.ConfigDict(dict(beta=0.2, bound=105.0))
  ocfg = ml_collections.ConfigDict(dict(lr=1e-2, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.05))
  tx = common.adamw(ocfg)
  step = train.make_train_step(knowledge_swap.learn_loss(model, spec.scale, ks, 0.005, "block"),
                               tx, mesh)
  rng = np.random.default_rng(0)
  b = args.batch_size
  shape = (b, args.image_size, args.image_size, 3)
  mk = lambda: {"image": rng.normal(size=shape).astype(np.float32),
                "label": rng.integers(0, 200, b).astype(np.int32),
                "mask": np.ones(b, np.float32)}
  batch = train.to_global({"learn": mk(), "retain": mk()}, mesh)
  state = train.replicate(train.create_state(tree, tx, 0), mesh)
  frozen = train.replicate(base, mesh)
  hp = {"learning_rate": 1e-2}
  t0 = time.perf_counter()
  state, m = step(state, frozen, batch, hp)
  jax.block_until_ready(m)
  compile_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  for _ in range(args.steps):
    state, m = step(state, frozen, batch, hp)
  jax.block_until_ready(m)
  per_step = (time.perf_counter() - t0) / args.steps
  print(f"devices: {jax.device_count()} x {jax.devices()[0].device_kind}")
  print(f"model {args.variant} @ {args.image_size}px, LoRA r{args.rank}: "
        f"{lora.count(tree):,} trainable / {lora.count(base):,} frozen parameters")
  print(f"first step (compile + run): {compile_s:.2f} s")
  print(f"step: {per_step * 1e3:.1f} ms  ({2 * b / per_step:.1f} images/s, global batch "
        f"{b} retain + {b} auxiliary)")


def bench_pipeline(args) -> None:
  src = sources.SyntheticSource(num_classes=10, num_examples=4000, image_size=64, channels=3,
                                seed=0, split="train")
  subset = splits.select(src, range(10), name="bench", label_map={c: c for c in range(10)})
  stream = streams.make_stream([subset], batch_size=args.batch_size, seed=0, cycle=True,
                               image_size=args.image_size, channels=3, mean=0.5, std=0.5,
                               num_threads=args.num_threads)
  it = stream.iterate(0)
  next(it)
  n = 20
  t0 = time.perf_counter()
  for _ in range(n):
    next(it)
  dt = time.perf_counter() - t0
  print(f"pipeline: synthetic 64px -> {args.image_size}px, {args.num_threads} threads: "
        f"{n * args.batch_size / dt:.0f} images/s")


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--variant", default="B/16")
  p.add_argument("--image_size", type=int, default=224)
  p.add_argument("--batch_size", type=int, default=80)
  p.add_argument("--rank", type=int, default=8)
  p.add_argument("--steps", type=int, default=3)
  p.add_argument("--num_threads", type=int, default=0)
  p.add_argument("--pipeline_only", action="store_true")
  args = p.parse_args(argv)
  if not args.pipeline_only:
    bench_step(args)
  bench_pipeline(args)


if __name__ == "__main__":
  main()
