"""Knowledge Swapping: learn new classes, forget chosen old ones, keep the rest.

Learning Before Forgetting (`lbf`, the paper's method) runs a learning stage then a
forgetting stage on one LoRA tree over the ViT's FFN layers; `laf` (the baseline order)
forgets first. With CE the mean cross-entropy over all head rows and Ω the block group
lasso of the LoRA factors (docs/knowledge_swapping.md):

    L_learn  = CE(b_n) + β·CE(b_r) + α·Ω
    L_forget = CE(b_r) + β·ReLU(BND − CE(b_f)) + α·Ω          (β 0.2, α 0.005, BND 105)

One AdamW (lr 1e-2, wd 0.05) is shared by both stages: its moments and count carry over
while the per-epoch cosine LR restarts at stage 2. The head is frozen, with fixed random
rows for the new classes; prediction is the arg-max over all head rows. In LBF the
forgetting stage's retain stream is D_r^sub ∪ D_n^train; LAF never adds D_n
(docs/knowledge_swapping.md).

References: Xing et al., "Knowledge Swapping via Learning and Unlearning", arXiv 2502.08075.
"""

from __future__ import annotations

import json
import logging
import os

import jax
import ml_collections

from kswap_jax import checkpoint as ckpt_lib
from kswap_jax import config as config_lib
from kswap_jax import lora, losses, metrics, models, report, train
from kswap_jax.data import splits
from kswap_jax.errors import ConfigError, require_int, require_nonnegative
from kswap_jax.methods import common, pretrain
from kswap_jax.optim import group_lasso, schedules

log = logging.getLogger("kswap_jax")

STAGE_ORDER = {"lbf": ("learn", "forget"), "laf": ("forget", "learn")}
# results key -> test split
TEST_SPLITS = {"acc_r": "retain_test", "acc_f": "forget_test", "acc_n": "learn_test"}
# The reference's pretrained baseline also covers the training subsets (docs/knowledge_swapping.md).
# Percentage points of Acc_r the unused random head rows may take before the swap without a
# warning (a message only: no result depends on it).
RANDOM_ROWS_WARNING = 5.0
TRAIN_SPLITS = {"acc_r_train": "retain_train", "acc_f_train": "forget_train",
                "acc_n_train": "learn_train"}
# Each stream draws its shuffles from `config.seed + offset`, so no two share an order.
STREAM_SEEDS = {"retain_stage1": 0, "learn": 1, "forget": 2, "retain_stage2": 3}


def sections() -> dict[str, ml_collections.ConfigDict]:
  """Knowledge Swapping's config sections with the reference's defaults."""
  return dict(
      lora=config_lib.lora_section(),           # r8 on FFN, scale 1/8, A slope sqrt(50)
      group_lasso=config_lib.group_lasso_section(),  # α 0.005, one group per block
      optim=config_lib.adamw_section(),         # AdamW 1e-2, wd 0.05, cosine to 1e-5
      ks=ml_collections.ConfigDict(dict(
          beta=0.2,              # retain weight when learning, forget weight when forgetting
          bound=105.0,           # BND of ReLU(BND − CE_f)
          learn_epochs=5,
          forget_epochs=5,
          batch_size=80,         # global batch of every stream
          # The auxiliary (learn / forget) stream: "per_epoch" restarts it with a fresh
          # shuffle at every retain epoch and ends each pass with a partial batch (padded,
          # masked), as the reference's loader; "continuous" cuts the concatenated passes
          # into full batches and never restarts.
          aux_batches="per_epoch",
          reset_optimizer_between_stages=False,  # ablation; the reference carries it over
      )),
      swap=ml_collections.ConfigDict(dict(
          num_old_classes=100,   # pretrained label space [0, num_old_classes)
          forget_classes=(0, 1, 2, 3, 4),  # [unknown] in the paper: the authors' folders fix them
          retain_classes=(),     # empty = every old class not forgotten
          learn_classes=(0, 1, 2, 3, 4),   # ids of data.new; become num_old + rank
          retain_ratio=0.1, forget_ratio=0.1, learn_ratio=1.0,
          retain_shots=0, forget_shots=0, learn_shots=0,   # >0: exactly n per class
          seed=1337,             # subset draw (numpy default_rng over sorted ids)
      )),
  )


