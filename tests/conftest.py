import atexit
import os
import shutil
import sys
import tempfile

# Tests import their shared fixtures (decoding_fixtures) as top-level modules.
sys.path.insert(0, os.path.dirname(__file__))

# XLA:CPU compiling fast: the suite's programs are tiny and compiled once or twice each, so
# compiling is most of its time. LLVM at -O0 compiles them about a third faster
# (test_decoding_greedy: 99 s -> 65 s) and the matmuls, library calls, run as fast; XLA:CPU's
# older loop emitters instead of its MLIR fusion emitters take another third off the CPU time
# (test_decoding_greedy: 88 -> 58 CPU seconds). Tests that start processes with their own
# XLA_FLAGS (fake device counts) add these too (MMSPEC_TEST_XLA_FLAGS).
os.environ.setdefault('MMSPEC_TEST_XLA_FLAGS', '--xla_backend_optimization_level=0 '
                      '--xla_cpu_use_fusion_emitters=false')
if os.environ['MMSPEC_TEST_XLA_FLAGS'] not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' '
                             + os.environ['MMSPEC_TEST_XLA_FLAGS']).strip()

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

# The longest files first. `make test` runs pytest-xdist with --dist loadfile, which hands whole
# files to its 2 workers in collection order: a long file collected last (alphabetical order puts
# test_training_restarts and test_world_training there) would run alone at the end while the
# other worker idles. Measured totals per file, longest first; the rest keep their order.
_LONGEST_FIRST = (
    'test_decode_cli.py', 'test_training_restarts.py', 'test_decoding_sampling.py',
    'test_continuous_batching.py', 'test_world_training.py', 'test_serving.py',
    'test_evaluate.py', 'test_sharded_decoding.py', 'test_plan.py', 'test_pallas_attention.py',
    'test_dynamic_tree.py', 'test_bfloat16.py', 'test_decoding_feature.py',
    'test_decoding_greedy.py', 'test_decoding_layout.py', 'test_kv_cache.py',
    'test_training_loop.py', 'test_decoding_trees.py', 'test_feature_draft.py',
    'test_data_pipeline.py', 'test_training_step.py', 'test_packaging.py', 'test_conversion.py')


def pytest_collection_modifyitems(session, config, items):
  del session, config
  rank = {name: index for index, name in enumerate(_LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(os.path.basename(str(item.path)), len(rank)))
