"""The OpenAI-compatible server over the continuous-batching engine (serve.py)."""
