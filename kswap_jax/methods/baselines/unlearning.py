"""Machine-unlearning baselines on UG-CLU's request streams: FT, GA, RL, SalUn, ℓ1-sparse.

Each runs exactly like `sfr_on`/`ug_clu` (`kswap_jax.methods.ug_clu.run_stream`): the same
data, stage plan, learning stages (replay fine-tuning), replay buffers, evaluation (UA, RA,
TA, MIA, Avg. Gap to the shared Retrain oracle `clu_retrain`), results and resumption. Only
an unlearning stage's update differs; at stage k with forget set D_U and retained data
D_R (the replay buffer when `clu.buffer_size` > 0):

  * `clu_ft`  (FT): descent on CE(D_R), SGD, epoch-level cosine.
  * `clu_ga`  (GA): descent on −CE(D_U) (ascent), the raw gradient clipped to global norm
    0.1 (torch form), constant η, BatchNorm in eval mode (running statistics, frozen).
  * `clu_rl`  (RL): descent on CE over one shuffled stream of D_R ∪ D_U where every D_U
    sample carries a random OTHER label y' ≠ y, drawn once per stage.
  * `clu_salun` (SalUn): RL with the gradient masked by M = top-`fraction` of
    |Σ_b ∇(−CE_b(D_U))| (eval mode, at the stage's starting weights).
  * `clu_l1_sparse` (ℓ1-sparse): descent on CE(D_R) + α(e)·‖θ‖₁ with
    α(e) = α·(1 − e/(E − E₀)) (0 for the last E₀ epochs).

All use torch SGD (momentum 0.9, coupled weight decay 5e-4) and update every trainable
parameter: the whole model, or with `clu.params = "lora"` the LoRA tree and the head
(`kswap_jax.methods.trainable`; SalUn's mask and the ℓ1 term are then over that tree).
A stage lasts `epochs` passes over its set (D_R for FT/ℓ1, D_U for GA, D_R ∪ D_U for
RL/SalUn): iterations = epochs·⌈|set| / batch_size⌉, each epoch one permutation of the set
with a last, partially filled batch (padded slots carry mask 0), as a torch loader;
`iterations` > 0 overrides that (the schedules then span ⌈iterations / per-epoch⌉ epochs).
Fused learn+forget stages are refused (D_L = ∅, as `sfr_on`).

The defaults of each section are the CIFAR-10 settings of the SFR-on code's baselines
(FT, GA, RL, SalUn) and of the ℓ1-sparse code (docs/unlearning_baselines.md).

References: Fan et al., arXiv 2310.12508 (SalUn; RL as there); Jia et al., arXiv
2304.04934 (ℓ1-sparse); Huang et al., arXiv 2409.19732 (SFR-on, whose code ships the
FT/GA/RL/SalUn baselines and settings used here).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time

import jax
import ml_collections
import numpy as np
import optax

from kswap_jax import losses, train
from kswap_jax.data import splits
from kswap_jax.errors import ConfigError
from kswap_jax.methods import ug_clu
from kswap_jax.optim import saliency
from kswap_jax.optim import unlearning as unlearn_tx

log = logging.getLogger("kswap_jax")

# method -> its config section.
SECTIONS = {"clu_ft": "ft", "clu_ga": "ga", "clu_rl": "rl", "clu_salun": "salun",
            "clu_l1_sparse": "l1_sparse"}
METHOD_NAMES = tuple(SECTIONS)
MIXES = ("shuffled", "sequential")
# Which set an epoch passes over.
EPOCH_SETS = {"ft": "retain", "l1_sparse": "retain", "ga": "forget", "rl": "retain+forget",
              "salun": "retain+forget"}


def _sgd_section(**fields) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      dict(epochs=10,
           iterations=0,       # > 0 overrides epochs (the schedules span its epochs)
           lr=0.01,
           schedule="cosine",  # cosine (one value per epoch) | constant
           momentum=0.9,
           weight_decay=5e-4,  # added to the gradient, as torch.optim.SGD's
           batch_size=128), **fields))


def sections_used(method: str) -> tuple[str, ...]:
  """The sections `method` reads: UG-CLU's and its own (`methods.check_sections`)."""
  return (*ug_clu.sections(), SECTIONS[method])


