"""Weight-saliency masks: which parameters the unlearning (ascent) step may use.

SFR-on's balanced mask keeps a weight when it matters at least as much for the forget
data as for the remain data, measured by empirical-Fisher diagonals:

    F_s[w] = (1/n) Σ_{b=1..n} (∂L_s(b)/∂w)²        (L_s(b): mean loss of minibatch b of D_s)
    M[w]   = 1[(F_U[w] + 1e-15) / (F_R[w] + 1e-15) ≥ γ],   γ = 1,

a global absolute threshold over every parameter (BatchNorm affine included). It is the
binarised diagonal of the saliency matrix p_U·H_U·H_R⁻¹ of the fast-slow derivation. UG-CLU
names a "balanced weight saliency mask" without a formula; `clu_ratio_mask` is our
reconstruction with the partition weights and the new-data Fisher F_L.

SalUn's mask (a baseline) keeps instead the global top fraction of |Σ_b ∇(−L_U(b))|.

All masks are float32 {0, 1} trees with the params' structure, ready for
`kswap_jax.optim.fast_slow.set_mask`.

References: Huang et al., arXiv 2409.19732 (SFR-on); arXiv 2505.15178 (UG-CLU);
Fan et al., arXiv 2310.12508 (SalUn).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from kswap_jax import lora as lora_lib

Tree = Any
# grad_fn(params, batch) -> gradient tree of the minibatch-mean loss (the caller jits it and
# chooses the model mode: eval mode, i.e. BatchNorm on running statistics, for SFR-on).
GradFn = Callable[[Tree, Any], Tree]

EPS = 1e-15
LEARN_IN = ("denominator", "numerator")


@jax.jit
def _add_square(acc: Tree, grads: Tree) -> Tree:
  return jax.tree_util.tree_map(lambda a, g: a + jnp.square(g.astype(jnp.float32)), acc, grads)


@jax.jit
def _add(acc: Tree, grads: Tree) -> Tree:
  return jax.tree_util.tree_map(lambda a, g: a + g.astype(jnp.float32), acc, grads)


def _zeros_f32(params: Tree) -> Tree:
  return jax.tree_util.tree_map(lambda p: jnp.zeros(jnp.shape(p), jnp.float32), params)


def fisher_diagonal(grad_fn: GradFn, params: Tree, batches: Iterable[Any]) -> Tree:
  """Empirical-Fisher diagonal from minibatch-mean gradients, accumulated in float32.

      F[w] = (1/n) Σ_b g_b[w]²,      g_b = ∇ (mean loss of minibatch b)

  Every batch the iterable yields counts once (as one pass over a torch loader, whose
  last batch may be smaller): yield only batches with at least one valid sample.

  Args:
    grad_fn: (params, batch) -> gradient tree of the minibatch-mean loss; jitted by the
      caller, in eval mode for SFR-on's mask (BatchNorm on running statistics).
    params: the weights at which the Fisher is taken (the pre-unlearning weights).
    batches: one pass over the data (SFR-on uses the training augmentations here).

  Returns:
    A float32 tree with the params' structure.

  Example:
    >>> grad_fn = jax.jit(jax.grad(lambda p, b: eval_mean_ce(p, b)))
    >>> f_u = fisher_diagonal(grad_fn, params, forget_batches)

  References: Huang et al., arXiv 2409.19732 (SFR-on, `get_weight_saliency_mask`).
  """
  acc, n = _zeros_f32(params), 0
  for batch in batches:
    acc = _add_square(acc, grad_fn(params, batch))
    n += 1
  if n == 0:
    raise ValueError("batches: empty; the Fisher diagonal needs at least one batch")
  return jax.tree_util.tree_map(lambda a: a / n, acc)


def gradient_magnitude(grad_fn: GradFn, params: Tree, batches: Iterable[Any]) -> Tree:
  """SalUn's saliency |Σ_b g_b|: the magnitude of the summed minibatch gradients.

  `grad_fn` should return the gradient of the forget loss SalUn uses (−CE on D_U); the
  sign does not matter once the absolute value is taken.
  """
  acc, n = _zeros_f32(params), 0
  for batch in batches:
    acc = _add(acc, grad_fn(params, batch))
    n += 1
  if n == 0:
    raise ValueError("batches: empty; the gradient magnitude needs at least one batch")
  return jax.tree_util.tree_map(jnp.abs, acc)


def _check_same_structure(a: Tree, b: Tree, arg: str) -> None:
  if jax.tree_util.tree_structure(a) != jax.tree_util.tree_structure(b):
    raise ValueError(f"{arg}: tree structure differs from the forget Fisher's")
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    if jnp.shape(x) != jnp.shape(y):
      raise ValueError(f"{arg}: a leaf has shape {jnp.shape(y)}, expected {jnp.shape(x)}")


def ratio_mask(numerator: Tree, denominator: Tree, threshold: float = 1.0,
               eps: float = EPS) -> Tree:
  """1[(num + ε) / (den + ε) ≥ γ] elementwise, as a float32 {0, 1} tree.

  Equal numerator and denominator (both 0 included) give a ratio of exactly 1, kept at γ = 1.
  """
  _check_same_structure(numerator, denominator, "denominator")
  return jax.tree_util.tree_map(
      lambda n, d: ((n.astype(jnp.float32) + eps) / (d.astype(jnp.float32) + eps)
                    >= threshold).astype(jnp.float32), numerator, denominator)


def balanced_ratio_mask(fisher_forget: Tree, fisher_remain: Tree, threshold: float = 1.0,
                        eps: float = EPS) -> Tree:
  """SFR-on's balanced saliency mask M = 1[(F_U + ε)/(F_R + ε) ≥ γ].

  Args:
    fisher_forget: F_U from `fisher_diagonal` over the forget data.
    fisher_remain: F_R over the remain data.
    threshold: γ, a global absolute threshold (1; SFR-on's DiT sweep uses 0.5 … 10).
    eps: the 1e-15 added to numerator and denominator.

  Returns:
    A float32 {0, 1} tree with the params' structure.

  Example:
    >>> mask = balanced_ratio_mask(f_u, f_r)
    >>> opt_state = fast_slow.set_mask(opt_state, mask)

  References: Huang et al., arXiv 2409.19732 (SFR-on).
  """
  return ratio_mask(fisher_forget, fisher_remain, threshold, eps)


def partition_weights(n_unlearn: int, n_remain: int, n_learn: int = 0
                      ) -> tuple[float, float, float]:
  """(p_U, p_R, p_L) = |D_s| / (|D_U| + |D_R| + |D_L|): the data-share reading of UG-CLU's
  partition weights (our reconstruction)."""
  total = n_unlearn + n_remain + n_learn
  if total <= 0:
    raise ValueError("n_unlearn, n_remain, n_learn: at least one partition must be non-empty")
  return n_unlearn / total, n_remain / total, n_learn / total


def clu_ratio_mask(fisher_unlearn: Tree, fisher_remain: Tree, fisher_learn: Tree | None = None,
                   *, p_unlearn: float = 1.0, p_remain: float = 1.0, p_learn: float = 1.0,
                   learn_in: str = "denominator", threshold: float = 1.0,
                   eps: float = EPS) -> Tree:
  """UG-CLU balanced saliency mask (reconstruction): SFR-on's rule with the new data F_L.

      learn_in="denominator" (default):  M = 1[(p_U·F_U + ε) / (p_R·F_R + p_L·F_L + ε) ≥ γ]
      learn_in="numerator":               M = 1[(p_U·F_U + p_L·F_L + ε) / (p_R·F_R + ε) ≥ γ]

  The denominator form follows the saliency matrix p_U·H_U·(p_R·H_R + p_L·H_L)⁻¹ when the
  new data belongs to the preserved side; the numerator form balances unlearning and
  learning saliency against the remain data (learning inside the fast step). Without F_L
  and with p_U = p_R (the defaults are all 1) it is exactly `balanced_ratio_mask`.

  Args:
    fisher_unlearn: F_U.
    fisher_remain: F_R.
    fisher_learn: F_L, or None when the stage has no new data.
    p_unlearn, p_remain, p_learn: partition weights (see `partition_weights` for the
      data-share choice); only their ratios matter.
    learn_in: where F_L enters, "denominator" or "numerator".
    threshold: γ.
    eps: the constant added to numerator and denominator.

  Returns:
    A float32 {0, 1} tree with the params' structure.

  References: Huang et al., arXiv 2505.15178 (UG-CLU).
  """
  if learn_in not in LEARN_IN:
    raise ValueError(f"learn_in: expected one of {', '.join(LEARN_IN)}, got {learn_in!r}")
  num = jax.tree_util.tree_map(lambda f: p_unlearn * f.astype(jnp.float32), fisher_unlearn)
  den = jax.tree_util.tree_map(lambda f: p_remain * f.astype(jnp.float32), fisher_remain)
  _check_same_structure(num, den, "fisher_remain")
  if fisher_learn is not None:
    _check_same_structure(num, fisher_learn, "fisher_learn")
    add = lambda a, f: a + p_learn * f.astype(jnp.float32)
    if learn_in == "denominator":
      den = jax.tree_util.tree_map(add, den, fisher_learn)
    else:
      num = jax.tree_util.tree_map(add, num, fisher_learn)
  return ratio_mask(num, den, threshold, eps)


def topk_mask(saliency: Tree, fraction: float) -> Tree:
  """SalUn's mask: 1 on the global top `fraction` of all saliency values, 0 elsewhere.

  Exactly ⌊fraction · N⌋ entries are kept over all N parameters; among equal values the
  earlier position (in the tree's leaf order) wins.

  Args:
    saliency: e.g. `gradient_magnitude` of the forget loss.
    fraction: in [0, 1] (SFR-on's SalUn baseline keeps 0.2 on CIFAR-10).

  Returns:
    A float32 {0, 1} tree with the params' structure.

  References: Fan et al., arXiv 2310.12508 (SalUn, `generate_mask.py`).
  """
  if not 0.0 <= fraction <= 1.0:
    raise ValueError(f"fraction: expected a value in [0, 1], got {fraction}")
  leaves, treedef = jax.tree_util.tree_flatten(saliency)
  flat = jnp.concatenate([jnp.ravel(x).astype(jnp.float32) for x in leaves])
  k = int(flat.size * fraction)
  keep = jnp.zeros(flat.shape, jnp.float32)
  if k > 0:
    _, idx = jax.lax.top_k(flat, k)
    keep = keep.at[idx].set(1.0)
  out, start = [], 0
  for x in leaves:
    out.append(keep[start:start + x.size].reshape(jnp.shape(x)))
    start += x.size
  return jax.tree_util.tree_unflatten(treedef, out)


def mask_sparsity(mask: Tree) -> dict[str, Any]:
  """Summary of a {0, 1} mask: kept count and fraction overall and per "/"-joined leaf.

  Returns:
    {"kept": int, "total": int, "kept_fraction": float,
     "per_leaf": {name: kept fraction}}.
  """
  per_leaf, kept, total = {}, 0, 0
  for name, leaf in lora_lib.named_leaves(mask):
    x = np.asarray(jax.device_get(leaf))
    k = int(np.count_nonzero(x))
    per_leaf[name] = k / x.size if x.size else float("nan")
    kept += k
    total += x.size
  return {"kept": kept, "total": total,
          "kept_fraction": kept / total if total else float("nan"), "per_leaf": per_leaf}
