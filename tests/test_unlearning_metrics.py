"""UA/RA/TA, both MIA conventions, JS/KL, Avg. Gap and the continual-learning matrix."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kswap_jax import metrics


def test_ua_ra_ta_and_avg_gap():
  logits = np.array([[2.0, 0.0], [0.0, 1.0], [3.0, 1.0], [0.0, 5.0]])
  labels = np.array([0, 1, 1, 1])
  assert metrics.ua(logits, labels) == pytest.approx(25.0)
  assert metrics.ra(logits, labels) == pytest.approx(75.0)
  assert math.isnan(metrics.ta(np.zeros((0, 2)), np.zeros(0, np.int64)))
  method = {"ua": 5.0, "ra": 99.0, "ta": 94.0, "mia_efficacy": 12.0}
  retrain = {"ua": 8.0, "ra": 100.0, "ta": 94.5, "mia_efficacy": 18.0}
  assert metrics.avg_gap(method, retrain) == pytest.approx(2.625)
  assert metrics.avg_gap(retrain, retrain) == 0.0
  assert metrics.avg_gap(method, retrain, keys=("ua",)) == pytest.approx(3.0)
  with pytest.raises(ValueError, match="mia_efficacy"):
    metrics.avg_gap({"ua": 1, "ra": 1, "ta": 1}, retrain)


def test_js_kl_to_retrain():
  p, q = np.array([[1.0, 0.0]]), np.array([[0.5, 0.5]])
  assert metrics.kl_to_retrain(p, q) == pytest.approx(0.693147, abs=1e-6)
  assert metrics.js_to_retrain(p, q) == pytest.approx(0.215762, abs=1e-6)
  p, q = np.array([[0.7, 0.2, 0.1]]), np.array([[0.2, 0.5, 0.3]])
  assert metrics.kl_to_retrain(p, q) == pytest.approx(0.583815, abs=1e-6)
  assert metrics.js_to_retrain(p, q) == pytest.approx(0.132918, abs=1e-6)
  assert metrics.js_to_retrain(q, p) == pytest.approx(metrics.js_to_retrain(p, q))
  assert metrics.kl_to_retrain(q, p) != pytest.approx(metrics.kl_to_retrain(p, q))
  assert metrics.kl_to_retrain(p, p) == pytest.approx(0.0, abs=1e-12)
  assert metrics.js_to_retrain(p, p) == pytest.approx(0.0, abs=1e-12)
  # The mean runs over samples.
  two = metrics.kl_to_retrain(np.array([[1.0, 0.0], [0.5, 0.5]]), np.array([[0.5, 0.5]] * 2))
  assert two == pytest.approx(0.693147 / 2, abs=1e-6)


WORKED = np.array([[80, 12, 11], [85, 90, 9], [70, 75, 88]], np.float64)


def test_accuracy_matrix_worked_example():
  assert metrics.cl_final_avg_acc(WORKED) == pytest.approx(77.667, abs=1e-3)
  assert metrics.cl_avg_incremental_acc(WORKED) == pytest.approx(81.722, abs=1e-3)
  assert metrics.bwt(WORKED) == pytest.approx(-12.5)
  assert metrics.fwt(WORKED, [10, 10, 10]) == pytest.approx(0.5)
  assert metrics.forgetting_max(WORKED) == pytest.approx(15.0)
  assert metrics.forgetting_last(WORKED) == pytest.approx(12.5)
  # Sample-weighted A_t: task 2 with twice the test images.
  want = (80 + (85 + 2 * 90) / 3 + (70 + 2 * 75 + 88) / 4) / 3
  assert metrics.cl_avg_incremental_acc(WORKED, [1, 2, 1]) == pytest.approx(want)
  with pytest.raises(ValueError, match="acc"):
    metrics.bwt(np.zeros((2, 3)))


def test_forgetting_last_is_minus_bwt_and_max_ignores_untrained_stages():
  r = np.random.RandomState(0)
  for T in (2, 4, 7):
    a = r.uniform(0, 100, (T, T))
    assert metrics.forgetting_last(a) == pytest.approx(-metrics.bwt(a))
    assert metrics.forgetting_max(a) >= metrics.forgetting_last(a) - 1e-12
  a = WORKED.copy()
  a[0, 1] = 99.0   # an untrained stage (l < i) must not count in the max
  assert metrics.forgetting_max(a) == pytest.approx(15.0)


def _probs(conf, labels, k=10):
  """Rows with probability `conf` on the label and the rest spread evenly."""
  p = np.tile(((1 - conf) / (k - 1))[:, None], (1, k))
  p[np.arange(len(labels)), labels] = conf
  return p


def test_softmax_rows():
  p = metrics.softmax(np.array([[0.0, 0.0], [1000.0, 0.0], [np.log(3.0), 0.0]]))
  np.testing.assert_allclose(p, [[0.5, 0.5], [1.0, 0.0], [0.75, 0.25]], atol=1e-12)


def test_entropy_of_uniform():
  assert metrics.prediction_entropy(np.full((1, 10), 0.1))[0] == pytest.approx(2.302585, abs=1e-6)
  assert metrics.prediction_entropy(np.eye(3))[0] == 0.0


def test_mia_svc_confidence_known_answers(monkeypatch):
  r = np.random.RandomState(0)
  n_r, n_t, n_f = 300, 100, 50
  lab = lambda n: r.randint(0, 10, n)
  y_r, y_t, y_f = lab(n_r), lab(n_t), lab(n_f)
  # First |D_t| remain samples look like members; the rest of D_r must be ignored, so
  # make it look like non-members.
  conf_r = np.concatenate([r.uniform(0.97, 1.0, n_t), r.uniform(0.05, 0.15, n_r - n_t)])
  p_r = _probs(conf_r, y_r)
  p_t = _probs(r.uniform(0.05, 0.15, n_t), y_t)
  fitted = []
  import sklearn.svm

  class Recording(sklearn.svm.SVC):
    def fit(self, x, y, *a, **k):
      fitted.append((x.shape, int(y.sum()), self.C, self.gamma, self.kernel))
      return super().fit(x, y, *a, **k)
  monkeypatch.setattr(sklearn.svm, "SVC", Recording)

  like_members = _probs(r.uniform(0.97, 1.0, n_f), y_f)
  like_non_members = _probs(r.uniform(0.05, 0.15, n_f), y_f)
  e_mem = metrics.mia_efficacy_svc_confidence(p_r, y_r, p_t, y_t, like_members, y_f)
  e_non = metrics.mia_efficacy_svc_confidence(p_r, y_r, p_t, y_t, like_non_members, y_f)
  assert e_mem == pytest.approx(0.0) and e_non == pytest.approx(100.0)
  assert fitted[0] == ((2 * n_t, 1), n_t, 3.0, "auto", "rbf")
  with pytest.raises(ValueError, match="probs_remain"):
    metrics.mia_efficacy_svc_confidence(p_r[:10], y_r[:10], p_t, y_t, like_members, y_f)


def test_mia_entropy_logreg_known_answers():
  r = np.random.RandomState(1)
  y = lambda n: r.randint(0, 10, n)
  p_r = _probs(r.uniform(0.95, 1.0, 400), y(400))      # confident: low entropy
  p_t = _probs(r.uniform(0.1, 0.3, 100), y(100))       # near uniform: high entropy
  low = _probs(r.uniform(0.95, 1.0, 60), y(60))
  high = _probs(r.uniform(0.1, 0.3, 60), y(60))
  assert metrics.mia_member_rate_entropy_logreg(p_r, p_t, low) == pytest.approx(100.0)
  assert metrics.mia_member_rate_entropy_logreg(p_r, p_t, high) == pytest.approx(0.0)
  half = metrics.mia_member_rate_entropy_logreg(p_r, p_t, np.concatenate([low, high]),
                                                scale=1.0)
  assert half == pytest.approx(0.5)


def test_binary_fit_with_doubled_C_is_the_two_row_multinomial_fit():
  """The reasoning behind the C = 2 default, checked numerically with a hand-written fit."""
  from scipy.optimize import minimize
  from sklearn.linear_model import LogisticRegression
  r = np.random.RandomState(2)
  x = np.concatenate([r.normal(0.3, 0.3, 80), r.normal(1.0, 0.4, 20)]).reshape(-1, 1)
  y = np.concatenate([np.ones(80), np.zeros(20)])
  sw = np.where(y == 1, 100 / (2 * 80), 100 / (2 * 20))   # class_weight="balanced"
  C = 1.0

  def objective(theta):   # rows k = 0, 1: (w_k, b_k); penalty on the weights only
    w, b = theta[:2], theta[2:]
    z = x * w[None, :] + b[None, :]
    logp = z - np.logaddexp(z[:, 0], z[:, 1])[:, None]
    nll = -np.sum(sw * logp[np.arange(len(y)), y.astype(int)])
    return C * nll + 0.5 * np.sum(w ** 2)

  theta = minimize(objective, np.zeros(4), method="L-BFGS-B", tol=1e-12).x
  w_multi, b_multi = theta[1] - theta[0], theta[3] - theta[2]
  clf = LogisticRegression(class_weight="balanced", solver="lbfgs", C=2 * C, tol=1e-10,
                           max_iter=1000).fit(x, y)
  assert float(clf.coef_[0, 0]) == pytest.approx(w_multi, rel=1e-4)
  assert float(clf.intercept_[0]) == pytest.approx(b_multi, rel=1e-4)


def test_probability_inputs_are_checked_by_name():
  probs = metrics.softmax(np.array([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
  labels = np.array([0, 1, 0])
  logits = np.log(probs) * 3  # negative values: logits, not probabilities
  with pytest.raises(ValueError, match=r"^probs_forget: expected softmax probabilities .*"
                                       r"metrics\.softmax\(logits\)"):
    metrics.mia_efficacy_svc_confidence(probs, labels, probs, labels, logits, labels)
  with pytest.raises(ValueError, match="^probs_test: expected softmax outputs of shape"):
    metrics.mia_member_rate_entropy_logreg(probs, probs[:, 0], probs)
  with pytest.raises(ValueError, match="^probs_unlearned: .* row sums in"):
    metrics.kl_to_retrain(probs, probs * 2)
  assert metrics.js_to_retrain(probs, probs) == pytest.approx(0.0, abs=1e-12)
  with pytest.raises(ValueError, match=r"^probs_retrain: .*\[nan, nan\]"):
    metrics.kl_to_retrain(np.full_like(probs, np.nan), probs)
  # bfloat16 rows of a softmax computed in bfloat16 sum to 1 only to ~0.5 %: accepted.
  rows = np.asarray(jax.nn.softmax(jnp.asarray(np.arange(-20.0, 20.0).reshape(4, 10) / 3,
                                               jnp.bfloat16), axis=-1))
  assert np.abs(rows.astype(np.float64).sum(-1) - 1).max() > 1e-3
  assert metrics.kl_to_retrain(rows, rows) == pytest.approx(0.0, abs=1e-6)
  empty = np.zeros((0, 2))  # an empty set: NaN, as a mean over nothing
  with np.errstate(all="ignore"), pytest.warns(RuntimeWarning):
    assert math.isnan(metrics.kl_to_retrain(empty, empty))
