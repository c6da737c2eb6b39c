"""GS-LoRA and GS-LoRA++: continual forgetting with one group-sparse LoRA per task.

Tasks T_1..T_N (`kswap_jax.data.tasks`) arrive in sequence. For task t, with B_r / B_f a
retain and a forget batch (two forward passes, dropout on), z the model's logits (CosFace
with the margin on the given label for the face model), e the embedding the head sees:

    L = CE(z(B_r)) + β_t·ReLU(BND − CE(z(B_f))) + α(e)·Σ_g ‖θ_g‖₂
        [+ λ_f,t·ReLU(BND_pro − KL(p ‖ e(B_f))) + λ_r·KL(p ‖ e(B_r))]      (GS-LoRA++)

θ is a fresh LoRA tree on the FFN kernels (b = 0, `a` kaiming-uniform with slope √5 on task
1 and √50 afterwards), trained with a fresh AdamW and a per-epoch cosine LR over epochs of
the retain subset (the forget subset cycles). After the task the LoRA is folded into the
kernels, W_t = W_{t−1} + s·a·b, and the next task starts from there (the last-epoch model).
The group lasso is either the reference's penalty (`group_lasso.mode = "penalty"`) or the
exact proximal step (`"proximal"`), both on the α schedule.

Resumption: the per-task LoRA trees live stacked in the checkpointed cross-stage state
(`TrainState.carry["loras"]`, (num_tasks, ...) per leaf, zeros for tasks not done), and every
task's base is rebuilt from the pretrained base and that stack at the task's start, on a
fresh run and on a resumed one alike.

References: Zhao et al., arXiv 2403.11530 (GS-LoRA); arXiv 2501.09705 (GS-LoRA++).
"""

from __future__ import annotations

import functools
import logging
import math
import os
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from kswap_jax import checkpoint as ckpt_lib
from kswap_jax import config as config_lib
from kswap_jax import lora, losses, metrics, models, report, train
from kswap_jax.data import splits, streams
from kswap_jax.data import tasks as tasks_lib
from kswap_jax.errors import ConfigError, require_int, require_nonnegative
from kswap_jax.methods import common, continual, pretrain
from kswap_jax.models import vit
from kswap_jax.optim import group_lasso, schedules

log = logging.getLogger("kswap_jax")

METHODS = ("gs_lora", "gs_lora_pp")
# Accuracy name -> the task's test split it is measured on.
TEST_SPLITS = {"acc_r": "retain_test", "acc_f": "forget_test", "acc_o": "old_test",
               "acc_m": "missing_test"}
EPOCH_STREAMS = ("retain", "longer")


def sections() -> dict[str, ml_collections.ConfigDict]:
  """The method's own config sections, with the continual CASIA scripts' method defaults.

  The model, data and evaluation sections keep the shared defaults (ViT-B/16, linear head,
  mean = std = 0.5, `eval.every_steps` 0); the shipped configs set the reference's (the Face
  Transformer with a CosFace head, its normalisation, evaluation every 100 steps).
  """
  return {
      # init_slope: loralib's √5 for task 1's LoRA (later tasks: gs_lora.reinit_slope)
      "lora": config_lib.lora_section(init_slope=math.sqrt(5.0)),
      "group_lasso": config_lib.group_lasso_section(alpha=1e-4),   # the continual scripts' α
      "optim": config_lib.adamw_section(),  # AdamW 1e-2, wd 0.05, per-epoch cosine to 1e-5
      "tasks": ml_collections.ConfigDict(dict(
          num_classes=100,       # head rows; classes are 0..num_classes-1
          num_tasks=4,
          per_task=20,           # K classes forgotten per task (order-based tasks)
          order_seed=1337,       # Python random shuffle of 0..N-1; None = identity order
          order=(),              # explicit class order (overrides order_seed)
          forget_classes=(),     # explicit per-task tuples (override per_task)
          num_missing=0,         # M retained classes without training data (Acc_m)
          missing_classes=(),    # explicit missing classes (override num_missing)
          data_ratio=0.1,        # share of each task's retain / forget training split kept
                                 # (first int(ratio·n) of a permutation, not per class)
          shots=0,               # >0: exactly this many images per class (few-shot)
          seed=0,                # subset draw [inferred]: torch's randperm cannot be matched
      )),
      "gs_lora": ml_collections.ConfigDict(dict(
          batch_size=48,         # per stream: a step sees a retain and a forget batch
          epochs=100,            # per task
          bound=105.0,           # BND (single-step scripts: 110)
          beta=(0.2,),           # β: one value for every task, or one per task
          alpha_epoch=0,         # α = 0 before this epoch (single-step: 20)
          warmup_alpha=False,    # after alpha_epoch use big_alpha instead of group_lasso.alpha
          big_alpha=0.0,
          reinit_slope=math.sqrt(50.0),  # A-init slope for tasks >= 2 (task 1: lora.init_slope)
          eval_margin=True,      # reported accuracy = arg-max of the margin logits (reference)
          epoch_stream="retain",  # retain | longer (the single-step few-shot exception)
          # The cycled stream (forget; retain under "longer"): "per_epoch" restarts it with a
          # fresh shuffle every epoch and ends each pass with a partial batch (padded,
          # masked), as the reference's loader; "continuous": full batches, no restart.
          aux_batches="per_epoch",
          ema_epoch=-1,          # >= 0: EMA of the merged weights from this epoch's end on
          ema_decay=0.9,         # EMA <- d·EMA + (1 − d)·current, once per epoch
          # At every new best H of the periodic evaluation (eval.every_steps), write the
          # merged weights as merged_best_h_<task>.npz (the reference saves them too).
          save_best_h=True,
          prototype=dict(        # GS-LoRA++ only
              forget_weight=(0.01,),  # λ_f: one value for every task, or one per task
              retain_weight=0.0,   # λ_r (0 in every shipped reference run)
              bound=18.0,          # BND_pro (few-shot continual: 50)
          ),
      )),
  }


