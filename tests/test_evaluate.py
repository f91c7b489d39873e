"""The evaluation (mmspec_jax.evaluation) end to end on a tiny LLaVA target, a language draft and an exact copy.

The adapter draft here is the target's own projector and language model, so with greedy decoding
every draft token is accepted: tau must be exactly gamma + 1 in every greedy cell. The language
draft is the target's language model without the image, so it is exact on the text-only task.
Both drafts have the base vocabulary (tiny_hf.BASE_VOCAB ids, the paper's layout): the prompts'
<image> and <pad> ids lie past it.
"""

import dataclasses
import json
import os

import numpy as np
import pytest
from PIL import Image

from mmspec_jax import cli
from mmspec_jax.evaluation import __main__ as evaluate_cli
from mmspec_jax.convert.loading import load_model, read_config, save_converted
from mmspec_jax.evaluation import evaluate, report
from mmspec_jax.models import AdapterDraftConfig, text_config
from mmspec_jax.testing import tiny_hf

# (max_new_tokens - 1) is a multiple of every gamma + 1 below: with no EOS, every verification
# step of an always-right draft is full, and tau is gamma + 1 exactly.
MAX_NEW_TOKENS = 13
GAMMAS = (1, 3)  # Each (draft, gamma, sampling) compiles once: kept few.
SAMPLINGS = ('greedy', 'sample')
TASKS = ('captioning', 'sqa', 'conversation')
IMAGE_TASKS = ('captioning', 'sqa')
NUM_EXAMPLES = 5  # Of 6 records per task; batches of 4, so the second batch is padded.
BATCH_SIZE = 4


def _record(task, index, with_image):
  words = ' '.join(f'w{10 + (7 * index + k) % 100}' for k in range(3 + index % 3))
  record = {'id': f'{task}-{index}', 'task': task, 'conversations': [
      {'from': 'human', 'value': ('<image>\n' if with_image else '') + words},
      {'from': 'gpt', 'value': f'w{20 + index} w{21 + index}'},
      {'from': 'human', 'value': 'w50'}, {'from': 'gpt', 'value': 'w51'}]}
  if with_image:
    record['image'] = f'{task}_{index}.png'
  return record


