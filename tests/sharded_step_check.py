"""Runs one train step and one eval on 1 device and on a 4-device mesh; prints max |diff|.

Run by tests/test_devices.py in a subprocess because the simulated device count must be
set (XLA_FLAGS) before jax is imported.
"""

import os

import simulated_devices

simulated_devices.use(4)

import json  # noqa: E402
import sys  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from conftest import tiny_model_config  # noqa: E402
from kswap_jax import lora, losses, train  # noqa: E402
from kswap_jax.methods import common  # noqa: E402
from kswap_jax.models import vit  # noqa: E402
import ml_collections  # noqa: E402


def main():
  assert jax.device_count() == 4, jax.devices()
  cfg = tiny_model_config()
  cfg.dropout = 0.1
  model = vit.build(cfg)
  base = vit.init_params(model, cfg, jax.random.key(0))
  # A random head (vit_jax initialises it to zero), so the loss depends on the features.
  base["head"]["kernel"] = jax.random.normal(jax.random.key(5), base["head"]["kernel"].shape)
  spec = lora.LoraSpec(rank=4)
  tree = lora.init(base, spec, jax.random.key(1))
  ocfg = ml_collections.ConfigDict(dict(lr=1e-2, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.05))
  tx = common.adamw(ocfg)

  def loss_fn(params, frozen, batch, rng):
    b = batch["retain"]
    logits = lora.apply(model, frozen, params, b["image"], scale=spec.scale, train=True,
                        rngs={"dropout": rng})
    return losses.cross_entropy(logits, b["label"], b["mask"]), {}

  rng = np.random.default_rng(0)
  batch = {"retain": {"image": rng.normal(size=(8, 16, 16, 3)).astype(np.float32),
                      "label": rng.integers(0, 10, 8).astype(np.int32),
                      "mask": np.array([1, 1, 1, 1, 1, 1, 0, 0], np.float32)}}
  out = {}
  for n in (1, 4):
    mesh = train.make_mesh(jax.devices()[:n])
    step = train.make_train_step(loss_fn, tx, mesh)
    state = train.replicate(train.create_state(tree, tx, seed=0), mesh)
    frozen = train.replicate(base, mesh)
    for _ in range(2):  # two steps: exercises donation and the optimizer state
      state, m = step(state, frozen, train.to_global(batch, mesh), {"learning_rate": 1e-2})
      jax.block_until_ready(state)
    predict_step = train.make_predict_step(
        lambda p, _, f, b: lora.apply(model, f, p, b["image"], scale=spec.scale), mesh)
    out_ = train.predict(predict_step, state, frozen, iter([batch["retain"]]), mesh)
    counts = {"correct": float(np.sum(np.argmax(out_["logits"], -1) == out_["label"])),
              "count": float(len(out_["label"]))}
    sharding = state.params["Transformer"]["encoderblock_0"]["MlpBlock_3"]["Dense_0"]["a"].sharding
    out[n] = (jax.device_get(state.params), float(m["loss"]), counts,
              len(sharding.device_set))
  diff = max(float(np.abs(a - b).max()) for a, b in zip(jax.tree_util.tree_leaves(out[1][0]),
                                                         jax.tree_util.tree_leaves(out[4][0])))
  moved = max(float(np.abs(a - b).max()) for a, b in zip(jax.tree_util.tree_leaves(out[4][0]),
                                                          jax.tree_util.tree_leaves(tree)))
  print(json.dumps({"param_diff": diff, "loss_1": out[1][1], "loss_4": out[4][1],
                    "counts_1": {k: float(v) for k, v in out[1][2].items()},
                    "counts_4": {k: float(v) for k, v in out[4][2].items()},
                    "moved": moved, "devices_4": out[4][3]}))


if __name__ == "__main__":
  main()
