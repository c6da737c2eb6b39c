"""The continual-forgetting baselines of the GS-LoRA tables, on GS-LoRA's tasks and metrics.

Every baseline trains the whole backbone except the (CosFace) head, which stays frozen, with
a fresh optimizer per task, on the same task sequence, training subsets, streams, evaluation
rule (the margin arg-max) and results envelope as `gs_lora` (`gs_lora.task_data`,
`make_evaluate`, `task_record`, `results_envelope`). With z(x, y) the head's logits with the
margin on label y, e(x) the embedding it sees, y' a fresh wrong label drawn for a forget
sample at every access (`relabel`), B_r, B_f retain and forget batches, θ the trainable tree:

    cf_retrain  a freshly initialised model (head included) trained with CE on D_r only
    cf_ft       CE(z(B_r), y) from the current model
    cf_l2       CE on D_f(relabelled) ∪ D_r  + λ Σ_{s≤t} ‖θ − θ*_s‖²
    cf_ewc      …                            + λ Σ_{s≤t} Σ F_s (θ − θ*_s)²     (diagonal Fisher)
    cf_mas      …                            + λ Σ_{s≤t} Σ Ω_s (θ − θ*_s)²     (MAS importance)
    cf_lwf      CE(B_f, y') + λ_kd KD_T(z(B_r) ‖ z_teacher(B_r)) + λ_r CE(B_r)
    cf_der      CE(B_f, y') + λ Σ_i ‖e(x_i) − e_teacher(x_i)‖²  on B_r
    cf_der_pp   … + λ' CE on a second retain batch
    cf_fdr      CE(B_f, y') + λ mean_i ‖z(x_i) − z_teacher(x_i)‖₂  on B_r
    cf_scrub    max steps on D_f: −T²·KD(student ‖ teacher); min steps on D_r:
                γ CE + α T²·KD, in SCRUB's own schedule (`scrub_schedule`)
    cf_scrub_s  SCRUB + p Σ_k ‖θ_k − θ̄_k‖_F in every step, θ̄ an exponential average of
                the weights refreshed once per super-epoch (`kswap_jax.optim.sgda`)
    cf_lirf     LIRF*: only the lower half of the blocks trains, under the frozen upper
                half (in eval mode): (1−α) CE(B_f, y') − λ_at AT(mid, mid_teacher)
                + λ_kd α T² KD on the logits [:, n_forget:] + λ_r CE(B_r)
                (`lirf_attention`, `cf_lirf.kd_rows`)

θ*_s is the model at the start of task s and F_s / Ω_s its importance (`ewc_importance`,
`mas_importance`); both live in the checkpointed cross-stage state
(`TrainState.carry["anchor"]`, `["importance"]`, stacked with a leading task axis), computed
when a task starts and accumulated over tasks as the reference does, so a run killed in
task t resumes with the terms of tasks 1..t. The "*" methods (L2, EWC, MAS) replay the
relabelled forget subset and the retain subset through one loader; LwF, DER, DER++ and FDR
take their epoch from the relabelled forget subset and cycle the retain subset.

Shipped hyper-parameters are the reference's CASIA-100 continual scripts
(`scripts/run_cl_forget.sh`, `util/args.py` of github.com/bjzhb666/GS-LoRA), one section per
method; see docs/continual_forgetting_baselines.md for the reconstructed choices and the reference's bugs.

References: Zhao et al., arXiv 2403.11530 (GS-LoRA) and arXiv 2501.09705 (GS-LoRA++), which
tabulate these baselines; the methods' own papers are cited on their functions.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from kswap_jax import losses, models, report, train
from kswap_jax.data import streams
from kswap_jax.data import tasks as tasks_lib
from kswap_jax.errors import ConfigError, require_int
from kswap_jax.methods import common, continual, gs_lora, pretrain, trainable
from kswap_jax.optim import schedules, sgda

log = logging.getLogger("kswap_jax")

Tree = Any

METHODS = ("cf_retrain", "cf_ft", "cf_l2", "cf_ewc", "cf_mas", "cf_lwf", "cf_der",
           "cf_der_pp", "cf_fdr", "cf_scrub", "cf_scrub_s", "cf_lirf")
ANCHORED = ("cf_l2", "cf_ewc", "cf_mas")             # replay ∪ + a quadratic anchor penalty
# Forget epoch, cycled retain, a teacher:
PAIRED = ("cf_lwf", "cf_der", "cf_der_pp", "cf_fdr", "cf_lirf")
KD_ROWS = ("reference", "retained")  # LIRF's distilled logits
SCRUB = ("cf_scrub", "cf_scrub_s")                    # max/min steps in SCRUB's schedule
TEACHER_METHODS = PAIRED + SCRUB
RELABELLING = ANCHORED + PAIRED  # relabel their forget samples (cf.relabel)
IMPORTANCE_METHODS = ("cf_ewc", "cf_mas")  # the anchor weighted by an importance
RELABEL_RULES = ("reference", "other")
TEACHERS = ("pretrained", "task_start")
IMPORTANCE_DATA = ("full", "subset")


def fields_unread(method: str) -> tuple[str, ...]:
  """The fields `method`'s results never depend on (`methods.reads_field`): `data.new`, and
  of the shared `cf` section: relabelling
  only in the anchored and paired losses, a teacher only for the paired methods and SCRUB,
  importance data only for EWC and MAS, the auxiliary stream's batches only in the paired
  streams, and SCRUB's own learning rate and Adam weight decay in place of the shared ones."""
  unread = ["data.new.*"]  # the tasks forget classes of data.old
  if method not in RELABELLING:
    unread.append("cf.relabel")
  if method not in TEACHER_METHODS:
    unread.append("cf.teacher")
  if method not in IMPORTANCE_METHODS:
    unread.append("cf.importance_data")
  if method not in PAIRED:
    unread.append("cf.aux_batches")
  if method in SCRUB:
    unread += ["cf.min_lr", "cf.weight_decay"]
  return tuple(unread)


def sections_used(method: str) -> tuple[str, ...]:
  """The sections `method` reads: the shared `cf`, the task list and its own
  (`methods.check_sections`)."""
  return ("cf", "tasks", method)


def _own(**fields) -> ml_collections.ConfigDict:
  """A baseline's own section: its epochs, its learning rate and its weights."""
  return ml_collections.ConfigDict(dict(
      epochs=0,                    # > 0 overrides cf.epochs for this method (0: cf.epochs)
      **fields))


