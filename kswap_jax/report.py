r"""Human-facing output: one table and one plot for every method's results envelope.

Every method writes `results.json` as

    {"method": ..., "config": {...}, "stages": [{"name": ..., <metric>: value, ...}, ...],
     "final": {<metric>: value, ...}, ...method-specific keys}

with metrics named as in `METRICS` (accuracies in %). `stage_table` prints it,
`plot_stages` draws each metric across the stages; `present` shows a finished run as its
method does (a method module may add tables and plots), and `python -m kswap_jax.report
WORKDIR` calls it on a run's results. Plots use `matplotlib.figure.Figure` directly (`figure`), so
importing this module never changes matplotlib's backend for the process, and matplotlib is
imported only when a plot is drawn (it is ~0.5 s of every run's start-up otherwise).
"""

from __future__ import annotations

import json
import math
import os
import re
import sys

from kswap_jax.errors import ArgumentParser, ConfigError, exit_with

# name -> (column label, better: "up" | "down" | "" when judged by the gap to an oracle)
METRICS = {
    "acc": ("Acc", "up"),
    "acc_r": ("Acc_r", "up"),
    "acc_f": ("Acc_f", "down"),
    "acc_n": ("Acc_n", "up"),
    "acc_o": ("Acc_o", "down"),
    "acc_m": ("Acc_m", "up"),
    "h_mean": ("H-Mean", "up"),
    "ua": ("UA", ""),
    "ra": ("RA", ""),
    "ta": ("TA", ""),
    "mia_efficacy": ("MIA", ""),
    "avg_gap": ("Avg.Gap", "down"),
    "avg_gap_mean": ("Avg.Gap mean", "down"),
}
_ARROWS = {"up": " ↑", "down": " ↓", "": ""}
FINAL_WIDTH = 100  # the stage table's `final:` line is wrapped at this many characters


def figure(**kwargs):
  """A new `matplotlib.figure.Figure(**kwargs)`: no pyplot, no backend change; matplotlib is
  imported here, on the first plot."""
  from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel
  return Figure(**kwargs)


MAX_FIELD_COLUMNS = 6  # config fields shown as columns of `runs_table`; the rest listed


def label(name: str) -> str:
  """A metric's column label with its better-direction arrow ("Acc_f ↓"); unknown names
  are returned as they are."""
  if name not in METRICS:
    return name
  text, better = METRICS[name]
  return text + _ARROWS[better]


def _fmt(value) -> str:
  if isinstance(value, (int, float)) and not isinstance(value, bool):
    return "nan" if math.isnan(value) else f"{value:.2f}"
  return str(value)


def stage_table(results: dict) -> str:
  """A plain-text table: one row per stage, one column per known metric it reports."""
  stages = results["stages"]
  columns = [m for m in METRICS if any(m in s for s in stages)]
  width = max([10] + [len(s["name"]) + 2 for s in stages])
  title = f"{results['method']}: per-stage metrics [%]"
  if results.get("prediction_rule"):
    title += f" ({results['prediction_rule']})"
  rows = [title, f"{'stage':<{width}}" + "".join(f"{label(c):>10}" for c in columns)]
  for s in stages:
    rows.append(f"{s['name']:<{width}}" + "".join(
        f"{_fmt(s[c]) if c in s else '-':>10}" for c in columns))
  final = results.get("final", {})
  if final:  # wrapped between entries: the unlearning methods' line has ~20 of them
    entries = [f"{METRICS[k][0] if k in METRICS else k} {_fmt(v)}" for k, v in final.items()]
    line = "final:"
    for i, entry in enumerate(entries):
      entry += "," if i < len(entries) - 1 else ""
      if len(line) + 1 + len(entry) > FINAL_WIDTH and line.strip() != "final:":
        rows.append(line)
        line = " " * len("final:")
      line += " " + entry
    rows.append(line)
  if any(isinstance(s.get("h_mean"), (int, float)) and s["h_mean"] < 0
         for s in [*stages, final]):
    rows.append("H-Mean < 0: the forget accuracy rose (D = Acc_f before - Acc_f < 0); read "
                "H-Mean with D (docs/metrics.md)")
  return "\n".join(rows)


