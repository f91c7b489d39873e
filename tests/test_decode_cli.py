"""decode.py and mmspec_jax.decoding.runner end to end on tiny LLaVA/LLaMA checkpoints."""

import glob
import importlib.util
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
from PIL import Image

from multiprocess import Processes
from mmspec_jax.testing import tiny_hf as hf_builders
from mmspec_jax.convert.loading import save_converted
from mmspec_jax.decoding import runner
from mmspec_jax.decoding import session as session_module
from mmspec_jax.decoding.engine import DecodeResult
from mmspec_jax.models import AdapterDraftConfig, LlamaConfig, init_params
from mmspec_jax.data.processing import MultimodalProcessor

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_NEW_TOKENS = 12
EOS_POSITION = 3  # The EOS is the target's 4th greedy token after the text-only prompt below.
TEXT_PROMPT = 'w8 w9 w10'
ROWS = [
    {'id': 'a', 'prompt': 'w5 w6 w7', 'image': 'a.png'},
    {'id': 'b', 'prompt': TEXT_PROMPT},
    {'id': 7, 'input_ids': [1, 10, 11, 12, 13, 14]},
    {'id': 'd', 'prompt': 'w20 w21 w22 w23 w24 w25', 'image': 'b.png'},
    {'id': 'e', 'input_ids': [1] + [hf_builders.IMAGE_TOKEN] * 4 + [30, 31], 'image': 'a.png'},
]


def write_jsonl(path, rows):
  with open(path, 'w') as f:
    f.writelines(json.dumps(row) + '\n' for row in rows)
  return str(path)


def read_jsonl(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


def _greedy_torch(model, ids, steps):
  ids = torch.tensor([ids])
  with torch.no_grad():
    for _ in range(steps):
      next_id = model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)
      ids = torch.cat([ids, next_id], dim=1)
  return ids[0, -steps:].tolist()


@pytest.fixture(scope='module')
def ckpt(tmp_path_factory):
  root = tmp_path_factory.mktemp('decode')
  target = str(root / 'target')
  hf_builders.save_llava_processor(hf_builders.word_tokenizer(), target)
  llava = hf_builders.tiny_llava(seed=1)
  # EOS = a token the target really emits for one prompt, so that row stops early.
  processor = MultimodalProcessor.from_pretrained(target)
  prompt_ids = processor.encode(processor.format_prompt(TEXT_PROMPT, has_image=False))
  eos = _greedy_torch(llava, prompt_ids, EOS_POSITION + 1)[EOS_POSITION]
  llava.config.text_config.eos_token_id = eos
  hf_builders.save(llava, target)
  draft = hf_builders.save_language_draft(llava, str(root / 'draft'))
  bad_draft = str(root / 'bad_draft')
  shutil.copytree(draft, bad_draft)
  for name in glob.glob(os.path.join(bad_draft, 'tokenizer*')):
    os.remove(name)
  hf_builders.word_tokenizer(swap=(5, 6)).save_pretrained(bad_draft)
  rng = np.random.default_rng(0)
  for name in ('a.png', 'b.png'):
    Image.fromarray(rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)).save(root / name)
  return {'root': root, 'target': target, 'draft': draft, 'bad_draft': bad_draft, 'eos': eos,
          'prompts': write_jsonl(root / 'prompts.jsonl', ROWS)}


def files_named(ckpt, stem):
  """Files whose name holds `stem`, hidden temporary files included (glob skips those)."""
  return [name for name in os.listdir(ckpt['root']) if stem in name]


