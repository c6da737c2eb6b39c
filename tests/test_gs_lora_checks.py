"""GS-LoRA acceptance checks that need no dataset (docs/gs_lora.md, "Checks").

Numbered as in the method's checklist: 1 counts, 2 ViT-B/16 count, 3 A-init bounds,
4 logits at init, 5 structure loss at init, 6 merge, 7 H-Mean (test_losses_metrics.py),
8 class order (data/tasks_test.py), 9 LR, 10 α gating, 11 hinges, 12 prototype KL,
13 evaluation margin.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_model_config
from kswap_jax import lora, losses, models
from kswap_jax.optim import group_lasso, schedules

SLOPE_TASK_1 = math.sqrt(5.0)    # loralib's kaiming-uniform a
SLOPE_LATER = math.sqrt(50.0)    # the reference's re-init for tasks >= 2


@pytest.fixture(scope="module")
def face_abstract():
  cfg = models.default_config("vit_face")
  model = models.build(cfg)
  return jax.eval_shape(lambda: models.init_variables(model, cfg, jax.random.key(0)))["params"]


def _face_lora(base, slope, seed=1):
  return lora.init(base, lora.LoraSpec(init_slope=slope), jax.random.key(seed))


def test_1_face_transformer_counts(face_abstract):
  tree = jax.eval_shape(lambda: _face_lora(face_abstract, SLOPE_TASK_1))
  base, head = lora.count(face_abstract), lora.count(face_abstract["head"])
  assert base == 19_157_504 and head == 51_200
  assert lora.count(tree) == 245_760 == 6 * 40_960
  assert len(jax.tree_util.tree_leaves(tree)) == 24
  assert base + lora.count(tree) == 19_403_264
  assert round(100 * lora.count(tree) / base, 4) == 1.2828  # the paper's "1.28 %"
  assert len(lora.groups(tree, "block")) == 6
  assert len(lora.groups(tree, "module")) == 12 and len(lora.groups(tree, "leaf")) == 24


def test_2_vit_b16_lora_count():
  cfg = tiny_model_config(num_classes=100, image_size=224, variant="B/16")
  model = models.build(cfg)
  base = jax.eval_shape(lambda: models.init_variables(model, cfg, jax.random.key(0)))["params"]
  tree = jax.eval_shape(lambda: lora.init(base, lora.LoraSpec(), jax.random.key(1)))
  assert lora.count(tree) == 737_280
  assert len(lora.groups(tree, "block")) == 12


def _bounds(base, slope):
  tree = lora.init(base, lora.LoraSpec(init_slope=slope), jax.random.key(3))
  mlp = tree["Transformer"]["encoderblock_0"]["MlpBlock_3"]
  return mlp, lora.LoraSpec(init_slope=slope).scale


@pytest.mark.parametrize("slope,fc1,fc2", [
    (SLOPE_TASK_1, 0.044194, 0.022097), (SLOPE_LATER, 0.015158, 0.0075792)])
def test_3_a_init_bounds_face(face_abstract, slope, fc1, fc2):
  mlp, scale = _bounds(face_abstract, slope)
  assert scale == 0.125
  for name, bound in (("Dense_0", fc1), ("Dense_1", fc2)):
    a = np.asarray(mlp[name]["a"])
    assert np.abs(a).max() <= bound * (1 + 1e-4)
    assert np.abs(a).max() > 0.99 * bound          # 4,096 / 16,384 draws reach the edge
    np.testing.assert_array_equal(mlp[name]["b"], 0.0)
  assert mlp["Dense_0"]["a"].shape == (512, 8) and mlp["Dense_1"]["a"].shape == (2048, 8)


def test_3_a_init_bounds_b16_task_1():
  for fan_in, bound in ((768, 0.036084), (3072, 0.018042)):
    gain = math.sqrt(2.0 / (1.0 + SLOPE_TASK_1 ** 2))
    assert gain * math.sqrt(3.0 / fan_in) == pytest.approx(bound, rel=1e-4)


@pytest.fixture(scope="module")
def tiny_face():
  """(model, params, images, labels) of a depth-2 width-64 face-style model (CosFace head)."""
  cfg = models.default_config("vit_face")
  cfg.update(dict(variant="test/4", image_size=16, num_classes=10, dropout=0.0,
                  attention_output_dropout=0.0))
  model = models.build(cfg)
  params = jax.jit(lambda k: models.init_variables(model, cfg, k))(jax.random.key(0))["params"]
  images = jax.random.uniform(jax.random.key(1), (4, 16, 16, 3))
  labels = jnp.array([0, 3, 7, 9])
  return model, params, images, labels


def test_4_logits_and_embedding_at_init_equal_the_pretrained_model(tiny_face):
  model, params, images, labels = tiny_face
  spec = lora.LoraSpec(init_slope=SLOPE_TASK_1)
  tree = lora.init(params, spec, jax.random.key(2))

  @jax.jit
  def both(params, tree, images, labels):
    outs = []
    for kwargs in (dict(labels=labels), dict(), dict(features=True)):
      outs.append((model.apply({"params": params}, images, **kwargs),
                   lora.apply(model, params, tree, images, scale=spec.scale, **kwargs)))
    return outs
  for want, got in both(params, tree, images, labels):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.parametrize("slope,want", [
    (SLOPE_TASK_1, 6 * math.sqrt(16 / 3)), (SLOPE_LATER, 6 * math.sqrt(32 / 51))])
def test_5_structure_loss_at_init_face(face_abstract, slope, want):
  assert want == pytest.approx(13.86 if slope == SLOPE_TASK_1 else 4.75, abs=0.01)
  values = [float(group_lasso.group_lasso_penalty(_face_lora(face_abstract, slope, seed)))
            for seed in (1, 2)]
  for v in values:
    assert v == pytest.approx(want, rel=0.01)


def test_5_structure_loss_at_init_b16_is_about_27_7():
  # Per block: E||A1||^2 + E||A2||^2 = 2 * (n * c^2 / 3) with c^2 = 1 / fan_in, n = 8 fan_in.
  assert 12 * math.sqrt(2 * 8 / 3) == pytest.approx(27.7, abs=0.05)


def test_6_merged_forward_equals_lora_forward_and_folds_the_task(tiny_face):
  model, params, images, labels = tiny_face
  spec = lora.LoraSpec(init_slope=SLOPE_TASK_1)
  tree = lora.init(params, spec, jax.random.key(2))
  tree = jax.tree_util.tree_map(
      lambda x: x + 0.05 * jax.random.normal(jax.random.key(4), x.shape), tree)  # B != 0
  merged = lora.merge(params, tree, spec.scale)
  want = lora.apply(model, params, tree, images, scale=spec.scale, labels=labels)
  got = model.apply({"params": merged}, images, labels=labels)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-4, rtol=1e-5)
  emb_l = lora.apply(model, params, tree, images, scale=spec.scale, features=True)
  emb_m = model.apply({"params": merged}, images, features=True)
  np.testing.assert_allclose(np.asarray(emb_m), np.asarray(emb_l), atol=1e-5)
  # W_t = W_{t-1} + (1/8) a b in Flax (in, out) layout, A^T B^T in torch's.
  fc1 = tree["Transformer"]["encoderblock_1"]["MlpBlock_3"]["Dense_0"]
  k0 = params["Transformer"]["encoderblock_1"]["MlpBlock_3"]["Dense_0"]["kernel"]
  k1 = merged["Transformer"]["encoderblock_1"]["MlpBlock_3"]["Dense_0"]["kernel"]
  np.testing.assert_allclose(np.asarray(k1), np.asarray(k0 + fc1["a"] @ fc1["b"] / 8), atol=1e-7)
  # The next task's fresh LoRA (B = 0) leaves the merged model unchanged.
  fresh = lora.init(merged, lora.LoraSpec(init_slope=SLOPE_LATER), jax.random.key(5))
  again = lora.apply(model, merged, fresh, images, scale=spec.scale, labels=labels)
  np.testing.assert_array_equal(np.asarray(again), np.asarray(got))


def test_9_per_epoch_cosine_lr():
  lr = schedules.epoch_cosine(base=1e-2, minimum=1e-5, epochs=100)
  assert lr(0) == pytest.approx(1e-2, rel=1e-6)   # float32 schedule
  assert lr(50) == pytest.approx(5.005e-3, rel=1e-6)
  assert lr(99) > 1e-5


def test_10_single_step_alpha_gate():
  single = list(map(schedules.structure_alpha(alpha=0.005, alpha_epoch=20, warmup_alpha=True,
                                              big_alpha=0.01), range(100)))
  assert single[:20] == [0.0] * 20 and set(single[20:]) == {0.01}
  few_shot = list(map(schedules.structure_alpha(alpha=0.01, alpha_epoch=20), range(100)))
  assert few_shot[:20] == [0.0] * 20 and set(few_shot[20:]) == {0.01}
  continual = set(map(schedules.structure_alpha(alpha=1e-4), range(100)))
  assert continual == {1e-4}
  missing = list(map(schedules.structure_alpha(alpha=1e-4, alpha_epoch=30, warmup_alpha=True,
                                               big_alpha=0.015), range(100)))
  assert missing[:30] == [0.0] * 30 and set(missing[30:]) == {0.015}


@pytest.mark.parametrize("bound", [110.0, 105.0])
def test_11_forget_hinge_gradient_vanishes_past_bnd(bound):
  labels = jnp.array([0, 1])

  def loss(logits):
    return 0.05 * losses.bounded_forgetting(losses.cross_entropy(logits, labels), bound)
  # CE ≈ 2 · 64 = 128 > BND: the true class is far below the other one.
  far = jnp.array([[-64.0, 64.0], [64.0, -64.0]])
  near = jnp.array([[0.0, 1.0], [1.0, 0.0]])
  assert float(loss(far)) == 0.0
  np.testing.assert_array_equal(np.asarray(jax.grad(loss)(far)), 0.0)
  assert float(jnp.abs(jax.grad(loss)(near)).sum()) > 0


@pytest.mark.parametrize("bound", [18.0, 50.0])
def test_11_prototype_hinge_gradient_vanishes_past_bnd_pro(bound):
  protos = jnp.array([[80.0, 0.0, 0.0], [0.0, 80.0, 0.0]])

  def loss(e, p):
    kl = losses.prototype_kl(e, p)
    return losses.prototype_loss(kl, jnp.zeros(()), bound=bound, forget_weight=0.5,
                                 retain_weight=0.0)
  # Embedding mass on another dimension: KL ≈ 80 > BND_pro.
  far = jnp.array([[0.0, 80.0, 0.0], [80.0, 0.0, 0.0]])
  assert float(losses.prototype_kl(far, protos)) > bound
  np.testing.assert_array_equal(np.asarray(jax.grad(loss)(far, protos)), 0.0)
  near = 0.9 * protos
  assert float(jnp.abs(jax.grad(loss)(near, protos)).sum()) > 0
  assert float(loss(protos, protos)) == pytest.approx(0.5 * bound)


def test_12_prototype_kl_zero_at_e_equals_p_and_hand_value():
  p = jnp.array([[1.0, 2.0, 3.0], [0.5, -1.0, 0.0]])
  assert float(losses.prototype_kl(p, p)) == pytest.approx(0.0, abs=1e-7)
  e = jnp.array([[0.0, 0.0, 0.0], [0.5, -1.0, 0.0]])
  sp = np.exp([1.0, 2.0, 3.0]) / np.exp([1.0, 2.0, 3.0]).sum()
  kl0 = float(np.sum(sp * (np.log(sp) - np.log(1 / 3))))
  assert float(losses.prototype_kl(e, p)) == pytest.approx(kl0 / 2, rel=1e-5)  # batchmean
  # Padded slots do not count.
  assert float(losses.prototype_kl(e, p, jnp.array([1.0, 0.0]))) == pytest.approx(kl0, rel=1e-5)
  assert float(losses.prototype_kl(e, p, jnp.array([0.0, 0.0]))) == 0.0


def test_prototype_loss_weights_and_retain_pull():
  got = losses.prototype_loss(jnp.float32(5.0), jnp.float32(2.0), bound=18.0,
                              forget_weight=0.5, retain_weight=0.1)
  assert float(got) == pytest.approx(0.5 * 13.0 + 0.1 * 2.0)


def test_class_prototypes_are_masked_means():
  e = jnp.array([[1.0, 0.0], [3.0, 2.0], [5.0, 5.0], [100.0, 100.0]])
  labels = jnp.array([0, 0, 2, 2])
  sums, counts = losses.class_sums(e, labels, jnp.array([1.0, 1.0, 1.0, 0.0]), 3)
  np.testing.assert_array_equal(np.asarray(counts), [2.0, 0.0, 1.0])
  np.testing.assert_allclose(np.asarray(losses.class_means(sums, counts)),
                             [[2.0, 1.0], [0.0, 0.0], [5.0, 5.0]])


def test_13_evaluation_margin_requires_a_035_cosine_lead():
  from kswap_jax.models.vit import cosface_logits
  kernel = jnp.eye(2)                       # class j's weight is the unit vector e_j
  # cos to class 0 = 0.8 / sqrt(0.8^2 + 0.6^2) = 0.8, to class 1 = 0.6: lead 0.2 < 0.35.
  e = jnp.array([[0.8, 0.6], [0.95, 0.312]])  # second: cos 0.950 / 0.312, lead 0.638
  labels = jnp.array([0, 0])
  with_margin = cosface_logits(e, kernel, labels, scale=64.0, margin=0.35)
  plain = cosface_logits(e, kernel, None, scale=64.0, margin=0.35)
  np.testing.assert_allclose(np.asarray(with_margin[0]), [64 * (0.8 - 0.35), 64 * 0.6],
                             rtol=1e-5)
  assert list(np.asarray(jnp.argmax(plain, -1))) == [0, 0]        # both right without margin
  assert list(np.asarray(jnp.argmax(with_margin, -1))) == [1, 0]  # the first loses with it
