r"""Speculative decoding: one prompt (and image), or a JSONL file of prompts.

  mmspec-decode --config.prompt="What is in the image?" --config.image=examples/images/shapes.png
  mmspec-decode --config.target=DIR [--config.draft=DIR] --config.prompts=IN.jsonl \
      --config.output=OUT.jsonl [--config.num_draft_tokens=5] [--config.draft_tree=3,2,1] ...

With no target, the pair `make demo` trained (its distilled draft). A target or draft may be a
directory or a Hugging Face Hub id (org/name) in the local cache. One prompt: the answer is printed
as it streams, then its statistics on one line. A file: OUT.jsonl and OUT.summary.json are
written and the run's statistics printed. Bad input stops the run before anything is decoded, with
`error: ...` and a non-zero exit status. On several hosts, run the same command on each with
--config.multihost=True (docs/multihost.md).
"""

from __future__ import annotations

import sys

from absl import app

from mmspec_jax import cli


def one_line(stats, finished) -> str:
  """A single request's statistics on one line."""
  parts = [f'{stats.new_tokens} tokens', f'{stats.target_calls} target calls']
  if stats.num_draft_tokens:
    parts.append(f'tau {stats.block_efficiency:.2f}')
  if stats.tokens_per_second:
    parts.append(f'{stats.tokens_per_second:.1f} tokens/s')
  if finished.first_token is not None:
    parts.append(f'first token {finished.first_token - finished.submitted:.3f}s')
  if stats.compile_seconds is not None:
    parts.append(f'compiled in {stats.compile_seconds:.1f}s')
  if finished.stopped_by is not None:
    parts.append(f'stopped by {finished.stopped_by!r}')
  return '[' + ', '.join(parts) + ']'


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  cli.configure_console()
  from mmspec_jax import distributed
  from mmspec_jax.decoding import runner, statistics
  from mmspec_jax.demo import artifacts
  config = cli.config()
  try:
    artifacts.use_demo_checkpoints(config)
    if config.prompt:
      def write(piece):
        if distributed.is_primary():
          sys.stdout.write(piece)
          sys.stdout.flush()
      stats, finished = runner.run_prompt(config, write)
    else:
      stats = runner.run(config)
  except (ValueError, OSError) as e:  # Bad input or paths: the message says it; no traceback.
    sys.exit(f'error: {e}')
  if not distributed.is_primary():  # Process 0 wrote the files; it alone reports.
    return
  if config.prompt:
    print('\n' + one_line(stats, finished))
  else:
    print(statistics.format_table(stats))
    print(f'wrote {config.output} and {runner.summary_path(config.output)}')


def command():
  cli.run_command(main, usage=__doc__, default_config='decode',
                  help_modules=('mmspec_jax.decoding.defaults', 'mmspec_jax.distributed'))
