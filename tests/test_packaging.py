"""`pip install .` (not editable) into a fresh virtual environment: every console script runs from
any directory, and finds the configs installed with the package."""

import os
import site
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ('mmspec-decode', 'mmspec-serve', 'mmspec-train', 'mmspec-convert', 'mmspec-plan',
           'mmspec-evaluate', 'mmspec-bench', 'mmspec-demo', 'mmspec-target-answers')


@pytest.fixture(scope='module')
def venv(tmp_path_factory):
  """A fresh venv with the package installed from a wheel built from this checkout. Its
  dependencies are this environment's (a .pth line), so nothing is downloaded."""
  root = tmp_path_factory.mktemp('venv')
  subprocess.run([sys.executable, '-m', 'venv', '--without-pip', str(root)], check=True)
  python = str(root / 'bin' / 'python')
  site_packages = subprocess.run(
      [python, '-c', 'import site; print(site.getsitepackages()[0])'], check=True,
      capture_output=True, text=True).stdout.strip()
  with open(os.path.join(site_packages, 'dependencies.pth'), 'w') as f:
    f.write(site.getsitepackages()[0] + '\n')
  result = subprocess.run(
      [sys.executable, '-m', 'pip', '--python', python, 'install', '--quiet', '--no-deps',
       '--no-build-isolation', REPO], capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  return root


def test_the_package_and_its_configs_come_from_the_install(venv, tmp_path):
  result = subprocess.run(
      [str(venv / 'bin' / 'python'), '-c',
       'import mmspec_jax, mmspec_jax.cli as cli; print(mmspec_jax.__file__); '
       'print(cli.config_file("decode")); print(cli.config_file("draft_pretrain"))'],
      cwd=tmp_path, capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr
  package, decode_config, train_config = result.stdout.split()
  for path in (package, decode_config, train_config):
    assert path.startswith(str(venv)) and os.path.isfile(path)


@pytest.mark.parametrize('script', SCRIPTS)
def test_every_console_script_runs_from_any_directory(venv, tmp_path, script):
  flags = ['--config=draft_pretrain:tiny'] if script == 'mmspec-train' else []
  result = subprocess.run([str(venv / 'bin' / script), *flags, '--help'], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'Other flags: --verbosity=1' in result.stdout
  if script != 'mmspec-demo':  # The demo has no config: every other command lists its fields.
    assert 'Config fields (set with --config.FIELD=VALUE):' in result.stdout