def passes(model, scale: float, grouping: str, aux: str) -> list:
  """The three passes both stages combine: CE on the `aux` batch ("learn" or "forget"),
  CE on the retain batch (each with its own dropout key), and Ω (`train.in_passes` runs
  them one at a time and hands their values to a `combine`, as `forget_loss` does)."""
  def ce(name, index):
    return lambda params, base, batch, rng: _ce(
        model, base, params, batch[name], scale, jax.random.split(rng)[index])
  return [ce(aux, 0), ce("retain", 1),
          lambda params, base, batch, rng: group_lasso.group_lasso_penalty(params, grouping)]


def learn_loss(model, scale: float, config: ml_collections.ConfigDict,
               alpha_penalty: float) -> train.LossFn:
  """L_learn = CE(b_n) + β·CE(b_r) + α·Ω over batches {"learn", "retain"}."""
  beta = config.ks.beta
  def combine(ce_n, ce_r, omega):
    loss = ce_n + beta * ce_r + alpha_penalty * omega
    return loss, {"ce_learn": ce_n, "ce_retain": ce_r, "omega": omega}
  return train.in_passes(passes(model, scale, config.group_lasso.grouping, "learn"), combine)


def forget_loss(model, scale: float, config: ml_collections.ConfigDict,
                alpha_penalty: float) -> train.LossFn:
  """L_forget = CE(b_r) + β·ReLU(BND − CE(b_f)) + α·Ω over batches {"forget", "retain"}."""
  beta, bound = config.ks.beta, config.ks.bound
  def combine(ce_f, ce_r, omega):
    loss = ce_r + beta * losses.bounded_forgetting(ce_f, bound) + alpha_penalty * omega
    return loss, {"ce_forget": ce_f, "ce_retain": ce_r, "omega": omega}
  return train.in_passes(passes(model, scale, config.group_lasso.grouping, "forget"), combine)


# The loss of each stage: make_loss(model, lora scale, config, α of the penalty term; 0 in
# the proximal mode) -> a `train.LossFn`. A method built on this module's `run` may replace
# either (`run(..., stage_losses=...)`).
LOSSES = {"learn": learn_loss, "forget": forget_loss}


def _ce(model, base, params, b, scale, rng):
  logits = lora.apply(model, base, params, b["image"], scale=scale, train=True,
                      rngs={"dropout": rng})
  return losses.cross_entropy(logits, b["label"], b["mask"])


def make_streams(config: ml_collections.ConfigDict, subsets: dict, mesh,
                 order: tuple[str, str] | None = None) -> dict:
  """{stage: {"retain": stream, aux: stream}} for the "learn" and "forget" stages, run in
  `order` (default the method's, `STAGE_ORDER`).

  The retain stream defines each stage's epoch: D_r^sub in the first stage, and in the
  second D_r^sub ∪ D_n^train (learning first, LBF) or D_r^sub alone (forgetting first,
  LAF), reshuffled with its own seed
  either way (the reference builds new loaders). The auxiliary stream (D_n^train, D_f^sub)
  cycles; with `ks.aux_batches = "per_epoch"` (the reference's loader) it restarts with a
  fresh shuffle at every epoch of its stage's retain stream and ends each pass with a
  padded, masked partial batch.
  """
  ks = config.ks
  seed = int(config.seed)
  mk = lambda subs, s, **kw: common.make_stream(
      config, subs, batch_size=int(ks.batch_size), field="ks.batch_size", seed=s, mesh=mesh,
      **kw)
  first, second = order or STAGE_ORDER[config.method]
  retain = {first: [subsets["retain_train"]],
            second: [subsets["retain_train"]] + ([subsets["learn_train"]]
                                                 if first == "learn" else [])}
  out = {}
  for stage, key in ((first, "retain_stage1"), (second, "retain_stage2")):
    epoch = mk(retain[stage], seed + STREAM_SEEDS[key], cycle=False)
    restart = common.aux_restart(ks.aux_batches, "ks.aux_batches", epoch)
    out[stage] = {"retain": epoch,
                  stage: mk([subsets[f"{stage}_train"]], seed + STREAM_SEEDS[stage],
                            cycle=True, restart_every=restart)}
  return out


