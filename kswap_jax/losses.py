"""Losses shared by the methods. All take a validity `mask` so padded batch slots
(static shapes, see `kswap_jax.data.streams`) never count.

References: Xing et al., arXiv 2502.08075 (Knowledge Swapping); Zhao et al.,
arXiv 2403.11530 (GS-LoRA, bounded forgetting).
"""

import jax
import jax.numpy as jnp
import optax


def cross_entropy(logits: jax.Array, labels: jax.Array, mask: jax.Array | None = None
                  ) -> jax.Array:
  """Mean softmax cross-entropy over the valid samples, computed in float32.

  CE = Σ_i m_i · (−log softmax(z_i)[y_i]) / max(1, Σ_i m_i), over all logits (no masking
  of head rows, as the references).
  """
  per_sample = optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), labels)
  if mask is None:
    return jnp.mean(per_sample)
  return jnp.sum(per_sample * mask) / jnp.maximum(1.0, jnp.sum(mask))


def bounded_forgetting(forget_ce: jax.Array, bound: float) -> jax.Array:
  """ReLU(BND − CE_f) on the batch-mean forget CE: gradient ascent until CE_f exceeds BND.

  The gradient is −∇CE_f while CE_f < BND and exactly 0 once CE_f > BND (docs/knowledge_swapping.md).
  """
  return jax.nn.relu(bound - forget_ce)


# -- Unlearning losses (SFR-on / UG-CLU, SalUn family) ------------------------------------------

def per_sample_cross_entropy(logits: jax.Array, labels: jax.Array,
                             mask: jax.Array | None = None) -> jax.Array:
  """ℓ_i = −log softmax(z_i)[y_i] per sample, in float32; 0 on padded slots.

  Returns:
    A (batch,) float32 vector.
  """
  per_sample = optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), labels)
  return per_sample if mask is None else per_sample * mask


def adaptive_ascent_weights(per_sample: jax.Array, mask: jax.Array | None = None,
                            lambd: float = 0.5, eps: float = 1e-15) -> jax.Array:
  """SFR-on's adaptive per-sample weights, w_i ∝ ℓ_i^(−λ), under stop-gradient.

      coef_i = m_i / (sg(ℓ_i)^λ + ε),        w_i = coef_i / Σ_j coef_j

  Samples the model still fits (low loss, still "remembered") get the larger weights;
  already forgotten (high-loss) samples get little. λ = 0 gives w_i = 1/B over the valid
  samples. Padded slots (m_i = 0) get weight 0.

  Args:
    per_sample: (batch,) per-sample losses ℓ_i ≥ 0.
    mask: (batch,) float validity of the slots; None means all valid.
    lambd: the exponent λ (0.5 for CIFAR-10, 0.6 in the TinyImageNet setting).
    eps: ε inside the reciprocal (1e-15 for classification).

  Returns:
    (batch,) float32 weights summing to 1 over the valid slots (all 0 if none is valid);
    no gradient flows through them.

  References: Huang et al., arXiv 2409.19732 (SFR-on, the adaptive GA loss).
  """
  loss = jax.lax.stop_gradient(per_sample.astype(jnp.float32))
  valid = jnp.ones_like(loss) if mask is None else mask.astype(jnp.float32)
  # A padded slot may hold any value; keep its power finite before masking it out.
  loss = jnp.where(valid > 0, jnp.maximum(loss, 0.0), 1.0)
  coef = valid / (jnp.power(loss, lambd) + eps)
  return coef / jnp.maximum(jnp.sum(coef), 1e-30)


def adaptive_ascent_loss(logits: jax.Array, labels: jax.Array, mask: jax.Array | None = None,
                         lambd: float = 0.5, eps: float = 1e-15) -> jax.Array:
  """Σ_i w_i·ℓ_i with the adaptive weights of `adaptive_ascent_weights` (positive).

  This is the loss whose gradient the FAST phase of `kswap_jax.optim.fast_slow` receives;
  the transformation multiplies it by −c(t), which makes the step an ascent. With
  λ = 0 it is the plain mean cross-entropy (plain gradient ascent, "ga").

  Example:
    >>> loss = adaptive_ascent_loss(logits, batch["label"], batch["mask"], lambd=0.5)
  """
  per_sample = per_sample_cross_entropy(logits, labels, mask)
  return jnp.sum(adaptive_ascent_weights(per_sample, mask, lambd, eps) * per_sample)


