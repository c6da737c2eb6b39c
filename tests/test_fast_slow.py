"""The fast-slow transformation against a hand-written torch-semantics loop and literal trees."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kswap_jax import checkpoint, lora, losses, models, train
from kswap_jax.optim import fast_slow as fs
from kswap_jax.optim.fast_slow import FAST, SLOW

# ---------------------------------------------------------------------------------------------
# Acceptance check 1: the SFR-on update sequence on a toy MLP, SGD and AdamW.

N_IN, N_HID, N_OUT, B = 5, 7, 4, 6


def mlp_params(seed=0):
  r = np.random.RandomState(seed)
  return {"dense_0": {"kernel": r.randn(N_IN, N_HID).astype(np.float32) * 0.5,
                      "bias": r.randn(N_HID).astype(np.float32) * 0.1},
          "norm": {"scale": np.ones(N_HID, np.float32), "bias": np.zeros(N_HID, np.float32)},
          "head": {"kernel": r.randn(N_HID, N_OUT).astype(np.float32) * 0.5,
                   "bias": np.zeros(N_OUT, np.float32)}}


def logits_of(p, x):
  h = jnp.tanh(x @ p["dense_0"]["kernel"] + p["dense_0"]["bias"])
  h = h * p["norm"]["scale"] + p["norm"]["bias"]
  return h @ p["head"]["kernel"] + p["head"]["bias"]


def forget_loss(p, frozen, batch, rng):
  del frozen, rng
  b = batch["forget"]
  return losses.adaptive_ascent_loss(logits_of(p, b["image"]), b["label"], b["mask"], 0.5), {}


def remain_loss(p, frozen, batch, rng):
  del frozen, rng
  b = batch["remain"]
  return losses.cross_entropy(logits_of(p, b["image"]), b["label"], b["mask"]), {}


def make_batches(n, seed):
  r = np.random.RandomState(seed)
  return [{"image": r.randn(B, N_IN).astype(np.float32),
           "label": r.randint(0, N_OUT, B).astype(np.int32),
           "mask": np.ones(B, np.float32)} for _ in range(n)]


def make_mask(params):
  r = np.random.RandomState(3)
  return jax.tree_util.tree_map(lambda p: (r.rand(*p.shape) < 0.6).astype(np.float32), params)


def torch_reference(params, mask, forget_batches, remain_batches, *, base, T, nf, lr0, alpha,
                    max_norm, wd, mu=0.9, b1=0.9, b2=0.999, eps=1e-8):
  """The SFR-on loop written out with torch's SGD / AdamW / clip_grad_norm_ semantics."""
  leaves, treedef = jax.tree_util.tree_flatten(params)
  theta = [np.array(x, np.float64) for x in leaves]
  m_leaves = [np.asarray(x, np.float64) for x in jax.tree_util.tree_leaves(mask)]
  grad_f = jax.grad(lambda p, b: forget_loss(p, None, {"forget": b}, None)[0])
  grad_r = jax.grad(lambda p, b: remain_loss(p, None, {"remain": b}, None)[0])
  buf = [None] * len(theta)
  m = [np.zeros_like(x) for x in theta]
  v = [np.zeros_like(x) for x in theta]
  count = [0]

  def grads(fn, batch):
    p = jax.tree_util.tree_unflatten(treedef, [x.astype(np.float32) for x in theta])
    return [np.asarray(g, np.float64) for g in jax.tree_util.tree_leaves(fn(p, batch))]

  def step(g, lr):
    if base == "sgd":
      for i in range(len(theta)):
        d = g[i] + wd * theta[i]
        buf[i] = d if buf[i] is None else mu * buf[i] + d
        theta[i] = theta[i] - lr * buf[i]
    else:
      count[0] += 1
      bc1, bc2 = 1 - b1 ** count[0], 1 - b2 ** count[0]
      for i in range(len(theta)):
        theta[i] = theta[i] * (1 - lr * wd)
        m[i] = b1 * m[i] + (1 - b1) * g[i]
        v[i] = b2 * v[i] + (1 - b2) * g[i] ** 2
        theta[i] = theta[i] - (lr / bc1) * m[i] / (np.sqrt(v[i]) / math.sqrt(bc2) + eps)

  fi = 0
  history = []
  for t in range(T):
    shape = 0.5 * (1 + math.cos(math.pi * t / T))
    lr, c = lr0 * shape, alpha * shape
    if t % nf == 0:
      g = grads(grad_f, forget_batches[fi])
      fi += 1
      g = [-c * gi * mi for gi, mi in zip(g, m_leaves)]      # loss −c·L, then mask
      norm = math.sqrt(sum(float(np.sum(gi ** 2)) for gi in g))
      coef = min(1.0, max_norm / (norm + 1e-6))               # clip_grad_norm_
      step([gi * coef for gi in g], lr)
    step(grads(grad_r, remain_batches[t]), lr)
    history.append([x.copy() for x in theta])
  return history, treedef


