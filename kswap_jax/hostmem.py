"""Host process: how XLA:CPU's per-step buffers get their memory; CPU time and peak memory.

XLA:CPU allocates each step's temporary buffer (2.7 GiB for the ViT-B/16 Knowledge Swapping
forget step at 8 + 8 images) with `malloc` and frees it at the end of the step. glibc serves
such sizes with a fresh `mmap` and hands them back with `munmap`, so every step the kernel
zeroes every page of that buffer again: ~3 s of system CPU time per step on 2 cores, ~17 %
of the step's CPU time, mostly in the first forward pass, which touches the fresh pages
first (docs/speed.md).

Three modes, chosen by the environment variable `KSWAP_HOST_MEMORY`:

- `retain` (the default where no accelerator is present): glibc keeps freed memory for
  the next step instead of returning it to the kernel. Tunables: one malloc arena, no
  `mmap` for single allocations and no trimming of the heap's top
  (`glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=1 TiB`),
  plus transparent huge pages where the kernel offers them (`glibc.malloc.hugetlb=1`). The
  step's buffer is then faulted in once per process and reused; the resident memory stays
  at its high-water mark instead of dropping between steps. Where the next step allocates
  before the previous step's buffer is back in the heap, the heap grows by one buffer. jax
  therefore runs single-device CPU computations inline (`jax_cpu_enable_async_dispatch=
  False`, `configure_dispatch`), which makes that rare for a training step, not
  impossible (the buffer seems to be freed from a worker thread after the step's outputs
  are ready; docs/speed.md, "Host memory", has the measured frequency).
- `hugepages` (the default where an accelerator is present: its step buffers are device
  memory): only `glibc.malloc.hugetlb=1`, ~50x fewer page faults than glibc's defaults;
  the pages are still zeroed afresh every step.
- `glibc`: the C library's defaults. `KSWAP_HUGEPAGES=0` (the older switch) means the same.

Numerics do not change in any mode. glibc reads tunables only when a process starts, so
`run.py`, `kswap-run`, `python -m kswap_jax.bench` and `python -m kswap_jax.compare` restart
themselves once, before any work, with the variables set (`reexec_with_tunables`). They
leave the environment alone when `GLIBC_TUNABLES` is already set, or when the C library is
not glibc (≥ 2.26; huge pages need ≥ 2.35 and the kernel's transparent huge pages). Code
that calls the functional API from its own process sets the variables itself:

    export GLIBC_TUNABLES=glibc.malloc.hugetlb=1:glibc.malloc.arena_max=1:\
glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=1099511627776
    python my_script.py      # which calls hostmem.configure_dispatch() before using jax
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import re
import resource
import sys

MODES = ("retain", "hugepages", "glibc")
HUGEPAGES = "glibc.malloc.hugetlb=1"
RETAIN = ("glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:"
          "glibc.malloc.trim_threshold=1099511627776")
THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"
# Device files of the accelerators jax drives (NVIDIA, TPU, AMD): where one exists the
# step's buffers are device memory and `retain` has nothing to keep.
ACCELERATOR_FILES = ("/dev/nvidia0", "/dev/accel0", "/dev/vfio/0", "/dev/kfd")
_MARK = "KSWAP_HOST_MEMORY_RESTARTED"  # set in the restarted process, for `describe`


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


def _accelerator_present(environ) -> bool:
  platforms = environ.get("JAX_PLATFORMS", "")
  if platforms:
    return platforms.split(",")[0].strip() not in ("cpu", "")
  return any(os.path.exists(p) for p in ACCELERATOR_FILES)


def host_mode(environ=os.environ) -> str:
  """The mode `KSWAP_HOST_MEMORY` asks for, or the default for this machine.

  Raises:
    ValueError: `KSWAP_HOST_MEMORY` is not one of `MODES`.
  """
  value = environ.get("KSWAP_HOST_MEMORY")
  if value is not None:
    if value not in MODES:
      raise ValueError(f"KSWAP_HOST_MEMORY={value!r}: expected one of {', '.join(MODES)}")
    return value
  if environ.get("KSWAP_HUGEPAGES", "1") == "0":
    return "glibc"
  return "hugepages" if _accelerator_present(environ) else "retain"


def planned_environment(environ=os.environ) -> dict[str, str]:
  """The variables `reexec_with_tunables` would set; {} where it would not restart."""
  if "GLIBC_TUNABLES" in environ or environ.get(_MARK):
    return {}
  mode = host_mode(environ)
  version = _glibc_version()
  if mode == "glibc" or sys.platform != "linux" or version is None or version < (2, 26):
    return {}
  tunables = [HUGEPAGES] if version >= (2, 35) and _thp_enabled() else []
  if mode == "retain":
    tunables.append(RETAIN)
  if not tunables:
    return {}
  return {"GLIBC_TUNABLES": ":".join(tunables)}


def retains_freed_memory(environ=os.environ) -> bool:
  """Whether glibc keeps freed memory in this process (the `retain` tunables)."""
  return "glibc.malloc.mmap_max=0" in environ.get("GLIBC_TUNABLES", "").split(":")


def configure_dispatch() -> bool:
  """Where glibc retains freed memory, makes jax run single-device CPU computations inline.

  Call it before jax starts its CPU backend (the first computation or device query). With
  asynchronous dispatch the next step can allocate its temporary buffer before the previous
  one is freed; a heap that keeps freed memory would then hold both. Returns whether it
  changed the setting.
  """
  if not retains_freed_memory():
    return False
  import jax  # pylint: disable=import-outside-toplevel  (hostmem runs before jax otherwise)
  jax.config.update("jax_cpu_enable_async_dispatch", False)
  return True


def reexec_with_tunables() -> None:
  """Restarts this process once with the glibc tunables of its `host_mode`.

  Call it first thing in a `__main__` block, before jax starts a backend (never inside a
  library call: it replaces the running process). Where no restart applies (see the module
  docstring), or in the restarted process, it returns after `configure_dispatch`;
  otherwise it does not return. A bad `KSWAP_HOST_MEMORY` exits with code 2 and one line
  on stderr.
  """
  try:
    planned = planned_environment()
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  if not planned:
    configure_dispatch()
    return
  os.environ.update(planned)
  os.environ[_MARK] = host_mode()
  os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])


# What each mode does, in a few words (`describe`).
_SUMMARY = {"retain": "glibc keeps each step's freed buffers for the next",
            "hugepages": "glibc backs the heap with huge pages", "glibc": "glibc defaults"}


def describe(verbose: bool = False) -> str:
  """One line for a run's log: the host-memory settings in effect and who set them.

  A mode this module restarted the process for is named with what it does (`verbose`:
  with the exact `GLIBC_TUNABLES`, as the benchmark records it); settings a caller made
  are given as they are.
  """
  value = os.environ.get("GLIBC_TUNABLES")
  jax = sys.modules.get("jax")
  inline = ", CPU computations dispatched inline" if (
      jax is not None and not jax.config.read("jax_cpu_enable_async_dispatch")) else ""
  mode = os.environ.get(_MARK)
  if mode:
    what = f"GLIBC_TUNABLES={value}" if verbose else _SUMMARY.get(mode, mode)
    return (f"host memory: {mode} ({what}{inline}; KSWAP_HOST_MEMORY="
            f"{'|'.join(m for m in MODES if m != mode)} changes it)")
  settings = f"GLIBC_TUNABLES={value}" if value is not None else "glibc defaults"
  return f"host memory: {settings}{inline}" + (" (set by the caller)" if value is not None
                                               else "")


def cpu_seconds() -> float:
  """User + system CPU seconds of this process so far (all threads)."""
  ru = resource.getrusage(resource.RUSAGE_SELF)
  return ru.ru_utime + ru.ru_stime


def system_seconds() -> float:
  """System (kernel) CPU seconds of this process so far (all threads)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_stime


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
