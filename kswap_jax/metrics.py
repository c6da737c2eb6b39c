"""Metric definitions (docs/metrics.md). Accuracies are top-1, in percent,
sample-weighted (correct / total, no per-class averaging). Each metric variant has its own
name; docs/ug_clu.md describes the unlearning and continual-learning ones.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import ml_dtypes
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
  """Learn-side analogue [inferred; docs/knowledge_swapping.md]: the gain Acc_n − Acc_n^before in place of D."""
  gain = acc_n - acc_n_before
  return 2.0 * gain * acc_r / (gain + acc_r + eps)


def top1(logits, labels, rows: int | None = None) -> float:
  """Top-1 accuracy (%) under the arg-max over all logits, or over the first `rows`; NaN
  for an empty split.

  Args:
    logits: (n, classes) outputs of `train.predict` (padded slots already dropped).
    labels: (n,) integer labels.
    rows: the head rows in use (a masked arg-max: rows beyond it can never be predicted).
  """
  labels = np.asarray(labels)
  if labels.size == 0:
    return accuracy(0, 0)
  logits = np.asarray(logits)[:, :rows] if rows is not None else np.asarray(logits)
  correct = int(np.sum(np.argmax(logits, axis=-1) == labels))
  return accuracy(correct, labels.size)


# ----------------------------------------------------------------------------------------------
# Machine-unlearning metrics (SalUn convention; SFR-on / UG-CLU).

_LOG_EPS = 1e-20


def ua(forget_logits, forget_labels) -> float:
  """UA = 100 − top-1 accuracy (%) on the forget TRAIN set D_f (eval mode, test transforms)."""
  return 100.0 - top1(forget_logits, forget_labels)


def ra(remain_logits, remain_labels) -> float:
  """RA: top-1 accuracy (%) on the remain train set D_r."""
  return top1(remain_logits, remain_labels)


def ta(test_logits, test_labels) -> float:
  """TA: top-1 accuracy (%) on the test set (the kept classes' test images for class-wise
  forgetting)."""
  return top1(test_logits, test_labels)


def softmax(logits: np.ndarray) -> np.ndarray:
  """Row-wise softmax in float64 (e.g. of `train.predict` logits, for the MIA and JS/KL)."""
  z = np.asarray(logits, np.float64)
  z = np.exp(z - np.max(z, axis=-1, keepdims=True))
  return z / np.sum(z, axis=-1, keepdims=True)


def prediction_entropy(probs: np.ndarray) -> np.ndarray:
  """H(p) = −Σ_c p_c ln p_c per row, with 0·ln 0 = 0 (uniform over 10 classes: ln 10)."""
  p = np.asarray(probs, np.float64)
  return -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0), axis=-1)


def true_class_confidence(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
  """p(y | x): the softmax probability of the true label, per row."""
  p = np.asarray(probs, np.float64)
  return p[np.arange(len(p)), np.asarray(labels, np.int64)]


def _check_probs(**arrays: np.ndarray) -> None:
  """ValueError naming the argument that is not a (n, K) array of softmax rows."""
  for name, probs in arrays.items():
    p = np.asarray(probs)
    if p.ndim != 2 or p.shape[-1] == 0:
      raise ValueError(f"{name}: expected softmax outputs of shape (n, K), got shape {p.shape}")
    if p.shape[0] == 0:
      continue  # an empty set: the metric is NaN, as a mean over nothing
    # Rounding in the array's own precision: a softmax computed in bfloat16 sums to 1 ± ~1 %.
    try:
      tol = max(1e-3, 4 * float(ml_dtypes.finfo(p.dtype).eps))
    except ValueError:  # not a float type
      tol = 1e-3
    low, high = float(p.min()), float(p.max())
    sums = p.sum(axis=-1, dtype=np.float64)
    if not (low >= 0 and high <= 1 + tol and np.abs(sums - 1).max() <= tol):  # NaN fails
      raise ValueError(f"{name}: expected softmax probabilities (rows in [0, 1] summing to "
                       f"1), got values in [{low:.3g}, {high:.3g}] and row sums in "
                       f"[{sums.min():.3g}, {sums.max():.3g}] (pass metrics.softmax(logits))")


def mia_efficacy_svc_confidence(probs_remain: np.ndarray, labels_remain: np.ndarray,
                                probs_test: np.ndarray, labels_test: np.ndarray,
                                probs_forget: np.ndarray, labels_forget: np.ndarray,
                                *, C: float = 3.0, gamma: str | float = "auto") -> float:
  """SalUn's MIA-Efficacy: an RBF-SVC on the true-class confidence; % of D_f called non-member.

  Shadow members (label 1) are the FIRST |D_t| samples of D_r in the given order; shadow
  non-members (label 0) are all of D_t. The SVC (C = 3, gamma = "auto") is fit on those
  2·|D_t| confidences and predicts D_f:

      MIA-Efficacy = 100 · |{x ∈ D_f : predicted non-member}| / |D_f|

  All softmax outputs come from the evaluated model in eval mode with test-time transforms.

  Args:
    probs_remain, labels_remain: softmax outputs (n, K) and labels of D_r, dataset order.
    probs_test, labels_test: the same for the test set D_t.
    probs_forget, labels_forget: the same for the forget set D_f.
    C, gamma: the SVC's hyper-parameters (SalUn: 3 and "auto").

  Returns:
    A value in [0, 100]; judged by its gap to the Retrain model's value.

  Raises:
    ValueError: an input that is not softmax rows (e.g. logits), or |D_r| < |D_t|. For
      such a small D_r, UG-CLU passes the first |D_r| test samples as D_t.

  References: Fan et al., arXiv 2310.12508 (SalUn, `SVC_MIA`); Jia et al., arXiv 2304.04934.
  """
  from sklearn.svm import SVC
  _check_probs(probs_remain=probs_remain, probs_test=probs_test, probs_forget=probs_forget)
  n_t = len(labels_test)
  if len(labels_remain) < n_t:
    raise ValueError(f"probs_remain: the shadow members are the first |D_t| = {n_t} remain "
                     f"samples, but only {len(labels_remain)} were given")
  members = true_class_confidence(probs_remain[:n_t], labels_remain[:n_t])
  non_members = true_class_confidence(probs_test, labels_test)
  x = np.concatenate([members, non_members]).reshape(-1, 1)
  y = np.concatenate([np.ones(n_t), np.zeros(n_t)])
  clf = SVC(C=C, gamma=gamma, kernel="rbf").fit(x, y)
  pred = clf.predict(true_class_confidence(probs_forget, labels_forget).reshape(-1, 1))
  return 100.0 * float(np.mean(1.0 - pred))


def mia_member_rate_entropy_logreg(probs_remain: np.ndarray, probs_test: np.ndarray,
                                   probs_forget: np.ndarray, *, C: float = 2.0,
                                   scale: float = 100.0) -> float:
  """SFR-on's MIA: logistic regression on prediction entropy; % of D_f called member.

  The attack is fit on the entropies of all of D_r (member, 1) and D_t (non-member, 0)
  with balanced class weights and L-BFGS, then predicts D_f:

      MIA = scale · |{x ∈ D_f : predicted member}| / |D_f|

  The reference called `LogisticRegression(class_weight="balanced", solver="lbfgs",
  multi_class="multinomial")`; scikit-learn 1.9 no longer has `multi_class` and fits a
  binary problem with the binary logistic loss. The old multinomial fit of two classes
  used two symmetric weight rows under the penalty ½(‖w₁‖² + ‖w₀‖²); at the optimum
  w₁ = −w₀ = w/2, which is the binary problem with half the penalty, i.e. C doubled.
  The default C = 2.0 therefore reproduces the reference's decision rule (up to the
  solver's tolerance); C = 1.0 is today's scikit-learn default.

  Args:
    probs_remain: softmax outputs (n_r, K) on D_r.
    probs_test: on the test set D_t.
    probs_forget: on the forget set D_f.
    C: inverse L2 strength of the binary fit (2.0: the reference's multinomial fit).
    scale: 100 to report in percent next to accuracies; 1 for the reference's fraction.

  Returns:
    A value in [0, scale]; NOT 100 − `mia_efficacy_svc_confidence` (different feature,
    classifier and shadow sets); judged by its gap to the Retrain model's value.

  References: Huang et al., arXiv 2409.19732 (SFR-on, `get_membership_attack_prob`).
  """
  from sklearn.linear_model import LogisticRegression
  _check_probs(probs_remain=probs_remain, probs_test=probs_test, probs_forget=probs_forget)
  h_r, h_t = prediction_entropy(probs_remain), prediction_entropy(probs_test)
  x = np.concatenate([h_r, h_t]).reshape(-1, 1)
  y = np.concatenate([np.ones(len(h_r)), np.zeros(len(h_t))])
  clf = LogisticRegression(class_weight="balanced", solver="lbfgs", C=C).fit(x, y)
  pred = clf.predict(prediction_entropy(probs_forget).reshape(-1, 1))
  return scale * float(np.mean(pred))


def _kl_rows(p: np.ndarray, q: np.ndarray) -> np.ndarray:
  return np.sum(p * (np.log(p + _LOG_EPS) - np.log(q + _LOG_EPS)), axis=-1)


def kl_to_retrain(probs_retrain: np.ndarray, probs_unlearned: np.ndarray) -> float:
  """Mean over D_f of KL(p_rt ‖ p_un) = Σ_c p_c (ln(p_c + 1e-20) − ln(q_c + 1e-20)).

  Natural log; the Retrain model's softmax comes first (KL is not symmetric).

  Example: p = (1, 0), q = (0.5, 0.5) gives ln 2.
  """
  _check_probs(probs_retrain=probs_retrain, probs_unlearned=probs_unlearned)
  p = np.asarray(probs_retrain, np.float64)
  q = np.asarray(probs_unlearned, np.float64)
  return float(np.mean(_kl_rows(p, q)))


def js_to_retrain(probs_retrain: np.ndarray, probs_unlearned: np.ndarray) -> float:
  """Mean over D_f of JS(p_rt ‖ p_un) = ½ KL(p ‖ m) + ½ KL(q ‖ m), m = ½(p + q).

  Example: p = (0.7, 0.2, 0.1), q = (0.2, 0.5, 0.3) gives 0.132918.
  """
  _check_probs(probs_retrain=probs_retrain, probs_unlearned=probs_unlearned)
  p = np.asarray(probs_retrain, np.float64)
  q = np.asarray(probs_unlearned, np.float64)
  m = 0.5 * (p + q)
  return float(np.mean(0.5 * _kl_rows(p, m) + 0.5 * _kl_rows(q, m)))


AVG_GAP_KEYS = ("ua", "ra", "ta", "mia_efficacy")  # the keys of our results


def avg_gap(values: Mapping[str, float], retrain: Mapping[str, float],
            keys: Sequence[str] = AVG_GAP_KEYS) -> float:
  """Mean absolute gap to the Retrain model: (1/|K|) Σ_{k∈K} |v_k − v_k^rt|.

  Over {UA, RA, TA, MIA} by default (SalUn's convention, MIA = the SVC efficacy), read
  under the keys our results use: "ua", "ra", "ta", "mia_efficacy". When another MIA
  variant is used, pass its key and name the result accordingly (e.g.
  "avg_gap_entropy_logreg").

  Example: (UA, RA, TA, MIA) = (5, 99, 94, 12) against (8, 100, 94.5, 18) gives 2.625.
  """
  missing = [k for k in keys if k not in values or k not in retrain]
  if missing:
    raise ValueError(f"values/retrain: missing metric(s) {', '.join(missing)}")
  return sum(abs(float(values[k]) - float(retrain[k])) for k in keys) / len(keys)


# ----------------------------------------------------------------------------------------------
# Continual-learning accuracy matrix: a[t, i] = test accuracy on task i after training through
# task t (0-based here; the formulas below are written 1-based as in the literature).

def _matrix(acc: np.ndarray) -> np.ndarray:
  a = np.asarray(acc, np.float64)
  if a.ndim != 2 or a.shape[0] != a.shape[1] or a.shape[0] < 1:
    raise ValueError(f"acc: expected a square T×T accuracy matrix, got shape {a.shape}")
  return a


def cl_final_avg_acc(acc: np.ndarray) -> float:
  """ACC = (1/T) Σ_i a_{T,i}: mean accuracy over all tasks after the last one (GEM)."""
  a = _matrix(acc)
  return float(np.mean(a[-1]))


def cl_avg_incremental_acc(acc: np.ndarray, task_sizes: Sequence[float] | None = None) -> float:
  """AIA = (1/T) Σ_t A_t, A_t the accuracy on the union of the tasks seen up to t.

  A_t is sample-weighted over tasks 1..t with `task_sizes` (test-set sizes); without them
  the tasks weigh equally, A_t = (1/t) Σ_{i≤t} a_{t,i}.
  """
  a = _matrix(acc)
  T = a.shape[0]
  w = np.ones(T) if task_sizes is None else np.asarray(task_sizes, np.float64)
  if w.shape != (T,):
    raise ValueError(f"task_sizes: expected {T} sizes, got {w.shape}")
  return float(np.mean([np.sum(a[t, :t + 1] * w[:t + 1]) / np.sum(w[:t + 1])
                        for t in range(T)]))


def bwt(acc: np.ndarray) -> float:
  """BWT = (1/(T−1)) Σ_{i<T} (a_{T,i} − a_{i,i}) (GEM); negative means forgetting."""
  a = _matrix(acc)
  T = a.shape[0]
  if T < 2:
    return float("nan")
  return float(np.mean([a[-1, i] - a[i, i] for i in range(T - 1)]))


def fwt(acc: np.ndarray, random_init_acc: Sequence[float]) -> float:
  """FWT = (1/(T−1)) Σ_{i=2..T} (a_{i−1,i} − b_i) (GEM), b_i = a random model's accuracy."""
  a = _matrix(acc)
  T = a.shape[0]
  b = np.asarray(random_init_acc, np.float64)
  if b.shape != (T,):
    raise ValueError(f"random_init_acc: expected {T} values, got {b.shape}")
  if T < 2:
    return float("nan")
  return float(np.mean([a[i - 1, i] - b[i] for i in range(1, T)]))


def forgetting_max(acc: np.ndarray) -> float:
  """Chaudhry et al.'s forgetting: (1/(T−1)) Σ_{i<T} [max_{l∈{i..T−1}} a_{l,i} − a_{T,i}].

  The max runs only over the stages from the one that trained task i up to the one
  before the last (never over untrained stages l < i, nor over l = T).
  """
  a = _matrix(acc)
  T = a.shape[0]
  if T < 2:
    return float("nan")
  return float(np.mean([np.max(a[i:T - 1, i]) - a[-1, i] for i in range(T - 1)]))


def forgetting_last(acc: np.ndarray) -> float:
  """Avalanche's forgetting: (1/(T−1)) Σ_{i<T} (a_{i,i} − a_{T,i}) = −BWT (not `forgetting_max`)."""
  a = _matrix(acc)
  T = a.shape[0]
  if T < 2:
    return float("nan")
  return float(np.mean([a[i, i] - a[-1, i] for i in range(T - 1)]))