def gradient_ascent_loss(logits: jax.Array, labels: jax.Array,
                         mask: jax.Array | None = None) -> jax.Array:
  """Plain GA ("ga"): the mean cross-entropy over valid samples, to be ascended."""
  return cross_entropy(logits, labels, mask)


def random_other_labels(key: jax.Array, labels: jax.Array, num_classes: int) -> jax.Array:
  """Random-label targets ("rl"): each label replaced by a uniformly drawn OTHER class.

  r ~ U{0, …, K−2};  y' = r + [r ≥ y], which is uniform over {0, …, K−1} \\ {y} and never
  equals y. A pure function of the key.

  Args:
    key: a PRNG key.
    labels: (batch,) int labels in [0, K).
    num_classes: K ≥ 2.

  Returns:
    (batch,) int32 labels, each different from the corresponding true label.
  """
  if num_classes < 2:
    raise ValueError(f"num_classes: random other labels need K >= 2, got {num_classes}")
  r = jax.random.randint(key, jnp.shape(labels), 0, num_classes - 1)
  labels = jnp.asarray(labels, jnp.int32)
  return (r + (r >= labels)).astype(jnp.int32)


def prototype_kl(embeddings: jax.Array, prototypes: jax.Array, mask: jax.Array | None = None
                 ) -> jax.Array:
  """KL(softmax(p_y) ‖ softmax(e(x))) over the embedding dimensions, "batchmean".

      KL_i = Σ_d softmax(p_i)_d · (log softmax(p_i)_d − log softmax(e_i)_d)
      KL   = Σ_i m_i KL_i / max(1, Σ_i m_i)

  with p_i the prototype of sample i's class. This is PyTorch's
  `kl_div(log_softmax(e), log_softmax(p), log_target=True, reduction="batchmean")` over the
  valid samples. It is 0 when e_i = p_i.

  Args:
    embeddings: (batch, dim) embeddings e(x) of the current model.
    prototypes: (batch, dim) the prototype of each sample's class (gathered by label).
    mask: (batch,) validity of each slot; None = all valid.

  Returns:
    A float32 scalar.

  Example:
    >>> kl = prototype_kl(e, class_prototypes[labels], mask)

  References: Zhao et al., arXiv 2501.09705 (GS-LoRA++, prototype regularisation).
  """
  log_q = jax.nn.log_softmax(embeddings.astype(jnp.float32), axis=-1)
  log_p = jax.nn.log_softmax(prototypes.astype(jnp.float32), axis=-1)
  per_sample = jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)
  if mask is None:
    return jnp.mean(per_sample)
  return jnp.sum(per_sample * mask) / jnp.maximum(1.0, jnp.sum(mask))


def prototype_loss(forget_kl: jax.Array, retain_kl: jax.Array, *, bound: float,
                   forget_weight: float, retain_weight: float) -> jax.Array:
  """GS-LoRA++'s prototype term on the batch-mean KLs of the two batches.

      L_pro = λ_f · ReLU(BND_pro − KL_f) + λ_r · KL_r

  Forget samples are pushed away from their class prototype until the batch-mean KL
  exceeds BND_pro (then the term and its gradient vanish); retain samples are pulled
  towards theirs.

  Args:
    forget_kl: `prototype_kl` over the forget batch.
    retain_kl: `prototype_kl` over the retain batch.
    bound: BND_pro (18 single-step, 50 few-shot continual in the reference).
    forget_weight: λ_f.
    retain_weight: λ_r (0 in every shipped reference run).

  Returns:
    A scalar.

  References: Zhao et al., arXiv 2501.09705 (GS-LoRA++).
  """
  return forget_weight * jax.nn.relu(bound - forget_kl) + retain_weight * retain_kl


def class_sums(embeddings: jax.Array, labels: jax.Array, mask: jax.Array, num_classes: int
               ) -> tuple[jax.Array, jax.Array]:
  """Per-class sums of embeddings and counts of valid samples, to accumulate over batches.

  Returns:
    ((num_classes, dim) float32 sums, (num_classes,) float32 counts).
  """
  onehot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32) * mask[:, None]
  return onehot.T @ embeddings.astype(jnp.float32), jnp.sum(onehot, axis=0)


