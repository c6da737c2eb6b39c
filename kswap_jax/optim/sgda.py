"""Smoothing toward a running average of the weights: SCRUB-S's SGDA smoothing term.

The term p · Σ_k ‖θ_k − θ̄_k‖_F (one Frobenius norm per parameter tensor k, θ̄ held fixed)
is added to the loss of every step. Its gradient is added here to the incoming gradient
instead, so any loss can be smoothed without seeing θ̄:

    g_k ← g_k + p · (θ_k − θ̄_k) / ‖θ_k − θ̄_k‖_F          (0 where θ_k = θ̄_k)

θ̄ lives in this transform's state. It starts as a copy of the weights the state is
initialised with, and is refreshed at the steps where the `refresh` hyper-parameter is > 0
(inject it with `optax.inject_hyperparams`): the first refresh copies the current weights,
each later one moves it to (1 − β) θ̄ + β θ. The refresh uses the weights the step starts
from, so refreshing at the first step of an epoch is refreshing at the end of the previous
one. This is torch's `AveragedModel` with an exponential `avg_fn` and the reference's
`param_dist`, updated once per SCRUB super-epoch.

`group_of` maps a parameter's path ("Transformer/encoderblock_0/.../query/kernel") to its
tensor: leaves that map to one key share one norm. The PyTorch ViTs store the attention's
query, key and value projections as one fused tensor, which `fused_qkv` reproduces.

References: Zhang et al., arXiv 2010.15768 (smoothed gradient descent-ascent); Kurmanji et
al., arXiv 2302.09880 (SCRUB); Zhao et al., arXiv 2403.11530 (GS-LoRA, whose tables report
SCRUB-S).
"""

from __future__ import annotations

import re
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from kswap_jax import lora
from kswap_jax.optim.group_lasso import safe_norm

Tree = Any


class SmoothingState(NamedTuple):
  """θ̄ and the number of refreshes so far (0: the next refresh copies θ)."""
  average: Tree
  num_averaged: jax.Array


def _squares(params: Tree, average: Tree, group_of: Callable[[str], str]
             ) -> tuple[list[str], list[jax.Array], dict[str, jax.Array]]:
  """Per leaf its tensor key and θ − θ̄ (float32), and per key Σ (θ − θ̄)²."""
  keys = [group_of(name) for name, _ in lora.named_leaves(params)]
  diffs = [p.astype(jnp.float32) - a.astype(jnp.float32) for p, a in
           zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(average))]
  squares: dict[str, jax.Array] = {}
  for k, d in zip(keys, diffs):
    squares[k] = squares.get(k, 0.0) + jnp.sum(jnp.square(d))
  return keys, diffs, squares


def fused_qkv(name: str) -> str:
  """One key for an attention block's query, key and value kernels (and one for their
  biases), as the PyTorch ViTs store them (`to_qkv`, `qkv`, `in_proj_weight`)."""
  return re.sub(r"/(query|key|value)/", "/qkv/", name)


def smoothing(weight: float, beta: float = 0.1, refresh: float | jax.Array = 0.0,
              group_of: Callable[[str], str] | None = None) -> optax.GradientTransformation:
  """Adds the gradient of weight · Σ_k ‖θ_k − θ̄_k‖_F; refreshes θ̄ when `refresh` > 0.

  Args:
    weight: p, the term's weight (SCRUB-S: 0.1 for the 4-task CASIA runs, 0.05 otherwise).
    beta: β of the refresh θ̄ ← (1 − β) θ̄ + β θ (the reference's 0.1).
    refresh: > 0 at a step that refreshes θ̄ first (a traced scalar under
      `optax.inject_hyperparams`).
    group_of: parameter path -> tensor key (default: every leaf its own tensor).

  Returns:
    A transformation whose `update` needs `params`.

  Example:
    >>> tx = optax.inject_hyperparams(lambda learning_rate, refresh: optax.chain(
    ...     smoothing(0.1, refresh=refresh, group_of=fused_qkv), optax.adam(learning_rate)))(
    ...     learning_rate=1e-4, refresh=0.0)
  """
  group_of = group_of or (lambda name: name)

  def init_fn(params):
    return SmoothingState(average=jax.tree_util.tree_map(jnp.copy, params),
                          num_averaged=jnp.zeros((), jnp.int32))

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("smoothing: update needs params")
    now = jnp.asarray(refresh) > 0
    first = state.num_averaged == 0

    def refreshed(a, p):
      new = jnp.where(first, p, (1.0 - beta) * a + beta * p).astype(a.dtype)
      return jnp.where(now, new, a)
    average = jax.tree_util.tree_map(refreshed, state.average, params)
    num_averaged = state.num_averaged + now.astype(jnp.int32)

    keys, diffs, squares = _squares(params, average, group_of)
    scale = {}
    for k, sq in squares.items():
      norm = safe_norm(sq)
      scale[k] = jnp.where(norm > 0, weight / jnp.where(norm > 0, norm, 1.0), 0.0)
    new = [(u + scale[k] * d).astype(u.dtype)
           for u, k, d in zip(jax.tree_util.tree_leaves(updates), keys, diffs)]
    return (jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(updates), new),
            SmoothingState(average=average, num_averaged=num_averaged))

  return optax.GradientTransformation(init_fn, update_fn)


def smoothing_value(params: Tree, average: Tree, weight: float,
                    group_of: Callable[[str], str] | None = None) -> jax.Array:
  """weight · Σ_k ‖θ_k − θ̄_k‖_F: the term whose gradient `smoothing` adds (for logs and
  tests)."""
  _, _, squares = _squares(params, average, group_of or (lambda name: name))
  return weight * sum(safe_norm(sq) for sq in squares.values())