def _frozen_base(config, model_cfg, model) -> tuple[dict, jax.Array]:
  """(the frozen base: backbone and extended head, its new rows drawn from the seed; the
  key of the LoRA initialisation)."""
  k_head, k_lora = jax.random.split(jax.random.key(int(config.seed)))
  base, _ = common.load_base(config, model_cfg, model, k_head)
  return base, k_lora


def run_base(workdir: str):
  """The frozen base a Knowledge Swapping run trained its LoRA over, rebuilt from its
  `config.json` (the head's new rows are drawn from the seed and saved nowhere else). The
  files `init` names (the pretrained model) must still be where the run read them.

  Args:
    workdir: a Knowledge Swapping run's workdir.

  Returns:
    (model, base, spec): the linen model, its frozen parameters and the run's LoRA spec.

  Raises:
    ConfigError: no readable `config.json` in `workdir`, not a Knowledge Swapping run's, or
      the pretraining run of one (its `pretrain/` folder, which records the swap's config).

  Example:
    >>> model, base, spec = knowledge_swap.run_base(workdir)
    >>> tree = interop.load_lora(f"{workdir}/lora_forget.npz")
    >>> logits = lora.apply(model, base, tree, images, scale=spec.scale)  # the run's model
  """
  path = os.path.join(workdir, "config.json")
  try:
    with open(path) as f:
      config = ml_collections.ConfigDict(json.load(f))
  except (OSError, ValueError, TypeError, AttributeError) as e:
    raise ConfigError(f"{path}: not a run's config record ({e})") from None
  if config.get("method") == "pretrain" or not all(section in config
                                                   for section in ("ks", "swap", "lora")):
    raise ConfigError(f"{path}: a {config.get('method')!r} run, not one of Knowledge "
                      f"Swapping's (lbf, laf, or a method built on them)")
  if _is_pretraining(workdir):  # its record is the swap's config it served
    raise ConfigError(f"{workdir}: the pretraining run of a Knowledge Swapping run, not the "
                      f"swap's own workdir (the folder above it)")
  if config.init.kind == "pretrain":
    pretrain.fill_pretrain_workdir(config, workdir)
  model_cfg = common.model_config(config)
  model = models.build(model_cfg)
  return model, _frozen_base(config, model_cfg, model)[0], lora.LoraSpec.from_config(config.lora)


def _is_pretraining(workdir: str) -> bool:
  """Whether `workdir` holds a pretraining run: its results' method, or, unfinished, the
  stage of its first logged step."""
  try:
    with open(os.path.join(workdir, "results.json")) as f:
      return json.load(f).get("method") == "pretrain"
  except (OSError, ValueError, AttributeError):
    pass
  try:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      return json.loads(f.readline()).get("stage") == "pretrain"
  except (OSError, ValueError, AttributeError):
    return False


def _check_head(config: ml_collections.ConfigDict, num_learn: int) -> int:
  """The number of valid head rows, num_old + num_learn; ConfigError when the head is
  smaller."""
  num_valid = int(config.swap.num_old_classes) + num_learn
  if num_valid > int(config.model.num_classes):
    raise ConfigError(f"model.num_classes: head size {config.model.num_classes} cannot hold "
                      f"{config.swap.num_old_classes} old + {num_learn} new classes")
  return num_valid


