"""The suite's own machinery (tests/conftest.py): tests marked `users_xla_flags` run in one
subprocess under the user's XLA flags, and each reports its outcome there."""

import os
import re
import subprocess
import sys

from conftest import REPO

# A conftest that takes the suite's hooks from tests/conftest.py (loaded under another
# module name, as a test folder of a user's would).
_CONFTEST = f"""
import importlib.util
spec = importlib.util.spec_from_file_location("suite_conftest", {os.path.join(REPO, "tests", "conftest.py")!r})
suite = importlib.util.module_from_spec(spec)
spec.loader.exec_module(suite)
pytest_pyfunc_call = suite.pytest_pyfunc_call
pytest_runtest_logreport = suite.pytest_runtest_logreport
"""

_TESTS = """
import os
import time
import pytest

def _users_flags():
  return "optimization_level=0" not in os.environ.get("XLA_FLAGS", "")

@pytest.mark.users_xla_flags
def test_passes_under_the_users_flags():
  assert _users_flags()

@pytest.mark.users_xla_flags
def test_skips():
  pytest.skip("no such device")

@pytest.mark.users_xla_flags
def test_fails():
  assert not _users_flags(), "it ran under the user's flags"

@pytest.mark.users_xla_flags
@pytest.mark.parametrize("name", ["a b"])
def test_with_a_space_in_its_id(name):
  assert _users_flags() and name == "a b"

def test_unmarked_runs_under_the_suite_s_flags():
  assert not _users_flags()

@pytest.mark.users_xla_flags
def test_sleeps():
  with open(os.environ["STARTS"], "a") as f:
    f.write("start\\n")
  time.sleep(float(os.environ.get("SLEEP", 0)))
"""


def _run(tmp_path, **env):
  (tmp_path / "conftest.py").write_text(_CONFTEST)
  (tmp_path / "test_toy.py").write_text(_TESTS)
  (tmp_path / "pytest.ini").write_text("[pytest]\nmarkers =\n  users_xla_flags: x\n")
  environ = {k: v for k, v in os.environ.items() if not k.startswith("KSWAP_TEST_")}
  environ.update(JAX_PLATFORMS="cpu", XLA_FLAGS="", STARTS=str(tmp_path / "starts"), **env)
  proc = subprocess.run([sys.executable, "-m", "pytest", "-v", "-rs", "-n0", "-p",
                         "no:cacheprovider", str(tmp_path)], cwd=tmp_path, env=environ,
                        capture_output=True, text=True, timeout=300)
  outcomes = dict(re.findall(r"^test_toy\.py::(.+?) (PASSED|FAILED|SKIPPED)", proc.stdout,
                             re.MULTILINE))
  starts = (tmp_path / "starts").read_text().count("start") if (tmp_path / "starts").exists() else 0
  return outcomes, starts, proc.stdout


def test_marked_tests_run_once_together_under_the_users_flags_and_report_their_outcome(tmp_path):
  outcomes, starts, out = _run(tmp_path)
  assert outcomes == {
      "test_passes_under_the_users_flags": "PASSED", "test_skips": "SKIPPED",
      "test_fails": "FAILED", "test_with_a_space_in_its_id[a b]": "PASSED",
      "test_unmarked_runs_under_the_suite_s_flags": "PASSED", "test_sleeps": "PASSED"}, out
  assert "under the user's XLA flags: no such device" in out
  assert starts == 1  # one subprocess for all of them


def test_a_subprocess_that_times_out_fails_the_tests_it_did_not_finish_once(tmp_path):
  outcomes, starts, out = _run(tmp_path, SLEEP="60", KSWAP_TEST_USERS_XLA_TIMEOUT="8")
  assert outcomes["test_sleeps"] == "FAILED" and outcomes["test_fails"] == "FAILED", out
  assert outcomes["test_passes_under_the_users_flags"] == "PASSED", out  # finished in time
  assert "not run under the user's XLA flags (none):\nE     timed out after 8 s" in out
  assert starts == 1  # not started again for the tests after it
