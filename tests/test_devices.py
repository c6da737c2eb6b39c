"""Many devices and many processes, each check in a subprocess (the simulated device count
must be set before jax starts):

  - the sharded step and the fast-slow update on 4 simulated devices equal 1 device;
  - two processes on localhost (CPU collectives) train like one, each reading only its
    slice of every batch, and their checkpoints restore in a one-process run and vice versa.

(Every registered method on 1 and 8 devices: `test_conformance.py`.) Each subprocess holds
`conftest.one_multidevice_process`: two multi-device processes at once on 2 cores can starve
each other's collectives.
"""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

from conftest import REPO, method_run, one_multidevice_process

pytestmark = pytest.mark.slow

HERE = os.path.dirname(os.path.abspath(__file__))

_FLAGS = ["--config=configs/demo.py:runlocal", "--config.train.log_every_steps=1",
          "--config.train.checkpoint_every_steps=3"]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env() -> dict:
  """The environment of a `run.py` process: CPU, one device per process, whatever device
  count the caller's XLA_FLAGS simulate."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                              if "xla_force_host_platform_device_count" not in f)
  return env


def _run(workdir, processes, *flags):
  """`python run.py` as 1 or 2 cooperating processes; returns their outputs."""
  env = _env()
  base = [sys.executable, "run.py", *_FLAGS, f"--workdir={workdir}", *flags]
  if processes == 1:
    procs = [subprocess.Popen(base, cwd=REPO, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)]
    outs = [procs[0].communicate(timeout=600)[0]]
  else:
    address = f"127.0.0.1:{_free_port()}"
    with one_multidevice_process():
      procs = [subprocess.Popen(
          base + [f"--config.distributed.coordinator_address={address}",
                  "--config.distributed.num_processes=2", f"--config.distributed.process_id={i}"],
          cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
               for i in range(2)]
      outs = [p.communicate(timeout=600)[0] for p in procs]
  return [(p.returncode, out) for p, out in zip(procs, outs)]


def _losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {x["step"]: x["loss"] for x in map(json.loads, f)}


def test_two_processes_train_like_one_and_checkpoints_cross_restore(tmp_path_factory, tmp_path):
  pretrained = method_run(tmp_path_factory, "demo", "runlocal,method=pretrain")[0]
  workdirs = {}
  for n in (1, 2):
    workdirs[n] = tmp_path / f"p{n}"
    shutil.copytree(pretrained, workdirs[n] / "pretrain")
    for code, out in _run(workdirs[n], n, "--config.debug.interrupt_at_step=6"):
      assert code != 0 and "interrupt_at_step" in out, out[-3000:]
  one, two = _losses(workdirs[1]), _losses(workdirs[2])
  assert sorted(one) == sorted(two) == list(range(1, 7))
  for step in one:
    assert two[step] == pytest.approx(one[step], rel=1e-4), (step, one, two)
  # Each resumes from the other's checkpoint (step 6). 2 processes -> 1 stops at step 12 (the
  # learning stage); 1 -> 2 runs the swap to its end, so two processes also finish one.
  for n, workdir, flags in ((1, workdirs[2], ["--config.debug.interrupt_at_step=12"]),
                            (2, workdirs[1], [])):
    for code, out in _run(workdir, n, *flags):
      assert (code != 0) == bool(flags), out[-3000:]
      assert "resumed from" in out and "at step 6" in out, out[-3000:]
  one_after, two_after = _losses(workdirs[2]), _losses(workdirs[1])
  assert sorted(one_after) == list(range(1, 13)) and max(two_after) > 12
  for step in range(7, 13):  # the same steps after either restore
    assert two_after[step] == pytest.approx(one_after[step], rel=1e-4), step
  with open(workdirs[1] / "results.json") as f:
    assert set(json.load(f)["final"]) == {"acc_r", "acc_f", "acc_n", "h_mean"}
  assert not os.path.exists(workdirs[2] / "results.json")


def test_ctrl_c_in_one_process_stops_every_process_at_one_step_after_a_checkpoint(
    tmp_path_factory, tmp_path):
  """Ctrl-C reaching one process of two: both train on to the step jax's preemption sync
  picks, save there, print one line and exit 130 (before, each was cut short where the
  signal landed and the other hung in a collective or the runtime's shutdown).

  The run resumes from step 12 and saves every step, so the train state's step (13, 14,
  ...) differs from the per-process count the sync is asked with (1, 2, ...): had orbax's
  saves still reported the state's step to the sync, the stop would come about 12 steps
  late, in the next stage."""
  workdir = tmp_path / "run"
  shutil.copytree(method_run(tmp_path_factory, "demo", "runlocal,method=pretrain")[0],
                  workdir / "pretrain")
  for code, out in _run(workdir, 1, "--config.debug.interrupt_at_step=12"):
    assert code != 0 and "interrupt_at_step" in out, out[-3000:]
  env = _env()
  address = f"127.0.0.1:{_free_port()}"
  logs = [tmp_path / f"p{i}.log" for i in range(2)]
  with one_multidevice_process():
    procs = []
    for i, log in enumerate(logs):
      with open(log, "w") as out:
        procs.append(subprocess.Popen(
            [sys.executable, "run.py", *_FLAGS, f"--workdir={workdir}",
             "--config.train.checkpoint_every_steps=1",
             f"--config.distributed.coordinator_address={address}",
             "--config.distributed.num_processes=2", f"--config.distributed.process_id={i}"],
            cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT))
    try:
      deadline = time.monotonic() + 300
      while "iteration 14/" not in logs[0].read_text() and time.monotonic() < deadline:
        assert all(p.poll() is None for p in procs), logs[0].read_text()[-3000:]
        time.sleep(0.1)
      procs[1].send_signal(signal.SIGINT)
      codes = [p.wait(timeout=120) for p in procs]
    finally:
      for p in procs:
        p.kill()
  outs = [log.read_text() for log in logs]
  assert codes == [130, 130], outs[0][-3000:] + outs[1][-3000:]
  assert "resumed from" in outs[0] and "at step 12" in outs[0], outs[0][-3000:]
  stopped = [re.findall(r"interrupted: \[(\w+)\] stopped at step (\d+) on a stop request, "
                        r"all processes together", o) for o in outs]
  assert stopped[0] == stopped[1] and len(stopped[0]) == 1, outs
  stage, step = stopped[0][0][0], int(stopped[0][0][1])
  assert stage == "learn" and 14 <= step < 24, (stage, step)  # the learning stage: 24 steps
  assert str(step) in os.listdir(workdir / "checkpoints")
  assert max(_losses(workdir)) == step
  assert "Traceback" not in outs[0] + outs[1]


def test_four_device_sharded_step_equals_single_device_step():
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  with one_multidevice_process():
    proc = subprocess.run([sys.executable, os.path.join(HERE, "sharded_step_check.py")],
                          capture_output=True, text=True, timeout=300, env=env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  assert out["devices_4"] == 4                        # the state really lives on 4 devices
  assert out["moved"] > 1e-4                          # two steps changed the LoRA tree
  assert out["param_diff"] < 1e-4 * out["moved"]      # ... identically on 1 and 4 devices
  assert out["loss_1"] == pytest.approx(out["loss_4"], rel=1e-5)
  assert out["counts_1"] == out["counts_4"] and out["counts_4"]["count"] == 6.0



def test_four_device_fast_slow_equals_single_device():
  with one_multidevice_process():
    proc = subprocess.run([sys.executable, os.path.join(HERE, "fast_slow_sharded_check.py")],
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  assert out["devices_4"] == 4 and out["moved"] > 1e-3
  assert out["param_diff"] < 1e-4 * out["moved"]
  assert out["stats_diff"] < 1e-5 and out["opt_diff"] < 1e-4
  assert out["loss_1"] == pytest.approx(out["loss_4"], rel=1e-5)
