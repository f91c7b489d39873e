"""Continuous batching (decoding/slots.py, decoding/scheduler.py): a request's tokens are the ones
it gets decoded alone in a static batch of one, whatever slot it lands in, whichever chunk it
enters at and whatever its neighbours are, greedy and sampled, for the target alone, chains,
trees and both draft kinds."""

import dataclasses
import json

import jax
import numpy as np
import pytest

from test_decode_cli import ROWS, ckpt, make_config, read_jsonl  # noqa: F401 (fixture)
from mmspec_jax.convert.loading import save_converted
from mmspec_jax.decoding import inputs, runner
from mmspec_jax.decoding.sampling import SamplingConfig
from mmspec_jax.decoding.session import DecodeSession
from mmspec_jax.decoding.tree import DraftTree, DynamicTree
from mmspec_jax.models import AdapterDraftConfig, LlamaConfig, init_params
from mmspec_jax.testing import tiny_hf as hf_builders

MAX_NEW_TOKENS = 12
# Each request's own budget: rows end at different steps, so slots free up at different chunks.
BUDGETS = (12, 3, 9, 5, 12, 7)
RUN_KEY = jax.random.key(3)


@pytest.fixture(scope='module')
def session(ckpt):
  adapter_config = AdapterDraftConfig(
      text=LlamaConfig(vocab_size=hf_builders.BASE_VOCAB, hidden_size=32, intermediate_size=64,
                       num_layers=1, num_heads=2, num_kv_heads=2, head_dim=16,
                       max_position_embeddings=256),
      vision_hidden_size=32, image_token_index=hf_builders.IMAGE_TOKEN)
  adapter = str(ckpt['root'] / 'continuous_adapter')
  save_converted(adapter, adapter_config, init_params(adapter_config, jax.random.key(0)))
  session = DecodeSession(ckpt['target'], {'language': ckpt['draft'], 'adapter': adapter})
  requests = session.read_requests(ckpt['prompts'], max_new_tokens=MAX_NEW_TOKENS,
                                   num_draft_tokens=3)
  # One more request than the file has (a repeat of the first under another id): six requests
  # over two slots.
  requests.append(inputs.Request('again', 99, requests[0].token_ids, requests[0].image))
  return session.load(), requests


CASES = {
    'autoregressive': (None, 0, None),
    'chain': ('language', 3, None),
    'tree': ('language', 3, DraftTree((2, 2, 1))),
    'dynamic': ('language', 3, DynamicTree(3, 2, 5)),  # Each row's own tree (EAGLE-2).
    'adapter': ('adapter', 2, None),
}


def _alone(session, decoder, request):
  """The request decoded alone: a static batch of one."""
  batch = inputs.make_batches([request], 1, inputs.DEFAULT_BUCKETS)[0]
  session.compile(decoder, [batch])
  result, _ = session.decode(decoder, batch, RUN_KEY)
  return result.tokens[0, :int(result.num_generated[0])].tolist()


@pytest.mark.parametrize('temperature', [0.0, 1.0])
@pytest.mark.parametrize('case', list(CASES))
def test_a_request_decodes_the_same_alone_and_continuously(session, case, temperature):
  if temperature and case == 'adapter':
    pytest.skip('the sampled adapter chain is the sampled language chain\'s program')
  session, requests = session
  draft, gamma, tree = CASES[case]
  decoder = session.decoder(draft, num_draft_tokens=gamma,
                            sampling=SamplingConfig(temperature=temperature),
                            max_new_tokens=MAX_NEW_TOKENS, requests=requests, draft_tree=tree)
  scheduler = session.scheduler(decoder, num_slots=2, capacity=128, chunk_steps=2,
                                prefill_width=1, key=RUN_KEY)
  # Three requests now; the rest enter one by one at later chunks, into whichever slot is free.
  handles = {scheduler.submit(r, b): (r, b) for r, b in zip(requests[:3], BUDGETS)}
  later = list(zip(requests[3:], BUDGETS[3:]))
  finished, streamed, slots_used = {}, {}, set()
  while not scheduler.idle or later:
    if later:
      request, budget = later.pop(0)
      handles[scheduler.submit(request, budget)] = (request, budget)
    slots_used |= {a.slot for a in scheduler._active.values()}
    for event in scheduler.step():
      streamed.setdefault(event.handle, []).extend(event.new_tokens)
      if event.finished is not None:
        finished[event.handle] = event.finished
  assert len(finished) == len(requests) and slots_used == {0, 1}
  accepted = 0
  for handle, (request, budget) in handles.items():
    expected = _alone(session, decoder, request)[:budget]
    assert finished[handle].token_ids == expected, (case, request.id)
    assert streamed[handle] == expected  # The stream is the result, chunk by chunk.
    accepted += int(finished[handle].accepted_by_position.sum())
  if draft == 'language':  # The adapter draft is random: it need not accept anything.
    assert accepted > 0
  assert 0 < scheduler.utilization <= 1


