"""Command line: parse flags, load the config, dispatch to a method. Nothing else."""

from __future__ import annotations

import difflib
import logging
import os
import re
import sys

import jax
from absl import flags
from ml_collections import config_flags

from kswap_jax.errors import ConfigError, NonFiniteLossError, StopRequested

from kswap_jax import config as config_lib
from kswap_jax import hostmem, methods, train

log = logging.getLogger(__name__)


DEFAULT_CONFIG = os.path.join(config_lib.configs_folder(), "demo.py")


def _define_flags() -> flags.FlagValues:
  # Defined per call: config_flags scans sys.argv for overrides when the flag is defined,
  # so this must run inside the error handling of `load_config`.
  values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", DEFAULT_CONFIG, "Config file[:arg].",
                                  lock_config=True, flag_values=values)
  flags.DEFINE_string("workdir", None, "Output directory (default ./workdir/<config-name>).",
                      flag_values=values)
  return values


_FLAGS_HELP = """\
  --config=FILE[:ARG]   a config file with get_config(arg=None), default configs/demo.py;
                        a shipped config also by name (--config=gs_lora_digits:runlocal).
                        ARG is comma-separated key=value pairs the file documents.
  --workdir=DIR         where checkpoints, metrics.jsonl and results.json go
                        (default ./workdir/<config name>[_<arg>]{suffix}). Rerunning the same
                        command in it resumes from its newest checkpoint.
  --config.FIELD=VALUE  overrides one field, e.g. --config.ks.beta=0.3 (anywhere on the
                        line; a boolean field alone means true). Print the config a
                        command line gives: python -m kswap_jax.config --config=FILE[:ARG]
                        [--config.FIELD=VALUE ...]; a method's fields and defaults:
                        python -m kswap_jax.config METHOD
{more}
Bad input exits with code 2 and one `error:` line on stderr.
"""


def usage(command: str = "python run.py", extra: str = "(or kswap-run with the same flags)",
          more: str = "", workdir_suffix: str = "") -> str:
  """The usage text of a command that takes the config flags (`extra`: its own flags, one
  line; `more`: their help lines; `workdir_suffix`: appended to the default workdir)."""
  return (f"usage: {command} [--config=FILE[:ARG]] [--workdir=DIR] [--config.FIELD=VALUE ...]\n"
          f"       {extra}\n\n" + _FLAGS_HELP.format(suffix=workdir_suffix, more=more))


def wants_help(argv, text: str | None = None) -> bool:
  """Prints `text` (default: run.py's `usage()`) and returns True when argv asks for help
  (-h, --help, --helpfull)."""
  if any(a in ("-h", "--help", "--helpfull") for a in argv[1:]):
    print(text or usage())
    return True
  return False


def default_workdir(config_spec: str) -> str:
  path, _, arg = config_spec.partition(":")
  name = os.path.splitext(os.path.basename(path))[0]
  if arg:
    name += "_" + re.sub(r"[^A-Za-z0-9.=-]+", "_", arg)
  return os.path.join("workdir", name)


def dispatch(config, workdir: str, dry_run: bool = False) -> dict | None:
  """Runs `config.method` in `workdir` (`methods.run`, `dry_run` included)."""
  return methods.run(config, workdir, dry_run=dry_run)


def _config_spec(argv) -> str:
  """FILE[:ARG] of the last `--config=` (the one absl keeps), else the default config."""
  specs = [a.split("=", 1)[1] for a in argv[1:] if a.startswith("--config=")]
  return specs[-1] if specs else DEFAULT_CONFIG


def _resolve_shipped(argv) -> list[str]:
  """`--config=gs_lora_digits.py[:arg]` (or without `.py`) names a shipped config when no
  such file exists relative to the working directory, so installed users need no checkout."""
  out = []
  for a in argv:
    if a.startswith("--config="):
      path, sep, arg = a[len("--config="):].partition(":")
      if not os.path.exists(path):
        name = path if path.endswith(".py") else path + ".py"
        shipped = os.path.join(config_lib.configs_folder(), os.path.basename(name))
        if os.path.isfile(shipped) and os.path.dirname(path) in ("", "configs"):
          a = f"--config={shipped}{sep}{arg}"
    out.append(a)
  return out


