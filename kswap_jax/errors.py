"""Errors a user can fix: bad config, missing files, mismatched checkpoints.

`run.py` turns a `ConfigError` into one line on stderr and exit code 2, with no
traceback; everything else is a bug or a runtime failure and keeps its traceback.
"""


class ConfigError(ValueError):
  """Bad user input; the message names the field or file and what was expected."""


class NonFiniteLossError(RuntimeError):
  """Training produced a NaN/inf loss; the message names the stage and step."""