# ----------------------------------------------------------------------------------------------
# Pure pieces: head, losses, merged base, metrics.

def head_logits(model: vit.VisionTransformer, base: lora.Tree, embedding: jax.Array,
                labels: jax.Array | None) -> jax.Array:
  """The model's head on `embedding` (what `features=True` returns).

  CosFace heads subtract the margin from the class in `labels` (None: plain scaled cosines);
  linear heads ignore `labels`.
  """
  cfg = model.cfg
  head = base["head"]
  if cfg.head == "cosface":
    return vit.cosface_logits(embedding, head["kernel"], labels, scale=cfg.cosface_scale,
                              margin=cfg.cosface_margin)
  return embedding.astype(jnp.float32) @ head["kernel"].astype(jnp.float32) + head["bias"]


def make_loss(model, scale: float, grouping: str, *, bound: float, penalty: bool,
              prototype: ml_collections.ConfigDict | None,
              forget_term: Callable[[jax.Array, dict], jax.Array] | None = None):
  """loss_fn(lora, frozen, batch, rng, hparams) over batches {"retain", "forget"}.

  `frozen` = {"base": this task's merged base, "prototypes": (classes, dim)}; `hparams`
  carries the per-task and per-epoch weights "beta", "alpha" (penalty mode) and
  "pro_forget_weight" (GS-LoRA++), so one compiled step serves every task.
  `forget_term(logits, batch)` (a variant's; the forget batch's logits and its "label" and
  "mask") replaces the bounded forgetting term ReLU(bound − CE_f): the loss is then CE_r +
  beta·forget_term + the Ω and prototype terms, and it is logged as "forget_term".
  """
  def loss_fn(params, frozen, batch, rng, hparams):
    base = frozen["base"]
    k_r, k_f = jax.random.split(rng)
    r, f = batch["retain"], batch["forget"]
    embed = lambda b, k: lora.apply(model, base, params, b["image"], scale=scale, train=True,
                                    rngs={"dropout": k}, features=True)
    e_r, e_f = embed(r, k_r), embed(f, k_f)
    ce_r = losses.cross_entropy(head_logits(model, base, e_r, r["label"]), r["label"], r["mask"])
    logits_f = head_logits(model, base, e_f, f["label"])
    ce_f = losses.cross_entropy(logits_f, f["label"], f["mask"])
    omega = group_lasso.group_lasso_penalty(params, grouping)
    aux = {"ce_retain": ce_r, "ce_forget": ce_f, "omega": omega}
    if forget_term is None:
      loss = ce_r + hparams["beta"] * losses.bounded_forgetting(ce_f, bound)
    else:
      aux["forget_term"] = forget_term(logits_f, f)
      loss = ce_r + hparams["beta"] * aux["forget_term"]
    if penalty:
      loss = loss + hparams["alpha"] * omega
    if prototype is not None:
      protos = frozen["prototypes"]
      kl_f = losses.prototype_kl(e_f, protos[f["label"]], f["mask"])
      kl_r = losses.prototype_kl(e_r, protos[r["label"]], r["mask"])
      loss = loss + losses.prototype_loss(
          kl_f, kl_r, bound=float(prototype.bound), forget_weight=hparams["pro_forget_weight"],
          retain_weight=float(prototype.retain_weight))
      aux.update(kl_forget=kl_f, kl_retain=kl_r)
    return loss, aux
  return loss_fn


class ProductEmaState(NamedTuple):
  """EMA of s·a·b per LoRA module (a tree of (in, out) arrays beside the modules)."""
  products: lora.Tree


def _modules(tree: lora.Tree) -> list[str]:
  return sorted({n.rsplit("/", 1)[0] for n, _ in lora.named_leaves(tree)})


def product_ema(mix: float | jax.Array, scale: float) -> optax.GradientTransformation:
  """Tracks an exponential moving average of the merged weights' LoRA part, s·a·b.

      P ← (1 − mix)·P + mix·s·a⁺b⁺,       a⁺, b⁺ the parameters after this step's update

  The base kernels are constant within a task, so W + P is the EMA of the merged kernels
  W + s·a·b (an EMA of a and b separately would not be: the update is bilinear). `mix` is
  injected per step: 0 leaves P alone, 1 copies, 1 − d is one EMA step with decay d.
  Updates pass through unchanged.

  Args:
    mix: the mixing weight of this step (usually an injected hyper-parameter).
    scale: the LoRA scale s.

  Returns:
    An `optax.GradientTransformation` with a `ProductEmaState`; place it last in a chain.
  """
  def init_fn(params):
    products = {}
    for m in _modules(params):
      a, b = lora.leaf_by_name(params, m + "/a"), lora.leaf_by_name(params, m + "/b")
      lora.set_by_name(products, m.split("/"), jnp.zeros((a.shape[0], b.shape[1]), a.dtype))
    return ProductEmaState(products)

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("product_ema needs params: call tx.update(grads, state, params)")
    new = optax.apply_updates(params, updates)
    products = {}
    for m in _modules(new):
      p = scale * (lora.leaf_by_name(new, m + "/a") @ lora.leaf_by_name(new, m + "/b"))
      old = lora.leaf_by_name(state.products, m)
      lora.set_by_name(products, m.split("/"), ((1.0 - mix) * old + mix * p).astype(old.dtype))
    return updates, ProductEmaState(products)

  return optax.GradientTransformation(init_fn, update_fn)