def _joined(argv) -> list[str]:
  """absl's space forms `--config FILE`, `--workdir DIR` and `--config.FIELD VALUE` as
  `--flag=value`, the form read below. A `--config.FIELD` followed by another flag (or
  nothing) is left alone: it is a boolean field's `True`, or a missing value that
  `_bare_overrides` reports once the field's type is known.

  Raises:
    ConfigError: `--config` or `--workdir` without a value.
  """
  out, i = argv[:1], 1
  while i < len(argv):
    a, following = argv[i], argv[i + 1] if i + 1 < len(argv) else None
    name, eq, value = a.lstrip("-").partition("=")
    ours = a.startswith("-") and (name in ("config", "workdir") or name.startswith("config."))
    if ours and eq:  # absl's single-dash form too
      out.append(f"--{name}={value}")
    elif ours and following is not None and not _is_flag(following):
      out.append(f"--{name}={following}")
      i += 1
    elif ours and name in ("config", "workdir"):
      expected = "FILE[:ARG]" if name == "config" else "DIR"
      raise ConfigError(f"--{name}: expected a value (--{name}={expected})")
    else:
      out.append(a)
    i += 1
  return out


def normalised(argv) -> list[str]:
  """A command line with absl's space forms joined (`--config.FIELD VALUE` as
  `--config.FIELD=VALUE`, `--workdir DIR`, ...), as `load_config` reads it."""
  return _joined(list(argv))


def _is_flag(arg: str) -> bool:
  """Whether `arg` is a flag rather than a value (a negative number is a value)."""
  if not arg.startswith("-"):
    return False
  try:
    float(arg)
  except ValueError:
    return True
  return False


def workdir_given(argv) -> bool:
  """Whether the command line names a workdir (in any of absl's forms)."""
  return any(a.startswith("--workdir=") for a in normalised(argv))


def _in_order(argv) -> list[str]:
  """The last `--config=` first, then the other flags, each override once (its last value):
  absl reads overrides only after a config file and fails on a second `--config=`
  followed by an override, and ml_collections would join a tuple field's repeated values,
  while the file and the values given last are the ones used, wherever they stand."""
  specs = [a for a in argv[1:] if a.startswith("--config=")]
  rest = [a for a in argv[1:] if not a.startswith("--config=")]
  name = lambda a: a.split("=", 1)[0] if a.startswith("--config.") and "=" in a else None
  last = {name(a): i for i, a in enumerate(rest) if name(a)}
  return argv[:1] + specs[-1:] + [a for i, a in enumerate(rest)
                                  if name(a) is None or last[name(a)] == i]


def _bare_overrides(argv, config) -> None:
  """A `--config.FIELD` without a value is only a boolean field's `True`.

  Raises:
    ConfigError: naming the first such flag whose field is not a boolean.
  """
  for a in argv[1:]:
    if a.startswith("--config.") and "=" not in a:
      node = config
      for key in a[len("--config."):].split("."):
        node = node.get(key) if hasattr(node, "get") else None
      if not isinstance(node, bool):
        raise ConfigError(f"{a}: expected a value ({a}=VALUE)")


# An unquoted comma list, optionally in one pair of brackets: "cat,dog", "(cat,5)"; and
# such lists in brackets, two or more or inside one more pair: "(cat,dog),(eel,)".
_UNQUOTED_LIST = re.compile(r"^\(?([^()\[\]{}'\"]*,[^()\[\]{}'\"]*)\)?$")
_GROUP = r"\(([^()\[\]{}'\"]*)\)"
_UNQUOTED_GROUPS = re.compile(rf"^(?:{_GROUP}\s*,\s*)+{_GROUP}\s*,?$|^\((?:{_GROUP}\s*,?\s*)+\)$")


