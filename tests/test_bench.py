"""The benchmark's arithmetic and reporting (the timed runs themselves are `make bench`, not tests)."""

import types

import jax
import numpy as np
import pytest

from mmspec_jax import cli
from mmspec_jax.bench import __main__ as bench_main
from mmspec_jax.bench import assisted, autoregressive, report, speculative, timing
from mmspec_jax.bench.timing import Timing
from mmspec_jax.decoding import inputs
from mmspec_jax.models import initialize, presets


def test_timing_rate_orders_slowest_and_fastest():
  timing = Timing.of([2.0, 1.0, 4.0])
  assert timing.median == 2.0
  assert timing.rate(8) == {'median': 4.0, 'low': 2.0, 'high': 8.0}


def test_bytes_per_token_counts_one_embedding_row_and_the_cache():
  config = presets.get('tiny_llama')
  params = jax.tree.map(np.asarray, initialize(config, jax.random.key(0)))
  params = jax.tree.map(lambda x: getattr(x, 'value', x), params,
                        is_leaf=lambda x: hasattr(x, 'value'))
  total = sum(x.size * 4 for x in jax.tree.leaves(params))
  table = params['embed_tokens']['embedding']
  cache = 2 * config.num_layers * (10 + 4) * config.num_kv_heads * config.head_dim * 4
  expected = total - table.size * 4 + table.shape[1] * 4 + cache
  if config.tie_word_embeddings:
    expected += table.size * 4
  assert autoregressive.bytes_per_token(config, params, 10, 8) == expected


def test_predicted_speedup_is_tau_when_drafts_and_prefills_are_free():
  ar = {'new_tokens': 33}
  spec = {'gamma': 3, 'num_prompts': 1, 'new_tokens': 33, 'verification_steps': 8, 'tau': 4.0,
          'shape': None, 'verified_tokens': 4}
  costs = {'target_prefill': 0.0, 'draft_prefill': 0.0, 'target_1': 1.0, 'target_4': 1.0,
           'draft_1': 0.0}
  predicted = speculative.predicted_speedup(ar, spec, costs)
  assert predicted['end_to_end'] == pytest.approx(4.0)
  assert predicted['steady_state'] == pytest.approx(4.0)
  # A draft step at a tenth of a target step, and a prefill worth 10 steps.
  costs.update(draft_1=0.1, target_prefill=10.0)
  predicted = speculative.predicted_speedup(ar, spec, costs)
  assert predicted['steady_state'] == pytest.approx(4.0 / 1.3)
  assert predicted['end_to_end'] == pytest.approx((10 + 32) / (10 + 8 * 1.3))


def test_predicted_speedup_of_a_tree_and_an_adaptive_chain():
  """A tree's step: its first draft call, one call per depth below the deepest on that depth's
  nodes, one verification of N + 1 tokens; an adaptive length's: the calls it made per step."""
  ar = {'new_tokens': 33}
  costs = {'target_prefill': 0.0, 'draft_prefill': 0.0, 'target_1': 1.0, 'target_10': 1.5,
           'target_4': 1.1, 'draft_1': 0.1, 'draft_3': 0.12, 'draft_6': 0.15}
  tree = {'gamma': 3, 'num_prompts': 1, 'new_tokens': 33, 'verification_steps': 8, 'tau': 4.0,
          'shape': '3x2x1', 'verified_tokens': 16, 'draft_calls_per_step': 3.0}
  assert speculative.draft_call_widths(speculative.DraftTree((3, 2, 1))) == [3, 6]
  costs['target_16'] = 2.0
  predicted = speculative.predicted_speedup(ar, tree, costs)
  assert predicted['steady_state'] == pytest.approx(4.0 / (0.1 + 0.12 + 0.15 + 2.0))
  adaptive = dict(tree, shape='1x1x1@0.5', verified_tokens=4, draft_calls_per_step=1.5)
  predicted = speculative.predicted_speedup(ar, adaptive, costs)
  assert predicted['steady_state'] == pytest.approx(4.0 / (1.5 * 0.1 + 1.1))


