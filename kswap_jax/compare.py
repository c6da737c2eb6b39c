r"""One command to compare a method with the methods it is measured against.

    python -m kswap_jax.compare --config=configs/demo.py:runlocal --workdir=/tmp/cmp
    python -m kswap_jax.compare --config=configs/demo.py --methods=lbf,laf --seeds=0,1,2

Runs the config's method and every other registered method of the same family
(`methods.FAMILIES`, or `--methods=a,b`) on identical data, splits and seeds, each in its own
sub-workdir `<workdir>/<method>/seed_<s>`. A rerun skips finished (method, seed) pairs of
the same config, refuses ones that finished with another (before anything trains) and
resumes an interrupted one from its checkpoints. It then writes a leaderboard: per method,
the family's headline metrics (mean ± std over seeds), the number of trainable parameters
and the wall time, as `leaderboard.json`, `leaderboard.md`, `leaderboard.tex` (LaTeX,
booktabs; the best mean of each metric with a better direction in bold) and
`leaderboard.png` in the workdir (default `./workdir/<config name>[_<arg>]_compare`, with
one `_compare` for the `:compare` arg), and the same metrics at every stage of the runs
(with the Retrain oracle's where a stage has one) as `leaderboard_stages.md`; `python -m
kswap_jax.report WORKDIR` prints the table again. `--config.<field>=<value>` overrides
apply to every method.
The first run of a seed also does the work its family shares (pretraining, the Retrain
oracle), which its seconds include. A run's seconds add up all its attempts
(`compare_seconds.json`); an attempt killed outright (SIGKILL) cannot record its time, and
the table marks such runs. `--dry_run` makes every run's checks (`run.py
--dry_run`) and writes nothing.

`--sweep=FIELD=V1,V2,...` (repeatable: a grid) runs every method at each value, each in
`<workdir>/<method>/<FIELD>=<V>[,<FIELD2>=<V2>...]/seed_<s>` (fields sorted; tuples joined
by `-`, other characters than letters, digits and `._+-` as `_`), one leaderboard row per
(method, value). A method that does not read the field (its section, or a field its module
lists in `fields_unread`: its results never depend on it) runs once, at the config's value
(the table shows "–" for the field). The point at the config's own values is the plain
run, `<workdir>/<method>/seed_<s>`. Pretraining
and the oracle are shared across values unless a value changes them: then each value that
does gets its own, in `pretrain/<FIELD>=<V>/seed_<s>` (`oracle/...`), named by the values
that change it alone, so a rerun with more values finds the runs it made.
`--sweep=FIELD1,FIELD2=(V1,W1),(V2,W2)` sweeps fields together: one point per pair, not
a grid.

    python -m kswap_jax.compare --config=configs/demo.py --sweep=ks.beta=0.1,0.2,0.4
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import json
import logging
import math
import os
import re
import shutil
import sys
import time
from typing import NamedTuple

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from kswap_jax import hostmem, methods, report, train
from kswap_jax.errors import ConfigError

log = logging.getLogger("kswap_jax")


def _family(method: str) -> str:
  for family, members in methods.FAMILIES.items():
    if method in members:
      return family
  raise ConfigError(f"method: {method!r} belongs to no comparison family (families: "
                    f"{', '.join(methods.FAMILIES)})")


# The work the runs of one seed share: its folder under the compare workdir and the config
# field that points a run to it (a folder the user names there is not compare's to tag).
SHARED_WORK = {"pretraining": ("pretrain", "init.pretrain_workdir"),
               "oracle": ("oracle", "oracle.workdir")}


def _config_for(config: ml_collections.ConfigDict, method: str, seed: int, workdir: str,
                point: dict | None = None, tags: dict | None = None
                ) -> ml_collections.ConfigDict:
  """`config` with method, seed and a sweep `point`'s fields ({field: value}) replaced;
  sections the method owns but the config file did not build are added with the method's
  defaults. Methods that start from this repo's pretraining share one pretrained model per
  seed (`<workdir>/pretrain/[<tag>/]seed_<s>`), and methods measured against a Retrain
  oracle (an `oracle` section with an empty `oracle.workdir`) share one oracle per seed
  (`<workdir>/oracle/[<tag>/]seed_<s>`); `tags` ({"pretraining": tag, "oracle": tag},
  `_Sweep.tags`) names the sub-folder of a point whose values change that work."""
  out = ml_collections.ConfigDict(copy.deepcopy(config.to_dict()))
  defaults = methods.default_config(method)
  for section in defaults.keys():
    if section not in out:
      out[section] = defaults[section]
  out.method = method
  out.seed = seed
  for field, value in (point or {}).items():
    _set(out, field, value)
  tags = tags or {}
  if out.init.kind == "pretrain" and not out.init.pretrain_workdir:
    out.init.pretrain_workdir = os.path.join(workdir, "pretrain", tags.get("pretraining", ""),
                                             f"seed_{seed}")
  if "oracle" in out and not out.oracle.get("workdir", True):
    out.oracle.workdir = os.path.join(workdir, "oracle", tags.get("oracle", ""), f"seed_{seed}")
  return out


def _get(config: ml_collections.ConfigDict, field: str):
  """The value at a dotted `field` of `config`; KeyError when it has no such field."""
  node = config
  for key in field.split("."):
    if not isinstance(node, ml_collections.ConfigDict) or key not in node:
      raise KeyError(field)
    node = node[key]
  return node


def _has(config: ml_collections.ConfigDict, field: str) -> bool:
  try:
    _get(config, field)
  except KeyError:
    return False
  return True


def _set(config: ml_collections.ConfigDict, field: str, value) -> None:
  """Sets a dotted `field` of `config`, type-checked as ml_collections does (ConfigError)."""
  *parents, leaf = field.split(".")
  node = _get(config, ".".join(parents)) if parents else config
  try:
    node[leaf] = value
  except (TypeError, ValueError) as e:
    raise ConfigError(f"--sweep: {field}={value!r}: {e}") from None


def _show(value) -> str:
  """A swept value as written on the command line (tuples as `(0,1)`)."""
  if isinstance(value, (tuple, list)):  # a one-item tuple as Python writes it: (0.2,)
    return "(" + ",".join(_show(v) for v in value) + ("," if len(value) == 1 else "") + ")"
  return str(value)


def _key(value) -> str:
  """A swept value (or tuple of them) as a comparable string: ("a,b", "c") and ("a", "b,c")
  differ, as `_show`'s text would not tell."""
  return json.dumps(value, sort_keys=True, default=str)


