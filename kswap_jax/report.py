"""Human-facing output: the before/after table and the knock-on norm plot."""

from __future__ import annotations

import re

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after selecting the headless backend)


def swap_table(results: dict) -> str:
  """A plain-text table of Acc_r / Acc_f / Acc_n per stage plus the final H-Mean."""
  rows = [f"Knowledge Swapping ({results['method']}), test accuracy [%] "
          f"({results.get('prediction_rule', '')})",
          f"{'stage':<10}{'Acc_r ↑':>10}{'Acc_f ↓':>10}{'Acc_n ↑':>10}"]
  for s in results["stages"]:
    rows.append(f"{s['name']:<10}{s['acc_r']:>10.2f}{s['acc_f']:>10.2f}{s['acc_n']:>10.2f}")
  f = results["final"]
  before = results["stages"][0]
  rows.append(f"Acc_r change {f['acc_r'] - before['acc_r']:+.2f}, Acc_f change "
              f"{f['acc_f'] - before['acc_f']:+.2f}, Acc_n change "
              f"{f['acc_n'] - before['acc_n']:+.2f}; H-Mean {f['h_mean']:.2f}")
  return "\n".join(rows)


def _block_index(name: str) -> int:
  m = re.search(r"(\d+)$", name)
  return int(m.group(1)) if m else -1


def plot_block_norms(block_norms: dict, path: str, title: str = "") -> None:
  """Two panels per stage: n_l (sum of Frobenius norms) and ||ΔW_l||, against block index.

  Args:
    block_norms: {stage: {"sum_frobenius": {block: v}, "delta_w": {block: v}}}, as from
      `kswap_jax.lora.block_norms`.
    path: PNG to write.
    title: figure title.
  """
  fig, axes = plt.subplots(1, 2, figsize=(10, 4))
  for ax, key, label in ((axes[0], "sum_frobenius", "n_l = Σ ||A||_F + ||B||_F"),
                         (axes[1], "delta_w", "||ΔW_l||_F = Σ s·||A B||_F")):
    for stage, norms in block_norms.items():
      blocks = sorted(norms[key], key=_block_index)
      ax.plot([_block_index(b) for b in blocks], [norms[key][b] for b in blocks], marker="o",
              label=f"after {stage}")
    ax.set_xticks(sorted({_block_index(b) for n in block_norms.values() for b in n[key]}))
    ax.set_xlabel("transformer block")
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)
    ax.legend()
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