@pytest.mark.parametrize("base,lr0,alpha,wd", [("sgd", 0.05, 25.0, 5e-4),
                                               ("adamw", 0.01, 25.0, 0.05)])
def test_reproduces_sfron_update_sequence(base, lr0, alpha, wd):
  T, nf, max_norm = 5, 2, 1.5   # fast steps at t = 0, 2, 4; the clip is active
  params = mlp_params()
  mask = make_mask(params)
  fb, rb = make_batches(3, 1), make_batches(T, 2)
  want, treedef = torch_reference(params, mask, fb, rb, base=base, T=T, nf=nf, lr0=lr0,
                                  alpha=alpha, max_norm=max_norm, wd=wd)

  tx = fs.fast_slow(lr0, T, forget_alpha=alpha, base=base, weight_decay=wd, max_norm=max_norm)
  mesh = train.make_mesh(jax.devices()[:1])
  with jax.default_matmul_precision("highest"):   # no TF32 on GPUs: fp32 parity
    _run_and_compare(tx, mesh, params, mask, fb, rb, want, T, nf)


def _run_and_compare(tx, mesh, params, mask, fb, rb, want, T, nf):
  fast = train.make_train_step(forget_loss, tx, mesh, update_kwargs={"phase": FAST})
  slow = train.make_train_step(remain_loss, tx, mesh, update_kwargs={"phase": SLOW})
  state = train.create_state(jax.tree_util.tree_map(jnp.asarray, params), tx, seed=0)
  state = state._replace(opt_state=fs.set_mask(state.opt_state, mask))
  fi = 0
  for t in range(T):
    if fs.is_fast_iteration(t, nf):
      state, _ = fast(state, {}, {"forget": fb[fi]}, {})
      fi += 1
    state, _ = slow(state, {}, {"remain": rb[t]}, {})
    got = jax.tree_util.tree_leaves(state.params)
    for g, w in zip(got, want[t]):
      np.testing.assert_allclose(np.asarray(g), w, rtol=2e-5, atol=2e-6)
  assert int(fs.get_state(state.opt_state).outer_count) == T
  # The run moved the masked-out coordinates too (not a freeze) and the parameters changed.
  assert not np.allclose(np.asarray(got[0]), jax.tree_util.tree_leaves(params)[0])


# ---------------------------------------------------------------------------------------------
# Acceptance check 2: step counts.

def test_step_counts_and_plan():
  assert fs.step_counts(1500, 5) == (300, 1500)
  assert [t for t in range(21) if fs.is_fast_iteration(t, 5)] == [0, 5, 10, 15, 20]
  assert fs.step_counts(7, 1) == (7, 7)
  assert fs.step_counts(7, 3) == (3, 7)   # t = 0, 3, 6
  with pytest.raises(ValueError, match="forget_every"):
    fs.is_fast_iteration(0, 0)


# ---------------------------------------------------------------------------------------------
# Acceptance check 3: schedules, and only SLOW advances the outer count.

