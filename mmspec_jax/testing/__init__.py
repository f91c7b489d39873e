"""Tiny random checkpoints for tests, the demo and benchmarks (needs torch: test extra)."""