def merge_products(base: lora.Tree, products: lora.Tree) -> lora.Tree:
  """`base` with each module's (in, out) product added to its kernel (reshaped to it)."""
  merged = jax.tree_util.tree_map(lambda x: x, base)
  for name, p in lora.named_leaves(products):
    module = lora.leaf_by_name(merged, name)
    module["kernel"] = module["kernel"] + p.reshape(module["kernel"].shape).astype(
        module["kernel"].dtype)
  return merged


def ema_products(opt_state) -> lora.Tree:
  """The `ProductEmaState.products` inside an optimizer state from `make_optimizer`."""
  found = [x for x in jax.tree_util.tree_leaves(
      opt_state, is_leaf=lambda x: isinstance(x, ProductEmaState))
           if isinstance(x, ProductEmaState)]
  if not found:
    raise ValueError("the optimizer state holds no ProductEmaState (gs_lora.ema_epoch < 0)")
  return found[0].products


def make_optimizer(ocfg: ml_collections.ConfigDict, *, proximal: bool, grouping: str,
                   ema_scale: float | None = None) -> optax.GradientTransformation:
  """AdamW with an injectable epoch LR; in proximal mode also the group-lasso prox step with
  an injectable strength `alpha` (the α schedule), after the AdamW update; with
  `ema_scale` the EMA of s·a·b (`product_ema`) with an injectable `ema_mix`."""
  def chain(learning_rate, alpha, ema_mix):
    parts = [optax.adamw(learning_rate, b1=float(ocfg.b1), b2=float(ocfg.b2),
                         eps=float(ocfg.eps), weight_decay=float(ocfg.weight_decay))]
    if proximal:
      parts.append(group_lasso.group_lasso_prox(alpha, learning_rate, grouping))
    if ema_scale is not None:
      parts.append(product_ema(ema_mix, ema_scale))
    return optax.chain(*parts)

  # Exactly the injected names in the signature: any other host hyper-parameter (e.g. α in
  # penalty mode) must reach the loss, not the optimizer.
  if proximal and ema_scale is not None:
    make = lambda learning_rate, alpha, ema_mix: chain(learning_rate, alpha, ema_mix)
  elif proximal:
    make = lambda learning_rate, alpha: chain(learning_rate, alpha, 0.0)
  elif ema_scale is not None:
    make = lambda learning_rate, ema_mix: chain(learning_rate, 0.0, ema_mix)
  else:
    make = lambda learning_rate: chain(learning_rate, 0.0, 0.0)
  hp = {"learning_rate": float(ocfg.lr)}
  if proximal:
    hp["alpha"] = 0.0
  if ema_scale is not None:
    hp["ema_mix"] = 0.0
  return optax.inject_hyperparams(make)(**hp)


def task_base(base: lora.Tree, stacked: lora.Tree, num_done: int, scale: float) -> lora.Tree:
  """W_t = W_0 + Σ_{s < num_done} s·a_s·b_s, folded in task order (the base of task num_done).

  Args:
    base: the pretrained base parameters W_0.
    stacked: the per-task LoRA trees stacked on a leading task axis (`continual.stack_*`).
    num_done: how many tasks to fold in.
    scale: the LoRA scale s = alpha / rank.
  """
  for t in range(num_done):
    base = lora.merge(base, continual.stack_get(stacked, t), scale)
  return base


def sparsity(tree: lora.Tree, grouping: str) -> dict[str, Any]:
  """Groups at exactly zero, the non-zero share of the LoRA scalars, and every group norm."""
  norms = np.asarray(jax.device_get(group_lasso.group_norms(tree, grouping)))
  leaves = [np.asarray(x) for x in jax.tree_util.tree_leaves(jax.device_get(tree))]
  nonzero = sum(int(np.count_nonzero(x)) for x in leaves)
  total = sum(x.size for x in leaves)
  return {"zero_groups": int(np.sum(norms == 0.0)), "num_groups": int(norms.size),
          "nonzero_lora_fraction": nonzero / max(1, total),
          "group_norms": [float(x) for x in norms]}




