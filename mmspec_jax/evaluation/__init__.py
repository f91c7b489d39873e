"""The paper's evaluation (Gagrani et al. 2024): block efficiency tau and memory-bound speedup
MBSU = tau / (c * gamma + 1) per task x draft x gamma x sampling, and the target's answer quality.

  tasks.py   LLaVA-format test files -> validated decoding requests and references
  run.py     `evaluate`: one compile per decoder, every task through it, the cells
  report.py  results.json, results.md, tau_vs_gamma.png

The command line is `python -m mmspec_jax.evaluation`.
"""

from mmspec_jax.evaluation.run import evaluate

__all__ = ['evaluate']
