"""Run in a subprocess with 8 simulated CPU devices: every registered method's tiny config
trained for a few steps on 1 and on 8 devices (same global batch) gives the same losses.

Prints one JSON line {method: {"steps": [...], "max_rel_diff": float}}.
"""

import os

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import json  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import load_config  # noqa: E402
from kswap_jax import methods  # noqa: E402
from kswap_jax.methods import pretrain  # noqa: E402

STEPS = 6


def losses(config_name, arg, num_devices, workdir, pretrained):
  config = load_config(config_name, arg)
  config.train.num_devices = num_devices
  config.train.log_every_steps = 1
  config.debug.interrupt_at_step = STEPS
  if pretrained and config.init.kind == "pretrain":
    if config_name != "demo":  # another model: pretrain it once, on 1 device, uninterrupted
      own = pretrained + f"_{config_name}_{arg}"
      if not os.path.exists(own):
        pre = load_config(config_name, arg)
        pre.train.num_devices = 1
        pre.init.pretrain_workdir = own
        pretrain.ensure_pretrained(pre, own)
      pretrained = own
    shutil.copytree(pretrained, os.path.join(workdir, "pretrain"))
  try:
    methods.run(config, workdir)
  except SystemExit:
    pass
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    lines = [json.loads(x) for x in f]
  return [{k: v for k, v in x.items() if k.endswith("loss")} for x in lines]


def main():
  assert jax.device_count() == 8, jax.devices()
  cases = json.loads(sys.argv[1])  # {method: [config_name, arg]}
  out = {}
  with tempfile.TemporaryDirectory() as tmp:
    # One pretrained model shared by the methods that start from one (trained on 1 device).
    pretrained = os.path.join(tmp, "pretrained")
    config = load_config("demo", "runlocal,method=pretrain")
    methods.run(config, pretrained)
    for method, (config_name, arg) in cases.items():
      runs, seconds = [], []
      for n in (1, 8):
        t0 = time.perf_counter()
        runs.append(losses(config_name, arg, n, os.path.join(tmp, f"{method}_{n}"), pretrained))
        seconds.append(round(time.perf_counter() - t0, 1))
      diffs = [abs(a[k] - b[k]) / max(1e-6, abs(a[k]))
               for a, b in zip(*runs) for k in a]
      out[method] = {"steps": len(runs[0]), "steps_8": len(runs[1]),
                     "max_rel_diff": max(diffs) if diffs else None, "seconds": seconds}
  print(json.dumps(out))


if __name__ == "__main__":
  main()
