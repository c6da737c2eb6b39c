"""Shipped configs; installed as `kswap_jax.configs` (see pyproject.toml)."""
