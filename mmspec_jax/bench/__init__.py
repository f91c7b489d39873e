"""Benchmark helpers."""
