"""A server on this machine, for the tests and the load benchmark: a free port, the app run by
uvicorn in a thread, and a bounded wait for /health."""

from __future__ import annotations

import contextlib
import socket
import threading
import time

import uvicorn

try:  # The openai client's HTTP library, under its newer name where that is what is installed.
  import httpx2 as httpx
except ImportError:
  import httpx


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def wait_healthy(base: str, seconds: float, process=None):
  """Waits until GET {base}/health is 200 (the programs are compiled); raises after `seconds`
  or when `process` (a subprocess running the server) has exited."""
  deadline = time.time() + seconds
  while time.time() < deadline:
    if process is not None and process.poll() is not None:
      raise RuntimeError(f'the server exited with {process.returncode}')
    try:
      if httpx.get(f'{base}/health', timeout=5).status_code == 200:
        return
    except httpx.TransportError:
      pass
    time.sleep(0.5)
  raise RuntimeError(f'{base} was not healthy within {seconds:.0f}s')


@contextlib.contextmanager
def serving(app, port: int, startup_seconds: float):
  """Runs `app` on 127.0.0.1:`port` in a thread; yields its base URL once healthy."""
  server = uvicorn.Server(uvicorn.Config(app, host='127.0.0.1', port=port, log_level='warning'))
  thread = threading.Thread(target=server.run, daemon=True)
  thread.start()
  try:
    base = f'http://127.0.0.1:{port}'
    wait_healthy(base, startup_seconds)
    yield base
  finally:
    server.should_exit = True
    thread.join(60)