def _label(point: dict) -> str:
  """A point as the table and the log show it: `ks.beta=0.1 lora.rank=4`."""
  return " ".join(f"{field}={_show(value)}" for field, value in point.items())


def _slug(point: dict) -> str:
  """A point as a folder name, its fields sorted (the flags' order changes no folder):
  `ks.beta=0.1`, {"b": (0, 1), "a": "x/y"} -> `a=x_y,b=0-1`."""
  def part(value):
    text = "-".join(map(str, value)) if isinstance(value, (tuple, list)) else str(value)
    return re.sub(r"[^A-Za-z0-9._+-]", "_", text)
  return ",".join(f"{field}={part(point[field])}" for field in sorted(point))


def _shared_difference(work: str, a: ml_collections.ConfigDict,
                       b: ml_collections.ConfigDict) -> str:
  """The first field in which config `b` does `work` ("pretraining", "oracle") otherwise
  than config `a` ("" when the two would share it)."""
  from kswap_jax.methods import pretrain  # pylint: disable=import-outside-toplevel
  record = lambda c: json.loads(c.to_json_best_effort())
  if work == "pretraining":
    return train.config_difference(record(a), b, pretrain.PRETRAIN_FIELDS,
                                   pretrain.PRETRAIN_LAYOUT)
  if "oracle" not in a:
    return ""
  from kswap_jax.methods import ug_clu  # pylint: disable=import-outside-toplevel
  return train.config_difference(record(ug_clu.oracle_config(a)), ug_clu.oracle_config(b))


class _Sweep:
  """`--sweep` as a grid over config fields: the points each method runs, and the
  pretraining and oracle folders each point uses.

  A point's folders depend on the point and the config alone, not on the other values
  swept, so a rerun with more or fewer values finds the same folders."""

  def __init__(self, config: ml_collections.ConfigDict, sweep: dict[str, list] | None,
               names: list[str], workdir: str):
    """`sweep`: {FIELD: [value, ...]}, and {"FIELD1,FIELD2": [(value1, value2), ...]} for
    fields swept together (`_typed_sweep`)."""
    self.config, self.workdir = config, workdir
    # The grid's axes: the fields of one flag and their values, a tuple per point.
    self.axes = [(tuple(key.split(",")), [v if "," in key else (v,) for v in values])
                 for key, values in (sweep or {}).items()]
    self.sweep = {f: [v[i] for v in values] for fields, values in self.axes
                  for i, f in enumerate(fields)}  # the board's: each field's values
    self.zipped = [list(fields) for fields, _ in self.axes if len(fields) > 1]
    for fields, values in self.axes:
      key = ",".join(fields)
      for field in fields:
        if field in ("method", "seed"):
          raise ConfigError(f"--sweep: {field}: use --{field}s=a,b,... to run several")
      if not values:
        raise ConfigError(f"--sweep: {key}: expected at least one value")
      keys = [_key(v) for v in values]
      repeated = sorted({_show(v if len(fields) > 1 else v[0]) for v, k in zip(values, keys)
                         if keys.count(k) > 1})
      if repeated:
        raise ConfigError(f"--sweep: {key}: {', '.join(repeated)} given twice (each value "
                          f"is one run)")
    own = {name: _config_for(config, name, 0, workdir) for name in names}
    self.read = {}  # method -> the swept fields it reads
    for name, sub in own.items():
      self.read[name] = [f for f in self.sweep if _has(sub, f) and methods.reads_field(name, f)]
    for field in self.sweep:
      if not any(_has(sub, field) for sub in own.values()):
        raise ConfigError(f"--sweep: {field}: no such config field in the compared methods' "
                          f"configs")
      if not any(field in read for read in self.read.values()):
        raise ConfigError(f"--sweep: {field}: read by none of the compared methods "
                          f"({', '.join(names)})")
    for name in names:
      unread = [f for f in self.sweep if f not in self.read[name]]
      if unread:
        log.info("[compare] %s does not read %s: it runs once, at the config's value (– in "
                 "the table)", name, ", ".join(unread))
    for name in names:
      for point in self.points(name):
        if len(_slug(point)) > 255:
          raise ConfigError(f"--sweep: the folder name of {_label(point)} is longer than 255 "
                            f"characters; sweep fewer fields at once")
        for work, tag in self.tags(name, point).items():
          given = SHARED_WORK[work][1]
          if tag and _has(config, given) and _get(config, given):
            raise ConfigError(
                f"--sweep: {tag.replace(',', ', ')} changes the {work}, but {given} names "
                f"one folder for every value; leave {given} empty (one {work} per value "
                f"that changes it, in the compare workdir)")

  def points(self, name: str) -> list[dict]:
    """The points method `name` runs: the grid over the fields it reads ([{}]: once); of
    fields swept together, the values of those it reads, each combination once."""
    read = self.read.get(name, [])
    axes = []
    for fields, values in self.axes:
      kept = [i for i, f in enumerate(fields) if f in read]
      if kept:
        parts = [tuple((fields[i], v[i]) for i in kept) for v in values]
        axes.append([p for j, p in enumerate(parts)
                     if _key(p) not in {_key(q) for q in parts[:j]}])
    return [dict(item for part in combo for item in part) for combo in itertools.product(*axes)]

  def tags(self, name: str, point: dict) -> dict[str, str]:
    """{work: the sub-folder of the pretraining and of the oracle that `point` of method
    `name` uses}: "" (the config's own) when the point leaves that work as the config
    does it; else the point's values of the fields that change it, each found by putting
    back the config's value. When those alone do not give the point's work (fields that
    act only together), all the point's values that differ from the config's."""
    config_for = lambda p: _config_for(self.config, name, 0, self.workdir, p)
    base, at = config_for({}), config_for(point)
    out = {}
    for work in SHARED_WORK:
      if not _shared_difference(work, base, at):
        out[work] = ""
        continue
      changing = {f: v for f, v in point.items()
                  if _shared_difference(work, config_for({**point, f: _get(base, f)}), at)}
      if _shared_difference(work, config_for(changing), at):
        changing = {f: v for f, v in point.items() if _key(v) != _key(_get(base, f))}
      out[work] = _slug(changing)
    return out