def sections() -> dict[str, ml_collections.ConfigDict]:
  """The baselines' config sections with the reference's CASIA-100 values as defaults.

  `cf` holds what every baseline shares (the common settings of the reference's baseline
  commands: batch 48, 100 epochs per task, AdamW wd 0.05, per-epoch cosine to 1e-5), one
  section per method its own learning rate and weights, and `epochs` (> 0 overrides
  `cf.epochs` for that method, e.g. to give every baseline a similar number of steps in a
  short demo; 0 keeps `cf.epochs`, the reference's setting). Sources (flags of
  `train/train_own_forget_cl.py` in `scripts/run_cl_forget.sh`, 4-task block):
    cf_retrain  --retrain --lr 3e-4 --warmup-epochs 5 (timm warmup_lr 1e-6)
    cf_ft       not in the reference: CE on the retain subset, the "*" methods' lr 1e-4
    cf_l2       --l2 --l2_lambda 0.1 --lr 1e-4 (one-task runs: 0.05)
    cf_ewc      --ewc --ewc_lambda 10 --lr 1e-4
    cf_mas      --MAS --mas_lambda 0.005 --lr 1e-4 (one-task few-shot: 5)
    cf_lwf      --Lwf --Lwf_lambda_remain 10 --lr 1e-4; args defaults Lwf_lambda_kd 0.5,
                Lwf_T 2
    cf_der      --Der --DER_lambda 0.01 --lr 1e-3
    cf_der_pp   --Der --DER_lambda 0.005 --DER_plus --DER_plus_lambda 0.005 --lr 1e-3
    cf_fdr      --FDR --FDR_lambda 50 --lr 1e-3
    cf_scrub    --SCRUB --opt adam --sgda_smoothing 0 --lr 1e-4; args defaults sgda_gamma
                0.99, sgda_alpha 0.001, sgda_weight_decay 5e-4, kd_T 2, SCRUB_superepoch 10,
                scrub_decay_epoch 100, lr_decay_rate 0.1 (config.py)
    cf_scrub_s  as cf_scrub with --sgda_smoothing 0.1 (4 tasks; 0.05 in one-task and
                ImageNet runs); the average's β 0.1 (the training script's avg_fn)
    cf_lirf     --LIRF --lr 1e-4; args defaults LIRF_alpha 0.1, LIRF_T 10; the weights 300,
                10, 0.05, 5 and the 3 + 3 split of the 6-block face ViT are in the code
  """
  tasks = gs_lora.sections()["tasks"]
  cd = ml_collections.ConfigDict
  scrub = dict(
      epochs=0,                    # > 0 overrides cf.epochs for this method (0: cf.epochs)
      lr=1e-4,                     # torch Adam's, constant (no cosine)
      weight_decay=5e-4,           # L2 added to the gradient (torch Adam's weight_decay)
      gamma=0.99, alpha=0.001, temperature=2.0,
      max_epochs=5, min_epochs=5,  # per super-epoch: max+min inner epochs, then min only
      lr_decay_at=0.7,             # LR × lr_decay_rate from this share of the inner epochs
      lr_decay_rate=0.1)
  return {
      "tasks": tasks,
      "cf": cd(dict(
          batch_size=48,           # -b 48
          epochs=100,              # -e 100 per task (SCRUB: inner epochs, `scrub_schedule`)
          min_lr=1e-5, weight_decay=0.05, b1=0.9, b2=0.999, eps=1e-8,  # timm adamw
          relabel="reference",     # reference: (y + U{1..100}) mod n_forget; other: U(classes∖y)
          teacher="pretrained",    # LwF/DER/FDR/SCRUB teacher [code: copied before the task
                                   # loop]; task_start: the model at the task's start
          importance_data="full",  # EWC/MAS terms of tasks ≥ 2 on the full retain training set
                                   # [code, a quirk]; subset: the task's retain subset
          eval_margin=True,        # accuracy = arg-max of the margin logits (reference)
          # LwF/DER/DER++/FDR's cycled retain stream: "per_epoch" restarts it every epoch and
          # keeps each pass's partial batch, as the reference's prefetcher (re-created in
          # every train_one_epoch_*); "continuous": full batches, no restart.
          aux_batches="per_epoch",
      )),
      "cf_retrain": _own(lr=3e-4, warmup_epochs=5, warmup_lr=1e-6),
      "cf_ft": _own(lr=1e-4),
      "cf_l2": _own(lr=1e-4, weight=0.1),
      "cf_ewc": _own(lr=1e-4, weight=10.0),
      "cf_mas": _own(lr=1e-4, weight=0.005),
      "cf_lwf": _own(lr=1e-4, kd_weight=0.5, retain_weight=10.0, temperature=2.0,
                     kd_reference_bug=False),  # True: the reference's KD ≡ 0
      "cf_der": _own(lr=1e-3, weight=0.01),
      "cf_der_pp": _own(lr=1e-3, weight=0.005, retain_weight=0.005),
      "cf_fdr": _own(lr=1e-3, weight=50.0),
      "cf_scrub": cd(scrub),
      "cf_lirf": _own(
          lr=1e-4, alpha=0.1, temperature=10.0,
          at_weight=300.0, kd_weight=10.0, retain_weight=5.0,
          split_blocks=0,       # blocks of the trained lower half; 0: depth // 2 (3 of 6)
          kd_rows="reference",  # reference: logits[:, n_forget:] (the forget classes taken
                                # to be the first ids, a quirk); retained: the classes this
                                # task does not forget
      ),
      "cf_scrub_s": cd(dict(
          scrub,            # SCRUB's fields, plus:
          smoothing=0.1,    # p of p Σ_k ‖θ_k − θ̄_k‖_F (--sgda_smoothing)
          average_beta=0.1,  # θ̄ ← (1 − β) θ̄ + β θ once per super-epoch; the first copies θ
          fused_qkv=True,   # [R] q, k, v kernels (and biases) as one tensor, as torch stores
                            # them; False: one norm per leaf
      )),
  }


# ----------------------------------------------------------------------------------------------
# Pure pieces.