def _write_world(root):
  world = root / 'world'
  (world / 'images').mkdir(parents=True)
  rng = np.random.default_rng(0)
  for task in TASKS:
    records = [_record(task, i, task in IMAGE_TASKS) for i in range(NUM_EXAMPLES + 1)]
    for record in records:
      if 'image' in record:
        pixels = rng.integers(0, 256, (30 + len(record['id']), 36, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(world / 'images' / record['image'])
    (world / f'test_{task}.json').write_text(json.dumps(records))
  return str(world)


def exact_adapter(target_config, target_params):
  """The target's own projector and language model as an adapter draft, the language model cut
  to the base vocabulary (embedding and LM-head rows)."""
  base = tiny_hf.BASE_VOCAB
  config = AdapterDraftConfig(text=dataclasses.replace(target_config.text, vocab_size=base),
                              vision_hidden_size=target_config.vision.hidden_size,
                              image_token_index=target_config.image_token_index)
  language_model = dict(target_params['language_model'])
  language_model['embed_tokens'] = {
      'embedding': language_model['embed_tokens']['embedding'][:base]}
  language_model['lm_head'] = {'kernel': language_model['lm_head']['kernel'][:, :base]}
  return config, {'language_model': language_model,
                  'multi_modal_projector': target_params['multi_modal_projector']}


def word_overlap(task, prediction, record):
  """A stand-in scorer: the fraction of the reference's words in the prediction."""
  reference = record['conversations'][1]['value'].split()
  return sum(w in prediction.split() for w in reference) / len(reference)


@pytest.fixture(scope='module')
def models(tmp_path_factory):
  root = tmp_path_factory.mktemp('evaluate')
  target = str(root / 'target')
  tiny_hf.save_llava_processor(tiny_hf.word_tokenizer(), target)
  llava = tiny_hf.tiny_llava(seed=3)
  # An EOS id past the vocabulary: no row stops early, so every answer is MAX_NEW_TOKENS long.
  llava.config.text_config.eos_token_id = tiny_hf.TEXT_VOCAB
  tiny_hf.save(llava, target)
  language = tiny_hf.save_language_draft(llava, str(root / 'language'))
  copy = str(root / 'copy')
  save_converted(copy, *exact_adapter(*load_model(target)))
  return {'root': root, 'target': target, 'language': language, 'copy': copy,
          'world': _write_world(root)}


@pytest.fixture(scope='module')
def evaluated(models):
  calls, lines = [], []

  def score_fn(task, prediction, record):
    calls.append((task, prediction, record))
    return word_overlap(task, prediction, record)

  out_dir = str(models['root'] / 'results')
  cells = evaluate(models['target'], [f'language:{models["language"]}',
                                      f'adapter:{models["copy"]}'],
                   models['world'], tasks=TASKS, gammas=GAMMAS, samplings=SAMPLINGS,
                   max_new_tokens=MAX_NEW_TOKENS, batch_size=BATCH_SIZE,
                   num_examples=NUM_EXAMPLES, out_dir=out_dir, score_fn=score_fn,
                   log=lines.append)
  return {'cells': cells, 'calls': calls, 'lines': lines, 'out_dir': out_dir}


def test_drafts_have_the_base_vocabulary(models):
  assert text_config(read_config(models['target'])).vocab_size == tiny_hf.TEXT_VOCAB
  for name in ('language', 'copy'):
    assert text_config(read_config(models[name])).vocab_size == tiny_hf.BASE_VOCAB


def _cells(evaluated, **where):
  return [c for c in evaluated['cells'] if all(c[k] == v for k, v in where.items())]


def test_grid_and_progress(evaluated):
  cells = evaluated['cells']
  assert len(cells) == len(TASKS) * (1 + 2 * len(GAMMAS) * len(SAMPLINGS))
  assert [c['draft'] for c in cells[:len(TASKS)]] == ['target'] * len(TASKS)
  assert len(evaluated['lines']) == len(cells)
  assert evaluated['lines'][-1].startswith(f'[{len(cells)}/{len(cells)}] conversation adapter '
                                           'gamma=3 sample: tau ')
  for cell in cells:
    assert cell['num_rows'] == NUM_EXAMPLES
    assert cell['compile_seconds'] > 0 and cell['tokens_per_second'] > 0


def test_exact_draft_reaches_the_ceiling(evaluated):
  # The precondition of exactness: no row stopped before MAX_NEW_TOKENS.
  for cell in _cells(evaluated, draft='target'):
    assert cell['new_tokens'] == NUM_EXAMPLES * MAX_NEW_TOKENS
  exact = _cells(evaluated, draft='adapter', sampling='greedy') + _cells(
      evaluated, draft='language', sampling='greedy', task='conversation')
  assert len(exact) == (len(TASKS) + 1) * len(GAMMAS)
  for cell in exact:
    assert cell['block_efficiency'] == cell['gamma'] + 1, cell
    assert cell['acceptance_rate_by_position'] == [1.0] * cell['gamma']


def test_statistics(evaluated):
  settings_drafts = json.load(open(os.path.join(evaluated['out_dir'], report.JSON_FILE)))[
      'settings']['drafts']
  for cell in _cells(evaluated, draft='target'):
    assert cell['gamma'] == 0 and cell['block_efficiency'] == 1 and cell['mbsu'] is None
  for cell in evaluated['cells'][len(TASKS):]:
    gamma, tau = cell['gamma'], cell['block_efficiency']
    assert 1 <= tau <= gamma + 1 and len(cell['acceptance_rate_by_position']) == gamma
    c = settings_drafts[cell['draft']]['parameters'] / cell['target_parameters']
    assert cell['mbsu'] == pytest.approx(tau / (c * gamma + 1))
    assert cell['draft_kind'] == cell['draft']  # The drafts are named by their kind here.
    assert cell['wallclock_speedup'] > 0
  # The language draft never sees the image: on image tasks it must miss sometimes.
  assert any(c['block_efficiency'] < c['gamma'] + 1
             for c in _cells(evaluated, draft='language', sampling='greedy', task='captioning'))


def test_quality(evaluated, models):
  calls = evaluated['calls']
  assert [(task, record['id']) for task, _, record in calls] == [
      (task, f'{task}-{i}') for task in TASKS for i in range(NUM_EXAMPLES)]
  for cell in _cells(evaluated, draft='target'):
    examples = cell['examples']
    assert [e['id'] for e in examples] == [f'{cell["task"]}-{i}' for i in range(NUM_EXAMPLES)]
    assert cell['quality'] == pytest.approx(np.mean([e['score'] for e in examples]))
    for example, (task, prediction, record) in zip(
        examples, [c for c in calls if c[0] == cell['task']]):
      assert example['prediction'] == prediction
      assert example['reference'] == record['conversations'][1]['value']


def test_output_files(evaluated):
  out_dir = evaluated['out_dir']
  with open(os.path.join(out_dir, report.JSON_FILE)) as f:
    results = json.load(f)
  assert results['complete'] and results['cells'] == json.loads(json.dumps(evaluated['cells']))
  assert results['settings']['gammas'] == list(GAMMAS)
  with open(os.path.join(out_dir, report.MARKDOWN_FILE)) as f:
    markdown = f.read()
  assert '| task | draft | sampling | tau g=1 | tau g=3 | MBSU g=3 |' in markdown
  for task in TASKS:
    for draft in ('language', 'adapter'):
      for sampling in SAMPLINGS:
        assert f'| {task} | {draft} | {sampling} | ' in markdown
    assert f'| {task} | {NUM_EXAMPLES} | ' in markdown
  # Exact cells print the ceiling.
  assert '| conversation | adapter | greedy | 2.00 | 4.00 |' in markdown
  with Image.open(os.path.join(out_dir, report.PLOT_FILE)) as image:
    assert image.format == 'PNG' and image.size[0] > image.size[1] > 100


def test_cli(models, tmp_path, monkeypatch, capsys):
  """Config fields reach evaluate() and the tables reach stdout; bad settings are named."""
  calls = []

  def fake_evaluate(*args, **kwargs):  # The real one is exercised above; this checks the wiring.
    calls.append((args, kwargs))
    with open(os.path.join(kwargs['out_dir'], report.MARKDOWN_FILE), 'w') as f:
      f.write('| the tables |\n')

  def config(**fields):
    settings = dict(
        target=models['target'], drafts='language:L,adapter:A', data_dir=models['world'],
        tasks='sqa,conversation', gammas='1,4', shapes='2,1;1,1@0.5', samplings='greedy',
        max_new_tokens=5, batch_size=2, num_examples=3, out_dir=str(tmp_path), seed=7)
    settings.update(fields)
    result = cli.load_config('evaluate')
    result.update(settings)
    return result

  monkeypatch.setattr(evaluate_cli, 'evaluate', fake_evaluate)
  evaluate_cli.run(config())
  assert calls == [((models['target'], ['language:L', 'adapter:A'], models['world']), dict(
      tasks=['sqa', 'conversation'], gammas=[1, 4], shapes=['2,1', '1,1@0.5'],
      samplings=['greedy'], max_new_tokens=5,
      batch_size=2, num_examples=3, out_dir=str(tmp_path), seed=7, dtype='float32'))]
  assert capsys.readouterr().out.startswith('| the tables |\n')
  with pytest.raises(ValueError, match=r"gammas must be comma-separated integers, got '1,x'"):
    evaluate_cli.run(config(gammas='1,x'))
  with pytest.raises(ValueError, match='config.target is empty'):
    evaluate_cli.run(config(target=''))
  monkeypatch.setattr(evaluate_cli, 'evaluate', evaluate)
  with pytest.raises(ValueError, match='gammas must be distinct integers >= 1'):
    evaluate_cli.run(config(gammas='0'))


def test_trees_and_adaptive_lengths_beside_the_gammas(models, tmp_path):
  shapes = ('2,2,1@0.5',)  # An adaptive tree.
  lines = []
  cells = evaluate(models['target'], [f'language:{models["language"]}'], models['world'],
                   tasks=('captioning',), gammas=(2,), shapes=shapes, samplings=('greedy',),
                   max_new_tokens=MAX_NEW_TOKENS, batch_size=BATCH_SIZE,
                   num_examples=NUM_EXAMPLES, out_dir=str(tmp_path), score_fn=word_overlap,
                   log=lines.append)
  _, tree = cells[1:]
  assert [c['shape'] for c in cells] == [None, None, '2x2x1@0.5']
  assert (tree['gamma'], tree['verified_tokens'], tree['confidence_threshold']) == (3, 11, 0.5)
  assert 1 <= tree['draft_calls_per_step'] <= 3
  c = tree['draft_parameters'] / tree['target_parameters']
  assert tree['mbsu'] == pytest.approx(
      tree['block_efficiency'] / (c * tree['draft_calls_per_step'] + 1))
  assert 'captioning language tree 2x2x1@0.5 greedy: tau' in lines[2]
  markdown = open(os.path.join(tmp_path, report.MARKDOWN_FILE)).read()
  assert '| task | draft | sampling | 2x2x1@0.5 |' in markdown
  assert (f'| captioning | language | greedy | {tree["block_efficiency"]:.2f} / 11 / '
          f'{tree["draft_calls_per_step"]:.2f} / ') in markdown
  with pytest.raises(ValueError, match='the confidence threshold must be in'):
    evaluate(models['target'], [f'language:{models["language"]}'], models['world'],
             shapes=('2@1.5',))


def _bad(models, tmp_path, name, records):
  world = tmp_path / name
  world.mkdir()
  os.symlink(os.path.join(models['world'], 'images'), world / 'images')
  (world / 'test_conversation.json').write_text(json.dumps(records))
  return str(world)


BAD = {
    'gamma 0': ({'gammas': (0, 1)}, r'gammas must be distinct integers >= 1'),
    'unknown sampling': ({'samplings': ('beam',)}, r"samplings must be distinct names among "
                                                   r"\['greedy', 'sample'\]"),
    'draft without a name': ({'drafts': ['/some/dir']}, 'expected NAME:DIR'),
    'adapter named language': ({'drafts': {'language': 'copy'}},
                               r"draft 'language' \(.*copy\) is of kind 'adapter'"),
    'missing task file': ({'tasks': ('ocr',)}, r"task 'ocr': data file not found: .*test_ocr"),
    'no answer': ({'records': [{'id': 'q', 'conversations': [{'from': 'human',
                                                              'value': 'w9'}]}]},
                  r"record 0 \(id 'q'\): the first human turn has no answer"),
    'missing image': ({'records': [dict(_record('conversation', 0, True), image='none.png')]},
                      r"record 0 \(id 'conversation-0'\): image file not found: "
                      r'.*images/none\.png'),
    'bad role': ({'records': [{'id': 'r', 'conversations': [{'from': 'bot', 'value': 'w9'}]}]},
                 r"record 0 \(id 'r'\): bad \"conversations\": .*unknown role 'bot'"),
}


@pytest.mark.parametrize('case', sorted(BAD))
def test_bad_input(models, tmp_path, case):
  overrides, message = BAD[case]
  overrides = dict(overrides)
  world = models['world']
  if 'records' in overrides:
    world = _bad(models, tmp_path, 'world', overrides.pop('records'))
  drafts = overrides.pop('drafts', [f'language:{models["language"]}'])
  if isinstance(drafts, dict):
    drafts = {name: models[key] for name, key in drafts.items()}
  kwargs = dict(tasks=('conversation',), gammas=(1,), samplings=('greedy',),
                out_dir=str(tmp_path / 'out'), score_fn=word_overlap)
  kwargs.update(overrides)
  with pytest.raises(ValueError, match=message):
    evaluate(models['target'], drafts, world, **kwargs)
  assert not os.path.exists(tmp_path / 'out' / report.JSON_FILE)
