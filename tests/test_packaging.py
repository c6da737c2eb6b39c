"""The package list in pyproject.toml covers every package, so `pip install .` ships all."""

import os
import tomllib

from conftest import REPO


def test_every_package_is_listed_in_pyproject():
  with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
    listed = set(tomllib.load(f)["tool"]["setuptools"]["packages"])
  found = {"kswap_jax.configs"}
  for root, _, files in os.walk(os.path.join(REPO, "kswap_jax")):
    if "__init__.py" in files and "__pycache__" not in root:
      found.add(os.path.relpath(root, REPO).replace(os.sep, "."))
  assert found == listed, f"missing: {found - listed}, stale: {listed - found}"
