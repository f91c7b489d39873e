"""The OpenAI-compatible server (serve.py), called as its users call it: the `openai` client
against a live uvicorn on 127.0.0.1, on the tiny LLaVA pair of test_decode_cli (the paper's
vocabulary layout: <image> and <pad> past the draft's ids). Every loop is bounded in count and
time."""

import base64
import concurrent.futures
import json
import os
import signal
import subprocess
import sys
import threading
import time

import openai
import pytest

from test_decode_cli import MAX_NEW_TOKENS, REPO, ckpt, make_config, read_jsonl  # noqa: F401
from mmspec_jax.decoding import runner
from mmspec_jax.serving import media
from mmspec_jax.serving.app import Server
from mmspec_jax.serving.defaults import serve_config
from mmspec_jax.serving.local import free_port, httpx, serving, wait_healthy
from mmspec_jax.decoding.text_stream import TextStream

API_KEY = 'test-key'
MODEL = 'tiny-llava'
STARTUP_SECONDS = 300  # Compiling the programs on a loaded 2-core machine.


def _config(ckpt, port, **overrides):  # noqa: F811
  config = serve_config()
  config.update(target=ckpt['target'], draft=ckpt['draft'], port=port, batch_size=2,
                num_draft_tokens=3, max_new_tokens=MAX_NEW_TOKENS, chunk_steps=2,
                prefill_width=2, slot_capacity=96, length_buckets=(32, 64), max_waiting=8,
                served_model_name=MODEL, api_key=API_KEY, **overrides)
  return config


@pytest.fixture(scope='module')
def server(ckpt):  # noqa: F811
  port = free_port()
  served = Server(_config(ckpt, port))
  with serving(served.app, port, STARTUP_SECONDS) as base:
    yield served, base


@pytest.fixture(scope='module')
def client(server):
  return openai.OpenAI(base_url=f'{server[1]}/v1', api_key=API_KEY, max_retries=0, timeout=120)


def _data_url(path) -> str:
  return 'data:image/png;base64,' + base64.b64encode(open(path, 'rb').read()).decode()


def _image_message(ckpt, text, image='a.png'):  # noqa: F811
  return [{'role': 'user', 'content': [
      {'type': 'text', 'text': text},
      {'type': 'image_url', 'image_url': {'url': _data_url(ckpt['root'] / image)}}]}]


@pytest.fixture(scope='module')
def decoded(ckpt, tmp_path_factory):  # noqa: F811
  """decode.py's outputs for the prompts the tests send: greedy, and sampled with seed 7."""
  root = tmp_path_factory.mktemp('serving_reference')
  rows = [{'id': 'image', 'prompt': 'w5 w6 w7', 'image': str(ckpt['root'] / 'a.png')},
          {'id': 'text', 'prompt': 'w8 w9 w10'},
          {'id': 'sampled', 'prompt': 'w11 w12', 'image': str(ckpt['root'] / 'b.png'),
           'temperature': 1.0, 'seed': 7}]
  prompts = root / 'prompts.jsonl'
  prompts.write_text(''.join(json.dumps(r) + '\n' for r in rows))
  config = make_config(ckpt, 'serving_reference', draft=ckpt['draft'], prompts=str(prompts),
                       output=str(root / 'out.jsonl'))
  runner.run(config)
  return {line['id']: line for line in read_jsonl(config.output)}


def test_chat_with_an_image_answers_as_decode_py(client, ckpt, decoded):  # noqa: F811
  response = client.chat.completions.create(
      model=MODEL, messages=_image_message(ckpt, 'w5 w6 w7'), max_tokens=MAX_NEW_TOKENS,
      temperature=0)
  choice = response.choices[0]
  assert choice.message.content == decoded['image']['text']
  assert response.usage.completion_tokens == len(decoded['image']['token_ids'])
  assert choice.finish_reason in ('stop', 'length') and response.model == MODEL
  text = client.chat.completions.create(
      model=MODEL, messages=[{'role': 'user', 'content': 'w8 w9 w10'}], temperature=0)
  assert text.choices[0].message.content == decoded['text']['text']
  # The EOS is this prompt's 4th greedy token (test_decode_cli's fixture): a stop, not a length.
  assert text.choices[0].finish_reason == 'stop'
  sampled = [client.chat.completions.create(
      model=MODEL, messages=_image_message(ckpt, 'w11 w12', 'b.png'), temperature=1.0,
      seed=7).choices[0].message.content for _ in range(2)]
  assert sampled == [decoded['sampled']['text']] * 2