def accuracies(predictions: dict[str, dict[str, np.ndarray]], *, margin: float,
               use_margin: bool, old_tasks: Sequence[Sequence[int]] = ()
               ) -> dict[str, float]:
  """Acc_r, Acc_f, Acc_o, Acc_m (those the task has) under both prediction rules.

  `predictions[split]` holds the plain logits (for CosFace s·cos, no margin) and labels. The
  margin rule subtracts `margin` (s·m for CosFace; 0 for a linear head) from the true
  class's logit before the arg-max, the reference's evaluation. `acc_*` follows
  `use_margin`; `acc_*_margin` and `acc_*_nomargin` always name their rule. With
  `old_tasks` (the classes each earlier task forgot, in order), `acc_o_tasks` splits Acc_o
  by the task that forgot the classes (`use_margin`'s rule; None for a task without test
  images).
  """
  out = {}
  for name, split in TEST_SPLITS.items():
    if split not in predictions:
      continue
    logits, labels = predictions[split]["logits"], predictions[split]["label"]
    shifted = logits.copy()
    shifted[np.arange(labels.size), labels] -= margin
    with_m, plain = metrics.top1(shifted, labels), metrics.top1(logits, labels)
    out[name] = with_m if use_margin else plain
    out[f"{name}_margin"] = with_m
    out[f"{name}_nomargin"] = plain
    if name == "acc_o" and old_tasks:
      ruled = shifted if use_margin else logits
      rows = [np.isin(labels, list(classes)) for classes in old_tasks]
      out["acc_o_tasks"] = [metrics.top1(ruled[r], labels[r]) if r.any() else None
                            for r in rows]
  return out


# ----------------------------------------------------------------------------------------------
# Shared with the continual-forgetting baselines (`methods/baselines/continual_forgetting.py`):
# the same tasks, subsets, evaluation rule, per-task records and results envelope.

def task_data(config: ml_collections.ConfigDict
              ) -> tuple[list[tasks_lib.ForgetTask], list[dict[str, Any]]]:
  """The validated task sequence of `config.tasks` and each task's subsets.

  Checks the head size and the pretraining classes against `tasks.num_classes`, loads
  `data.old` and draws each task's training subsets and test splits
  (`tasks.task_splits`). Nothing is written.

  Returns:
    (tasks, subsets) with subsets[t] the `task_splits` dict of task t.

  Raises:
    ConfigError: naming the field.
  """
  num_classes = require_int(config.tasks.num_classes, "tasks.num_classes", 2)
  if num_classes > int(config.model.num_classes):
    raise ConfigError(f"tasks.num_classes: {num_classes} classes do not fit the "
                      f"{config.model.num_classes}-row head (model.num_classes)")
  if config.init.kind == "pretrain" and pretrain.num_classes(config) != num_classes:
    raise ConfigError(f"pretrain.num_classes: {pretrain.num_classes(config)}, but the tasks "
                      f"start from a model of tasks.num_classes = {num_classes} classes")
  src = common.load_sources(config.data, roles=("old",))  # class names need the data
  train_src, test_src = src["old_train"], src["old_test"]
  task_list = tasks_lib.tasks_from_config(config.tasks, source=train_src)
  for source in (train_src, test_src):
    if source.num_classes > num_classes:
      raise ConfigError(f"tasks.num_classes: {num_classes}, but source {source.name!r} has "
                        f"{source.num_classes} classes")
  subsets = [tasks_lib.task_splits(train_src, test_src, t,
                                   data_ratio=float(config.tasks.data_ratio),
                                   shots=int(config.tasks.shots), seed=int(config.tasks.seed))
             for t in task_list]
  return task_list, subsets


def log_tasks(task_list, subsets) -> None:
  for t, sub in enumerate(subsets):
    source = sub["forget_train"].source
    log.info("task %d: forget %s; %s", t + 1,
             splits.classes_text(source, task_list[t].forget),
             ", ".join(f"{k} {len(v)}" for k, v in sub.items()))


def make_evaluate(config, model: vit.VisionTransformer, predict_step, mesh, *,
                  use_margin: bool):
  """evaluate(state, frozen, subsets, names=all test splits) -> `accuracies`.

  `predict_step` returns the plain logits (no margin); the margin rule (s·m for CosFace,
  nothing for a linear head) is applied on the host.
  """
  cosface = model.cfg.head == "cosface"
  margin = model.cfg.cosface_scale * model.cfg.cosface_margin if cosface else 0.0

  def evaluate(state, frozen, sub, names=tuple(TEST_SPLITS.values()), old_tasks=()):
    preds = common.predict_splits(config, predict_step, state, frozen,
                                  {v: sub[v] for v in names if v in sub}, mesh)
    return accuracies(preds, margin=margin, use_margin=use_margin, old_tasks=old_tasks)
  return evaluate


def periodic_record(acc: dict, before: dict) -> dict:
  """The in-task evaluation record: Acc_r, Acc_f and H against the task's start, and
  Acc_m when the task has missing classes (the reference evaluates them there too)."""
  return {"acc_r": acc["acc_r"], "acc_f": acc["acc_f"],
          **({"acc_m": acc["acc_m"]} if "acc_m" in acc else {}),
          "h_mean": metrics.h_mean(before["acc_f"], acc["acc_f"], acc["acc_r"])}


def task_record(acc: dict, before: dict) -> dict:
  """A finished task's record: its accuracies, H (both prediction rules) and the
  accuracies at the task's start that H is measured against."""
  return {
      **acc,
      "h_mean": metrics.h_mean(before["acc_f"], acc["acc_f"], acc["acc_r"]),
      "h_mean_nomargin": metrics.h_mean(before["acc_f_nomargin"], acc["acc_f_nomargin"],
                                        acc["acc_r_nomargin"]),
      "acc_f_before": before["acc_f"], "acc_r_before": before["acc_r"],
  }


