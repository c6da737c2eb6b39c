"""Group lasso over LoRA groups: the penalty Ω and its exact proximal step.

    Ω(θ) = Σ_g ||θ_g||_2,     prox_{τΩ}(θ)_g = max(0, 1 − τ / ||θ_g||_2) · θ_g,

with one group per transformer block by default (`kswap_jax.lora.groups`). The penalty is
what Knowledge Swapping and GS-LoRA add to the loss and differentiate (a subgradient
method); the proximal transform applies the exact block soft-thresholding after
the optimizer update instead, which can set whole groups to exactly zero.

References: Yuan & Lin 2006 (group lasso); Zhao et al., arXiv 2403.11530 (GS-LoRA);
Xing et al., arXiv 2502.08075 (Knowledge Swapping).
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import optax

from kswap_jax import lora as lora_lib
from kswap_jax.errors import ConfigError


def safe_norm(sq: jax.Array) -> jax.Array:
  """sqrt(sq) with gradient 0 (not NaN) at sq == 0 (the double-`where` trick)."""
  positive = sq > 0
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)


def group_norms(tree: lora_lib.Tree, grouping: str = "block") -> jax.Array:
  """Vector of ||θ_g||_2, one entry per group, in `lora.groups` order."""
  norms = []
  for names in lora_lib.groups(tree, grouping).values():
    sq = sum(jnp.sum(jnp.square(lora_lib.leaf_by_name(tree, n).astype(jnp.float32)))
             for n in names)
    norms.append(safe_norm(sq))
  if not norms:
    raise ConfigError("group_lasso: the LoRA tree has no leaves (expected a tree of "
                      "{'a', 'b'} pairs, as lora.init makes)")
  return jnp.stack(norms)


def group_lasso_penalty(tree: lora_lib.Tree, grouping: str = "block") -> jax.Array:
  """Ω = Σ_g ||θ_g||_2 over the raw LoRA factors; finite gradient everywhere.

  Args:
    tree: LoRA tree.
    grouping: "block", "module" or "leaf" (see `lora.groups`).

  Returns:
    A float32 scalar. For ViT-B/16 with rank 8 on fc1/fc2 and Knowledge Swapping's
    init it is ≈ 9.5 (12 blocks × ≈ 0.792).

  Example:
    >>> loss = ce + alpha * group_lasso_penalty(lora_tree)
  """
  return jnp.sum(group_norms(tree, grouping))


def group_lasso_prox(strength: float, learning_rate: float | jax.Array,
                     grouping: str = "block") -> optax.GradientTransformation:
  """Exact group-lasso proximal step applied after the optimizer's update.

  With θ⁺ = θ + u (u the incoming update), returns u' such that θ + u' = prox(θ⁺):

      θ_g ← max(0, 1 − η·λ / ||θ⁺_g||) · θ⁺_g,       η = learning_rate, λ = strength.

  Args:
    strength: λ ≥ 0 (the α of the papers).
    learning_rate: η: a float or a traced scalar, e.g. the one `optax.inject_hyperparams`
      passes to the whole chain, so the threshold follows the optimizer's schedule.
    grouping: "block", "module" or "leaf".

  Returns:
    An `optax.GradientTransformation`; place it last in `optax.chain`.

  Example:
    >>> tx = optax.chain(optax.adamw(1e-2, weight_decay=0.05),
    ...                  group_lasso_prox(0.005, 1e-2))

  Raises:
    ValueError: a negative `strength` (a number or concrete array; a traced one is not
      checked) or an unknown `grouping`, when the transform is built.

  References: Parikh & Boyd, "Proximal Algorithms" §6.5.4.
  """
  try:
    concrete = float(strength)
  except (TypeError, jax.errors.ConcretizationTypeError):  # traced: checked by its caller
    concrete = None
  if concrete is not None and not concrete >= 0:
    raise ValueError(f"strength: expected λ >= 0, got {concrete}")
  if grouping not in lora_lib.GROUPINGS:
    raise ValueError(f"grouping: unknown grouping {grouping!r} (expected one of "
                     f"{', '.join(lora_lib.GROUPINGS)})")

  def init_fn(params):
    del params
    return optax.EmptyState()

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("group_lasso_prox needs params: call tx.update(grads, state, params)")
    new = jax.tree_util.tree_map(lambda p, u: p + u, params, updates)
    norms = group_norms(new, grouping)
    # max(norm, tiny) only avoids 0/0 for an all-zero group, which stays exactly zero.
    shrink = jnp.maximum(0.0, 1.0 - learning_rate * strength / jnp.maximum(norms, 1e-30))
    factor = {}
    for i, names in enumerate(lora_lib.groups(new, grouping).values()):
      for n in names:
        factor[n] = shrink[i]
    out = {}
    for name, value in lora_lib.named_leaves(new):
      p = lora_lib.leaf_by_name(params, name)
      lora_lib.set_by_name(out, name.split("/"), (factor[name] * value - p).astype(p.dtype))
    chex.assert_trees_all_equal_structs(out, updates)
    return out, state

  return optax.GradientTransformation(init_fn, update_fn)
