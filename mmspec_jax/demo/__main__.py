"""`python -m mmspec_jax.demo` = `mmspec-demo` = `make demo`'s job (pipeline.py)."""

from mmspec_jax.demo.pipeline import command

command()
