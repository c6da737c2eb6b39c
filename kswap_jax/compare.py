r"""One command to compare a method with the methods it is measured against.

    python -m kswap_jax.compare --config=configs/demo.py:runlocal --workdir=/tmp/cmp
    python -m kswap_jax.compare --config=configs/demo.py --methods=lbf,laf --seeds=0,1,2

Runs the config's method and every other registered method of the same family
(`methods.FAMILIES`, or `--methods=a,b`) on identical data, splits and seeds, each in its own
sub-workdir `<workdir>/<method>/seed_<s>`. A rerun skips finished (method, seed) pairs of
the same config, refuses ones that finished with another (before anything trains) and
resumes an interrupted one from its checkpoints. It then writes a leaderboard: per method,
the family's headline metrics (mean ± std over seeds), the number of trainable parameters
and the wall time, as `leaderboard.json`, `leaderboard.md` and `leaderboard.png` in the
workdir (default `./workdir/<config name>[_<arg>]_compare`); `python -m kswap_jax.report
WORKDIR` prints the table again. `--config.<field>=<value>` overrides apply to every method.
The first run of a seed also does the work its family shares (pretraining, the Retrain
oracle), which its seconds include. A run's seconds add up all its attempts
(`compare_seconds.json`); an attempt killed outright (SIGKILL) cannot record its time, and
the table marks such runs. `--dry_run` makes every run's checks (`run.py
--dry_run`) and writes nothing.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import sys
import time

import jax
import ml_collections
import numpy as np

from kswap_jax import hostmem, methods, report, train
from kswap_jax.errors import ConfigError

log = logging.getLogger("kswap_jax")


def _family(method: str) -> str:
  for family, members in methods.FAMILIES.items():
    if method in members:
      return family
  raise ConfigError(f"method: {method!r} belongs to no comparison family (families: "
                    f"{', '.join(methods.FAMILIES)})")


def _config_for(config: ml_collections.ConfigDict, method: str, seed: int, workdir: str
                ) -> ml_collections.ConfigDict:
  """`config` with method and seed replaced; sections the method owns but the config file
  did not build are added with the method's defaults. Methods that start from this repo's
  pretraining share one pretrained model per seed (`<workdir>/pretrain/seed_<s>`), and
  methods measured against a Retrain oracle (an `oracle` section with an empty
  `oracle.workdir`) share one oracle per seed (`<workdir>/oracle/seed_<s>`)."""
  out = ml_collections.ConfigDict(copy.deepcopy(config.to_dict()))
  if out.init.kind == "pretrain" and not out.init.pretrain_workdir:
    out.init.pretrain_workdir = os.path.join(workdir, "pretrain", f"seed_{seed}")
  if "oracle" in out and not out.oracle.get("workdir", True):
    out.oracle.workdir = os.path.join(workdir, "oracle", f"seed_{seed}")
  defaults = methods.default_config(method)
  for section in defaults.keys():
    if section not in out:
      out[section] = defaults[section]
  out.method = method
  out.seed = seed
  return out


def _check_finished(workdir: str, name: str, seed: int, sub_config) -> None:
  """ConfigError when `<workdir>/<name>/seed_<seed>` finished with another config."""
  path = os.path.join(workdir, name, f"seed_{seed}", "results.json")
  if not os.path.exists(path):
    return
  with open(path) as f:
    diff = train.config_difference(json.load(f).get("config", {}), sub_config)
  if diff:
    raise ConfigError(
        f"--workdir {workdir}: {name}/seed_{seed} finished with a different config ({diff}); "
        f"use a new --workdir or delete {os.path.dirname(path)} (and {workdir}/pretrain when "
        f"the change concerns pretraining, the data or the model)")


_TIMING = "compare_seconds.json"  # in the compare workdir: {"<method>/seed_<s>": entry}


def _read_timings(workdir: str) -> dict:
  path = os.path.join(workdir, _TIMING)
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    return json.load(f)


def _write_timing(workdir: str, key: str, entry: dict | None) -> None:
  if jax.process_index() != 0:
    return
  timings, path = _read_timings(workdir), os.path.join(workdir, _TIMING)
  if entry is None:
    timings.pop(key, None)
  else:
    timings[key] = entry
  if timings:
    train.write_json(path, timings)
  elif os.path.exists(path):
    os.remove(path)  # a refused first attempt leaves nothing behind


@contextlib.contextmanager
def _attempt_timed(workdir: str, name: str, seed: int, resumes: bool):
  """Adds this attempt's wall time to the (method, seed)'s entry in `compare_seconds.json`
  when it ends, finished or not (a stop request, Ctrl-C, an error). The entry is marked
  "running" meanwhile: an attempt killed outright leaves that mark, and its time is lost,
  which the next attempt records as "incomplete". An attempt that does not resume its
  run's checkpoints (`resumes`: a new run, or one whose folder was deleted) starts a new
  entry. A refused attempt (ConfigError) that left no checkpoint of the run leaves the
  entry as it was."""
  key = f"{name}/seed_{seed}"
  before = _read_timings(workdir).get(key)
  if before and resumes:
    entry = dict(before)
  else:  # a "running" mark here: an attempt killed before the run's first checkpoint
    entry = {"seconds": 0.0, "attempts": 0, "incomplete": bool(before and before.get("running"))}
  entry["incomplete"] = bool(entry["incomplete"] or entry.pop("running", False))
  entry["attempts"] += 1
  _write_timing(workdir, key, {**entry, "running": True})
  start = time.time()

  def record():
    entry["seconds"] = round(entry["seconds"] + time.time() - start, 3)
    _write_timing(workdir, key, entry)
  try:
    yield
  except ConfigError:
    if _has_checkpoints(os.path.join(workdir, name, f"seed_{seed}")):
      record()  # refused after its run had trained and checkpointed
    else:
      _write_timing(workdir, key, before)
    raise
  except BaseException:
    record()
    raise
  record()


def _has_checkpoints(sub: str) -> bool:
  ckpts = os.path.join(sub, "checkpoints")
  return os.path.isdir(ckpts) and any(d.isdigit() for d in os.listdir(ckpts))


def _timing(workdir: str, name: str, seed: int) -> dict:
  """A finished (method, seed)'s seconds, attempts and whether an attempt's time is lost."""
  entry = _read_timings(workdir).get(f"{name}/seed_{seed}")
  if entry is not None:  # "running": killed outright after its results were written
    return {**entry, "incomplete": bool(entry["incomplete"] or entry.get("running"))}
  legacy = os.path.join(workdir, name, f"seed_{seed}", _TIMING)  # one file per run, earlier
  if os.path.exists(legacy):
    with open(legacy) as f:
      old = json.load(f)
    return {"seconds": old["seconds"], "attempts": 1 + bool(old.get("resumed")),
            "incomplete": bool(old.get("resumed"))}
  return {"seconds": float("nan"), "attempts": 0, "incomplete": True}


def _summary(values: list[float | None]) -> dict:
  """mean, std (ddof 1) and n over the finite numbers in `values` (None when n = 0: a
  metric a method does not report, e.g. clu_retrain's gap to itself; strict JSON)."""
  arr = np.asarray([v for v in values if isinstance(v, (int, float))
                    and not isinstance(v, bool) and math.isfinite(v)], np.float64)
  if arr.size == 0:
    return {"mean": None, "std": None, "n": 0}
  return {"mean": float(arr.mean()), "std": float(arr.std(ddof=1)) if arr.size > 1 else 0.0,
          "n": int(arr.size)}


def run(config: ml_collections.ConfigDict, workdir: str, method_names: list[str] | None = None,
        seeds: list[int] | None = None, dry_run: bool = False) -> dict | None:
  """Runs every method of the comparison and returns the leaderboard dict; with `dry_run`,
  a dry run of every (method, seed) not finished yet (`methods.run`), nothing written, and
  None. In a multi-process run, the first process writes the timings and the leaderboard
  (the others' dicts may miss the last attempt's seconds)."""
  family = _family(str(config.method))
  names = method_names or [m for m in methods.FAMILIES[family] if m in methods.METHODS]
  # The config file must set up its method's family: the sections every member reads (the
  # rest `_config_for` adds with their defaults).
  shared = set.intersection(*(set(methods.sections_used(m)) for m in methods.FAMILIES[family]))
  methods.check_sections(config, only=tuple(sorted(shared)))
  for name in names:
    if name not in methods.METHODS:  # unknown names fail before anything runs
      raise ConfigError(f"--methods: unknown method {name!r} (this config's family: "
                        f"{', '.join(methods.FAMILIES[family])})")
    if name not in methods.FAMILIES[family]:
      # Another family's method needs sections, data and metrics this config does not set up.
      raise ConfigError(
          f"--methods: {name!r} is not a {family} method; this config's method "
          f"{config.method!r} compares against {', '.join(methods.FAMILIES[family])}")
  field = "--seeds" if seeds else "seed"
  seeds = seeds or [int(config.seed)]
  negative = [s for s in seeds if s < 0]
  if negative:
    raise ConfigError(f"{field}: expected ints >= 0, got {', '.join(map(str, negative))}")
  for flag, values in (("--methods", names), ("--seeds", seeds)):
    repeated = sorted({str(v) for v in values if values.count(v) > 1})
    if repeated:
      raise ConfigError(f"{flag}: {', '.join(repeated)} given twice (each entry is one run)")
  if dry_run:
    train.check_writable(workdir)
  else:
    train.prepare_workdir(workdir)
  workdir = os.path.abspath(workdir)  # the sub-configs' shared paths do not depend on the spelling
  # A finished run is reused only if it is this config's run; all are checked before anything
  # trains (an unfinished one is checked by its own workdir record when it resumes).
  for name in names:
    for seed in seeds:
      sub_config = _config_for(config, name, seed, workdir)
      methods.check(sub_config)  # each method's own values, before the first one trains
      _check_finished(workdir, name, seed, sub_config)
  rows, total, count, checked = {}, len(names) * len(seeds), 0, 0
  for name in names:
    per_seed = []
    for seed in seeds:
      count += 1
      sub = os.path.join(workdir, name, f"seed_{seed}")
      results_path = os.path.join(sub, "results.json")
      if dry_run:
        if os.path.exists(results_path):
          log.info("[compare] %d/%d %s, seed %d: finished earlier", count, total, name, seed)
        else:
          methods.run(_config_for(config, name, seed, workdir), sub, dry_run=True)
          checked += 1
        continue
      if not os.path.exists(results_path):
        resumed = _has_checkpoints(sub)
        log.info("[compare] %d/%d %s, seed %d -> %s%s", count, total, name, seed, sub,
                 " (resuming an earlier attempt)" if resumed else "")
        try:
          with _attempt_timed(workdir, name, seed, resumed):
            methods.run(_config_for(config, name, seed, workdir), sub)
        except ConfigError:
          try:  # the method's folder, when the refused run's was its only content
            os.rmdir(os.path.join(workdir, name))
          except OSError:
            pass
          raise
      else:
        log.info("[compare] %d/%d %s, seed %d: finished earlier, results read from %s", count,
                 total, name, seed, results_path)
      with open(results_path) as f:
        results = json.load(f)
      per_seed.append((results, _timing(workdir, name, seed)))
    if dry_run:
      continue
    headline = methods.HEADLINES[family]
    rows[name] = {
        **{k: _summary([r["final"].get(k, float("nan")) for r, _ in per_seed])
           for k in headline},
        "num_trainable": per_seed[0][0].get("num_trainable"),
        "seconds": _summary([t["seconds"] for _, t in per_seed]),
        "attempts": max(t["attempts"] for _, t in per_seed),
        "seconds_incomplete": any(t["incomplete"] for _, t in per_seed),
    }
  if dry_run:
    log.info("[compare] dry run: %d run(s) checked, %d finished earlier, nothing written",
             checked, total - checked)
    return None
  board = {"family": family, "config_method": str(config.method), "seeds": seeds,
           "headline": list(methods.HEADLINES[family]), "methods": rows}
  if jax.process_index() != 0:  # the first process writes the timings and the leaderboard
    return board
  train.write_json(os.path.join(workdir, "leaderboard.json"), board)
  table = markdown(board)
  with open(os.path.join(workdir, "leaderboard.md"), "w") as f:
    f.write(table + "\n")
  plot(board, os.path.join(workdir, "leaderboard.png"))
  print(table, flush=True)
  log.info("leaderboard written to %s.{md,json,png}", os.path.join(workdir, "leaderboard"))
  return board


def _cell(s: dict) -> str:
  if not s["n"] or s["mean"] is None or math.isnan(s["mean"]):  # NaN: an older board
    return "–"
  return f"{s['mean']:.2f}" + (f" ± {s['std']:.2f}" if s["n"] > 1 else "")


def markdown(board: dict) -> str:
  """The leaderboard as a markdown table (mean ± std over seeds)."""
  head = board["headline"]
  labels = [report.label(k) for k in head]
  lines = [f"| method | {' | '.join(labels)} | trainable | seconds |",
           "|---" * (len(head) + 3) + "|"]
  for name, row in board["methods"].items():
    cells = [_cell(row[k]) for k in head]
    trainable = f"{row['num_trainable']:,}" if row.get("num_trainable") else "–"
    mark = "*" if _incomplete(row) else ""
    lines.append(f"| {name} | {' | '.join(cells)} | {trainable} | "
                 f"{_cell(row['seconds'])}{mark} |")
  seeds = ", ".join(map(str, board["seeds"]))
  note = ("\n*: an attempt of this run ended without recording its time (killed outright); "
          "seconds of the recorded attempts only."
          if any(_incomplete(r) for r in board["methods"].values()) else "")
  return "\n".join(lines) + (f"\n\n{board['family']}, seeds {seeds}. Seconds: wall time of "
                             f"each run, all its attempts together; a seed's first run "
                             f"includes the work shared by all (pretraining, the Retrain "
                             f"oracle).{note}")


def _incomplete(row: dict) -> bool:
  # "seconds_resumed": leaderboards written before attempts were added up.
  return bool(row.get("seconds_incomplete", row.get("seconds_resumed")))


def plot(board: dict, path: str, title: str | None = None) -> None:
  """Grouped bars: one group per headline metric, one bar per method (or run), std as
  error bars; `title` defaults to the family and seeds."""
  head, names = board["headline"], list(board["methods"])
  # ~0.3 in per bar, at most 16 in wide (12 methods x 4 metrics used to take 36 in).
  fig = report.figure(figsize=(min(16, max(6, 0.3 * len(head) * max(1, len(names)) + 2)), 4))
  ax = fig.add_subplot(1, 1, 1)
  width = 0.8 / max(1, len(names))
  for j, name in enumerate(names):
    row = board["methods"][name]
    nan = float("nan")
    ax.bar([i + j * width for i in range(len(head))],
           [nan if row[k]["mean"] is None else row[k]["mean"] for k in head], width,
           yerr=[nan if row[k]["std"] is None else row[k]["std"] for k in head], label=name,
           capsize=3)
  ax.set_xticks([i + width * (len(names) - 1) / 2 for i in range(len(head))],
                [report.METRICS.get(k, (k,))[0] for k in head])
  ax.set_ylabel("%")
  ax.legend(fontsize=7, ncol=2 if len(names) > 6 else 1)
  ax.grid(alpha=0.3, axis="y")
  ax.set_title(title or f"{board['family']}: seeds {', '.join(map(str, board['seeds']))}")
  fig.tight_layout()
  fig.savefig(path, dpi=100)


def _split_list(argv: list[str], flag: str, kind=str) -> tuple[list[str], list | None]:
  """(argv without `--flag=a,b` / `--flag a,b`, [kind(a), kind(b)] or None)."""
  rest, value, args = [], None, iter(argv)
  for a in args:
    if a == f"--{flag}":
      a = f"--{flag}={next(args, '')}"
    if a.startswith(f"--{flag}="):
      raw = a.split("=", 1)[1]
      value = []
      for x in (x.strip() for x in raw.split(",")):
        try:
          value += [kind(x)] if x else []
        except ValueError:
          raise ConfigError(f"--{flag}: {x!r} is not an int (expected a comma-separated list "
                            f"of ints, e.g. 0,1,2)") from None
      if not value:
        raise ConfigError(f"--{flag}: expected at least one entry")
    else:
      rest.append(a)
  return rest, value


def main(argv=None) -> int:
  from kswap_jax import cli  # pylint: disable=import-outside-toplevel
  argv = list(sys.argv if argv is None else argv)
  if cli.wants_help(argv, __doc__.strip() + "\n\n" + cli.usage(
      "python -m kswap_jax.compare", "[--methods=a,b,...] [--seeds=0,1,...]", more=(
          "  --methods=a,b,...     the methods to run (default: the config's method and the\n"
          "                        rest of its family)\n"
          "  --seeds=0,1,...       a run per seed (default: the config's seed)\n"
          + cli.DRY_RUN_HELP),
      workdir_suffix="_compare")):
    return 0

  def command():
    dry_run, rest = cli.pop_dry_run(argv)
    rest, names = _split_list(rest, "methods")
    rest, seeds = _split_list(rest, "seeds", int)
    config, workdir = cli.load_config(rest)
    if not dry_run:
      log.info(hostmem.describe())  # the first line of the log, as run.py's
    if not cli.workdir_given(rest) and not workdir.endswith("_compare"):
      workdir = workdir + "_compare"  # (a config arg named `compare` has it already)
    if not dry_run:  # a dry run is one process
      train.initialize_distributed(config)
      train.stop_on_signals()
    run(config, workdir, names, seeds, dry_run=dry_run)
  return cli.guarded(command)


if __name__ == "__main__":
  hostmem.reexec_with_tunables()
  from kswap_jax.cli import exit_program  # pylint: disable=ungrouped-imports
  exit_program(main())