def _shared_work(method: str) -> str | None:
  """The `SHARED_WORK` whose run a run of `method` is, as its module says
  (`shared_work(method)`: the Retrain oracle for clu_retrain), or None."""
  work = getattr(methods.get(method), "shared_work", lambda _: None)(method)
  return work if work in SHARED_WORK else None


def _reuse_shared(workdir: str, p, seed: int, sub_config) -> str | None:
  """The shared work's folder when run folder `<workdir>/<p.folder>/seed_<seed>` is now
  that finished work (`_shared_work`), else None: when the work's folder holds a finished
  run whose config is this run's (`train.config_difference`), and this run has not
  started, its files are hard-linked into the run folder (copied where links cannot be
  made) and its time is recorded as this run's, instead of training the same model again."""
  work = _shared_work(p.method)
  field = SHARED_WORK[work][1] if work else None
  if field is None or not _has(sub_config, field) or not _get(sub_config, field):
    return None
  source = _get(sub_config, field)
  sub = os.path.join(workdir, p.folder, f"seed_{seed}")
  if not os.path.exists(os.path.join(source, "results.json")) or (
      os.path.isdir(sub) and os.listdir(sub)):
    return None
  with open(os.path.join(source, "results.json")) as f:
    results = json.load(f)
  if train.config_difference(results.get("config") or {}, sub_config):
    return None
  if jax.process_index() == 0:
    os.makedirs(os.path.dirname(sub), exist_ok=True)
    if os.path.isdir(sub):
      os.rmdir(sub)
    staged = sub + ".linking"
    shutil.rmtree(staged, ignore_errors=True)
    try:
      shutil.copytree(source, staged, copy_function=os.link)
    except OSError:  # a file system without hard links
      shutil.rmtree(staged, ignore_errors=True)
      shutil.copytree(source, staged)
    os.replace(staged, sub)
    seconds = results.get("wall_seconds")  # the shared run's own time
    known = isinstance(seconds, (int, float)) and math.isfinite(seconds)
    _write_timing(workdir, f"{p.folder}/seed_{seed}",
                  {"seconds": seconds if known else 0.0, "attempts": 1,
                   "incomplete": not known, "reused": source})
  if jax.process_count() > 1:  # the others read the linked folder next
    multihost_utils.sync_global_devices(f"kswap_jax compare: {sub} linked")
  return source


def _recorded(workdir: str, name: str, seed: int, started: bool = False) -> dict | None:
  """The config `<workdir>/<name>/seed_<seed>` finished with (its results.json), or, with
  `started`, the one an unfinished run there started with (its config.json); None when
  there is none."""
  sub = os.path.join(workdir, name, f"seed_{seed}")
  for record in ("results.json", "config.json") if started else ("results.json",):
    if os.path.exists(os.path.join(sub, record)):
      with open(os.path.join(sub, record)) as f:
        recorded = json.load(f)
      return recorded.get("config", {}) if record == "results.json" else recorded
  return None