def validate(config: ml_collections.ConfigDict, order: tuple[str, str] | None = None) -> None:
  """The swap's fields' values, and the head an `.npz` start brings (no data read);
  ConfigError names the field. `order`: the stages' order of a method built on this
  module (`run`); without it, `config.method` must be lbf or laf."""
  if order is None and config.method not in STAGE_ORDER:
    raise ConfigError(f"method: {config.method!r} is not a Knowledge Swapping order (lbf, laf)")
  if order is not None and tuple(order) not in STAGE_ORDER.values():
    raise ValueError(f"order: {order!r} (expected ('learn', 'forget') or ('forget', "
                     f"'learn'))")
  for field in ("learn_epochs", "forget_epochs"):
    require_int(config.ks[field], f"ks.{field}", 1)
  if not splits.names_classes(config.swap.learn_classes):  # else counted once data is read
    _check_head(config, len(splits.class_ids(config.swap.learn_classes, "swap.learn_classes")))
  if config.group_lasso.mode not in ("penalty", "proximal"):
    raise ConfigError(f"group_lasso.mode: {config.group_lasso.mode!r} (expected penalty or "
                      f"proximal)")
  for field in ("ks.beta", "ks.bound", "group_lasso.alpha"):
    section, key = field.split(".")
    require_nonnegative(config[section][key], field)
  lora.LoraSpec.from_config(config.lora)  # rank, alpha, targets' syntax
  if (config.init.kind == "pretrain"
      and pretrain.num_classes(config) != int(config.swap.num_old_classes)):
    raise ConfigError(f"pretrain.num_classes: {pretrain.num_classes(config)} but the swap "
                      f"starts from a model of swap.num_old_classes = "
                      f"{config.swap.num_old_classes} classes; set them equal")
  if config.init.kind == "npz" and config.init.head == "extend":  # new rows follow the old
    rows = ckpt_lib.head_rows(str(config.init.checkpoint))
    if rows is not None and rows != int(config.swap.num_old_classes):
      raise ConfigError(
          f"swap.num_old_classes: {config.swap.num_old_classes}, but init.checkpoint's head "
          f"has {rows} rows (its classes): the new classes' rows start at row "
          f"{config.swap.num_old_classes}, "
          + ("inside the trained ones" if rows > int(config.swap.num_old_classes) else
             "leaving old classes with untrained rows")
          + f"; set swap.num_old_classes = {rows}")