def fields_unread(method: str) -> tuple[str, ...]:
  """The fields a baseline's results never depend on: `data.new` (the stream is one dataset,
  `data.old`), and of UG-CLU's sections the unlearning
  section (a baseline unlearns with its own section; the oracle resets it), and the
  fused-stage and mask fields (no fused stage, no mask)."""
  del method  # the same for every baseline
  return ("data.new.*", "unlearn.*", *ug_clu.FUSED_FIELDS, *ug_clu.MASK_FIELDS)


def sections() -> dict[str, ml_collections.ConfigDict]:
  """UG-CLU's sections (stream, learning, oracle) plus one section per baseline.

  Defaults: the CIFAR-10 blocks of the SFR-on code's `finetune.py`, `gradient_ascent.py`,
  `random_label.py`, `salun.py` (batch 128 as its `unlearn.sh`), and of the ℓ1-sparse
  code's `FT_l1` (SGD lr 0.01, 10 epochs, `MultiStepLR` at epochs 91/136, i.e. constant
  over 10 epochs, batch 256). [R] marks our reconstructions.
  """
  out = ug_clu.sections()
  out.update(
      # FT: SGD lr 0.01, 10 epochs on D_R, cosine per epoch.
      ft=_sgd_section(),
      # GA: SGD lr 1e-4, 9 epochs on D_U, constant lr, raw gradient clipped at 0.1, eval mode.
      ga=_sgd_section(epochs=9, lr=1e-4, schedule="constant", max_norm=0.1,
                      clip="torch",      # torch: ‖u‖ + 1e-6 (clip_grad_norm_) | optax
                      batchnorm="eval"),  # eval (the reference's model.eval()) | train
      # RL: SGD lr 0.003, 10 epochs over D_R ∪ D_U (random other labels), cosine.
      rl=_sgd_section(
          lr=0.003,
          label_seed=0,       # [R] the relabelling draw
          mix="shuffled",     # shuffled: one loader over D_R ∪ D_U, labels y' ≠ y drawn once
                              # (SFR-on code) | sequential: per epoch a pass over D_U with
                              # fresh uniform labels per batch, then D_R (SalUn's CIFAR-10 code)
      ),
      # SalUn: RL with lr 0.007 and the top-20 % gradient-saliency mask.
      salun=_sgd_section(
          lr=0.007, label_seed=0,
          mix="shuffled",         # as rl.mix
          fraction=0.2,           # th: the kept fraction of all weights
          mask_batch_size=128,    # forget batches of the saliency pass
          freeze_unmasked=False,  # [R] True: masked-out weights stay put (the SalUn repo's
                                  # later fix); False: they still move through weight decay
                                  # and momentum (SFR-on's SalUn, the original SalUn)
      ),
      # ℓ1-sparse: FT on D_R + α(e)·‖θ‖₁, SGD lr 0.01 constant, 10 epochs, batch 256.
      l1_sparse=_sgd_section(
          schedule="constant", batch_size=256,
          alpha=5e-5,             # [R] α: the code's --alpha default (0.2, shared with other
                                  # methods) is not a usable ℓ1 weight; the paper tunes it
          no_l1_epochs=0,         # [R] E₀: the code reads args.no_l1_epochs, never defined
      ),
  )
  return out


# ----------------------------------------------------------------------------------------------
# Validation.

_positive = ug_clu._positive  # pylint: disable=protected-access
_choice = ug_clu._choice  # pylint: disable=protected-access
_forward = ug_clu._forward  # pylint: disable=protected-access