def make_config(ckpt, name, **overrides):
  spec = importlib.util.spec_from_file_location('decode_config',
                                                os.path.join(REPO, 'configs', 'decode.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.target = ckpt['target']
  config.prompts = ckpt['prompts']
  config.output = str(ckpt['root'] / f'{name}.jsonl')
  config.max_new_tokens = MAX_NEW_TOKENS
  config.batch_size = 2
  config.num_draft_tokens = 3
  config.update(overrides)
  return config


@pytest.fixture(scope='module')
def speculative(ckpt):
  config = make_config(ckpt, 'speculative', draft=ckpt['draft'])
  return runner.run(config), read_jsonl(config.output), config


@pytest.fixture(scope='module')
def autoregressive(ckpt):
  config = make_config(ckpt, 'autoregressive')
  return runner.run(config), read_jsonl(config.output), config


def test_outputs_in_input_order(speculative, autoregressive):
  for _, lines, _ in (speculative, autoregressive):
    assert [line['id'] for line in lines] == [row['id'] for row in ROWS]
    for line in lines:
      assert set(line) == {'id', 'text', 'token_ids', 'num_target_calls', 'num_accepted'}
      assert 1 <= line['num_target_calls'] <= len(line['token_ids'])
  assert all(line['num_accepted'] == 0 for line in autoregressive[1])


def test_greedy_speculative_equals_autoregressive(speculative, autoregressive):
  for spec, auto in zip(speculative[1], autoregressive[1]):
    assert spec['token_ids'] == auto['token_ids'], spec['id']
    assert spec['text'] == auto['text']
  # The draft is the target's own language model: on text-only rows it is always right.
  gamma = speculative[2].num_draft_tokens
  for text_row in speculative[1][1:3]:
    assert text_row['num_accepted'] == gamma * (text_row['num_target_calls'] - 1), text_row
  assert speculative[1][2]['num_target_calls'] < autoregressive[1][2]['num_target_calls']


def test_summary(speculative, autoregressive):
  for stats, lines, config in (speculative, autoregressive):
    with open(runner.summary_path(config.output)) as f:
      summary = json.load(f)
    assert summary == json.loads(json.dumps(stats.as_dict()))
    assert summary['num_rows'] == len(ROWS)
    assert summary['new_tokens'] == sum(len(line['token_ids']) for line in lines)
    assert summary['target_calls'] == sum(line['num_target_calls'] for line in lines)
    assert summary['block_efficiency'] >= 1
    assert summary['compile_seconds'] > 0 and summary['tokens_per_second'] > 0
  assert speculative[0].block_efficiency > 1 and speculative[0].mbsu is not None
  assert autoregressive[0].block_efficiency == 1 and autoregressive[0].mbsu is None


def test_max_new_tokens_and_eos(ckpt, speculative, autoregressive):
  eos = ckpt['eos']
  for _, lines, _ in (speculative, autoregressive):
    ended_at_eos = 0
    for line in lines:
      ids = line['token_ids']
      assert 1 <= len(ids) <= MAX_NEW_TOKENS
      assert eos not in ids[:-1], line  # Nothing follows an EOS.
      ended_at_eos += ids[-1] == eos
      assert ids[-1] == eos or len(ids) == MAX_NEW_TOKENS, line
    assert ended_at_eos >= 1
    assert len(lines[1]['token_ids']) <= EOS_POSITION + 1  # The row the EOS was chosen from.
    assert any(len(line['token_ids']) == MAX_NEW_TOKENS for line in lines)


# Sampling per request: the subject (an image row) decoded alone at batch size 1 (bucket 64), and
# in a file of 5 at batch size 3 whose first batch holds a long text row (bucket 128), the subject
# and a row with its own "seed"; the second batch another image row and another long text row
# (bucket 128 too: one compiled shape for the mixed runs).
SUBJECT = ROWS[3]
SEEDED = {'id': 'seeded', 'prompt': 'w40 w41 w42', 'seed': 1234}
LONG = [{'id': f'long{k}', 'prompt': ' '.join(f'w{5 + k + i}' for i in range(70))}
        for k in range(2)]
MIXED = [LONG[0], SUBJECT, SEEDED, ROWS[0], LONG[1]]


def _cached_compile(cache: dict):
  """DecodeSession._compile_program that reuses programs compiled for the same decoder and shape:
  runs differing only in their inputs or seed share them (their arguments carry params and
  keys)."""
  compile_program = session_module.DecodeSession._compile_program

  def compile_cached(self, engine, decoder, batch_size, length, draft_prompt_length):
    key = (engine.target, engine.draft, engine.sampling, engine.num_draft_tokens,
           engine.max_new_tokens, engine.eos_token_ids, engine.draft_rules, decoder.with_images,
           batch_size, length, draft_prompt_length)
    if key not in cache:
      cache[key] = compile_program(self, engine, decoder, batch_size, length,
                                   draft_prompt_length)
    return cache[key]
  return compile_cached


@pytest.fixture(scope='module')
def sampled(ckpt):
  """{run name: {id: output line}} of temperature-1 runs, alone and mixed, two run seeds, and the
  (batch size, prompt length) shapes the runs compiled."""
  alone = write_jsonl(ckpt['root'] / 'alone.jsonl', [SUBJECT])
  mixed = write_jsonl(ckpt['root'] / 'mixed.jsonl', MIXED)
  runs = {'spec_alone': (ckpt['draft'], alone, 1, 0), 'spec_mixed': (ckpt['draft'], mixed, 3, 0),
          'spec_mixed_seed1': (ckpt['draft'], mixed, 3, 1), 'auto_alone': ('', alone, 1, 0),
          'auto_mixed': ('', mixed, 3, 0)}
  outputs, programs = {}, {}
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(session_module.DecodeSession, '_compile_program', _cached_compile(programs))
    for name, (draft, prompts, batch_size, seed) in runs.items():
      config = make_config(ckpt, f'sampled_{name}', draft=draft, prompts=prompts,
                           batch_size=batch_size, seed=seed, temperature=1.0, batching='static')
      runner.run(config)
      outputs[name] = {line['id']: line for line in read_jsonl(config.output)}
  return outputs, sorted({(key[-3], key[-2]) for key in programs})


def test_a_request_samples_the_same_tokens_alone_and_in_any_batch(sampled):
  sampled, shapes = sampled
  assert shapes == [(1, 64), (3, 128)]  # Another batch size and another length bucket.
  for kind in ('spec', 'auto'):
    alone = sampled[f'{kind}_alone'][SUBJECT['id']]
    mixed = sampled[f'{kind}_mixed'][SUBJECT['id']]
    assert alone['token_ids'] == mixed['token_ids'], kind
    assert alone['text'] == mixed['text']
  # The speculative run really drafted: some draft tokens were accepted.
  assert sum(line['num_accepted'] for line in sampled['spec_mixed'].values()) > 0


def test_a_request_seed_fixes_its_tokens_and_the_run_seed_moves_the_rest(sampled):
  first, second = sampled[0]['spec_mixed'], sampled[0]['spec_mixed_seed1']
  assert first[SEEDED['id']]['token_ids'] == second[SEEDED['id']]['token_ids']
  others = [row['id'] for row in MIXED if 'seed' not in row]
  assert any(first[i]['token_ids'] != second[i]['token_ids'] for i in others)


def test_adapter_draft(ckpt, autoregressive):
  """A converted adapter draft (its own projector over the target's vision features), with no
  tokenizer files of its own: greedy output is still exactly the target's."""
  draft_config = AdapterDraftConfig(
      text=LlamaConfig(vocab_size=hf_builders.BASE_VOCAB, hidden_size=32, intermediate_size=64,
                       num_layers=1, num_heads=2, num_kv_heads=2, head_dim=16,
                       max_position_embeddings=256),
      vision_hidden_size=32, image_token_index=hf_builders.IMAGE_TOKEN)
  draft = str(ckpt['root'] / 'adapter_draft')
  save_converted(draft, draft_config, init_params(draft_config, jax.random.key(0)))
  config = make_config(ckpt, 'adapter', draft=draft)
  stats = runner.run(config)
  assert stats.num_draft_tokens == 3 and stats.block_efficiency >= 1
  assert [line['token_ids'] for line in read_jsonl(config.output)] == [
      line['token_ids'] for line in autoregressive[1]]


def test_tree_and_adaptive_length(ckpt, autoregressive):
  """--config.draft_tree and --config.confidence_threshold: greedy output is still exactly the
  target's, and the summary names the tree and the draft calls per step."""
  config = make_config(ckpt, 'tree', draft=ckpt['draft'], draft_tree='3,2,1',
                       confidence_threshold=0.3, num_draft_tokens=1)  # The tree's depth wins.
  stats = runner.run(config)
  assert [line['token_ids'] for line in read_jsonl(config.output)] == [
      line['token_ids'] for line in autoregressive[1]]
  assert (stats.draft_tree, stats.num_draft_tokens, stats.verified_tokens) == ('3x2x1', 3, 16)
  assert 1 <= stats.draft_calls_per_step <= 3 and stats.confidence_threshold == 0.3
  assert stats.block_efficiency > 1 and stats.mbsu is not None


def test_failure_while_decoding_leaves_no_output(ckpt, monkeypatch):
  calls = []

  def generate(target_params, draft_params, tokens, lengths, images, rng):
    calls.append(files_named(ckpt, 'interrupted'))
    if len(calls) == 2:  # The first batch's lines are already in the temporary file.
      raise RuntimeError('device lost')
    batch = tokens.shape[0]
    return DecodeResult(tokens=np.full((batch, MAX_NEW_TOKENS), 9, np.int32),
                        num_generated=np.full((batch,), 2, np.int32),
                        num_target_calls=np.full((batch,), 2, np.int32),
                        accepted_by_position=np.zeros((batch, 0), np.int32),
                        reached_by_position=np.zeros((batch, 0), np.int32),
                        draft_calls=np.zeros((batch,), np.int32))

  monkeypatch.setattr(session_module.DecodeSession, '_compile_program',
                      lambda *args: generate)
  config = make_config(ckpt, 'interrupted', batching='static')
  with pytest.raises(RuntimeError, match='device lost'):
    runner.run(config)
  assert len(calls) == 2 and calls[1][0].startswith('.interrupted.jsonl.')  # The temporary file.
  assert not files_named(ckpt, 'interrupted')


def _bad_rows(ckpt, name, rows):
  return write_jsonl(ckpt['root'] / f'{name}.jsonl', rows)


BAD_INPUTS = {
    'missing image': (lambda c: {'prompts': _bad_rows(c, 'missing', [
        ROWS[1], {'id': 'x', 'prompt': 'w5', 'image': 'nowhere.png'}])},
                      r'missing.jsonl line 2 \(id .x.\): image file not found: .*nowhere\.png'),
    'image with a LLaMA target': (lambda c: {'target': c['draft']},
                                  r"line 1 \(id 'a'\): has an image but the target is a "
                                  'text-only LLaMA'),
    'negative temperature': (lambda c: {'temperature': -0.5},
                             r'temperature must be in \[0, 100.0\]'),
    'top_p 0': (lambda c: {'top_p': 0.0}, r'top_p must be in \(0, 1\]'),
    'top_p 1.5': (lambda c: {'top_p': 1.5}, r'top_p must be in \(0, 1\]'),
    'gamma 0 with a draft': (lambda c: {'draft': c['draft'], 'num_draft_tokens': 0},
                             r'num_draft_tokens \(gamma\) must be >= 1'),
    'prompt too long': (lambda c: {'prompts': _bad_rows(c, 'long', [
        ROWS[0], {'id': 'long', 'input_ids': [1] + [5] * 249}]), 'max_new_tokens': 16},
                        r"line 2 \(id 'long'\): prompt \(250 tokens\) \+ max_new_tokens \(16\) "
                        'exceeds the target.s 256 positions'),
    'bad draft tree': (lambda c: {'draft': c['draft'], 'draft_tree': '2,0'},
                       'a draft tree is a branching factor >= 1 per depth'),
    'unknown admission order': (lambda c: {'admission_order': 'shortest_first'},
                                r"admission_order must be one of \('arrival', 'longest_first'\), "
                                "got 'shortest_first'"),
    'threshold without a draft': (lambda c: {'confidence_threshold': 0.5},
                                  'draft_tree and confidence_threshold need a draft'),
    'threshold 1': (lambda c: {'draft': c['draft'], 'confidence_threshold': 1.0},
                    r'confidence_threshold must be in \[0, 1\)'),
    'incompatible draft tokenizer': (lambda c: {'draft': c['bad_draft']},
                                     "incompatible draft vocabulary: draft id 5 is 'w6'"),
    'negative seed': (lambda c: {'prompts': _bad_rows(c, 'negative_seed', [
        ROWS[1], {'id': 'x', 'prompt': 'w5', 'seed': -1}])},
                      r'negative_seed.jsonl line 2 \(id .x.\): "seed" must be an integer in '
                      r'\[0, 2\*\*32\), got -1'),
    'string seed': (lambda c: {'prompts': _bad_rows(c, 'string_seed', [
        ROWS[1], SEEDED, {'id': 'y', 'prompt': 'w5', 'seed': '7'}])},
                    r'string_seed.jsonl line 3 \(id .y.\): "seed" must be an integer in '
                    r"\[0, 2\*\*32\), got '7'"),
}


@pytest.mark.parametrize('case', sorted(BAD_INPUTS))
def test_bad_input_raises_and_writes_nothing(ckpt, case):
  overrides, message = BAD_INPUTS[case]
  config = make_config(ckpt, 'bad_' + case.replace(' ', '_'), **overrides(ckpt))
  with pytest.raises(ValueError, match=message):
    runner.run(config)
  assert not files_named(ckpt, os.path.splitext(os.path.basename(config.output))[0])


def _cli(ckpt, name, *flags):
  args = [sys.executable, 'decode.py', '--config=configs/decode.py',
          f'--config.target={ckpt["target"]}',
          f'--config.output={ckpt["root"] / name}.jsonl', *flags]
  return subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=300)


def test_cli(ckpt):
  prompts = _bad_rows(ckpt, 'cli_prompts', [ROWS[1], ROWS[2]])
  result = _cli(ckpt, 'cli', f'--config.draft={ckpt["draft"]}', f'--config.prompts={prompts}',
                '--config.num_draft_tokens=2', '--config.max_new_tokens=4',
                '--config.batch_size=2', '--config.seed=3')
  assert result.returncode == 0, result.stderr
  assert 'tau (block efficiency)' in result.stdout
  assert [line['id'] for line in read_jsonl(ckpt['root'] / 'cli.jsonl')] == ['b', 7]
  assert os.path.isfile(ckpt['root'] / 'cli.summary.json')

  result = _cli(ckpt, 'cli_bad', f'--config.prompts={ckpt["prompts"]}', '--config.top_p=1.5')
  assert result.returncode != 0
  assert 'error: top_p must be in (0, 1]' in result.stderr
  assert 'Traceback' not in result.stderr
  assert not os.path.exists(ckpt['root'] / 'cli_bad.jsonl')


def test_one_prompt_and_image_stream_from_any_directory(ckpt, speculative):
  """mmspec-decode with --config.prompt and --config.image (relative to the working directory)
  prints the answer the prompts file gives that request, then its statistics on one line; the
  console shows no INFO lines of absl, orbax or jax."""
  _, lines, _ = speculative
  expected = next(line for line in lines if line['id'] == 'a')
  command = [os.path.join(os.path.dirname(sys.executable), 'mmspec-decode'),
             f'--config.target={ckpt["target"]}', f'--config.draft={ckpt["draft"]}',
             f'--config.prompt={ROWS[0]["prompt"]}', f'--config.image={ROWS[0]["image"]}',
             '--config.num_draft_tokens=3', f'--config.max_new_tokens={MAX_NEW_TOKENS}',
             '--config.chunk_steps=2']
  result = subprocess.run(command, cwd=ckpt['root'], capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr
  answer, statistics = result.stdout.rstrip('\n').rsplit('\n', 1)
  assert answer == expected['text']
  assert statistics.startswith(f'[{len(expected["token_ids"])} tokens, ') and 'tau' in statistics
  assert not [line for line in result.stderr.splitlines() if line[:1] in 'IW' and line[1:5].isdigit()]
  # A prompts file and config.image together are refused by name.
  result = subprocess.run(command[:1] + [f'--config.target={ckpt["target"]}',
                                         f'--config.prompts={ckpt["prompts"]}',
                                         '--config.output=out.jsonl', '--config.image=a.png'],
                          cwd=ckpt['root'], capture_output=True, text=True, timeout=300)
  assert result.returncode != 0 and 'error: config.image goes with config.prompt' in result.stderr


def test_the_examples_are_valid_requests(ckpt):
  """examples/prompts.jsonl (the quick start's file) passes every check a prompts file gets: its
  images load, its per-request settings are in range."""
  session = session_module.DecodeSession(ckpt['target'])
  requests = session.read_requests(os.path.join(REPO, 'examples', 'prompts.jsonl'),
                                   max_new_tokens=64, num_draft_tokens=3)
  assert [r.id for r in requests] == ['describe', 'count', 'see', 'sampled', 'text-only']
  assert all(os.path.isfile(r.image) for r in requests[:4]) and requests[4].image is None
  assert requests[2].max_new_tokens == 48 and requests[3].seed == 1
  assert requests[3].sampling.temperature == 0.7


def test_help_lists_the_config_fields_from_any_directory(tmp_path):
  result = subprocess.run([sys.executable, os.path.join(REPO, 'decode.py'), '--help'],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr
  assert 'mmspec-decode --config.prompt=' in result.stdout  # The usage, then every field:
  assert "  prompt = ''\n      One question instead of a file" in result.stdout
  assert '  max_new_tokens = 128\n' in result.stdout


def _two_processes(ckpt, name, prompts, *flags):
  """decode.py on 2 processes x 4 CPU devices, its 8 rows split over all 8: its output lines."""
  command = [sys.executable, 'decode.py', '--config=configs/decode.py',
             f'--config.target={ckpt["target"]}', f'--config.draft={ckpt["draft"]}',
             f'--config.prompts={prompts}', f'--config.output={ckpt["root"] / name}.jsonl',
             '--config.batch_size=8', '--config.num_draft_tokens=3',
             f'--config.max_new_tokens={MAX_NEW_TOKENS}', *flags]
  with Processes(command, num_processes=2) as job:
    job.wait()
    assert 'wrote' in job.output(0) and 'wrote' not in job.output(1)  # Process 0 writes.
  with open(ckpt['root'] / f'{name}.summary.json') as f:
    summary = json.load(f)
  lines = read_jsonl(ckpt['root'] / f'{name}.jsonl')
  assert summary['num_rows'] == len(lines)
  return lines


def test_two_processes_decode_what_one_process_decodes_greedy(ckpt, speculative):
  """Continuous batching over 8 slots on 2 processes (every process admits the same requests into
  the same slots) against the 1-process, 1-device run of the same requests (in batches of 2):
  rows do not depend on their batch, schedule or devices (test_sharded_decoding,
  test_continuous_batching)."""
  _, expected, _ = speculative
  assert _two_processes(ckpt, 'hosts_greedy', ckpt['prompts']) == expected


def test_two_processes_decode_what_one_process_decodes_sampled(ckpt, sampled):
  outputs, _ = sampled  # temperature 1, run seed 0, static batches of 3; these: continuous
  lines = _two_processes(ckpt, 'hosts_sampled', ckpt['root'] / 'mixed.jsonl',
                         '--config.temperature=1.0', '--config.seed=0')
  assert {line['id']: line for line in lines} == outputs['spec_mixed']


def test_no_target_and_no_demo_checkpoints_is_explained(ckpt, monkeypatch, tmp_path):
  from mmspec_jax.demo import artifacts
  monkeypatch.setattr(artifacts, 'ROOT', str(tmp_path / 'artifacts'))
  config = make_config(ckpt, 'no_target', target='')
  with pytest.raises(ValueError, match='run `make demo` first'):
    artifacts.use_demo_checkpoints(config)  # What the decode and serve commands do first.
  with pytest.raises(ValueError, match='config.target is empty'):
    runner.run(config)  # The runner itself takes no default.
