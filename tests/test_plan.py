"""The plan check runs end to end for a scaled-down config on 8 fake CPU devices."""

import json
import math
import os
import subprocess
import sys

import pytest

from mmspec_jax.models import presets

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ['--config.target=tiny_llava', '--config.draft=tiny_llama', '--config.prompt_length=64',
         '--config.max_new_tokens=64', '--config.train.batch_size=8', '--config.train.seq_len=64',
         '--config.dtype=float32', '--config.memory_per_device_gib=0.5', '--config.live_length=96',
         # 6 slots: a number the 8-device data axis does not divide.
         '--config.slots.num_slots=6', '--config.slots.capacity=192']


def _plan(tmp_path, name, *flags):
  output = tmp_path / f'{name}.json'
  # The plan reads XLA's cost analysis, which depends on how XLA:CPU fuses: the plan compiles
  # with the fusion emitters its users have, whatever the suite's faster-compiling flags are.
  test_flags = os.environ.get('MMSPEC_TEST_XLA_FLAGS', '').replace(
      '--xla_cpu_use_fusion_emitters=false', '')
  env = {**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=8 ' + test_flags}
  result = subprocess.run(
      [sys.executable, '-m', 'mmspec_jax.plan', '--config=' + os.path.join(REPO, 'configs',
                                                                          'plan.py'),
       f'--output={output}', *SMALL, *flags], capture_output=True, text=True, env=env,
      timeout=600, cwd=REPO)
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stdout, json.loads(output.read_text())


@pytest.fixture(scope='module')
def plans(tmp_path_factory):
  tmp_path = tmp_path_factory.mktemp('plan')
  replicated = _plan(tmp_path, 'replicated', '--config.mesh.data=8', '--config.mesh.tensor=1')
  sharded = _plan(tmp_path, 'sharded', '--config.mesh.data=2', '--config.mesh.tensor=4')
  return replicated, sharded


def test_reports_decoding_and_training_memory(plans):
  stdout, reports = plans[1]
  assert '8 cpu devices' in stdout and 'GiB per device' in stdout
  decoding, slots, training = reports
  assert decoding['program'].startswith('speculative decoding tiny_llava + tiny_llama')
  assert slots['program'].startswith('continuous batching tiny_llava + tiny_llama, gamma 5, '
                                     '6 slots x 192 positions')
  assert training['program'].startswith('train step tiny_llama')
  for report in reports:
    assert report['parameter_bytes'] > 0 and report['temp_size_in_bytes'] > 0
    assert report['fits']
  assert decoding['kv_cache_bytes'] > 0 and training['optimizer_bytes'] > 0
  # The persistent state is mostly its caches, and the chunk program updates it in place.
  assert 0.5 * slots['state_bytes'] < slots['kv_cache_bytes'] < slots['state_bytes']
  assert slots['alias_size_in_bytes'] >= slots['kv_cache_bytes']


def test_tensor_parallelism_divides_parameter_bytes(plans):
  (_, replicated), (_, sharded) = plans
  # The target's weights split over tensor; the draft's stay whole (sharding.DRAFT_RULES).
  target = lambda report: report['parameter_bytes'] - report['draft_parameter_bytes']
  assert target(sharded[0]) < 0.5 * target(replicated[0])
  assert sharded[0]['draft_parameter_bytes'] == replicated[0]['draft_parameter_bytes'] > 0
  assert sharded[2]['optimizer_bytes'] < 0.5 * replicated[2]['optimizer_bytes']
  # The slots' caches: 6 slots do not divide data=8 (replicated there); data=2 halves them.
  assert sharded[1]['kv_cache_bytes'] <= 0.5 * replicated[1]['kv_cache_bytes']


def _ideal(model, rows: int, tokens: int, live: int) -> int:
  """One device's ideal bytes of a float32 `extend` on the replicated mesh (every weight and kv
  head on every device, `rows` rows per device), from the config alone."""
  d, h, f = model.hidden_size, model.head_dim, model.intermediate_size
  n, k, layers = model.num_heads, model.num_kv_heads, model.num_layers
  per_layer = d * (n + 2 * k) * h + n * h * d + 3 * d * f + 2 * d  # attention, MLP, two norms
  weights = layers * per_layer + d + d * model.vocab_size  # + final norm + LM head (untied)
  weights += rows * tokens * d  # the embedding rows gathered, not the whole table
  kv = 2 * layers * rows * k * h  # keys and values of one position
  return 4 * (weights + kv * live + kv * tokens)


def test_cost_report(plans):
  (stdout, reports), _ = plans
  costs = reports[0]['costs']
  assert 'speedup = tau * t_step / (gamma * t_draft + t_verify)' in stdout
  assert costs['per'] == 'device' and costs['cost_dtype'] == 'float32'
  target = presets.get('tiny_llava')
  draft = presets.get('tiny_llama')
  image_slots = target.num_image_tokens
  rows = 8 // 8  # batch 8 over data=8
  expected = {'target step': (target.text, 1, 96, 64 + 64 + 5 + 1),
              'verification': (target.text, 6, 96, 64 + 64 + 5 + 1),
              'draft step': (draft, 1, 96 - image_slots, 64 - image_slots + 64 + 5 + 1)}
  assert [call['call'] for call in costs['calls']] == list(expected)
  for call in costs['calls']:
    model, tokens, live, capacity = expected[call['call']]
    assert (call['tokens_per_row'], call['live_length'], call['cache_capacity']) == (
        tokens, live, capacity)
    assert call['xla_bytes_accessed'] > call['bytes_accessed'] > 0 and call['flops'] > 0
    assert call['ideal_bytes'] == _ideal(model, rows, tokens, live), call['call']
    assert math.isfinite(call['ratio']) and 1 <= call['ratio'] < 50
    assert call['cache_aliased'] and call['temp_size_in_bytes'] >= 0
    assert call['kv_cache_bytes'] == 2 * 4 * model.num_layers * rows * capacity * (
        model.num_kv_heads * model.head_dim)
    times = call['predicted_seconds']
    assert set(times) == {'TPU v5e', 'TPU v5p', 'H100 SXM', 'H200'}
    assert times['TPU v5e'] > times['H200'] > 0
  assert 0 < costs['speedup'] < costs['tau'] and 0 < costs['ideal_speedup'] < costs['tau']
  # Over tensor=4 each device does at most half of its rows' matmuls: a fused kernel flattened
  # across its sharded axis was gathered whole on every call, and each device computed the
  # whole MLP (475 and 2,844 kFLOP here against the bounds of 362 and 2,175).
  text = target.text
  matmul_params = text.num_layers * (
      text.hidden_size * (text.num_heads + 2 * text.num_kv_heads) * text.head_dim
      + text.num_heads * text.head_dim * text.hidden_size
      + 3 * text.hidden_size * text.intermediate_size) + text.hidden_size * text.vocab_size
  for call in plans[1][1][0]['costs']['calls'][:2]:
    rows_here = 8 // 2 * call['tokens_per_row']  # batch 8 over data=2
    assert call['flops'] < 0.5 * 2 * rows_here * matmul_params, call['call']
    assert call['collectives']['all-reduce'] > 0


def test_assumed_tau_comes_from_the_demo_results_or_the_paper(tmp_path):
  from mmspec_jax import cli
  from mmspec_jax.plan import memory as plan_module
  config = cli.load_config('plan')
  assert config.tau == 0 and config.num_draft_tokens == 5
  cells = [{'draft': 'language', 'sampling': 'greedy', 'gamma': 5, 'shape': None,
            'block_efficiency': tau} for tau in (2.0, 3.0)]
  cells += [{'draft': 'language', 'sampling': 'greedy', 'gamma': 3, 'shape': None,
             'block_efficiency': 9.0},
            {'draft': 'adapter', 'sampling': 'greedy', 'gamma': 5, 'shape': None,
             'block_efficiency': 9.0}]
  results = tmp_path / 'results.json'
  results.write_text(json.dumps({'cells': cells}))
  tau, source = plan_module.assumed_tau(config, str(results))
  assert tau == 2.5 and "make demo's language draft at gamma 5 over its 2 tasks" in source
  config.draft = 'tiny_feature_draft'  # A feature draft's tau is the demo's feature draft's.
  results.write_text(json.dumps({'cells': cells + [dict(cells[0], draft='feature')]}))
  tau, source = plan_module.assumed_tau(config, str(results))
  assert tau == 2.0 and "make demo's feature draft at gamma 5 over its 1 tasks" in source
  config.draft = 'draft_115m'
  results.write_text(json.dumps({'cells': cells}))
  tau, source = plan_module.assumed_tau(config, str(tmp_path / 'missing.json'))
  assert tau == plan_module.PAPER_TAU and source.startswith("the paper's")
  config.tau = 2.65
  assert plan_module.assumed_tau(config, str(results)) == (2.65, 'config.tau')


def test_a_feature_draft_with_a_dynamic_tree(tmp_path):
  """The feature draft's decoding program, with a dynamic tree, on a (data 2, tensor 4) mesh
  whose data axis does not divide the 6 slots; its cost report adds the fc (`fuse`), once per
  step, and its draft step's cache holds the image positions, as the target's."""
  stdout, reports = _plan(tmp_path, 'feature', '--config.draft=tiny_feature_draft',
                          '--config.draft_tree=dynamic:5,4,24', '--config.mesh.data=2',
                          '--config.mesh.tensor=4')
  assert 'no train step planned for the feature draft' in stdout
  decoding, slots = reports
  assert decoding['program'].startswith('speculative decoding tiny_llava + tiny_feature_draft, '
                                        'tree dynamic:5,4,24')
  assert slots['alias_size_in_bytes'] >= slots['kv_cache_bytes'] > 0
  costs = decoding['costs']
  assert [c['call'] for c in costs['calls']] == ['target step', 'verification', 'draft step',
                                                 'fuse']
  target, verification, draft, fuse = costs['calls']
  feature = presets.get('tiny_feature_draft')
  # fc: [K, Dt] -> D, float32, whole on every device (the draft's rules replicate weights).
  assert fuse['ideal_bytes'] == len(feature.feature_layers) * 64 * feature.text.hidden_size * 4
  assert fuse['tokens_per_row'] == 6 and 0.5 < fuse['ratio'] < 3
  assert draft['cache_capacity'] == target['cache_capacity']
  assert costs['formula'] == 'speedup = tau * t_step / (gamma * t_draft + t_fuse + t_verify)'
  assert 0 < costs['speedup'] < costs['tau']