def _check_finished(workdir: str, name: str, seed: int, sub_config) -> None:
  """ConfigError when `<workdir>/<name>/seed_<seed>` finished with another config."""
  recorded = _recorded(workdir, name, seed)
  if recorded is None:
    return
  path = os.path.join(workdir, name, f"seed_{seed}", "results.json")
  diff = train.config_difference(recorded, sub_config)
  if diff:
    raise ConfigError(
        f"--workdir {workdir}: {name}/seed_{seed} finished with a different config ({diff}); "
        f"use a new --workdir or delete {os.path.dirname(path)} (and the pretraining it used, "
        f"in {workdir}/pretrain, when the change concerns pretraining, the data or the model)")


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
  entry. A refused attempt (ConfigError) that wrote no checkpoint of its own (a resumed
  run refused at once, or a new one refused before its first) leaves the entry as it
  was."""
  key, sub = f"{name}/seed_{seed}", os.path.join(workdir, name, f"seed_{seed}")
  before, newest = _read_timings(workdir).get(key), _newest_checkpoint(sub)
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
    if _newest_checkpoint(sub) != newest:
      record()  # refused after this attempt had trained and checkpointed
    else:
      _write_timing(workdir, key, before)
    raise
  except BaseException:
    record()
    raise
  record()


def _newest_checkpoint(sub: str) -> int | None:
  """The step of the newest checkpoint in run folder `sub` (None: none yet)."""
  ckpts = os.path.join(sub, "checkpoints")
  steps = [int(d) for d in os.listdir(ckpts) if d.isdigit()] if os.path.isdir(ckpts) else []
  return max(steps, default=None)


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


def _collect_stages(by_stage: dict, row: str, seeds: list[int], per_seed: list[dict],
                    headline) -> None:
  """Adds one leaderboard row's per-stage values (each seed's `results["stages"]`, the
  headline metrics a stage has) to `by_stage`, keyed by (stage name, request), and the
  Retrain oracle's values of the stage (`stage["oracle"]`), keyed by the oracle run: the
  rows of a sweep whose points each train their own oracle have one oracle row each."""
  for seed, results in zip(seeds, per_seed):
    for stage in results.get("stages") or []:
      if not isinstance(stage, dict) or "name" not in stage:
        continue
      values = {k: stage[k] for k in headline if k in stage}
      if not values:
        continue
      entry = by_stage.setdefault((stage["name"], stage.get("request")),
                                  {"rows": {}, "oracles": {}})
      for k, v in values.items():
        entry["rows"].setdefault(row, {}).setdefault(k, []).append(v)
      oracle = stage.get("oracle")
      if isinstance(oracle, dict):
        # Which oracle: its folder per seed, the same for the rows that share it.
        entry["oracles"].setdefault(row, {})[seed] = (
            results.get("oracle_workdir"), {k: oracle[k] for k in headline if k in oracle})


def _stages(by_stage: dict, order: list[str] | None = None) -> list[dict]:
  """The per-stage board: for each stage (in the order the runs have them), mean ± std
  over seeds of each row's headline metrics, and of the Retrain oracle's ("oracles": one
  entry per oracle, with the rows it serves)."""
  out, order = [], order or []  # the board's rows in the order asked for, not the order run
  for (name, request), entry in by_stage.items():
    ranked = sorted(entry["rows"], key=lambda r: order.index(r) if r in order else -1)
    stage = {"name": name, "methods": {
        row: {k: _summary(v) for k, v in entry["rows"][row].items()} for row in ranked}}
    if request:
      stage["request"] = request
    shared: dict[str, dict] = {}  # the oracle runs (folders per seed) -> rows and values
    for row, by_seed in entry["oracles"].items():  # {seed: (folder, values)}
      key = json.dumps(sorted((seed, folder) for seed, (folder, _) in by_seed.items()))
      slot = shared.setdefault(key, {"rows": [], "values": [v for _, v in by_seed.values()]})
      slot["rows"].append(row)
    for slot in shared.values():
      slot["rows"].sort(key=lambda r: ranked.index(r))
    if shared:
      stage["oracles"] = [
          {"rows": slot["rows"],
           "metrics": {k: _summary([v.get(k) for v in slot["values"]])
                       for k in dict.fromkeys(k for v in slot["values"] for k in v)}}
          for slot in shared.values()]
    out.append(stage)
  return out


def _folder(config: ml_collections.ConfigDict, workdir: str, name: str, point: dict,
            seeds: list[int], tags: dict) -> str:
  """The folder (under the compare workdir) of method `name` at sweep `point`:
  `<name>/<point's slug>`, or the plain run's `<name>` when the point's values are the
  config's own (the same run: a plain compare's finished run is reused, and the other way
  round), unless an earlier sweep already ran it in its own folder or a plain run there
  (finished or not) has another config."""
  own = os.path.join(name, _slug(point)) if point else name
  base = _config_for(config, name, 0, workdir)
  if not point or os.path.isdir(os.path.join(workdir, own)) or any(
      _key(v) != _key(_get(base, f)) for f, v in point.items()):
    return own
  for seed in seeds:
    recorded = _recorded(workdir, name, seed, started=True)
    if recorded is not None and train.config_difference(
        recorded, _config_for(config, name, seed, workdir, point, tags)):
      return own
  log.info("[compare] %s %s is the config's own run: it runs in (or is read from) %s",
           name, _label(point), os.path.join(workdir, name))
  return name


class _Planned(NamedTuple):
  """One row of a compare: a method at a sweep point ({} without a sweep)."""
  method: str
  point: dict
  folder: str  # under the compare workdir; runs in <folder>/seed_<s>
  row: str  # its leaderboard row
  tags: dict  # `_Sweep.tags`


def run(config: ml_collections.ConfigDict, workdir: str, method_names: list[str] | None = None,
        seeds: list[int] | None = None, dry_run: bool = False,
        sweep: dict[str, list] | None = None) -> dict | None:
  """Runs every method of the comparison and returns the leaderboard dict; with `dry_run`,
  a dry run of every (method, seed) not finished yet (`methods.run`), nothing written, and
  None. `sweep` ({field: [values]}, a grid over its fields; a key "field1,field2" with
  [(value1, value2), ...] sweeps those fields in pairs) runs each method at every point it
  reads, one row per (method, point). In a multi-process run, the first process writes
  the timings and the leaderboard (the others' dicts may miss the last attempt's seconds)."""
  family = _family(str(config.method))
  names = method_names or [m for m in methods.FAMILIES[family] if m in methods.METHODS]
  # The config file must set up its method's family: the sections every member reads (the
  # rest `_config_for` adds with their defaults).
  common = set.intersection(*(set(methods.sections_used(m)) for m in methods.FAMILIES[family]))
  methods.check_sections(config, only=tuple(sorted(common)))
  for name in names:
    if name not in methods.METHODS:  # unknown names fail before anything runs
      raise ConfigError(f"--methods: unknown method {name!r} (this config's family: "
                        f"{', '.join(methods.FAMILIES[family])})")
    if name not in methods.FAMILIES[family]:
      # Another family's method needs sections, data and metrics this config does not set up.
      raise ConfigError(
          f"--methods: {name!r} is not {'an' if family[0] in 'aeiou' else 'a'} {family} "
          f"method; this config's method "
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
  given_workdir = workdir
  workdir = os.path.abspath(workdir)  # the sub-configs' shared paths do not depend on the spelling
  grid = _Sweep(config, sweep, names, workdir)
  plan = [_Planned(name, point, _folder(config, workdir, name, point, seeds,
                                         grid.tags(name, point)),
                   f"{name} {_label(point)}" if point else name, grid.tags(name, point))
          for name in names for point in grid.points(name)]
  folders = [p.folder for p in plan]
  clash = sorted({f for f in folders if folders.count(f) > 1})
  if clash:
    raise ConfigError(f"--sweep: two values would share the folder {clash[0]}; give values "
                      f"that differ in their letters or digits")
  sub_config = lambda p, seed: _config_for(config, p.method, seed, workdir, p.point, p.tags)
  # A finished run is reused only if it is this config's run; all are checked before anything
  # is written (an unfinished one is checked by its own workdir record when it resumes).
  for p in plan:
    for seed in seeds:
      sub = sub_config(p, seed)
      try:
        methods.check(sub)  # each method's own values, before the first one trains
      except ConfigError as e:
        raise ConfigError(f"--sweep {_label(p.point)}: {e}" if p.point else str(e)) from None
      _check_finished(workdir, p.folder, seed, sub)
  if dry_run:
    train.check_writable(given_workdir)
  else:
    train.prepare_workdir(given_workdir)
  rows, total, count, checked = {}, len(plan) * len(seeds), 0, 0
  by_stage: dict[tuple, dict] = {}  # (stage name, request) -> per-row values (`_stages`)
  # A method whose run is a shared work's (the Retrain oracle) runs after the others: it
  # then finds that work done and reuses it (`_reuse_shared`); the rows keep `plan`'s order.
  for p in sorted(plan, key=lambda p: _shared_work(p.method) is not None):
    name, run_name, row_name = p.method, p.folder, p.row
    per_seed = []
    for seed in seeds:
      count += 1
      sub = os.path.join(workdir, run_name, f"seed_{seed}")
      results_path = os.path.join(sub, "results.json")
      if dry_run:
        if os.path.exists(results_path):
          log.info("[compare] %d/%d %s, seed %d: finished earlier", count, total, row_name,
                   seed)
        else:
          methods.run(sub_config(p, seed), sub, dry_run=True)
          checked += 1
        continue
      shared = (None if os.path.exists(results_path)
                else _reuse_shared(workdir, p, seed, sub_config(p, seed)))
      if shared:
        log.info("[compare] %d/%d %s, seed %d: the %s in %s is this run; linked to %s, not "
                 "trained again", count, total, row_name, seed, _shared_work(name), shared, sub)
      elif not os.path.exists(results_path):
        resumed = _newest_checkpoint(sub) is not None
        log.info("[compare] %d/%d %s, seed %d -> %s%s", count, total, row_name, seed, sub,
                 " (resuming an earlier attempt)" if resumed else "")
        try:
          with _attempt_timed(workdir, run_name, seed, resumed):
            methods.run(sub_config(p, seed), sub)
        except ConfigError:
          _remove_empty(workdir, run_name)  # the folders the refused run's was alone in
          raise
      else:
        log.info("[compare] %d/%d %s, seed %d: finished earlier, results read from %s", count,
                 total, row_name, seed, results_path)
      with open(results_path) as f:
        results = json.load(f)
      per_seed.append((results, _timing(workdir, run_name, seed)))
    if dry_run:
      continue
    headline = methods.HEADLINES[family]
    _collect_stages(by_stage, row_name, seeds, [r for r, _ in per_seed], headline)
    rows[row_name] = {
        **{k: _summary([r["final"].get(k, float("nan")) for r, _ in per_seed])
           for k in headline},
        "num_trainable": per_seed[0][0].get("num_trainable"),
        "seconds": _summary([t["seconds"] for _, t in per_seed]),
        "attempts": max(t["attempts"] for _, t in per_seed),
        "seconds_incomplete": any(t["incomplete"] for _, t in per_seed),
        # As JSON has it, so that the returned board equals leaderboard.json read back.
        **({"method": name, "values": _jsonable(p.point)} if grid.sweep else {}),
    }
  if dry_run:
    log.info("[compare] dry run: %d run(s) checked, %d finished earlier, nothing written",
             checked, total - checked)
    return None
  rows = {p.row: rows[p.row] for p in plan}  # in the order asked for
  board = {"family": family, "config_method": str(config.method), "seeds": seeds,
           "headline": list(methods.HEADLINES[family]), "methods": rows,
           **({"sweep": _jsonable(grid.sweep)} if grid.sweep else {}),
           **({"zipped": grid.zipped} if grid.zipped else {}),
           "stages": _stages(by_stage, list(rows))}
  if jax.process_index() != 0:  # the first process writes the timings and the leaderboard
    return board
  train.write_json(os.path.join(workdir, "leaderboard.json"), board)
  drawn = write_views(board, workdir)
  print(markdown(board), flush=True)
  log.info("leaderboard written to %s.{md,tex,json,png}%s", os.path.join(workdir, "leaderboard"),
           "; every stage's values: leaderboard_stages.md" if board["stages"] else "")
  if drawn:
    log.info("the metrics against the swept values: %s", os.path.join(workdir, "sweep.png"))
  elif grid.sweep:
    log.info("no sweep.png: no swept field has two or more numbers for values (a tuple, "
             "e.g. a per-task list, or a string is not an axis); the leaderboard has them")
  return board


def write_views(board: dict, workdir: str) -> bool:
  """A leaderboard's views in `workdir`: `leaderboard.md`, `leaderboard_stages.md` (a
  board with per-stage values), `leaderboard.tex`, `leaderboard.png` and `sweep.png`
  (`plot_sweep`); returns whether `sweep.png` was drawn.

  Raises:
    OSError: a file cannot be written.
  """
  with open(os.path.join(workdir, "leaderboard.md"), "w") as f:
    f.write(markdown(board) + "\n")
  if board.get("stages"):
    with open(os.path.join(workdir, "leaderboard_stages.md"), "w") as f:
      f.write(stages_markdown(board) + "\n")
  with open(os.path.join(workdir, "leaderboard.tex"), "w") as f:
    f.write(latex(board) + "\n")
  plot(board, os.path.join(workdir, "leaderboard.png"))
  return plot_sweep(board, os.path.join(workdir, "sweep.png"))


def _remove_empty(workdir: str, run_name: str) -> None:
  """Removes `<workdir>/<run_name>` and its parents below `workdir` while they are empty."""
  parts = run_name.split(os.sep)
  for i in range(len(parts), 0, -1):
    try:
      os.rmdir(os.path.join(workdir, *parts[:i]))
    except OSError:
      return


def _jsonable(value):
  """`value` as it reads back from JSON (tuples as lists)."""
  return json.loads(json.dumps(value))


def _cell(s: dict) -> str:
  if not s["n"] or s["mean"] is None or math.isnan(s["mean"]):  # NaN: an older board
    return "–"
  return f"{s['mean']:.2f}" + (f" ± {s['std']:.2f}" if s["n"] > 1 else "")


def markdown(board: dict) -> str:
  """The leaderboard as a markdown table (mean ± std over seeds)."""
  head, swept = board["headline"], list(board.get("sweep", {}))
  labels = [report.label(k) for k in head]
  lines = [f"| method | {''.join(f + ' | ' for f in swept)}{' | '.join(labels)} | trainable | "
           f"seconds |", "|---" * (len(swept) + len(head) + 3) + "|"]
  for name, row in board["methods"].items():
    cells = [_cell(row[k]) for k in head]
    trainable = f"{row['num_trainable']:,}" if row.get("num_trainable") else "–"
    mark = "*" if _incomplete(row) else ""
    values = "".join(_show(row["values"][f]) + " | " if f in row.get("values", {}) else "– | "
                     for f in swept)
    lines.append(f"| {row.get('method', name)} | {values}{' | '.join(cells)} | {trainable} | "
                 f"{_cell(row['seconds'])}{mark} |")
  seeds = ", ".join(map(str, board["seeds"]))
  note = ("\n*: an attempt of this run ended without recording its time (killed outright); "
          "seconds of the recorded attempts only."
          if any(_incomplete(r) for r in board["methods"].values()) else "")
  first = ("a seed's first run (and the first at each value that changes the shared "
           "work) includes" if swept else "a seed's first run includes")
  spread = (" Values: mean ± sample standard deviation over the seeds (n − 1)."
            if len(board["seeds"]) > 1 else "")
  return "\n".join(lines) + (f"\n\n{board['family']}, seeds {seeds}.{spread} Seconds: wall "
                             f"time of each run, all its attempts together; {first} the work "
                             f"shared by all (pretraining, the Retrain oracle).{note}")


def stages_markdown(board: dict) -> str:
  """The per-stage board as markdown: one table per stage (a task, a request, a Knowledge
  Swapping stage) with each row's headline metrics there, and the Retrain oracle's last
  where the stage has one (mean ± std over seeds)."""
  seeds = ", ".join(map(str, board["seeds"]))
  out = [f"# {board['family']}: every stage (mean ± std over seeds {seeds})"]
  for stage in board["stages"]:
    rows = dict(stage["methods"])
    oracles = stage.get("oracles") or []
    for oracle in oracles:  # one row, or one per oracle a sweep's points trained
      rows["Retrain oracle" + (f" ({', '.join(oracle['rows'])})" if len(oracles) > 1
                               else "")] = oracle["metrics"]
    head = [k for k in board["headline"] if any(k in r for r in rows.values())]
    title = stage["name"] + (f": {stage['request']}" if stage.get("request") else "")
    out += ["", f"## {title}", "",
            f"| method | {' | '.join(report.label(k) for k in head)} |",
            "|---" * (len(head) + 1) + "|"]
    out += [f"| {row} | {' | '.join(_cell(r[k]) if k in r else '–' for k in head)} |"
            for row, r in rows.items()]
  return "\n".join(out)


_TEX = {**{c: "\\" + c for c in "&%$#_{}"}, "\\": r"\textbackslash{}",
        "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "±": r"$\pm$", "–": "--"}


def _tex(text: str) -> str:
  """`text` with LaTeX's special characters escaped, in one pass."""
  return "".join(_TEX.get(c, c) for c in str(text))