def test_text_only_prompts_drop_placeholders_and_images():
  request = inputs.Request(id=0, line=1, token_ids=(1, 7, 4, 4, 9), image='x.png')
  session = types.SimpleNamespace(target_config=types.SimpleNamespace(image_token_index=4))
  pair = speculative.Pair(session=session, requests=[request], length=8)
  [text] = assisted.text_only(pair).requests
  assert text.token_ids == (1, 7, 9) and text.image is None


@pytest.mark.parametrize('fields, message', [
    ({'sections': '1,8'}, 'choose among'), ({'sections': 'a'}, 'comma-separated'),
    ({'repeats': 0}, 'repeats')])
def test_bad_settings_are_named(fields, message):
  config = cli.load_config('bench')
  config.update(fields)
  with pytest.raises(ValueError, match=message):
    bench_main.sections(config)
  assert bench_main.sections(cli.load_config('bench')) == [1, 2, 3, 4, 5, 6, 7]


def _rate(median):
  return {'median': median, 'low': median * 0.9, 'high': median * 1.1}


def test_median_run_and_paired_ratio():
  runs = [{'tokens_per_second': rate} for rate in (30.0, 10.0, 20.0, 40.0)]
  assert timing.median_run(runs) == {'tokens_per_second': 20.0}  # The lower middle of 4.
  assert timing.median_run(runs[:3]) == {'tokens_per_second': 20.0}
  baselines = [{'tokens_per_second': rate} for rate in (10.0, 10.0, 10.0, 10.0)]
  # Each run over its own baseline, not the medians' ratio.
  assert timing.paired_ratio(runs[:3], baselines[:3]) == (2.0, (1.0, 3.0))
  assert timing.paired_ratio(runs, [{'tokens_per_second': 20.0}] + baselines[1:]) == (
      1.75, (1.0, 4.0))


