"""`make demo` (pipeline.py) and where it keeps what it makes (artifacts.py)."""
