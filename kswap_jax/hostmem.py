"""Host process: huge pages for XLA:CPU's per-step buffers; CPU time and peak memory.

XLA:CPU allocates each step's temporary buffer (GBs for a ViT-B/16 training step) with
`malloc` and frees it at the end of the step. glibc serves such sizes with a fresh `mmap`,
so every step touches new 4 KiB pages: ~1.2 M minor page faults and several seconds of
system time per Knowledge Swapping forget step on 2 cores. With the glibc tunable
`glibc.malloc.hugetlb=1` (glibc ≥ 2.35) those mappings are marked for transparent huge
pages, which cuts the faults ~50-fold. Numerics do not change.

glibc reads tunables only when a process starts, so `run.py` and `python -m kswap_jax.bench`
restart themselves once, before any work, with the variable set (`reexec_with_hugepages`).
They leave the environment alone when `GLIBC_TUNABLES` is already set, when
`KSWAP_HUGEPAGES=0`, when the C library is not glibc ≥ 2.35, or when transparent huge pages
are off. Code that calls the functional API from its own process sets the variable itself:

    GLIBC_TUNABLES=glibc.malloc.hugetlb=1 python my_script.py
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import re
import resource
import sys

TUNABLE = "glibc.malloc.hugetlb=1"
THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"
_MARK = "KSWAP_HUGEPAGES_RESTARTED"  # set in the restarted process, for `describe`


def _glibc_version() -> tuple[int, int] | None:
  try:
    m = re.fullmatch(r"glibc (\d+)\.(\d+).*", os.confstr("CS_GNU_LIBC_VERSION") or "")
  except (ValueError, OSError, AttributeError):
    return None
  return (int(m.group(1)), int(m.group(2))) if m else None


def _thp_enabled() -> bool:
  try:
    with open(THP_SETTING) as f:
      return "[never]" not in f.read()
  except OSError:
    return False


def hugepages_applicable(environ=os.environ) -> bool:
  """Whether `reexec_with_hugepages` would restart this process."""
  if environ.get("KSWAP_HUGEPAGES", "1") == "0" or "GLIBC_TUNABLES" in environ:
    return False
  version = _glibc_version()
  return sys.platform == "linux" and version is not None and version >= (2, 35) \
      and _thp_enabled()


def reexec_with_hugepages() -> None:
  """Restarts this process with `GLIBC_TUNABLES=glibc.malloc.hugetlb=1` where it helps.

  Call it first thing in a `__main__` block (never inside a library call: it replaces the
  running process). Returns without doing anything where it does not apply (see the module
  docstring); otherwise it does not return.
  """
  if not hugepages_applicable():
    return
  os.environ["GLIBC_TUNABLES"] = TUNABLE
  os.environ[_MARK] = "1"
  os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])


def describe() -> str:
  """One line for a run's log: the glibc tunables in effect and who set them."""
  value = os.environ.get("GLIBC_TUNABLES")
  if value is None:
    return "host memory: glibc defaults (GLIBC_TUNABLES unset)"
  who = ("restarted by kswap_jax.hostmem; KSWAP_HUGEPAGES=0 opts out"
         if os.environ.get(_MARK) == "1" and value == TUNABLE else "set by the caller")
  return f"host memory: GLIBC_TUNABLES={value} ({who})"


def cpu_seconds() -> float:
  """User + system CPU seconds of this process so far (all threads)."""
  ru = resource.getrusage(resource.RUSAGE_SELF)
  return ru.ru_utime + ru.ru_stime


def minor_faults() -> int:
  """Minor page faults of this process so far."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def reset_peak_rss() -> bool:
  """Restarts the peak-RSS count (Linux: `/proc/self/clear_refs`); False where it cannot."""
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
    return True
  except OSError:
    return False


def peak_rss_bytes() -> int:
  """Peak resident memory since the process started or since `reset_peak_rss`."""
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith("VmHWM:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def release_free_memory() -> bool:
  """Hands the C heap's free pages back to the system (glibc `malloc_trim(0)`).

  Compiling an XLA program leaves ~0.5 GB of freed heap in a ViT-B/16 process that glibc
  keeps mapped; releasing it after compilation lowers the peak resident memory of the
  steps that follow by as much. Returns False where the C library has no `malloc_trim`.
  """
  try:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    libc.malloc_trim(0)  # returns whether memory was released; either is fine here
  except (OSError, AttributeError):
    return False
  return True
