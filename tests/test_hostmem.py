"""hostmem: the one-time restart with glibc's tunables, when it is skipped, and what the
`retain` mode does to a step's temporary buffer."""

import json
import os
import subprocess
import sys

import pytest

from kswap_jax import hostmem

SCRIPT = ("import os; from kswap_jax import hostmem; hostmem.reexec_with_tunables(); "
          "import jax; print(hostmem.describe()); print(hostmem.describe(verbose=True)); "
          "print('TUNABLES', os.environ.get('GLIBC_TUNABLES')); "
          "print('ASYNC', jax.config.read('jax_cpu_enable_async_dispatch'))")
OURS = ("GLIBC_TUNABLES", "KSWAP_HUGEPAGES", "KSWAP_HOST_MEMORY", "KSWAP_HOST_MEMORY_RESTARTED",
        "JAX_PLATFORMS")


def _run(script=SCRIPT, check=True, **env):
  environ = {k: v for k, v in os.environ.items() if k not in OURS}
  environ.update(env)
  return subprocess.run([sys.executable, "-c", script], env=environ, capture_output=True,
                        text=True, timeout=120, check=check)


@pytest.mark.skipif(not hostmem.planned_environment({}), reason="needs glibc >= 2.26 on Linux")
def test_restarts_once_with_the_tunables_of_the_default_mode():
  planned = hostmem.planned_environment({})
  mode = hostmem.host_mode({})
  out = _run()
  lines = out.stdout.strip().splitlines()
  inline = ", CPU computations dispatched inline" if mode == "retain" else ""
  others = "|".join(m for m in hostmem.MODES if m != mode)
  what = {"retain": "glibc keeps each step's freed buffers for the next",
          "hugepages": "glibc backs the heap with huge pages"}[mode]
  assert lines == [  # one process printed, once
      f"host memory: {mode} ({what}{inline}; KSWAP_HOST_MEMORY={others} changes it)",
      f"host memory: {mode} (GLIBC_TUNABLES={planned['GLIBC_TUNABLES']}{inline}; "
      f"KSWAP_HOST_MEMORY={others} changes it)",
      f"TUNABLES {planned['GLIBC_TUNABLES']}",
      f"ASYNC {mode != 'retain'}"]
  assert out.stderr == ""  # silent: run.py's bad-input contract is one line on stderr


def test_modes_opt_outs_and_a_user_setting():
  assert _run(KSWAP_HOST_MEMORY="glibc").stdout.split("\n")[2:4] == ["TUNABLES None", "ASYNC True"]
  assert _run(KSWAP_HUGEPAGES="0").stdout.split("\n")[2] == "TUNABLES None"
  user = _run(GLIBC_TUNABLES="glibc.malloc.arena_max=2").stdout.strip().splitlines()
  assert user == 2 * ["host memory: GLIBC_TUNABLES=glibc.malloc.arena_max=2 (set by the caller)"
                      ] + ["TUNABLES glibc.malloc.arena_max=2", "ASYNC True"]
  # A caller's own retaining tunables still get inline dispatch (the heap would grow otherwise).
  keep = _run(GLIBC_TUNABLES=hostmem.RETAIN).stdout.strip().splitlines()
  assert keep[0].endswith("CPU computations dispatched inline (set by the caller)")
  assert keep[3] == "ASYNC False"
  if hostmem.planned_environment({}):
    huge = _run(KSWAP_HOST_MEMORY="hugepages").stdout.strip().splitlines()
    planned = hostmem.planned_environment({"KSWAP_HOST_MEMORY": "hugepages"})
    assert huge[2:] == [f"TUNABLES {planned.get('GLIBC_TUNABLES')}", "ASYNC True"]
  assert not hostmem.planned_environment({"KSWAP_HOST_MEMORY": "glibc"})
  assert not hostmem.planned_environment({"GLIBC_TUNABLES": ""})
  assert hostmem.host_mode({"JAX_PLATFORMS": "cuda"}) == "hugepages"
  assert hostmem.host_mode({"JAX_PLATFORMS": "cpu"}) == "retain"
  assert hostmem.host_mode({"KSWAP_HUGEPAGES": "0"}) == "glibc"


def test_a_bad_mode_is_one_line_and_exit_2():
  out = _run(check=False, KSWAP_HOST_MEMORY="keep")
  assert out.returncode == 2 and out.stdout == ""
  assert out.stderr.strip().splitlines() == [
      "error: KSWAP_HOST_MEMORY='keep': expected one of retain, hugepages, glibc"]


# A jitted function with a 256 MiB temporary buffer (XLA materialises exp(x) and its reversal),
# called back to back 16 times: the minor page faults of each call after the first two, and
# the resident memory after the call.
STEPS = """
import json, resource
from kswap_jax import hostmem
hostmem.reexec_with_tunables()
import jax, jax.numpy as jnp
f = jax.jit(lambda x: (jnp.exp(x)[::-1] * jnp.exp(x)).reshape(4096, -1).T.sum(0))
x = jnp.ones((32 * 2**20,), jnp.float32)
assert f.lower(x).compile().memory_analysis().temp_size_in_bytes == 256 * 2**20
faults, rss = [], []
for i in range(16):
  f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  jax.block_until_ready(f(x))
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
  rss.append(int(open('/proc/self/statm').read().split()[1]) * 4096)
print(json.dumps({"faults": faults[2:], "rss": rss[2:]}))
"""


@pytest.mark.skipif(hostmem.planned_environment({"KSWAP_HOST_MEMORY": "retain"}) == {},
                    reason="needs glibc >= 2.26 on Linux")
def test_retain_mostly_reuses_the_temporary_buffer_instead_of_faulting_it_in_every_call():
  huge_pages = 256 * 2**20 // 2**21  # the buffer's pages if the kernel maps 2 MiB ones
  kept = json.loads(_run(STEPS, KSWAP_HOST_MEMORY="retain").stdout)
  fresh = json.loads(_run(STEPS, KSWAP_HOST_MEMORY="glibc").stdout)
  # glibc's defaults map the buffer afresh every call, so its pages fault in again (every
  # 4 KiB page here, ~98 k faults; at least one per 2 MiB where THP is "always").
  assert min(fresh["faults"]) >= huge_pages // 2, fresh
  # Retained: the pages are already there. Not in every call: now and then the next call
  # allocates before the previous buffer is back in the heap, which then grows by one
  # buffer (docs/speed.md, "Host memory": by 1-3 buffers in 4 of 12 processes; CI once saw
  # 3 growths in a row); most of the 14 calls reuse it.
  faulted = [f for f in kept["faults"] if f >= huge_pages // 8]
  assert len(faulted) <= len(kept["faults"]) // 2, kept