def test_markdown_reports_goals_met_and_missed(tmp_path):
  results = {
      'machine': {'cpu': 'test cpu', 'cores': 2, 'memory_gib': 24, 'jax': '0', 'torch': '0',
                  'transformers': '0', 'read_bandwidth_gb_s': 10.0, 'repeats': 3},
      'autoregressive': {
          'model': {'parameters': 1.1e9}, 'prompt_length': 64, 'new_tokens': 128, 'threads': 2,
          'read_bandwidth': {'bytes_per_second': 9e9, 'kernel': 'float32 sum', 'probes': {
              'float32 sum': _rate(8e9), 'bfloat16 3-row matmul': _rate(7e9)}},
          'precisions': {dtype: {
              'bytes_per_token': 4.4e9 / scale, 'roofline_tokens_per_second': 2.0 * scale,
              'ours': {'tokens_per_second': _rate(1.8 * scale), 'compile_seconds': 3.0},
              'transformers': {'tokens_per_second': _rate(1.5), 'warmup_seconds': 1.0},
              'same_tokens_as_transformers': 128} for dtype, scale in (('float32', 1),
                                                                        ('bfloat16', 2))},
          'fastest_precision': 'bfloat16', 'transformers_fastest_precision': 'float32',
          'auto_precision': 'bfloat16', 'fraction_of_roofline': 0.9,
          'speedup_over_transformers': 1.2},
      'speculative': {'widened target, bfloat16': {
          'dtype': 'bfloat16', 'target_parameters': 1e6, 'autoregressive': {
              'tokens_per_second': _rate(100)},
          'best_autoregressive': {'decoder': 'ours, bfloat16', 'tokens_per_second': 100,
                                  'candidates': {'ours, bfloat16': 100,
                                                 'transformers, float32': 60}},
          'speculative': [{
              'gamma': 3, 'tau': 2.5, 'cost_ratio': 0.1, 'tokens_per_second': _rate(150),
              'predicted_speedup': 2.0, 'predicted_steady_state_speedup': 2.2,
              'measured_speedup': 1.5, 'measured_over_predicted': 0.75,
              'speedup_over_best_autoregressive': 1.5,
              'tokens_identical_to_autoregressive': True}]}},
      'assisted': {'image': {'transformers_assisted_default': {'error': 'ValueError: boom'}}},
      'cache_capacity': {
          'model': {'parameters': 22e6, 'weight_bytes': 88e6}, 'batch_size': 8,
          'mean_prompt_tokens': 60, 'live_tokens': 92, 'step_ratio': 1.25, 'rows': [
              {'prompt_bucket': bucket, 'cache_capacity': bucket + 65, 'cache_bytes': 1e8,
               'step_ms': 10.0, 'step_ms_low': 9.0, 'step_ms_high': 11.0, 'prefill_ms': 400.0,
               'generate_step_ms': 10.5} for bucket in (256, 2048)]},
  }
  run = lambda rate, used: {'tokens_per_second': rate, 'slot_utilization': used,
                            'ideal_utilization': 0.87, 'utilization_while_waiting': 0.97,
                            'time_to_first_token': {'p50': 0.1, 'p99': 0.2},
                            'per_token_latency': {'p50': 0.01}, 'chunks': 40, 'steps': 90,
                            'prefill_calls': 8}
  results['continuous'] = {'ragged speculative': {
      'static': run(100, 0.38), 'continuous': run(210, 0.86), 'speedup': 2.1,
      'tokens_identical': True, 'chunk_steps': {4: run(190, 0.85)},
      'arrival': run(180, 0.84)}}
  clients = lambda rate, ratio, low, high: {
      'tokens_per_second': rate, 'requests_per_second': 30.0, 'over_offline': ratio,
      'over_offline_range': (low, high), 'repeats': 3,
      'time_to_first_token': {'p50': 0.1, 'p99': 0.2}, 'inter_token_latency': {'p50': 0.01,
                                                                             'p99': 0.05}}
  results['serving'] = {'speculative': {
      'offline': {'tokens_per_second': 1000.0, 'requests_per_second': 40.0},
      'clients': {1: clients(250, 0.25, 0.2, 0.3), 16: clients(830, 0.83, 0.79, 0.88)}}}
  text = report.markdown(results)
  assert ('| speculative | 16 | 830 | 83% [79%-88%] | 30.0 | 0.100 / 0.200 | 0.0100 / 0.0500 |'
          in text)
  assert ('at 16 clients the server reaches 83% of offline tokens/s (goal >= 85%: not met)'
          in text)
  assert ('| ragged speculative | 100 | 210 | 2.10x | 38% / 86% (87%; 97%) | 0.100 / 0.200 | '
          '0.0100 | 90 / 8; 90 / 8 | True |') in text
  assert ('continuous over static tokens/s 2.10x (goal >= 1.8: met); slot utilization 86% '
          '(goal >= 90%: not met; this workload\'s ideal 87%)') in text
  assert ('ragged speculative, admitted in arrival order (first come first served, a server\'s '
          'order) instead of the largest budgets first: 180 tokens/s (1.80x static), utilization '
          '84% (ideal 87%; 97% while waiting), 90 steps / 8 prefill calls, TTFT p50 / p99 0.100 / '
          '0.200 s') in text
  assert 'fraction of roofline (ours, bfloat16): 0.90 (goal >= 0.9: met)' in text
  assert ('speedup over transformers (each in its fastest precision: ours bfloat16, '
          'transformers float32): 1.20 (goal >= 1.6: not met)') in text
  assert '| bfloat16 | mmspec-jax (jitted while_loop) | 3.6 [3.2-4.0] | 90% | 3.0 | 128/128 |' in text
  assert "`dtype='auto'` picks bfloat16 on this host" in text
  assert ('widened target, bfloat16, best speculative (gamma 3, tau 2.50) over the best '
          'autoregressive: 1.50 (goal >= 2.5: not met)') in text
  assert 'the best: ours, bfloat16' in text
  assert '0.75 (goal >= 0.9: not met)' in text
  assert 'error: `ValueError: boom`' in text
  assert 'over the smaller: 1.25x (goal <= 1.2: not met)' in text
  report.write(results, str(tmp_path), final=True)
  assert (tmp_path / report.MARKDOWN_FILE).read_text().startswith('Machine: test cpu')
  assert (tmp_path / report.SPEEDUP_PLOT).stat().st_size > 0