def plot_stages(results: dict, path: str) -> None:
  """One panel per metric (accuracies and H-Mean) against the stages, written as a PNG."""
  stages = results["stages"]
  columns = [m for m in METRICS if any(isinstance(s.get(m), (int, float)) for s in stages)]
  if not columns:
    return
  fig = figure(figsize=(max(5, 1.2 * len(stages) + 3), 4))
  ax = fig.add_subplot(1, 1, 1)
  x = list(range(len(stages)))
  for c in columns:
    ax.plot(x, [s.get(c, float("nan")) for s in stages], marker="o", label=label(c))
  ax.set_xticks(x, [s["name"] for s in stages], rotation=30, ha="right")
  ax.set_ylabel("%")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  ax.set_title(f"{results['method']}: metrics per stage")
  fig.tight_layout()
  fig.savefig(path, dpi=100)


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
  fig = figure(figsize=(10, 4))
  axes = fig.subplots(1, 2)
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


PROFILES = (("block_n", "n_l = Σ ||A||_F + ||B||_F"),
            ("block_delta_w", "||ΔW_l||_F = Σ s·||A B||_F"),
            ("block_grad_abs", "mean |gradient| of the block's LoRA"))


def plot_block_profiles(metrics_path: str, path: str, title: str = "") -> bool:
  """Per-block profiles over training from a run's `metrics.jsonl`: one panel per quantity
  of `PROFILES` logged there, a line per block against the step, the stages marked.

  Returns:
    False (and draws nothing) when the log holds none of them (e.g. an older run).
  """
  rows = []
  if os.path.exists(metrics_path):
    with open(metrics_path) as f:
      rows = [r for r in map(json.loads, f) if "block_n" in r or "block_grad_abs" in r]
  keys = [(k, text) for k, text in PROFILES if any(k in r for r in rows)]
  if not keys:
    return False
  fig = figure(figsize=(10, 3.2 * len(keys)))
  axes = fig.subplots(len(keys), 1, squeeze=False)[:, 0]
  # A stage starts where the previous one ended (its last step is always logged).
  starts, last = {}, 0
  for r in rows:
    starts.setdefault(r.get("stage", ""), last)
    last = r["step"]
  for ax, (key, text) in zip(axes, keys):
    have = [r for r in rows if key in r]
    values = [r[key] for r in have]
    for b in range(len(values[0])):
      ax.plot([r["step"] for r in have], [v[b] for v in values], label=f"block {b}",
              color=_cmap(b, len(values[0])))
    for stage, step in starts.items():
      ax.axvline(step, color="0.6", lw=0.8, ls="--")
      ax.text(step, 1.0, f" {stage}", transform=ax.get_xaxis_transform(), va="top",
              fontsize=8, color="0.4")
    ax.set_ylabel(text, fontsize=8)
    ax.grid(alpha=0.3)
  axes[-1].set_xlabel("step")
  axes[0].legend(fontsize=7, ncol=min(6, len(values[0])))
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  return True


def _cmap(i: int, n: int):
  """Block i of n on a dark-to-light ramp (early blocks dark), so depth reads at a glance."""
  from matplotlib import colormaps  # pylint: disable=import-outside-toplevel
  return colormaps["viridis"](i / max(1, n - 1) * 0.9)