def test_schedules_and_outer_count():
  tx = fs.fast_slow(0.01, 1500, forget_alpha=25.0, momentum=0.0, weight_decay=0.0,
                    max_norm=None)
  params = {"w": jnp.zeros((1,))}
  ones = {"w": jnp.ones((1,))}
  fast = jax.jit(lambda s: tx.update(ones, s, params, phase=FAST))
  slow = jax.jit(lambda s: tx.update(ones, s, params, phase=SLOW))

  def eta_c(state):
    u_fast, after_fast = fast(state)
    u_slow, after_slow = slow(after_fast)
    eta = -float(u_slow["w"][0])
    c = float(u_fast["w"][0]) / eta   # FAST update = −η·(−c·g)
    return eta, c, after_fast, after_slow

  state = tx.init(params)
  eta, c, after_fast, after_slow = eta_c(state)
  assert eta == pytest.approx(0.01, rel=1e-6) and c == pytest.approx(25.0, rel=1e-6)
  assert int(after_fast.outer_count) == 0 and int(after_slow.outer_count) == 1
  eta1, c1, _, _ = eta_c(after_slow)
  shape1 = 0.5 * (1 + math.cos(math.pi / 1500))
  assert eta1 == pytest.approx(0.01 * shape1, rel=1e-6)
  assert c1 == pytest.approx(25.0 * shape1, rel=1e-5)
  eta, c, _, after = eta_c(fs.set_outer_count(state, 750))
  assert eta == pytest.approx(0.005, rel=1e-5) and c == pytest.approx(12.5, rel=1e-5)
  assert int(after.outer_count) == 751
  assert fs.schedule_values(fs.set_outer_count(state, 750), 0.01, 25.0, 1500) == (
      pytest.approx(0.005), pytest.approx(12.5))
  # Past T the schedules stay at 0 (clamped).
  u_slow, _ = slow(fs.set_outer_count(state, 1600))
  assert float(u_slow["w"][0]) == pytest.approx(0.0, abs=1e-12)