def _validate(config, method: str) -> None:
  name = SECTIONS[method]
  s = config[name]
  for key in ("epochs", "iterations"):
    _positive(s[key], f"{name}.{key}", int, strict=False)
  if int(s.epochs) == 0 and int(s.iterations) == 0:
    raise ConfigError(f"{name}.epochs: 0 with {name}.iterations 0; set one of them")
  _positive(s.lr, f"{name}.lr")
  _positive(s.momentum, f"{name}.momentum", strict=False)
  _positive(s.weight_decay, f"{name}.weight_decay", strict=False)
  _positive(s.batch_size, f"{name}.batch_size", int)
  _choice(s.schedule, f"{name}.schedule", unlearn_tx.SCHEDULES)
  if name == "ga":
    if s.max_norm is not None:
      _positive(s.max_norm, "ga.max_norm")
    _choice(s.clip, "ga.clip", ("torch", "optax"))
    _choice(s.batchnorm, "ga.batchnorm", ("eval", "train"))
  if name in ("rl", "salun"):
    _choice(s.mix, f"{name}.mix", MIXES)
  if name == "salun":
    f = float(s.fraction)
    if not 0.0 < f <= 1.0 or math.isnan(f):
      raise ConfigError(f"salun.fraction: expected a value in (0, 1], got {s.fraction!r}")
    _positive(s.mask_batch_size, "salun.mask_batch_size", int)
  if name == "l1_sparse":
    _positive(s.alpha, "l1_sparse.alpha", strict=False)
    e0 = _positive(s.no_l1_epochs, "l1_sparse.no_l1_epochs", int, strict=False)
    if int(s.epochs) and e0 > int(s.epochs):
      raise ConfigError(f"l1_sparse.no_l1_epochs: {e0} exceeds l1_sparse.epochs "
                        f"{int(s.epochs)}")


# ----------------------------------------------------------------------------------------------
# Data: RL's forget samples with random other labels.

@dataclasses.dataclass(frozen=True, eq=False)
class _Relabelled(splits.Subset):
  """A subset whose records carry the given labels instead of their own."""
  new_labels: np.ndarray = None

  @property
  def labels(self) -> np.ndarray:  # pylint: disable=invalid-overridden-method
    return self.new_labels


def relabel_other(subset: splits.Subset, num_classes: int, seed: int) -> splits.Subset:
  """`subset` with every label replaced by a uniformly drawn other class (y' ≠ y), once:
  the same record keeps its random label for the whole stage, as the reference's
  relabelled copy of the forget set (`losses.random_other_labels`)."""
  new = np.asarray(losses.random_other_labels(jax.random.key(seed), subset.labels,
                                              num_classes), np.int64)
  return _Relabelled(name=f"{subset.name}_relabelled", source=subset.source,
                     indices=subset.indices, label_map=subset.label_map, new_labels=new)


# ----------------------------------------------------------------------------------------------
# Losses (`make_train_step(mutable=True)`).

def make_losses(trainable, config, method: str):
  """{"descent": CE on batch["train"] (BatchNorm in train mode), "ascent": −CE on
  batch["train"] (BatchNorm per `ga.batchnorm`), "retain": CE on batch["retain"],
  "random_labels": CE on batch["forget"] against labels drawn uniformly from all classes
  afresh per batch (RL's `mix = "sequential"`)}, of the trainable tree of `trainable`
  (`kswap_jax.methods.trainable.Trainable`: the whole model, or LoRA + head)."""
  eval_bn = method == "clu_ga" and config.ga.batchnorm == "eval"
  num_classes = int(config.model.num_classes)

  def ce_on(key, relabel=False):
    def loss_fn(params, frozen, batch, rng, ms):
      b = batch[key]
      k_fwd, k_lab = jax.random.split(rng)
      logits, ms = _forward(trainable, params, frozen, ms, b, k_fwd)
      labels = (jax.random.randint(k_lab, b["label"].shape, 0, num_classes) if relabel
                else b["label"])
      loss = losses.cross_entropy(logits, labels, b["mask"])
      return loss, ({"ce": loss}, ms)
    return loss_fn

  def ascent(params, frozen, batch, rng, ms):
    b = batch["train"]
    if eval_bn:  # the reference's model.eval(): running statistics, nothing updated
      logits = trainable.apply(params, frozen, ms, b["image"])
    else:
      logits, ms = _forward(trainable, params, frozen, ms, b, rng)
    ce = losses.gradient_ascent_loss(logits, b["label"], b["mask"])
    return -ce, ({"ce_forget": ce}, ms)
  return {"descent": ce_on("train"), "ascent": ascent, "retain": ce_on("retain"),
          "random_labels": ce_on("forget", relabel=True)}


