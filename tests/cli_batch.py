"""Runs several `run.py` command lines one after another in this one process, the way
`run.py` runs one (glibc tunables first, then `kswap_jax.cli.main`), so that each does not
pay Python's and jax's start-up again (about 3 s on 2 CPU cores).

argv[1]: a JSON list of argument lists (what follows `run.py`). Prints one JSON line: a
list of {"rc": exit code, "stderr": what the command wrote to stderr}, in order. A command
that raises gets rc 1 and its traceback, as the real command would.
"""

import json
import os
import sys
import tempfile
import traceback

from kswap_jax import hostmem

hostmem.reexec_with_tunables()

from kswap_jax.cli import main  # noqa: E402  (after the tunables, as in run.py)


def run_one(args: list[str]) -> dict:
  """`main()` under `sys.argv = ["run.py", *args]` (its command line, as run.py's), file
  descriptor 2 sent to a file of its own."""
  with tempfile.TemporaryFile() as err:
    sys.stderr.flush()
    saved = os.dup(2)
    os.dup2(err.fileno(), 2)
    sys.argv = ["run.py", *args]
    try:
      try:
        rc = main()
      except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else 1
      except Exception:  # noqa: BLE001 - reported like an uncaught exception
        traceback.print_exc()
        rc = 1
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)
    err.seek(0)
    return {"rc": rc, "stderr": err.read().decode(errors="replace")}


if __name__ == "__main__":
  print(json.dumps([run_one(args) for args in json.loads(sys.argv[1])]))