def class_means(sums: jax.Array, counts: jax.Array) -> jax.Array:
  """Prototypes p_c = sums_c / counts_c; rows of classes without samples are 0."""
  return jnp.where(counts[:, None] > 0, sums / jnp.maximum(counts, 1.0)[:, None], 0.0)


# -- Continual-learning regularisers (the continual-forgetting baselines) ----------------------

def distillation_kl(student_logits: jax.Array, teacher_logits: jax.Array, temperature: float,
                    mask: jax.Array | None = None) -> jax.Array:
  """Knowledge distillation at temperature T: the batch-mean KL from teacher to student.

      q_i = softmax(t_i / T),  p_i = softmax(s_i / T)
      KD  = Σ_i m_i Σ_c q_ic (log q_ic − log p_ic) / max(1, Σ_i m_i)

  Its gradient in the student logits equals that of the cross-entropy form
  −Σ_c q_ic log p_ic (LwF's "modified cross-entropy"); the KL form is 0 exactly when the
  student agrees with the teacher. No T² factor: callers that want Hinton's scaling (SCRUB)
  multiply by T². The teacher gets no gradient.

  Args:
    student_logits: (batch, classes).
    teacher_logits: (batch, classes), treated as constants.
    temperature: T > 0.
    mask: (batch,) validity of the slots; None = all valid.

  Returns:
    A float32 scalar ≥ 0.

  Example:
    >>> kd = distillation_kl(z_student, z_teacher, 2.0, batch["mask"])

  References: Hinton et al., arXiv 1503.02531; Li & Hoiem, arXiv 1606.09282 (LwF).
  """
  t = jax.lax.stop_gradient(teacher_logits.astype(jnp.float32)) / temperature
  log_q = jax.nn.log_softmax(t, axis=-1)
  log_p = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
  per_sample = jnp.sum(jnp.exp(log_q) * (log_q - log_p), axis=-1)
  if mask is None:
    return jnp.mean(per_sample)
  return jnp.sum(per_sample * mask) / jnp.maximum(1.0, jnp.sum(mask))


def anchor_penalty(params, anchors, importance=None, weights: jax.Array | None = None
                   ) -> jax.Array:
  """Σ_s w_s Σ_k Ω_{s,k} (θ_k − θ*_{s,k})²: quadratic pulls towards earlier solutions.

  One term per anchor s (L2: Ω ≡ 1; EWC: the diagonal Fisher; MAS: the output-sensitivity
  importance), summed over every scalar k of every leaf, unnormalised (the reference's
  `get_reg_loss`). Anchors and importances are stacked on a leading axis S (one entry per
  task, `kswap_jax.methods.continual.stack_*`); `weights` (S,) switches terms on (1) or off
  (0), e.g. the tasks not reached yet.

  Args:
    params: the trainable tree θ.
    anchors: θ* with leaves (S, *leaf.shape).
    importance: Ω with the anchors' structure, or None for Ω ≡ 1 (plain L2).
    weights: (S,) term weights; None = all terms on.

  Returns:
    A float32 scalar (multiply by λ).

  Example:
    >>> reg = lam * anchor_penalty(params, carry["anchor"], carry["importance"], active)

  References: Kirkpatrick et al., arXiv 1612.00796 (EWC); Aljundi et al., arXiv 1711.09601
  (MAS).
  """
  def per_term(p, a, o):
    diff = jnp.square(p.astype(jnp.float32)[None] - a.astype(jnp.float32))
    if o is not None:
      diff = diff * o.astype(jnp.float32)
    return jnp.sum(diff.reshape(diff.shape[0], -1), axis=1)

  leaves_p = jax.tree_util.tree_leaves(params)
  leaves_a = jax.tree_util.tree_leaves(anchors)
  leaves_o = ([None] * len(leaves_p) if importance is None
              else jax.tree_util.tree_leaves(importance))
  if not (len(leaves_p) == len(leaves_a) == len(leaves_o)):
    raise ValueError("anchors/importance: tree structure differs from params")
  terms = sum(per_term(p, a, o) for p, a, o in zip(leaves_p, leaves_a, leaves_o))
  if weights is None:
    return jnp.sum(terms)
  return jnp.sum(jnp.asarray(weights, jnp.float32) * terms)
