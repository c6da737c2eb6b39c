"""Shared fixtures: tiny model configs (depth 2, width 64) so every test is fast on CPU."""

import os

import atexit
import shutil
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Subprocesses (the multi-device and multi-process checks, the CLI tests) import this
# checkout's kswap_jax, whatever is installed.
os.environ["PYTHONPATH"] = os.pathsep.join(
    [REPO] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
# One XLA compilation cache for the whole session, subprocesses included: the suite runs
# the same tiny programs many times (a method's reference, killed and resumed runs), and
# compiling them dominates its time on CPU (measured: gs_lora's three conformance tests
# 46 s -> 34 s cold). A fresh directory per session, so nothing leaks between runs;
# KSWAP_TEST_XLA_CACHE=<dir> keeps one across sessions.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  if os.environ.get("KSWAP_TEST_XLA_CACHE"):
    os.environ["JAX_COMPILATION_CACHE_DIR"] = os.environ["KSWAP_TEST_XLA_CACHE"]
  else:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="kswap_jax_xla_cache_")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")

import jax  # noqa: E402
import ml_collections  # noqa: E402
import pytest  # noqa: E402

from kswap_jax.models import vit  # noqa: E402



def tiny_model_config(num_classes=10, image_size=16, channels=3, variant="test/4"):
  return ml_collections.ConfigDict(dict(
      variant=variant, num_classes=num_classes, image_size=image_size, channels=channels,
      dropout=0.0, attention_dropout=0.0, attention_output_dropout=0.0, representation_size=0, width=0, depth=0,
      mlp_dim=0, num_heads=0))


@pytest.fixture(scope="session")
def tiny():
  """(model_cfg, model, params) of the 2-block, width-64 test ViT."""
  cfg = tiny_model_config()
  model = vit.build(cfg)
  params = vit.init_params(model, cfg, jax.random.key(0))
  return cfg, model, params


def load_config(name, arg=None):
  """`get_config(arg)` of configs/<name>.py."""
  import importlib.util  # pylint: disable=import-outside-toplevel
  spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "configs",
                                                                   f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


_METHOD_RUNS = {}


def method_run(tmp_path_factory, config_name, arg):
  """(workdir, results) of one uninterrupted run of configs/<config_name>.py:<arg>, made
  once per test session and shared by the tests that inspect it."""
  from kswap_jax import methods  # pylint: disable=import-outside-toplevel
  key = (config_name, arg)
  if key not in _METHOD_RUNS:
    workdir = str(tmp_path_factory.mktemp(f"{config_name}_{arg}".replace(",", "_")
                                          .replace("=", "-")))
    _METHOD_RUNS[key] = (workdir, methods.run(load_config(config_name, arg), workdir))
  return _METHOD_RUNS[key]