def relabel(key: jax.Array, labels: jax.Array, is_forget: jax.Array, *, rule: str,
            num_forget: jax.Array | int, num_classes: int) -> jax.Array:
  """Fresh random wrong labels for the forget samples of a batch (others keep theirs).

      reference:  y' = (y + r) mod n_f,  r ~ U{1, …, 100};  y' ← (y + 1) mod n_f if y' = y
      other:      y' ~ U({0, …, K−1} ∖ {y})

  The reference (`image_iter.py::CLDatasetWrapper`) takes the modulus over the number of
  forget classes n_f, so its targets are the global ids [0, n_f), whichever classes those
  are (retained, forgotten earlier or now). Both rules never return y (for n_f ≥ 2) and
  draw anew on every call; inside the jitted step `key` comes from the step's rng, so runs
  are deterministic and resumable.

  Args:
    key: a PRNG key.
    labels: (batch,) int class ids.
    is_forget: (K,) bool/float, 1 for the task's forget classes.
    rule: "reference" or "other".
    num_forget: n_f (may be traced).
    num_classes: K, the classes of the label space (`tasks.num_classes`).

  Returns:
    (batch,) int32 labels.

  Example:
    >>> y = relabel(k, batch["label"], frozen["is_forget"], rule="reference", num_forget=20,
    ...             num_classes=100)
  """
  labels = jnp.asarray(labels, jnp.int32)
  if rule == "reference":
    r = jax.random.randint(key, labels.shape, 1, 101)
    n = jnp.asarray(num_forget, jnp.int32)
    new = (labels + r) % n
    new = jnp.where(new == labels, (labels + 1) % n, new)
  elif rule == "other":
    new = losses.random_other_labels(key, labels, num_classes)
  else:
    raise ValueError(f"rule: {rule!r} (expected one of {', '.join(RELABEL_RULES)})")
  return jnp.where(jnp.asarray(is_forget)[labels] > 0, new, labels).astype(jnp.int32)


def _batches_with_data(batches: Iterable[dict]) -> Iterable[dict]:
  for b in batches:
    if float(np.sum(b["mask"])) > 0:
      yield b


def ewc_importance(grad_fn: Callable[[Tree, dict], Tree], params: Tree,
                   batches: Iterable[dict]) -> Tree:
  """EWC's diagonal Fisher as the reference accumulates it (minibatch estimate).

      F[w] = (1/B) Σ_{b=1..B} n_b · (∂ℓ_b/∂w)²

  with ℓ_b the mean cross-entropy of minibatch b (model in evaluation mode, CosFace logits
  with the margin on the true label), n_b its number of samples and B the number of
  minibatches (`calculate_importance_ewc`: `grad² · len(samples) / len(loader)`).

  Args:
    grad_fn: (params, batch) -> ∇ℓ_b, jitted by the caller.
    params: θ* where the Fisher is taken (the model at the task's start).
    batches: one pass over the data; a batch's n_b = Σ batch["mask"] (padded slots 0).

  Returns:
    A float32 tree with the params' structure.

  Example:
    >>> fisher = ewc_importance(jax.jit(jax.grad(mean_ce)), params, eval_batches)

  References: Kirkpatrick et al., arXiv 1612.00796 (EWC).
  """
  acc, num = jax.tree_util.tree_map(lambda p: jnp.zeros(jnp.shape(p), jnp.float32), params), 0
  for batch in _batches_with_data(batches):
    n_b = float(np.sum(batch["mask"]))
    acc = _add_scaled_square(acc, grad_fn(params, batch), n_b)
    num += 1
  if num == 0:
    raise ValueError("batches: empty; the Fisher needs at least one sample")
  return jax.tree_util.tree_map(lambda a: a / num, acc)


def mas_importance(grad_fn: Callable[[Tree, dict], Tree], params: Tree,
                   batches: Iterable[dict]) -> Tree:
  """MAS's importance: the mean absolute gradient of the squared outputs.

      Ω[w] = (1/B) Σ_{b=1..B} |∂ m_b/∂w|,    m_b = mean_{i∈b, c} z_ic²

  with z the logits of minibatch b (evaluation mode; the reference calls the model with the
  labels, so CosFace's margin is in z) averaged over samples and classes
  (`calculate_importance_mas`: `outputs.pow_(2).mean()`, `|grad| / len(loader)`).

  Args:
    grad_fn: (params, batch) -> ∇m_b, jitted by the caller.
    params: θ* (the model at the task's start).
    batches: one pass over the data.

  Returns:
    A float32 tree with the params' structure.

  References: Aljundi et al., arXiv 1711.09601 (MAS).
  """
  acc, num = jax.tree_util.tree_map(lambda p: jnp.zeros(jnp.shape(p), jnp.float32), params), 0
  for batch in _batches_with_data(batches):
    acc = _add_abs(acc, grad_fn(params, batch))
    num += 1
  if num == 0:
    raise ValueError("batches: empty; the MAS importance needs at least one sample")
  return jax.tree_util.tree_map(lambda a: a / num, acc)


@jax.jit
def _add_scaled_square(acc, grads, n):
  return jax.tree_util.tree_map(lambda a, g: a + n * jnp.square(g.astype(jnp.float32)),
                                acc, grads)


@jax.jit
def _add_abs(acc, grads):
  return jax.tree_util.tree_map(lambda a, g: a + jnp.abs(g.astype(jnp.float32)), acc, grads)


def squared_output_mean(logits: jax.Array, mask: jax.Array) -> jax.Array:
  """mean over the valid samples and all classes of z² (MAS's objective)."""
  per_sample = jnp.sum(jnp.square(logits.astype(jnp.float32)), axis=-1) * mask
  return jnp.sum(per_sample) / jnp.maximum(1.0, jnp.sum(mask) * logits.shape[-1])


def embedding_distance(student: jax.Array, teacher: jax.Array, mask: jax.Array) -> jax.Array:
  """DER's term: Σ_i m_i ‖e_i − e_i^teacher‖² (summed over batch and dimensions, as the
  reference's squared Frobenius norm of the difference).

  References: Buzzega et al., arXiv 2004.07211 (DER / DER++).
  """
  diff = student.astype(jnp.float32) - jax.lax.stop_gradient(teacher.astype(jnp.float32))
  return jnp.sum(jnp.sum(jnp.square(diff), axis=-1) * mask)


def function_distance(student: jax.Array, teacher: jax.Array, mask: jax.Array) -> jax.Array:
  """FDR's term: mean_i ‖z_i − z_i^teacher‖₂ over the valid samples (function space).

  References: Benjamin et al., arXiv 1805.08289 (function-space distance regularisation).
  """
  diff = student.astype(jnp.float32) - jax.lax.stop_gradient(teacher.astype(jnp.float32))
  norms = jnp.sqrt(jnp.sum(jnp.square(diff), axis=-1) + 1e-12)
  return jnp.sum(norms * mask) / jnp.maximum(1.0, jnp.sum(mask))


