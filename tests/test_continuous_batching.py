"""Continuous batching (decoding/slots.py, decoding/scheduler.py): a request's tokens are the ones
it gets decoded alone in a static batch of one, whatever slot it lands in, whichever chunk it
enters at and whatever its neighbours are, greedy and sampled, for the target alone, chains,
trees and both draft kinds."""

import jax
import numpy as np
import pytest

from test_decode_cli import ROWS, ckpt, make_config, read_jsonl  # noqa: F401 (fixture)
from mmspec_jax.convert.loading import save_converted
from mmspec_jax.decoding import inputs, runner
from mmspec_jax.decoding.sampling import SamplingConfig
from mmspec_jax.decoding.session import DecodeSession
from mmspec_jax.decoding.tree import DraftTree
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


def test_cancel_frees_the_slot(session):
  session, requests = session
  decoder = session.decoder(None, num_draft_tokens=0, sampling=SamplingConfig(),
                            max_new_tokens=MAX_NEW_TOKENS, requests=requests)
  scheduler = session.scheduler(decoder, num_slots=1, capacity=128, chunk_steps=1,
                                prefill_width=1, key=RUN_KEY)
  first = scheduler.submit(requests[0], MAX_NEW_TOKENS)
  second = scheduler.submit(requests[1], 4)
  events = scheduler.step()  # The first runs one step; the second waits for the only slot.
  assert [e.handle for e in events] == [first] and scheduler.num_waiting == 1
  scheduler.cancel(first)
  events = scheduler.step()
  cancelled = [e.finished for e in events if e.handle == first][0]
  assert cancelled.cancelled and 0 < cancelled.num_generated < MAX_NEW_TOKENS
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