# ----------------------------------------------------------------------------------------------
# The update rules.

def make_tx(config, method: str, steps_per_epoch: int = 1, epochs: int = 1
            ) -> optax.GradientTransformation:
  """The optimizer of `method`'s unlearning stages (its state is opt_state["unlearn"]).

      FT, RL:     sgd(η(e))                               η(e) per `schedule`
      GA:         chain(clip(0.1), sgd(η))
      SalUn:      chain(saliency_mask, sgd(η(e))[, saliency_mask])
      ℓ1-sparse:  chain(add_l1_subgradient(α(e)), sgd(η(e)))
  """
  name = SECTIONS[method]
  s = config[name]
  lr = unlearn_tx.epoch_schedule(float(s.lr), steps_per_epoch=steps_per_epoch, epochs=epochs,
                                 kind=s.schedule)
  sgd = unlearn_tx.sgd(lr, momentum=float(s.momentum), weight_decay=float(s.weight_decay))
  if name == "ga":
    if s.max_norm is None:
      return sgd
    clip = (unlearn_tx.clip_by_global_norm_torch(float(s.max_norm)) if s.clip == "torch"
            else optax.clip_by_global_norm(float(s.max_norm)))
    return optax.chain(clip, sgd)
  if name == "salun":
    parts = [unlearn_tx.saliency_mask(), sgd]
    if s.freeze_unmasked:
      parts.append(unlearn_tx.saliency_mask())
    return optax.chain(*parts)
  if name == "l1_sparse":
    alpha = unlearn_tx.l1_schedule(float(s.alpha), steps_per_epoch=steps_per_epoch,
                                   epochs=epochs, no_l1_epochs=min(int(s.no_l1_epochs),
                                                                   epochs))
    return optax.chain(unlearn_tx.add_l1_subgradient(alpha), sgd)
  return sgd


def stage_length(section, n: int) -> tuple[int, int, int]:
  """(iterations, steps per epoch, epochs the schedules span) of a stage over n samples."""
  spe = max(1, math.ceil(n / int(section.batch_size)))
  total = int(section.iterations) or int(section.epochs) * spe
  return total, spe, max(1, math.ceil(total / spe))


