"""Errors a user can fix: bad config, missing files, mismatched checkpoints.

`run.py` turns a `ConfigError` into one line on stderr and exit code 2, with no
traceback; everything else is a bug or a runtime failure and keeps its traceback.
"""

import argparse
import math
import numbers
import os
import sys
from typing import Callable


class ConfigError(ValueError):
  """Bad user input; the message names the field or file and what was expected."""


class NonFiniteLossError(RuntimeError):
  """Training produced a NaN/inf loss; the message names the stage and step."""


class StopRequested(KeyboardInterrupt):
  """A run stopped on request at a training step, its checkpoint written: SIGTERM to one
  process, or Ctrl-C / a preemption notice in a multi-process run (at a step all processes
  agreed on). The command line ends it as Ctrl-C (130)."""


class DryRunComplete(Exception):
  """A dry run (`methods.run(..., dry_run=True)`, `run.py --dry_run`) got to where the run
  would first write to its workdir: everything checked before that passed.

  Attributes:
    workdir: the run's workdir.
    resumes: whether the workdir already holds a run of this config (which the same
      command without the dry run continues).
    finished: whether that run has finished (a rerun only rewrites its results).
  """

  def __init__(self, workdir: str, resumes: bool, finished: bool = False):
    super().__init__(workdir)
    self.workdir, self.resumes, self.finished = workdir, resumes, finished


def require_number(value, field: str, kind=float, strict: bool = False):
  """`kind(value)` if `value` is a finite number (not a bool, not NaN or infinite) > 0
  (`strict`) or >= 0; else a ConfigError naming `field` (an infinite weight or bound would
  stop the run at its first step with an infinite loss)."""
  try:
    number = math.nan if isinstance(value, bool) else kind(value)
  except (TypeError, ValueError, OverflowError) as e:  # OverflowError: int(inf)
    what = "a finite number" if isinstance(e, OverflowError) else "a number"
    raise ConfigError(f"{field}: expected {what}, got {value!r}") from None
  if not (number > 0 if strict else number >= 0) or math.isinf(number):  # NaN fails both
    raise ConfigError(f"{field}: expected a {'finite ' if math.isinf(number) else ''}value "
                      f"{'>' if strict else '>='} 0, got {value!r}")
  return number


def require_nonnegative(value, field: str) -> float:
  """`value` as a float if it is a number >= 0 (a negative loss weight or bound rewards
  what its term penalises); else a ConfigError naming `field`."""
  return require_number(value, field)


def require_int(value, field: str, least: int = 0) -> int:
  """`value` as an int if it is one (numpy ints too, bools not) and >= `least`; else a
  ConfigError naming `field`."""
  if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < least:
    raise ConfigError(f"{field}: expected an int >= {least}, got {value!r}")
  return int(value)


class ArgumentParser(argparse.ArgumentParser):
  """argparse, but a usage error is one `error: ...` line (exit 2), as other bad input."""

  def error(self, message):
    self.exit(2, f"error: {' '.join(message.split())} (see --help)\n")


def exit_with(main: Callable[[], int]) -> None:
  """`sys.exit(main())` for the commands whose output is read through a pipe
  (`python -m kswap_jax.config | head`, `... .report RUN1 RUN2 | head`): when the reader
  has gone, the rest of the output is dropped without a traceback and the command ends
  with status 0 (the reader chose to stop)."""
  try:
    code = main()
    if sys.stdout is not None:
      sys.stdout.flush()
  except BrokenPipeError:
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())  # the interpreter's flush at exit fails no more
    os.close(devnull)
    code = 0
  sys.exit(code)
