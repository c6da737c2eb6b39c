"""Fast-slow alternation of SFR-on / UG-CLU as one optax transformation.

Each outer iteration t of the unlearning loop takes an optional FAST step (masked,
clipped gradient ascent on the forget data, every N_f iterations) followed by a SLOW step
(plain descent on the remain data). Both phases drive ONE base optimizer, so the momentum
(or Adam moments) accumulated on one phase acts on the other:

    FAST:  u = clip(M ⊙ (−c(t)·g_U)),      θ ← θ + base(u; θ, η(t))
    SLOW:  u = g_R,                        θ ← θ + base(u; θ, η(t)),      t ← t + 1
    η(t) = η₀·½(1 + cos(πt/T)),            c(t) = forget_alpha·½(1 + cos(πt/T)),

where g_U is the gradient of the (positive) adaptive forget loss, g_R that of the remain
loss, M the {0, 1} saliency mask and base the SGD or AdamW update. The alternation acts as
an implicit second-order preconditioner: successive remain steps damp the components of
the ascent step along high-curvature remain directions (the "online" remain Hessian).

The phase is a static keyword, so `train.make_train_step` compiles one step per phase:

    >>> tx = fast_slow.fast_slow(0.01, 1500, forget_alpha=25.0)
    >>> fast = train.make_train_step(forget_loss, tx, mesh, update_kwargs={"phase": FAST})
    >>> slow = train.make_train_step(remain_loss, tx, mesh, update_kwargs={"phase": SLOW})
    >>> state = state._replace(opt_state=fast_slow.set_mask(state.opt_state, mask))

Torch equivalence (the SFR-on classification loop, one torch optimizer for both steps):
  * SGD: d = g + wd·θ (coupled weight decay on BOTH phases, masked coordinates included),
    buf = μ·buf + d with buf = d on the very first step (optax's zero-initialised trace
    gives exactly that), no dampening, no Nesterov, θ ← θ − η(t)·buf.
  * AdamW: θ ← θ − η(t)·(m̂/(√v̂ + ε) + wd·θ), one step count advancing on both phases.
  * The mask multiplies the raw FAST gradient before clipping and before the base
    optimizer; it is not a freeze: masked coordinates keep moving through weight decay
    and momentum, exactly as in torch.
  * Clipping: torch's `clip_grad_norm_` scales by min(1, max_norm / (‖u‖ + 1e-6))
    (`clip="torch"`, default); `clip="optax"` uses `optax.clip_by_global_norm`'s
    min(1, max_norm / ‖u‖).
  * The schedules: torch's `CosineAnnealingLR(T_max=T)` stepped once per outer
    iteration, eta_min 0, in closed form; t is clamped at T (as optax's
    `cosine_decay_schedule`) where torch's schedule would rise again.
  * The FAST and SLOW steps of one iteration see the same η(t) and c(t); only SLOW
    advances t. The first step of the loop (t = 0) is FAST.
  * Lookahead (`beta`): θ ← θ_prev + β·(θ − θ_prev) after each SLOW step, θ_prev the
    weights at the end of the previous iteration. β = 1 (the released setting) is a no-op
    and keeps no copy of the parameters.

References: Huang et al., arXiv 2409.19732 (SFR-on, NeurIPS 2024); Huang et al.,
arXiv 2505.15178 (UG-CLU); Zhang et al., arXiv 1907.08610 (Lookahead).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

Tree = Any

FAST = "fast"
SLOW = "slow"
PHASES = (FAST, SLOW)
BASES = ("sgd", "adamw")
CLIPS = ("torch", "optax")
SCHEDULES = ("cosine", "constant")


class FastSlowState(NamedTuple):
  """State of `fast_slow`; checkpointed with the rest of the train state.

  Attributes:
    outer_count: int32, the outer iteration t every schedule reads; SLOW advances it.
    inner_state: the base optimizer's state (momentum, or Adam moments and count),
      shared by both phases.
    mask: float32 {0, 1} tree with the params' structure, applied to FAST gradients;
      all ones until `set_mask` installs a saliency mask.
    anchor: the weights at the end of the previous iteration (Lookahead, float32), only
      when β < 1; otherwise `optax.EmptyState()`.
  """
  outer_count: jax.Array
  inner_state: Any
  mask: Tree
  anchor: Any


def is_fast_iteration(t: int, forget_every: int) -> bool:
  """Whether outer iteration t takes a FAST step: t ≡ 0 (mod N_f), so t = 0 is one."""
  if forget_every < 1:
    raise ValueError(f"forget_every: expected N_f >= 1, got {forget_every}")
  return t % forget_every == 0


def step_counts(total_iterations: int, forget_every: int) -> tuple[int, int]:
  """(FAST steps, SLOW steps) over T outer iterations: (⌈T / N_f⌉, T).

  Example: step_counts(1500, 5) == (300, 1500) (the SFR-on CIFAR-10 setting).
  """
  fast = sum(is_fast_iteration(t, forget_every) for t in range(total_iterations))
  return fast, total_iterations


def cosine_shape(t: jax.Array, total_iterations: int) -> jax.Array:
  """½(1 + cos(π·min(t, T)/T)) in float32: 1 at t = 0, ½ at T/2, 0 at T."""
  frac = jnp.minimum(jnp.asarray(t, jnp.float32), total_iterations) / total_iterations
  return 0.5 * (1.0 + jnp.cos(jnp.float32(math.pi) * frac))


def clip_global_norm(tree: Tree, max_norm: float, form: str = "torch") -> Tree:
  """Scales `tree` so its global L2 norm is at most `max_norm`.

      torch:  u · min(1, max_norm / (‖u‖ + 1e-6))      (`torch.nn.utils.clip_grad_norm_`)
      optax:  u · min(1, max_norm / ‖u‖)                (`optax.clip_by_global_norm`)

  Args:
    tree: the update to clip.
    max_norm: the bound.
    form: "torch" or "optax".

  Returns:
    The clipped tree, same structure and dtypes.
  """
  norm = optax.tree.norm(tree)
  if form == "torch":
    scale = jnp.minimum(1.0, max_norm / (norm + 1e-6))
  elif form == "optax":
    scale = jnp.where(norm < max_norm, 1.0, max_norm / jnp.maximum(norm, 1e-30))
  else:
    raise ValueError(f"form: expected one of {', '.join(CLIPS)}, got {form!r}")
  return jax.tree_util.tree_map(lambda u: (u * scale).astype(u.dtype), tree)


def _base_optimizer(base: str, momentum: float, weight_decay: float, b1: float, b2: float,
                    eps: float) -> optax.GradientTransformation:
  """The base direction d before the step size: the update is then −η(t)·d."""
  if base == "sgd":
    parts = []
    if weight_decay:
      parts.append(optax.add_decayed_weights(weight_decay))
    if momentum:
      parts.append(optax.trace(decay=momentum, nesterov=False))
    return optax.chain(*parts) if parts else optax.identity()
  if base == "adamw":
    return optax.chain(optax.scale_by_adam(b1=b1, b2=b2, eps=eps),
                       optax.add_decayed_weights(weight_decay))
  raise ValueError(f"base: expected one of {', '.join(BASES)}, got {base!r}")


def fast_slow(learning_rate: float | None, total_iterations: int, *, forget_alpha: float,
              base: str | optax.GradientTransformation = "sgd", momentum: float = 0.9,
              weight_decay: float = 5e-4,
              b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
              max_norm: float | None = 7.0, slow_max_norm: float | None = None,
              clip: str = "torch", beta: float = 1.0, schedule: str = "cosine",
              forget_alpha_schedule: str = "cosine", schedule_every: int = 1,
              ) -> optax.GradientTransformationExtraArgs:
  """SFR-on's alternating masked-ascent / remain-descent optimizer.

  FAST (``phase=FAST``), on the gradient g of the positive forget loss:
      u ← −c(t)·g;  u ← M ⊙ u;  u ← clip(u, max_norm);  update ← −η(t)·base(u)
  SLOW (``phase=SLOW``), on the gradient g of the remain loss:
      u ← g [clip(u, slow_max_norm) if set];  update ← −η(t)·base(u);
      Lookahead if β < 1;  t ← t + 1
  with base(u) = μ-momentum of (u + wd·θ) for SGD, or m̂/(√v̂ + ε) + wd·θ for AdamW.

  Args:
    learning_rate: η₀, the step size at t = 0 (SFR-on CIFAR-10: 0.01); None with a
      custom `base` transformation, which carries its own rate.
    total_iterations: T, the number of outer iterations the cosines span (1500).
    forget_alpha: c₀, the FAST gradient scale at t = 0 (25).
    base: "sgd" (momentum + coupled weight decay, torch SGD), "adamw" (torch AdamW), or
      any optax transformation that produces the final update itself (its own learning
      rate and sign, e.g. `optax.inject_hyperparams(optax.sgd)(learning_rate=0.01)`, whose
      rate the train step's host `hparams` can then set); η(t), `schedule`, `momentum`,
      `weight_decay`, `b1`, `b2` and `eps` do not apply to it. c(t), the mask, the clips,
      Lookahead and the outer count work the same.
    momentum: μ for SGD (0.9); 0 disables the trace.
    weight_decay: coupled L2 for SGD (5e-4), decoupled decay for AdamW.
    b1, b2, eps: AdamW moments and denominator constant (torch defaults).
    max_norm: global-norm bound on the masked FAST update (7.0); None disables it.
    slow_max_norm: optional bound on the SLOW gradient (off: SFR-on classification;
      the SFR-on DDPM loop clips both phases at 1.0).
    clip: "torch" (default, for parity) or "optax" (see `clip_global_norm`).
    beta: Lookahead β in (0, 1]; 1 disables it (the released value).
    schedule: "cosine" (η(t) = η₀·½(1 + cos(πt/T))) or "constant" for η.
    forget_alpha_schedule: "cosine" (c(t) = c₀ times the same shape, as SFR-on's
      decayed `forget_alpha`) or "constant".
    schedule_every: K ≥ 1: η and c move every K outer iterations (evaluated at
      K·⌊t/K⌋): with T = E·K and K the iterations of one pass over the data, η follows a
      per-epoch cosine over E epochs, as torch's `CosineAnnealingLR(T_max=E)` stepped once
      per epoch. 1 (default): every iteration.

  Returns:
    An `optax.GradientTransformationExtraArgs`; `update(grads, state, params, *, phase)`
    needs params (weight decay) and the static phase.

  Example:
    >>> tx = fast_slow(0.01, 1500, forget_alpha=25.0)
    >>> state = set_mask(tx.init(params), saliency.balanced_ratio_mask(f_u, f_r))
    >>> updates, state = tx.update(forget_grads, state, params, phase=FAST)
    >>> updates, state = tx.update(remain_grads, state, params, phase=SLOW)

  References: Huang et al., arXiv 2409.19732 (SFR-on); arXiv 2505.15178 (UG-CLU).
  """
  if total_iterations < 1:
    raise ValueError(f"total_iterations: expected T >= 1, got {total_iterations}")
  if schedule_every < 1:
    raise ValueError(f"schedule_every: expected K >= 1, got {schedule_every}")
  if not 0.0 < beta <= 1.0:
    raise ValueError(f"beta: expected 0 < β <= 1, got {beta}")
  if clip not in CLIPS:
    raise ValueError(f"clip: expected one of {', '.join(CLIPS)}, got {clip!r}")
  for arg, value in (("schedule", schedule), ("forget_alpha_schedule", forget_alpha_schedule)):
    if value not in SCHEDULES:
      raise ValueError(f"{arg}: expected one of {', '.join(SCHEDULES)}, got {value!r}")
  for arg, value in (("max_norm", max_norm), ("slow_max_norm", slow_max_norm)):
    if value is not None and value <= 0:
      raise ValueError(f"{arg}: expected a positive bound or None, got {value}")
  custom = isinstance(base, optax.GradientTransformation)
  if custom:
    inner = optax.with_extra_args_support(base)
  else:
    if learning_rate is None:
      raise ValueError(f"learning_rate: needed with base {base!r} (None only with a custom "
                       f"base transformation)")
    inner = _base_optimizer(base, momentum, weight_decay, b1, b2, eps)
  use_anchor = beta < 1.0

  def shape(kind, t):
    if kind != "cosine":
      return jnp.float32(1.0)
    return cosine_shape(t // schedule_every * schedule_every, total_iterations)

  def init_fn(params):
    mask = jax.tree_util.tree_map(lambda p: jnp.ones(jnp.shape(p), jnp.float32), params)
    # float32 whatever the params' dtype, so the state's dtypes never change across steps.
    anchor = (jax.tree_util.tree_map(lambda p: jnp.array(p, dtype=jnp.float32, copy=True),
                                     params) if use_anchor else optax.EmptyState())
    # The base optimizer runs in float32 (its moments too), whatever the params' dtype.
    inner_state = inner.init(jax.tree_util.tree_map(lambda p: p.astype(jnp.float32), params))
    return FastSlowState(outer_count=jnp.zeros((), jnp.int32), inner_state=inner_state,
                         mask=mask, anchor=anchor)

  def update_fn(updates, state, params=None, *, phase=None, **extra_args):
    if phase not in PHASES:
      raise ValueError(f"phase: expected fast_slow.FAST or fast_slow.SLOW, got {phase!r}")
    if params is None:
      raise ValueError("params: fast_slow needs them (weight decay); call "
                       "tx.update(grads, state, params, phase=...)")
    t = state.outer_count
    lr = None if custom else jnp.float32(learning_rate) * shape(schedule, t)
    f32 = lambda tree: jax.tree_util.tree_map(lambda u: u.astype(jnp.float32), tree)
    u = f32(updates)
    if phase == FAST:
      coef = -jnp.float32(forget_alpha) * shape(forget_alpha_schedule, t)
      u = jax.tree_util.tree_map(lambda g, m: coef * g * m, u, state.mask)
      if max_norm is not None:
        u = clip_global_norm(u, max_norm, clip)
    elif slow_max_norm is not None:
      u = clip_global_norm(u, slow_max_norm, clip)
    direction, inner_state = inner.update(u, state.inner_state, f32(params), **extra_args)
    scale = 1.0 if custom else -lr
    new = jax.tree_util.tree_map(lambda d, p: (scale * d).astype(p.dtype), direction, params)
    if phase == FAST:
      return new, state._replace(inner_state=inner_state)
    anchor = state.anchor
    if use_anchor:
      # θ_new = θ_prev + β·(θ + u − θ_prev); the update is θ_new − θ.
      moved = jax.tree_util.tree_map(
          lambda a, p, d: a + beta * (p.astype(jnp.float32) + d - a), anchor, params, new)
      new = jax.tree_util.tree_map(lambda m, p: (m - p).astype(p.dtype), moved, params)
      anchor = moved
    return new, FastSlowState(outer_count=optax.safe_int32_increment(t),
                              inner_state=inner_state, mask=state.mask, anchor=anchor)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _map_state(opt_state: Any, fn) -> Any:
  """Applies fn to every FastSlowState inside a (possibly nested, chained) optax state."""
  if isinstance(opt_state, FastSlowState):
    return fn(opt_state)
  if isinstance(opt_state, tuple) and hasattr(opt_state, "_fields"):
    return type(opt_state)(*(_map_state(s, fn) for s in opt_state))
  if isinstance(opt_state, (tuple, list)):
    return type(opt_state)(_map_state(s, fn) for s in opt_state)
  if isinstance(opt_state, dict):
    return {k: _map_state(v, fn) for k, v in opt_state.items()}
  return opt_state


def get_state(opt_state: Any) -> FastSlowState:
  """The (single) FastSlowState inside `opt_state`; ValueError if there is none."""
  found = []
  _map_state(opt_state, lambda s: found.append(s) or s)
  if len(found) != 1:
    raise ValueError(f"opt_state: expected exactly one fast_slow state, found {len(found)}")
  return found[0]


def set_mask(opt_state: Any, mask: Tree) -> Any:
  """Installs a new saliency mask (e.g. per CLU stage); the rest of the state is kept.

  Args:
    opt_state: the optimizer state holding a `FastSlowState` (possibly inside a chain).
    mask: a {0, 1} tree with the params' structure and shapes; stored as float32.

  Returns:
    The optimizer state with the mask replaced.
  """
  def replace(state: FastSlowState) -> FastSlowState:
    old_def = jax.tree_util.tree_structure(state.mask)
    new_def = jax.tree_util.tree_structure(mask)
    if old_def != new_def:
      raise ValueError(f"mask: tree structure {new_def} differs from the params' {old_def}")
    for a, b in zip(jax.tree_util.tree_leaves(state.mask), jax.tree_util.tree_leaves(mask)):
      if jnp.shape(a) != jnp.shape(b):
        raise ValueError(f"mask: a leaf has shape {jnp.shape(b)}, its parameter {jnp.shape(a)}")
    # A fresh copy: the caller's arrays must not alias a state that a step may donate.
    new = jax.tree_util.tree_map(
        lambda m, old: jnp.array(m, dtype=old.dtype, copy=True), mask, state.mask)
    sharding = lambda x: getattr(x, "sharding", None)
    new = jax.tree_util.tree_map(
        lambda m, old: jax.device_put(m, sharding(old)) if sharding(old) is not None else m,
        new, state.mask)
    return state._replace(mask=new)
  get_state(opt_state)
  return _map_state(opt_state, replace)


def set_outer_count(opt_state: Any, count: int = 0) -> Any:
  """Resets the outer iteration t (e.g. to restart the schedules for a new CLU stage)."""
  get_state(opt_state)
  return _map_state(opt_state, lambda s: s._replace(
      outer_count=jnp.asarray(count, jnp.int32)))


def schedule_values(opt_state: Any, learning_rate: float, forget_alpha: float,
                    total_iterations: int, schedule_every: int = 1) -> tuple[float, float]:
  """Host-side (η(t), c(t)) of the cosine schedules at the state's t, for logging."""
  t = int(jax.device_get(get_state(opt_state).outer_count))
  s = float(cosine_shape(t // schedule_every * schedule_every, total_iterations))
  return learning_rate * s, forget_alpha * s
