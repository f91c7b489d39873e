"""`python -m mmspec_jax.distillation` = `mmspec-target-answers` (target_answers.py)."""

from mmspec_jax.distillation.target_answers import command

command()
