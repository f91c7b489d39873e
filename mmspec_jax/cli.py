"""What every command shares: its packaged config, a quiet console, `--help` with the fields.

Every command (decode.py, serve.py, train.py and the `mmspec-*` console scripts) takes one
ml_collections config: `--config=FILE[:ARG]` (optional where the command has a default) and
`--config.FIELD=VALUE` for any field. FILE may be a path, or the name of a config shipped with the
package (`configs/` installs as `mmspec_jax.configs`): `--config=draft_pretrain:tiny`,
`--config=configs/draft_pretrain.py:tiny` and an absolute path all work from any directory.

The console is quiet by default: INFO lines from outside this package (absl, orbax, jax,
tensorflow; every library logs through the root logger's absl handler, which filters them) are
hidden, ours and every warning stay; `--verbosity=1` shows everything.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Callable, Sequence

# TensorFlow (it only reads and decodes the TFDS records) logs from C++ at import unless told
# otherwise; its oneDNN notice ignores the level and goes only with oneDNN's ops, which reading
# records does not need.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')

_PACKAGE_ROOT = os.path.dirname(os.path.abspath(__file__))


def configs_dir() -> str:
  """The directory of the shipped configs: mmspec_jax/configs in an install, else (a checkout
  not installed) the repository's configs/."""
  try:
    from importlib import resources
    path = str(resources.files('mmspec_jax.configs'))
    if os.path.isfile(os.path.join(path, 'decode.py')):
      return path
  except (ModuleNotFoundError, TypeError):
    pass
  return os.path.join(os.path.dirname(_PACKAGE_ROOT), 'configs')


def config_file(name: str) -> str:
  """The path of the shipped config `name` ('decode', 'configs/decode.py', 'decode.py')."""
  base = os.path.basename(name)
  return os.path.join(configs_dir(), base if base.endswith('.py') else base + '.py')


def resolve_config_argument(value: str) -> str:
  """`--config`'s value with its file found: an existing path stays; otherwise a shipped config
  of that name (its basename) is used. The ':ARG' suffix is kept."""
  path, sep, arg = value.partition(':')
  if os.path.isfile(path) or not path:
    return value
  shipped = config_file(path)
  return shipped + sep + arg if os.path.isfile(shipped) else value


def rewrite_config_flags(argv: list[str]) -> list[str]:
  """argv with every `--config=X` / `--config X` resolved (resolve_config_argument)."""
  out, i = [], 0
  while i < len(argv):
    arg = argv[i]
    if arg.startswith('--config='):
      arg = '--config=' + resolve_config_argument(arg[len('--config='):])
    elif arg == '--config' and i + 1 < len(argv):
      out += [arg, resolve_config_argument(argv[i + 1])]
      i += 2
      continue
    out.append(arg)
    i += 1
  return out


class _OursOrWarnings(logging.Filter):
  """Lets through warnings and errors, and records from this package or the top-level scripts."""

  def filter(self, record: logging.LogRecord) -> bool:
    if record.levelno >= logging.WARNING:
      return True
    path = os.path.abspath(record.pathname)
    return (path.startswith(_PACKAGE_ROOT + os.sep)
            or os.path.dirname(path) == os.path.dirname(_PACKAGE_ROOT))


class _PlainFormatter(logging.Formatter):
  """Our INFO lines as plain text; warnings and errors with their level."""

  def format(self, record: logging.LogRecord) -> str:
    message = super().format(record)
    return message if record.levelno < logging.WARNING else (
        f'{record.levelname.lower()}: {message}')


def configure_console():
  """Quiet by default (see the module docstring); call at the start of a command's main."""
  from absl import flags
  from absl import logging as absl_logging
  verbosity = flags.FLAGS['verbosity'].value if 'verbosity' in flags.FLAGS else 0
  if verbosity >= 1:
    return
  # transformers' advice (install OpenCV, ...) is not the user's business here.
  os.environ.setdefault('TRANSFORMERS_VERBOSITY', 'error')
  handler = absl_logging.get_absl_handler()
  if not any(isinstance(f, _OursOrWarnings) for f in handler.filters):
    handler.addFilter(_OursOrWarnings())
    handler.setFormatter(_PlainFormatter())


