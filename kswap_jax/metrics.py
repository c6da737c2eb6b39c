"""Metric definitions (docs/metrics.md). Accuracies are top-1, in percent,
sample-weighted (correct / total, no per-class averaging).
"""

from __future__ import annotations

import numpy as np


def accuracy(correct: float, count: float) -> float:
  """100 · correct / count; NaN for an empty split (never silently 0)."""
  return 100.0 * correct / count if count else float("nan")


def h_mean(acc_f_before: float, acc_f: float, acc_r: float, eps: float = 1e-8) -> float:
  """GS-LoRA harmonic mean of the forget drop and the retained accuracy.

      D = Acc_f^before − Acc_f,      H = 2 · D · Acc_r / (D + Acc_r + ε)

  Example: h_mean(87.40, 0.10, 85.00) = 86.13 (GS-LoRA ImageNet-100 100-20).

  References: Zhao et al., arXiv 2403.11530 (`engine_cl.py::evaluate`).
  """
  drop = acc_f_before - acc_f
  return 2.0 * drop * acc_r / (drop + acc_r + eps)


def h_mean_learn(acc_n_before: float, acc_n: float, acc_r: float, eps: float = 1e-8) -> float:
  """Learn-side analogue [inferred, metrics.md §2]: the gain Acc_n − Acc_n^before in place of D."""
  gain = acc_n - acc_n_before
  return 2.0 * gain * acc_r / (gain + acc_r + eps)


def top1(logits, labels) -> float:
  """Top-1 accuracy (%) under the arg-max over all logits; NaN for an empty split.

  Args:
    logits: (n, classes) outputs of `train.predict` (padded slots already dropped).
    labels: (n,) integer labels.
  """
  labels = np.asarray(labels)
  if labels.size == 0:
    return accuracy(0, 0)
  correct = int(np.sum(np.argmax(np.asarray(logits), axis=-1) == labels))
  return accuracy(correct, labels.size)