# ----------------------------------------------------------------------------------------------
# The run: one continual task per stage, on the shared task loop.

def validate(config, variant: bool = False) -> None:
  """The GS-LoRA fields' values (no data or file read); ConfigError names the field.
  `variant`: for a method built on GS-LoRA (`run`'s hooks), whose name is its own."""
  g = config.gs_lora
  if not variant and config.method not in METHODS:
    raise ConfigError(f"method: {config.method!r} is not a GS-LoRA method ({', '.join(METHODS)})")
  if config.group_lasso.mode not in ("penalty", "proximal"):
    raise ConfigError(f"group_lasso.mode: {config.group_lasso.mode!r} (expected penalty or "
                      f"proximal)")
  if g.epoch_stream not in EPOCH_STREAMS:
    raise ConfigError(f"gs_lora.epoch_stream: {g.epoch_stream!r} (expected one of "
                      f"{', '.join(EPOCH_STREAMS)})")
  if int(g.epochs) < 1:
    raise ConfigError(f"gs_lora.epochs: expected an int >= 1, got {g.epochs!r}")
  for field in ("bound", "reinit_slope", "alpha_epoch", "big_alpha"):
    require_nonnegative(g[field], f"gs_lora.{field}")
  require_nonnegative(config.group_lasso.alpha, "group_lasso.alpha")
  if not 0.0 <= float(g.ema_decay) <= 1.0:
    raise ConfigError(f"gs_lora.ema_decay: expected a value in [0, 1], got {g.ema_decay!r}")
  for field in ("bound", "retain_weight"):
    require_nonnegative(g.prototype[field], f"gs_lora.prototype.{field}")
  # The per-task lists against tasks.num_tasks (explicit forget_classes must match it too).
  num_tasks = require_int(config.tasks.num_tasks, "tasks.num_tasks", 1)
  for field, values in (("gs_lora.beta", g.beta),
                        ("gs_lora.prototype.forget_weight", g.prototype.forget_weight)):
    for value in tasks_lib.per_task(values, num_tasks, field):
      require_nonnegative(value, field)
  lora.LoraSpec.from_config(config.lora)  # rank, alpha, targets' syntax


def make_task_streams(config: ml_collections.ConfigDict, subsets: list, mesh) -> list:
  """[({"retain": stream, "forget": stream}, epoch stream name)] per task.

  The retain stream defines the epoch and the forget stream cycles; under
  `gs_lora.epoch_stream = "longer"` a forget set longer than the retain set swaps the two
  roles (the single-step few-shot exception). The cycled stream's batches follow
  `gs_lora.aux_batches` (`common.aux_restart`).
  """
  g, seed = config.gs_lora, int(config.seed)
  out = []
  for t, sub in enumerate(subsets):
    def mk(name, offset, epoch=None, sub=sub, t=t):
      # epoch: None for the stream that defines the epoch, else that stream (this one cycles).
      restart = common.aux_restart(g.aux_batches, "gs_lora.aux_batches", epoch) if epoch else 0
      return common.make_stream(config, [sub[name]], batch_size=int(g.batch_size),
                                field="gs_lora.batch_size", seed=seed + 10 * t + offset,
                                cycle=epoch is not None, restart_every=restart, mesh=mesh)
    retain, epoch_stream = mk("retain_train", 0), "retain"
    forget = mk("forget_train", 1, epoch=retain)
    if g.epoch_stream == "longer":
      probe = mk("forget_train", 1)
      if probe.steps_per_epoch > retain.steps_per_epoch:
        retain, forget, epoch_stream = mk("retain_train", 0, epoch=probe), probe, "forget"
    out.append(({"retain": retain, "forget": forget}, epoch_stream))
  return out


def fields_unread(method: str) -> tuple[str, ...]:
  """The fields `method`'s results never depend on (`methods.reads_field`): the new data
  (the tasks forget classes of `data.old`), and for GS-LoRA the prototype term (GS-LoRA++'s)."""
  return ("data.new.*", *(("gs_lora.prototype.*",) if method == "gs_lora" else ()))


