"""hostmem: the one-time restart with glibc's huge-page tunable, and when it is skipped."""

import os
import subprocess
import sys

import pytest

from kswap_jax import hostmem

SCRIPT = ("import os; from kswap_jax import hostmem; hostmem.reexec_with_hugepages(); "
          "print(hostmem.describe()); print('TUNABLES', os.environ.get('GLIBC_TUNABLES'))")


def _run(**env):
  environ = {k: v for k, v in os.environ.items()
             if k not in ("GLIBC_TUNABLES", "KSWAP_HUGEPAGES", "KSWAP_HUGEPAGES_RESTARTED")}
  environ.update(env)
  out = subprocess.run([sys.executable, "-c", SCRIPT], env=environ, capture_output=True,
                       text=True, timeout=60, check=True)
  return out.stdout.strip().splitlines(), out.stderr


@pytest.mark.skipif(not hostmem.hugepages_applicable({}), reason="needs glibc >= 2.35 and THP")
def test_restarts_once_with_the_tunable():
  lines, err = _run()
  assert lines == ["host memory: GLIBC_TUNABLES=glibc.malloc.hugetlb=1 (restarted by "
                   "kswap_jax.hostmem; KSWAP_HUGEPAGES=0 opts out)",
                   "TUNABLES glibc.malloc.hugetlb=1"]  # one process printed, once
  assert err == ""  # silent: run.py's bad-input contract is one line on stderr


def test_opt_out_and_a_user_setting_are_left_alone():
  assert _run(KSWAP_HUGEPAGES="0")[0][-1] == "TUNABLES None"
  lines = _run(GLIBC_TUNABLES="glibc.malloc.arena_max=2")[0]
  assert lines == ["host memory: GLIBC_TUNABLES=glibc.malloc.arena_max=2 (set by the caller)",
                   "TUNABLES glibc.malloc.arena_max=2"]
  assert not hostmem.hugepages_applicable({"KSWAP_HUGEPAGES": "0"})
  assert not hostmem.hugepages_applicable({"GLIBC_TUNABLES": ""})