def _int_or_text(item: str):
  from kswap_jax.data import splits  # pylint: disable=import-outside-toplevel
  number = splits.as_id(item)
  return item if number is None else number


def _comma_lists(argv, config) -> None:
  """`--config.FIELD=cat,dog` for a tuple field: ml_collections keeps a list with an item
  that is not a Python literal (a class name) as one string, ('cat,dog',); it becomes the
  tuple of its items, an item that reads as an int an int (`--config.FIELD=cat,5` ->
  ('cat', 5)), as `--config.FIELD=1,2` gives (1, 2), so the config, its record and a sweep
  see one spelling. Lists in brackets, `--config.tasks.forget_classes=(cat,dog),(eel,)`,
  become a tuple of tuples (('cat', 'dog'), ('eel',))."""
  items = lambda text: tuple(_int_or_text(t.strip()) for t in text.split(",") if t.strip())
  seen = set()
  for a in reversed(argv[1:]):  # the last of a repeated flag is the value used
    if not a.startswith("--config.") or "=" not in a:
      continue
    field, value = a[len("--config."):].split("=", 1)
    if field in seen:
      continue
    seen.add(field)
    *parents, leaf = field.split(".")
    node = config
    for key in parents:
      node = node.get(key) if hasattr(node, "get") else None
    if not hasattr(node, "get") or node.get(leaf) != (value,):
      continue  # not a tuple field, or a value Python read
    match = _UNQUOTED_LIST.match(value)
    if match:
      node[leaf] = items(match.group(1))
    elif _UNQUOTED_GROUPS.match(value.strip()):
      node[leaf] = tuple(items(group) for group in re.findall(_GROUP, value))


# The module name ml_collections loads a config file under (`<flag>_config`). It loads with
# the deprecated `load_module`, which re-executes an existing module in place: a second file
# loaded in this process would keep the first one's names (its get_config among them).
_CONFIG_MODULE = "config_config"


def load_config(argv, own_flags: tuple[str, ...] = ()):
  """Parses flags and returns (config, workdir); every failure becomes a one-line ConfigError.

  `argv` is a command line (the program name first), without the command's own flags
  (`own_flags`, e.g. "--dry_run", "--seeds=0,1,...": an unknown flag's error lists them
  and suggests the nearest). ml_collections' config flag reads overrides from `sys.argv`,
  which is set to the normalised `argv` while it parses and restored afterwards."""
  argv = _resolve_shipped(_joined(argv))
  _check_config_file(argv)
  sys.modules.pop(_CONFIG_MODULE, None)
  ordered = _in_order(argv)
  saved, sys.argv = sys.argv, ordered  # ml_collections scans sys.argv for overrides
  try:
    values = _define_flags()
    rest = values(ordered)
    config = values.config
    config.method  # pylint: disable=pointless-statement  # forces the lazy file load
  except Exception as e:  # noqa: BLE001 - config files and overrides are user input
    raise _as_config_error(e, ordered, own_flags) from None
  finally:
    sys.argv = saved
  _bare_overrides(argv, config)
  _comma_lists(argv, config)
  _warn_repeated(argv)
  if len(rest) > 1:  # absl leaves the program name and the arguments that are not flags
    hint = f"; did you mean --config={rest[1]}?" if rest[1].split(":")[0].endswith(".py") else ""
    raise ConfigError(f"unexpected argument {rest[1]!r}: every argument is a flag "
                      f"(--config=FILE[:ARG], --workdir=DIR, --config.FIELD=VALUE){hint}")
  return config, values.workdir or default_workdir(_config_spec(argv))


