"""The ViT's speed options: each keeps the reference results, or stays within a stated tolerance.

Reference path = the literal flax formulation, `nn.Dropout` + `nn.gelu(approximate=False)`,
float32, no remat, no scan. Correctness only: nothing here is timed (see kswap_jax.bench).
"""

import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from kswap_jax import bench, lora, losses, train
from kswap_jax.errors import ConfigError
from kswap_jax.models import vit


def _cfg(**kw):
  cfg = ml_collections.ConfigDict(vit.DEFAULTS)
  cfg.update(variant="test/4", image_size=16, num_classes=10, dropout=0.1)
  cfg.update(kw)
  return cfg


def _setup(cfg):
  """Base params with a random head and a LoRA tree with non-zero a and b on the FFN."""
  model = vit.build(cfg)
  base = vit.init_params(model, _cfg(), jax.random.key(0))  # always the unscanned layout
  head = base["head"]["kernel"]
  base["head"]["kernel"] = jax.random.normal(jax.random.key(1), head.shape) * 0.3
  tree = lora.init(base, lora.LoraSpec(rank=4), jax.random.key(2))
  tree = jax.tree_util.tree_map(
      lambda x: x + 0.05 * jax.random.normal(jax.random.key(3), x.shape), tree)
  return model, base, tree


IMAGES = jax.random.normal(jax.random.key(4), (3, 16, 16, 3))
LABELS = jnp.array([1, 7, 3])


