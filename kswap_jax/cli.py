"""Command line: parse flags, load the config, dispatch to a method. Nothing else."""

from __future__ import annotations

import logging
import os
import re
import sys

from absl import flags
from ml_collections import config_flags

from kswap_jax.errors import ConfigError, NonFiniteLossError

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                              "configs", "demo.py")
METHODS = ("pretrain", "lbf", "laf")

FLAGS = flags.FlagValues()
config_flags.DEFINE_config_file("config", DEFAULT_CONFIG, "Config file[:arg].",
                                lock_config=True, flag_values=FLAGS)
flags.DEFINE_string("workdir", None, "Output directory (default ./workdir/<config-name>).",
                    flag_values=FLAGS)


def default_workdir(config_spec: str) -> str:
  path, _, arg = config_spec.partition(":")
  name = os.path.splitext(os.path.basename(path))[0]
  if arg:
    name += "_" + re.sub(r"[^A-Za-z0-9.=-]+", "_", arg)
  return os.path.join("workdir", name)


def dispatch(config, workdir: str) -> dict:
  """Runs `config.method` in `workdir`; the functional entry point for user code."""
  method = config.method
  if method not in METHODS:
    raise ConfigError(f"method: unknown method {method!r} (expected one of {', '.join(METHODS)})")
  if method == "pretrain":
    from kswap_jax.methods import pretrain  # pylint: disable=import-outside-toplevel
    return pretrain.run(config, workdir)
  from kswap_jax.methods import knowledge_swap  # pylint: disable=import-outside-toplevel
  with config.unlocked():
    if config.init.kind == "pretrain" and not config.init.pretrain_workdir:
      config.init.pretrain_workdir = os.path.join(workdir, "pretrain")
  return knowledge_swap.run(config, workdir)


def _config_spec(argv) -> str:
  for a in argv[1:]:
    if a.startswith("--config="):
      return a.split("=", 1)[1]
  return DEFAULT_CONFIG


def main(argv=None) -> int:
  argv = list(sys.argv if argv is None else argv)
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S",
                      stream=sys.stdout, force=True)
  logging.getLogger("absl").setLevel(logging.WARNING)
  try:
    try:
      FLAGS(argv)
      config = FLAGS.config
    except ConfigError:
      raise
    except (flags.Error, Exception) as e:  # noqa: BLE001 - config files/overrides are user input
      cause = e.__cause__ or e.__context__
      if isinstance(cause, ConfigError):
        raise cause from None
      msg = str(e).splitlines()[0] if str(e) else type(e).__name__
      raise ConfigError(f"--config: {msg}") from None
    workdir = FLAGS.workdir or default_workdir(_config_spec(argv))
    dispatch(config, workdir)
  except ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except NonFiniteLossError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  return 0
