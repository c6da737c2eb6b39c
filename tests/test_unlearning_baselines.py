"""The machine-unlearning baselines (FT, GA, RL, SalUn, ℓ1-sparse): their update rules on
hand-built cases, and their runs on UG-CLU's stream (data, learning stages and oracle
shared with `ug_clu`). The end-to-end and kill/resume checks are in test_conformance."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import load_config, method_run
from kswap_jax import methods
from kswap_jax.data import sources, splits
from kswap_jax.errors import ConfigError
from kswap_jax.methods.baselines import unlearning
from kswap_jax.methods.trainable import Trainable
from kswap_jax.optim import saliency
from kswap_jax.optim import unlearning as unlearn_tx


def test_salun_mask_is_the_top_k_of_the_summed_forget_gradient_magnitude():
  # Two forget batches; SalUn sums the gradients first, then takes |.|: |Σ| ≠ Σ|.|.
  grads = [{"a": jnp.array([3.0, -1.0, 0.5]), "b": {"c": jnp.array([[-2.0, 0.0, 1.0]])}},
           {"a": jnp.array([-3.0, -1.5, 0.5]), "b": {"c": jnp.array([[-0.5, 0.2, 0.4]])}}]
  it = iter(grads)
  magnitude = saliency.gradient_magnitude(lambda p, b: next(it), grads[0], range(2))
  # |Σ| = a: [0, 2.5, 1.0], c: [2.5, 0.2, 1.4]; the top 3 of 6 (fraction 0.5): 2.5, 2.5, 1.4.
  mask = saliency.topk_mask(magnitude, 0.5)
  np.testing.assert_array_equal(np.asarray(mask["a"]), [0.0, 1.0, 0.0])
  np.testing.assert_array_equal(np.asarray(mask["b"]["c"]), [[1.0, 0.0, 1.0]])
  # The transform applies it to the raw gradient before SGD (no momentum/decay here).
  tx = optax.chain(unlearn_tx.saliency_mask(), unlearn_tx.sgd(0.1, momentum=0.0,
                                                              weight_decay=0.0))
  params = jax.tree_util.tree_map(jnp.ones_like, grads[0])
  state = unlearn_tx.set_saliency_mask(tx.init(params), mask)
  updates, _ = tx.update(jax.tree_util.tree_map(jnp.ones_like, params), state, params)
  np.testing.assert_allclose(np.asarray(updates["a"]), [0.0, -0.1, 0.0])
  np.testing.assert_allclose(np.asarray(updates["b"]["c"]), [[-0.1, 0.0, -0.1]])
  with pytest.raises(ValueError, match="no saliency_mask"):
    unlearn_tx.set_saliency_mask(optax.sgd(0.1).init(params), mask)


def test_salun_mask_is_not_a_freeze_unless_asked():
  """Weight decay and momentum still move masked-out weights (torch: the mask multiplies
  the gradient); `freeze_unmasked` masks the final update too."""
  params = {"w": jnp.array([1.0, 1.0])}
  mask = {"w": jnp.array([1.0, 0.0])}
  grads = {"w": jnp.array([1.0, 1.0])}
  for freeze, expected in ((False, [-0.1 * (1 + 0.5), -0.1 * 0.5]),
                           (True, [-0.1 * (1 + 0.5), 0.0])):
    parts = [unlearn_tx.saliency_mask(), unlearn_tx.sgd(0.1, momentum=0.9, weight_decay=0.5)]
    tx = optax.chain(*(parts + [unlearn_tx.saliency_mask()] if freeze else parts))
    state = unlearn_tx.set_saliency_mask(tx.init(params), mask)
    updates, _ = tx.update(grads, state, params)
    np.testing.assert_allclose(np.asarray(updates["w"]), expected, rtol=1e-6)


def test_rl_labels_are_random_other_classes_drawn_once():
  labels = np.tile(np.arange(10), 50)
  src = sources.ArraySource(np.zeros((labels.size, 2, 2, 1), np.uint8), labels, 10, "toy")
  subset = splits.Subset(name="forget", source=src, indices=np.arange(labels.size),
                         label_map={c: c for c in range(10)})
  a = unlearning.relabel_other(subset, 10, seed=3)
  b = unlearning.relabel_other(subset, 10, seed=3)
  new = np.asarray(a.labels)
  assert new.shape == labels.shape and np.all(new != labels)
  assert new.min() >= 0 and new.max() < 10
  np.testing.assert_array_equal(new, b.labels)  # a pure function of the seed
  assert len(set(new[labels == 0].tolist())) == 9  # every other class is drawn
  assert not np.array_equal(new, unlearning.relabel_other(subset, 10, seed=4).labels)
  np.testing.assert_array_equal(a.indices, subset.indices)


class _Linear(nn.Module):
  """z = x·W (no bias), taking the `train` flag the stream losses pass."""

  @nn.compact
  def __call__(self, x, train=False):
    del train
    return nn.Dense(3, use_bias=False, kernel_init=nn.initializers.zeros)(
        x.reshape(x.shape[0], -1))


def test_ga_ascends_the_forget_cross_entropy_with_a_torch_clip():
  config = methods.default_config("clu_ga")
  model = _Linear()
  params = model.init(jax.random.key(0), jnp.zeros((1, 2)))["params"]
  batch = {"train": {"image": jnp.array([[1.0, 0.0]]), "label": jnp.array([0]),
                     "mask": jnp.array([1.0])}}
  ascent = unlearning.make_losses(Trainable(model), config, "clu_ga")["ascent"]
  (loss, (aux, _)), grads = jax.value_and_grad(ascent, has_aux=True)(
      params, {}, batch, jax.random.key(1), {})
  # W = 0: p = (1/3, 1/3, 1/3), CE = log 3; ∂(−CE)/∂W[0] = −(p − e_0) = (2/3, −1/3, −1/3).
  assert float(loss) == pytest.approx(-math.log(3.0)) and float(aux["ce_forget"]) > 0
  g = np.array([[2 / 3, -1 / 3, -1 / 3], [0.0, 0.0, 0.0]])
  np.testing.assert_allclose(np.asarray(grads["Dense_0"]["kernel"]), g, atol=1e-6)
  tx = unlearning.make_tx(config, "clu_ga")  # lr 1e-4, clip 0.1 (torch), momentum, wd
  updates, _ = tx.update(grads, tx.init(params), params)
  scale = 0.1 / (np.linalg.norm(g) + 1e-6)
  np.testing.assert_allclose(np.asarray(updates["Dense_0"]["kernel"]), -1e-4 * scale * g,
                             rtol=1e-5)
  # The step lowers the true class's logit: the forget CE goes up.
  assert float(updates["Dense_0"]["kernel"][0, 0]) < 0


def test_l1_term_its_gradient_and_its_linear_decay():
  params = {"a": jnp.array([1.0, -2.0]), "b": jnp.array([[0.5, 0.0], [-3.0, 4.0]])}
  assert float(unlearn_tx.l1_norm(params)) == pytest.approx(10.5)
  zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
  tx = unlearn_tx.add_l1_subgradient(0.25)
  updates, state = tx.update(zeros, tx.init(params), params)
  want = jax.grad(lambda p: 0.25 * unlearn_tx.l1_norm(p))(params)
  np.testing.assert_allclose(np.asarray(updates["a"]), np.asarray(want["a"]))
  np.testing.assert_allclose(np.asarray(updates["b"]), [[0.25, 0.0], [-0.25, 0.25]])
  assert int(state.count) == 1
  # α(e) = α(1 − e/(E − E₀)), per epoch of 2 steps: E = 4, E₀ = 0 and E₀ = 2.
  decay = unlearn_tx.l1_schedule(1.0, steps_per_epoch=2, epochs=4)
  assert [float(decay(k)) for k in (0, 1, 2, 4, 6, 8)] == [1.0, 1.0, 0.75, 0.5, 0.25, 0.0]
  late = unlearn_tx.l1_schedule(1.0, steps_per_epoch=2, epochs=4, no_l1_epochs=2)
  assert [float(late(k)) for k in (0, 2, 4, 7)] == [1.0, 0.5, 0.0, 0.0]


def test_sgd_is_torch_sgd_with_an_epoch_cosine():
  lr = unlearn_tx.epoch_schedule(0.1, steps_per_epoch=2, epochs=4)
  assert [float(lr(k)) for k in (0, 1, 2, 4)] == pytest.approx([0.1, 0.1, 0.0853553, 0.05])
  tx = unlearn_tx.sgd(lr, momentum=0.9, weight_decay=0.5)
  p, g = jnp.array([2.0]), jnp.array([1.0])
  state, buf, theta = tx.init(p), 0.0, 2.0
  for k in range(3):  # torch: d = g + wd·θ; buf = μ·buf + d; θ -= η(k)·buf
    u, state = tx.update(g, state, p)
    buf = 0.9 * buf + (1.0 + 0.5 * theta)
    theta -= float(lr(k)) * buf
    p = p + u
    assert float(p[0]) == pytest.approx(theta, rel=1e-6)


@pytest.mark.parametrize("override,field", [
    (("salun", "fraction", 1.5), "salun.fraction"),
    (("ga", "clip", "l2"), "ga.clip"),
    (("ga", "batchnorm", "frozen"), "ga.batchnorm"),
    (("l1_sparse", "no_l1_epochs", 20), "l1_sparse.no_l1_epochs"),
    (("rl", "lr", 0.0), "rl.lr"),
    (("rl", "mix", "interleaved"), "rl.mix"),
    (("ft", "batch_size", 0), "ft.batch_size"),
])
def test_bad_values_name_the_field(override, field):
  section, key, value = override
  method = {"salun": "clu_salun", "ga": "clu_ga", "l1_sparse": "clu_l1_sparse",
            "rl": "clu_rl", "ft": "clu_ft"}[section]
  config = load_config("ug_clu_digits", f"runlocal,method={method}")
  config[section][key] = value
  with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
    methods.run(config, "/nonexistent/never/written")


@pytest.mark.slow
def test_baselines_share_the_stream_and_the_oracle_with_ug_clu(tmp_path_factory):
  """Same data, plan and learning stages as ug_clu (identical learning-stage records), the
  same oracle values; only the unlearning stages differ. SalUn keeps ⌊0.2·N⌋ weights."""
  _, ref = method_run(tmp_path_factory, "ug_clu_digits", "runlocal")
  runs = {m: method_run(tmp_path_factory, "ug_clu_digits", f"runlocal,method={m}")[1]
          for m in ("clu_salun", "clu_ga")}
  for name, res in runs.items():
    assert [s["name"] for s in res["stages"]] == [s["name"] for s in ref["stages"]]
    assert res["stages"][:2] == ref["stages"][:2], name  # the learning stages
    for s, r in zip(res["stages"][2:], ref["stages"][2:]):
      assert s["oracle"] == r["oracle"] and math.isfinite(s["avg_gap"])
  assert runs["clu_salun"]["stages"][2]["ua"] != runs["clu_ga"]["stages"][2]["ua"] or \
      runs["clu_salun"]["stages"][2]["ra"] != runs["clu_ga"]["stages"][2]["ra"]
  for s in runs["clu_salun"]["stages"][2:]:
    assert 0.199 < s["mask_kept_fraction"] <= 0.2
  assert "mask_kept_fraction" not in runs["clu_ga"]["stages"][2]


@pytest.mark.slow
def test_rl_sequential_mix_passes_over_the_forget_then_the_retain_data(tmp_path):
  """`rl.mix = "sequential"` (SalUn's CIFAR-10 code): each epoch ⌈|D_U|/B⌉ steps on forget
  batches with fresh random labels, then ⌈|D_R|/B⌉ steps on retain batches."""
  import json  # pylint: disable=import-outside-toplevel
  config = load_config("ug_clu_digits", "runlocal,method=clu_rl")
  config.rl.mix, config.rl.iterations, config.rl.epochs = "sequential", 0, 1
  config.train.log_every_steps = 1
  results = methods.run(config, str(tmp_path))
  assert all(math.isfinite(s["avg_gap"]) for s in results["stages"][2:])
  records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  kinds = ["forget" if "forget/ce" in r else "retain" for r in records
           if r.get("stage") == "3_forget" and "eval" not in r]
  n_forget = math.ceil(254 / 32)  # |D_U| of digits 1 and 4 in the runlocal split
  assert kinds == ["forget"] * n_forget + ["retain"] * (len(kinds) - n_forget)
  assert len(kinds) == n_forget + math.ceil(504 / 32)  # |D_R| = 504