def reference_lwf_kd(student_logits: jax.Array, teacher_logits: jax.Array,
                     temperature: float) -> jax.Array:
  """The reference's LwF distillation term, bug included (`baselines/Lwftrain.py`).

      p = softmax(s)^(1/T);  l = log(log_softmax(p))       (log of negative numbers: NaN)
      q = softmax(t)^(1/T);  g = log_softmax(q)
      KD = mean_i Σ_c −g_ic · [l_ic if finite else 0]

  `log_softmax` is strictly negative, so every l is NaN, set to 0: the value is 0 and its
  gradient is 0 for any logits (torch's masked assignment blocks the gradient; here the
  double `where` does). Use `losses.distillation_kl` for the intended term.
  """
  p = jnp.power(jax.nn.softmax(student_logits.astype(jnp.float32), axis=-1), 1.0 / temperature)
  inner = jax.nn.log_softmax(p, axis=-1)
  bad = inner < 0  # log of a negative number is NaN in torch
  l = jnp.where(bad, 0.0, jnp.log(jnp.where(bad, 1.0, inner)))
  q = jnp.power(jax.nn.softmax(jax.lax.stop_gradient(teacher_logits.astype(jnp.float32)),
                               axis=-1), 1.0 / temperature)
  g = jax.nn.log_softmax(q, axis=-1)
  return jnp.mean(jnp.sum(-g * l, axis=-1))


def scrub_schedule(*, epochs: int, max_epochs: int, min_epochs: int, forget_steps: int,
                   retain_steps: int) -> tuple[list[str], list[int]]:
  """SCRUB's max/min step sequence over `epochs` inner epochs.

  Inner epochs come in super-epochs of L = max_epochs + min_epochs: inner epoch e is a
  max epoch when e mod L < max_epochs (one pass of max steps over the forget subset, then
  one pass of min steps over the retain subset), otherwise a min epoch (a pass of min steps
  only). The reference runs 10 super-epochs of 5 + 5, i.e. 100 inner epochs, the same
  number of retain passes as the other baselines' 100 epochs: we keep its super-epoch
  shape and let `cf.epochs` set the number of inner epochs (the last super-epoch may be
  cut short).

  Args:
    epochs: inner epochs E.
    max_epochs: max epochs per super-epoch (reference 5).
    min_epochs: min-only epochs per super-epoch (reference 5).
    forget_steps: steps per forget pass.
    retain_steps: steps per retain pass.

  Returns:
    (kinds, inner_epoch): per iteration "max" or "min" and its inner epoch.

  Example:
    >>> scrub_schedule(epochs=2, max_epochs=1, min_epochs=1, forget_steps=1, retain_steps=2)
    (['max', 'min', 'min', 'min', 'min'], [0, 0, 0, 1, 1])

  References: Kurmanji et al., arXiv 2302.09880 (SCRUB).
  """
  period = max_epochs + min_epochs
  kinds, where = [], []
  for e in range(epochs):
    if e % period < max_epochs:
      kinds += ["max"] * forget_steps
      where += [e] * forget_steps
    kinds += ["min"] * retain_steps
    where += [e] * retain_steps
  return kinds, where


def split_lower(params: Tree, blocks: int) -> tuple[Tree, Tree]:
  """(lower, rest) of a ViT's parameters: LIRF's trained lower half (patch embedding, class
  token, position embedding, `encoderblock_0` .. `encoderblock_{blocks-1}`) and the rest
  (the upper blocks, the final norm, the head), which `trainable.join` joins again."""
  lower = {k: v for k, v in params.items() if k not in ("Transformer", "head", "pre_logits")}
  rest = {k: v for k, v in params.items() if k in ("head", "pre_logits")}
  low_t, rest_t = {}, {}
  for name, sub in params.get("Transformer", {}).items():
    block = re.fullmatch(r"encoderblock_(\d+)", name)
    if name == "posembed_input" or (block and int(block.group(1)) < blocks):
      low_t[name] = sub
    else:
      rest_t[name] = sub
  lower["Transformer"], rest["Transformer"] = low_t, rest_t
  return lower, rest


def lirf_attention(mid: jax.Array, mid_teacher: jax.Array, mask: jax.Array,
                   threshold: float = 0.005) -> jax.Array:
  """LIRF's attention-transfer term on the lower half's output, as the reference's `at_loss`:

      a(x) = normalize(mean_tokens x²)  (L2 over the width),  entries < 0.005 set to 0
      AT   = mean over valid samples and width of (a(x_student) − a(x_teacher))²

  The run subtracts it (λ_at 300): the student's lower half is pushed away from the
  teacher's on the forget images. The zeroed entries pass no gradient, as torch's masked
  assignment.

  References: Zagoruyko & Komodakis, arXiv 1612.03928 (attention transfer); Ye et al.,
  ECCV 2022 (LIRF, "Learning with Recoverable Forgetting").
  """
  def att(x):
    a = jnp.mean(jnp.square(x.astype(jnp.float32)), axis=1)
    a = a / jnp.maximum(jnp.sqrt(jnp.sum(jnp.square(a), axis=-1, keepdims=True)), 1e-12)
    return jnp.where(a < threshold, 0.0, a)
  diff = jnp.square(att(mid) - jax.lax.stop_gradient(att(mid_teacher)))
  return jnp.sum(jnp.mean(diff, axis=-1) * mask) / jnp.maximum(1.0, jnp.sum(mask))


def retrain_lr(*, base: float, minimum: float, epochs: int, warmup_epochs: int,
               warmup_lr: float) -> Callable[[int], float]:
  """timm's per-epoch cosine with a linear warm-up (the reference's Retrain schedule).

      lr(e) = warmup_lr + e (base − warmup_lr) / W                  e < W
              minimum + ½ (base − minimum)(1 + cos(π e / E))         otherwise
  """
  cosine = schedules.epoch_cosine(base=base, minimum=minimum, epochs=epochs)
  w = int(warmup_epochs)
  return lambda e: (warmup_lr + int(e) * (base - warmup_lr) / w) if int(e) < w else cosine(e)


def decay_mask(params: Tree) -> Tree:
  """timm's AdamW weight-decay rule: decay every leaf with ≥ 2 dimensions except biases."""
  return jax.tree_util.tree_map_with_path(
      lambda path, x: jnp.ndim(x) >= 2 and not str(getattr(path[-1], "key", "")).endswith(
          "bias"), params)