def present(results: dict, workdir: str | None) -> str:
  """What a finished run shows: its text (returned) and its figures (written in `workdir`;
  None draws none, e.g. on processes other than the first).

  The method's module decides when it has a `present(results, workdir)` (its own tables and
  plots); otherwise `stage_table` and `stages.png`. A run and `python -m kswap_jax.report`
  on its workdir both call this, so they show the same. A method without a `present`, or
  not registered in this process (one of the user's, built on a library method's run), is
  shown by the library method its envelope names (`presenter`), in the run as in `report`:
  only the library's own code runs.
  """
  from kswap_jax import methods  # pylint: disable=import-outside-toplevel
  name = str(results.get("method", ""))
  module = methods.get(name) if name in methods.METHODS else None
  if module is not None and hasattr(module, "present"):
    return module.present(results, workdir)
  like = str(results.get("presenter", ""))
  library = like in methods.METHODS and methods.get(like).__name__.startswith("kswap_jax.")
  if library and hasattr(methods.get(like), "present"):
    text = methods.get(like).present(results, workdir)
    return text if module is not None else (
        f"({name} is not registered in this process; its results are shown as {like}'s)\n"
        f"{text}")
  if workdir:
    plot_stages(results, os.path.join(workdir, "stages.png"))
  return stage_table(results)


