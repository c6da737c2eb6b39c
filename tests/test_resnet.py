"""CIFAR ResNet-18: size, masked BatchNorm statistics, torch running-variance convention."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kswap_jax import models
from kswap_jax.errors import ConfigError
from kswap_jax.models import resnet


def tiny_cfg(batch_norm="torch"):
  cfg = models.default_config("resnet18_cifar")
  cfg.width, cfg.stage_blocks, cfg.image_size = 4, (1, 1), 8
  cfg.batch_norm = batch_norm
  return cfg


def test_resnet18_parameter_count_and_names():
  cfg = models.default_config("resnet18_cifar")
  assert (cfg.num_classes, cfg.image_size, cfg.batch_norm) == (10, 32, "torch")
  model = models.build(cfg)
  shapes = jax.eval_shape(lambda k: models.init_variables(model, cfg, k), jax.random.key(0))
  count = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(shapes["params"]))
  assert count == 11_173_962
  params = shapes["params"]
  assert set(params) == {"conv1", "bn1", "linear"} | {f"layer{s}_{b}" for s in range(1, 5)
                                                      for b in range(2)}
  assert "shortcut_conv" not in params["layer1_0"] and "shortcut_conv" in params["layer2_0"]
  assert params["linear"]["kernel"].shape == (512, 10)
  assert params["conv1"]["kernel"].shape == (3, 3, 3, 64)
  assert set(shapes["batch_stats"]["bn1"]) == {"mean", "var"}
  out = jax.eval_shape(lambda v: model.apply(v, jnp.zeros((2, 32, 32, 3)), features=True), shapes)
  assert out.shape == (2, 512)


@pytest.mark.parametrize("convention", ["torch", "flax"])
def test_padded_slots_do_not_change_batch_stats(convention):
  cfg = tiny_cfg(convention)
  model = models.build(cfg)
  variables = models.init_variables(model, cfg, jax.random.key(0))
  r = np.random.RandomState(0)
  valid = r.randn(4, 8, 8, 3).astype(np.float32)
  padded = np.concatenate([valid, 100 * r.randn(2, 8, 8, 3).astype(np.float32)])
  mask = np.array([1, 1, 1, 1, 0, 0], np.float32)
  out_v, st_v = model.apply(variables, valid, train=True, mutable=["batch_stats"])
  out_p, st_p = model.apply(variables, padded, train=True, mask=mask, mutable=["batch_stats"])
  for a, b in zip(jax.tree_util.tree_leaves(st_v), jax.tree_util.tree_leaves(st_p)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(np.asarray(out_p[:4]), np.asarray(out_v), rtol=1e-4, atol=1e-4)
  # Without the mask the padded slots do change the statistics.
  _, st_u = model.apply(variables, padded, train=True, mutable=["batch_stats"])
  assert not np.allclose(np.asarray(st_u["batch_stats"]["bn1"]["var"]),
                         np.asarray(st_v["batch_stats"]["bn1"]["var"]))


def test_torch_convention_running_statistics():
  bn = resnet.MaskedBatchNorm()
  r = np.random.RandomState(1)
  x = r.randn(5, 3, 2, 4).astype(np.float32) * 2 + 1
  mask = np.array([1, 1, 0, 1, 1], np.float32)
  variables = bn.init(jax.random.key(0), x, train=False)
  y, st = bn.apply(variables, x, train=True, mask=mask, mutable=["batch_stats"])
  xs = x[mask > 0].reshape(-1, 4).astype(np.float64)
  n = xs.shape[0]
  mean, var = xs.mean(0), xs.var(0)
  np.testing.assert_allclose(np.asarray(st["batch_stats"]["mean"]), 0.1 * mean, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(st["batch_stats"]["var"]),
                             0.9 + 0.1 * var * n / (n - 1), rtol=1e-5)
  # The normalisation itself uses the biased variance.
  np.testing.assert_allclose(np.asarray(y[0]), (x[0] - mean) / np.sqrt(var + 1e-5),
                             rtol=1e-4, atol=1e-5)
  # A batch with no valid sample leaves the statistics alone.
  _, st0 = bn.apply(variables, x, train=True, mask=np.zeros(5, np.float32),
                    mutable=["batch_stats"])
  np.testing.assert_array_equal(np.asarray(st0["batch_stats"]["var"]), 1.0)


def test_flax_convention_is_flax_batchnorm_defaults():
  cfg = tiny_cfg("flax")
  model = models.build(cfg)
  variables = models.init_variables(model, cfg, jax.random.key(0))
  x = np.random.RandomState(2).randn(4, 8, 8, 3).astype(np.float32)
  _, st = model.apply(variables, x, train=True, mutable=["batch_stats"])
  h = jax.lax.conv_general_dilated(x, variables["params"]["conv1"]["kernel"], (1, 1),
                                   ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"))
  h = np.asarray(h, np.float64).reshape(-1, h.shape[-1])
  np.testing.assert_allclose(np.asarray(st["batch_stats"]["bn1"]["var"]),
                             0.99 + 0.01 * h.var(0), rtol=1e-4)


def test_eval_mode_uses_running_statistics():
  cfg = tiny_cfg()
  model = models.build(cfg)
  variables = models.init_variables(model, cfg, jax.random.key(0))
  bn = resnet.MaskedBatchNorm()
  x = np.random.RandomState(3).randn(2, 2, 2, 3).astype(np.float32)
  v = {"params": {"scale": jnp.array([1.0, 2.0, 0.5]), "bias": jnp.array([0.0, 1.0, -1.0])},
       "batch_stats": {"mean": jnp.array([0.5, -1.0, 2.0]), "var": jnp.array([4.0, 1.0, 0.25])}}
  y = bn.apply(v, x, train=False)
  want = ((x - np.array([0.5, -1.0, 2.0])) / np.sqrt(np.array([4.0, 1.0, 0.25]) + 1e-5)
          * np.array([1.0, 2.0, 0.5]) + np.array([0.0, 1.0, -1.0]))
  np.testing.assert_allclose(np.asarray(y), want, rtol=1e-5, atol=1e-6)
  # The whole model in eval mode: per-sample outputs, independent of the rest of the batch.
  imgs = np.random.RandomState(4).randn(3, 8, 8, 3).astype(np.float32)
  full = model.apply(variables, imgs, train=False)
  alone = model.apply(variables, imgs[:1], train=False)
  np.testing.assert_allclose(np.asarray(full[:1]), np.asarray(alone), rtol=1e-5, atol=1e-6)


def test_bad_fields():
  cfg = tiny_cfg()
  cfg.batch_norm = "keras"
  with pytest.raises(ConfigError, match="model.batch_norm"):
    models.build(cfg)
  cfg = tiny_cfg()
  cfg.stage_blocks = (2, 0)
  with pytest.raises(ConfigError, match="model.stage_blocks"):
    models.build(cfg)


def torch_layout_state_dict(width, stage_blocks, num_classes, seed=0):
  """A random state dict with the names and shapes of the PyTorch CIFAR ResNet."""
  r = np.random.RandomState(seed)
  sd = {}

  def bn(name, c):
    sd[f"{name}.weight"] = r.uniform(0.5, 1.5, c).astype(np.float32)
    sd[f"{name}.bias"] = r.randn(c).astype(np.float32) * 0.1
    sd[f"{name}.running_mean"] = r.randn(c).astype(np.float32) * 0.1
    sd[f"{name}.running_var"] = r.uniform(0.5, 2.0, c).astype(np.float32)
    sd[f"{name}.num_batches_tracked"] = np.array(7)

  def conv(name, o, i, k):
    sd[f"{name}.weight"] = (r.randn(o, i, k, k) * np.sqrt(2.0 / (i * k * k))).astype(np.float32)

  conv("conv1", width, 3, 3)
  bn("bn1", width)
  in_planes = width
  for s, blocks in enumerate(stage_blocks):
    planes = width * 2 ** s
    for b in range(blocks):
      stride = 2 if (s > 0 and b == 0) else 1
      p = f"layer{s + 1}.{b}"
      conv(f"{p}.conv1", planes, in_planes, 3)
      bn(f"{p}.bn1", planes)
      conv(f"{p}.conv2", planes, planes, 3)
      bn(f"{p}.bn2", planes)
      if stride != 1 or in_planes != planes:
        conv(f"{p}.shortcut.0", planes, in_planes, 1)
        bn(f"{p}.shortcut.1", planes)
      in_planes = planes
  sd["linear.weight"] = r.randn(num_classes, in_planes).astype(np.float32) * 0.1
  sd["linear.bias"] = r.randn(num_classes).astype(np.float32) * 0.1
  return sd


def torch_forward(sd, x_nchw, stage_blocks):
  """Eval-mode forward written in PyTorch's NCHW/OIHW layout (the reference ResNet)."""
  def conv(name, x, stride, pad):
    return jax.lax.conv_general_dilated(x, sd[f"{name}.weight"], (stride, stride),
                                        ((pad, pad), (pad, pad)),
                                        dimension_numbers=("NCHW", "OIHW", "NCHW"))

  def bn(name, x):
    c = lambda k: sd[f"{name}.{k}"][None, :, None, None]
    return (x - c("running_mean")) / jnp.sqrt(c("running_var") + 1e-5) * c("weight") + c("bias")

  out = jax.nn.relu(bn("bn1", conv("conv1", x_nchw, 1, 1)))
  for s, blocks in enumerate(stage_blocks):
    for b in range(blocks):
      stride = 2 if (s > 0 and b == 0) else 1
      p = f"layer{s + 1}.{b}"
      y = jax.nn.relu(bn(f"{p}.bn1", conv(f"{p}.conv1", out, stride, 1)))
      y = bn(f"{p}.bn2", conv(f"{p}.conv2", y, 1, 1))
      short = (bn(f"{p}.shortcut.1", conv(f"{p}.shortcut.0", out, stride, 0))
               if f"{p}.shortcut.0.weight" in sd else out)
      out = jax.nn.relu(y + short)
  feats = jnp.mean(out, axis=(2, 3))
  return feats @ sd["linear.weight"].T + sd["linear.bias"]


