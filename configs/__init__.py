"""Configs shipped with clipsel_jax (``clipsel --config NAME``); installed as the package clipsel_jax.configs."""
