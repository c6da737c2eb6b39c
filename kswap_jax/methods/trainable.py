"""Which parameters a method trains: the whole model, or a LoRA tree plus chosen base leaves.

A `Trainable` splits the model's parameters θ into the tree an optimizer sees and a frozen
tree that travels beside it (the `frozen` argument of `train.make_train_step` and
`train.make_predict_step`), and gives the forward as a function of both:

    full:  trainable = θ                                  frozen = {}
    lora:  trainable = {"lora": {a_t, b_t}, "base": θ_T}  frozen = {"base": θ \\ θ_T}
           f(x) = model(x; θ with W_t + s·a_t b_t at every LoRA target t)

where T is the set of base leaves trained in full beside the LoRA tree (by regex; the
classifier head by default, so a class-incremental stream can learn new classes) and
s = alpha / rank. Everything computed on "the parameters" — gradients, saliency masks,
Fisher diagonals, optimizer states, ℓ1 terms — is then computed on the trainable tree;
`full` folds it back into one tree of the model's parameter names (s·a b merged in).

Example:
  >>> t = Trainable(model, "lora", spec, train=r"head/.*")
  >>> params, frozen = t.split(base, rng)
  >>> logits = t.apply(params, frozen, {}, images)
  >>> merged = t.full(params, frozen)   # = base with the head and W_t + s·a_t b_t

References: Hu et al., arXiv 2106.09685 (LoRA).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable

import jax
import ml_collections

from kswap_jax import lora
from kswap_jax.errors import ConfigError

Tree = Any
KINDS = ("full", "lora")


def join(a: Tree, b: Tree) -> Tree:
  """One tree with the leaves of both (disjoint) trees."""
  out: Tree = jax.tree_util.tree_map(lambda x: x, a)  # a structural copy; leaves are shared
  for name, x in lora.named_leaves(b):
    lora.set_by_name(out, name.split("/"), x)
  return out


@dataclasses.dataclass(frozen=True)
class Trainable:
  """The trainable/frozen split of a model's parameters and the forward over both.

  Attributes:
    model: the flax module.
    kind: "full" (every parameter trains) or "lora".
    spec: the LoRA targets, rank and scale (kind "lora").
    train: regex (`re.fullmatch` over "/"-joined names) of the base leaves trained in
      full beside the LoRA tree (kind "lora"); "" trains none.
    init_lora: (base, rng) -> the starting LoRA tree (kind "lora"); `lora.init` when None.
  """
  model: Any
  kind: str = "full"
  spec: lora.LoraSpec | None = None
  train: str = ""
  init_lora: Callable[[Tree, jax.Array], Tree] | None = dataclasses.field(
      default=None, compare=False)

  @property
  def key(self) -> tuple:
    """What the traced forward depends on besides the model (a compile-cache key)."""
    if self.kind == "full":
      return ("full",)
    return ("lora", self.spec.targets, self.spec.rank, self.spec.alpha, self.train)

  def split(self, params: Tree, rng: jax.Array | None = None) -> tuple[Tree, Tree]:
    """(trainable, frozen) of the model's `params`; `rng` draws the LoRA `a` leaves.

    Example:
      >>> params, frozen = Trainable(model).split(base)   # (base, {})
    """
    if self.kind == "full":
      return params, {}
    pattern = re.compile(self.train) if self.train else None
    trained: Tree = {}
    frozen: Tree = {}
    for name, x in lora.named_leaves(params):
      target = trained if pattern is not None and pattern.fullmatch(name) else frozen
      lora.set_by_name(target, name.split("/"), x)
    init = self.init_lora or (lambda base, key: lora.init(base, self.spec, key))
    return {"lora": init(params, rng), "base": trained}, {"base": frozen}

  def apply(self, params: Tree, frozen: Tree, model_state: Tree, images: jax.Array,
            **kwargs) -> Any:
    """The model on (trainable, frozen, model_state); kwargs go to `model.apply` (`train`,
    `rngs`, `mask`, `mutable`: then the result is (output, updated collections))."""
    if self.kind == "full":
      return self.model.apply({"params": params, **model_state}, images, **kwargs)
    return lora.apply(self.model, join(frozen["base"], params["base"]), params["lora"],
                      images, scale=self.spec.scale, model_state=model_state, **kwargs)

  def full(self, params: Tree, frozen: Tree) -> Tree:
    """The model's parameters in its own names, LoRA merged in (for export and checks)."""
    if self.kind == "full":
      return params
    return lora.merge(join(frozen["base"], params["base"]), params["lora"], self.spec.scale)


def from_config(model, kind: str, lora_cfg: ml_collections.ConfigDict, train: str,
                abstract_params: Tree, *, kind_field: str, train_field: str,
                init_lora: Callable[[Tree, lora.LoraSpec, jax.Array], Tree] | None = None
                ) -> Trainable:
  """A validated `Trainable`; ConfigError names the field at fault.

  Args:
    model: the flax module.
    kind: "full" or "lora" (the value of `kind_field`).
    lora_cfg: the `lora` section (targets, rank, alpha, init_slope).
    train: regex of the base leaves trained in full beside the LoRA tree.
    abstract_params: the model's parameters as shapes (`common.abstract_variables`).
    kind_field, train_field: the config fields named in errors, e.g. "clu.params".
    init_lora: (base, spec, rng) -> the starting LoRA tree; None: a fresh `lora.init`.

  Raises:
    ConfigError: unknown kind; LoRA targets matching no kernel; `train` not a regex,
      matching no parameter, or matching a LoRA target kernel.
  """
  if kind not in KINDS:
    raise ConfigError(f"{kind_field}: {kind!r} (expected one of {', '.join(KINDS)})")
  if kind == "full":
    return Trainable(model)
  spec = lora.LoraSpec.from_config(lora_cfg)
  targets = {n for n, _ in lora.target_kernels(abstract_params, spec)}
  try:
    pattern = re.compile(str(train))
  except re.error as e:
    raise ConfigError(f"{train_field}: invalid regex {train!r} ({e})") from None
  names = [n for n, _ in lora.named_leaves(abstract_params)]
  chosen = [n for n in names if train and pattern.fullmatch(n)]
  if train and not chosen:
    raise ConfigError(f"{train_field}: regex {train!r} matches no parameter of the model "
                      f"(e.g. {names[-1]!r}); \"\" trains the LoRA tree alone")
  clash = [n for n in chosen if n in targets]
  if clash:
    raise ConfigError(f"{train_field}: {clash[0]} is also a LoRA target (lora.targets); a "
                      f"kernel trains either in full or through LoRA")
  return Trainable(model, "lora", spec, str(train), None if init_lora is None else
                   lambda base, rng: init_lora(base, spec, rng))