def _check_config_file(argv) -> None:
  """Raises ConfigError when the config file does not exist, with the shipped configs' names."""
  path = _config_spec(argv).split(":")[0]
  if os.path.isfile(path):
    return
  shipped = config_lib.shipped_configs()
  close = difflib.get_close_matches(os.path.splitext(os.path.basename(path))[0], shipped, 1)
  hint = f"; did you mean --config={close[0]}?" if close else ""
  what = "is a folder" if os.path.isdir(path) else "does not exist"
  raise ConfigError(f"--config: {path!r} {what} (expected a Python file with "
                    f"get_config(arg=None), or a shipped config: {', '.join(shipped)}){hint}")


def _warn_repeated(argv) -> None:
  """A flag given twice keeps its last value (absl's rule, handy for appending overrides
  to a base command; `_in_order` keeps it for tuple fields too); a warning names the flag
  and the value used, so it is no surprise."""
  given: dict[str, list[str]] = {}
  for a in argv[1:]:
    if a.startswith("-") and "=" in a:
      name, value = a.split("=", 1)
      given.setdefault(name.lstrip("-"), []).append(value)
  for name, values in given.items():
    if len(values) > 1 and len(set(values)) > 1:
      log.warning("warning: --%s given %d times (%s); the last, %s, is used", name,
                  len(values), ", ".join(values), values[-1])


def _as_config_error(error: BaseException, argv, own_flags: tuple[str, ...] = ()
                     ) -> ConfigError:
  chain, e, hint = [], error, ""
  while e is not None and len(chain) < 20:
    chain.append(e)
    e = e.__cause__ or e.__context__
  # Our own ConfigError raised inside a config file: ml_collections wraps it in a copy whose
  # message is a traceback, so take the innermost one.
  ours = [x for x in chain if isinstance(x, ConfigError) and "Traceback" not in str(x)]
  if ours:
    return ours[-1]
  for i, a in enumerate(argv[1:], 1):  # a bare --config.FIELD that absl gave the next flag to
    following = argv[i + 1] if i + 1 < len(argv) else None
    if a.startswith("--config.") and "=" not in a and (
        any(isinstance(x, StopIteration) for x in chain) if following is None else
        repr(following) in str(chain[-1])):
      return ConfigError(f"{a}: expected a value ({a}=VALUE)")
  bad_field = None
  if isinstance(error, flags.UnrecognizedFlagError):
    bad_field = str(error.flagname)
  elif any(isinstance(x, KeyError) for x in chain):
    # ml_collections' message: "'key'", or "'key'\nDid you mean "other" instead of "key"?"
    lines = str(next(x for x in chain if isinstance(x, KeyError)).args[0]).splitlines()
    key = lines[0].strip("'\"") if lines else ""
    hint = next(("; did" + line.strip()[3:] for line in lines[1:]
                 if line.strip().startswith("Did you mean")), "")
    bad_field = next((a[2:].split("=", 1)[0] for a in argv[1:]
                      if a.startswith("--config.") and ("." + key + ".") in
                      (a.split("=", 1)[0] + ".")), None) if key else None
  if bad_field and bad_field != "config" and not bad_field.startswith("config."):
    said = str(error)
    names = [f.split("=")[0] for f in own_flags]
    close = difflib.get_close_matches(f"--{bad_field}", names, n=1, cutoff=0.7)
    hint = (f"; did you mean {close[0]}?" if close else
            f"; did you mean --{said.split('Did you mean:', 1)[1].strip(' ?')}?"
            if "Did you mean:" in said else "")
    expected = ["--config=FILE[:ARG]", "--workdir=DIR", "--config.FIELD=VALUE", *own_flags]
    return ConfigError(f"--{bad_field}: unknown flag (expected {', '.join(expected[:-1])} "
                       f"or {expected[-1]}){hint}")
  if bad_field and bad_field.startswith("config."):
    value = next((a.split("=", 1)[1] for a in argv[1:] if a.startswith(f"--{bad_field}=")), None)
    what, fields = _missing_in_file(argv, bad_field.split(".")[1:])
    if what:
      return ConfigError(f"--{bad_field}: {what}{hint} (its fields: {fields})")
    return ConfigError(f"--{bad_field}: unknown config field or a value of the wrong type "
                       f"({value!r}){hint}; list the fields and defaults with: "
                       f"python -m kswap_jax.config METHOD")
  for flag, eq, value in (a[2:].partition("=") for a in argv[1:] if a.startswith("--config.")):
    if eq and not value and f"flag --{flag}=:" in str(error):  # absl names the flag it refused
      return ConfigError(f"--{flag}: expected a value after '=' (--{flag}=VALUE)")
    if value and any(isinstance(x, ValueError) and repr(value) in str(x) for x in chain):
      reason = str(chain[-1]).splitlines()[0]
      if "Non-boolean argument" in reason:
        return ConfigError(f"--{flag}: cannot use {value!r} (expected true or false)")
      items = _UNQUOTED_LIST.match(value)
      parts = [t.strip() for t in items.group(1).split(",") if t.strip()] if items else []
      quoted = ("(" + ",".join(repr(_int_or_text(t)) for t in parts) + ")"
                if parts and all(re.fullmatch(r"[\w.+-]+", t) for t in parts) else "('a','b')")
      hint = (f" (a tuple is written as Python, its strings quoted: --{flag}=\"{quoted}\", "
              f"quoted for the shell)" if "," in value and (
                  "syntax" in reason or "as tuple" in reason or "literal" in reason) else "")
      return ConfigError(f"--{flag}: cannot use {value!r} ({reason}){hint}")
  path = _config_spec(argv).split(":")[0]
  if any(isinstance(x, OSError) for x in chain):
    return ConfigError(f"--config: cannot load config file {path!r} "
                       f"(expected a Python file with get_config(arg=None))")
  if any(isinstance(x, AttributeError) and "get_config" in str(x) for x in chain):
    return ConfigError(f"--config: {path} has no get_config(arg=None) function")
  msg = str(chain[-1]).strip().splitlines()
  text = msg[-1] if msg else type(chain[-1]).__name__
  line = _line_in(path, chain)
  if line:  # an error raised by the config file's own code
    return ConfigError(f"--config: {path}, line {line}: {type(chain[-1]).__name__}: {text}")
  return ConfigError(f"--config: {text}")