def _run_all(scheduler, work):
  """Runs (request, budget) pairs to the end: the Finished of each, in order."""
  handles = [scheduler.submit(r, b) for r, b in work]
  finished = {e.handle: e.finished for e in scheduler.run() if e.finished is not None}
  return [finished[h] for h in handles]


# Greedy and sampled requests in one batch, each under its own settings.
OWN_SAMPLING = (SamplingConfig(), SamplingConfig(temperature=1.0),
                SamplingConfig(temperature=0.8, top_k=5),
                SamplingConfig(temperature=1.0, top_p=0.7), SamplingConfig(),
                SamplingConfig(temperature=1.3))


@pytest.mark.parametrize('case', ['chain', 'tree', 'dynamic'])
def test_greedy_and_sampled_requests_share_a_batch(session, case):
  """Each request, among others with other settings, gets the tokens a decoder of its own
  settings alone gives it: greedy rows are greedy, sampled rows are the (statistically tested)
  static sampler's."""
  session, requests = session
  draft, gamma, tree = CASES[case]
  own = [dataclasses.replace(r, sampling=s) for r, s in zip(requests, OWN_SAMPLING)]
  decoder = session.decoder(draft, num_draft_tokens=gamma, sampling=SamplingConfig(),
                            max_new_tokens=MAX_NEW_TOKENS, requests=own, draft_tree=tree)
  assert decoder.per_request_sampling
  scheduler = session.scheduler(decoder, num_slots=2, capacity=128, chunk_steps=2,
                                prefill_width=2, key=RUN_KEY)
  done = _run_all(scheduler, list(zip(own, BUDGETS)))
  for request, budget, finished in zip(own, BUDGETS, done):
    alone = session.decoder(draft, num_draft_tokens=gamma, sampling=request.sampling,
                            max_new_tokens=MAX_NEW_TOKENS, requests=requests, draft_tree=tree)
    assert finished.token_ids == _alone(session, alone, request)[:budget], (request.sampling)
  # A decoder without per-request sampling refuses a request with settings of its own.
  shared = session.decoder(draft, num_draft_tokens=gamma, sampling=SamplingConfig(),
                           max_new_tokens=MAX_NEW_TOKENS, requests=requests, draft_tree=tree)
  with pytest.raises(ValueError, match=r"request 'b' gives its own sampling settings"):
    session.scheduler(shared, num_slots=2, capacity=128).submit(own[1], 4)


def test_stop_sequences_end_a_request_and_free_its_slot(session):
  session, requests = session
  decoder = session.decoder('language', num_draft_tokens=3, sampling=SamplingConfig(),
                            max_new_tokens=MAX_NEW_TOKENS, requests=requests)
  full = [_alone(session, decoder, r) for r in requests[:3]]
  text = session.processor.decode(full[1][:6])
  stop_string = text[-2:] if len(text) >= 2 else text
  expected_end = next(end for end in range(1, 13)
                      if stop_string in session.processor.decode(full[1][:end]))
  stops = [(full[0][4],), (stop_string, next(i for i in range(50) if i not in full[1])), ()]
  work = [(dataclasses.replace(r, stop=s), MAX_NEW_TOKENS) for r, s in zip(requests, stops)]
  scheduler = session.scheduler(decoder, num_slots=1, capacity=128, chunk_steps=4,
                                prefill_width=1, key=RUN_KEY)
  done = _run_all(scheduler, work)
  assert done[0].token_ids == full[0][:full[0].index(full[0][4]) + 1]
  assert done[0].stopped_by == full[0][4]
  assert done[1].stopped_by == stop_string and len(done[1].token_ids) == expected_end
  assert done[1].token_ids == full[1][:expected_end]
  assert done[2].token_ids == full[2] and done[2].stopped_by is None  # The slot was reused.