def run(config: ml_collections.ConfigDict, workdir: str, *, prototypes: bool | None = None,
        loss: Callable | None = None,
        forget_term: Callable[[jax.Array, dict], jax.Array] | None = None) -> dict:
  """Runs `config.method` (gs_lora or gs_lora_pp) over the configured tasks; returns the
  results envelope (stages "pretrained", "task_1", ...).

  A method built on GS-LoRA (`methods.register`; docs/adding_a_method.md) calls this with
  `prototypes` (whether GS-LoRA++'s prototype term and its `frozen["prototypes"]` are
  used) and `loss`, a builder with `make_loss`'s signature whose loss_fn(lora, frozen,
  batch, rng, hparams) returns (loss, {name: value}); everything else is GS-LoRA's. The
  logged terms are the builder's `aux`. A variant that changes only the forgetting term
  passes `forget_term(logits, batch)` instead (`make_loss`'s argument), weighted by beta.
  """
  variant = prototypes is not None or loss is not None or forget_term is not None
  if loss is not None and forget_term is not None:
    raise TypeError("gs_lora.run: pass loss or forget_term, not both (a loss of your own "
                    "holds its forgetting term)")
  if forget_term is not None:
    loss = functools.partial(make_loss, forget_term=forget_term)
  validate(config, variant)
  g, ocfg = config.gs_lora, config.optim
  use_prototypes = (config.method == "gs_lora_pp") if prototypes is None else bool(prototypes)
  use_margin = bool(g.eval_margin)
  mesh = train.mesh_for(config)
  seed = int(config.seed)

  # Everything is validated before the workdir is touched or a pretraining run starts.
  task_list, subsets = task_data(config)
  num_tasks = len(task_list)
  betas = tasks_lib.per_task(g.beta, num_tasks, "gs_lora.beta")
  pro_weights = tasks_lib.per_task(g.prototype.forget_weight, num_tasks,
                                   "gs_lora.prototype.forget_weight")
  task_streams = make_task_streams(config, subsets, mesh)
  common.check_batch_size(int(config.eval.batch_size), "eval.batch_size", mesh)

  model_cfg = common.model_config(config)
  model = models.build(model_cfg)
  spec = lora.LoraSpec.from_config(config.lora)
  later_spec = lora.LoraSpec(targets=spec.targets, rank=spec.rank, alpha=spec.alpha,
                             init_slope=float(g.reinit_slope))
  grouping = config.group_lasso.grouping
  abstract = common.abstract_variables(model, model_cfg)["params"]
  lora.groups(jax.eval_shape(lambda: lora.init(abstract, spec, jax.random.key(0))), grouping)
  proximal = config.group_lasso.mode == "proximal"

  log_tasks(task_list, subsets)
  if config.init.kind == "random":  # before train.Run, so that a dry run says it too
    log.warning("warning: init.kind=random: GS-LoRA trains LoRA only, over an untrained "
                "model whose head stays frozen (a ViT's at zero: every prediction is the "
                "same, and the accuracies cannot change); start from a trained model "
                "(init.kind=pretrain pretrains one first, or npz)")
  run_ = train.Run(workdir, config)

  pretrain.ensure_pretrained(config, workdir)
  k_head, k_lora = jax.random.split(jax.random.key(seed))
  base0, _ = common.load_base(config, model_cfg, model, k_head)
  first_lora = lora.init(base0, spec, jax.random.fold_in(k_lora, 0))
  log.info("LoRA: %d trainable parameters in %d target kernels (%d frozen)",
           lora.count(first_lora), len(lora.target_kernels(base0, spec)), lora.count(base0))
  use_ema = int(g.ema_epoch) >= 0
  tx = make_optimizer(ocfg, proximal=proximal, grouping=grouping,
                      ema_scale=spec.scale if use_ema else None)
  loss_fn = (loss or make_loss)(model, spec.scale, grouping, bound=float(g.bound),
                                penalty=not proximal,
                                prototype=g.prototype if use_prototypes else None)
  step_fn = train.make_train_step(loss_fn, tx, mesh)
  # Plain logits (no margin); the margin rule is applied on the host (`accuracies`).
  predict_step = train.make_predict_step(
      lambda p, _, f, b: head_logits(model, f["base"], lora.apply(
          model, f["base"], p, b["image"], scale=spec.scale, features=True), None), mesh)
  sums_step = jax.jit(lambda f, b: losses.class_sums(
      model.apply({"params": f["base"]}, b["image"], features=True), b["label"], b["mask"],
      int(config.model.num_classes)))

  carry = {"loras": continual.stack_zeros(first_lora, num_tasks)}
  state = train.replicate(train.create_state(first_lora, tx, seed, carry=carry), mesh)
  state = run_.restore(state)
  results = run_.meta["results"]

  evaluate = make_evaluate(config, model, predict_step, mesh, use_margin=use_margin)

  def prototypes(frozen, sub):
    """p_c: mean embedding of class c's training-subset images under this task's base."""
    sums = counts = 0.0
    for name in ("retain_train", "forget_train"):
      for b in streams.eval_batches(sub[name], batch_size=int(config.eval.batch_size),
                                    **common.stream_kwargs(config)):
        s, c = jax.device_get(sums_step(frozen, train.to_global(b, mesh)))
        sums, counts = sums + s, counts + c
    return losses.class_means(jnp.asarray(sums), jnp.asarray(counts))

  def make_task(t: int, task: tasks_lib.ForgetTask) -> continual.Task:
    sub = subsets[t]
    stream_map, epoch_stream = task_streams[t]
    lr = schedules.epoch_cosine(base=float(ocfg.lr), minimum=float(ocfg.min_lr),
                                epochs=int(g.epochs))
    alpha = schedules.structure_alpha(alpha=float(config.group_lasso.alpha),
                                      alpha_epoch=int(g.alpha_epoch),
                                      warmup_alpha=bool(g.warmup_alpha),
                                      big_alpha=float(g.big_alpha))

    spe = stream_map[epoch_stream].steps_per_epoch

    def hparams(epoch, iteration):
      hp = {"learning_rate": lr(epoch), "alpha": alpha(epoch), "beta": betas[t]}
      if use_prototypes:
        hp["pro_forget_weight"] = pro_weights[t]
      if use_ema:  # at the last step of each epoch from ema_epoch on: copy, then EMA steps
        last = (iteration + 1) % spe == 0
        e0 = int(g.ema_epoch)
        hp["ema_mix"] = (0.0 if not last or epoch < e0 else
                         1.0 if epoch == e0 else 1.0 - float(g.ema_decay))
      return hp

    def on_start(state, frozen, fresh):
      # Everything from the restored state: the earlier tasks' LoRA trees are in the carry.
      del frozen
      base_t = task_base(base0, jax.device_get(state.carry["loras"]), t, spec.scale)
      frozen = {"base": base_t, "prototypes": jnp.zeros((1, 1), jnp.float32)}
      frozen = train.replicate(frozen, mesh)
      if use_prototypes:
        frozen["prototypes"] = train.replicate(prototypes(frozen, sub), mesh)
      if fresh:
        fresh_lora = lora.init(base0, spec if t == 0 else later_spec,
                               jax.random.fold_in(k_lora, t))
        state = state._replace(params=train.replicate(fresh_lora, mesh),
                               opt_state=train.replicate(tx.init(fresh_lora), mesh))
      if f"{task.name}_before" not in results:
        empty = state._replace(params={})
        results[f"{task.name}_before"] = evaluate(empty, frozen, sub)
        log.info("[%s] before: %s", task.name, _fmt(results[f"{task.name}_before"]))
      return state, frozen

    def ema_frozen(state, frozen):
      """The frozen tree with the EMA of the merged weights as its base."""
      products = ema_products(state.opt_state)
      return train.replicate({"base": merge_products(frozen["base"], products)}, mesh)

    # The EMA holds weights once it has copied them, at the last step of `ema_epoch`.
    ema_from = (int(g.ema_epoch) + 1) * spe

    def periodic(state, frozen):
      names = ("retain_test", "forget_test", "missing_test")
      acc = evaluate(state, frozen, sub, names=names)
      record = periodic_record(acc, results[f"{task.name}_before"])
      # Beside the weights, as the reference logs it, once the EMA has started: by the
      # stage's iteration count at this evaluation (the Run's, restored on a resume).
      if use_ema and int(run_.meta["stage_step"]) >= ema_from:
        ema = evaluate(state._replace(params={}), ema_frozen(state, frozen), sub, names=names)
        record.update({f"ema_{k}": v for k, v in periodic_record(
            ema, results[f"{task.name}_before"]).items()})
      best = continual.best_eval(run_, task.name, "h_mean")
      if (g.save_best_h and run_.is_main
          and (best is None or record["h_mean"] > best["h_mean"])):
        # As the reference, the weights of every new best H (merged: loadable as is).
        ckpt_lib.export_merged(jax.device_get(frozen["base"]), jax.device_get(state.params),
                               spec.scale,
                               os.path.join(run_.workdir, f"merged_best_h_{task.name}.npz"))
      return record

    def after(state, frozen):
      # The task folded into the kernels, as the next task will see it.
      merged = train.replicate({"base": lora.merge(frozen["base"], state.params, spec.scale)},
                               mesh)
      acc = evaluate(state._replace(params={}), merged, sub,
                     old_tasks=[earlier.forget for earlier in task_list[:t]])
      before = results[f"{task.name}_before"]
      record = {**task_record(acc, before),
                **sparsity(jax.device_get(state.params), grouping)}
      if use_ema and int(g.epochs) > int(g.ema_epoch):
        ema = evaluate(state._replace(params={}), ema_frozen(state, frozen), sub)
        ema["h_mean"] = metrics.h_mean(before["acc_f"], ema["acc_f"], ema["acc_r"])
        record["ema"] = {k: v for k, v in ema.items() if not k.endswith("_margin")}
      best = continual.best_eval(run_, task.name, "h_mean")
      if best is not None:
        record["best_h"] = best
      log.info("[%s] %s", task.name, _fmt(record))
      return record

    def finish(state, frozen):
      del frozen
      loras = continual.stack_set(state.carry["loras"], t, state.params)
      return state._replace(carry={"loras": loras})

    stage = train.Stage(name=task.name, step_fn=step_fn, streams=stream_map,
                        epoch_stream=epoch_stream, epochs=int(g.epochs),
                        hparams_fn=hparams, on_start=on_start)
    return continual.Task(name=task.name, stage=stage, evaluate=after, finish=finish,
                          eval_fn=periodic)

  def norm_log(state):
    return {"group_norms": [round(float(x), 6) for x in
                            group_lasso.group_norms(jax.device_get(state.params), grouping)]}

  state, _ = continual.run_tasks(run_, [make_task(t, x) for t, x in enumerate(task_list)],
                                 state, None, mesh, eval_every=int(config.eval.every_steps),
                                 extra_log=norm_log)

  out = results_envelope(config, task_list, results, use_margin)
  out["num_trainable"] = lora.count(first_lora)
  text = report.present(out, run_.workdir if run_.is_main else None)
  if run_.is_main:
    if config.export.merged_npz:  # the base after the last task, every LoRA folded in
      final_base = task_base(base0, jax.device_get(state.carry["loras"]), num_tasks,
                             spec.scale)
      ckpt_lib.save_npz(jax.device_get(final_base),
                        os.path.join(run_.workdir, "merged_params.npz"))
  path = run_.write_results(out)
  run_.announce(text, path)
  run_.close()
  return out


