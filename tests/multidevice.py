"""Runs a check script in a subprocess with 8 fake CPU devices (the device count is fixed when
jax is first imported, so it cannot change inside the test process) and returns its JSON line."""

import json
import os
import subprocess
import sys


def run_check(script_name: str, timeout: int = 600) -> dict:
  script = os.path.join(os.path.dirname(__file__), script_name)
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}  # The script sets its own.
  out = subprocess.run([sys.executable, script], capture_output=True, text=True, timeout=timeout,
                       env=env, check=True)
  return json.loads(out.stdout.strip().splitlines()[-1])
