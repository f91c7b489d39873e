import atexit
import os
import shutil
import sys
import tempfile

# Tests import their shared fixtures (decoding_fixtures) as top-level modules.
sys.path.insert(0, os.path.dirname(__file__))

# One persistent compilation cache for this test session: the pytest workers and every train.py
# and decode.py the tests start compile the same tiny programs many times over. A fresh
# directory per session (made by the first process, inherited by the workers and subprocesses
# through the environment), so a run never reuses another run's programs.
if 'MMSPEC_TEST_COMPILATION_CACHE' not in os.environ:
  _cache = tempfile.mkdtemp(prefix='mmspec-jax-test-cache-')
  atexit.register(shutil.rmtree, _cache, ignore_errors=True)
  os.environ.update(MMSPEC_TEST_COMPILATION_CACHE=_cache, JAX_COMPILATION_CACHE_DIR=_cache,
                    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
                    JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0')
