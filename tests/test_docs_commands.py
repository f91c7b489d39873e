"""Every command in README.md and docs/ parses as written: the program exists, and each flag (every
`--config.FIELD=VALUE` included) is one the command's config and flags accept, with a value of
the field's type. Commands are read from the fenced code blocks; `...` stands for flags shown
elsewhere and placeholders (DIR, OUT.jsonl) are fine as strings. Running them is the other tests'
work (the quick start's one prompt and image: test_decode_cli)."""

import glob
import os
import re
import shlex

import pytest
from absl import flags
from ml_collections import config_flags

from mmspec_jax import cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# program -> (its default config, its flags besides --config)
COMMANDS = {
    'mmspec-decode': ('decode', ()), 'mmspec-serve': ('serve', ()),
    'mmspec-train': (None, ('workdir',)), 'mmspec-convert': ('convert', ()),
    'mmspec-plan': ('plan', ('output',)), 'mmspec-evaluate': ('evaluate', ()),
    'mmspec-bench': ('bench', ()), 'mmspec-demo': (None, ()),
    'mmspec-target-answers': ('target_answers', ()),
}
ALIASES = {  # The same commands under their module or script names.
    'decode.py': 'mmspec-decode', 'serve.py': 'mmspec-serve', 'train.py': 'mmspec-train',
    'mmspec_jax.convert': 'mmspec-convert', 'mmspec_jax.plan': 'mmspec-plan',
    'mmspec_jax.evaluation': 'mmspec-evaluate', 'mmspec_jax.bench': 'mmspec-bench',
    'mmspec_jax.demo': 'mmspec-demo', 'mmspec_jax.distillation': 'mmspec-target-answers',
    'mmspec_jax.distillation.target_answers': 'mmspec-target-answers',
}
WORLD_FLAGS = ('out_dir', 'seed', 'num_train_images', 'num_test_images', 'corpus_bytes',
               'image_size', 'patch_size', 'vocab_size', 'overwrite')


_COMMAND = re.compile(r'^\s*(\w+=\S+\s+)*(mmspec-|python3? (-m )?(mmspec_jax|decode\.py|serve\.py'
                      r'|train\.py))')


def _command_lines():
  """(file, line) of every command in the docs' code blocks, continuations joined."""
  found = []
  for path in [os.path.join(REPO, 'README.md')] + sorted(glob.glob(os.path.join(REPO, 'docs',
                                                                                '*.md'))):
    in_block, pending = False, ''
    with open(path, encoding='utf-8') as f:
      for line in f:
        if line.startswith('```'):
          in_block, pending = not in_block, ''
          continue
        if not in_block:
          continue
        pending += line.rstrip('\n')
        if pending.endswith('\\'):
          pending = pending[:-1] + ' '
          continue
        text, pending = pending, ''
        if not _COMMAND.match(text):
          continue
        words = shlex.split(text, comments=True)
        while words and '=' in words[0] and not words[0].startswith('-'):
          words = words[1:]  # VAR=value before the command
        if not words:
          continue
        if words[0] in ('python', 'python3'):
          words = words[2:] if words[1:2] == ['-m'] else words[1:]
          words[0] = os.path.basename(words[0]) if words else ''
        program = ALIASES.get(words[0], words[0]) if words else ''
        if program in COMMANDS or program == 'mmspec_jax.data.world':
          found.append((os.path.relpath(path, REPO), program, words[1:]))
  return found


LINES = _command_lines()


def test_the_docs_show_every_command():
  assert {program for _, program, _ in LINES} >= set(COMMANDS) - {'mmspec-demo'}


@pytest.mark.parametrize('where, program, args', LINES,
                         ids=[f'{w}:{p}:{i}' for i, (w, p, _) in enumerate(LINES)])
def test_command_parses_as_written(where, program, args, monkeypatch):
  monkeypatch.chdir(REPO)
  elided = '...' in args  # Flags shown elsewhere: for train, its --config among them.
  args = [a.strip('[]') for a in args
          if a not in ('...', '&', '[', ']') and a.strip('[]') and 'FIELD' not in a]
  if program == 'mmspec-train' and elided and not any(a.startswith('--config=') for a in args):
    args.insert(0, '--config=draft_pretrain:tiny')
  argv = cli.rewrite_config_flags(args)
  monkeypatch.setattr('sys.argv', ['prog'] + argv)  # ml_collections reads overrides from here.
  values = flags.FlagValues()
  if program == 'mmspec_jax.data.world':
    for name in WORLD_FLAGS:
      flags.DEFINE_string(name, None, '', flag_values=values)
  else:
    default, extra = COMMANDS[program]
    config_flags.DEFINE_config_file('config', cli.config_file(default) if default else None,
                                    flag_values=values, lock_config=True)
    for name in extra:
      flags.DEFINE_string(name, None, '', flag_values=values)
  try:
    values(['prog'] + argv)
    if 'config' in values and values['config'].value is not None:
      values['config'].value.to_dict()  # The overrides were applied to a real config.
  except Exception as e:  # noqa: BLE001 (any failure is the docs' fault; say which line)
    pytest.fail(f'{where}: {program} {" ".join(args)}\n  -> {type(e).__name__}: {e}')
