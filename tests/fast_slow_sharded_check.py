"""FAST + SLOW steps of a BatchNorm ResNet on 1 device and on a 4-device mesh; prints diffs.

Run by tests/test_devices.py in a subprocess (the simulated device count must be set
before jax is imported). The batch has padded slots, so the masked BatchNorm statistics
must be global over the mesh and ignore the padding on every shard.
"""

import os

import simulated_devices

simulated_devices.use(4)

import json  # noqa: E402
import sys  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kswap_jax import losses, models, train  # noqa: E402
from kswap_jax.optim import fast_slow as fs  # noqa: E402


def main():
  assert jax.device_count() == 4, jax.devices()
  cfg = models.default_config("resnet18_cifar")
  cfg.width, cfg.stage_blocks, cfg.image_size, cfg.num_classes = 4, (1,), 8, 3
  model = models.build(cfg)
  variables = models.init_variables(model, cfg, jax.random.key(0))

  def make_loss(stream, adaptive):
    def loss_fn(p, frozen, batch, rng, model_state):
      del frozen, rng
      b = batch[stream]
      logits, new = model.apply({"params": p, **model_state}, b["image"], train=True,
                                mask=b["mask"], mutable=["batch_stats"])
      fn = losses.adaptive_ascent_loss if adaptive else losses.cross_entropy
      return fn(logits, b["label"], b["mask"]), ({}, new)
    return loss_fn

  r = np.random.RandomState(0)
  mask = np.array([1, 1, 1, 1, 1, 1, 0, 0], np.float32)   # the last shard is all padding
  batches = [{"image": r.randn(8, 8, 8, 3).astype(np.float32),
              "label": r.randint(0, 3, 8).astype(np.int32), "mask": mask} for _ in range(2)]
  sal = jax.tree_util.tree_map(lambda p: (np.arange(p.size).reshape(p.shape) % 3 > 0)
                               .astype(np.float32), variables["params"])
  results = {}
  for n in (1, 4):
    tx = fs.fast_slow(0.05, 4, forget_alpha=5.0, max_norm=1.0)
    mesh = train.make_mesh(jax.devices()[:n])
    fast = train.make_train_step(make_loss("forget", True), tx, mesh, mutable=True,
                                 update_kwargs={"phase": fs.FAST})
    slow = train.make_train_step(make_loss("remain", False), tx, mesh, mutable=True,
                                 update_kwargs={"phase": fs.SLOW})
    state = train.create_state(variables["params"], tx, 0,
                               model_state={"batch_stats": variables["batch_stats"]})
    state = state._replace(opt_state=fs.set_mask(state.opt_state, sal))
    state = train.replicate(state, mesh)
    state, m = fast(state, {}, train.to_global({"forget": batches[0]}, mesh), {})
    state, _ = slow(state, {}, train.to_global({"remain": batches[1]}, mesh), {})
    results[n] = (jax.device_get(state), float(m["loss"]), len(state.params["conv1"]["kernel"]
                                                              .sharding.device_set))
  (s1, l1, _), (s4, l4, d4) = results[1], results[4]
  diff = lambda a, b: max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
                          for x, y in zip(jax.tree_util.tree_leaves(a),
                                          jax.tree_util.tree_leaves(b)))
  moved = diff(s1.params, variables["params"])
  print(json.dumps({"devices_4": d4, "moved": moved, "param_diff": diff(s1.params, s4.params),
                    "stats_diff": diff(s1.model_state, s4.model_state),
                    "opt_diff": diff(s1.opt_state, s4.opt_state), "loss_1": l1, "loss_4": l4}))


if __name__ == "__main__":
  main()
