"""LoRA as a separate parameter tree beside untouched base parameters.

For a target kernel W (Flax layout, inputs first) LoRA adds a low-rank update

    y = x W + b + s (x a) b_lora,    a: (in, r),  b_lora: (r, out),  s = alpha / r,

so the effective kernel is W + s a b_lora (reshaped to W's shape for DenseGeneral kernels,
e.g. attention q/k/v (width, heads, head_dim) and out (heads, head_dim, width)).

The LoRA tree mirrors the base tree but holds only the targeted modules, each with
leaves `a` and `b`:

    {"Transformer": {"encoderblock_0": {"MlpBlock_3": {"Dense_0": {"a": ..., "b": ...}, ...}}}}

Targets are chosen by a regex matched (`re.fullmatch`) against the "/"-joined names of the
base kernels, e.g. `Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel`. A kernel's
leading axis is its input, except for kernels named `.../out/kernel` (flax attention's
output projection, (heads, head_dim, width)), whose first two axes are.

All functions are pure: `apply` (the unmerged forward), `merge`, `unmerge`, `split`/`join`.
Gradients and optimizer state exist only for the LoRA tree.

References: Hu et al., arXiv 2106.09685; loralib 0.1.x (kaiming-uniform `a`, zero `b`).
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Iterable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from kswap_jax.errors import ConfigError, require_int

Tree = dict[str, Any]

# The variable collection `apply` passes the LoRA tree in.
COLLECTION = "lora"

FFN_TARGETS = r"Transformer/encoderblock_\d+/MlpBlock_3/Dense_[01]/kernel"
ATTENTION_TARGETS = (
    r"Transformer/encoderblock_\d+/MultiHeadDotProductAttention_1/(query|key|value|out)/kernel")


@dataclasses.dataclass(frozen=True)
class LoraSpec:
  """Which kernels get LoRA and how it is sized and initialised.

  Attributes:
    targets: regex over "/"-joined kernel names (`re.fullmatch`).
    rank: r > 0.
    alpha: scaling numerator; the update is scaled by alpha / rank.
    init_slope: negative slope `a` of the kaiming-uniform init of the `a` leaves:
      bound = sqrt(2 / (1 + slope^2)) * sqrt(3 / fan_in). loralib uses sqrt(5);
      Knowledge Swapping re-initialises with sqrt(50) (docs/knowledge_swapping.md).
  """
  targets: str = FFN_TARGETS
  rank: int = 8
  alpha: float = 1.0
  init_slope: float = math.sqrt(50.0)

  def __post_init__(self):
    """ConfigError on a rank that is not a positive int or a targets regex that does not
    compile, whether built from a config or in user code."""
    require_int(self.rank, "lora.rank", 1)
    try:
      re.compile(self.targets)
    except (re.error, TypeError) as e:
      raise ConfigError(f"lora.targets: invalid regex {self.targets!r} ({e})") from None

  @property
  def scale(self) -> float:
    return self.alpha / self.rank

  @classmethod
  def from_config(cls, cfg: ml_collections.ConfigDict) -> "LoraSpec":
    """Reads `lora.{targets, rank, alpha, init_slope}`; raises ConfigError on bad values."""
    return cls(targets=str(cfg.targets), rank=int(cfg.rank), alpha=float(cfg.alpha),
               init_slope=float(cfg.init_slope))


def _name(path) -> str:
  return jax.tree_util.keystr(path, simple=True, separator="/")


def named_leaves(tree: Tree) -> list[tuple[str, Any]]:
  """[("a/b/c", leaf), ...] in the tree's canonical (sorted-key) order."""
  return [(_name(p), x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _get(tree: Tree, names: Iterable[str]):
  for n in names:
    if not isinstance(tree, dict) or n not in tree:
      return None
    tree = tree[n]
  return tree


def set_by_name(tree: Tree, names: list[str], value) -> None:
  """Sets tree[n0][n1]...[nk] = value, creating the intermediate dicts."""
  for n in names[:-1]:
    tree = tree.setdefault(n, {})
  tree[names[-1]] = value


def _in_axes(kernel_name: str, ndim: int) -> int:
  """How many leading kernel axes are inputs: all but the last for attention `out`."""
  return ndim - 1 if kernel_name.endswith("/out/kernel") else 1


def target_kernels(base: Tree, spec: LoraSpec) -> list[tuple[str, Any]]:
  """The (name, kernel) pairs of `base` that `spec.targets` selects; ConfigError if none."""
  pattern = re.compile(spec.targets)
  found = [(n, x) for n, x in named_leaves(base)
           if n.endswith("/kernel") and pattern.fullmatch(n)]
  if not found:
    kernels = [n for n, _ in named_leaves(base) if n.endswith("/kernel")]
    raise ConfigError(
        f"lora.targets: regex {spec.targets!r} matches no kernel of the model "
        f"(its {len(kernels)} kernels are named like {', '.join(map(repr, kernels[-2:]))}; "
        f"LoRA applies to Dense/DenseGeneral kernels only)")
  # In the checkpoint layout only convolutions have 4-D kernels (h, w, in, out), and
  # `apply` adds the low-rank branch to Dense/DenseGeneral calls alone: factors for a
  # convolution would be trained without ever reaching the forward.
  convs = [n for n, x in found if len(x.shape) == 4]
  if convs:
    raise ConfigError(f"lora.targets: regex {spec.targets!r} matches the convolution kernel "
                      f"{convs[0]!r}; LoRA applies to Dense/DenseGeneral kernels only")
  return found


def init(base: Tree, spec: LoraSpec, rng: jax.Array) -> Tree:
  """A fresh LoRA tree for `base`: `a` kaiming-uniform (spec.init_slope), `b` = 0.

  Args:
    base: base parameters (or their `jax.ShapeDtypeStruct`s).
    spec: targets, rank and init.
    rng: PRNG key; each target gets `fold_in(rng, index)` in name order.

  Returns:
    The LoRA tree; at init the LoRA forward equals the base forward exactly.
  """
  tree: Tree = {}
  gain = math.sqrt(2.0 / (1.0 + spec.init_slope ** 2))
  for i, (name, kernel) in enumerate(target_kernels(base, spec)):
    k = _in_axes(name, kernel.ndim)
    fan_in = math.prod(kernel.shape[:k])
    fan_out = math.prod(kernel.shape[k:])
    bound = gain * math.sqrt(3.0 / fan_in)
    a = jax.random.uniform(jax.random.fold_in(rng, i), (fan_in, spec.rank), jnp.float32,
                           -bound, bound)
    set_by_name(tree, name.split("/")[:-1], {"a": a, "b": jnp.zeros((spec.rank, fan_out), jnp.float32)})
  return tree


def delta(module_lora: Tree, kernel_shape: tuple[int, ...], scale: float) -> jax.Array:
  """s * a @ b reshaped to the kernel's shape: the merged-in weight update."""
  return (scale * (module_lora["a"] @ module_lora["b"])).reshape(kernel_shape)


def _module_leaves(lora: Tree) -> list[tuple[list[str], Tree]]:
  """[(module path, {"a", "b"}), ...] for every LoRA module in the tree."""
  out = []
  def walk(node, path):
    if set(node) == {"a", "b"} and not isinstance(node["a"], dict):
      out.append((path, node))
      return
    for k in sorted(node):
      walk(node[k], path + [k])
  walk(lora, [])
  return out


def _add(base: Tree, lora: Tree, scale: float, sign: float) -> Tree:
  merged = jax.tree_util.tree_map(lambda x: x, base)  # a structural copy; leaves are shared
  for path, leaf in _module_leaves(lora):
    module = _get(merged, path)
    if module is None or "kernel" not in module:
      raise ConfigError(f"lora: module {'/'.join(path)} has no kernel in the base parameters")
    kernel = module["kernel"]
    _check_fits(path, leaf, kernel.shape)
    module["kernel"] = kernel + sign * delta(leaf, kernel.shape, scale).astype(kernel.dtype)
  return merged


def _check_fits(path: list[str], leaf: Tree, kernel_shape: tuple[int, ...]) -> None:
  """ConfigError unless a is (fan_in, r) and b is (r, fan_out) for this kernel (after any
  leading axes a stacked tree shares with it): a product of the right size but the wrong
  orientation would merge into garbage weights without a word."""
  a, b = tuple(leaf["a"].shape), tuple(leaf["b"].shape)
  lead = len(a) - 2
  name = "/".join(path)
  k = _in_axes(name + "/kernel", len(kernel_shape) - lead)
  stack, rest = tuple(kernel_shape[:lead]), kernel_shape[lead:]
  rank = a[-1] if a else 0
  want_a = stack + (math.prod(rest[:k]), rank)
  want_b = stack + (rank, math.prod(rest[k:]))
  if lead < 0 or a != want_a or b != want_b:
    raise ConfigError(f"lora: module {name}: a {a} and b {b} do not fit its kernel "
                      f"{tuple(kernel_shape)} (expected a {want_a}, b {want_b})")


def merge(base: Tree, lora: Tree, scale: float) -> Tree:
  """Base params with s·a·b folded into each target kernel (for export and GS-LoRA tasks)."""
  return _add(base, lora, scale, +1.0)


def unmerge(merged: Tree, lora: Tree, scale: float) -> Tree:
  """Inverse of `merge`: subtracts s·a·b from each target kernel."""
  return _add(merged, lora, scale, -1.0)


def split(params: Tree) -> tuple[Tree, Tree]:
  """Separates a combined tree whose modules hold `lora_a`/`lora_b` beside `kernel`.

  This is the layout of checkpoints that store base and LoRA together (as loralib
  state dicts do). Returns (base, lora) with the LoRA leaves renamed `a`/`b`.
  """
  base: Tree = {}
  lora: Tree = {}
  for name, x in named_leaves(params):
    *path, leaf = name.split("/")
    if leaf in ("lora_a", "lora_b"):
      set_by_name(lora, path + [leaf[-1]], x)
    else:
      set_by_name(base, path + [leaf], x)
  return base, lora


def join(base: Tree, lora: Tree) -> Tree:
  """Inverse of `split`: one tree with `lora_a`/`lora_b` beside each target kernel."""
  params: Tree = jax.tree_util.tree_map(lambda x: x, base)
  for path, leaf in _module_leaves(lora):
    set_by_name(params, path + ["lora_a"], leaf["a"])
    set_by_name(params, path + ["lora_b"], leaf["b"])
  return params


@jax.custom_vjp
def low_rank(x: jax.Array, a: jax.Array, b: jax.Array) -> jax.Array:
  r"""The LoRA branch (x a) b, with a backward pass written out.

      y = (x a) b,   ∂a = xᵀ (g bᵀ),   ∂b = (x a)ᵀ g,   ∂x = (g bᵀ) aᵀ,

  where g is the cotangent of y and the transposes contract over every leading (token)
  axis. The values are jax's own gradients of the product (tested); what differs is that
  g is materialised in the forward's (tokens, features) layout before the three small
  matmuls read it. Left to autodiff, XLA:CPU fuses the elementwise chain that produces g
  (for fc1: the dropout and exact-GELU backward) into a transposed copy for ∂b's
  token-contracting matmul, which runs that chain with strided access: about 0.12 s per
  block and pass for ViT-B/16 at 8 images on 2 cores; written out, the Knowledge Swapping
  forget step takes ~25 % less CPU time (docs/speed.md).

  Args:
    x: inputs, (..., in).
    a: (in, r).
    b: (r, out).

  Returns:
    (..., out).
  """
  return (x @ a) @ b


def _low_rank_fwd(x, a, b):
  xa = x @ a
  return xa @ b, (x, a, b, xa)


def _low_rank_bwd(res, g):
  x, a, b, xa = res
  g = jax.lax.optimization_barrier(g)  # keeps g's producer out of a transposed fusion
  flat = lambda t: t.reshape(-1, t.shape[-1])
  g_xa = g @ b.T
  return g_xa @ a.T, flat(x).T @ flat(g_xa), flat(xa).T @ flat(g)


low_rank.defvjp(_low_rank_fwd, _low_rank_bwd)


def apply(model: nn.Module, base: Tree, lora: Tree, images: jax.Array, *, scale: float,
          train: bool = False, rngs: dict[str, jax.Array] | None = None,
          model_state: Tree | None = None, **kwargs) -> jax.Array:
  """The unmerged LoRA forward: `model` on `base` with y += s·(x a) b at every target.

  The base tree is never modified (no merge/unmerge drift).

  Args:
    model: a linen module whose targets are `nn.Dense`/`nn.DenseGeneral` calls.
    base: frozen base parameters (the `params` collection).
    lora: LoRA tree from `init` (an empty dict gives the plain base forward).
    images: model input.
    scale: alpha / rank.
    train: passed to the model (dropout on).
    rngs: e.g. {"dropout": key} when training.
    model_state: the model's other variable collections (e.g. BatchNorm `batch_stats`);
      with `mutable=[...]` in kwargs the result is (output, updated collections).
    **kwargs: forwarded to `model.apply` (e.g. `features=True`, `mutable`).

  Returns:
    The model output.

  Example:
    >>> logits = lora.apply(model, base, lora_tree, images, scale=spec.scale)
  """
  def interceptor(next_fun, args, call_kwargs, context):
    module = context.module
    if (context.method_name != "__call__" or not isinstance(module, (nn.Dense, nn.DenseGeneral))
        or not module.has_variable(COLLECTION, "a")):
      return next_fun(*args, **call_kwargs)
    leaf = {"a": module.get_variable(COLLECTION, "a"), "b": module.get_variable(COLLECTION, "b")}
    y = next_fun(*args, **call_kwargs)
    x = args[0]
    fan_in = leaf["a"].shape[0]
    n_in = 1
    while math.prod(x.shape[x.ndim - n_in:]) != fan_in:  # DenseGeneral contracting axes
      n_in += 1
      if n_in > x.ndim:
        raise ValueError(f"lora: input {x.shape} does not fit {'/'.join(module.path)}")
    x = x.reshape(x.shape[:x.ndim - n_in] + (fan_in,))
    update = low_rank(x, leaf["a"].astype(x.dtype), leaf["b"].astype(x.dtype)) * scale
    return y + update.reshape(y.shape).astype(y.dtype)

  # The LoRA tree travels as a variable collection beside the parameters, so each Dense
  # finds its own {a, b} by scope, also inside lifted transforms (a scanned encoder slices
  # it per block like the parameters).
  with nn.intercept_methods(interceptor):
    return model.apply({"params": base, COLLECTION: lora, **(model_state or {})}, images,
                       train=train, rngs=rngs, **kwargs)


def count(tree: Tree) -> int:
  """Number of scalar parameters in a tree."""
  return int(sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(tree)))


# ----------------------------------------------------------------------------------------------
# Group structure (one group per transformer block by default) and per-block norms.

GROUPINGS = {
    # group key = the block prefix ("Transformer/encoderblock_3"): Knowledge Swapping, GS-LoRA.
    "block": re.compile(r"(.*?encoderblock_\d+)/"),
    # group key = the module ("…/MlpBlock_3/Dense_0"): GS-LoRA's `lora` ablation.
    "module": re.compile(r"(.*)/[ab]$"),
    # one group per leaf: GS-LoRA's `matrix` ablation.
    "leaf": re.compile(r"(.*)$"),
}


def groups(lora: Tree, grouping: str = "block") -> dict[str, list[str]]:
  """Group name -> names of the LoRA leaves in it, in tree order.

  Args:
    lora: the LoRA tree.
    grouping: "block" (all leaves of one transformer block), "module" (a and b of one
      target) or "leaf" (every matrix alone).

  Returns:
    An insertion-ordered dict sorted by block index for "block".
  """
  if grouping not in GROUPINGS:
    raise ConfigError(
        f"group_lasso.grouping: unknown grouping {grouping!r} (expected one of "
        f"{', '.join(GROUPINGS)})")
  pattern = GROUPINGS[grouping]
  out: dict[str, list[str]] = {}
  for name, _ in named_leaves(lora):
    m = pattern.search(name)
    if m is None:
      raise ConfigError(f"group_lasso.grouping: LoRA leaf {name} belongs to no {grouping} group")
    out.setdefault(m.group(1), []).append(name)
  key = lambda g: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", g)]
  return dict(sorted(out.items(), key=lambda kv: key(kv[0])))


def leaf_by_name(tree: Tree, name: str):
  return _get(tree, name.split("/"))


def block_mean_abs(tree: Tree) -> jax.Array:
  """(num_blocks,) mean |x| over each block's LoRA leaves, in block order; traceable.

  With the step's gradients (`train.make_train_step(grad_measurements=...)`) this is the
  per-block gradient-magnitude profile of the knock-on analysis (docs/knowledge_swapping.md).
  """
  means = []
  for names in groups(tree, "block").values():
    leaves = [leaf_by_name(tree, n) for n in names]
    means.append(sum(jnp.abs(x).sum() for x in leaves) / sum(x.size for x in leaves))
  return jnp.stack(means)


def block_norms(lora: Tree, scale: float) -> dict[str, dict[str, float]]:
  """Per-block norms of the knock-on analysis (docs/knowledge_swapping.md), as host floats.

  Returns:
    {"sum_frobenius": {block: n_l}, "delta_w": {block: ||ΔW_l||}} where
    n_l = sum of the Frobenius norms of the block's LoRA leaves (the reference
    `cal_norm.py` quantity) and ||ΔW_l|| = sum over the block's targets of s·||a b||_F,
    which is 0 at init and so free of the random-`a` baseline.
  """
  sum_fro, delta_w = {}, {}
  for block, names in groups(lora, "block").items():
    leaves = [leaf_by_name(lora, n) for n in names]
    sum_fro[block] = float(sum(jnp.linalg.norm(x) for x in leaves))
    modules = sorted({n.rsplit("/", 1)[0] for n in names})
    delta_w[block] = float(sum(
        scale * jnp.linalg.norm(leaf_by_name(lora, m + "/a") @ leaf_by_name(lora, m + "/b"))
        for m in modules))
  return {"sum_frobenius": sum_fro, "delta_w": delta_w}