def _missing_in_file(argv, field: list[str]) -> tuple[str, str]:
  """Why `field` (a path of keys) is not in the config the file builds, when a section on
  its path lacks the next key: ("this config's data.old has no field 'name'", "kind, seed,
  ..."). ("", "") when the file's config cannot be built or the field is there."""
  try:
    import importlib.util  # pylint: disable=import-outside-toplevel
    file, _, arg = _config_spec(argv).partition(":")
    spec = importlib.util.spec_from_file_location("_kswap_config_file", file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    node, path = module.get_config(arg or None), []
    for key in field:
      if not hasattr(node, "keys"):
        break
      if key not in node:
        where = f"this config's {'.'.join(path)}" if path else "this config"
        return f"{where} has no field {key!r}", ", ".join(sorted(node.keys()))
      node, path = node[key], path + [key]
  except Exception:  # noqa: BLE001 - only a better message; the caller has a plain one
    pass
  return "", ""


def _line_in(path: str, chain: list[BaseException]) -> int | None:
  """The line of the config file `path` in the innermost traceback that passes through it."""
  import traceback  # pylint: disable=import-outside-toplevel
  target = os.path.realpath(path)
  for e in reversed(chain):
    frames = [f for f in traceback.extract_tb(e.__traceback__)
              if os.path.realpath(f.filename) == target]
    if frames:
      return frames[-1].lineno
  return None


INTERRUPTED = 130  # the exit status after Ctrl-C (128 + SIGINT, as a shell reports it)
_CUT_SHORT = [False]  # Ctrl-C raised where it landed (not a stop all processes agreed on)


def guarded(command) -> int:
  """Runs `command()` as a command-line program: our progress at INFO, libraries from
  WARNING (jax reports the TPU backend it did not find at INFO, normal on CPU and GPU
  machines); bad input -> one `error:` line and exit 2, a non-finite loss -> exit 1,
  a stop request (Ctrl-C or SIGTERM, `train.stop_on_signals`: the run stops after a
  checkpoint at its next step; several processes together) -> one line, exit 130; a second
  Ctrl-C (KeyboardInterrupt) -> pending checkpoint saves finish, one line, exit 130."""
  logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s",
                      datefmt="%H:%M:%S", stream=sys.stdout, force=True)
  logging.getLogger("kswap_jax").setLevel(logging.INFO)
  try:
    command()
  except ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except NonFiniteLossError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  except StopRequested as e:  # stopped at a step after its checkpoint (SIGTERM; processes)
    every = " (every process)" if jax.process_count() > 1 else ""
    print(f"interrupted: {e}; rerun the same command{every} to resume from it",
          file=sys.stderr)
    return INTERRUPTED
  except KeyboardInterrupt:
    _CUT_SHORT[0] = True
    try:
      train.finish_pending_saves()
    except KeyboardInterrupt:
      pass  # a second Ctrl-C: stop waiting
    print("interrupted: every finished checkpoint is kept; rerun the same command to resume "
          "from the last one", file=sys.stderr)
    return INTERRUPTED
  finally:
    train.restore_signals()
  return 0