def _flat(tree: dict, prefix: str = "") -> dict:
  """A results envelope's config as {"ks.beta": 0.2, ...} (`config.flatten` takes a
  ConfigDict and imports the models, which this module's command does not need)."""
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(_flat(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def _differing(runs: list[tuple[str, dict]]) -> tuple[list[dict], list[str]]:
  """Each run's flattened config (paths inside its own workdir as `WORKDIR/...`, without
  the sections its method does not read) and the fields whose values differ between the
  runs, less those no run's method reads (`fields_unread`)."""
  def relative(value, workdir):
    root = os.path.join(os.path.abspath(workdir), "")
    if isinstance(value, str) and (value + os.sep).startswith(root):
      return os.path.join("WORKDIR", os.path.relpath(value, root))
    return value
  from kswap_jax import methods  # pylint: disable=import-outside-toplevel
  def read(config: dict) -> dict:  # another method's sections are no difference
    unread = methods.unread_sections(config)
    return {k: v for k, v in config.items() if k not in unread}
  configs = [{k: relative(v, w) for k, v in _flat(read(r.get("config") or {})).items()}
             for w, r in runs]
  names = {str((r.get("config") or {}).get("method")) for _, r in runs}

  def unread(field: str) -> bool:  # by every run's method (`fields_unread`)
    try:
      return all(not methods.reads_field(name, field) for name in names)
    except ConfigError:  # a method not registered in this process: compare everything
      return False
  fields = sorted(k for k in set().union(*configs) if not unread(k)
                  and len({json.dumps(c.get(k), sort_keys=True) for c in configs}) > 1)
  return configs, fields


def plot_runs(runs: list[tuple[str, dict]], path: str) -> None:
  """`runs_table`'s final metrics as grouped bars, one bar per run, labelled by the values
  of the fields that differ (by the workdir when none does)."""
  from kswap_jax import compare  # pylint: disable=import-outside-toplevel
  configs, fields = _differing(runs)
  metrics = [m for m in METRICS if any(m in (r.get("final") or {}) for _, r in runs)]
  names = [", ".join(f"{k}={json.dumps(config.get(k))}" for k in fields) for config in configs]
  if not fields or len(fields) > 2 or max(map(len, names)) > 40:
    names = _short_names([workdir for workdir, _ in runs])  # the table says what differs
  rows = {}
  for (workdir, r), name in zip(runs, names):
    final = r.get("final") or {}
    rows[name if name not in rows else f"{name} ({workdir})"] = {
        m: {"mean": final.get(m), "std": None} for m in metrics}
  differ = (f", differing in {', '.join(fields)}" if 0 < len(fields) <= 2 else
            f", differing in {len(fields)} config fields (the table lists them)" if fields
            else "")
  compare.plot({"headline": metrics, "methods": rows}, path, title=f"{len(runs)} runs{differ}")


def _short_names(paths: list[str]) -> list[str]:
  """The shortest trailing parts of `paths` that tell them apart (`a/x/run`, `b/x/run` ->
  `a/x/run`, `b/x/run`; `w/beta_0.2`, `w/beta_0.3` -> `beta_0.2`, `beta_0.3`)."""
  parts = [os.path.normpath(p).split(os.sep) for p in paths]
  for n in range(1, max(map(len, parts)) + 1):
    names = [os.sep.join(p[-n:]) for p in parts]
    if len(set(names)) == len(names):
      return names
  return list(paths)


def runs_table(runs: list[tuple[str, dict]]) -> str:
  """Several finished runs side by side: a markdown table with one row per run, the config
  fields whose values differ between the runs, the final metrics any of them reports and
  the wall time (e.g. a sweep over one field, run as separate workdirs).

  Args:
    runs: (workdir, results envelope) per run, in row order. A path field inside the run's
      own workdir (its default pretraining, `<workdir>/pretrain`) is compared as
      `WORKDIR/...`, so runs that each pretrained the same way do not differ by it.

  Returns:
    The table; below it, the fields that differ when there are more than fit as columns.
  """
  configs, fields = _differing(runs)
  methods_differ = "method" in fields
  fields = [f for f in fields if f != "method"]  # a column of its own
  # The seed first, then the fields every run has (a difference in what each run read)
  # before those of one method's section (a column of "–" in the other runs' rows).
  fields.sort(key=lambda f: (f != "seed", sum(f not in c for c in configs), f))
  shown, more = fields[:MAX_FIELD_COLUMNS], fields[MAX_FIELD_COLUMNS:]
  metrics = [m for m in METRICS if any(m in (r.get("final") or {}) for _, r in runs)]
  head = ["run", "method", *shown, *(label(m) for m in metrics), "seconds"]
  lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
  for (name, r), config in zip(runs, configs):
    final = r.get("final") or {}
    cells = [name, str(r.get("method", "–")),
             *(json.dumps(config[k]) if k in config else "–" for k in shown),
             *(_fmt(final[m]) if m in final else "–" for m in metrics),
             _fmt(r["wall_seconds"]) if "wall_seconds" in r else "–"]
    lines.append("| " + " | ".join(cells) + " |")
  if more:
    lines.append(f"\nalso differ: {', '.join(more)}")
  elif not fields:
    lines.append("\nthe runs' configs differ in their method only" if methods_differ else
                 "\nthe runs' configs are the same")
  return "\n".join(lines)


class _NotARun(Exception):
  """Why a workdir's results cannot be shown: the one line the command prints."""


def _results(workdir: str) -> dict:
  """The results envelope of the finished run in `workdir`.

  Raises:
    _NotARun: not a folder, a `compare` method folder, a run that has not finished, or a
      `results.json` without stages and final metrics.
  """
  path = os.path.join(workdir, "results.json")
  if not os.path.isdir(workdir):
    what = "a file" if os.path.exists(workdir) else "no such folder"
    raise _NotARun(f"{workdir}: {what}; expected a run's workdir (it holds results.json)")
  if not os.path.exists(path):
    seeds = sorted(d for d in os.listdir(workdir) if re.fullmatch(r"seed_\d+", d))
    if seeds:
      raise _NotARun(f"{workdir}: one method of a `python -m kswap_jax.compare` workdir; "
                     f"its runs are {', '.join(seeds)} (pass one of them)")
    if os.path.exists(os.path.join(workdir, "leaderboard.json")):
      raise _NotARun(f"{workdir}: a `python -m kswap_jax.compare` workdir (`python -m "
                     f"kswap_jax.report {workdir}` prints its leaderboard)")
    started = any(os.path.exists(os.path.join(workdir, f))
                  for f in ("config.json", "metrics.jsonl"))
    what = ("the run has not finished: it is running, was stopped (rerun its command to "
            "resume it) or failed; metrics.jsonl holds what it logged"
            if started else "no run's results here")
    raise _NotARun(f"{workdir}: no results.json: {what}")
  try:
    with open(path) as f:
      results = json.load(f)
    if not isinstance(results, dict) or not results.get("stages"):
      raise ValueError("no stages")
    if not isinstance(results.get("final"), dict):
      raise ValueError("no final metrics")
  except (OSError, ValueError) as e:
    raise _NotARun(f"{path}: not a finished run's results envelope ({e})") from None
  return results


def _runs(workdirs: list[str], plot_path: str | None = None) -> int:
  """Several workdirs: `runs_table` of their results (each must be a finished run's), and
  with `plot_path` their `plot_runs`."""
  try:
    runs = [(workdir, _results(workdir)) for workdir in workdirs]
  except _NotARun as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(runs_table(runs))
  if plot_path:
    plot_runs(runs, plot_path)
    print(f"plot written to {plot_path}")
  return 0


def main(argv=None) -> int:
  """`python -m kswap_jax.report WORKDIR`: prints a finished run's tables and writes its
  plots into WORKDIR, as the run did (for a `python -m kswap_jax.compare` workdir: the
  leaderboard and its plot). With several workdirs: one table of their final metrics, with
  the config fields that differ between them (and with --plot PNG, those as bars)."""
  parser = ArgumentParser(prog="python -m kswap_jax.report", description=main.__doc__)
  parser.add_argument("workdir", nargs="+")
  parser.add_argument("--plot", metavar="PNG", help="with several workdirs: their final "
                      "metrics as grouped bars, written to this file")
  args = parser.parse_args(argv)
  if args.plot and len(args.workdir) == 1:
    parser.error("--plot: needs two or more workdirs (a single run's plots are redrawn in "
                 "its workdir)")
  if len(args.workdir) > 1:
    return _runs(args.workdir, args.plot)
  workdir = args.workdir[0]
  board = os.path.join(workdir, "leaderboard.json")
  if not os.path.exists(os.path.join(workdir, "results.json")) and os.path.exists(board):
    return _leaderboard(workdir, board)
  try:
    results = _results(workdir)
    before = _plots(workdir)
    try:
      text = present(results, workdir)
    except OSError as e:  # its plots
      raise _NotARun(f"{workdir}: cannot write the run's plots there ({e})") from None
    except (ValueError, KeyError, TypeError, AttributeError) as e:
      raise _NotARun(f"{os.path.join(workdir, 'results.json')}: not a finished run's "
                     f"results envelope ({e})") from None
  except _NotARun as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(text)
  written = sorted(f for f, stamp in _plots(workdir).items() if before.get(f) != stamp)
  if written:
    print(f"plots: {', '.join(written)} (in {workdir})")
  return 0


def _plots(workdir: str) -> dict[str, int]:
  """{file name: modification time in ns} of the PNG files in `workdir`."""
  return {f: os.stat(os.path.join(workdir, f)).st_mtime_ns for f in os.listdir(workdir)
          if f.endswith(".png")}


def _leaderboard(workdir: str, path: str) -> int:
  """A `python -m kswap_jax.compare` workdir: its table printed, its plots redrawn."""
  from kswap_jax import compare  # pylint: disable=import-outside-toplevel
  try:
    with open(path) as f:
      board = json.load(f)
    table = compare.markdown(board)
  except (OSError, ValueError, KeyError, TypeError) as e:
    print(f"error: {path}: not a leaderboard written by kswap_jax.compare ({e})",
          file=sys.stderr)
    return 2
  print(table)
  try:
    compare.write_views(board, workdir)
  except OSError as e:
    print(f"error: {workdir}: cannot write the leaderboard's tables and plots there ({e})",
          file=sys.stderr)
    return 2
  run = "<method>/<field>=<value>[,...]" if board.get("sweep") else "<method>"
  print(f"each run's own tables: python -m kswap_jax.report {workdir}/{run}/seed_<s>")
  return 0


if __name__ == "__main__":
  exit_with(main)
