r"""Trains a draft (or the demo's target): `mmspec-train --config=draft_pretrain:PRESET --workdir=DIR`.

Stages (configs/): draft_pretrain, draft_chat, draft_distill, adapter_stage1, adapter_stage2,
target; each takes a preset, `:tiny` (CPU smoke scale, the default) or `:paper` (the 115M draft on a
TPU slice). Override any field with --config.FIELD=VALUE. Rerunning with the same --workdir
resumes from its newest checkpoint. Before the first step it prints the stage, the preset, the
parameter count, the tokens per step and the number of steps.
"""

from absl import app, flags

from mmspec_jax import cli


def _define_flags():
  flags.DEFINE_string('workdir', None, 'Checkpoints, summaries and exports.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  cli.configure_console()
  config, workdir = cli.config(), flags.FLAGS.workdir
  if config is None:
    raise app.UsageError('--config is required, e.g. --config=draft_pretrain:tiny')
  if not workdir:
    raise app.UsageError('--workdir is required: where checkpoints, summaries and exports go')
  from mmspec_jax.training.loop import train_and_evaluate
  try:
    train_and_evaluate(config, workdir)
  except ValueError as e:
    raise SystemExit(f'error: {e}') from None


def command():
  cli.run_command(main, usage=__doc__, default_config=None,
                  help_modules=('mmspec_jax.training.defaults',), define_flags=_define_flags)