def test_schedule_every_gives_torch_per_epoch_cosine():
  # torch: CosineAnnealingLR(opt, T_max=E) stepped after every epoch of K iterations gives
  # η_e = η₀·½(1 + cos(π·e/E)) for all K iterations of epoch e.
  epochs, per_epoch, lr0 = 4, 3, 0.1
  tx = fs.fast_slow(lr0, epochs * per_epoch, forget_alpha=0.0, momentum=0.0, weight_decay=0.0,
                    max_norm=None, schedule_every=per_epoch)
  params, ones = {"w": jnp.zeros((1,))}, {"w": jnp.ones((1,))}
  slow = jax.jit(lambda s: tx.update(ones, s, params, phase=SLOW))
  state = tx.init(params)
  for t in range(epochs * per_epoch):
    expected = lr0 * 0.5 * (1 + math.cos(math.pi * (t // per_epoch) / epochs))
    assert fs.schedule_values(state, lr0, 0.0, epochs * per_epoch,
                              schedule_every=per_epoch)[0] == pytest.approx(expected)
    update, state = slow(state)
    assert -float(update["w"][0]) == pytest.approx(expected, rel=1e-6), t
  with pytest.raises(ValueError, match="schedule_every"):
    fs.fast_slow(lr0, 10, forget_alpha=0.0, schedule_every=0)


# ---------------------------------------------------------------------------------------------
# Acceptance check 6: the mask is not a freeze.

def test_masked_coordinates_move_through_momentum_and_weight_decay():
  lr, mu, wd = 0.1, 0.9, 0.01
  tx = fs.fast_slow(lr, 10, forget_alpha=2.0, momentum=mu, weight_decay=wd,
                    schedule="constant", forget_alpha_schedule="constant", max_norm=None)
  params = {"a": jnp.array([1.0, 2.0]), "b": jnp.array([3.0])}
  state = fs.set_mask(tx.init(params), {"a": jnp.array([0.0, 1.0]), "b": jnp.array([0.0])})
  g_slow = {"a": jnp.array([0.5, -0.5]), "b": jnp.array([1.0])}
  u1, state = tx.update(g_slow, state, params, phase=SLOW)
  buf1 = {"a": np.array([0.5 + wd * 1.0, -0.5 + wd * 2.0]), "b": np.array([1.0 + wd * 3.0])}
  np.testing.assert_allclose(u1["a"], -lr * buf1["a"], rtol=1e-6)
  params = optax.apply_updates(params, u1)
  g_fast = {"a": jnp.array([4.0, 4.0]), "b": jnp.array([4.0])}
  u2, state = tx.update(g_fast, state, params, phase=FAST)
  p = {k: np.asarray(v) for k, v in params.items()}
  d = {"a": np.array([0.0, -2.0 * 4.0]), "b": np.array([0.0])}   # −c·g, masked
  want = {k: -lr * (mu * buf1[k] + d[k] + wd * p[k]) for k in p}
  for k in p:
    np.testing.assert_allclose(np.asarray(u2[k]), want[k], rtol=1e-6)
  # Masked coordinates moved (a[0], b[0]), with no gradient contribution.
  assert abs(float(u2["a"][0])) > 1e-3 and abs(float(u2["b"][0])) > 1e-3


# ---------------------------------------------------------------------------------------------
# Acceptance check 7: the masked FAST update is clipped, the SLOW gradient is not.

def test_clip_bounds_the_masked_fast_update_only():
  kw = dict(momentum=0.0, weight_decay=0.0, schedule="constant",
            forget_alpha_schedule="constant")
  tx = fs.fast_slow(1.0, 10, forget_alpha=1.0, max_norm=7.0, **kw)
  params = {"a": jnp.zeros(3), "b": jnp.zeros(2)}
  state = fs.set_mask(tx.init(params), {"a": jnp.ones(3), "b": jnp.zeros(2)})
  big = {"a": jnp.array([30.0, -40.0, 0.0]), "b": jnp.array([1e3, 1e3])}
  u, _ = tx.update(big, state, params, phase=FAST)
  norm = float(optax.tree.norm(u))
  assert norm <= 7.0 and norm == pytest.approx(7.0 * 50 / (50 + 1e-6), rel=1e-6)
  np.testing.assert_allclose(np.asarray(u["b"]), 0.0)
  # The norm is taken after the mask: a small unmasked part is not scaled by a large masked one.
  small = {"a": jnp.array([1.0, 2.0, 2.0]), "b": jnp.array([1e3, 1e3])}
  u, _ = tx.update(small, state, params, phase=FAST)
  np.testing.assert_allclose(np.asarray(u["a"]), [1.0, 2.0, 2.0], rtol=1e-6)
  u, _ = tx.update(big, state, params, phase=SLOW)
  np.testing.assert_allclose(np.asarray(u["b"]), [-1e3, -1e3])
  # The optax form: exactly max_norm.
  tx = fs.fast_slow(1.0, 10, forget_alpha=1.0, max_norm=7.0, clip="optax", **kw)
  u, _ = tx.update(big, fs.set_mask(tx.init(params), state.mask), params, phase=FAST)
  assert float(optax.tree.norm(u)) == pytest.approx(7.0, rel=1e-6)
  # An optional SLOW clip.
  tx = fs.fast_slow(1.0, 10, forget_alpha=1.0, slow_max_norm=1.0, **kw)
  u, _ = tx.update(big, tx.init(params), params, phase=SLOW)
  assert float(optax.tree.norm(u)) <= 1.0


# ---------------------------------------------------------------------------------------------
# Acceptance check 8: Lookahead.

def _iteration(tx, state, params, g_fast, g_slow):
  u, state = tx.update(g_fast, state, params, phase=FAST)
  params = optax.apply_updates(params, u)
  u, state = tx.update(g_slow, state, params, phase=SLOW)
  return optax.apply_updates(params, u), state


def test_lookahead_beta_scales_the_net_change():
  params = {"w": jnp.array([1.0, -2.0, 0.5])}
  gf, gs = {"w": jnp.array([0.3, 0.1, -0.2])}, {"w": jnp.array([-0.4, 0.2, 0.6])}
  one = fs.fast_slow(0.1, 10, forget_alpha=2.0)
  half = fs.fast_slow(0.1, 10, forget_alpha=2.0, beta=0.5)
  s1, s2 = one.init(params), half.init(params)
  assert isinstance(s1.anchor, optax.EmptyState)        # β = 1 keeps no copy
  p1, s1 = _iteration(one, s1, params, gf, gs)
  p2, s2 = _iteration(half, s2, params, gf, gs)
  d1, d2 = p1["w"] - params["w"], p2["w"] - params["w"]
  np.testing.assert_allclose(np.asarray(d2), 0.5 * np.asarray(d1), rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(np.asarray(s2.anchor["w"]), np.asarray(p2["w"]), rtol=1e-6)
  # β = 1 equals the plain alternation written without any Lookahead.
  plain = optax.chain(optax.add_decayed_weights(5e-4), optax.trace(0.9))
  ps = plain.init(params)
  q = params
  for g, scale in ((gf, -2.0), (gs, 1.0)):
    g = jax.tree_util.tree_map(lambda x: scale * x, g)
    d, ps = plain.update(g, ps, q)
    q = jax.tree_util.tree_map(lambda p, x: p - 0.1 * x, q, d)
  np.testing.assert_allclose(np.asarray(p1["w"]), np.asarray(q["w"]), rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# State handling.

def test_set_mask_and_bad_arguments():
  tx = fs.fast_slow(0.1, 10, forget_alpha=1.0)
  params = {"a": jnp.zeros((2, 3)), "b": {"c": jnp.zeros(4)}}
  state = tx.init(params)
  chained = optax.chain(optax.identity(), tx).init(params)
  mask = {"a": np.ones((2, 3)), "b": {"c": np.array([0, 1, 0, 1])}}
  new = fs.set_mask(chained, mask)
  got = fs.get_state(new).mask
  assert got["b"]["c"].dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(got["b"]["c"]), [0, 1, 0, 1])
  with pytest.raises(ValueError, match="mask"):
    fs.set_mask(state, {"a": np.ones((2, 3))})
  with pytest.raises(ValueError, match="mask"):
    fs.set_mask(state, {"a": np.ones((3, 2)), "b": {"c": np.ones(4)}})
  with pytest.raises(ValueError, match="phase"):
    tx.update(params, state, params)
  with pytest.raises(ValueError, match="base"):
    fs.fast_slow(0.1, 10, forget_alpha=1.0, base="lion")
  with pytest.raises(ValueError, match="beta"):
    fs.fast_slow(0.1, 10, forget_alpha=1.0, beta=0.0)


def test_bfloat16_params_keep_their_dtype():
  tx = fs.fast_slow(0.1, 10, forget_alpha=1.0, base="adamw", weight_decay=0.05)
  params = {"w": jnp.ones(3, jnp.bfloat16)}
  u, state = tx.update({"w": jnp.ones(3, jnp.bfloat16)}, tx.init(params), params, phase=FAST)
  assert u["w"].dtype == jnp.bfloat16
  assert int(state.outer_count) == 0
  # With Lookahead the state keeps its dtypes across a SLOW step (no retracing, same checkpoint).
  tx = fs.fast_slow(0.1, 10, forget_alpha=1.0, beta=0.5)
  s0 = tx.init(params)
  u, s1 = tx.update({"w": jnp.ones(3, jnp.bfloat16)}, s0, params, phase=SLOW)
  assert u["w"].dtype == jnp.bfloat16
  assert (jax.tree_util.tree_map(lambda x: x.dtype, s0)
          == jax.tree_util.tree_map(lambda x: x.dtype, s1))


# ---------------------------------------------------------------------------------------------
# Any parameter tree: a BatchNorm ResNet through the mutable train step, a LoRA tree; and the
# state (mask included) survives a checkpoint.

def test_resnet_with_batchnorm_state_and_checkpoint(tmp_path):
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
      if adaptive:
        loss = losses.adaptive_ascent_loss(logits, b["label"], b["mask"])
      else:
        loss = losses.cross_entropy(logits, b["label"], b["mask"])
      return loss, ({}, new)
    return loss_fn

  tx = fs.fast_slow(0.01, 4, forget_alpha=25.0)
  mesh = train.make_mesh(jax.devices()[:1])
  fast = train.make_train_step(make_loss("forget", True), tx, mesh, mutable=True,
                               update_kwargs={"phase": FAST})
  slow = train.make_train_step(make_loss("remain", False), tx, mesh, mutable=True,
                               update_kwargs={"phase": SLOW})
  state = train.create_state(variables["params"], tx, seed=0,
                             model_state={"batch_stats": variables["batch_stats"]})
  mask = jax.tree_util.tree_map(lambda p: (jnp.arange(p.size).reshape(p.shape) % 2)
                                .astype(jnp.float32), variables["params"])
  assert "scale" in mask["bn1"] and "bias" in mask["bn1"]
  state = state._replace(opt_state=fs.set_mask(state.opt_state, mask))
  r = np.random.RandomState(0)
  batch = lambda: {"image": r.randn(4, 8, 8, 3).astype(np.float32),
                   "label": r.randint(0, 3, 4).astype(np.int32),
                   "mask": np.array([1, 1, 1, 0], np.float32)}
  before = np.array(state.model_state["batch_stats"]["bn1"]["mean"])
  state, m = fast(state, {}, {"forget": batch()}, {})
  # The FAST step runs in train mode: forget batches update the running statistics.
  assert not np.allclose(np.asarray(state.model_state["batch_stats"]["bn1"]["mean"]), before)
  state, _ = slow(state, {}, {"remain": batch()}, {})
  assert np.isfinite(m["loss"]) and int(fs.get_state(state.opt_state).outer_count) == 1

  ckpt = checkpoint.Checkpointer(str(tmp_path / "ckpt"))
  ckpt.save(2, state, {"note": "fast-slow"})
  ckpt.wait()
  abstract = jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(np.shape(x), jnp.asarray(x).dtype), state)
  restored, meta = ckpt.restore_latest(abstract)
  ckpt.close()
  for a, b in zip(jax.tree_util.tree_leaves(restored), jax.tree_util.tree_leaves(state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  np.testing.assert_array_equal(np.asarray(fs.get_state(restored.opt_state).mask["bn1"]["scale"]),
                                np.asarray(mask["bn1"]["scale"]))


def test_works_on_a_lora_tree(tiny):
  cfg, model, params = tiny
  spec = lora.LoraSpec(rank=2)
  tree = lora.init(params, spec, jax.random.key(1))
  tx = fs.fast_slow(0.01, 10, forget_alpha=5.0, base="adamw", weight_decay=0.05)
  state = fs.set_mask(tx.init(tree), jax.tree_util.tree_map(jnp.zeros_like, tree))
  images = jnp.ones((2, cfg.image_size, cfg.image_size, cfg.channels))

  def loss(t):
    logits = lora.apply(model, params, t, images, scale=spec.scale)
    return losses.adaptive_ascent_loss(logits, jnp.array([0, 1]))
  g = jax.jit(jax.grad(loss))(tree)
  u, state = jax.jit(lambda g, s, p: tx.update(g, s, p, phase=FAST))(g, state, tree)
  # All-zero mask: the AdamW step of a zero gradient is the decoupled weight decay alone.
  want = jax.tree_util.tree_map(lambda p: -0.01 * 0.05 * p, tree)
  for a, b in zip(jax.tree_util.tree_leaves(u), jax.tree_util.tree_leaves(want)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-9)


def test_adamw_count_advances_on_both_phases():
  tx = fs.fast_slow(0.1, 10, forget_alpha=1.0, base="adamw")
  params = {"w": jnp.ones(2)}
  state = tx.init(params)
  _, state = tx.update(params, state, params, phase=FAST)
  _, state = tx.update(params, state, params, phase=SLOW)
  _, state = tx.update(params, state, params, phase=SLOW)
  adam = state.inner_state[0]
  assert int(adam.count) == 3 and int(state.outer_count) == 2


def test_custom_base_with_injected_learning_rate():
  """An `inject_hyperparams` base inside fast_slow: same updates, and the host sets its rate."""
  def injected():
    return optax.inject_hyperparams(lambda learning_rate: optax.chain(
        optax.add_decayed_weights(5e-4), optax.sgd(learning_rate, momentum=0.9)))(
            learning_rate=0.01)
  ours = fs.fast_slow(0.01, 10, forget_alpha=3.0, schedule="constant", max_norm=1.0)
  custom = fs.fast_slow(None, 10, forget_alpha=3.0, base=injected(), max_norm=1.0)
  params = {"w": jnp.array([1.0, -2.0, 0.5])}
  mask = {"w": jnp.array([1.0, 0.0, 1.0])}
  s1, s2 = fs.set_mask(ours.init(params), mask), fs.set_mask(custom.init(params), mask)
  for phase, g in ((FAST, [0.3, 0.1, -2.0]), (SLOW, [-0.4, 0.2, 0.6]), (SLOW, [1.0, 1.0, 1.0])):
    g = {"w": jnp.array(g)}
    u1, s1 = ours.update(g, s1, params, phase=phase)
    u2, s2 = custom.update(g, s2, params, phase=phase)
    np.testing.assert_allclose(np.asarray(u2["w"]), np.asarray(u1["w"]), rtol=1e-6)
    params = optax.apply_updates(params, u1)
  assert int(s2.outer_count) == 2
  # Through the train step: a host hyper-parameter reaches the injected rate.
  mesh = train.make_mesh(jax.devices()[:1])
  tx = fs.fast_slow(None, 10, forget_alpha=3.0, base=injected())
  step = train.make_train_step(lambda p, f, b, r: (jnp.sum(p["w"] * b["x"]["v"]), {}), tx,
                               mesh, update_kwargs={"phase": SLOW})
  state = train.create_state({"w": jnp.zeros(2)}, tx, seed=0)
  state, _ = step(state, {}, {"x": {"v": jnp.ones((2,))}}, {"learning_rate": 0.5})
  np.testing.assert_allclose(np.asarray(state.params["w"]), [-0.5, -0.5], rtol=1e-6)
  with pytest.raises(ValueError, match="learning_rate"):
    fs.fast_slow(None, 10, forget_alpha=1.0)