def test_a_chunk_ends_when_a_row_finishes_while_requests_wait(session):
  """Two slots, long chunks: the step in which the first request ends also ends its chunk (a
  third waits), so the third enters at once; with nothing waiting, chunks run their length."""
  session, requests = session
  decoder = session.decoder(None, num_draft_tokens=0, sampling=SamplingConfig(),
                            max_new_tokens=MAX_NEW_TOKENS, requests=requests, eos_token_ids=())
  scheduler = session.scheduler(decoder, num_slots=2, capacity=128, chunk_steps=50,
                                prefill_width=2, key=RUN_KEY)
  done = _run_all(scheduler, [(requests[0], 4), (requests[1], 12), (requests[2], 6)])
  assert [f.num_generated for f in done] == [4, 12, 6]
  # Steps (the first token comes from the prefill): 3 with both slots busy, then 8 more for the
  # second while the third takes 5. Without the early end: 11 + 5 steps, 32 slot-steps.
  assert scheduler.chunks == 2 and scheduler.slot_steps == 22
  assert scheduler.active_row_steps == 3 + 11 + 5
  assert scheduler.utilization_while_waiting == 1.0


def test_longest_first_admits_the_largest_budgets_first(session):
  """admission_order='longest_first': waiting requests enter by budget, largest first (ties in
  arrival order; a request submitted later passes smaller waiting ones), each with the tokens it
  gets in arrival order; the lone long row at the end is gone, and with it slot-steps."""
  session, requests = session
  decoder = session.decoder(None, num_draft_tokens=0, sampling=SamplingConfig(),
                            max_new_tokens=MAX_NEW_TOKENS, requests=requests, eos_token_ids=())
  budgets = (3, 5, 5, 4, 12)

  def run(order, late_budget):
    """(tokens per handle, handles in the order they entered, slot-steps); request 5 arrives
    after the first chunk, when the head of the queue is already staged for the next prefill."""
    scheduler = session.scheduler(decoder, num_slots=2, capacity=128, chunk_steps=50,
                                  prefill_width=2, key=RUN_KEY, admission_order=order)
    admitted, prefill = [], scheduler._prefill
    scheduler._prefill = lambda group, slots: (admitted.extend(e[0] for e in group),
                                               prefill(group, slots))
    handles = [scheduler.submit(r, b) for r, b in zip(requests[:5], budgets)]
    finished = {}
    while not scheduler.idle:
      if scheduler.chunks == 1 and len(handles) == 5:
        handles.append(scheduler.submit(requests[5], late_budget))
      finished.update({e.handle: e.finished for e in scheduler.step() if e.finished})
    return [finished[h].token_ids for h in handles], admitted, scheduler.slot_steps

  arrival, longest = run('arrival', 4), run('longest_first', 4)
  assert [len(t) for t in arrival[0]] == list(budgets) + [4]
  assert longest[0] == arrival[0]
  assert arrival[1] == [0, 1, 2, 3, 4, 5]
  assert longest[1] == [4, 1, 2, 3, 5, 0]  # The late 4 passes the waiting 3.
  # Steps after each prefill's token: arrival ends with the 12 alone (17 steps of 2 slots);
  # longest first runs it beside the rest (14).
  assert (arrival[2], longest[2]) == (34, 28)
  # A late 12 becomes the head in place of the staged 5 (handle 2), whose inputs are not used.
  tokens, admitted, _ = run('longest_first', 12)
  assert admitted == [4, 1, 5, 2, 3, 0]
  assert tokens[:5] == arrival[0][:5] and tokens[5][:4] == arrival[0][5]  # Greedy: a prefix.
  with pytest.raises(ValueError, match='admission_order must be one of'):
    session.scheduler(decoder, num_slots=2, capacity=128, admission_order='shortest')