def make_optimizer(lr: float, cfg: ml_collections.ConfigDict, mask: Tree, *,
                   scrub_weight_decay: float | None = None,
                   smoothing: ml_collections.ConfigDict | None = None
                   ) -> optax.GradientTransformation:
  """AdamW (timm's, decay masked by `decay_mask`) with an injectable learning rate; with
  `scrub_weight_decay` torch's Adam with an L2 term added to the gradient (SCRUB); with
  `smoothing` (the `cf_scrub_s` section) SCRUB-S's smoothing gradient added first, its
  average refreshed at the steps where the injected `average_refresh` is 1
  (`sgda.smoothing`)."""
  def make(learning_rate, average_refresh=0.0):
    if scrub_weight_decay is not None:
      parts = [optax.add_decayed_weights(scrub_weight_decay),
               optax.adam(learning_rate, b1=float(cfg.b1), b2=float(cfg.b2),
                          eps=float(cfg.eps))]
      if smoothing is not None:
        parts.insert(0, sgda.smoothing(
            float(smoothing.smoothing), beta=float(smoothing.average_beta),
            refresh=average_refresh,
            group_of=sgda.fused_qkv if bool(smoothing.fused_qkv) else None))
      return optax.chain(*parts)
    return optax.adamw(learning_rate, b1=float(cfg.b1), b2=float(cfg.b2), eps=float(cfg.eps),
                       weight_decay=float(cfg.weight_decay), mask=mask)
  if smoothing is not None:
    return optax.inject_hyperparams(make)(learning_rate=float(lr), average_refresh=0.0)
  return optax.inject_hyperparams(make)(learning_rate=float(lr))


# ----------------------------------------------------------------------------------------------
# Config validation.

def _number(section, field: str, name: str, *, low: float = 0.0, strict: bool = False,
            high: float | None = None) -> float:
  value = section[field]
  try:
    x = float(value)
  except (TypeError, ValueError):
    raise ConfigError(f"{name}.{field}: expected a number, got {value!r}") from None
  if isinstance(value, bool) or x < low or (strict and x == low) or (high is not None and
                                                                     x > high) or x != x:
    bound = f"> {low}" if strict else f">= {low}"
    raise ConfigError(f"{name}.{field}: expected a value {bound}"
                      f"{'' if high is None else f' and <= {high}'}, got {value!r}")
  return x


def _int(section, field: str, name: str, low: int) -> int:
  return require_int(section[field], f"{name}.{field}", low)


def validate(config) -> None:
  """The baseline's fields' values (no data or file read); ConfigError names the field."""
  if config.method not in METHODS:
    raise ConfigError(f"method: {config.method!r} is not a continual-forgetting baseline "
                      f"({', '.join(METHODS)})")
  c = config.cf
  _int(c, "batch_size", "cf", 1)
  _int(c, "epochs", "cf", 1)
  for field in ("min_lr", "weight_decay", "eps"):
    _number(c, field, "cf")
  for field, allowed in (("relabel", RELABEL_RULES), ("teacher", TEACHERS),
                         ("importance_data", IMPORTANCE_DATA),
                         ("aux_batches", common.AUX_BATCHES)):
    if c[field] not in allowed:
      raise ConfigError(f"cf.{field}: {c[field]!r} (expected one of {', '.join(allowed)})")
  m = config.method
  s = config[m]
  _int(s, "epochs", m, 0)
  _number(s, "lr", m, strict=True)
  for field in ("weight", "kd_weight", "retain_weight", "gamma", "alpha", "weight_decay"):
    if field in s:
      _number(s, field, m)
  if "temperature" in s:
    _number(s, "temperature", m, strict=True)
  if m == "cf_retrain":
    _int(s, "warmup_epochs", m, 0)
    _number(s, "warmup_lr", m)
  if m in SCRUB:
    _int(s, "max_epochs", m, 0)
    _int(s, "min_epochs", m, 0)
    if int(s.max_epochs) + int(s.min_epochs) < 1:
      raise ConfigError(f"{m}.max_epochs: max_epochs + min_epochs must be >= 1")
    _number(s, "lr_decay_at", m, high=1.0)
    _number(s, "lr_decay_rate", m)
  if m == "cf_lirf":
    for field in ("alpha", "at_weight", "kd_weight", "retain_weight"):
      _number(s, field, m)
    _number(s, "alpha", m, high=1.0)
    _int(s, "split_blocks", m, 0)
    lirf_blocks(config, models.build(common.model_config(config)))
    if s.kd_rows not in KD_ROWS:
      raise ConfigError(f"cf_lirf.kd_rows: {s.kd_rows!r} (expected one of {', '.join(KD_ROWS)})")
    if bool(config.model.get("scan", False)):
      raise ConfigError("model.scan: cf_lirf reads the lower half's output block by block; "
                        "set model.scan=False")
  if m == "cf_scrub_s":
    _number(s, "smoothing", m)
    _number(s, "average_beta", m, strict=True, high=1.0)
    if not isinstance(s.fused_qkv, bool):
      raise ConfigError(f"{m}.fused_qkv: expected true or false, got {s.fused_qkv!r}")


# ----------------------------------------------------------------------------------------------
# The run.

