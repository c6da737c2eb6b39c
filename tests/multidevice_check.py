"""Run in a subprocess with 8 simulated CPU devices: each method's 1-device run, resumed on
all 8 devices from the start of the stage that holds its conformance kill step.

argv[1]: JSON {"out": DIR, "shared": SHARED, "methods": {method: {"config": [name, arg],
"reference": WORKDIR, "kill": STEP}}}, SHARED being `conftest.method_config`'s shared_dir.
For each method, WORKDIR (an uninterrupted run that kept every checkpoint) is copied to
DIR/<method> without its checkpoints from STEP on; the newest one left (a stage's end, or
none: then it starts from step 1) is resumed on 8 devices, and the run is
stopped after step max(STEP, resumed step + 3), or after its last step (before the final
evaluation, which trains nothing), appending to DIR/<method>/metrics.jsonl.
Prints one JSON line {method: {"resumed_from": step, "seconds": s}}.
"""

import os

import simulated_devices

simulated_devices.use(8)

import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import method_config, resumable_copy  # noqa: E402
from kswap_jax import methods  # noqa: E402


def last_step(workdir: str) -> int:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return max(json.loads(line)["step"] for line in f)


def main():
  assert jax.device_count() == 8, jax.devices()
  spec = json.loads(sys.argv[1])
  out = {}
  for method, case in spec["methods"].items():
    workdir = os.path.join(spec["out"], method)
    start = resumable_copy(case["reference"], workdir, case["kill"])
    config = method_config(*case["config"], spec["shared"])
    config.train.num_devices = 8
    config.debug.interrupt_at_step = min(max(case["kill"], start + 3),
                                         last_step(case["reference"]))
    t0 = time.perf_counter()
    try:
      methods.run(config, workdir)
    except SystemExit:  # interrupt_at_step
      pass
    out[method] = {"resumed_from": start, "seconds": round(time.perf_counter() - t0, 1)}
  print(json.dumps(out))


if __name__ == "__main__":
  main()
