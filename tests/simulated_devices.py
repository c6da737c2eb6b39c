"""Simulated CPU devices for the check scripts that tests run in subprocesses: call
`use(n)` before jax is imported (the device count is read when jax starts)."""

import os


def use(n: int) -> None:
  """n simulated CPU devices. The count is appended to XLA_FLAGS, so the flags the suite
  sets (tests/conftest.py) still apply."""
  os.environ["XLA_FLAGS"] = " ".join(
      [os.environ.get("XLA_FLAGS", ""), f"--xla_force_host_platform_device_count={n}"]).strip()
  os.environ["JAX_PLATFORMS"] = "cpu"
