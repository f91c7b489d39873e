r"""An OpenAI-compatible server for speculative decoding (docs/serving.md; every setting: --help).

  mmspec-serve [--config.target=DIR|org/name] [--config.draft=DIR] [--config.port=8000] \
      [--config.batch_size=8]

With no target it serves the pair `make demo` trained. Serves /v1/chat/completions (text and
images), /v1/completions, /v1/models, /health (200 once the programs are compiled) and /metrics on
127.0.0.1 unless --config.host says otherwise. Bad settings stop it before anything is loaded,
with `error: ...`. SIGTERM stops admitting, lets what runs finish, and exits 0.
"""

from __future__ import annotations

import faulthandler
import logging
import signal
import sys

from absl import app

from mmspec_jax import cli

# How long SIGTERM waits for running requests before cancelling them.
GRACEFUL_SHUTDOWN_SECONDS = 30


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  cli.configure_console()
  faulthandler.register(signal.SIGUSR1)  # `kill -USR1 PID` prints every thread's stack.
  import uvicorn

  from mmspec_jax import distributed
  from mmspec_jax.demo import artifacts
  from mmspec_jax.serving.app import Server
  config = cli.config()
  try:
    distributed.initialize(config)
    if artifacts.use_demo_checkpoints(config) and not config.served_model_name:
      config.served_model_name = artifacts.DEMO_MODEL_NAME
    server = Server(config)
  except (ValueError, OSError) as e:  # Bad settings or paths: the message says it.
    sys.exit(f'error: {e}')
  if not distributed.is_primary():  # Process 0 serves; this one runs what it admits.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # It stops when process 0 says so.
    server.engine.follow()
    return
  print(f'serving {server.model_name!r} on http://{config.host}:{config.port} (GET /health says '
        'when the programs are compiled)', flush=True)
  logging.getLogger('absl').setLevel(logging.WARNING)
  # uvicorn drains on SIGTERM, then restores the handler it found and raises the signal again:
  # finding this one, the process goes on to exit 0 instead of dying by the signal.
  signal.signal(signal.SIGTERM, lambda *_: None)
  uvicorn.run(server.app, host=config.host, port=config.port, log_level='warning',
              timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS)


def command():
  cli.run_command(main, usage=__doc__, default_config='serve',
                  help_modules=('mmspec_jax.serving.defaults', 'mmspec_jax.decoding.defaults',
                                'mmspec_jax.distributed'))