def _best(rows: list[dict], key: str) -> float | None:
  """The best mean of metric `key` over `rows` by its direction (None: it has none, or no
  row reports it)."""
  better = report.METRICS.get(key, (key, ""))[1]
  means = [r[key]["mean"] for r in rows if r[key]["n"] and r[key]["mean"] is not None
           and not math.isnan(r[key]["mean"])]
  if not better or not means:
    return None
  return max(means) if better == "up" else min(means)


def latex(board: dict) -> str:
  """The leaderboard as a LaTeX `tabular` (booktabs rules), mean $\\pm$ std over seeds; in
  each metric with a better direction (↑/↓), the best mean at two decimals in bold."""
  head, swept = board["headline"], list(board.get("sweep", {}))
  rows = list(board["methods"].values())
  best = {k: _best(rows, k) for k in head}
  arrows = {"up": r" $\uparrow$", "down": r" $\downarrow$", "": ""}
  labels = [_tex(report.METRICS.get(k, (k, ""))[0]) + arrows[report.METRICS.get(k, (k, ""))[1]]
            for k in head]
  lines = [r"\begin{tabular}{l" + "l" * len(swept) + "r" * (len(head) + 2) + "}", r"\toprule",
           " & ".join(["Method", *map(_tex, swept), *labels, "Trainable", "Seconds"])
           + r" \\", r"\midrule"]
  for name, row in board["methods"].items():
    cells = []
    for k in head:
      cell = _tex(_cell(row[k]))
      mean = row[k]["mean"]
      if best[k] is not None and mean is not None and f"{mean:.2f}" == f"{best[k]:.2f}":
        cell = r"\textbf{" + cell + "}"
      cells.append(cell)
    values = [_tex(_show(row["values"][f])) if f in row.get("values", {}) else "--"
              for f in swept]
    trainable = f"{row['num_trainable']:,}".replace(",", "{,}") if row.get("num_trainable") \
        else "--"
    mark = "*" if _incomplete(row) else ""
    lines.append(" & ".join([_tex(row.get("method", name)), *values, *cells, trainable,
                             _tex(_cell(row["seconds"])) + mark]) + r" \\")
  lines += [r"\bottomrule", r"\end{tabular}"]
  if any(_incomplete(r) for r in rows):  # after the tabular: LaTeX ignores it as a comment
    lines.append("% *: an attempt of this run ended without recording its time; seconds of "
                 "the recorded attempts only")
  return "\n".join(lines)


