"""Shared fixtures: tiny model configs (depth 2, width 64) so every test is fast on CPU."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import ml_collections  # noqa: E402
import pytest  # noqa: E402

from kswap_jax.models import vit  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
