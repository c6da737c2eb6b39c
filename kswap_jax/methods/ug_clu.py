"""SFR-on and UG-CLU: unlearning and continual learning-unlearning with fast-slow steps.

A run is a stream of requests over a class-incremental split of one dataset
(`clu.tasks`, `clu.requests`); each request is one stage:

    learn:T                 learn task T (replay fine-tuning on D_R ∪ D_L)
    forget:task:T           task-aware unlearning of a whole earlier task
    forget:class:C1,C2      cross-task category unlearning (classes of any learned tasks;
                            ids, or names of the data's classes: forget:class:cat,dog)
    forget:random:P         random-sample unlearning: the next chunk of a saved permutation
    learn:T+forget:...      a fused stage (UG-CLU only): learn and unlearn at once

An unlearning stage k runs the SFR-on loop on D_U (forget), D_R (retained data or a replay
buffer) and D_L (new data of a fused stage), for T outer iterations t:

    M_k = 1[(F_U + ε)/(F_R + ε) ≥ γ]                           once, at the stage's start
    if t mod N_f == 0:  FAST  θ ← θ − η(t)·base(clip(M_k ⊙ (−c(t)·∇L_U^ada)))
                        SLOW  θ ← θ − η(t)·base(∇CE(slow batch))            every t
    L_U^ada = Σ_i w_i ℓ_i,  w_i ∝ sg(ℓ_i)^(−λ);   η(t), c(t) cosine over T

with one shared base optimizer (SGD μ 0.9, coupled wd 5e-4) and BatchNorm in train mode in
both phases; F_U, F_R are empirical-Fisher diagonals over the whole forget and retain sets
in eval mode (`kswap_jax.optim.saliency`). The methods:

  * `sfr_on`: exactly the released SFR-on classification loop at every unlearning request
    (fused stages are refused: D_L = ∅); learning stages are replay fine-tuning.
  * `ug_clu`: the reconstructed UG-CLU stage loop: the mask of a fused stage balances F_U
    against F_R + F_L (`clu.mask_learn_in`), the slow batches come from D_R ∪ D_L
    (variant A, mixed or as two sub-steps) or the new data joins the FAST direction
    (variant B). With D_L = ∅ it is `sfr_on`; with D_U = ∅ replay fine-tuning.
  * `clu_joint`: the one-step Euclidean ablation: every iteration one step on
    CE(D_R batch) − c(t)·L_U^ada(D_U batch), no mask, no clip.
  * `clu_retrain`: the oracle: at every (unlearning) stage a model trained from scratch on
    everything that should be known after it (D_R ∪ D_L with full data).

Only the update of an unlearning stage differs between methods on the stream: `run_stream`
takes it as an `Unlearner` hook (the fast-slow one here; the machine-unlearning baselines
FT, GA, RL, SalUn and ℓ1-sparse in `kswap_jax.methods.baselines.unlearning` pass theirs).

The three unlearning methods train the oracle in `<workdir>/oracle` (a `clu_retrain` run,
resumable, made once) and report per stage UA, RA, TA, both membership attacks, JS/KL to
the oracle on D_U and the Avg. Gap, plus the continual-learning accuracy matrix
(docs/ug_clu.md).

References: Huang et al., arXiv 2409.19732 (SFR-on); Huang et al., arXiv 2505.15178
(UG-CLU).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import math
import os
import time
import zlib
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from kswap_jax import losses, metrics, models, report, train
from kswap_jax.config import lora_section
from kswap_jax.data import splits, streams
from kswap_jax.errors import ConfigError, StopRequested, require_number
from kswap_jax.methods import common, pretrain
from kswap_jax.methods import trainable as trainable_lib
from kswap_jax.optim import fast_slow, saliency

log = logging.getLogger("kswap_jax")

METHOD_NAMES = ("sfr_on", "ug_clu", "clu_joint", "clu_retrain")
FORGET_KINDS = ("task", "class", "random")
# Each stage k draws its stream shuffles from seed + 1000·(k + 1) + offset.
STREAM_SEEDS = {"retain": 0, "forget": 1, "learn": 2}


# Fields of the stream's sections that a method's results never depend on, traced through
# `run_stream` (`methods.fields_unread`: a `compare --sweep` over one runs the method once).
# A value they refuse is still refused (`validate`). Fused-stage fields, where a method
# refuses fused stages; mask fields, where it has no mask; for the Retrain oracle, which
# trains on what should be known, the unlearning section, the replay buffer and the
# learning-stage lengths (its own are `oracle.*`).
FUSED_FIELDS = ("clu.variant", "clu.slow_batches", "clu.learn_alpha", "clu.learn_lambda",
                "clu.fused_iterations")
MASK_FIELDS = ("clu.mask_learn_in", "clu.partition_weights", "clu.mask_recompute")
BUFFER_FIELDS = ("clu.buffer_size", "clu.buffer_kind", "clu.buffer_seed")
FIELDS_UNREAD = {  # and `data.new` (the stream is one dataset, `data.old`): `fields_unread`
    "sfr_on": (*FUSED_FIELDS, "clu.mask_learn_in", "clu.partition_weights"),
    "ug_clu": (),
    "clu_joint": ("unlearn.forget_every", "unlearn.gamma", "unlearn.use_mask",
                  "unlearn.fisher_augment", "unlearn.fisher_batch_size", "clu.learn_alpha",
                  *MASK_FIELDS),
    "clu_retrain": ("unlearn.*", *BUFFER_FIELDS, *FUSED_FIELDS, *MASK_FIELDS, "learn.epochs",
                    "learn.iterations", "oracle.enabled", "oracle.workdir",
                    # evaluations in a stage and the exported file change no result: an
                    # oracle is shared whatever its runs set there
                    "eval.every_steps", "export.merged_npz"),
}


def shared_work(method: str) -> str | None:
  """The work `compare` shares between runs that a run of `method` is: clu_retrain's run
  is the Retrain oracle the other methods measure against (`compare` reuses one for the
  other instead of training the same model twice)."""
  return "oracle" if method == "clu_retrain" else None


def fields_unread(method: str) -> tuple[str, ...]:
  """The fields `method`'s results never depend on (`FIELDS_UNREAD`, and `data.new`); a
  method registered onto this module names its own."""
  return ("data.new.*", *FIELDS_UNREAD.get(method, ()))


def sections() -> dict[str, ml_collections.ConfigDict]:
  """The sections of SFR-on / UG-CLU with their defaults ([R] marks reconstructions)."""
  return dict(
      clu=ml_collections.ConfigDict(dict(
          # [R] class-incremental split: tuple of tasks, each a tuple of class ids.
          tasks=((0, 1), (2, 3), (4, 5), (6, 7), (8, 9)),
          # [R] the request stream, one stage per entry (module docstring for the syntax).
          requests=("learn:1", "learn:2", "forget:class:1", "learn:3", "forget:random:0.1"),
          initial_tasks=(),      # tasks the init weights already know (init.kind npz/pretrain)
          buffer_size=0,         # [R] 0: full access to D_R; >0: class-balanced replay buffer
          buffer_kind="persistent",  # [R] persistent: one memory kept across stages |
                                 # resample: drawn afresh from all of D_R at every stage
          buffer_seed=0,
          random_seed=0,         # the saved permutation (random_idx.npy) of random requests
          variant="A",           # [R] A: D_L in the slow batches; B: D_L in the FAST direction
          slow_batches="mixed",  # [R] variant A: mixed (one D_R ∪ D_L batch) | substeps
          mask_learn_in="denominator",  # [R] F_L in the mask: denominator | numerator
          partition_weights="ones",  # [R] ones (= SFR-on) | data_share (p_s = |D_s|/N), in the
                                 # mask only (mixed slow batches follow the set sizes)
          mask_recompute="stage",  # [R] stage: at each unlearning stage's start | once
          learn_alpha=1.0,       # [R] variant B: c^L(t) = learn_alpha·cos-shape(t)
          learn_lambda=0.0,      # [R] >0: weights ∝ ℓ^(+λ_L) on separate D_L batches (off)
          fused_iterations=0,    # [R] fused stage length; 0 = max(unlearn, learn iterations)
          # Which parameters train (docs/ug_clu.md "LoRA"): full = every model parameter
          # (the references); lora = a LoRA tree on lora.targets plus the base leaves that
          # match lora_train, the rest frozen.
          params="full",
          lora_train=r"head/.*",  # [R] params=lora: base leaves trained in full beside the
                                  # LoRA tree; the classifier head, so that new classes can
                                  # be learned; "" = the LoRA tree alone
      )),
      unlearn=ml_collections.ConfigDict(dict(
          # SFR-on CIFAR-10 (released code): T 1500, N_f 5, η 0.01, c 25, clip 7, λ 0.5, γ 1.
          iterations=1500, forget_every=5, lr=0.01, forget_alpha=25.0, max_norm=7.0,
          clip="torch",          # torch | optax (the clip's norm + 1e-6 or not)
          lambd=0.5,             # λ of the adaptive weights
          loss="adaga",          # adaga | ga (λ = 0)
          gamma=1.0,             # γ, the saliency threshold
          use_mask=True,         # ablation: False = all-ones mask
          base="sgd", momentum=0.9, weight_decay=5e-4, b1=0.9, b2=0.999, eps=1e-8,
          beta=1.0,              # Lookahead β; 1 = off (released)
          batch_size=128,        # forget and slow batches
          fisher_batch_size=128,
          fisher_augment=True,   # the Fisher passes see data.augment (SFR-on's loaders apply
                                 # the training transform there); False = plain images
      )),
      learn=ml_collections.ConfigDict(dict(
          # Learning stages (replay fine-tuning); SFR-on's CIFAR-10 pretraining recipe.
          epochs=200, iterations=0,  # iterations > 0 overrides epochs (passes over D_R ∪ D_L)
          lr=0.1, base="sgd", momentum=0.9, weight_decay=5e-4, b1=0.9, b2=0.999, eps=1e-8,
          batch_size=128,
          # Cosine η of learning stages and the oracle: "epoch" = one value per pass (the
          # reference's CosineAnnealingLR(T_max=epochs)); "step" = every iteration. With
          # `iterations` > 0 it moves every iteration either way.
          schedule_unit="epoch",
      )),
      oracle=ml_collections.ConfigDict(dict(
          enabled=True,          # train the Retrain oracle (needed for JS/KL and Avg. Gap)
          stages="unlearn",      # unlearn: oracle at stages with D_U | all
          workdir="",            # "" = <workdir>/oracle; another run's oracle can be reused
          epochs=200, iterations=0,  # its training length (optimizer: the `learn` section)
          start="random",        # random: from scratch | init: from the init weights
          params="clu",          # [R] clu: train what clu.params says (like for like) | full
      )),
      # [R] params=lora: no source trains UG-CLU with LoRA; loralib's init (slope √5) and
      # s = alpha / rank = 1 on the ViT's FFN kernels are our choices.
      lora=lora_section(alpha=8.0, init_slope=math.sqrt(5.0)),
  )


# ----------------------------------------------------------------------------------------------
# Requests and the stage plan.

@dataclasses.dataclass(frozen=True)
class Request:
  """One parsed entry of `clu.requests`.

  Attributes:
    index: position in `clu.requests`.
    text: the entry as written.
    learn_task: 0-based task learned at this stage, or None.
    forget_kind: "task", "class", "random" or None.
    forget_arg: the task (0-based), the class ids, or the fraction/count of random samples.
  """
  index: int
  text: str
  learn_task: int | None
  forget_kind: str | None
  forget_arg: Any


def _field(i: int) -> str:
  return f"clu.requests[{i}]"


def parse_requests(requests: Sequence[str], num_tasks: int, source: Any = None
                   ) -> list[Request]:
  """Parses `clu.requests` (syntax in the module docstring); ConfigError names the entry.
  Classes of `forget:class:` are ids or names of `source`'s classes; without a source
  (the syntax check before the data is read) names are left as they are."""
  if isinstance(requests, str):
    requests = (requests,)
  out = []
  for i, text in enumerate(requests):
    learn, kind, arg = None, None, None
    for part in str(text).split("+"):
      bits = part.strip().split(":")
      if bits[0] == "learn" and len(bits) == 2 and learn is None:
        learn = _task_id(bits[1], num_tasks, i, text)
      elif bits[0] == "forget" and len(bits) == 3 and kind is None and bits[1] in FORGET_KINDS:
        kind = bits[1]
        if kind == "task":
          arg = _task_id(bits[2], num_tasks, i, text)
        elif kind == "class":
          ids = []
          for c in (c.strip() for c in bits[2].split(",") if c.strip()):
            if source is None and splits.names_classes(c):
              ids.append(c)  # a name: resolved with the data
            else:
              ids += splits.class_ids(c, f"{_field(i)}: {text!r}", source)
          twice = sorted({c for c in ids if ids.count(c) > 1}, key=str)
          if twice:
            shown = (splits.class_label(source, twice[0]) if isinstance(twice[0], int)
                     else repr(twice[0]))
            raise ConfigError(f"{_field(i)}: {text!r}: class {shown} is listed twice")
          arg = tuple(sorted(ids, key=lambda c: (isinstance(c, str), c)))
          if not arg:
            raise ConfigError(f"{_field(i)}: {text!r}: the forget set is empty (no class)")
        else:
          arg = _random_amount(bits[2], i, text)
      else:
        raise ConfigError(
            f"{_field(i)}: cannot parse {text!r} (expected learn:T, forget:task:T, "
            f"forget:class:C1,C2, forget:random:P, or learn:T+forget:...)")
    out.append(Request(i, str(text), learn, kind, arg))
  if not out:
    raise ConfigError("clu.requests: empty; expected at least one request")
  return out


def _task_id(text: str, num_tasks: int, i: int, request: str) -> int:
  try:
    t = int(text)
  except ValueError:
    raise ConfigError(f"{_field(i)}: {request!r}: task {text!r} is not an int") from None
  if not 1 <= t <= num_tasks:
    raise ConfigError(f"{_field(i)}: {request!r}: task {t} is not in 1..{num_tasks} "
                      f"(clu.tasks has {num_tasks})")
  return t - 1


def _random_amount(text: str, i: int, request: str) -> float | int:
  try:
    value = float(text)
  except ValueError:
    raise ConfigError(f"{_field(i)}: {request!r}: expected a fraction in (0, 1) or a "
                      f"count >= 1") from None
  if 0.0 < value < 1.0:
    return value
  if value >= 1.0 and value == int(value) and "." not in text:
    return int(value)
  raise ConfigError(f"{_field(i)}: {request!r}: expected a fraction in (0, 1) or an int "
                    f"count >= 1, got {text}")


@dataclasses.dataclass
class StagePlan:
  """What one stage sees (indices into the train source, sorted int64).

  Attributes:
    index: stage position.
    name: e.g. "3_forget".
    request: the parsed request.
    retain: D_R, the data kept from before the stage (without D_U), full access.
    forget: D_U (empty for a learning stage).
    learn: D_L (empty for an unlearning stage).
    kept_after: D_R ∪ D_L, what should be known after the stage.
    known_classes: classes learned and not removed after the stage.
    removed_classes: classes removed by this stage (class / task requests).
    learned_tasks: tasks learned so far (0-based, in learning order), after the stage.
  """
  index: int
  name: str
  request: Request
  retain: np.ndarray
  forget: np.ndarray
  learn: np.ndarray
  kept_after: np.ndarray
  known_classes: tuple[int, ...]
  removed_classes: tuple[int, ...]
  learned_tasks: tuple[int, ...]

  @property
  def unlearns(self) -> bool:
    return self.forget.size > 0

  @property
  def learns(self) -> bool:
    return self.learn.size > 0


def random_permutation(num_examples: int, seed: int) -> np.ndarray:
  """The saved permutation of random requests (SFR-on's `random_idx`)."""
  return np.random.default_rng(seed).permutation(num_examples).astype(np.int64)


def plan_stages(train_labels: np.ndarray, tasks: Sequence[Sequence[int]],
                requests: Sequence[Request], initial_tasks: Sequence[int],
                permutation: np.ndarray) -> list[StagePlan]:
  """The data of every stage, validated; pure function of labels, config and permutation.

  Random requests take the next chunk of `permutation` among the currently kept samples:
  D_U = the first n kept entries in permutation order, n = int(P·|kept|) (or the count).
  With everything learned, the first request is exactly permutation[:int(P·N)] (SFR-on's
  random split); later requests never overlap earlier ones.

  Raises:
    ConfigError: naming the request (a class or task never learned or already removed,
      a task learned twice, an empty forget set, nothing left to retain).
  """
  labels = np.asarray(train_labels, np.int64)
  kept = np.zeros(labels.shape, bool)
  known: set[int] = set()
  learned: list[int] = []
  for t in initial_tasks:
    learned.append(int(t))
    known |= set(tasks[t])
    kept |= np.isin(labels, tasks[t])
  rank = np.empty_like(permutation)
  rank[permutation] = np.arange(permutation.size)
  plans = []
  for r in requests:
    f = _field(r.index)
    forget = np.zeros(labels.shape, bool)
    removed: tuple[int, ...] = ()
    if r.forget_kind == "task":
      classes = sorted(set(tasks[r.forget_arg]) & known)
      if r.forget_arg not in learned or not classes:
        raise ConfigError(f"{f}: {r.text!r} names task {r.forget_arg + 1}, which was never "
                          f"learned or is already forgotten (learned: "
                          f"{[t + 1 for t in learned]})")
      removed = tuple(classes)
    elif r.forget_kind == "class":
      never = [c for c in r.forget_arg if c not in known]
      if never:
        raise ConfigError(f"{f}: {r.text!r} names class(es) {never} never learned or already "
                          f"forgotten (known classes: {sorted(known)})")
      removed = tuple(r.forget_arg)
    if removed:
      forget = kept & np.isin(labels, removed)
    elif r.forget_kind == "random":
      candidates = np.flatnonzero(kept)
      n = (r.forget_arg if isinstance(r.forget_arg, int)
           else int(r.forget_arg * candidates.size))
      if n > candidates.size:
        raise ConfigError(f"{f}: {r.text!r} asks for {n} samples, only {candidates.size} kept")
      chosen = candidates[np.argsort(rank[candidates], kind="stable")[:n]]
      forget[chosen] = True
    if r.forget_kind is not None and not forget.any():
      raise ConfigError(f"{f}: {r.text!r}: the forget set is empty")
    learn = np.zeros(labels.shape, bool)
    if r.learn_task is not None:
      if r.learn_task in learned:
        raise ConfigError(f"{f}: {r.text!r}: task {r.learn_task + 1} is already learned")
      clash = sorted(set(tasks[r.learn_task]) & known)
      if clash:
        raise ConfigError(f"{f}: {r.text!r}: classes {clash} of task {r.learn_task + 1} are "
                          f"already known")
      learn = np.isin(labels, tasks[r.learn_task])
      if not learn.any():
        raise ConfigError(f"{f}: {r.text!r}: task {r.learn_task + 1} has no training data")
    retain = kept & ~forget
    kept = retain | learn
    if not kept.any():
      raise ConfigError(f"{f}: {r.text!r} leaves nothing to retain or learn")
    known = (known - set(removed)) | (set(tasks[r.learn_task]) if r.learn_task is not None
                                      else set())
    if r.learn_task is not None:
      learned.append(r.learn_task)
    kinds = (["learn"] if r.learn_task is not None else []) + (
        ["forget"] if r.forget_kind else [])
    plans.append(StagePlan(
        index=r.index, name=f"{r.index + 1}_{'+'.join(kinds)}", request=r,
        retain=np.flatnonzero(retain), forget=np.flatnonzero(forget),
        learn=np.flatnonzero(learn), kept_after=np.flatnonzero(kept),
        known_classes=tuple(sorted(known)), removed_classes=removed,
        learned_tasks=tuple(learned)))
  return plans


def replay_buffer(labels: np.ndarray, indices: np.ndarray, size: int, seed: int) -> np.ndarray:
  """A class-balanced replay buffer of at most `size` samples out of `indices`.

  Every class present gets ⌊size / classes⌋ samples (all of them if it has fewer), chosen
  as the first entries of `default_rng([seed, class]).permutation` of its sorted indices.
  `size` 0 means full access (all of `indices`).
  """
  indices = np.asarray(indices, np.int64)
  if size <= 0 or indices.size <= size:
    return indices
  labels = np.asarray(labels)[indices]
  classes = np.unique(labels)
  per_class = max(1, size // classes.size)
  chosen = [np.random.default_rng([seed, int(c)]).permutation(indices[labels == c])[:per_class]
            for c in classes]
  return np.sort(np.concatenate(chosen))


def replay_buffers(labels: np.ndarray, plans: Sequence[StagePlan], size: int, seed: int,
                   kind: str = "persistent") -> dict[int, np.ndarray]:
  """The replay buffer of D_R that each stage sees (stage index -> sorted indices).

  `size` 0 gives every stage all of its D_R. Otherwise:
  - "resample": `replay_buffer` of the stage's D_R with seed `seed + stage index`, drawn
    afresh every stage (over a run, every kept sample can be seen);
  - "persistent": one memory of at most `size` samples (one per class held when `size`
    is smaller than the number of classes) kept across the stream. It starts
    with the data known before the first stage (`clu.initial_tasks`); a class enters it
    when it is learned, as the first entries of `default_rng([seed, class]).permutation` of
    its D_L indices, and every class then holds at most max(1, ⌊size / classes held⌋)
    (a class already held keeps its first entries: it shrinks, it is never redrawn). An
    unlearning request removes its D_U from the memory, and what it frees stays free
    until the next learning stage: the old data outside the memory is not available.
  """
  labels = np.asarray(labels)
  if size <= 0:
    return {p.index: p.retain for p in plans}
  if kind == "resample":
    return {p.index: replay_buffer(labels, p.retain, size, seed + p.index) for p in plans}
  memory: dict[int, np.ndarray] = {}  # class -> its samples, in the order they were drawn

  def admit(indices: np.ndarray) -> None:
    for c in np.unique(labels[indices]):
      drawn = np.random.default_rng([seed, int(c)]).permutation(indices[labels[indices] == c])
      held = memory.get(int(c), np.zeros(0, np.int64))
      memory[int(c)] = np.concatenate([held, drawn[~np.isin(drawn, held)]])
    per_class = max(1, size // max(1, len(memory)))
    for c in memory:
      memory[c] = memory[c][:per_class]

  admit(np.union1d(plans[0].retain, plans[0].forget) if plans else np.zeros(0, np.int64))
  buffers = {}
  for p in plans:
    memory = {c: m[np.isin(m, p.retain)] for c, m in memory.items()}
    memory = {c: m for c, m in memory.items() if m.size}
    buffers[p.index] = np.sort(np.concatenate([np.zeros(0, np.int64), *memory.values()]))
    admit(p.learn)
  return buffers


# ----------------------------------------------------------------------------------------------
# Config validation.

def _choice(value, field: str, allowed: Sequence[str]) -> str:
  if value not in allowed:
    raise ConfigError(f"{field}: {value!r} (expected one of {', '.join(allowed)})")
  return value


def _positive(value, field: str, kind=float, strict=True):
  return require_number(value, field, kind, strict)


def _validate(config) -> None:
  """Every hyper-parameter of the method sections; ConfigError names the field."""
  u, lc, c, o = config.unlearn, config.learn, config.clu, config.oracle
  _positive(u.forget_every, "unlearn.forget_every", int)
  _positive(u.gamma, "unlearn.gamma")
  _positive(u.iterations, "unlearn.iterations", int)
  _positive(u.lr, "unlearn.lr")
  _positive(u.forget_alpha, "unlearn.forget_alpha", strict=False)
  _positive(u.lambd, "unlearn.lambd", strict=False)
  if u.max_norm is not None:
    _positive(u.max_norm, "unlearn.max_norm")
  if not 0.0 < float(u.beta) <= 1.0:
    raise ConfigError(f"unlearn.beta: expected 0 < β <= 1, got {u.beta}")
  _choice(u.clip, "unlearn.clip", fast_slow.CLIPS)
  _choice(u.loss, "unlearn.loss", ("adaga", "ga"))
  for section, name in ((u, "unlearn"), (lc, "learn")):
    _choice(section.base, f"{name}.base", fast_slow.BASES)
    _positive(section.weight_decay, f"{name}.weight_decay", strict=False)
    _positive(section.momentum, f"{name}.momentum", strict=False)
  _positive(lc.lr, "learn.lr")
  _positive(lc.epochs, "learn.epochs", int, strict=False)
  _positive(lc.iterations, "learn.iterations", int, strict=False)
  if int(lc.epochs) == 0 and int(lc.iterations) == 0:
    raise ConfigError("learn.epochs: 0 with learn.iterations 0; set one of them")
  _positive(o.epochs, "oracle.epochs", int, strict=False)
  _positive(o.iterations, "oracle.iterations", int, strict=False)
  if o.enabled and int(o.epochs) == 0 and int(o.iterations) == 0:
    raise ConfigError("oracle.epochs: 0 with oracle.iterations 0; set one of them")
  _choice(o.stages, "oracle.stages", ("unlearn", "all"))
  _choice(lc.schedule_unit, "learn.schedule_unit", ("epoch", "step"))
  _choice(o.start, "oracle.start", ("random", "init"))
  _choice(c.params, "clu.params", trainable_lib.KINDS)
  _choice(o.params, "oracle.params", ("clu", "full"))
  oracle_lora = (o.params == "clu" and c.params == "lora" and
                 (o.enabled or config.method == "clu_retrain"))
  if oracle_lora and o.start == "random" and config.init.kind != "random":
    raise ConfigError("oracle.start: 'random' with clu.params='lora' would train the "
                      "oracle's LoRA tree on randomly initialised frozen weights; set "
                      "oracle.start=init or oracle.params=full")
  _choice(c.variant, "clu.variant", ("A", "B"))
  _choice(c.slow_batches, "clu.slow_batches", ("mixed", "substeps"))
  _choice(c.mask_learn_in, "clu.mask_learn_in", saliency.LEARN_IN)
  _choice(c.partition_weights, "clu.partition_weights", ("ones", "data_share"))
  _choice(c.mask_recompute, "clu.mask_recompute", ("stage", "once"))
  _positive(c.buffer_size, "clu.buffer_size", int, strict=False)
  _choice(c.buffer_kind, "clu.buffer_kind", ("persistent", "resample"))
  _positive(c.learn_alpha, "clu.learn_alpha", strict=False)
  _positive(c.learn_lambda, "clu.learn_lambda", strict=False)
  _positive(c.fused_iterations, "clu.fused_iterations", int, strict=False)
  _positive(c.random_seed, "clu.random_seed", int, strict=False)
  if c.variant == "B" and float(c.learn_alpha) and not float(u.forget_alpha):
    raise ConfigError("unlearn.forget_alpha: 0 with clu.variant=B leaves no FAST step, and "
                      "its learning term c^L(t) with it; set it > 0 or use clu.variant=A")
  if c.variant == "A" and c.slow_batches == "mixed" and float(c.learn_lambda):
    raise ConfigError("clu.learn_lambda: needs separate D_L batches (clu.slow_batches="
                      "substeps or clu.variant=B)")


def _tasks(config, num_classes: int, train_src) -> tuple[tuple[int, ...], ...]:
  """`clu.tasks` as class ids (names are `train_src`'s), checked against the head and the
  training labels."""
  value = config.clu.tasks
  if not isinstance(value, (tuple, list)) or not all(isinstance(t, (tuple, list))
                                                      for t in value):
    raise ConfigError(f"clu.tasks: expected a tuple of tuples of class ids or names (one "
                      f"per task), got {value!r}")
  tasks = tuple(splits.class_ids(t, "clu.tasks", train_src) for t in value)
  train_labels = np.asarray(train_src.labels)
  flat = [x for t in tasks for x in t]
  if not tasks or any(not t for t in tasks):
    raise ConfigError("clu.tasks: expected non-empty tasks")
  if len(set(flat)) != len(flat):
    twice = sorted({x for x in flat if flat.count(x) > 1})
    raise ConfigError(f"clu.tasks: classes {splits.shown(train_src, twice)} appear in two "
                      f"tasks")
  bad = [x for x in flat if not 0 <= x < num_classes]
  if bad:
    raise ConfigError(f"clu.tasks: classes {bad} are outside the head's [0, {num_classes}) "
                      f"(model.num_classes)")
  absent = sorted(set(flat) - set(np.unique(train_labels).tolist()))
  if absent:
    raise ConfigError(f"clu.tasks: classes {absent} have no training data")
  return tasks


# ----------------------------------------------------------------------------------------------
# Optimizer: one fast-slow transform for learning stages and one for unlearning stages,
# side by side in the optimizer state, so its structure is the same at every stage.

def _fast_slow(section, total: int, *, forget_alpha: float = 0.0, max_norm=None,
               clip="torch", beta=1.0, lr=None, schedule_every: int = 1, slow_max_norm=None
               ) -> optax.GradientTransformationExtraArgs:
  return fast_slow.fast_slow(
      float(section.lr if lr is None else lr), max(1, int(total)),
      forget_alpha=float(forget_alpha), base=section.base, momentum=float(section.momentum),
      weight_decay=float(section.weight_decay), b1=float(section.b1), b2=float(section.b2),
      eps=float(section.eps), max_norm=max_norm, clip=clip, beta=beta,
      schedule_every=schedule_every, slow_max_norm=slow_max_norm)


def _learn_tx(config, section, n: int):
  """(transformation, iterations, iterations per η value) of a training stage on n
  examples with the `learn` optimizer for `section.epochs` passes (or
  `section.iterations`): a learning stage or the oracle. With `learn.schedule_unit =
  "epoch"` and epochs, η takes one cosine value per pass, as the reference's
  `CosineAnnealingLR(T_max=epochs)` stepped after each epoch."""
  lc = config.learn
  total = _iterations(section, n, int(lc.batch_size))
  every = _schedule_every(config, section, n)
  return _fast_slow(lc, total, schedule_every=every), total, every


def _schedule_every(config, section, n: int) -> int:
  """Iterations per η value in a `_learn_tx` stage: one pass over n examples, or 1."""
  if config.learn.schedule_unit == "epoch" and int(section.iterations) <= 0:
    return math.ceil(n / int(config.learn.batch_size))
  return 1


def _unlearn_tx(config, total: int, joint: bool = False):
  """The unlearning optimizer; `joint` (clu_joint's single step, taken in the SLOW phase)
  clips that step's summed gradient at `unlearn.max_norm`, as the reference's `joint` mode
  clips it at the bound of its fast step."""
  u = config.unlearn
  bound = None if u.max_norm is None else float(u.max_norm)
  return _fast_slow(u, total, forget_alpha=float(u.forget_alpha),
                    max_norm=None if joint else bound, slow_max_norm=bound if joint else None,
                    clip=u.clip, beta=float(u.beta))


def _slot(slot: str, tx, init_all) -> optax.GradientTransformationExtraArgs:
  """`tx` acting on `opt_state[slot]` of the two-slot state {"learn", "unlearn"}."""
  def update(updates, state, params=None, **kwargs):
    new, inner = tx.update(updates, state[slot], params, **kwargs)
    return new, {**state, slot: inner}
  return optax.GradientTransformationExtraArgs(init_all, update)


# ----------------------------------------------------------------------------------------------
# Losses (all with `make_train_step(mutable=True)`: BatchNorm statistics in train mode).

def _forward(trainable, params, frozen, model_state, b, rng):
  """(logits, new model_state) in train mode (BatchNorm statistics of the batch)."""
  kwargs = dict(train=True, rngs={"dropout": rng})
  if model_state:
    return trainable.apply(params, frozen, model_state, b["image"], mask=b["mask"],
                           mutable=list(model_state), **kwargs)
  return trainable.apply(params, frozen, {}, b["image"], **kwargs), model_state


def _learn_ce(logits, b, learn_lambda: float):
  if not learn_lambda:
    return losses.cross_entropy(logits, b["label"], b["mask"])
  ell = losses.per_sample_cross_entropy(logits, b["label"], b["mask"])
  return jnp.sum(losses.adaptive_ascent_weights(ell, b["mask"], lambd=-learn_lambda) * ell)


def make_losses(trainable, config) -> dict[str, Callable]:
  """{"slow", "slow_learn", "fast", "fast_b", "joint"}: the phase losses of the trainable
  tree (`trainable.Trainable`: the whole model, or LoRA + head with the rest frozen).

  FAST receives the gradient of the POSITIVE ascent loss (the transformation applies
  −c(t)); variant B adds −(c^L/c)·CE(D_L) so the masked FAST update is
  −c(t)·∇L_U + c^L(t)·∇CE_L. The joint loss is CE_R − c(t)·L_U with c(t) as a host
  hyper-parameter.
  """
  u, c = config.unlearn, config.clu
  lambd = float(u.lambd) if u.loss == "adaga" else 0.0
  learn_lambda = float(c.learn_lambda)
  ratio_b = float(c.learn_alpha) / float(u.forget_alpha) if float(u.forget_alpha) else 0.0

  def ascent(params, frozen, ms, b, rng):
    logits, ms = _forward(trainable, params, frozen, ms, b, rng)
    return losses.adaptive_ascent_loss(logits, b["label"], b["mask"], lambd=lambd), ms

  def slow(params, frozen, batch, rng, ms):
    logits, ms = _forward(trainable, params, frozen, ms, batch["retain"], rng)
    loss = losses.cross_entropy(logits, batch["retain"]["label"], batch["retain"]["mask"])
    return loss, ({"ce_retain": loss}, ms)

  def slow_learn(params, frozen, batch, rng, ms):
    logits, ms = _forward(trainable, params, frozen, ms, batch["learn"], rng)
    loss = _learn_ce(logits, batch["learn"], learn_lambda)
    return loss, ({"ce_learn": loss}, ms)

  def fast(params, frozen, batch, rng, ms):
    loss, ms = ascent(params, frozen, ms, batch["forget"], rng)
    return loss, ({"ascent": loss}, ms)

  def fast_b(params, frozen, batch, rng, ms):
    k_u, k_l = jax.random.split(rng)
    l_u, ms = ascent(params, frozen, ms, batch["forget"], k_u)
    logits, ms = _forward(trainable, params, frozen, ms, batch["learn"], k_l)
    l_l = _learn_ce(logits, batch["learn"], learn_lambda)
    return l_u - ratio_b * l_l, ({"ascent": l_u, "ce_learn": l_l}, ms)

  def joint(params, frozen, batch, rng, ms, hparams):
    k_u, k_r = jax.random.split(rng)
    l_u, ms = ascent(params, frozen, ms, batch["forget"], k_u)
    logits, ms = _forward(trainable, params, frozen, ms, batch["retain"], k_r)
    l_r = losses.cross_entropy(logits, batch["retain"]["label"], batch["retain"]["mask"])
    return l_r - hparams["forget_coef"] * l_u, ({"ascent": l_u, "ce_retain": l_r}, ms)

  return {"slow": slow, "slow_learn": slow_learn, "fast": fast, "fast_b": fast_b,
          "joint": joint}


# ----------------------------------------------------------------------------------------------
# Evaluation.

def _subset(source, indices: np.ndarray, name: str) -> splits.Subset:
  indices = np.sort(np.asarray(indices, np.int64))
  classes = np.unique(np.asarray(source.labels)[indices]).tolist()
  return splits.Subset(name=name, source=source, indices=indices,
                       label_map={int(k): int(k) for k in classes})


class _Outputs:
  """Per-sample softmax outputs of one model on the train records a stage needs and on the
  whole test set, sliced by record index on the host."""

  def __init__(self, train_out, train_index, test_out, test_labels):
    self.train_probs = metrics.softmax(train_out["logits"])
    self.train_labels = train_out["label"]
    self.position = {int(r): i for i, r in enumerate(train_index)}
    self.test_probs = metrics.softmax(test_out["logits"])
    self.test_labels = np.asarray(test_labels)

  def train(self, indices):
    rows = np.asarray([self.position[int(r)] for r in indices], np.int64)
    return self.train_probs[rows], self.train_labels[rows]

  def test(self, classes):
    rows = np.flatnonzero(np.isin(self.test_labels, list(classes)))
    return self.test_probs[rows], self.test_labels[rows]


def _acc(probs, labels):
  return metrics.top1(probs, labels) if len(labels) else None


def periodic_metrics(out: _Outputs, plan: StagePlan) -> dict:
  """A stage's accuracies while it trains (`eval.every_steps`): ra, ta, and ua on a stage
  that unlearns, acc_learn_train on one that learns; no membership attack."""
  m = {"ra": metrics.ra(*out.train(plan.kept_after)),
       "ta": metrics.ta(*out.test(plan.known_classes))}
  if plan.unlearns:
    m["ua"] = metrics.ua(*out.train(plan.forget))
  if plan.learns:
    m["acc_learn_train"] = metrics.top1(*out.train(plan.learn))
  return m


def stage_metrics(out: _Outputs, plan: StagePlan, tasks) -> tuple[dict, np.ndarray | None]:
  """(metrics of one model after a stage, its softmax outputs on D_U or None).

  ua = 100 − acc(D_U train); ra = acc(D_R ∪ D_L train); ta = acc(test of the known
  classes); both membership attacks on D_U (members: D_R ∪ D_L, non-members: that test
  set); per-task test accuracies (raw, and over the known classes only).
  """
  m = periodic_metrics(out, plan)  # ra, ta; ua, acc_learn_train where they apply
  p_r, y_r = out.train(plan.kept_after)
  p_t, y_t = out.test(plan.known_classes)
  if plan.learns:
    m["acc_learn_test"] = _acc(*out.test(tasks[plan.request.learn_task]))
  p_u = None
  if plan.unlearns:
    p_u, y_u = out.train(plan.forget)
    n_t = min(len(y_t), len(y_r))  # the SVC's shadow sets need |D_r| >= |D_t|
    m["mia_efficacy"] = metrics.mia_efficacy_svc_confidence(
        p_r, y_r, p_t[:n_t], y_t[:n_t], p_u, y_u)
    m["mia_member_rate_entropy_logreg"] = metrics.mia_member_rate_entropy_logreg(
        p_r, p_t, p_u)
    if plan.removed_classes:
      m["acc_forget_test"] = _acc(*out.test(plan.removed_classes))
  m["task_acc"] = [_acc(*out.test(t)) for t in tasks]
  # Kept-only: a learned task over its known classes (None when all were removed); a task
  # not learned yet over all its classes (as in the raw matrix, for FWT).
  known = set(plan.known_classes)
  m["task_acc_kept"] = [
      m["task_acc"][i] if i not in plan.learned_tasks else
      _acc(*out.test(sorted(set(t) & known))) if set(t) & known else None
      for i, t in enumerate(tasks)]
  return m, p_u


GAP_KEYS = {"avg_gap": metrics.AVG_GAP_KEYS,
            "avg_gap_entropy_logreg": ("ua", "ra", "ta", "mia_member_rate_entropy_logreg")}
ORACLE_KEYS = ("ua", "ra", "ta", "mia_efficacy", "mia_member_rate_entropy_logreg",
               "acc_learn_test", "acc_forget_test")


def compare_to_oracle(m: dict, oracle: dict, probs_u, oracle_probs_u) -> dict:
  """The oracle's values, the two Avg. Gaps, JS/KL on D_U (unlearning stages); RA/TA gap
  (`avg_gap_ra_ta`) for learning stages."""
  out = {"oracle": {k: oracle[k] for k in ORACLE_KEYS if oracle.get(k) is not None}}
  if "ua" in m and "ua" in oracle:
    for name, keys in GAP_KEYS.items():
      out[name] = metrics.avg_gap(m, oracle, keys)
    out["js_to_retrain"] = metrics.js_to_retrain(oracle_probs_u, probs_u)
    out["kl_to_retrain"] = metrics.kl_to_retrain(oracle_probs_u, probs_u)
  else:
    out["avg_gap_ra_ta"] = metrics.avg_gap(m, oracle, ("ra", "ta"))
  return out


def accuracy_matrix(stage_records: Sequence[dict], plans: Sequence[StagePlan],
                    initial: dict, initial_tasks: Sequence[int], key: str = "task_acc"
                    ) -> tuple[list[int], list[list]]:
  """(task order, T×T matrix) of the learned tasks: row j is the model after the LAST
  stage before the (j+1)-th task is learned (the final stage for the last row), so the
  unlearning stages between two learning stages count; column i is task i's test accuracy.
  """
  order = list(initial_tasks)
  rows_at: list[dict] = [initial] * len(order)  # initial tasks: the model before stage 1
  for plan, record in zip(plans, stage_records):
    if plan.request.learn_task is not None:
      order.append(plan.request.learn_task)
      rows_at.append(record)
    elif rows_at:
      rows_at[-1] = record
  return order, [[row[key][t] for t in order] for row in rows_at]


def cl_measures(order, raw, random_acc, suffix: str = "", test_sizes=None) -> dict:
  """The accuracy-matrix measures (GEM, Chaudhry, Avalanche), when ≥ 2 tasks and no gaps.

  `random_acc[t]`: a randomly initialised model's accuracy on task t, FWT's baseline.

  `test_sizes[t]`: task t's test-set size, which weighs the average incremental accuracy
  by sample (the accuracy on the union of the tasks seen so far); None weighs tasks equally.
  """
  if len(order) < 2 or any(v is None for row in raw for v in row):
    return {}
  a = np.asarray(raw, np.float64)
  sizes = None if test_sizes is None else [test_sizes[t] for t in order]
  return {f"cl_final_avg_acc{suffix}": metrics.cl_final_avg_acc(a),
          f"cl_avg_incremental_acc{suffix}": metrics.cl_avg_incremental_acc(a, sizes),
          f"bwt{suffix}": metrics.bwt(a),
          f"fwt{suffix}": metrics.fwt(a, [random_acc[t] for t in order]),
          f"forgetting_max{suffix}": metrics.forgetting_max(a),
          f"forgetting_last{suffix}": metrics.forgetting_last(a)}


# ----------------------------------------------------------------------------------------------
# Plots.

def plot_accuracy_matrix(stage_names, tasks, raw, path: str, title: str) -> None:
  """Per-stage test accuracy of every task (rows: stages, columns: tasks) as a PNG."""
  a = np.asarray([[np.nan if v is None else v for v in row] for row in raw], np.float64)
  fig = report.figure(figsize=(1.0 * len(tasks) + 3, 0.5 * len(stage_names) + 2))
  ax = fig.add_subplot(1, 1, 1)
  im = ax.imshow(a, vmin=0, vmax=100, cmap="viridis", aspect="auto")
  for (i, j), v in np.ndenumerate(a):
    if np.isfinite(v):
      ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=8,
              color="white" if v < 60 else "black")
  ax.set_xticks(range(len(tasks)), [f"T{i + 1} {list(t)}" for i, t in enumerate(tasks)],
                rotation=30, ha="right", fontsize=8)
  ax.set_yticks(range(len(stage_names)), stage_names, fontsize=8)
  ax.set_title(title)
  fig.colorbar(im, ax=ax, label="test accuracy [%]")
  fig.tight_layout()
  fig.savefig(path, dpi=100)


def plot_against_oracle(stages: Sequence[dict], path: str, title: str) -> None:
  """UA, RA, TA per stage (circles, solid) against the Retrain oracle's (crosses, dashed
  where it was measured at consecutive stages) as a PNG."""
  fig = report.figure(figsize=(max(5, 1.2 * len(stages) + 3), 4))
  ax = fig.add_subplot(1, 1, 1)
  x = list(range(len(stages)))
  nan = float("nan")
  for key, color in (("ua", "C3"), ("ra", "C0"), ("ta", "C2")):
    ax.plot(x, [s.get(key, nan) for s in stages], marker="o", color=color, label=key.upper())
    ax.plot(x, [s.get("oracle", {}).get(key, nan) for s in stages], marker="x",
            linestyle="--", color=color, label=f"{key.upper()} oracle")
  ax.set_xticks(x, [s["name"] for s in stages], rotation=30, ha="right")
  ax.set_ylabel("%")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8, ncol=2)
  ax.set_title(title)
  fig.tight_layout()
  fig.savefig(path, dpi=100)


def oracle_table(results: dict) -> str:
  """The Retrain oracle's UA, RA, TA, MIA at the stages compared with it, in the stage
  table's columns ("" when no stage was)."""
  compared = [s for s in results["stages"] if s.get("oracle")]
  if not compared:
    return ""
  columns = [k for k in ("ua", "ra", "ta", "mia_efficacy")
             if any(k in s["oracle"] for s in compared)]
  width = max([10] + [len(s["name"]) + 2 for s in results["stages"]])
  rows = [f"Retrain oracle ({results.get('oracle_workdir', 'oracle')})",
          f"{'stage':<{width}}" + "".join(f"{report.label(c):>10}" for c in columns)]
  for s in compared:
    rows.append(f"{s['name']:<{width}}" + "".join(
        f"{s['oracle'][c]:>10.2f}" if c in s["oracle"] else f"{'-':>10}" for c in columns))
  return "\n".join(rows)


def present(results: dict, workdir: str | None) -> str:
  """The stage table and the oracle's (printed by the run and by
  `python -m kswap_jax.report`); `stages.png`, `acc_matrix.png` and `stages_vs_oracle.png`
  written in `workdir` unless None."""
  method, stages = results["method"], results["stages"]
  if workdir:
    report.plot_stages(results, os.path.join(workdir, "stages.png"))
    tasks = results["config"]["clu"]["tasks"]
    plot_accuracy_matrix([s["name"] for s in stages], tasks, [s["task_acc"] for s in stages],
                         os.path.join(workdir, "acc_matrix.png"),
                         f"{method}: test accuracy per task after each stage")
    plot_against_oracle(stages, os.path.join(workdir, "stages_vs_oracle.png"),
                        f"{method}: UA/RA/TA per stage (o) vs the Retrain oracle (x)")
  oracle = oracle_table(results)
  return report.stage_table(results) + ("\n\n" + oracle if oracle else "")


# ----------------------------------------------------------------------------------------------
# The run.

def oracle_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The `clu_retrain` config of a run's oracle: the fields the oracle does not depend on
  (unlearning hyper-parameters, routing, mask, buffer, debug; the LoRA fields of a
  full-parameter oracle) reset to their defaults, so every method on the same stream
  shares one oracle. Sections the oracle does not read (a baseline's own) are dropped for
  the same reason, and it evaluates its stages at their ends only (`eval.every_steps` 0).
  `learn.epochs`, `learn.iterations` and `oracle.enabled` are kept, though the oracle
  trains by `oracle.*` (FIELDS_UNREAD): resetting them would make every oracle written so
  far refuse its runs' configs."""
  from kswap_jax.config import base_config  # pylint: disable=import-outside-toplevel
  defaults = sections()
  keep = set(base_config()) | set(defaults)
  oc = ml_collections.ConfigDict(
      {k: v for k, v in copy.deepcopy(config.to_dict()).items() if k in keep})
  oc.method = "clu_retrain"
  oc.unlearn = defaults["unlearn"]
  for field in (*FUSED_FIELDS, *MASK_FIELDS, *BUFFER_FIELDS):
    key = field.split(".", 1)[1]
    oc.clu[key] = defaults["clu"][key]
  oc.clu.params = params_kind(oc)  # what the oracle trains; the rest of the choice reset
  oc.oracle.params = defaults["oracle"]["params"]
  if oc.clu.params == "full":
    oc.clu.lora_train = defaults["clu"]["lora_train"]
    oc.lora = defaults["lora"]
  oc.oracle.workdir = ""
  oc.debug.interrupt_at_step = 0
  oc.eval.every_steps = 0  # the oracle's stages are measured at their ends only
  return oc


def params_kind(config) -> str:
  """What a run trains: `clu.params`, or "full" for the oracle with oracle.params=full."""
  if config.method == "clu_retrain" and config.oracle.params == "full":
    return "full"
  return str(config.clu.params)


def make_trainable(config, model, abstract_params) -> trainable_lib.Trainable:
  """The run's trainable/frozen split (`clu.params`, `clu.lora_train`, `lora`), validated
  on shapes; a LoRA run starts from `init.lora_checkpoint` when set."""
  return trainable_lib.from_config(
      model, params_kind(config), config.lora, str(config.clu.lora_train), abstract_params,
      kind_field="clu.params", train_field="clu.lora_train",
      init_lora=lambda base, spec, rng: common.initial_lora(config, base, spec, rng))


def _initial_tasks(value, num_tasks: int) -> tuple[int, ...]:
  try:
    ids = tuple(int(t) for t in (value or ()))
  except (TypeError, ValueError):
    raise ConfigError(f"clu.initial_tasks: expected a tuple of task numbers, got "
                      f"{value!r}") from None
  bad = [t for t in ids if not 1 <= t <= num_tasks]
  if bad or len(set(ids)) != len(ids):
    raise ConfigError(f"clu.initial_tasks: {ids} (expected distinct tasks in 1..{num_tasks})")
  return tuple(t - 1 for t in ids)


_CACHE: dict = {}


def _cached(key, build):
  """build() once per key and process (jitted steps: one compilation per configuration)."""
  if key not in _CACHE:
    _CACHE[key] = build()
  return _CACHE[key]


def _iterations(section, n: int, batch_size: int) -> int:
  if int(section.iterations) > 0:
    return int(section.iterations)
  return int(section.epochs) * math.ceil(n / batch_size)


@dataclasses.dataclass(frozen=True)
class StageTools:
  """What `run_stream` hands an unlearning-stage builder (see `Unlearner`).

  Attributes:
    config: the run's config.
    model: the flax module.
    trainable: the trainable/frozen split (`trainable.Trainable`): losses and forwards go
      through `trainable.apply(params, frozen, model_state, images, ...)`.
    mesh: the data mesh.
    train_src: the training source every plan indexes into.
    first_unlearn: index of the first unlearning stage of the stream (None if none).
    subset: (indices, name) -> a `splits.Subset` of the training source.
    stream: (subsets, k, key, batch_size, field, cycle=False) -> the training stream of
      stage k over the union of `subsets`, seeded from seed + 1000·(k + 1) +
      STREAM_SEEDS[key]: a fresh shuffle every pass, whose last batch is padded and
      masked, as the reference's `cycle(DataLoader(shuffle=True))`; cycle=True cuts the
      concatenated passes into full batches (`kswap_jax.data.streams`).
    eval_batches: (indices, name, batch_size, augment=False) -> one pass of global batches
      with eval preprocessing (Fisher diagonals, saliency passes); augment=True adds the
      training augmentation `data.augment` (SFR-on's Fisher passes).
    eval_grad: (params, frozen, model_state, global batch) -> ∇ mean CE with respect to the
      trainable tree, the model in eval mode.
    compiled: (key, build) -> build() once per key, model and mesh in this process (a key
      must name everything the built step depends on).
    slot: tx -> tx acting on opt_state["unlearn"] of the two-slot optimizer state.
  """
  config: ml_collections.ConfigDict
  model: Any
  trainable: trainable_lib.Trainable
  mesh: Any
  train_src: Any
  first_unlearn: int | None
  subset: Callable
  stream: Callable
  eval_batches: Callable
  eval_grad: Callable
  compiled: Callable
  slot: Callable


@dataclasses.dataclass(frozen=True)
class Unlearner:
  """How the unlearning stages of a stream update the model: the one thing in which the
  methods on UG-CLU's request streams differ. The stream, the plan, the learning stages,
  the replay buffers, the evaluation, the oracle and the results are `run_stream`'s.

  Attributes:
    init_tx: config -> the transformation whose state is opt_state["unlearn"] (its tree
      structure must be the same at every stage; a stage installs a fresh state).
    build: (tools, plan, buffer) -> the `train.Stage` of an unlearning stage; `buffer` is
      the stage's replay buffer of D_R (all of D_R with full access).
    measures: (state) -> extra metrics recorded after an unlearning stage.
    schedule_log: (config, plan, stage) -> (state -> host values for metrics.jsonl) or None.
    fused: whether learn+forget stages are accepted (False: a ConfigError names them).
    validate: config -> None, raising ConfigError for bad values of its own sections.
  """
  init_tx: Callable[[ml_collections.ConfigDict], optax.GradientTransformation]
  build: Callable[[StageTools, StagePlan, np.ndarray], train.Stage]
  measures: Callable[[train.TrainState], dict] = lambda state: {}
  schedule_log: Callable[..., Callable | None] = lambda config, plan, stage: None
  fused: bool = True
  validate: Callable[[ml_collections.ConfigDict], None] = lambda config: None


def _fast_slow_unlearner(method: str) -> Unlearner:
  """The fast-slow unlearning stage of `sfr_on`/`ug_clu` and the one-step `clu_joint`."""

  def build(tools: StageTools, plan: StagePlan, buffer: np.ndarray) -> train.Stage:
    config, mesh = tools.config, tools.mesh
    u, lc, c = config.unlearn, config.learn, config.clu
    k = plan.index
    loss_fns = make_losses(tools.trainable, config)
    loss_key = (u.loss, float(u.lambd), float(c.learn_lambda), float(c.learn_alpha),
                float(u.forget_alpha))
    hyper = json.dumps(u.to_dict(), sort_keys=True, default=str)

    def step(kind, tx_key, tx, update_kwargs):
      key = (kind,) + tx_key + (hyper, loss_key, tuple(sorted(update_kwargs.items())))
      return tools.compiled(key, lambda: train.make_train_step(
          loss_fns[kind], tx, mesh, mutable=True, update_kwargs=update_kwargs))

    def stream(indices, name, key):
      return tools.stream([tools.subset(indices, name)], k, key, bs, "unlearn.batch_size")

    bs = int(u.batch_size)
    total = int(u.iterations)
    if plan.learns:
      total = int(c.fused_iterations) or max(total, _iterations(
          lc, buffer.size + plan.learn.size, bs))
    substeps = plan.learns and c.variant == "A" and c.slow_batches == "substeps"
    variant_b = plan.learns and c.variant == "B"
    if variant_b or substeps:
      slow_data = buffer
    else:
      slow_data = np.union1d(buffer, plan.learn)
    streams_ = {"forget": stream(plan.forget, f"{plan.name}_forget", "forget"),
                "retain": stream(slow_data, f"{plan.name}_retain", "retain")}
    if variant_b or substeps:
      streams_["learn"] = stream(plan.learn, f"{plan.name}_learn", "learn")
    tx_total = 2 * total if substeps else total
    unlearn_tx = _unlearn_tx(config, tx_total, joint=method == "clu_joint")
    tx = tools.slot(unlearn_tx)
    tx_key = ("unlearn", tx_total)
    n_f = int(u.forget_every)
    if method == "clu_joint":
      joint = step("joint", tx_key, tx, {"phase": fast_slow.SLOW})
      plan_fn = lambda t: [("joint", joint, ("forget", "retain"))]
      alpha = float(u.forget_alpha)
      hparams_fn = lambda e, t: {"forget_coef": alpha * 0.5 * (
          1.0 + math.cos(math.pi * min(t, total) / total))}
    else:
      fast = step("fast_b" if variant_b else "fast", tx_key, tx, {"phase": fast_slow.FAST})
      slow = step("slow", tx_key, tx, {"phase": fast_slow.SLOW})
      fast_keys = ("forget", "learn") if variant_b else ("forget",)
      slow_learn = (step("slow_learn", tx_key, tx, {"phase": fast_slow.SLOW})
                    if substeps else None)

      def plan_fn(t):
        subs = [("fast", fast, fast_keys)] if fast_slow.is_fast_iteration(t, n_f) else []
        if substeps:
          subs.append(("slow_learn", slow_learn, ("learn",)))
        return subs + [("slow", slow, ("retain",))]
      hparams_fn = lambda e, t: {}

    def on_start(state, frozen, fresh):
      if not fresh:
        return state, frozen  # the mask is in the restored optimizer state
      new = train.replicate(unlearn_tx.init(state.params), mesh)
      if method != "clu_joint" and u.use_mask:
        if c.mask_recompute == "once" and k != tools.first_unlearn:
          mask = state.opt_state["unlearn"].mask  # computed at the first unlearning stage
        else:
          mask = stage_mask(tools, state, frozen, plan, buffer)
        new = fast_slow.set_mask(new, mask)
      return state._replace(opt_state={**state.opt_state, "unlearn": new}), frozen
    # Logged rows hold the FAST step too (it falls on iterations 0 mod N_f).
    return train.Stage(name=plan.name, step_fn=None, streams=streams_, iterations=total,
                       plan=plan_fn, hparams_fn=hparams_fn, on_start=on_start,
                       log_first=method != "clu_joint")

  def stage_mask(tools: StageTools, state, frozen, plan: StagePlan, buffer):
    """The saliency mask of the trainable tree at the stage's starting weights (eval-mode
    Fisher diagonals)."""
    u, c = tools.config.unlearn, tools.config.clu
    t0 = time.time()

    def fisher(indices, name):
      return saliency.fisher_diagonal(
          lambda p, b: tools.eval_grad(p, frozen, state.model_state, b), state.params,
          tools.eval_batches(indices, name, int(u.fisher_batch_size),
                             augment=bool(u.fisher_augment)))
    f_u = fisher(plan.forget, f"{plan.name}_fisher_u")
    f_r = fisher(buffer, f"{plan.name}_fisher_r")
    if method == "sfr_on":
      mask = saliency.balanced_ratio_mask(f_u, f_r, threshold=float(u.gamma))
    else:
      f_l = fisher(plan.learn, f"{plan.name}_fisher_l") if plan.learns else None
      if c.partition_weights == "data_share":
        p_u, p_r, p_l = saliency.partition_weights(plan.forget.size, buffer.size,
                                                   plan.learn.size)
      else:
        p_u = p_r = p_l = 1.0
      mask = saliency.clu_ratio_mask(f_u, f_r, f_l, p_unlearn=p_u, p_remain=p_r,
                                     p_learn=p_l, learn_in=c.mask_learn_in,
                                     threshold=float(u.gamma))
    kept = saliency.mask_sparsity(mask)["kept_fraction"]
    log.info("[%s] saliency mask: %.2f%% of the weights kept (%.1f s)", plan.name,
             100 * kept, time.time() - t0)
    return mask

  def measures(state) -> dict:
    if method == "clu_joint":
      return {}
    return {"mask_kept_fraction": saliency.mask_sparsity(
        jax.device_get(state.opt_state["unlearn"].mask))["kept_fraction"]}

  def schedule_log(config, plan: StagePlan, stage: train.Stage):
    """η and c of the NEXT iteration (t after the logged SLOW step) for metrics.jsonl."""
    del plan
    u, c = config.unlearn, config.clu
    alpha = float(u.forget_alpha)
    total = stage.iterations * (2 if len(stage.streams) == 3 and c.variant == "A" else 1)

    def extra(state):
      eta, coef = fast_slow.schedule_values(state.opt_state["unlearn"], float(u.lr), alpha,
                                            total)
      return {"eta_next": eta, "forget_coef_next": coef}
    return extra

  return Unlearner(init_tx=lambda config: _unlearn_tx(config, 1), build=build,
                   measures=measures, schedule_log=schedule_log, fused=method != "sfr_on")


def _method(config) -> str:
  if config.method not in METHOD_NAMES:
    raise ConfigError(f"method: {config.method!r} is not one of {', '.join(METHOD_NAMES)}")
  return config.method


def validate(config: ml_collections.ConfigDict, unlearner: Unlearner | None = None) -> None:
  """The stream's and the method's fields' values (no data or file read; the tasks and
  requests are checked against the data when the run starts); ConfigError names the
  field. `unlearner` defaults to `config.method`'s own."""
  _validate(config)
  (unlearner or _fast_slow_unlearner(_method(config))).validate(config)
  try:
    num_tasks = len(tuple(config.clu.tasks))
  except TypeError:
    num_tasks = 0  # refused with the data's checks (`_tasks`)
  if num_tasks:
    parse_requests(tuple(config.clu.requests), num_tasks)  # the syntax of every request


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs `config.method` (sfr_on, ug_clu, clu_joint, clu_retrain) on the request stream."""
  return run_stream(config, workdir, _fast_slow_unlearner(_method(config)))


def run_stream(config: ml_collections.ConfigDict, workdir: str, unlearner: Unlearner) -> dict:
  """Runs `config.method` on the request stream with `unlearner`'s unlearning stages.

  Everything but the update of an unlearning stage is shared by every method on the
  stream: data, plan, learning stages (replay fine-tuning), replay buffers, evaluation,
  the Retrain oracle (`clu_retrain`, which trains instead of unlearning), the results
  envelope, plots and resumption.

  Args:
    config: the run's config (`config.method` names the method in the results).
    workdir: where checkpoints, metrics and results go.
    unlearner: the unlearning-stage hook (`kswap_jax.methods.baselines.unlearning` passes
      its own).

  Returns:
    The results envelope.
  """
  method = config.method
  retrain = method == "clu_retrain"
  mesh = train.mesh_for(config)
  validate(config, unlearner)
  u, lc, c = config.unlearn, config.learn, config.clu

  # Data and the stage plan, validated before the workdir is touched.
  src = common.load_sources(config.data, roles=("old",))
  train_src, test_src = src["old_train"], src["old_test"]
  num_classes = int(config.model.num_classes)
  tasks = _tasks(config, num_classes, train_src)
  requests = parse_requests(tuple(c.requests), len(tasks), train_src)
  initial_tasks = _initial_tasks(c.initial_tasks, len(tasks))
  if initial_tasks and config.init.kind == "random":
    raise ConfigError("clu.initial_tasks: a randomly initialised model knows no task "
                      "(init.kind = random)")
  permutation = random_permutation(len(train_src), int(c.random_seed))
  plans = plan_stages(np.asarray(train_src.labels), tasks, requests, initial_tasks,
                      permutation)
  if not unlearner.fused and any(p.learns and p.unlearns for p in plans):
    bad = next(p for p in plans if p.learns and p.unlearns)
    raise ConfigError(f"{_field(bad.request.index)}: {bad.request.text!r}: {method} takes "
                      f"no fused learn+forget stage (D_L = ∅); use ug_clu")
  if method == "clu_joint" and c.variant != "A":
    raise ConfigError("clu.variant: clu_joint has one step per iteration (variant A only)")
  if method == "clu_joint" and c.slow_batches != "mixed":
    raise ConfigError("clu.slow_batches: clu_joint has one step per iteration on one "
                      "D_R ∪ D_L batch ('mixed' only)")
  train_bs = {"unlearn.batch_size": int(u.batch_size), "learn.batch_size": int(lc.batch_size),
              "unlearn.fisher_batch_size": int(u.fisher_batch_size),
              "eval.batch_size": int(config.eval.batch_size)}
  for field, value in train_bs.items():
    common.check_batch_size(value, field, mesh)
  model_cfg = common.model_config(config)
  model = models.build(model_cfg)
  trainable = make_trainable(config, model, common.abstract_variables(model, model_cfg)["params"])
  run_plans = [p for p in plans if not retrain or p.unlearns or config.oracle.stages == "all"]
  # No oracle (nor its folder) for a stream whose stages it would not be compared with.
  use_oracle = bool(config.oracle.enabled) and not retrain and any(
      p.unlearns or config.oracle.stages == "all" for p in plans)
  buffers = replay_buffers(train_src.labels, plans, int(c.buffer_size), int(c.buffer_seed),
                           c.buffer_kind)
  for p in run_plans:
    separate = p.learns and (c.variant == "B" or c.slow_batches == "substeps")
    slow_size = buffers[p.index].size + (0 if separate else p.learn.size)
    if p.unlearns and not retrain and slow_size == 0:
      why = ("D_R is empty" if p.retain.size == 0 else
             f"the replay buffer holds none of D_R's {p.retain.size} samples: "
             f"clu.buffer_size = {int(c.buffer_size)}, clu.buffer_kind = {c.buffer_kind!r}")
      raise ConfigError(f"{_field(p.request.index)}: {p.request.text!r}: no retained data "
                        f"for the slow steps ({why})")

  log.info("tasks: %s", "; ".join(f"{t + 1}: {splits.classes_text(train_src, classes)}"
                                  for t, classes in enumerate(tasks)))
  for p in plans:
    replay = f"  replay {buffers[p.index].size:6d}" if int(c.buffer_size) > 0 else ""
    named = (f"  classes {splits.classes_text(train_src, p.request.forget_arg)}"
             if p.request.forget_kind == "class" else "")
    log.info("stage %-16s %-28s D_R %6d  D_U %6d  D_L %6d%s%s", p.name, p.request.text,
             p.retain.size, p.forget.size, p.learn.size, replay, named)
  oracle_dir = (config.oracle.workdir or os.path.join(os.path.abspath(workdir), "oracle")) \
      if use_oracle else None
  if oracle_dir:
    if not os.path.exists(os.path.join(oracle_dir, "results.json")):  # else only read
      train.check_writable(oracle_dir, "oracle.workdir")
    _check_oracle_record(config, oracle_dir)  # an oracle of another config: refused now
  common.note_conversion(config, [train_src, test_src])  # before Run: a dry run says it too
  run_ = train.Run(workdir, config)

  # Model, trainable/frozen split, optimizer state (two fast-slow slots), train state.
  pretrain.ensure_pretrained(config, workdir)
  seed = int(config.seed)

  def init_model(start: str):
    """(trainable tree, frozen tree (replicated), model_state) at `start`."""
    if start == "random" and config.init.kind != "random":
      variables = models.init_variables(model, model_cfg, jax.random.key(seed))
      params, model_state = variables.pop("params"), variables
    else:
      params, model_state = common.load_base(config, model_cfg, model, jax.random.key(seed))
    params, frozen = trainable.split(params, jax.random.fold_in(jax.random.key(seed), 1))
    return params, train.replicate(frozen, mesh), model_state

  params, frozen, model_state = init_model("init")
  # The Retrain oracle never unlearns: its (unused) unlearning slot is built from the
  # defaults, so that no unlearn.* value shapes its checkpoint (`FIELDS_UNREAD`).
  learn_any = _fast_slow(lc, 1)
  unlearn_any = unlearner.init_tx(oracle_config(config) if retrain else config)

  def init_opt(p):
    return {"learn": learn_any.init(p), "unlearn": unlearn_any.init(p)}

  state = train.replicate(train.TrainState(
      step=jnp.zeros((), jnp.int32), params=params, opt_state=init_opt(params),
      rng=jax.random.key_data(jax.random.key(seed)), model_state=model_state), mesh)
  state = run_.restore(state)

  loss_fns = make_losses(trainable, config)
  # Compiled functions are shared by every run in this process with the same model, mesh,
  # trainable split and hyper-parameters (the oracle run, tests): one compilation each.
  base_key = (model_cfg.to_json(), tuple(d.id for d in mesh.devices.flat), trainable.key)
  predict_step = _cached(base_key + ("predict",), lambda: train.make_predict_step(
      lambda p, ms, f, b: trainable.apply(p, f, ms, b["image"]), mesh))

  def eval_grad_fn(p, f, ms, b):
    def loss(p):
      logits = trainable.apply(p, f, ms, b["image"])  # eval mode (running stats)
      return losses.cross_entropy(logits, b["label"], b["mask"])
    return jax.grad(loss)(p)
  eval_grad = _cached(base_key + ("eval_grad",), lambda: jax.jit(eval_grad_fn))

  kw = common.stream_kwargs(config)

  def eval_batches(indices, name, batch_size, augment=False):
    aug = dict(augment=str(config.data.augment), crop_padding=int(config.data.crop_padding),
               seed=seed + zlib.crc32(name.encode())) if augment else {}
    for b in streams.eval_batches(_subset(train_src, indices, name), batch_size=batch_size,
                                  **kw, **aug):
      yield train.to_global(b, mesh)

  def stream_of(subsets, k, key, bs, field, cycle=False):
    return common.make_stream(config, subsets, batch_size=bs, field=field,
                              seed=seed + 1000 * (k + 1) + STREAM_SEEDS[key], cycle=cycle,
                              mesh=mesh)

  def stream(indices, name, k, key, bs, field):
    return stream_of([_subset(train_src, indices, name)], k, key, bs, field)

  loss_key = (u.loss, float(u.lambd), float(c.learn_lambda), float(c.learn_alpha),
              float(u.forget_alpha))

  def step(kind, tx_key, tx, update_kwargs):
    # tx_key: (slot, everything else the optimizer is built from: iterations, ...).
    slot = tx_key[0]
    hyper = json.dumps((config.learn if slot == "learn" else config.unlearn).to_dict(),
                       sort_keys=True, default=str)
    key = base_key + (kind,) + tuple(tx_key) + (hyper, loss_key,
                                                tuple(sorted(update_kwargs.items())))
    return _cached(key, lambda: train.make_train_step(
        loss_fns[kind], tx, mesh, mutable=True, update_kwargs=update_kwargs))

  tools = StageTools(
      config=config, model=model, trainable=trainable, mesh=mesh, train_src=train_src,
      first_unlearn=next((p.index for p in run_plans if p.unlearns), None),
      subset=lambda indices, name: _subset(train_src, indices, name), stream=stream_of,
      eval_batches=eval_batches, eval_grad=eval_grad,
      compiled=lambda key, build: _cached(base_key + tuple(key), build),
      slot=lambda tx: _slot("unlearn", tx, init_opt))

  def build_stage(plan: StagePlan) -> train.Stage:
    k = plan.index
    buffer = buffers[k]
    if retrain:
      n = plan.kept_after.size
      oracle_tx, total, every = _learn_tx(config, config.oracle, n)
      tx = _slot("learn", oracle_tx, init_opt)
      streams_ = {"retain": stream(plan.kept_after, f"{plan.name}_oracle", k, "retain",
                                   int(lc.batch_size), "learn.batch_size")}
      slow = step("slow", ("learn", total, every), tx, {"phase": fast_slow.SLOW})

      def on_start(state, frozen, fresh):
        # The frozen tree is not checkpointed: it comes from `oracle.start` also on resume.
        p, frozen, ms = init_model(config.oracle.start)
        if fresh:  # from scratch (or from the init weights), fresh optimizer
          state = state._replace(params=train.replicate(p, mesh),
                                 model_state=train.replicate(ms, mesh),
                                 opt_state=train.replicate(init_opt(p), mesh))
        return state, frozen
      return train.Stage(name=plan.name, step_fn=slow, streams=streams_, iterations=total,
                         on_start=on_start)

    if not plan.unlearns:  # learning stage: replay fine-tuning on buffer(D_R) ∪ D_L
      data = np.union1d(buffer, plan.learn)
      learn_tx, total, every = _learn_tx(config, lc, data.size)
      tx = _slot("learn", learn_tx, init_opt)
      slow = step("slow", ("learn", total, every), tx, {"phase": fast_slow.SLOW})

      def on_start(state, frozen, fresh):
        if fresh:  # a fresh optimizer per stage
          opt = {**state.opt_state, "learn": train.replicate(learn_tx.init(state.params), mesh)}
          state = state._replace(opt_state=opt)
        return state, frozen
      return train.Stage(
          name=plan.name, step_fn=slow, iterations=total, on_start=on_start,
          streams={"retain": stream(data, f"{plan.name}_replay", k, "retain",
                                    int(lc.batch_size), "learn.batch_size")})

    return unlearner.build(tools, plan, buffers[k])  # an unlearning (or fused) stage

  # Evaluation of the current model on what a stage needs.
  def outputs(state, frozen, plan_list) -> _Outputs:
    needed = np.unique(np.concatenate(
        [np.concatenate([p.kept_after, p.forget, p.learn]) for p in plan_list]))
    res = common.predict_splits(config, predict_step, state, frozen,
                                {"train": _subset(train_src, needed, "eval_train"),
                                 "test": _subset(test_src, np.arange(len(test_src)),
                                                 "eval_test")}, mesh)
    return _Outputs(res["train"], needed, res["test"], res["test"]["label"])

  results = run_.meta["results"]
  if "before" not in results:
    out = outputs(state, frozen, plans[:1])
    results["before"] = {"task_acc": [_acc(*out.test(t)) for t in tasks]}
  if "random_init" not in results:
    # FWT's baseline b_i: a randomly initialised model's accuracy on each task (GEM), which
    # is the starting model unless the run starts from trained weights.
    if config.init.kind == "random":
      results["random_init"] = results["before"]
    else:
      p, f, ms = init_model("random")
      out = outputs(state._replace(params=train.replicate(p, mesh),
                                   model_state=train.replicate(ms, mesh)), f, plans[:1])
      results["random_init"] = {"task_acc": [_acc(*out.test(t)) for t in tasks]}
  oracle_results = None
  if oracle_dir and os.path.exists(os.path.join(oracle_dir, "results.json")):
    oracle_results = _oracle(config, oracle_dir)  # another run's: checked before training
  elif oracle_dir:  # trained later, after stages that a bad path would then waste
    train.prepare_workdir(oracle_dir, "oracle.workdir")
    _check_oracle_record(config, oracle_dir)  # an unfinished oracle of another config
  if run_.is_main:  # after the checks: a refused run leaves no file behind
    np.save(os.path.join(run_.workdir, "random_idx.npy"), permutation)
  probs_dir = os.path.join(run_.workdir, "oracle_probs")

  def schedule_log(plan: StagePlan, stage: train.Stage):
    """η of the NEXT iteration for metrics.jsonl (the unlearner's values when unlearning)."""
    if plan.unlearns and not retrain:
      return unlearner.schedule_log(config, plan, stage)

    every = _schedule_every(config, config.oracle if retrain else lc,
                            stage.streams["retain"].num_examples)

    def extra(state):
      eta, _ = fast_slow.schedule_values(state.opt_state["learn"], float(lc.lr), 0.0,
                                         stage.iterations, schedule_every=every)
      return {"eta_next": eta}
    return extra

  for plan in run_plans:
    run_.stage_seconds(plan.name)  # starts the stage's clock, or continues a resumed one
    stage = build_stage(plan)
    state, frozen = run_.run_stage(
        run_plans.index(plan), stage, state, frozen, mesh, extra_log=schedule_log(plan, stage),
        eval_fn=lambda st, fr, plan=plan: periodic_metrics(outputs(st, fr, [plan]), plan),
        eval_every=int(config.eval.every_steps))
    if plan.name in results:
      continue
    # Stopped, in the checkpoint meta: a rerun after a stop in the oracle's training (the
    # stage is saved before it) reads the stage's training time, not a clock that ran on.
    seconds = run_.meta.get("trained_seconds", {}).get(plan.name)  # an older checkpoint's
    seconds = run_.stage_seconds(plan.name, stop=True) if seconds is None else seconds
    m, probs_u = stage_metrics(outputs(state, frozen, [plan]), plan, tasks)
    if use_oracle and (plan.unlearns or config.oracle.stages == "all"):
      if oracle_results is None:
        if not os.path.exists(os.path.join(oracle_dir, "results.json")):
          # The oracle trains now, inside this run: checkpoint the stage's training first,
          # so a stop request honoured in the oracle's run loses none of it (the rerun
          # evaluates the restored state again, then resumes the oracle).
          run_.save(state)
          run_.checkpointer.wait()
        try:
          oracle_results = _oracle(config, oracle_dir)
        except StopRequested as e:
          raise StopRequested(f"the Retrain oracle ({oracle_dir}): {e}; {plan.name}'s "
                              f"training is checkpointed too") from None
      o = oracle_results["by_name"][plan.name]
      o_probs = (np.load(os.path.join(oracle_dir, "oracle_probs", f"{plan.name}.npy"))
                 if plan.unlearns else None)
      m.update(compare_to_oracle(m, o, probs_u, o_probs))
    if retrain and probs_u is not None and run_.is_main:
      os.makedirs(probs_dir, exist_ok=True)  # before the stage checkpoint
      np.save(os.path.join(probs_dir, f"{plan.name}.npy"), probs_u)
    if plan.unlearns and not retrain:
      m.update(unlearner.measures(state))
    m["seconds"] = round(seconds, 3)
    log.info("[%s] %s", plan.name, " ".join(  # before a stop request honoured at its save
        f"{k} {v:.2f}" for k, v in m.items() if isinstance(v, float)))
    run_.finish_stage(state, plan.name, m)

  test_labels = np.asarray(test_src.labels)
  test_sizes = [int(np.isin(test_labels, t).sum()) for t in tasks]
  out = _envelope(config, method, run_plans, plans, results, test_sizes, initial_tasks)
  out["num_trainable"] = int(sum(np.size(x) for x in jax.tree_util.tree_leaves(params)))
  out["params"] = trainable.kind
  if int(c.buffer_size) > 0 and not retrain:
    out["replay_sizes"] = {p.name: int(buffers[p.index].size) for p in run_plans}
  if oracle_dir:
    out["oracle_workdir"] = oracle_dir
  text = report.present(out, run_.workdir if run_.is_main else None)
  if config.export.merged_npz:  # the model after the last request, LoRA folded in
    common.export_model(run_, trainable.full(state.params, frozen), state.model_state)
  path = run_.write_results(out)
  run_.announce(text, path)
  run_.close()
  return out


def _check_oracle_record(config, oracle_dir: str, recorded: dict | None = None) -> None:
  """ConfigError when `oracle_dir` holds (or started) the oracle of another config;
  `recorded` defaults to its workdir record, `config.json`, when there is one."""
  path = os.path.join(oracle_dir, "config.json")
  if recorded is None:
    if not os.path.exists(path):
      return
    with open(path) as f:
      recorded = json.load(f)
  diff = train.config_difference(recorded, oracle_config(config))
  if diff:
    raise ConfigError(f"oracle.workdir {oracle_dir}: holds the oracle of another stream "
                      f"or model ({diff}); point oracle.workdir elsewhere or leave it "
                      f"empty")


@contextlib.contextmanager
def _labelled_logs(label: str):
  """Every log line written while the block runs starts with `label`: a filter on the
  handlers (the root logger's and the library's), so the lines of child loggers
  (`kswap_jax.data.splits`) and of other libraries get it too, once."""
  def add(record: logging.LogRecord) -> bool:
    if not getattr(record, "kswap_label", None):
      record.msg, record.kswap_label = f"{label}{record.msg}", label
    return True
  handlers = [*logging.getLogger().handlers,
              *(h for h in log.handlers if h not in logging.getLogger().handlers)]
  for handler in handlers:
    handler.addFilter(add)
  try:
    yield
  finally:
    for handler in handlers:
      handler.removeFilter(add)


def _oracle(config, oracle_dir: str) -> dict:
  """The oracle's results (trained now unless `oracle_dir` holds a finished run of this
  run's oracle config; a finished run of another one is an error, not a silent reuse)."""
  path = os.path.join(oracle_dir, "results.json")
  if not os.path.exists(path):
    log.info("training the Retrain oracle in %s", oracle_dir)
    with _labelled_logs("oracle: "):  # its stages share the run's names
      run(oracle_config(config), oracle_dir)
    log.info("the Retrain oracle is trained; back to %s", config.method)
  with open(path) as f:
    results = json.load(f)
  _check_oracle_record(config, oracle_dir, results.get("config", {}))
  results["by_name"] = {s["name"]: s for s in results["stages"]}
  return results


def _envelope(config, method, run_plans, plans, results, test_sizes, initial_tasks) -> dict:
  """The results envelope (timings kept apart from the metrics, so a resumed run's
  stages and final values equal an uninterrupted run's)."""
  stages, timing = [], {}
  for plan in run_plans:
    r = dict(results[plan.name])
    timing[plan.name] = r.pop("seconds", None)
    stages.append({"name": plan.name, "request": plan.request.text, **r})
  final = {}
  # Each value from the last stage that has it: RA/TA from the last stage, the unlearning
  # metrics from the last unlearning stage when the stream ends with a learning stage.
  for key in ("ua", "ra", "ta", "mia_efficacy", "mia_member_rate_entropy_logreg",
              "js_to_retrain", "kl_to_retrain", "avg_gap", "avg_gap_entropy_logreg"):
    have = [s for s in stages if key in s]
    if have:
      final[key] = have[-1][key]
  gaps = [s["avg_gap"] for s in stages if "avg_gap" in s]
  if gaps:
    final["avg_gap_mean"] = float(np.mean(gaps))
  out = {"method": method, "config": config.to_dict(),
         "prediction_rule": f"argmax over all {config.model.num_classes} head rows",
         "stages": stages, "final": final, "timing_seconds": timing,
         "presenter": "ug_clu"}  # shows a variant's results where it is not registered
  if len(run_plans) == len(plans):  # the continual-learning matrix needs every stage
    initial = results["before"]
    order, raw = accuracy_matrix(stages, plans, initial, initial_tasks)
    _, kept = accuracy_matrix(stages, plans, initial, initial_tasks, key="task_acc_kept")
    random_acc = results["random_init"]["task_acc"]
    final.update(cl_measures(order, raw, random_acc, test_sizes=test_sizes))
    # Kept-only cells cover fewer test samples than their task has: tasks weigh equally.
    final.update(cl_measures(order, kept, random_acc, suffix="_kept"))
    out["acc_matrix"] = {"tasks": [t + 1 for t in order], "raw": raw, "kept": kept,
                         "per_stage": [s["task_acc"] for s in stages],
                         "before": initial["task_acc"], "random_init": random_acc}
  return out
