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
