"""The PyTorch step of `python -m kswap_jax.bench --compare_torch` computes what the JAX step
computes: same loss and same LoRA gradients from the same weights and batch (dropout off).
Skipped without the optional `[torch]` extra."""

import jax
import numpy as np
import pytest

from kswap_jax import bench, lora

torch = pytest.importorskip("torch")
from kswap_jax import bench_torch  # noqa: E402  pylint: disable=wrong-import-position


@pytest.mark.parametrize("step", ["forget", "learn", "ce"])
def test_torch_step_has_the_jax_loss_and_lora_gradients(step):
  args = bench.parse_args(["--variant=test/4", "--image_size=16", "--batch_size=4",
                           f"--step={step}", "--dropout=0", "--no_pipeline"])
  s = bench.setup(args)
  # Random non-zero factors (b starts at 0), so both factors get real gradients.
  leaves, treedef = jax.tree_util.tree_flatten(s["tree"])
  keys = jax.random.split(jax.random.key(1), len(leaves))
  tree = treedef.unflatten([0.1 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])
  s = dict(s, tree=tree, lora_tree_unscanned=tree)
  batch = {k: {kk: jax.numpy.asarray(v) for kk, v in b.items()} for k, b in s["host_batch"].items()}
  (loss, _), grads = jax.value_and_grad(s["loss_fn"], has_aux=True)(
      tree, s["base"], batch, jax.random.key(0))
  ts = bench_torch.TorchStep.from_setup(args, s)
  ts.model.train()
  t_loss = ts._loss()  # pylint: disable=protected-access
  t_loss.backward()
  np.testing.assert_allclose(float(t_loss.detach()), float(loss), rtol=1e-5)
  scale = max(float(np.abs(np.asarray(g)).max()) for g in jax.tree_util.tree_leaves(grads))
  assert scale > 1e-4
  for i, blk in enumerate(ts.model.blocks):
    for name, fc in (("Dense_0", blk.fc1), ("Dense_1", blk.fc2)):
      prefix = f"Transformer/encoderblock_{i}/MlpBlock_3/{name}"
      for factor, param in (("a", fc.lora_a), ("b", fc.lora_b)):
        want = np.asarray(lora.leaf_by_name(grads, f"{prefix}/{factor}"))
        got = param.grad.numpy()
        assert np.abs(got - want).max() <= 1e-4 * scale, (prefix, factor)


def test_torch_process_steps_the_same_model_in_a_child():
  """--compare_torch's child process gets the very same weights and batch: without dropout
  its first loss is the JAX loss, and it reports its own time and peak memory."""
  args = bench.parse_args(["--variant=test/4", "--image_size=16", "--batch_size=4",
                           "--step=forget", "--dropout=0", "--no_pipeline"])
  s = bench.setup(args)
  batch = {k: {kk: jax.numpy.asarray(v) for kk, v in b.items()} for k, b in s["host_batch"].items()}
  loss, _ = s["loss_fn"](s["tree"], s["base"], batch, jax.random.key(0))
  proc = bench_torch.TorchProcess(args, s)
  try:
    assert proc.time_step() > 0 and proc.cpu_s[-1] > 0
    np.testing.assert_allclose(proc.last_loss, float(loss), rtol=1e-5)
    proc.reset_peak_rss()
    proc.time_step()
  finally:
    end = proc.close()
  assert end["peak_rss_bytes"] > 0
  assert proc._proc.returncode == 0  # pylint: disable=protected-access