def field_help(config, modules: Sequence[str], files: Sequence[str] = ()) -> str:
  """The config's fields, with the comments above them in the source of `modules` and `files`
  (what builds its defaults), for --help."""
  comments = _field_comments(modules, files)
  lines = ['Config fields (set with --config.FIELD=VALUE):']
  for name in sorted(config.keys()):
    value = config[name]
    shown = repr(value) if not hasattr(value, 'keys') else '{' + ', '.join(
        f'{k}={value[k]!r}' for k in value.keys()) + '}'
    lines.append(f'  {name} = {shown if len(shown) <= 70 else shown[:67] + "..."}')
    lines += [f'      {line}' for line in comments.get(name, [])]
  return '\n'.join(lines)


def _field_comments(modules: Sequence[str], files: Sequence[str]) -> dict[str, list[str]]:
  """field -> the comment lines right above `config.FIELD = ...` in the sources."""
  import importlib
  import inspect
  comments: dict[str, list[str]] = {}
  sources = [inspect.getsource(importlib.import_module(name)) for name in modules]
  for path in files:
    with open(path, encoding='utf-8') as f:
      sources.append(f.read())
  for source in sources:
    pending: list[str] = []
    for line in source.splitlines():
      stripped = line.strip()
      if stripped.startswith('#'):
        pending.append(stripped.lstrip('#').strip())
        continue
      match = re.match(r'(?:config|c)\.(\w+)\s*=', stripped)
      if match and pending:
        comments.setdefault(match.group(1), pending)
      pending = []
  return comments


def load_config(value: str):
  """The ConfigDict of FILE[:ARG] (a path or a shipped config's name), as `--config` loads it."""
  from ml_collections.config_flags import config_flags
  path, _, arg = resolve_config_argument(value).partition(':')
  module = config_flags._LoadConfigModule(f'{os.path.basename(path)}_help', path)
  return module.get_config(arg) if arg else module.get_config()


def _help_requested(argv: Sequence[str]) -> bool:
  return any(a in ('-h', '--help', '--helpshort', '-?') for a in argv[1:])


def run_command(main: Callable[[list[str]], None], *, usage: str, default_config: str | None,
                help_modules: Sequence[str] = (), define_flags: Callable[[], None] | None = None):
  """Defines `--config` (defaulting to the shipped `default_config`) and any other flags, then
  absl's app.run(main) with --config resolved against the shipped configs; `--help` prints
  `usage` and the config's fields with their comments (from `help_modules`). Flags are defined
  here, not at import, so that any number of commands' modules import side by side."""
  from absl import app, flags
  from ml_collections import config_flags
  default = config_file(default_config) if default_config else None
  if 'config' not in flags.FLAGS:
    config_flags.DEFINE_config_file(
        'config', default, 'The config: a file or the name of a shipped one, [:ARG].',
        lock_config=True)
  if define_flags is not None:
    define_flags()
  argv = rewrite_config_flags(list(sys.argv))
  if _help_requested(argv):
    value = next((a.split('=', 1)[1] for a in argv if a.startswith('--config=')), default)
    print(usage.strip() + '\n')
    if value:
      print(field_help(load_config(value), help_modules, [value.partition(':')[0]]))
    print('\nOther flags: --verbosity=1 shows the INFO lines of absl, orbax and jax; '
          '--helpfull lists every absl flag.')
    sys.exit(0)
  sys.argv = argv
  app.run(main)


def main_running(run: Callable, errors: tuple[type[BaseException], ...] = (ValueError, OSError)):
  """A command's main (for run_command) that takes no positional arguments, quiets the console
  and calls run(config); `errors` (bad input) end it with `error: ...` and no traceback."""
  def main(argv):
    from absl import app
    if len(argv) > 1:
      raise app.UsageError(f'unexpected arguments: {argv[1:]}')
    configure_console()
    try:
      run(config())
    except errors as e:
      sys.exit(f'error: {e}')
  return main


def config():
  """The parsed `--config` (in a command's main)."""
  from absl import flags
  return flags.FLAGS['config'].value
