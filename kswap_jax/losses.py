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