def exit_program(code: int) -> None:
  """Ends a command-line program with `code`. After Ctrl-C (`INTERRUPTED`, pending saves
  already finished) a process that was cut short skips the interpreter's teardown: after
  an XLA compilation cut short it crashed (SIGSEGV), and in a multi-process run it waited
  for the others at the distributed runtime's shutdown (measured: still there after 120 s).
  Processes that stopped together (`errors.StopRequested`) keep it: it shuts the
  distributed runtime down cleanly."""
  if code == INTERRUPTED and (jax.process_count() == 1 or _CUT_SHORT[0]):
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # pylint: disable=protected-access
  sys.exit(code)


def console_main() -> None:
  """The `kswap-run` command: `main` after `hostmem.reexec_with_tunables`."""
  hostmem.reexec_with_tunables()
  exit_program(main())


DRY_RUN_HELP = """\
  --dry_run             make every check a run makes before it writes (the config, the data
                        it reads, the model's shapes, LoRA targets, batch sizes against this
                        machine's devices, the workdir's record, a pretraining it would run
                        first), print the plan, then stop: nothing is written or trained;
                        one process (distributed.* is not used)
"""


def pop_dry_run(argv) -> tuple[bool, list[str]]:
  """(whether argv asks for a dry run, argv without that flag): `--dry_run`, `-dry_run`,
  `--dry_run=true|false` or `--nodry_run`, as absl writes booleans.

  Raises:
    ConfigError: another value.
  """
  dry_run, rest = False, []
  for a in argv:
    name, eq, value = a.lstrip("-").partition("=")
    if a.startswith("-") and name in ("dry_run", "nodry_run"):
      if not eq:
        dry_run = name == "dry_run"
        continue
      if name == "dry_run" and value.lower() in ("true", "1", "false", "0"):
        dry_run = value.lower() in ("true", "1")
        continue
      raise ConfigError(f"--{name}: {value!r} (expected --dry_run, --dry_run=true or false)")
    rest.append(a)
  return dry_run, rest


def main(argv=None) -> int:
  argv = list(sys.argv if argv is None else argv)
  if wants_help(argv, usage(more=DRY_RUN_HELP)):
    return 0

  def command():
    dry_run, rest = pop_dry_run(argv)
    config, workdir = load_config(rest, own_flags=("--dry_run",))
    if not dry_run:  # a dry run is one process: it joins no distributed run
      log.info(hostmem.describe())
      train.initialize_distributed(config)
      train.stop_on_signals()
    dispatch(config, workdir, dry_run=dry_run)
  return guarded(command)