def test_cancel_frees_the_slot(session):
  session, requests = session
  decoder = session.decoder(None, num_draft_tokens=0, sampling=SamplingConfig(),
                            max_new_tokens=MAX_NEW_TOKENS, requests=requests)
  scheduler = session.scheduler(decoder, num_slots=1, capacity=128, chunk_steps=1,
                                prefill_width=1, key=RUN_KEY)
  first = scheduler.submit(requests[0], MAX_NEW_TOKENS)
  second = scheduler.submit(requests[1], 4)
  third = scheduler.submit(requests[2], 4)
  events = scheduler.step()  # The first runs one step; the others wait for the only slot.
  assert [e.handle for e in events] == [first] and scheduler.num_waiting == 2
  scheduler.cancel(first)
  scheduler.cancel(third)  # Still waiting: dropped, with a last event of its own.
  events = scheduler.step()
  cancelled = [e.finished for e in events if e.handle == first][0]
  assert cancelled.cancelled and 0 < cancelled.num_generated < MAX_NEW_TOKENS
  dropped = [e.finished for e in events if e.handle == third][0]
  assert dropped.cancelled and dropped.token_ids == [] and scheduler.num_waiting == 0
  rest = [e for e in scheduler.run()]
  finished = [e.finished for e in events + rest if e.finished and e.handle == second][0]
  assert finished.token_ids == _alone(session, decoder, requests[1])[:4]


def test_a_request_that_cannot_fit_is_refused_by_name(session):
  session, requests = session
  decoder = session.decoder(None, num_draft_tokens=0, sampling=SamplingConfig(),
                            max_new_tokens=MAX_NEW_TOKENS, requests=requests)
  scheduler = session.scheduler(decoder, num_slots=2, capacity=16, key=RUN_KEY)
  with pytest.raises(ValueError, match=r"request 'a'.*exceeds the slot capacity 16"):
    scheduler.submit(requests[0], MAX_NEW_TOKENS)
  with pytest.raises(ValueError, match=r"max_new_tokens must be in \[1, 12\]"):
    scheduler.submit(requests[1], 13)


def test_decode_cli_continuous_with_own_budgets(ckpt, tmp_path):  # noqa: F811
  """decode.py's default batching, requests with their own max_new_tokens: the output in input
  order equals static batches' (cut to each budget), and the summary has the new figures."""
  rows = [dict(row, max_new_tokens=budget) for row, budget in zip(ROWS, BUDGETS)]
  prompts = tmp_path / 'budgets.jsonl'
  prompts.write_text(''.join(__import__('json').dumps(r) + '\n' for r in rows))
  for row in ROWS:  # Relative image paths resolve against the prompts file's directory.
    if 'image' in row:
      (tmp_path / row['image']).write_bytes((ckpt['root'] / row['image']).read_bytes())
  continuous = make_config(ckpt, 'continuous', draft=ckpt['draft'], prompts=str(prompts),
                           chunk_steps=3)
  stats = runner.run(continuous)
  static = make_config(ckpt, 'static_reference', draft=ckpt['draft'], batching='static')
  runner.run(static)
  got = read_jsonl(continuous.output)
  want = read_jsonl(static.output)
  assert [line['id'] for line in got] == [row['id'] for row in ROWS]
  for line, reference, budget in zip(got, want, BUDGETS):
    assert line['token_ids'] == reference['token_ids'][:budget]
  assert 0 < stats.slot_utilization <= 1 and stats.requests_per_second > 0
  assert set(stats.time_to_first_token) == {'p50', 'p90', 'p99'}
  bad = tmp_path / 'bad.jsonl'
  bad.write_text('{"id": 1, "input_ids": [1, 5], "max_new_tokens": 0}\n')
  with pytest.raises(ValueError, match=r'line 1 \(id 1\): "max_new_tokens" must be an integer'):
    runner.run(make_config(ckpt, 'bad', prompts=str(bad)))
  with pytest.raises(ValueError, match='needs --config.batching=continuous'):
    runner.run(make_config(ckpt, 'bad_static', prompts=str(prompts), batching='static'))
  for field, value, message in (
      ('temperature', -1, r'temperature must be in \[0, 100.0\]'),
      ('top_p', 0, r'top_p must be in \(0, 1\]'), ('top_k', 1.5, '"top_k" must be an integer'),
      ('top_k', 2 ** 31, r'top_k must be an integer in \[0, 2\*\*31\)'),
      ('temperature', '1', '"temperature" must be a number'),
      ('stop', [''], 'each "stop" entry must be a non-empty string')):
    bad.write_text(json.dumps({'id': 7, 'input_ids': [1, 5], field: value}) + '\n')
    with pytest.raises(ValueError, match=rf'line 1 \(id 7\): .*{message}'):
      runner.run(make_config(ckpt, 'bad', prompts=str(bad)))


