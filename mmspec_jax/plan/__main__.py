"""`python -m mmspec_jax.plan` = `mmspec-plan` (memory.py)."""

from mmspec_jax.plan.memory import command

command()
