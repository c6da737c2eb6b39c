"""Methods by name: `config.method` -> the module that runs it, lazily imported.

A method module provides

    run(config, workdir) -> results        # the whole run, resumable, results envelope
    sections() -> {name: ConfigDict}        # its own config sections with their defaults
    sections_used(name) -> (section, ...)   # optional: the ones variant `name` reads, when
                                            # its variants do not all read every section
    fields_unread(name) -> (field, ...)     # optional: fields of those sections its results
                                            # never depend on ("section.*": all of one)
    present(results, workdir) -> text       # optional: its tables and plots (report.present)
    validate(config)                        # optional: its fields' values, before any data
                                            # is read (`check` and the config printer)

Variants of one method share a module (`lbf`/`laf`). A new method is a new module plus
one entry in `METHODS` (and its family's in `FAMILIES`), or, in the user's own files, a
`register(name, module, family)` call; nothing in shared code branches on the method's
name (docs/adding_a_method.md).

Example:
  >>> from kswap_jax.configs import demo  # a shipped config file
  >>> config = demo.get_config("runlocal")
  >>> results = methods.run(config, "/tmp/run")
  >>> methods.default_config("lbf")  # the defaults alone: no data or checkpoint set yet
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import json
import logging
import os
import re
import sys
import types

import ml_collections

from kswap_jax.errors import ConfigError, DryRunComplete, NonFiniteLossError, require_int

log = logging.getLogger("kswap_jax")

METHODS = {
    "pretrain": "kswap_jax.methods.pretrain",
    "lbf": "kswap_jax.methods.knowledge_swap",
    "laf": "kswap_jax.methods.knowledge_swap",
    "gs_lora": "kswap_jax.methods.gs_lora",
    "gs_lora_pp": "kswap_jax.methods.gs_lora",
    "sfr_on": "kswap_jax.methods.ug_clu",
    "ug_clu": "kswap_jax.methods.ug_clu",
    "clu_joint": "kswap_jax.methods.ug_clu",
    "clu_retrain": "kswap_jax.methods.ug_clu",
    **{name: "kswap_jax.methods.baselines.unlearning" for name in (
        "clu_ft", "clu_ga", "clu_rl", "clu_salun", "clu_l1_sparse")},
    **{name: "kswap_jax.methods.baselines.continual_forgetting" for name in (
        "cf_retrain", "cf_ft", "cf_l2", "cf_ewc", "cf_mas", "cf_lwf", "cf_der", "cf_der_pp",
        "cf_fdr", "cf_scrub", "cf_scrub_s", "cf_lirf")},
}

# Methods measured against each other (`python -m kswap_jax.compare`), and the headline
# metrics of each family's leaderboard (keys of a results envelope's "final").
FAMILIES = {
    "knowledge_swap": ("lbf", "laf"),
    "continual_forgetting": ("gs_lora", "gs_lora_pp", "cf_retrain", "cf_ft", "cf_l2", "cf_ewc",
                             "cf_mas", "cf_lwf", "cf_der", "cf_der_pp", "cf_fdr", "cf_scrub",
                             "cf_scrub_s", "cf_lirf"),
    "unlearning": ("sfr_on", "ug_clu", "clu_joint", "clu_retrain", "clu_ft", "clu_ga",
                   "clu_rl", "clu_salun", "clu_l1_sparse"),
}
HEADLINES = {
    "knowledge_swap": ("acc_r", "acc_f", "acc_n", "h_mean"),
    "continual_forgetting": ("h_mean", "acc_r", "acc_f", "acc_o"),
    # avg_gap: the last unlearning stage's; avg_gap_mean: over every unlearning stage.
    "unlearning": ("ua", "ra", "ta", "mia_efficacy", "avg_gap", "avg_gap_mean"),
}


def get(name: str):
  """The module implementing method `name`; ConfigError lists the known ones."""
  if name not in METHODS:
    raise ConfigError(f"method: unknown method {name!r} (expected one of "
                      f"{', '.join(sorted(METHODS))}; a method registered by a config file "
                      f"of your own exists once that file is loaded: --config=FILE)")
  module = METHODS[name]
  return importlib.import_module(module) if isinstance(module, str) else module


def register(name: str, module, family: str | None = None) -> None:
  """Adds method `name`, implemented by `module`, to `METHODS` (and to comparison `family`,
  a key of `FAMILIES`, so that `compare` runs it with the family's methods and the family's
  config files set up its sections). For methods outside this package: a config file (or
  any code) calls it before the run, e.g. `methods.register("lbf_ga",
  os.path.join(os.path.dirname(__file__), "lbf_ga.py"), family="knowledge_swap")`.
  Registering the same module again (a config file is read once per use) changes nothing.

  Args:
    name: the method's name, as `config.method` gives it: lower-case letters, digits and
      underscores, starting with a letter.
    module: an imported module, an import path ("my_package.lbf_ga"), or the path of a
      `.py` file (imported once per process, as module `kswap_jax_methods_<name>`).
    family: None, or the comparison family it joins (one at most).

  Raises:
    ConfigError: a malformed name, a name taken by another module, an unknown family or
      another family than the method's, a module that cannot be imported or lacks `run`
      and `sections` (docs/adding_a_method.md).
  """
  where = f"methods.register({name!r})"
  if not isinstance(name, str) or not re.fullmatch(r"[a-z][a-z0-9_]*", name):
    raise ConfigError(f"{where}: expected a name of lower-case letters, digits and "
                      f"underscores, starting with a letter")
  if family is not None and family not in FAMILIES:
    raise ConfigError(f"{where}: unknown family {family!r} (expected one of "
                      f"{', '.join(FAMILIES)})")
  joined = family_of(name)
  if family is not None and joined not in (None, family):
    raise ConfigError(f"{where}: already a member of the {joined} family, not {family}")
  is_file = isinstance(module, (str, os.PathLike)) and os.fspath(module).endswith(".py")
  if name in METHODS:  # the same module again is fine; another one takes a taken name
    registered = get(name)
    where_from = getattr(registered, "__file__", None)
    same = (bool(where_from) and os.path.realpath(os.fspath(module)) == os.path.realpath(
        where_from) if is_file else
            module == registered.__name__ if isinstance(module, str) else module is registered)
    if not same:
      raise ConfigError(f"{where}: the name is taken by {where_from or registered.__name__}; "
                        f"choose another")
    if family is not None and registered.__name__.startswith("kswap_jax."):
      raise ConfigError(f"{where}: a method of the library joins no other family")
    module = registered
  elif is_file:
    module = _import_file(name, os.fspath(module))
  elif isinstance(module, str):
    try:
      module = importlib.import_module(module)
    except ImportError as e:
      raise ConfigError(f"{where}: cannot import {module!r} ({e}); put its folder on "
                        f"PYTHONPATH or pass the .py file's path") from None
    except Exception as e:  # noqa: BLE001 - the user's package
      raise ConfigError(f"{where}: importing {module!r}: {type(e).__name__}: {e}") from None
  elif not isinstance(module, types.ModuleType):
    raise ConfigError(f"{where}: expected a module, an import path or a .py file's path, "
                      f"got {module!r}")
  missing = [f for f in ("run", "sections") if not callable(getattr(module, f, None))]
  if missing:
    raise ConfigError(f"{where}: {module.__name__} has no {' and no '.join(missing)} "
                      f"function (a method module provides run(config, workdir) and "
                      f"sections())")
  METHODS[name] = module
  if family is not None and name not in FAMILIES[family]:
    FAMILIES[family] = FAMILIES[family] + (name,)


def _import_file(name: str, path: str):
  """The module of the `.py` file at `path`, imported as `kswap_jax_methods_<name>`."""
  path = os.path.abspath(path)
  if not os.path.isfile(path):
    raise ConfigError(f"methods.register({name!r}): {path}: no such file")
  key = f"kswap_jax_methods_{name}"
  spec = importlib.util.spec_from_file_location(key, path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[key] = module  # while it runs too: dataclasses look their module up there
  try:
    spec.loader.exec_module(module)
  except Exception as e:  # noqa: BLE001 - the user's file
    sys.modules.pop(key, None)
    raise ConfigError(f"methods.register({name!r}): {path}: {type(e).__name__}: {e}") from None
  return module


def default_config(name: str) -> ml_collections.ConfigDict:
  """The shared base config plus the sections method `name` owns, with `method = name`."""
  from kswap_jax.config import base_config  # pylint: disable=import-outside-toplevel
  config = base_config()
  config.method = name
  for section, fields in get(name).sections().items():
    config[section] = fields
  return config


def family_config(name: str) -> ml_collections.ConfigDict:
  """`default_config(name)` plus the sections of every method of its comparison family, so
  one config file can set them all and `python -m kswap_jax.compare` runs the family on it."""
  config = default_config(name)
  for family in FAMILIES.values():
    if name in family:
      for other in family:
        for section, fields in get(other).sections().items():
          if section not in config:
            config[section] = fields
  return config


# A shipped config file that sets up each family (named in errors about a config that does
# not set up its method).
FAMILY_CONFIGS = {"knowledge_swap": "configs/demo.py",
                  "continual_forgetting": "configs/gs_lora_digits.py",
                  "unlearning": "configs/ug_clu_digits.py"}


def family_of(name: str) -> str | None:
  """The comparison family (a key of `FAMILIES`) method `name` belongs to, if any."""
  return next((f for f, members in FAMILIES.items() if name in members), None)


def sections_used(name: str) -> dict[str, ml_collections.ConfigDict]:
  """The sections (with their defaults) method `name` reads: all its module's, unless the
  module says which ones each variant reads (`sections_used`)."""
  module = get(name)
  own = module.sections()
  if hasattr(module, "sections_used"):
    return {s: own[s] for s in module.sections_used(name)}
  return own


def reads_field(name: str, field: str) -> bool:
  """Whether method `name`'s results may depend on config `field` (dotted): a field of the
  shared base or of a section it reads (`sections_used`), unless its module lists it in
  `fields_unread(name)` (a field, or "prefix.*" for all of a section or sub-section, itself
  included). `compare --sweep` runs a method once over the fields it does not read."""
  from kswap_jax.config import base_config  # pylint: disable=import-outside-toplevel
  section = field.split(".")[0]
  if section not in base_config() and section not in sections_used(name):
    return False
  return not any(field == path or field.startswith(path + ".") for path in unread_fields(name))


def unread_fields(name: str) -> tuple[str, ...]:
  """The dotted paths of the module's `fields_unread(name)`, each a field or a whole
  sub-tree ("prefix.*" is the sub-tree "prefix"); none for a module without it or a method
  not registered in this process."""
  try:
    module = get(name)
  except ConfigError:
    return ()
  listed = module.fields_unread(name) if hasattr(module, "fields_unread") else ()
  return tuple(path.removesuffix(".*") for path in listed)


def unread_sections(record: dict) -> set[str]:
  """The top-level sections of a config record (a config as JSON) that its method does not
  read: neither the shared base's nor the method's own (`sections_used`); none for a
  method not registered in this process. Records are compared without them, so a section
  added for a new method of the family, or changed for another method, does not make an
  existing run of this one refuse to resume, nor two runs differ in `report`."""
  from kswap_jax.config import base_config  # pylint: disable=import-outside-toplevel
  try:
    read = set(base_config()) | set(sections_used(str(record.get("method"))))
  except ConfigError:  # an unknown method: compare everything
    return set()
  return {k for k in record if k not in read}


def check_sections(config: ml_collections.ConfigDict, only: tuple[str, ...] | None = None
                   ) -> None:
  """`config` has every section and field that `config.method` reads (`only`: of these
  sections); a config set up for another method, with `--config.method` changed, has not.

  Raises:
    ConfigError: naming the method, the first missing fields and how to choose a config
      that has them.
  """
  name = str(config.method)
  missing: list[str] = []

  def walk(ref, got, path):
    for key, value in ref.items():
      if key not in got:
        missing.append(path + key)
      elif isinstance(value, ml_collections.ConfigDict) and hasattr(got[key], "items"):
        walk(value, got[key], f"{path}{key}.")

  for section, fields in sections_used(name).items():
    if only is not None and section not in only:
      continue
    if section not in config:
      missing.append(section)
    else:
      walk(fields, config[section], section + ".")
  if missing:
    shown = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
    example = FAMILY_CONFIGS.get(family_of(name) or "")
    where = f" (e.g. --config={example}:method={name})" if example else ""
    raise ConfigError(f"method: {name!r} needs config fields this config does not set up "
                      f"({shown}); choose the method with the `method=` arg of a config file "
                      f"that sets it up{where}, build the config file on "
                      f"methods.family_config, or start from methods.default_config({name!r})")


def check_seeds(config: ml_collections.ConfigDict, path: str = "") -> None:
  """Every `seed` / `*_seed` field is None or an int >= 0 (numpy and grain refuse others)."""
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      check_seeds(value, f"{path}{key}.")
    elif (key == "seed" or key.endswith("_seed")) and value is not None:
      require_int(value, f"{path}{key}")


# The shared sections' counts: (section, field, least value allowed).
_COUNTS = (("eval", "every_steps", 0), ("train", "log_every_steps", 1),
           ("train", "checkpoint_every_steps", 0), ("train", "max_checkpoints_to_keep", 1),
           ("pretrain", "epochs", 1), ("pretrain", "warmup_epochs", 0),
           ("pretrain", "batch_size", 1))


def check_counts(config: ml_collections.ConfigDict, path: str = "") -> None:
  """The shared sections' counts are ints in range (a negative `eval.every_steps` would
  evaluate at the wrong iterations, a zero `train.log_every_steps` divide by zero, negative
  `pretrain.epochs` train nothing), and every AdamW section (one with b1 and b2, e.g.
  `optim`, `pretrain.optim`) has lr > 0, b1 and b2 in [0, 1), eps > 0, weight_decay >= 0."""
  if not path:
    for section, key, least in _COUNTS:
      if section in config and key in config[section]:
        require_int(config[section][key], f"{section}.{key}", least)
  if "b1" in config and "b2" in config:
    for key, ok, expected in (("lr", lambda v: v > 0, "> 0"),
                              ("min_lr", lambda v: v >= 0, ">= 0"),
                              ("b1", lambda v: 0 <= v < 1, "in [0, 1)"),
                              ("b2", lambda v: 0 <= v < 1, "in [0, 1)"),
                              ("eps", lambda v: v > 0, "> 0"),
                              ("weight_decay", lambda v: v >= 0, ">= 0")):
      value = config.get(key, None)
      if key in config and (isinstance(value, bool) or not isinstance(value, (int, float))
                            or not ok(value)):
        raise ConfigError(f"{path}{key}: expected a number {expected}, got {value!r}")
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      check_counts(value, f"{path}{key}.")


def run(config: ml_collections.ConfigDict, workdir: str, dry_run: bool = False) -> dict | None:
  """Runs `config.method` in `workdir` and returns its results envelope.

  The config is checked first (its method's sections, seeds, step counts, the files `init`
  names, a shared pretrained model's config), so bad input costs seconds; folders a failed
  attempt created and left empty are removed. The run works on a copy: `config` is left as
  given (a default it fills in, such as `init.pretrain_workdir`, is not carried into the
  caller's next run).

  With `dry_run` the method stops where it would first write to `workdir`, after every
  check it makes before that (also the data it reads, the model's shapes, the LoRA
  targets, the batch sizes against the devices and a workdir's config record); nothing is
  written or trained, and None is returned. A ConfigError is raised as in a run.
  """
  config = (ml_collections.ConfigDict(config) if isinstance(config, dict)
            else copy.deepcopy(config))
  from kswap_jax import train  # pylint: disable=import-outside-toplevel
  train.check_writable(workdir)
  _check_recorded_method(config, workdir)
  check(config)
  from kswap_jax.methods import pretrain  # pylint: disable=import-outside-toplevel
  pretrain.check_pretrained(config, workdir)
  existing = _folders(workdir)
  above = os.path.abspath(workdir)  # the nearest folder that exists: none above it is new
  while not os.path.exists(above) and os.path.dirname(above) != above:
    above = os.path.dirname(above)
  try:
    with train.dry_run(dry_run):
      return get(str(config.method)).run(config, workdir)
  except DryRunComplete as done:
    import jax  # pylint: disable=import-outside-toplevel
    note = pretrain.dry_run_note(config, workdir)
    log.info("dry run: %s passed every check a run makes before it writes (config, data, "
             "model shapes, batch sizes for %d device(s)); %s%s; nothing written",
             config.method, jax.device_count(),
             f"{done.workdir} holds a finished run of this config (the command rewrites "
             f"its results)" if done.finished else
             f"{done.workdir} holds a run of this config, which the command resumes"
             if done.resumes else f"the run would start afresh in {done.workdir}", note)
    return None
  except (ConfigError, NonFiniteLossError):  # nothing to resume: no empty folders left
    train.close_runs_under(workdir)  # orbax's background clean-up would list removed folders
    _remove_new_empty_folders(workdir, existing)
    parent = os.path.dirname(os.path.abspath(workdir))
    while len(parent) > len(above):  # the workdir's parents the run created, when empty
      try:
        os.rmdir(parent)
      except OSError:
        break
      parent = os.path.dirname(parent)
    raise


def check(config: ml_collections.ConfigDict) -> None:
  """The checks `run` makes of a config before it looks at a workdir: its method's sections,
  every seed, the shared sections' counts, the files `init` names, the method's own
  `validate`, and an `.npz` checkpoint's shapes against the model (`python -m
  kswap_jax.config --config=...` makes them too). Data, the model's own fields and LoRA
  are checked when the method starts.

  Raises:
    ConfigError: naming the first field that fails.
  """
  from kswap_jax.methods import common  # pylint: disable=import-outside-toplevel
  check_sections(config)
  check_seeds(config)
  check_counts(config)
  common.check_init_files(config)
  from kswap_jax.methods import pretrain  # pylint: disable=import-outside-toplevel
  pretrain.check_head(config)
  module = get(str(config.method))
  if hasattr(module, "validate"):
    module.validate(config)
  common.check_init_checkpoint(config)  # after the config-only checks: reads the file


def _check_recorded_method(config: ml_collections.ConfigDict, workdir: str) -> None:
  """A workdir that holds another method's run is reported as such before anything else
  about it (a shared pretrained model's config, the full config comparison)."""
  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    return
  try:
    with open(path) as f:
      method = json.load(f).get("method")
  except (OSError, ValueError, AttributeError):
    return  # the full comparison, later, reports an unreadable record
  if method is not None and method != str(config.method):
    raise ConfigError(f"--workdir {workdir}: holds a run of method {method!r}, not "
                      f"{str(config.method)!r}; use a new --workdir or delete this one")


def _folders(root: str, depth: int = 2) -> set[str]:
  """`root` and the folders under it, `depth` levels down (a run makes its folders there:
  checkpoints/, pretrain/checkpoints/, oracle/...); not the whole tree, which can be large."""
  out = set()
  if os.path.isdir(root):
    out.add(os.path.join(root, ""))
    if depth > 0:
      with os.scandir(root) as entries:
        for e in entries:
          if e.is_dir(follow_symlinks=False):
            out |= _folders(e.path, depth - 1)
  return out


def _remove_new_empty_folders(root: str, existing: set[str]) -> None:
  """Removes the folders under `root` (itself included) created since `existing` was taken
  that hold nothing: a run refused after it started leaves no empty workdir behind."""
  for folder in sorted(_folders(root) - existing, key=len, reverse=True):
    try:
      os.rmdir(folder)
    except OSError:
      pass  # not empty, or removed by another process