def unlearner(method: str) -> ug_clu.Unlearner:
  """The `ug_clu.Unlearner` hook of baseline `method` (one of `METHOD_NAMES`)."""
  name = SECTIONS[method]

  def build(tools: ug_clu.StageTools, plan: ug_clu.StagePlan, buffer: np.ndarray
            ) -> train.Stage:
    config, mesh, k = tools.config, tools.mesh, plan.index
    s = config[name]
    retain = tools.subset(buffer, f"{plan.name}_retain")
    forget = tools.subset(plan.forget, f"{plan.name}_forget")
    bs, field = int(s.batch_size), f"{name}.batch_size"
    sequential = name in ("rl", "salun") and s.mix == "sequential"
    if sequential:  # per epoch: D_U (random labels per batch), then D_R
      spe_f = math.ceil(len(forget) / bs)
      streams_ = {"forget": tools.stream([forget], k, "forget", bs, field, cycle=False),
                  "retain": tools.stream([retain], k, "retain", bs, field, cycle=False)}
      n = len(forget) + len(retain)
      spe = spe_f + math.ceil(len(retain) / bs)
      total = int(s.iterations) or int(s.epochs) * spe
      epochs = max(1, math.ceil(total / spe))
    else:
      if name in ("rl", "salun"):
        seed = int(config.seed) + int(s.label_seed) + 1000 * (k + 1)
        subsets = [relabel_other(forget, int(config.model.num_classes), seed), retain]
      else:
        subsets = [forget] if name == "ga" else [retain]
      n = sum(len(x) for x in subsets)
      total, spe, epochs = stage_length(s, n)
      streams_ = {"train": tools.stream(subsets, k, "forget" if name == "ga" else "retain",
                                        bs, field, cycle=False)}
    tx = make_tx(config, method, spe, epochs)
    loss_fns = make_losses(tools.trainable, config, method)

    def step_of(kind):
      key = ("baseline", method, kind, spe, epochs,
             json.dumps(s.to_dict(), sort_keys=True, default=str))
      return tools.compiled(key, lambda: train.make_train_step(
          loss_fns[kind], tools.slot(tx), mesh, mutable=True))
    plan_fn, step = None, None
    if sequential:
      forget_step, retain_step = step_of("random_labels"), step_of("retain")
      plan_fn = lambda t: ([("forget", forget_step, ("forget",))] if t % spe < spe_f
                           else [("retain", retain_step, ("retain",))])
    else:
      step = step_of("ascent" if name == "ga" else "descent")

    def on_start(state, frozen, fresh):
      if not fresh:
        return state, frozen  # optimizer state (and SalUn's mask) restored
      new = train.replicate(tx.init(state.params), mesh)
      if name == "salun":
        new = unlearn_tx.set_saliency_mask(new, salun_mask(tools, state, frozen, plan))
      return state._replace(opt_state={**state.opt_state, "unlearn": new}), frozen
    log.info("[%s] %s: %d iterations (%d epoch(s) of %d over %s, %d samples)", plan.name,
             method, total, epochs, spe, EPOCH_SETS[name], n)
    return train.Stage(name=plan.name, step_fn=step, streams=streams_, iterations=total,
                       plan=plan_fn, on_start=on_start)

  def salun_mask(tools, state, frozen, plan):
    """M = top-`fraction` of |Σ_b ∇(−CE_b)| over the forget batches (eval mode), over the
    trainable tree."""
    t0 = time.time()
    s = tools.config.salun
    grad_abs = saliency.gradient_magnitude(
        lambda p, b: tools.eval_grad(p, frozen, state.model_state, b), state.params,
        tools.eval_batches(plan.forget, f"{plan.name}_saliency", int(s.mask_batch_size)))
    mask = saliency.topk_mask(grad_abs, float(s.fraction))
    log.info("[%s] SalUn mask: top %.0f%% of the forget-gradient magnitudes (%.1f s)",
             plan.name, 100 * float(s.fraction), time.time() - t0)
    return mask

  def measures(state) -> dict:
    if name != "salun":
      return {}
    mask = jax.device_get(unlearn_tx.get_saliency_mask(state.opt_state["unlearn"]))
    return {"mask_kept_fraction": saliency.mask_sparsity(mask)["kept_fraction"]}

  def validate(config):
    if name not in config:
      raise ConfigError(f"{name}: section missing for method {method} (build the config with "
                        f"methods.default_config({method!r}))")
    _validate(config, method)
  return ug_clu.Unlearner(init_tx=lambda config: make_tx(config, method), build=build,
                          measures=measures, fused=False, validate=validate)


def _method(config) -> str:
  if config.method not in SECTIONS:
    raise ConfigError(f"method: {config.method!r} is not one of {', '.join(METHOD_NAMES)}")
  return config.method


def validate(config: ml_collections.ConfigDict) -> None:
  """The stream's and the baseline's fields' values (no data or file read)."""
  ug_clu.validate(config, unlearner(_method(config)))


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs baseline `config.method` on the request stream (`ug_clu.run_stream`)."""
  return ug_clu.run_stream(config, workdir, unlearner(_method(config)))


def present(results: dict, workdir: str | None) -> str:
  """As for the stream's other methods (`ug_clu.present`): tables and plots."""
  return ug_clu.present(results, workdir)
