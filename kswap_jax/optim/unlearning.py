"""Update rules of the machine-unlearning baselines (FT, GA, RL, SalUn, ℓ1-sparse) as optax
transformations, with torch semantics where the references run torch.

    saliency_mask          u ← M ⊙ u                 (SalUn: the mask on the raw gradient)
    add_l1_subgradient     u ← u + α(k)·sign(θ)      (ℓ1-sparse: ∇ of α(k)·‖θ‖₁)
    clip_by_global_norm_torch  u ← u·min(1, c/(‖u‖ + 1e-6))   (GA: torch `clip_grad_norm_`)
    sgd                    torch SGD: d = u + wd·θ, buf = μ·buf + d, θ ← θ − η(k)·buf
    epoch_schedule         η(k) constant within an epoch of `steps_per_epoch` steps

The baselines chain them, e.g. SalUn = `chain(saliency_mask(), sgd(...))`; the mask is
installed at a stage's start with `set_saliency_mask` (all ones until then). As in torch, a
masked coordinate still moves through weight decay and momentum (the mask is not a freeze)
unless a second `saliency_mask` also masks the final update.

References: Fan et al., arXiv 2310.12508 (SalUn); Jia et al., arXiv 2304.04934
(ℓ1-sparse unlearning); Huang et al., arXiv 2409.19732 (SFR-on, whose code ships the
FT/GA/RL/SalUn baselines these defaults come from).
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from kswap_jax.optim import fast_slow

Tree = Any
SCHEDULES = ("cosine", "constant")


class SaliencyMaskState(NamedTuple):
  """State of `saliency_mask`: the float32 {0, 1} mask, params-shaped (all ones at init)."""
  mask: Tree


def saliency_mask() -> optax.GradientTransformation:
  """Multiplies the incoming updates by a {0, 1} saliency mask held in the state.

      u ← M ⊙ u

  The mask is all ones after `init`; `set_saliency_mask` installs another (e.g. SalUn's
  `saliency.topk_mask`) without touching the rest of a chained state.

  Returns:
    An `optax.GradientTransformation` with `SaliencyMaskState`.

  Example:
    >>> tx = optax.chain(saliency_mask(), sgd(0.007))
    >>> state = set_saliency_mask(tx.init(params), saliency.topk_mask(grad_abs, 0.2))

  References: Fan et al., arXiv 2310.12508 (SalUn).
  """
  def init_fn(params):
    return SaliencyMaskState(jax.tree_util.tree_map(
        lambda p: jnp.ones(jnp.shape(p), jnp.float32), params))

  def update_fn(updates, state, params=None):
    del params
    return jax.tree_util.tree_map(lambda u, m: (u * m).astype(u.dtype), updates,
                                  state.mask), state
  return optax.GradientTransformation(init_fn, update_fn)


def _mask_states(opt_state: Any, fn) -> Any:
  """Applies fn to every SaliencyMaskState inside a (possibly chained) optax state."""
  is_mask = lambda x: isinstance(x, SaliencyMaskState)
  return jax.tree_util.tree_map(lambda x: fn(x) if is_mask(x) else x, opt_state,
                                is_leaf=is_mask)


def set_saliency_mask(opt_state: Any, mask: Tree) -> Any:
  """Installs `mask` in every `SaliencyMaskState` inside `opt_state` (a fresh float32 copy).

  Raises:
    ValueError: no `saliency_mask` state in `opt_state`, or a structure/shape mismatch.
  """
  found = []

  def replace(state):
    if jax.tree_util.tree_structure(state.mask) != jax.tree_util.tree_structure(mask):
      raise ValueError("mask: tree structure differs from the params'")
    for a, b in zip(jax.tree_util.tree_leaves(state.mask), jax.tree_util.tree_leaves(mask)):
      if jnp.shape(a) != jnp.shape(b):
        raise ValueError(f"mask: a leaf has shape {jnp.shape(b)}, its parameter "
                         f"{jnp.shape(a)}")
    found.append(state)
    return SaliencyMaskState(jax.tree_util.tree_map(
        lambda m, old: jax.device_put(jnp.array(m, jnp.float32, copy=True),
                                      getattr(old, "sharding", None)), mask, state.mask))
  out = _mask_states(opt_state, replace)
  if not found:
    raise ValueError("opt_state: holds no saliency_mask state")
  return out


def get_saliency_mask(opt_state: Any) -> Tree:
  """The mask of the first `SaliencyMaskState` in `opt_state` (ValueError if none)."""
  found = []
  _mask_states(opt_state, lambda s: found.append(s) or s)
  if not found:
    raise ValueError("opt_state: holds no saliency_mask state")
  return found[0].mask


def l1_norm(params: Tree) -> jax.Array:
  """‖θ‖₁ = Σ |θ_i| over every leaf, in float32 (the ℓ1-sparse penalty without α)."""
  return sum(jnp.sum(jnp.abs(p.astype(jnp.float32))) for p in jax.tree_util.tree_leaves(params))


class L1State(NamedTuple):
  """State of `add_l1_subgradient`: the number of updates taken (indexes α(k))."""
  count: jax.Array


def add_l1_subgradient(coefficient: float | Callable[[jax.Array], jax.Array]
                       ) -> optax.GradientTransformation:
  """Adds the gradient of α(k)·‖θ‖₁ to the updates.

      u ← u + α(k)·sign(θ),     k = updates taken so far

  sign(0) = 0, torch's gradient of `torch.linalg.norm(θ, ord=1)` at 0. Every leaf is
  penalised (the reference sums over `model.parameters()`, BatchNorm affine included).

  Args:
    coefficient: α, a float or a schedule k -> α(k) (`l1_schedule`).

  Returns:
    An `optax.GradientTransformation`; `update` needs params.

  Example:
    >>> tx = optax.chain(add_l1_subgradient(l1_schedule(5e-5, steps_per_epoch=10,
    ...                                                epochs=10)), sgd(0.01))

  References: Jia et al., arXiv 2304.04934 (ℓ1-sparse unlearning).
  """
  schedule = coefficient if callable(coefficient) else (lambda k: coefficient)

  def init_fn(params):
    del params
    return L1State(jnp.zeros((), jnp.int32))

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("params: add_l1_subgradient needs them")
    alpha = jnp.asarray(schedule(state.count), jnp.float32)
    new = jax.tree_util.tree_map(
        lambda u, p: (u + alpha * jnp.sign(p).astype(jnp.float32)).astype(u.dtype),
        updates, params)
    return new, L1State(optax.safe_int32_increment(state.count))
  return optax.GradientTransformation(init_fn, update_fn)


def clip_by_global_norm_torch(max_norm: float) -> optax.GradientTransformation:
  """u ← u·min(1, max_norm/(‖u‖ + 1e-6)), torch's `clip_grad_norm_` (stateless)."""
  if max_norm <= 0:
    raise ValueError(f"max_norm: expected a positive bound, got {max_norm}")

  def update_fn(updates, state, params=None):
    del params
    return fast_slow.clip_global_norm(updates, max_norm, "torch"), state
  return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def epoch_schedule(learning_rate: float, *, steps_per_epoch: int, epochs: int,
                   kind: str = "cosine") -> Callable[[jax.Array], jax.Array]:
  """η(k) for update k, constant within an epoch (torch schedulers stepped per epoch).

      cosine:    η(k) = η₀·½(1 + cos(π·e/E)),  e = ⌊k / steps_per_epoch⌋ (clamped at E)
      constant:  η(k) = η₀

  The cosine is `CosineAnnealingLR(T_max=E)` stepped once per epoch (eta_min 0).
  """
  if kind not in SCHEDULES:
    raise ValueError(f"kind: expected one of {', '.join(SCHEDULES)}, got {kind!r}")
  if steps_per_epoch < 1 or epochs < 1:
    raise ValueError(f"steps_per_epoch, epochs: expected >= 1, got {steps_per_epoch}, "
                     f"{epochs}")
  if kind == "constant":
    return lambda k: jnp.float32(learning_rate)

  def schedule(k):
    e = jnp.minimum(jnp.asarray(k, jnp.int32) // steps_per_epoch, epochs)
    return jnp.float32(learning_rate) * 0.5 * (
        1.0 + jnp.cos(jnp.float32(math.pi) * e.astype(jnp.float32) / epochs))
  return schedule


def l1_schedule(alpha: float, *, steps_per_epoch: int, epochs: int, no_l1_epochs: int = 0
                ) -> Callable[[jax.Array], jax.Array]:
  """ℓ1-sparse's linearly decaying coefficient, constant within an epoch.

      α(e) = α·(1 − e/(E − E₀))   for e < E − E₀,   0 afterwards   (α if E − E₀ = 0)

  with e = ⌊k / steps_per_epoch⌋, E the epochs and E₀ = `no_l1_epochs` (the last epochs
  without the penalty).

  References: Jia et al., arXiv 2304.04934 (`unlearn/FT.py` of its code).
  """
  if steps_per_epoch < 1 or not 0 <= no_l1_epochs <= epochs:
    raise ValueError(f"no_l1_epochs: expected 0 <= E₀ <= epochs ({epochs}), got "
                     f"{no_l1_epochs}")
  span = epochs - no_l1_epochs
  if span == 0:
    return lambda k: jnp.float32(alpha)

  def schedule(k):
    e = (jnp.asarray(k, jnp.int32) // steps_per_epoch).astype(jnp.float32)
    return jnp.where(e < span, jnp.float32(alpha) * (1.0 - e / span), 0.0)
  return schedule


def sgd(learning_rate: float | Callable[[jax.Array], jax.Array], *, momentum: float = 0.9,
        weight_decay: float = 5e-4) -> optax.GradientTransformation:
  """torch SGD: d = u + wd·θ (coupled decay), buf = μ·buf + d (buf = d at the first step),
  θ ← θ − η(k)·buf; no dampening, no Nesterov.

  Args:
    learning_rate: η, a float or a schedule k -> η(k) (`epoch_schedule`).
    momentum: μ; 0 disables the trace.
    weight_decay: wd, coupled (added to the gradient, as torch SGD).

  Returns:
    An `optax.GradientTransformation`; `update` needs params when wd > 0.
  """
  parts = []
  if weight_decay:
    parts.append(optax.add_decayed_weights(weight_decay))
  if momentum:
    parts.append(optax.trace(decay=momentum, nesterov=False))
  parts.append(optax.scale_by_learning_rate(learning_rate))
  return optax.chain(*parts)