def test_torch_state_dict_import_matches_the_reference_forward():
  cfg = tiny_cfg()
  cfg.num_classes = 3
  model = models.build(cfg)
  sd = torch_layout_state_dict(cfg.width, cfg.stage_blocks, 3)
  variables = resnet.from_torch_state_dict({"module." + k: v for k, v in sd.items()},
                                           prefix="module.")
  ours = jax.eval_shape(lambda k: models.init_variables(model, cfg, k), jax.random.key(0))
  assert jax.tree_util.tree_structure(variables) == jax.tree_util.tree_structure(ours)
  x = np.random.RandomState(5).randn(2, 3, 8, 8).astype(np.float32)
  with jax.default_matmul_precision("highest"):
    want = torch_forward({k: jnp.asarray(v) for k, v in sd.items()}, x, cfg.stage_blocks)
    got = model.apply(variables, x.transpose(0, 2, 3, 1), train=False)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-5)
  with pytest.raises(ValueError, match="normalize.mean"):
    resnet.from_torch_state_dict({**sd, "normalize.mean": np.zeros(3)})


def test_torch_state_dict_of_full_resnet18_has_our_shapes():
  cfg = models.default_config("resnet18_cifar")
  sd = torch_layout_state_dict(64, (2, 2, 2, 2), 10)
  assert sum(v.size for k, v in sd.items()
             if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))
             ) == 11_173_962
  variables = resnet.from_torch_state_dict(sd)
  ours = jax.eval_shape(lambda k: models.init_variables(models.build(cfg), cfg, k),
                        jax.random.key(0))
  assert (jax.tree_util.tree_map(np.shape, variables)
          == jax.tree_util.tree_map(lambda x: x.shape, ours))