def test_streamed_chat_is_the_same_text(client, ckpt):  # noqa: F811
  messages = _image_message(ckpt, 'w5 w6 w7')
  whole = client.chat.completions.create(model=MODEL, messages=messages, temperature=0)
  chunks = list(client.chat.completions.create(
      model=MODEL, messages=messages, temperature=0, stream=True,
      stream_options={'include_usage': True}))
  deltas = [c.choices[0].delta.content or '' for c in chunks if c.choices]
  assert ''.join(deltas) == whole.choices[0].message.content
  assert chunks[0].choices[0].delta.role == 'assistant'
  finals = [c.choices[0].finish_reason for c in chunks if c.choices]
  assert finals[-1] == whole.choices[0].finish_reason and not any(finals[:-1])
  assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
  # A stop string ends the text before it, streamed or not.
  stop = whole.choices[0].message.content.split()[2]
  cut = client.chat.completions.create(model=MODEL, messages=messages, temperature=0,
                                       stop=[stop])
  assert cut.choices[0].message.content == whole.choices[0].message.content.split(stop)[0]
  assert cut.choices[0].finish_reason == 'stop'
  streamed = client.chat.completions.create(model=MODEL, messages=messages, temperature=0,
                                            stop=stop, stream=True)
  assert ''.join(c.choices[0].delta.content or '' for c in streamed if c.choices) == (
      cut.choices[0].message.content)


def test_concurrent_streams_each_get_their_own_answer(client, ckpt):  # noqa: F811
  prompts = [f'w{i} w{i + 1} w{i + 2}' for i in range(20, 26)]
  alone = [client.completions.create(model=MODEL, prompt=p, max_tokens=8, temperature=0)
           .choices[0].text for p in prompts]

  def stream(prompt):
    return ''.join(c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=8, temperature=0, stream=True) if c.choices)

  with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
    together = list(pool.map(stream, prompts, timeout=300))
  assert together == alone
  ids = client.completions.create(model=MODEL, prompt=[1, 20, 21, 22], max_tokens=8,
                                  temperature=0)
  assert ids.choices[0].text and ids.usage.prompt_tokens == 4


@pytest.mark.parametrize('kwargs, status, message', [
    ({'temperature': -1}, 400, 'temperature must be in [0, 100.0]'),
    ({'extra_body': {'top_k': 3_000_000_000}}, 400, 'top_k must be an integer in [0, 2**31)'),
    ({'top_p': 0}, 400, 'top_p must be in'),
    ({'n': 2}, 400, 'n must be 1'),
    ({'max_tokens': MAX_NEW_TOKENS + 1}, 400, 'max_tokens must be in'),
    ({'model': 'other'}, 404, "the model 'other' does not exist"),
    ({'image': 'http://example.com/a.png'}, 400, 'fetches nothing from the network'),
    ({'image': 'data:image/png;base64,bm90IGFuIGltYWdl'}, 400, 'cannot decode'),
    ({'image': 'file:///etc/passwd'}, 400, 'file:// image URLs are off'),
    ({'prompt': ' '.join(['w9'] * 120)}, 400, 'exceeds the slot capacity 96'),
])
def test_bad_requests_get_openai_errors(client, ckpt, kwargs, status, message):  # noqa: F811
  kwargs = dict(kwargs)
  content = [{'type': 'text', 'text': kwargs.pop('prompt', 'w5 w6')}]
  if 'image' in kwargs:
    content.append({'type': 'image_url', 'image_url': {'url': kwargs.pop('image')}})
  with pytest.raises(openai.APIStatusError) as error:
    client.chat.completions.create(**{'model': MODEL, 'messages': [
        {'role': 'user', 'content': content}], **kwargs})
  assert error.value.status_code == status
  body = error.value.body
  assert message in body['message'] and {'type', 'param', 'code'} <= set(body)