def results_envelope(config, task_list: list[tasks_lib.ForgetTask], results: dict,
                     use_margin: bool) -> dict:
  """The results envelope of a continual-forgetting run: stages "pretrained" (the first
  task's evaluation before training) and "task_1"...; `final` holds the last task's
  acc_r, acc_f, acc_o, acc_m (those defined), h_mean, and the mean H over the tasks.

  Args:
    config: the run's config (recorded; `config.method`, `config.model.head`).
    task_list: the tasks in order.
    results: per-task records under the task names and the pre-task evaluations under
      "<task>_before" (`run_.meta["results"]`).
    use_margin: whether `acc_*` follow the margin rule (the prediction rule recorded).
  """
  first = results[f"{task_list[0].name}_before"]
  stages = [{"name": "pretrained", **first}]
  for task in task_list:
    stages.append({"name": task.name, "forget_classes": list(task.forget),
                   **results[task.name]})
  last = stages[-1]
  final = {k: last[k] for k in ("acc_r", "acc_f", "acc_o", "acc_m", "h_mean") if k in last}
  final["mean_h_mean"] = float(np.mean([s["h_mean"] for s in stages[1:]]))
  rule = ("arg-max of the CosFace logits with the margin on the true class"
          if use_margin and config.model.head == "cosface" else "arg-max over all head rows")
  return {"method": config.method, "config": config.to_dict(), "prediction_rule": rule,
          "stages": stages, "final": final,
          "presenter": "gs_lora"}  # shows a variant's results where it is not registered