def test_decode_cli_greedy_and_sampled_requests(ckpt, tmp_path):  # noqa: F811
  """Per-request sampling and stop in decode.py's JSONL: a greedy request among sampled ones
  gets the greedy run's tokens; a stop string cuts the text before it."""
  greedy = make_config(ckpt, 'all_greedy', draft=ckpt['draft'])
  runner.run(greedy)
  want = read_jsonl(greedy.output)
  rows = [dict(row, temperature=1.0, top_k=5) if i % 2 else dict(row)
          for i, row in enumerate(ROWS)]
  stop_text = want[0]['text'][2:4]
  if stop_text.strip():
    rows[0]['stop'] = stop_text
  prompts = tmp_path / 'mixed.jsonl'
  prompts.write_text(''.join(json.dumps(r) + '\n' for r in rows))
  for row in ROWS:
    if 'image' in row:
      (tmp_path / row['image']).write_bytes((ckpt['root'] / row['image']).read_bytes())
  mixed = make_config(ckpt, 'mixed', draft=ckpt['draft'], prompts=str(prompts))
  runner.run(mixed)
  got = read_jsonl(mixed.output)
  for i, (line, reference) in enumerate(zip(got, want)):
    if i % 2 == 0 and i:
      assert line['token_ids'] == reference['token_ids']
  if 'stop' in rows[0]:
    assert got[0]['text'] == reference_text_before(want[0]['text'], stop_text)
    assert got[0]['token_ids'] == want[0]['token_ids'][:len(got[0]['token_ids'])]


def reference_text_before(text: str, stop: str) -> str:
  return text[:text.index(stop)]


def test_drafts_of_one_config_share_compiled_programs():
  """Two drafts of one config (the evaluation's draft before and after distillation): the second
  scheduler reuses the first's compiled programs, and each runs with its own params (the same
  greedy tokens, the target's; different acceptance)."""
  import decoding_fixtures as fx  # pylint: disable=import-outside-toplevel
  target_config, target_params = fx.llava_target()
  drafts = {'near': fx.language_draft(target_config, target_params),
            'far': fx.language_draft(target_config, target_params, noise=0.5)}
  session = DecodeSession.from_params(None, (target_config, target_params), drafts)
  rng = np.random.default_rng(1)
  requests = [inputs.Request(f'r{i}', i, tuple(int(t) for t in rng.integers(
      1, fx.BASE_VOCAB, size=5 + 2 * i)), None) for i in range(4)]
  count = lambda compiled: sum(len(v) if isinstance(v, dict) else 1 for v in compiled.values())
  runs = {}
  for name in drafts:
    decoder = session.decoder(name, num_draft_tokens=3, sampling=SamplingConfig(),
                              max_new_tokens=12, requests=requests, eos_token_ids=())
    scheduler = session.scheduler(decoder, num_slots=2, capacity=64)
    compiled_before = count(scheduler.programs.compiled)
    scheduler.compile([scheduler.bucket(r) for r in requests])
    finished = [e.finished for e in scheduler.run([(r, 12) for r in requests])
                if e.finished is not None]
    runs[name] = (scheduler.programs, compiled_before, finished)
  (near_programs, near_before, near), (far_programs, far_before, far) = runs.values()
  assert far_programs is near_programs and near_before == 0
  assert far_before == count(near_programs.compiled) > 0  # Nothing compiled for the second.
  assert [f.token_ids for f in near] == [f.token_ids for f in far]
  accepted = lambda run: sum(int(f.accepted_by_position.sum()) for f in run)
  assert accepted(near) != accepted(far)
