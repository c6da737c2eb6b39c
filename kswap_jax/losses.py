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
