"""The configs of every command (ml_collections `get_config()` files), installed with the package
as `mmspec_jax.configs`: `--config=NAME[:ARG]` finds them from any directory (mmspec_jax/cli.py)."""