def test_keys_sizes_and_a_full_queue(server, client):
  served, base = server
  headers = {'Authorization': f'Bearer {API_KEY}'}
  body = {'model': MODEL, 'messages': [{'role': 'user', 'content': 'w5'}], 'max_tokens': 2}
  no_key = httpx.post(f'{base}/v1/chat/completions', json=body, timeout=60)
  assert no_key.status_code == 401 and no_key.json()['error']['code'] == 'invalid_api_key'
  big = httpx.post(f'{base}/v1/chat/completions', headers=headers, timeout=60,
                   content=b'{"model": "' + b'x' * (served.config.max_body_bytes + 1) + b'"}')
  assert big.status_code == 413
  bad_json = httpx.post(f'{base}/v1/chat/completions', headers=headers, content=b'{"model":',
                        timeout=60)
  assert bad_json.status_code == 400 and 'error' in bad_json.json()
  unknown_field = dict(body, unknown_field={'any': 1})  # Ignored, as OpenAI's API does.
  assert httpx.post(f'{base}/v1/chat/completions', headers=headers, json=unknown_field,
                    timeout=120).status_code == 200
  saved = served.engine.max_waiting
  served.engine.max_waiting = -served.engine.num_slots  # Every request finds the queue full.
  try:
    with pytest.raises(openai.RateLimitError):
      client.chat.completions.create(model=MODEL, messages=body['messages'], max_tokens=2)
  finally:
    served.engine.max_waiting = saved
  assert [m.id for m in client.models.list().data] == [MODEL]
  assert httpx.get(f'{base}/health', timeout=10).json() == {'status': 'ok'}


def _metric(base: str, name: str) -> float:
  text = httpx.get(f'{base}/metrics', timeout=10).text
  values = [float(line.split()[-1]) for line in text.splitlines()
            if line.startswith(name + ' ') or line.startswith(name + '{')]
  return sum(values)


def test_a_dropped_stream_frees_its_slot_and_metrics_move(server, client):
  served, base = server
  before = _metric(base, 'mmspec:generation_tokens_total')
  drafted = _metric(base, 'mmspec:spec_decode_num_draft_tokens_total')
  headers = {'Authorization': f'Bearer {API_KEY}'}
  body = {'model': MODEL, 'prompt': 'w30 w31', 'max_tokens': MAX_NEW_TOKENS, 'stream': True}
  with httpx.stream('POST', f'{base}/v1/completions', json=body, headers=headers,
                    timeout=60) as response:
    first = next(response.iter_lines())
    assert first.startswith('data: ')
  # The client is gone: its request is cancelled at a chunk boundary and the slot freed.
  deadline = time.time() + 60
  while served.engine.num_running and time.time() < deadline:
    time.sleep(0.1)
  assert served.engine.num_running == 0 and served.engine.num_waiting == 0
  answer = client.completions.create(model=MODEL, prompt='w30 w31', max_tokens=4, temperature=0)
  assert answer.usage.completion_tokens >= 1
  assert _metric(base, 'mmspec:generation_tokens_total') > before
  assert _metric(base, 'mmspec:spec_decode_num_draft_tokens_total') > drafted
  assert _metric(base, 'mmspec:time_to_first_token_seconds_count') > 0
  assert _metric(base, 'mmspec:spec_decode_mean_acceptance_length') >= 1


def test_a_request_being_built_holds_up_no_other(server, client, ckpt, decoded,  # noqa: F811
                                                 monkeypatch):
  """Requests are built (image decoded, prompt tokenized) off the event loop: while one request's
  image is still being read, the server answers others, and the held request then gets decode.py's
  answer."""
  _, base = server
  entered, release = threading.Event(), threading.Event()
  load_image = media.load_image

  def held_load_image(url, allowed_local_media_path=''):
    entered.set()
    assert release.wait(120)
    return load_image(url, allowed_local_media_path)

  monkeypatch.setattr(media, 'load_image', held_load_image)
  with concurrent.futures.ThreadPoolExecutor(1) as pool:
    held = pool.submit(client.chat.completions.create, model=MODEL, temperature=0,
                       max_tokens=MAX_NEW_TOKENS, messages=_image_message(ckpt, 'w5 w6 w7'))
    try:
      assert entered.wait(60)
      # Blocked on the event loop, these would wait for the image and time out.
      assert httpx.get(f'{base}/health', timeout=10).json() == {'status': 'ok'}
      assert httpx.get(f'{base}/v1/models', timeout=10,
                       headers={'Authorization': f'Bearer {API_KEY}'}).status_code == 200
    finally:
      release.set()
    answer = held.result(timeout=120)
  assert answer.choices[0].message.content == decoded['image']['text']
  assert answer.usage.completion_tokens == len(decoded['image']['token_ids'])


class _BytesProcessor:
  """Token ids are UTF-8 bytes: a multi-byte character arrives one byte (token) at a time."""

  def decode(self, ids):
    return bytes(ids).decode('utf-8', errors='replace')