def run(config: ml_collections.ConfigDict, workdir: str, *,
        order: tuple[str, str] | None = None, stage_losses: dict | None = None) -> dict:
  """Runs `config.method` ("lbf" or "laf") end to end; returns the results dict.

  A method built on Knowledge Swapping (its own module, docs/adding_a_method.md) calls
  this with its stages' `order` (("learn", "forget") as LBF, or ("forget", "learn")) and
  `stage_losses`, {stage: make_loss} replacing `LOSSES` for the stages it changes;
  everything else (data, streams, LoRA, optimizer, resumption, evaluation, outputs) is
  this run's.
  """
  unknown = sorted(set(stage_losses or {}) - set(LOSSES))
  if unknown:
    raise ValueError(f"stage_losses: unknown stage(s) {', '.join(unknown)} (expected learn, "
                     f"forget)")
  validate(config, order)
  method = config.method
  order = tuple(order or STAGE_ORDER[method])
  make_loss = {**LOSSES, **(stage_losses or {})}
  ks, ocfg = config.ks, config.optim
  mesh = train.mesh_for(config)

  # Everything is validated before the workdir is touched or a pretraining run starts.
  # Data: class splits with the Knowledge Swapping label convention, then streams.
  src = common.load_sources(config.data)
  subsets = splits.knowledge_swap_splits(src["old_train"], src["old_test"], src["new_train"],
                                         src["new_test"], config.swap)
  num_valid = _check_head(config, len(subsets["learn_train"].label_map))
  stage_streams = make_streams(config, subsets, mesh, order)
  seed = int(config.seed)
  common.check_batch_size(int(config.eval.batch_size), "eval.batch_size", mesh)

  # Model and LoRA spec (checked on shapes only; no parameters yet).
  model_cfg = common.model_config(config)
  model = models.build(model_cfg)
  spec = lora.LoraSpec.from_config(config.lora)
  abstract_base = common.abstract_variables(model, model_cfg)["params"]
  grouping = config.group_lasso.grouping
  lora.groups(jax.eval_shape(lambda: lora.init(abstract_base, spec, jax.random.key(0))),
              grouping)

  for name, subset in subsets.items():
    log.info("split %-12s %6d images, classes %s", name, len(subset),
             splits.classes_text(subset.source, subset.label_map))
  run_ = train.Run(workdir, config)

  # Frozen base (backbone + extended head) and the trainable LoRA tree.
  pretrain.ensure_pretrained(config, workdir)
  base, k_lora = _frozen_base(config, model_cfg, model)
  lora_tree = common.initial_lora(config, base, spec, k_lora)
  log.info("LoRA: %d trainable parameters in %d target kernels (%d frozen)",
           lora.count(lora_tree), len(lora.target_kernels(base, spec)), lora.count(base))

  # Optimizer: AdamW; the group lasso either as a loss term (reference) or a prox step.
  alpha = float(config.group_lasso.alpha)
  proximal = config.group_lasso.mode == "proximal"
  tx = common.adamw(ocfg, extra=(lambda lr: [group_lasso.group_lasso_prox(alpha, lr, grouping)])
                    if proximal else None)
  alpha_penalty = 0.0 if proximal else alpha

  def lr_fn(epochs):
    lr = schedules.epoch_cosine(base=float(ocfg.lr), minimum=float(ocfg.min_lr), epochs=epochs)
    return lambda e, _: {"learning_rate": lr(e)}

  def reset_optimizer(state, frozen, fresh):
    # Ablation only: the reference carries the AdamW state into stage 2
    # (docs/knowledge_swapping.md).
    if fresh and ks.reset_optimizer_between_stages:
      state = state._replace(opt_state=train.replicate(tx.init(state.params), mesh))
    return state, frozen

  grad_profile = lambda grads: {"block_grad_abs": lora.block_mean_abs(grads)}
  stages = {
      name: train.Stage(
          name=name, step_fn=train.make_train_step(
              make_loss[name](model, spec.scale, config, alpha_penalty), tx, mesh,
              grad_measurements=grad_profile),
          streams=stage_streams[name],
          epoch_stream="retain", epochs=int(ks[f"{name}_epochs"]),
          hparams_fn=lr_fn(int(ks[f"{name}_epochs"])),
          on_start=reset_optimizer if name == order[1] else None)
      for name in order
  }

  frozen = train.replicate(base, mesh)
  state = train.replicate(train.create_state(lora_tree, tx, seed), mesh)
  state = run_.restore(state)
  predict_step = train.make_predict_step(
      lambda p, _, f, b: lora.apply(model, f, p, b["image"], scale=spec.scale), mesh)

  def evaluate(state, frozen=frozen, splits_=TEST_SPLITS):
    outs = common.predict_splits(config, predict_step, state, frozen,
                                 {k: subsets[v] for k, v in splits_.items()}, mesh)
    accs = {k: metrics.top1(o["logits"], o["label"]) for k, o in outs.items()}
    if splits_ is TEST_SPLITS:  # also the masked arg-max over the rows in use
      accs.update({f"{k}_masked": metrics.top1(o["logits"], o["label"], rows=num_valid)
                   for k, o in outs.items()})
    return accs

  def block_log(state):
    # Logged iterations: Ω's group norms and the knock-on profiles n_ℓ and ‖ΔW_ℓ‖ (the
    # step adds the mean |gradient| per block, `block_grad_abs`).
    params = jax.device_get(state.params)
    norms = group_lasso.group_norms(params, grouping)
    profile = lora.block_norms(params, spec.scale)
    return {"group_norms": [round(float(x), 6) for x in norms],
            "block_n": [round(v, 6) for v in profile["sum_frobenius"].values()],
            "block_delta_w": [round(v, 6) for v in profile["delta_w"].values()]}

  results = run_.meta["results"]
  if "before" not in results:
    results["before"] = {**evaluate(state), **evaluate(state, splits_=TRAIN_SPLITS)}
    log.info("[before] %s", _fmt(results["before"]))
    before = results["before"]
    if before["acc_r_masked"] - before["acc_r"] > RANDOM_ROWS_WARNING:
      log.warning(
          "warning: before the swap the head's unused random rows win retain images the "
          "rows in use get right (Acc_r %.2f over all %d rows, %.2f over the %d in use): "
          "the all-rows results (the reference's rule) count those as errors; "
          "results.json's masked_argmax does not", before["acc_r"],
          int(config.model.num_classes), before["acc_r_masked"], num_valid)
  for i, name in enumerate(order):
    state, frozen = run_.run_stage(i, stages[name], state, frozen, mesh,
                                   extra_log=block_log, eval_fn=evaluate,
                                   eval_every=int(config.eval.every_steps))
    if name not in results:
      accs = evaluate(state)
      norms = lora.block_norms(jax.device_get(state.params), spec.scale)
      if run_.is_main:  # before the stage checkpoint, so a resumed run always has it
        ckpt_lib.save_npz(jax.device_get(lora.join({}, state.params)),
                          os.path.join(run_.workdir, f"lora_{name}.npz"))
      log.info("[%s] %s", name, _fmt(accs))  # before a stop request honoured at the save
      run_.finish_stage(state, name, {**accs, "block_norms": norms})

  last = results[order[-1]]
  final = {k: last[k] for k in TEST_SPLITS}
  final["h_mean"] = metrics.h_mean(results["before"]["acc_f"], final["acc_f"], final["acc_r"])
  out = {
      "method": method,
      "presenter": "lbf",  # shows a variant's results where it is not registered
      "config": config.to_dict(),
      "prediction_rule": f"argmax over all {config.model.num_classes} head rows",
      "stages": [{"name": n, **{k: results[n][k] for k in TEST_SPLITS}}
                 for n in ("before",) + order],
      "before_train_subsets": {k: results["before"][k] for k in TRAIN_SPLITS},
      "final": final,
      # An extra, clearly apart from the reference's 200-way rule: the arg-max over the
      # old and new classes' rows only (a run recorded before it existed has none).
      "masked_argmax": {
          "rows": num_valid,
          "stages": [{"name": n, **{k: results[n][f"{k}_masked"] for k in TEST_SPLITS
                                    if f"{k}_masked" in results[n]}}
                     for n in ("before",) + order],
          "final": {k: last[f"{k}_masked"] for k in TEST_SPLITS if f"{k}_masked" in last}},
      # An extra of our own, not the paper's: the learning side's harmonic mean, with the
      # gain in Acc_n in place of the forget drop (`metrics.h_mean_learn`).
      "h_mean_learn": metrics.h_mean_learn(results["before"]["acc_n"], final["acc_n"],
                                           final["acc_r"]),
      "block_norms": {n: results[n]["block_norms"] for n in order},
      "num_trainable": lora.count(lora_tree),
  }
  text = report.present(out, run_.workdir if run_.is_main else None)
  if run_.is_main:
    if config.export.merged_npz:
      ckpt_lib.export_merged(base, jax.device_get(state.params), spec.scale,
                             os.path.join(run_.workdir, "merged_params.npz"))
  path = run_.write_results(out)
  run_.announce(text, path)
  run_.close()
  return out