def _loss_and_grads(model, base, tree, train=True):
  def loss(t):
    logits = lora.apply(model, base, t, IMAGES, scale=0.25, train=train,
                        rngs={"dropout": jax.random.key(5)})
    return losses.cross_entropy(logits, LABELS), logits
  (value, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(tree)
  return value, logits, grads


def _reference(monkeypatch, gelu=True, dropout=True):
  """Swaps the literal flax formulation into the module (same module names, same keys)."""
  if dropout:
    monkeypatch.setattr(vit, "Dropout", lambda rate, **_: nn.Dropout(rate))
  if gelu:
    monkeypatch.setattr(vit, "activation", lambda x, kind: nn.gelu(x, approximate=False))


def _max_rel(a, b):
  return max(float(jnp.max(jnp.abs(x - y)) / jnp.max(jnp.abs(y)))
             for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


# -- GELU -------------------------------------------------------------------------------------

@pytest.mark.users_xla_flags
def test_custom_gelu_forward_is_bitwise_the_erf_gelu():
  x = jnp.concatenate([jnp.linspace(-10.0, 10.0, 2001),
                       jax.random.normal(jax.random.key(0), (4096,)) * 3])
  np.testing.assert_array_equal(vit.gelu(x), nn.gelu(x, approximate=False))
  xb = x.astype(jnp.bfloat16)
  np.testing.assert_array_equal(vit.gelu(xb), nn.gelu(xb, approximate=False))
  assert vit.gelu(xb).dtype == jnp.bfloat16


def test_custom_gelu_gradient_equals_jax_grad_of_erf_gelu():
  x = jnp.concatenate([jnp.linspace(-10.0, 10.0, 2001),
                       jax.random.normal(jax.random.key(0), (4096,)) * 3])
  g = jax.random.normal(jax.random.key(1), x.shape)
  got = jax.vjp(vit.gelu, x)[1](g)[0]
  want = jax.vjp(lambda y: nn.gelu(y, approximate=False), x)[1](g)[0]
  # Same derivative, other rounding order: a few float32 ulp.
  np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-7)
  # ... and both are the exact derivative Φ(x) + x φ(x) (float64 reference).
  x64 = np.asarray(x, np.float64)
  from scipy.special import erfc
  exact = 0.5 * erfc(-x64 / np.sqrt(2)) + x64 * np.exp(-x64 ** 2 / 2) / np.sqrt(2 * np.pi)
  np.testing.assert_allclose(got, np.asarray(g, np.float64) * exact, rtol=1e-5, atol=1e-6)
  # the tanh approximation is another function: the test can tell them apart
  tanh = jax.vjp(lambda y: nn.gelu(y, approximate=True), x)[1](g)[0]
  assert float(jnp.max(jnp.abs(tanh - want))) > 1e-4


# -- Dropout ----------------------------------------------------------------------------------

class _TwoDropouts(nn.Module):
  cls: type
  rate: float = 0.3

  @nn.compact
  def __call__(self, x):
    x = self.cls(self.rate)(x, deterministic=False)
    return self.cls(self.rate)(jnp.sin(x), deterministic=False)


@pytest.mark.users_xla_flags
def test_compact_dropout_is_bitwise_flax_dropout_values_and_gradients():
  x = jax.random.normal(jax.random.key(0), (4, 37, 64))
  rngs = {"dropout": jax.random.key(1)}
  ours, theirs = _TwoDropouts(vit.Dropout), _TwoDropouts(nn.Dropout)
  f = lambda m: jax.jit(jax.value_and_grad(
      lambda x: jnp.sum(m.apply({}, x, rngs=rngs) ** 2)))(x)
  (v1, g1), (v2, g2) = f(ours), f(theirs)
  np.testing.assert_array_equal(v1, v2)
  np.testing.assert_array_equal(g1, g2)
  y = ours.apply({}, x, rngs=rngs)
  assert 0.2 < float(jnp.mean(y == 0)) < 0.6  # it does drop (0.3 then 0.3 of sin)


@pytest.mark.users_xla_flags
@pytest.mark.parametrize("shape", [(3, 37, 64), (1001,), (2, 5, 3072)])
def test_unrolled_threefry_bits_and_mask_are_jax_bitwise(shape):
  key = jax.random.key(7)
  size = int(np.prod(shape))
  np.testing.assert_array_equal(vit.random_bits(key, size),
                                jax.random.bits(key, (size,), jnp.uint32))
  keep, keep_prob = vit.keep_mask(key, 0.9, shape)
  np.testing.assert_array_equal(keep, jax.random.bernoulli(key, 0.9, shape))
  assert keep_prob == 0.9
  np.testing.assert_array_equal(vit.unpack_mask(vit.pack_mask(keep), shape), keep)
  assert vit.pack_mask(keep).shape == (-(-size // 8),)


@pytest.mark.parametrize("bits,realised", [(16, 58982 / 65536), (8, 230 / 256)])
def test_fewer_dropout_bits_keep_the_rate_up_to_rounding(bits, realised):
  keep, keep_prob = vit.keep_mask(jax.random.key(3), 0.9, (400, 1000), bits)
  assert keep_prob == realised
  assert abs(float(jnp.mean(keep)) - realised) < 0.003
  y = vit.Dropout(0.1, bits=bits).apply({}, jnp.ones((400, 1000)), deterministic=False,
                                        rngs={"dropout": jax.random.key(3)})
  np.testing.assert_allclose(float(jnp.mean(y)), 1.0, atol=0.01)  # unbiased


def test_rbg_dropout_is_an_option_with_other_masks_and_the_same_rate():
  x = jnp.ones((64, 1000))
  rngs = {"dropout": jax.random.key(1)}
  a = vit.Dropout(0.1).apply({}, x, deterministic=False, rngs=rngs)
  b = vit.Dropout(0.1, rng="rbg").apply({}, x, deterministic=False, rngs=rngs)
  assert float(jnp.mean(a != b)) > 0.05
  assert abs(float(jnp.mean(b == 0)) - 0.1) < 0.01
  np.testing.assert_allclose(jnp.unique(b), [0.0, 1 / 0.9], rtol=1e-6)


# -- Whole model: defaults against the literal reference formulation --------------------------

def _grads_beside_reference(monkeypatch, **cfg):
  """(LoRA grads of the model with `cfg`, the reference's), after checking that the
  logits and the loss are bitwise the reference's (same masks, same forward)."""
  model, base, tree = _setup(_cfg(**cfg))
  v, logits, grads = _loss_and_grads(model, base, tree)
  _reference(monkeypatch)
  rv, rlogits, rgrads = _loss_and_grads(vit.build(_cfg()), base, tree)
  np.testing.assert_array_equal(logits, rlogits)
  np.testing.assert_array_equal(v, rv)
  return grads, rgrads


@pytest.mark.users_xla_flags
def test_defaults_give_the_reference_logits_bitwise_and_its_grads_to_rounding(monkeypatch):
  grads, rgrads = _grads_beside_reference(monkeypatch)
  # The default GELU recomputes jax's own derivative in the backward pass; XLA fuses it
  # into other instructions than the reference's, so the rounding may differ (~1e-7).
  assert _max_rel(grads, rgrads) < 1e-6


@pytest.mark.users_xla_flags
def test_autodiff_gelu_gives_the_reference_grads_bitwise(monkeypatch):
  grads, rgrads = _grads_beside_reference(monkeypatch, gelu="erf_autodiff")
  same = jax.tree_util.tree_map(lambda a, b: bool(jnp.array_equal(a, b)), grads, rgrads)
  assert all(jax.tree_util.tree_leaves(same))


@pytest.mark.users_xla_flags
def test_default_gelu_backward_is_jax_derivative_and_keeps_only_its_input():
  x = jnp.concatenate([jnp.linspace(-10.0, 10.0, 2001),
                       jax.random.normal(jax.random.key(0), (4096,)) * 3])
  g = jax.random.normal(jax.random.key(1), x.shape)
  np.testing.assert_array_equal(vit.erf_gelu(x), nn.gelu(x, approximate=False))
  got = jax.jit(lambda x, g: jax.vjp(vit.erf_gelu, x)[1](g)[0])(x, g)
  want = jax.jit(lambda x, g: jax.vjp(lambda y: nn.gelu(y, approximate=False), x)[1](g)[0])(x, g)
  np.testing.assert_array_equal(got, want)  # alone, the recomputation is bitwise jax's
  # What the forward pass keeps for the backward pass: x alone (autodiff keeps 3 arrays).
  kept = lambda f: jax.tree_util.tree_leaves(jax.vjp(f, x)[1])
  assert sum(leaf.size for leaf in kept(vit.erf_gelu)) == x.size
  assert sum(leaf.size for leaf in kept(lambda y: nn.gelu(y, approximate=False))) > 2 * x.size


def test_custom_vjp_gelu_model_keeps_logits_and_grads_to_rounding(monkeypatch):
  grads, rgrads = _grads_beside_reference(monkeypatch, gelu="erf_custom_vjp")
  # The custom backward rounds differently (a few ulp per element).
  assert _max_rel(grads, rgrads) < 1e-5


# -- Attention layout -------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_heads_first_attention_is_flax_attention_to_rounding(dtype):
  q, k, v = (jax.random.normal(jax.random.key(i), (2, 17, 3, 8)).astype(dtype)
             for i in range(3))
  low = dtype != jnp.float32
  got = vit.heads_first_attention(q, k, v, softmax_float32=low)
  want = nn.dot_product_attention(q, k, v, dtype=dtype,
                                  **({"force_fp32_for_softmax": True} if low else {}))
  assert got.dtype == want.dtype  # float32 when the softmax is (flax's convention)
  tol = 1e-6 if dtype == jnp.float32 else 2e-2
  np.testing.assert_allclose(np.float32(got), np.float32(want), rtol=0, atol=tol)
  # the contraction really is over keys: a shuffled value order changes the output
  assert float(jnp.max(jnp.abs(got - vit.heads_first_attention(q, k, v[:, ::-1])))) > 1e-2


def test_heads_first_model_keeps_logits_and_grads_to_rounding():
  _, base, tree = _setup(_cfg())
  _, logits, grads = _loss_and_grads(vit.build(_cfg()), base, tree)
  _, h_logits, h_grads = _loss_and_grads(vit.build(_cfg(attention="heads_first")), base, tree)
  np.testing.assert_allclose(h_logits, logits, rtol=0,
                             atol=1e-5 * float(jnp.max(jnp.abs(logits))))
  assert _max_rel(h_grads, grads) < 1e-5


def test_heads_first_falls_back_to_flax_under_attention_dropout():
  _, base, tree = _setup(_cfg())
  a = _loss_and_grads(vit.build(_cfg(attention_dropout=0.2)), base, tree)[1]
  b = _loss_and_grads(vit.build(_cfg(attention_dropout=0.2, attention="heads_first")),
                      base, tree)[1]
  np.testing.assert_array_equal(a, b)  # same masks, same code path


def test_tanh_gelu_is_a_different_function():
  _, base, tree = _setup(_cfg())
  _, a, _ = _loss_and_grads(vit.build(_cfg()), base, tree, train=False)
  _, b, _ = _loss_and_grads(vit.build(_cfg(gelu="tanh")), base, tree, train=False)
  assert float(jnp.max(jnp.abs(a - b))) > 1e-6


# -- Accelerator options: bf16, remat, scan ----------------------------------------------------

def test_bfloat16_compute_matches_float32_within_tolerance():
  _, base, tree = _setup(_cfg())
  v32, l32, g32 = _loss_and_grads(vit.build(_cfg()), base, tree)
  v16, l16, g16 = _loss_and_grads(vit.build(_cfg(dtype="bfloat16")), base, tree)
  assert l16.dtype == jnp.float32  # logits (and so the loss) stay float32
  assert jax.tree_util.tree_leaves(g16)[0].dtype == jnp.float32  # parameters stay float32
  # bf16 keeps 8 mantissa bits (relative step 2^-8 = 0.4%); through 2 blocks and the head:
  scale = float(jnp.max(jnp.abs(l32)))
  assert float(jnp.max(jnp.abs(l16 - l32))) < 0.03 * scale
  assert abs(float(v16) - float(v32)) < 0.02 * abs(float(v32))
  assert _max_rel(g16, g32) < 0.1
  cos = lambda a, b: float(jnp.vdot(a, b) / (jnp.linalg.norm(a) * jnp.linalg.norm(b)))
  flat = lambda t: jnp.concatenate([x.ravel() for x in jax.tree_util.tree_leaves(t)])
  assert cos(flat(g16), flat(g32)) > 0.995
  assert float(jnp.max(jnp.abs(l16 - l32))) > 0  # bf16 really ran


@pytest.mark.users_xla_flags
@pytest.mark.parametrize("policy", ["nothing_saveable", "dots_with_no_batch_dims_saveable"])
def test_remat_matches_no_remat(policy):
  _, base, tree = _setup(_cfg())
  v, l, g = _loss_and_grads(vit.build(_cfg()), base, tree)
  rv, rl, rg = _loss_and_grads(vit.build(_cfg(remat=True, remat_policy=policy)), base, tree)
  np.testing.assert_array_equal(l, rl)  # the forward (and its dropout masks) is the same
  assert _max_rel(rg, g) < 1e-6  # recomputation may reorder float ops in the backward


def test_scan_params_round_trip_bitwise_and_match_the_scanned_init():
  cfg = _cfg()
  base = vit.init_params(vit.build(cfg), cfg, jax.random.key(0))
  scanned = vit.scan_params(base)
  assert "encoderblock_0" not in scanned["Transformer"]
  assert scanned["Transformer"]["encoderblock"]["MlpBlock_3"]["Dense_0"]["kernel"].shape == (
      2, 64, 128)
  back = vit.unscan_params(scanned)
  assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(base)
  for x, y in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(base)):
    np.testing.assert_array_equal(x, y)
  scan_cfg = _cfg(scan=True)
  raw = vit.VisionTransformer(vit.vit_config(scan_cfg))  # the scanned module itself
  abstract = jax.eval_shape(lambda: raw.init(jax.random.key(0), IMAGES)["params"])
  shapes = lambda t: {n: x.shape for n, x in lora.named_leaves(t)}
  assert shapes(abstract) == shapes(scanned)
  # `build` with model.scan hides the layout: its parameters are the checkpoint's.
  built = jax.eval_shape(lambda: vit.init_params(vit.build(scan_cfg), scan_cfg,
                                                 jax.random.key(0)))
  assert shapes(built) == shapes(base)


def test_scanned_encoder_gives_the_same_logits_and_lora_gradients():
  _, base, tree = _setup(_cfg())
  _, logits, grads = _loss_and_grads(vit.build(_cfg()), base, tree, train=False)
  tol = float(jnp.max(jnp.abs(logits)))
  for remat in (False, True):
    model = vit.CheckpointLayout(vit.build(_cfg(scan=True, remat=remat)))
    _, s_logits, s_grads = _loss_and_grads(model, vit.scan_params(base), tree, train=False)
    # XLA fuses the loop body differently from the unrolled blocks: float32 rounding only.
    np.testing.assert_allclose(s_logits, logits, rtol=0, atol=1e-5 * tol)
    assert jax.tree_util.tree_structure(s_grads) == jax.tree_util.tree_structure(grads)
    assert _max_rel(s_grads, grads) < 1e-5
  # The stacked LoRA tree works directly too.
  model = vit.build(_cfg(scan=True))
  direct = lora.apply(model, vit.scan_params(base), vit.scan_params(tree), IMAGES, scale=0.25)
  np.testing.assert_allclose(direct, logits, rtol=0, atol=1e-5 * tol)


def test_scanned_encoder_trains_with_dropout():
  _, base, tree = _setup(_cfg())
  model = vit.CheckpointLayout(vit.build(_cfg(scan=True, remat=True, dtype="bfloat16")))
  v, _, g = _loss_and_grads(model, vit.scan_params(base), tree)
  assert np.isfinite(float(v))
  assert all(float(jnp.abs(x).max()) > 0 for x in jax.tree_util.tree_leaves(g))


def test_face_transformer_with_speed_options():
  cfg = ml_collections.ConfigDict(vit.FACE_DEFAULTS)
  cfg.update(variant="test/4", image_size=16, num_classes=6)
  model = vit.build(cfg)
  base = vit.init_params(model, cfg, jax.random.key(0))
  assert "bias" not in base["Transformer"]["encoderblock_0"][
      "MultiHeadDotProductAttention_1"]["query"]
  ref = model.apply({"params": base}, IMAGES, labels=LABELS)
  cfg.update(scan=True, remat=True)
  got = vit.CheckpointLayout(vit.build(cfg)).apply({"params": base}, IMAGES, labels=LABELS)
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
  cfg.update(dtype="bfloat16")
  got = vit.CheckpointLayout(vit.build(cfg)).apply({"params": base}, IMAGES, labels=LABELS)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, ref, atol=0.05 * float(jnp.abs(ref).max()))


@pytest.mark.parametrize("field,value", [("gelu", "relu"), ("attention", "flash"),
                                         ("dropout_mask", "bits"),
                                         ("dropout_rng", "philox"), ("dtype", "float16"),
                                         ("dropout_bits", 4),
                                         ("remat_policy", "save_only_these_names"),
                                         ("remat_policy", "no_such_policy")])
def test_bad_speed_fields_raise_config_error_naming_the_field(field, value):
  cfg = _cfg(remat=True)
  cfg[field] = value
  with pytest.raises(ConfigError, match=f"model.{field}"):
    vit.build(cfg)


# -- The benchmark's own plumbing (tiny model, one timed step: nothing timed is asserted) ------

def test_bench_writes_figures_and_its_model_gets_lora_gradients(tmp_path):
  path = tmp_path / "bench.json"
  rc = bench.main(["--variant=test/4", "--image_size=16", "--batch_size=2", "--steps=1",
                   "--warmup=1", "--no_pipeline", f"--json={path}"])
  assert rc == 0
  res = json.loads(path.read_text())
  st = res["step_result"]
  assert st["step"] == "forget" and st["images_per_step"] == 4
  assert st["flops_per_step"] > 0 and res["matmul_peak"]["flops_per_s"] > 0
  assert 0 < res["matmul_peak_fraction"]
  assert st["last_grad_norm"] > 0  # the random head gives every LoRA factor a gradient
  assert st["memory"]["host_peak_rss_bytes"] > 0


def test_bench_counts_the_whole_step_s_flops_on_several_devices(tmp_path):
  """XLA's cost analysis of a partitioned step is one device's share; the bench reports the
  whole step's, so the same global batch costs the same FLOPs on 1 and on 4 devices."""
  from conftest import REPO, one_multidevice_process  # pylint: disable=import-outside-toplevel
  args = ["--variant=test/4", "--image_size=16", "--batch_size=4", "--steps=1", "--warmup=0",
          "--no_pipeline"]
  assert bench.main([*args, f"--json={tmp_path / 'one.json'}"]) == 0
  env = dict(os.environ, JAX_PLATFORMS="cpu", KSWAP_HOST_MEMORY="glibc", XLA_FLAGS=" ".join(
      [os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=4"]).strip())
  with one_multidevice_process():
    proc = subprocess.run([sys.executable, "-m", "kswap_jax.bench", *args,
                           f"--json={tmp_path / 'four.json'}"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  one, four = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "four"))
  assert four["devices"].startswith("4 x") and one["devices"].startswith("1 x")
  np.testing.assert_allclose(four["step_result"]["flops_per_step"],
                             one["step_result"]["flops_per_step"], rtol=0.1)
  # Simulated CPU devices share the cores one device's matmul uses: one device's peak.
  assert "per device" not in proc.stdout
  np.testing.assert_allclose(four["matmul_peak_fraction"] * four["matmul_peak"]["flops_per_s"],
                             four["step_result"]["achieved_flops_per_s"], rtol=1e-6)


def test_bench_jpeg_pipeline_reads_and_decodes_an_array_record_dataset(tmp_path):
  # The JPEG pipeline's data: real JPEG files in a tfds array_record dataset, decoded.
  source = bench._jpeg_dataset(str(tmp_path))  # pylint: disable=protected-access
  assert len(source) == bench.JPEG_IMAGES
  image = source[0]["image"]
  assert image.shape == (bench.JPEG_SIZE[1], bench.JPEG_SIZE[0], 3) and image.std() > 20
  path = tmp_path / "pipe.json"
  assert bench.main(["--pipeline_only", "--pipeline_data=jpeg", "--image_size=32",
                     "--batch_size=4", f"--json={path}"]) == 0
  pipe = json.loads(path.read_text())["pipeline"]
  assert pipe["source"] == "JPEG 500x375 array_record -> 32px" and pipe["images_per_s"] > 0


def test_bench_profile_attributes_the_step_to_hlo_instructions(tmp_path):
  """--profile traces one step and sums per-instruction time; on CPU it must turn on XLA's
  per-instruction trace events before jax starts, hence a fresh process."""
  path = tmp_path / "bench.json"
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
  proc = subprocess.run([sys.executable, "-m", "kswap_jax.bench", "--variant=test/4",
                         "--image_size=16", "--batch_size=2", "--steps=1", "--warmup=0",
                         "--no_pipeline", f"--profile={tmp_path / 'trace'}", f"--json={path}"],
                        env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  prof = json.loads(path.read_text())["step_result"]["profile"]
  kinds = prof["by_kind"]
  assert kinds.get("matmul", 0) > 0 and kinds.get("elementwise/other", 0) > 0, prof
  assert os.path.exists(prof["trace"])
  # The slowest instructions are named by the jax operations they come from (which ones
  # lead depends on the machine's load: on a tiny model any kind can).
  assert any("VisionTransformer" in op["op"] for op in prof["top"]), prof["top"]
  assert "profile of one step" in proc.stdout


@pytest.mark.parametrize("step,direction", [("ug_clu_fast", +1), ("ug_clu_slow", -1),
                                            ("gs_lora_prox", -1)])
def test_bench_method_steps_move_their_loss_the_right_way(step, direction):
  """FAST ascends its forget loss, SLOW and GS-LoRA descend theirs (same batch, no dropout):
  the benchmarked steps are the methods' real updates, not placeholders."""
  args = bench.parse_args(["--variant=test/4", "--image_size=16", "--batch_size=4",
                           f"--step={step}", "--dropout=0", "--no_pipeline"])
  s = bench.setup(args)
  state = train.replicate(bench._state(s, 0), s["mesh"])  # pylint: disable=protected-access
  frozen = train.replicate(s["base"], s["mesh"])
  seen = []
  for _ in range(4):
    state, m = s["step"](state, frozen, s["batch"], s["hp"])
    seen.append(float(m["loss"]))
  assert direction * (seen[-1] - seen[0]) > 0, seen
  if step == "gs_lora_prox":
    assert "alpha" in s["hp"]  # the group-lasso prox strength is injected into the optimizer


def test_compare_torch_without_torch_exits_2(capsys):
  pytest.importorskip("numpy")
  try:
    import torch  # noqa: F401
    pytest.skip("torch is installed")
  except ImportError:
    pass
  assert bench.main(["--variant=test/4", "--image_size=16", "--batch_size=2",
                     "--compare_torch", "--no_pipeline"]) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: --compare_torch: PyTorch is not installed") and "pip install" in err


def test_bench_compare_times_each_named_variant(capsys):
  assert bench.main(["--variant=test/4", "--image_size=16", "--batch_size=2", "--steps=2",
                     "--no_pipeline", "--compare", " before = --dropout_mask=flax ; after="]) == 0
  rows = [line.split(":")[0].strip() for line in capsys.readouterr().out.splitlines()
          if "wall median" in line]
  assert rows == ["before", "after"]


@pytest.mark.parametrize("flags, message", [
    (["--steps=0"], "error: --steps: expected an int >= 1, got 0"),
    (["--batch_size=-1"], "error: --batch_size: expected an int >= 0"),
    (["--rank=0"], "error: --rank: expected an int >= 1"),
    (["--dropout=1.5"], "error: --dropout: expected a rate in [0, 1)"),
    (["--variant=foo"], "error: model.variant: unknown variant 'foo'"),
    # Checked before anything compiles (they used to fail after the whole benchmark).
    ([f"--json={__file__}/x.json"], f"error: --json {__file__}/x.json: {__file__} is a file"),
    ([f"--profile={__file__}"], f"error: --profile {__file__}: is a file; expected a folder"),
    (["--pipeline_only"], "error: --pipeline_only with --no_pipeline leaves nothing"),
    (["--compare=garbage"], "error: --compare: 'garbage' is not NAME=FLAGS"),
    (["--compare=a=;b=--gelu=tanh;a=--scan"], "error: --compare: variant name 'a' given twice"),
    (["--compare=a=--rank=0;b="], "error: --compare: variant 'a': --rank: expected an int >= 1"),
    (["--compare=only="], "error: --compare: expected two or more variants"),
])
def test_bad_bench_flags_exit_2_with_one_line(flags, message, capsys):
  try:
    code = bench.main([*flags, "--no_pipeline"])
  except SystemExit as e:  # argparse's usage errors
    code = e.code
  err = capsys.readouterr().err
  assert code == 2 and err.startswith(message) and err.count("\n") == 1, err


# -- XLA:CPU options --------------------------------------------------------------------------

def _compiled_temp_bytes(*flags, **compile_kw):
  args = bench.parse_args(["--variant=test/4", "--image_size=32", "--batch_size=4",
                           "--no_pipeline", *flags])
  s = bench.setup(args)
  state = train.replicate(bench._state(s, 0), s["mesh"])
  lowered = s["step"].lower(state, bench._frozen(s, args, s["mesh"]), s["batch"], s["hp"])
  return lowered.compile(**compile_kw).memory_analysis().temp_size_in_bytes, s["mesh"]


def test_cpu_train_step_uses_the_memory_scheduler_unless_xla_flags_name_one(monkeypatch):
  plain, mesh = _compiled_temp_bytes()  # the jitted train step as a run compiles it
  memory, _ = _compiled_temp_bytes(compiler_options=train.compiler_options(mesh, "memory"))
  default, _ = _compiled_temp_bytes(compiler_options=train.compiler_options(mesh, "default"))
  assert plain == memory < default
  monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_DEFAULT")
  assert train.compiler_options(mesh) is None  # the user's XLA_FLAGS win


def test_default_gelu_step_needs_less_memory_than_autodiff_gelu():
  ours, _ = _compiled_temp_bytes()
  autodiff, _ = _compiled_temp_bytes("--gelu=erf_autodiff")
  assert ours < autodiff