def present(results: dict, workdir: str | None) -> str:
  """The stage table and the sparsity table (printed by the run and by
  `python -m kswap_jax.report`); `gs_lora.png` (`plot`) written in `workdir` unless None."""
  if workdir:
    plot(results, os.path.join(workdir, "gs_lora.png"))
  return "\n".join(filter(None, (report.stage_table(results), old_tasks_table(results),
                                 sparsity_table(results))))


def old_tasks_table(results: dict) -> str:
  """Acc_o split by the task that forgot the classes (`acc_o_tasks`): one row per task after
  the first, one column per earlier task; "" when no stage records it (an older run)."""
  stages = [s for s in results["stages"] if s.get("acc_o_tasks")]
  if not stages:
    return ""
  width = max(len(s["acc_o_tasks"]) for s in stages)
  rows = ["Acc_o ↓ by the task that forgot the classes",
          f"{'after':<10}" + "".join(f"{f'task_{j + 1}':>10}" for j in range(width))]
  for s in stages:
    cells = ["-" if v is None else f"{v:.2f}" for v in s["acc_o_tasks"]]
    rows.append(f"{s['name']:<10}" + "".join(f"{c:>10}" for c in cells))
  return "\n".join(rows)


def sparsity_table(results: dict) -> str:
  """Per task: groups exactly at zero, the non-zero share of the LoRA scalars, seconds."""
  rows = [f"{'task':<10}{'zero groups':>13}{'non-zero LoRA':>15}{'seconds':>10}"]
  for s in results["stages"][1:]:
    rows.append(f"{s['name']:<10}{s['zero_groups']:>8d} / {s['num_groups']:<3d}"
                f"{s['nonzero_lora_fraction']:>14.4f}{s['seconds']:>10.1f}")
  return "\n".join(rows)


def plot(results: dict, path: str) -> None:
  """Per-task accuracies (left) and, when the stages record them, each group's LoRA norm at
  the end of each task (right; the baselines have no LoRA and get the left panel only)."""
  stages = [s for s in results["stages"] if s["name"] != "pretrained"]
  with_norms = any(s.get("group_norms") for s in stages)
  fig = report.figure(figsize=(11 if with_norms else 6, 4))
  ax_a, ax_n = fig.subplots(1, 2) if with_norms else (fig.subplots(1, 1), None)
  xs = list(range(1, len(stages) + 1))
  for key, label in (("acc_r", "Acc_r ↑"), ("acc_f", "Acc_f ↓"), ("acc_o", "Acc_o ↓"),
                     ("acc_m", "Acc_m ↑"), ("h_mean", "H-Mean ↑")):
    ys = [s.get(key, float("nan")) for s in stages]
    if any(y == y for y in ys):
      ax_a.plot(xs, ys, marker="o", label=label)
  ax_a.set_xticks(xs)
  ax_a.set_xlabel("task")
  ax_a.set_ylabel("accuracy [%]")
  ax_a.grid(alpha=0.3)
  ax_a.legend()
  if ax_n is not None:
    for s in stages:
      norms = s.get("group_norms", [])
      ax_n.plot(range(len(norms)), norms, marker="o", label=s["name"])
    ax_n.set_xticks(range(max((len(s.get("group_norms", [])) for s in stages), default=0)))
    ax_n.set_xlabel("group (the transformer block, for grouping=block)")
    ax_n.set_ylabel("‖θ_g‖₂ at the end of the task")
    ax_n.grid(alpha=0.3)
    ax_n.legend()
  fig.suptitle(f"{results['method']}: per-task accuracies" +
               (" and LoRA group norms" if with_norms else ""))
  fig.tight_layout()
  fig.savefig(path, dpi=100)


def _fmt(accs: dict) -> str:
  return " ".join(f"{k} {v:.2f}" for k, v in accs.items()
                  if isinstance(v, float) and not k.endswith("_margin"))