def present(results: dict, workdir: str | None) -> str:
  """The stage table (printed by the run and by `python -m kswap_jax.report`);
  `stages.png`, `lora_norms.png` (per-block LoRA norms after each stage) and
  `block_profiles.png` (the same norms and the gradient magnitude per block over training)
  written in `workdir` unless None."""
  if workdir:
    report.plot_stages(results, os.path.join(workdir, "stages.png"))
    name = f"Knowledge Swapping ({results['method']})"
    report.plot_block_norms(results["block_norms"], os.path.join(workdir, "lora_norms.png"),
                            title=f"{name}: per-block LoRA norms")
    report.plot_block_profiles(os.path.join(workdir, "metrics.jsonl"),
                               os.path.join(workdir, "block_profiles.png"),
                               title=f"{name}: per-block profiles during training")
  table = report.stage_table(results)
  masked = results.get("masked_argmax", {}).get("final")
  if masked:
    table += (f"\nmasked arg-max over the {results['masked_argmax']['rows']} head rows in use "
              f"(an extra, not the reference's rule): " + ", ".join(
                  f"{report.label(k)} {v:.2f}" for k, v in masked.items()))
  return table


def _fmt(accs: dict) -> str:
  return " ".join(f"{k} {v:.2f}" for k, v in accs.items())