def _incomplete(row: dict) -> bool:
  # "seconds_resumed": leaderboards written before attempts were added up.
  return bool(row.get("seconds_incomplete", row.get("seconds_resumed")))


def plot(board: dict, path: str, title: str | None = None) -> None:
  """Grouped bars: one group per headline metric, one bar per method (or run), std as
  error bars; `title` defaults to the family and seeds."""
  head, names = board["headline"], list(board["methods"])
  # ~0.3 in per bar, at most 16 in wide (12 methods x 4 metrics used to take 36 in), and
  # room for the legend beside the axes (~0.06 in per character of its longest name).
  legend = 0.06 * max(map(len, names), default=0) + 0.6
  fig = report.figure(figsize=(min(16 + legend, max(6, 0.3 * len(head) * max(1, len(names))
                                                    + 2) + legend), 4))
  ax = fig.add_subplot(1, 1, 1)
  width = 0.8 / max(1, len(names))
  for j, name in enumerate(names):
    row = board["methods"][name]
    ax.bar([i + j * width for i in range(len(head))], [_drawn(row, k, "mean") for k in head],
           width, yerr=[_drawn(row, k, "std") for k in head], label=name, capsize=3)
  ax.set_xticks([i + width * (len(names) - 1) / 2 for i in range(len(head))],
                [report.label(k) for k in head])
  ax.set_ylabel("%")
  # Beside the axes: inside, it covered bars (and long labels ran off the figure).
  ax.legend(fontsize=7, ncol=2 if len(names) > 12 else 1, loc="upper left",
            bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
  ax.grid(alpha=0.3, axis="y")
  ax.set_title(title or f"{board['family']}: seeds {', '.join(map(str, board['seeds']))}")
  fig.tight_layout()
  fig.savefig(path, dpi=100)


def _drawn(row: dict, key: str, stat: str) -> float:
  """A leaderboard row's mean or std of metric `key` for a plot (NaN: not reported)."""
  value = row[key][stat]
  return float("nan") if value is None else value


def _numeric(values) -> bool:
  """Whether every value is an int or a float (bools are not)."""
  return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


def _x_field(board: dict) -> tuple[str | None, list[str]]:
  """The swept field `plot_sweep` draws along (None: no field has two or more numbers for
  values; else the first such, one whose values do not repeat when there is one) and the
  fields swept in pairs with it that change along its lines (none when its values repeat:
  then they tell lines apart)."""
  sweep = board.get("sweep") or {}
  # A line needs two values at least (a paired field may repeat one throughout).
  numeric = [f for f, values in sweep.items()
             if _numeric(values) and len({_key(v) for v in values}) > 1]
  unique = lambda f: len({_key(v) for v in sweep[f]}) == len(sweep[f])
  field = next((f for f in numeric if unique(f)), numeric[0] if numeric else None)
  pair = next((p for p in board.get("zipped", []) if field in p), [field])
  return field, [f for f in pair if f != field] if field and unique(field) else []


def plot_sweep(board: dict, path: str) -> bool:
  """For a sweep with a field whose values are numbers (the first such field): each
  headline metric against that field, one line per method (and values of the other swept
  fields), std as error bars, a method that does not read the field as a dashed level.
  Returns whether it drew; when it did not (no sweep, no field of numbers), a plot left at
  `path` by an earlier compare is removed, as it no longer matches the leaderboard."""
  sweep = board.get("sweep") or {}
  field, others = _x_field(board)
  if field is None:
    if os.path.exists(path):
      os.remove(path)
    return False
  head = board["headline"]
  partners = [field, *others]
  lines: dict[str, list] = {}  # legend label -> [(x, row)]
  for name, row in board["methods"].items():
    point = dict(row.get("values", {}))
    x = point.pop(field, None)
    for partner in partners if x is not None else ():  # swept with x: along the line
      point.pop(partner, None)
    lines.setdefault(f"{row.get('method', name)} {_label(point)}".strip(), []).append((x, row))
  fig = report.figure(figsize=(min(16, 3.2 * len(head) + 1), 3.4))
  for i, key in enumerate(head):
    ax = fig.add_subplot(1, len(head), i + 1)
    mean, std = (lambda r: _drawn(r, key, "mean")), (lambda r: _drawn(r, key, "std"))
    for j, (label, points) in enumerate(lines.items()):
      color = f"C{j % 10}"
      if points[0][0] is None:  # does not read the field: one run for every value
        ax.axhline(mean(points[0][1]), linestyle="--", linewidth=1, label=label, color=color)
        continue
      points = sorted(points, key=lambda p: p[0])
      ax.errorbar([p[0] for p in points], [mean(r) for _, r in points],
                  yerr=[std(r) for _, r in points], marker="o", capsize=3, label=label,
                  color=color)
    if all(isinstance(v, int) for v in sweep[field]):
      ax.set_xticks(sorted(set(sweep[field])))
    ax.set_title(report.label(key), fontsize=9)
    ax.set_xlabel(field + (f" (swept with {', '.join(others)})" if others else ""), fontsize=8)
    ax.grid(alpha=0.3)
    if i == 0:
      ax.set_ylabel("%")
  fig.axes[-1].legend(fontsize=7)
  fig.suptitle(f"{board['family']}: seeds {', '.join(map(str, board['seeds']))}", fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  return True


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


def _top_level_split(text: str) -> list[str]:
  """`text` split at the commas outside brackets and quotes: "(0,1),(2,3)" -> 2 parts."""
  parts, depth, quote, start = [], 0, "", 0
  for i, ch in enumerate(text):
    if quote:
      quote = "" if ch == quote else quote
    elif ch in "'\"":
      quote = ch
    elif ch in "([{":
      depth += 1
    elif ch in ")]}":
      depth -= 1
    elif ch == "," and depth == 0:
      parts.append(text[start:i])
      start = i + 1
  return [p.strip() for p in parts + [text[start:]]]


def _pop_sweeps(argv: list[str]) -> tuple[list[str], list[tuple[str, list[str]]]]:
  """(argv without its `--sweep=FIELD=V1,V2,...` flags, [(FIELD, [V1, V2, ...])])."""
  rest, sweeps, args = [], [], iter(argv)
  for a in args:
    if a == "--sweep":
      a = f"--sweep={next(args, '')}"
    if not a.startswith("--sweep="):
      rest.append(a)
      continue
    key, eq, raw = a[len("--sweep="):].partition("=")
    fields = [f.strip().removeprefix("config.") for f in key.split(",")]
    values = [v for v in _top_level_split(raw) if v]
    if not (all(fields) and eq and values):
      raise ConfigError(f"{a}: expected --sweep=FIELD=V1,V2,... (e.g. --sweep=ks.beta=0.1,0.2; "
                        f"tuples in brackets: --sweep=swap.forget_classes=(0,1),(2,3); fields "
                        f"in pairs: --sweep=ks.beta,group_lasso.alpha=(0.1,0.01),(0.2,0.02))")
    for field in fields:
      if fields.count(field) > 1 or any(field in f.split(",") for f, _ in sweeps):
        raise ConfigError(f"--sweep: {field} given twice (give all its values in one flag)")
    sweeps.append((",".join(fields), values))
  return rest, sweeps


def _typed_sweep(argv: list[str], sweeps: list[tuple[str, list[str]]], config) -> dict:
  """{field: [value, ...]}, each value read as `--config.FIELD=VALUE` would be (an
  override of a swept field in `argv` is dropped: each value replaces it).

  Args:
    argv: the command line without its `--sweep` flags, the program name first.
    sweeps: `_pop_sweeps`'s (FIELD, [raw value, ...]).
    config: the command line's config (to tell a missing field from a bad value).
  """
  from kswap_jax import cli  # pylint: disable=import-outside-toplevel
  argv = cli.normalised(argv)
  out = {}
  for key, raw_values in sweeps:
    fields = key.split(",")
    for field in fields:
      override = f"--config.{field}="
      if any(a.startswith(override) for a in argv):
        log.warning("%s... is replaced by each value of --sweep=%s=...", override, key)
        argv = [a for a in argv if not a.startswith(override)]
    if len(fields) == 1:
      field = fields[0]
      if _has(config, field) and isinstance(_get(config, field), tuple) and not any(
          raw.startswith(("(", "[")) for raw in raw_values):
        log.warning("--sweep=%s=...: a run per value, each a tuple of one item; write a "
                    "tuple of several in brackets, e.g. --sweep=%s=(0,1),(2,3)", field, field)
      out[key] = [_typed(argv, config, field, raw) for raw in raw_values]
      continue
    out[key] = []
    for raw in raw_values:
      parts = _top_level_split(raw[1:-1]) if raw[:1] + raw[-1:] in ("()", "[]") else []
      if len(parts) != len(fields):
        raise ConfigError(f"--sweep={key}=...: value {raw!r}: expected ({len(fields)} values "
                          f"in brackets, one per field, e.g. "
                          f"({','.join(['...'] * len(fields))}))")
      out[key].append(tuple(_typed(argv, config, f, part) for f, part in zip(fields, parts)))
  return out


def _typed(argv: list[str], config, field: str, raw: str):
  """`raw` read as `--config.FIELD=RAW` would be, after `argv`'s overrides."""
  from kswap_jax import cli  # pylint: disable=import-outside-toplevel
  if len(raw) > 1 and raw[0] == raw[-1] and raw[0] in "'\"":
    raw = raw[1:-1]  # quoted to keep its commas together
  try:
    point, _ = cli.load_config(argv + [f"--config.{field}={raw}"])
    return _get(point, field)
  except ConfigError as e:
    if not _has(config, field):  # the override's message names the field and its section
      message = str(e).removeprefix(f"--config.{field}: ")
      raise ConfigError(f"--sweep={field}: {message}") from None
    raise ConfigError(f"--sweep={field}=...: value {raw!r}: {e}") from None


def main(argv=None) -> int:
  from kswap_jax import cli  # pylint: disable=import-outside-toplevel
  argv = list(sys.argv if argv is None else argv)
  if cli.wants_help(argv, __doc__.strip() + "\n\n" + cli.usage(
      "python -m kswap_jax.compare",
      "[--methods=a,b,...] [--seeds=0,1,...] [--sweep=FIELD=V1,V2,...]", more=(
          "  --methods=a,b,...     the methods to run (default: the config's method and the\n"
          "                        rest of its family)\n"
          "  --seeds=0,1,...       a run per seed (default: the config's seed)\n"
          "  --sweep=FIELD=V1,V2   a run per value of a config field, for every method whose\n"
          "                        results depend on it (the others run once, shown as '–';\n"
          "                        repeat the flag for a grid; tuples in brackets;\n"
          "                        --sweep=F1,F2=(V1,W1),(V2,W2): fields in pairs)\n"
          + cli.DRY_RUN_HELP),
      workdir_suffix="_compare")):
    return 0

  def command():
    dry_run, rest = cli.pop_dry_run(argv)
    rest, names = _split_list(rest, "methods")
    rest, seeds = _split_list(rest, "seeds", int)
    rest, sweeps = _pop_sweeps(rest)
    config, workdir = cli.load_config(rest, own_flags=(
        "--methods=a,b,...", "--seeds=0,1,...", "--sweep=FIELD=V1,V2,...", "--dry_run"))
    sweep = _typed_sweep(rest, sweeps, config)
    if not dry_run:
      log.info(hostmem.describe())  # the first line of the log, as run.py's
    if not cli.workdir_given(rest) and not workdir.endswith("_compare"):
      workdir = workdir + "_compare"  # (a config arg named `compare` has it already)
    if not dry_run:  # a dry run is one process
      train.initialize_distributed(config)
      train.stop_on_signals()
    run(config, workdir, names, seeds, dry_run=dry_run, sweep=sweep)
  return cli.guarded(command)


if __name__ == "__main__":
  hostmem.reexec_with_tunables()
  from kswap_jax.cli import exit_program  # pylint: disable=ungrouped-imports
  exit_program(main())