def make_task_streams(config: ml_collections.ConfigDict, subsets: list, mesh) -> list:
  """[(streams, epoch stream name or None)] per task for `config.method`.

  Retrain/FT: the retain subset defines the epoch. L2/EWC/MAS: forget ∪ retain (relabelled
  forget) defines it. LwF/DER/DER++/FDR: the forget subset defines it and the retain subset
  cycles (`cf.aux_batches`; DER++ reads it twice per step). SCRUB: both padded, no epoch
  stream (its own schedule).
  """
  method, c, seed = config.method, config.cf, int(config.seed)
  bs = int(c.batch_size)
  def stream(subs, t, offset, cycle, restart_every=0):
    return common.make_stream(config, subs, batch_size=bs, field="cf.batch_size",
                              seed=seed + 10 * t + offset, cycle=cycle, mesh=mesh,
                              restart_every=restart_every)

  task_streams = []
  for t, sub in enumerate(subsets):
    if method in ("cf_retrain", "cf_ft"):
      st, epoch_stream = {"retain": stream([sub["retain_train"]], t, 0, False)}, "retain"
    elif method in ANCHORED:
      st = {"replay": stream([sub["forget_train"], sub["retain_train"]], t, 2, False)}
      epoch_stream = "replay"
    elif method in PAIRED:
      forget = stream([sub["forget_train"]], t, 1, False)
      # DER++ reads two retain batches per step from the one loader: the DER batch and
      # the next one for its CE term; two interleaved views of one stream do the same.
      reads = 2 if method == "cf_der_pp" else 1
      retain = stream([sub["retain_train"]], t, 0, True,
                      reads * common.aux_restart(c.aux_batches, "cf.aux_batches", forget))
      st = {"forget": forget, "retain": retain}
      if method == "cf_der_pp":
        st["retain"] = streams.Strided(retain, 2, 0)
        st["retain_plus"] = streams.Strided(retain, 2, 1)
      epoch_stream = "forget"
    else:  # SCRUB: passes over each subset in its own schedule
      st = {"forget": stream([sub["forget_train"]], t, 1, False),
            "retain": stream([sub["retain_train"]], t, 0, False)}
      epoch_stream = None
    task_streams.append((st, epoch_stream))
  return task_streams


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs the baseline `config.method` over `config.tasks`; returns the results envelope
  (stages "pretrained", "task_1", ...; `final` acc_r, acc_f, acc_o, h_mean)."""
  validate(config)
  method, c, s = str(config.method), config.cf, config[str(config.method)]
  use_margin = bool(c.eval_margin)
  mesh = train.mesh_for(config)
  seed = int(config.seed)

  task_list, subsets = gs_lora.task_data(config)
  num_tasks = len(task_list)
  num_classes = int(config.model.num_classes)
  if c.relabel == "reference" and method in RELABELLING:
    for task in task_list:
      if len(task.forget) < 2:
        raise ConfigError(f"cf.relabel: the reference rule needs >= 2 forget classes per task "
                          f"({task.name} forgets {len(task.forget)}); use cf.relabel=other")
  importance_sets = [sub["retain_train"] for sub in subsets]
  if method in IMPORTANCE_METHODS and c.importance_data == "full":
    src = common.load_sources(config.data, roles=("old",))
    for t in range(1, num_tasks):  # tasks >= 2: every training image of the retained classes
      importance_sets[t] = tasks_lib.task_splits(
          src["old_train"], src["old_test"], task_list[t], data_ratio=1.0, shots=0,
          seed=int(config.tasks.seed))["retain_train"]

  epochs = int(s.epochs) or int(c.epochs)

  task_streams = make_task_streams(config, subsets, mesh)
  common.check_batch_size(int(config.eval.batch_size), "eval.batch_size", mesh)

  model_cfg = common.model_config(config)
  model = models.build(model_cfg)
  gs_lora.log_tasks(task_list, subsets)
  run_ = train.Run(workdir, config)

  pretrain.ensure_pretrained(config, workdir)
  k_head, k_init = jax.random.split(jax.random.key(seed))
  base0, _ = common.load_base(config, model_cfg, model, k_head)
  retrain = method == "cf_retrain"
  # Trainable: every parameter but the head (the reference freezes the CosFace head);
  # Retrain trains a fresh model, head included.
  trainable0 = base0 if retrain else {k: v for k, v in base0.items() if k != "head"}
  rest0 = None
  if method == "cf_lirf":  # the lower half trains under the pretrained upper half
    trainable0, rest0 = split_lower(base0, lirf_blocks(config, model))
  head0 = base0["head"]
  num_trainable = int(sum(np.size(x) for x in jax.tree_util.tree_leaves(trainable0)))
  log.info("%s: %d trainable parameters (of %d)", method, num_trainable,
           sum(np.size(x) for x in jax.tree_util.tree_leaves(base0)))

  tx, steps, predict_step, importance_grad = _compiled(config, model, trainable0, mesh)
  step_fn = steps.get("train")
  evaluate = gs_lora.make_evaluate(config, model, predict_step, mesh, use_margin=use_margin)

  # Cross-task state: the model at each task's start (anchors of L2/EWC/MAS, the teacher
  # with cf.teacher = task_start) and the EWC/MAS importances, stacked per task.
  carry = {}
  if method in ANCHORED or (method in TEACHER_METHODS and c.teacher == "task_start"):
    carry["anchor"] = continual.stack_zeros(trainable0, num_tasks)
  if method in IMPORTANCE_METHODS:
    carry["importance"] = continual.stack_zeros(trainable0, num_tasks)
  state = train.replicate(train.create_state(trainable0, tx, seed, carry=carry), mesh)
  state = run_.restore(state)
  results = run_.meta["results"]

  def importance(params, t):
    frozen = {"head": head0}
    batches = (train.to_global(b, mesh) for b in streams.eval_batches(
        importance_sets[t], batch_size=int(config.eval.batch_size),
        **common.stream_kwargs(config)))
    fn = ewc_importance if method == "cf_ewc" else mas_importance
    return fn(lambda p, b: importance_grad(p, frozen, b), params, batches)

  def make_task(t: int, task: tasks_lib.ForgetTask) -> continual.Task:
    sub = subsets[t]
    st, epoch_stream = task_streams[t]
    forget_mask = np.zeros((num_classes,), np.float32)
    forget_mask[list(task.forget)] = 1.0

    def on_start(state, frozen, fresh):
      del frozen
      if fresh and retrain:
        fresh_params = models.init_variables(model, model_cfg,
                                             jax.random.fold_in(k_init, t))["params"]
        state = state._replace(params=train.replicate(fresh_params, mesh))
      if fresh:  # a fresh optimizer per task; the terms of this task from its start model
        params = state.params
        carry = dict(state.carry)
        if "anchor" in carry:
          carry["anchor"] = continual.stack_set(carry["anchor"], t, params)
        if "importance" in carry:
          carry["importance"] = continual.stack_set(carry["importance"], t,
                                                    importance(params, t))
        opt_state = tx.init(params)
        if method == "cf_scrub_s" and t > 0:  # SCRUB-S's average lives across tasks
          opt_state = optax.tree_utils.tree_set(opt_state, **{
              k: optax.tree_utils.tree_get(state.opt_state, k)
              for k in ("average", "num_averaged")})
        state = state._replace(opt_state=train.replicate(opt_state, mesh),
                               carry=train.replicate(carry, mesh))
      frozen = {"head": head0, "is_forget": forget_mask,
                "num_forget": np.asarray(len(task.forget), np.int32)}
      if rest0 is not None:
        frozen["rest"] = rest0
      if method in ANCHORED:
        frozen["anchor"] = state.carry["anchor"]
        frozen["active"] = (np.arange(num_tasks) <= t).astype(np.float32)
      if "importance" in state.carry:
        frozen["importance"] = state.carry["importance"]
      if method in TEACHER_METHODS:
        frozen["teacher"] = (continual.stack_get(state.carry["anchor"], t)
                             if c.teacher == "task_start" else
                             {k: v for k, v in base0.items() if k != "head"})
      frozen = train.replicate(frozen, mesh)
      if f"{task.name}_before" not in results:
        # The model the request is addressed to; Retrain's fresh model never saw it, so
        # its H is measured against the pretrained model, as the paper's tables do.
        before_state = state._replace(params=trainable0) if retrain else state
        results[f"{task.name}_before"] = evaluate(before_state, frozen, sub)
      return state, frozen

    if method in SCRUB:
      kinds, inner = scrub_schedule(
          epochs=epochs, max_epochs=int(s.max_epochs), min_epochs=int(s.min_epochs),
          forget_steps=st["forget"].steps_per_epoch, retain_steps=st["retain"].steps_per_epoch)
      decay_from = float(s.lr_decay_at) * epochs
      lr_of = lambda e: float(s.lr) * (float(s.lr_decay_rate) if e >= decay_from else 1.0)
      plan = lambda i: [(kinds[i], steps[kinds[i]], ("forget",) if kinds[i] == "max"
                         else ("retain",))]

      def hparams(e, i):
        del e
        out = {"learning_rate": lr_of(inner[i])}
        if method == "cf_scrub_s":  # the reference refreshes θ̄ after every super-epoch
          period = int(s.max_epochs) + int(s.min_epochs)
          starts = inner[i] % period == 0 and (i == 0 or inner[i - 1] != inner[i])
          out["average_refresh"] = float(starts and (t > 0 or inner[i] > 0))
        return out
      stage = train.Stage(name=task.name, step_fn=None, streams=st, iterations=len(kinds),
                          plan=plan, hparams_fn=hparams, on_start=on_start)
    else:
      if retrain:
        lr = retrain_lr(base=float(s.lr), minimum=float(c.min_lr), epochs=epochs,
                        warmup_epochs=int(s.warmup_epochs), warmup_lr=float(s.warmup_lr))
      else:
        lr = schedules.epoch_cosine(base=float(s.lr), minimum=float(c.min_lr),
                                            epochs=epochs)
      stage = train.Stage(name=task.name, step_fn=step_fn, streams=st,
                          epoch_stream=epoch_stream, epochs=epochs,
                          hparams_fn=lambda e, i: {"learning_rate": lr(e)}, on_start=on_start)

    def periodic(state, frozen):
      acc = evaluate(state, frozen, sub, names=("retain_test", "forget_test"))
      return gs_lora.periodic_record(acc, results[f"{task.name}_before"])

    def after(state, frozen):
      acc = evaluate(state, frozen, sub, old_tasks=[e.forget for e in task_list[:t]])
      record = gs_lora.task_record(acc, results[f"{task.name}_before"])
      best = continual.best_eval(run_, task.name, "h_mean")
      if best is not None:
        record["best_h"] = best
      log.info("[%s] %s", task.name, " ".join(
          f"{k} {v:.2f}" for k, v in record.items()
          if isinstance(v, float) and not k.endswith("_margin")))
      if t == len(task_list) - 1 and config.export.merged_npz:
        # The model after the last task, written before the task's checkpoint: a rerun of
        # the finished run (which restores no frozen tree) keeps it.
        common.export_model(run_, _full(state.params, frozen), state.model_state)
      return record

    return continual.Task(name=task.name, stage=stage, evaluate=after, eval_fn=periodic)

  state, _ = continual.run_tasks(run_, [make_task(t, x) for t, x in enumerate(task_list)],
                                 state, None, mesh, eval_every=int(config.eval.every_steps))

  out = gs_lora.results_envelope(config, task_list, results, use_margin)
  out["num_trainable"] = num_trainable
  text = report.present(out, run_.workdir if run_.is_main else None)
  path = run_.write_results(out)
  run_.announce(text, path)
  run_.close()
  return out


_COMPILED: dict = {}


def present(results: dict, workdir: str | None) -> str:
  """The stage table (printed by the run and by `python -m kswap_jax.report`);
  `<method>.png` (GS-LoRA's accuracy panel) written in `workdir` unless None."""
  if workdir:
    gs_lora.plot(results, os.path.join(workdir, f"{results['method']}.png"))
  return "\n".join(filter(None, (report.stage_table(results),
                                 gs_lora.old_tasks_table(results))))


def lirf_blocks(config, model) -> int:
  """The blocks of LIRF's trained lower half: `cf_lirf.split_blocks`, or half the depth."""
  depth = int(model.cfg.depth)
  blocks = int(config.cf_lirf.split_blocks) or depth // 2
  if not 1 <= blocks < depth:
    raise ConfigError(f"cf_lirf.split_blocks: {blocks} (expected 1 .. {depth - 1} of the "
                      f"model's {depth} blocks, or 0: half the depth)")
  return blocks


def _full(params: Tree, frozen: Tree) -> Tree:
  """The model's parameters from the trained tree and the frozen one."""
  if "rest" in frozen:  # LIRF: the trained lower half under the frozen rest
    return trainable.join(params, frozen["rest"])
  return params if "head" in params else {**params, "head": frozen["head"]}


def _compiled(config, model, trainable0: Tree, mesh):
  """(tx, {name: jitted step}, predict_step, importance grad or None) of this configuration,
  built once per process (reruns and resumptions in one process, e.g. the tests and
  `compare`, reuse the compilations)."""
  method, c, s = str(config.method), config.cf, config[str(config.method)]
  key = (method, config.model.to_json(), c.to_json(), s.to_json(),
         int(config.tasks.num_classes), tuple(d.id for d in mesh.devices.flat))
  if key in _COMPILED:
    return _COMPILED[key]
  mask = decay_mask(trainable0)
  if method in SCRUB:
    tx = make_optimizer(float(s.lr), c, mask, scrub_weight_decay=float(s.weight_decay),
                        smoothing=s if method == "cf_scrub_s" else None)
  else:
    tx = make_optimizer(float(s.lr), c, mask)

  mid = f"encoderblock_{lirf_blocks(config, model) - 1}" if method == "cf_lirf" else None

  def forward(params, frozen, images, labels, *, rng=None, with_mid=False):
    """(margin logits, embedding[, LIRF's lower-half output]); dropout on when `rng` is
    given."""
    p = _full(params, frozen)
    kw = dict(train=True, rngs={"dropout": rng}) if rng is not None else {}
    if rng is not None and mid is not None:  # LIRF: the frozen upper half in eval mode
      kw["train_blocks"] = lirf_blocks(config, model)
    if not with_mid:
      e = model.apply({"params": p}, images, features=True, **kw)
      return gs_lora.head_logits(model, p, e, labels), e
    e, captured = model.apply({"params": p}, images, features=True, mutable=["intermediates"],
                              capture_intermediates=lambda mdl, _: mdl.name == mid, **kw)
    x = captured["intermediates"]["Transformer"][mid]["__call__"][0]
    return gs_lora.head_logits(model, p, e, labels), e, x

  steps = {k: train.make_train_step(fn, tx, mesh)
           for k, fn in _make_losses(method, config, forward,
                                     int(config.tasks.num_classes)).items()}
  predict_step = train.make_predict_step(
      lambda p, _, f, b: forward(p, f, b["image"], None)[0], mesh)
  importance_grad = None
  if method in IMPORTANCE_METHODS:
    def objective(params, frozen, batch):
      z, _ = forward(params, frozen, batch["image"], batch["label"])  # eval mode, margin
      if method == "cf_ewc":
        return losses.cross_entropy(z, batch["label"], batch["mask"])
      return squared_output_mean(z, batch["mask"])
    importance_grad = jax.jit(jax.grad(objective))
  _COMPILED[key] = (tx, steps, predict_step, importance_grad)
  return _COMPILED[key]


def _make_losses(method: str, config, forward, num_classes: int) -> dict[str, Callable]:
  """{"train": loss_fn} ({"max", "min"} for SCRUB), each (params, frozen, batch, rng);
  `num_classes` is the label space the "other" relabelling rule draws from."""
  c, s = config.cf, config[method]
  rule = str(c.relabel)

  def relabelled(key, b, frozen):
    return relabel(key, b["label"], frozen["is_forget"], rule=rule,
                   num_forget=frozen["num_forget"], num_classes=num_classes)

  def teacher(frozen, images, labels):
    z, e = forward(frozen["teacher"], frozen, images, labels)  # eval mode: no dropout
    return jax.lax.stop_gradient(z), jax.lax.stop_gradient(e)

  if method in ("cf_retrain", "cf_ft"):
    def loss_fn(params, frozen, batch, rng):
      r = batch["retain"]
      z, _ = forward(params, frozen, r["image"], r["label"], rng=rng)
      ce = losses.cross_entropy(z, r["label"], r["mask"])
      return ce, {"ce_retain": ce}
    return {"train": loss_fn}

  if method in ANCHORED:
    weight = float(s.weight)

    def loss_fn(params, frozen, batch, rng):
      b = batch["replay"]
      k_drop, k_label = jax.random.split(rng)
      y = relabelled(k_label, b, frozen)
      z, _ = forward(params, frozen, b["image"], y, rng=k_drop)
      ce = losses.cross_entropy(z, y, b["mask"])
      reg = losses.anchor_penalty(params, frozen["anchor"], frozen.get("importance"),
                                  frozen["active"])
      return ce + weight * reg, {"ce": ce, "penalty": reg}
    return {"train": loss_fn}

  if method == "cf_lirf":
    alpha, temp = float(s.alpha), float(s.temperature)

    def loss_fn(params, frozen, batch, rng):
      f, r = batch["forget"], batch["retain"]
      k_f, k_r, k_label = jax.random.split(rng, 3)
      y = relabelled(k_label, f, frozen)
      z_f, _, mid_f = forward(params, frozen, f["image"], y, rng=k_f, with_mid=True)
      zt, _, mid_t = forward(frozen["teacher"], frozen, f["image"], y, with_mid=True)
      zt, mid_t = jax.lax.stop_gradient(zt), jax.lax.stop_gradient(mid_t)
      ce_f = losses.cross_entropy(z_f, y, f["mask"])
      at = lirf_attention(mid_f, mid_t, f["mask"])
      # The distilled logits: the reference's slice [:, n_forget:] or the retained classes.
      keep = (jnp.arange(z_f.shape[-1]) >= frozen["num_forget"] if s.kd_rows == "reference"
              else jnp.asarray(frozen["is_forget"]) == 0)
      hide = lambda z: jnp.where(keep, z, -1e9)
      kd = losses.distillation_kl(hide(z_f), hide(zt), temp, f["mask"])
      z_r, _ = forward(params, frozen, r["image"], r["label"], rng=k_r)
      ce_r = losses.cross_entropy(z_r, r["label"], r["mask"])
      loss = (1.0 - alpha) * ce_f - float(s.at_weight) * at + \
          float(s.kd_weight) * alpha * temp ** 2 * kd + float(s.retain_weight) * ce_r
      # Logged unweighted, as the other baselines' terms.
      return loss, {"ce_forget": ce_f, "at": at, "kd": kd, "ce_retain": ce_r}
    return {"train": loss_fn}

  if method in PAIRED:
    def loss_fn(params, frozen, batch, rng):
      f, r = batch["forget"], batch["retain"]
      k_f, k_r, k_label, k_plus = jax.random.split(rng, 4)
      y = relabelled(k_label, f, frozen)
      z_f, _ = forward(params, frozen, f["image"], y, rng=k_f)
      ce_f = losses.cross_entropy(z_f, y, f["mask"])
      z_r, e_r = forward(params, frozen, r["image"], r["label"], rng=k_r)
      zt, et = teacher(frozen, r["image"], r["label"])
      aux = {"ce_forget": ce_f}
      if method == "cf_lwf":
        if bool(s.kd_reference_bug):
          kd = reference_lwf_kd(z_r, zt, float(s.temperature))
        else:
          kd = losses.distillation_kl(z_r, zt, float(s.temperature), r["mask"])
        ce_r = losses.cross_entropy(z_r, r["label"], r["mask"])
        aux.update(kd=kd, ce_retain=ce_r)
        return ce_f + float(s.kd_weight) * kd + float(s.retain_weight) * ce_r, aux
      if method == "cf_fdr":
        reg = function_distance(z_r, zt, r["mask"])
        aux["fdr"] = reg
        return ce_f + float(s.weight) * reg, aux
      reg = embedding_distance(e_r, et, r["mask"])
      aux["der"] = reg
      loss = ce_f + float(s.weight) * reg
      if method == "cf_der_pp":
        p = batch["retain_plus"]
        z_p, _ = forward(params, frozen, p["image"], p["label"], rng=k_plus)
        ce_p = losses.cross_entropy(z_p, p["label"], p["mask"])
        aux["ce_retain_plus"] = ce_p
        loss = loss + float(s.retain_weight) * ce_p
      return loss, aux
    return {"train": loss_fn}

  # SCRUB: KD at T with Hinton's T² (`util/sgda_utils.py::DistillKL`); the forget set keeps
  # its true labels (no relabelling), which only place the margin.
  temp = float(s.temperature)

  def max_loss(params, frozen, batch, rng):
    f = batch["forget"]
    z, _ = forward(params, frozen, f["image"], f["label"], rng=rng)
    zt, _ = teacher(frozen, f["image"], f["label"])
    kd = temp ** 2 * losses.distillation_kl(z, zt, temp, f["mask"])
    return -kd, {"kd_forget": kd}

  def min_loss(params, frozen, batch, rng):
    r = batch["retain"]
    z, _ = forward(params, frozen, r["image"], r["label"], rng=rng)
    zt, _ = teacher(frozen, r["image"], r["label"])
    kd = temp ** 2 * losses.distillation_kl(z, zt, temp, r["mask"])
    ce = losses.cross_entropy(z, r["label"], r["mask"])
    return float(s.gamma) * ce + float(s.alpha) * kd, {"kd_retain": kd, "ce_retain": ce}
  return {"max": max_loss, "min": min_loss}  # SCRUB-S: its smoothing is in the optimizer