def test_text_stream_never_splits_a_character_or_a_stop_string():
  text = 'héllo → wörld STOP tail'
  ids = list(text.encode('utf-8'))
  for stops in ((), ('STOP',)):
    stream = TextStream(_BytesProcessor(), stops)
    pieces = [stream.add([i]) for i in ids[:-3]] + [stream.add(ids[-3:])]  # Several at once.
    assert all('\ufffd' not in p for p in pieces)
    if stops:
      assert not any('S' in p for p in pieces)  # 'STOP' is held back until the request ends.
    pieces.append(stream.finish('STOP' if stops else None))
    assert ''.join(pieces) == (text.split('STOP')[0] if stops else text)


def test_sigterm_finishes_running_requests_and_exits_zero(ckpt, tmp_path):  # noqa: F811
  port = free_port()
  config = _config(ckpt, port)
  flags = [f'--config.{name}={value}' for name, value in (
      ('target', config.target), ('draft', config.draft), ('port', port), ('batch_size', 2),
      ('num_draft_tokens', 3), ('max_new_tokens', MAX_NEW_TOKENS), ('chunk_steps', 1),
      ('prefill_width', 2), ('slot_capacity', 96), ('length_buckets', '(32,64)'),
      ('served_model_name', MODEL))]
  env = {**os.environ, 'PYTHONUNBUFFERED': '1'}
  process = subprocess.Popen([sys.executable, 'serve.py', *flags], cwd=REPO, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  try:
    base = f'http://127.0.0.1:{port}'
    wait_healthy(base, STARTUP_SECONDS, process)
    body = {'model': MODEL, 'prompt': 'w40 w41', 'max_tokens': MAX_NEW_TOKENS, 'stream': True}
    with httpx.stream('POST', f'{base}/v1/completions', json=body, timeout=120) as response:
      lines = response.iter_lines()
      assert next(lines).startswith('data: ')
      process.send_signal(signal.SIGTERM)
      rest = [line for line in lines if line]
    assert rest[-1] == 'data: [DONE]'  # The running request finished.
    assert process.wait(timeout=120) == 0
  finally:
    if process.poll() is None:
      process.kill()
      process.wait(30)
  output = process.stdout.read()
  assert f'serving {MODEL!r} on http://127.0.0.1:{port}' in output


def test_two_processes_serve_what_one_process_decodes(ckpt, decoded):  # noqa: F811
  """serve.py on 2 processes x 4 CPU devices (every slot's rows split over all 8): process 0
  serves HTTP and hands its admissions to process 1; the answers are decode.py's on one device,
  and SIGTERM to process 0 stops both, with exit status 0."""
  from multiprocess import Processes  # pylint: disable=import-outside-toplevel
  port = free_port()
  flags = [f'--config.{name}={value}' for name, value in (
      ('target', ckpt['target']), ('draft', ckpt['draft']), ('port', port), ('batch_size', 4),
      ('num_draft_tokens', 3), ('max_new_tokens', MAX_NEW_TOKENS), ('chunk_steps', 2),
      ('prefill_width', 2), ('slot_capacity', 96), ('length_buckets', '(32,64)'),
      ('served_model_name', MODEL))]
  with Processes([sys.executable, 'serve.py', *flags], num_processes=2,
                 timeout=STARTUP_SECONDS) as job:
    job.wait_for_line(f'serving {MODEL!r} on')
    base = f'http://127.0.0.1:{port}'
    wait_healthy(base, STARTUP_SECONDS)
    client = openai.OpenAI(base_url=f'{base}/v1', api_key='unused', max_retries=0, timeout=120)
    prompts = [('w5 w6 w7', 'a.png', {'temperature': 0}, 'image'),
               ('w11 w12', 'b.png', {'temperature': 1.0, 'seed': 7}, 'sampled')]
    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
      answers = list(pool.map(lambda p: client.chat.completions.create(
          model=MODEL, messages=_image_message(ckpt, p[0], p[1]), **p[2]), prompts))
    for (_, _, _, name), answer in zip(prompts, answers):
      assert answer.choices[0].message.content == decoded[name]['text']
    # A stream dropped at its first event is cancelled on both processes alike; then the slots
    # serve the next request.
    body = {'model': MODEL, 'prompt': 'w30 w31', 'max_tokens': MAX_NEW_TOKENS, 'stream': True}
    with httpx.stream('POST', f'{base}/v1/completions', json=body, timeout=60) as response:
      assert next(response.iter_lines()).startswith('data: ')
    again = client.chat.completions.create(model=MODEL, messages=_image_message(ckpt, 'w5 w6 w7'),
                                           temperature=0)
    assert again.choices[0].message.content == decoded['image']['text']
    job.signal(signal.SIGTERM, indices=[0])
    assert job.wait() == [0, 0]
  assert f'serving {MODEL!r} on' not in job.output(1)  # Process 1 serves nothing itself.
