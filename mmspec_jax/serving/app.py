"""The OpenAI-compatible HTTP layer (FastAPI): validates, enqueues into the engine and streams.

    server = Server(config)          # loads and checks the models; nothing compiled yet
    app = server.app                 # the engine compiles and starts with the app's lifespan

On several processes every process builds the Server; process 0 serves the app and the others
run `server.engine.follow()` (serve.py does this).

Handlers never touch the device (serving/engine.py owns it). Bad input gets OpenAI's error body
with a 4xx status, never a 500; one request's failure never disturbs the others.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import logging
import os
import secrets
import time
from typing import Any

import fastapi
import jax
import jinja2
import pydantic
from fastapi import responses

from mmspec_jax import distributed
from mmspec_jax.convert import hub
from mmspec_jax.decoding import inputs, runner
from mmspec_jax.decoding.sampling import SamplingConfig
from mmspec_jax.decoding.text_stream import TextStream
from mmspec_jax.models import LlavaConfig, text_config
from mmspec_jax.serving import media, protocol
from mmspec_jax.serving.engine import QueueFull, ServingEngine
from mmspec_jax.serving.metrics import ServerMetrics, finish_reason
from mmspec_jax.serving.protocol import APIError
from mmspec_jax.serving.text import chat_prompt


def served_model_name(config) -> str:
  """config.served_model_name, else a Hub id as it is, else the target directory's name."""
  if config.served_model_name:
    return config.served_model_name
  if hub.is_hub_id(config.target):
    return config.target
  return os.path.basename(os.path.normpath(os.path.abspath(config.target)))


SSE_HEADERS = {'Cache-Control': 'no-cache', 'X-Accel-Buffering': 'no'}


class Server:
  """The session, decoder, scheduler, engine and metrics of one served model, and its app."""

  def __init__(self, config):
    runner.check_decoding_settings(config)
    self.config = config
    self.session = runner.open_session(config)
    self.model_name = served_model_name(config)
    self.sampling = runner.sampling_config(config)
    draft, gamma, tree, threshold = runner.speculation(config)
    target = self.session.target_config
    self.with_images = isinstance(target, LlavaConfig)
    self.decoder = self.session.decoder(
        draft, num_draft_tokens=gamma, sampling=self.sampling,
        max_new_tokens=config.max_new_tokens, draft_tree=tree, confidence_threshold=threshold,
        per_request_sampling=True, with_images=self.with_images)
    max_positions = text_config(target).max_position_embeddings
    capacity = config.slot_capacity or max_positions
    scheduler = self.session.scheduler(
        self.decoder, num_slots=config.batch_size, capacity=capacity,
        chunk_steps=config.chunk_steps, buckets=config.length_buckets,
        prefill_width=config.prefill_width)
    # Every bucket a prompt that fits a slot may be padded to (the last may pass the capacity).
    lengths = sorted({b for b in config.length_buckets if b < capacity}
                     | {inputs.bucket_length(capacity - 1, config.length_buckets)})
    # The most positions a prompt and its new tokens may take: the slots', the target's and each
    # draft's, less the drafts a last step may verify past the budget.
    overshoot = max(gamma - 1, 0)
    self.room = min([capacity, max_positions - overshoot] + [
        text_config(c).max_position_embeddings - overshoot
        for c in self.session.draft_configs.values()])
    messages = distributed.HostMessages('mmspec_serve') if jax.process_count() > 1 else None
    self.engine = ServingEngine(scheduler, max_waiting=config.max_waiting,
                                compile_lengths=lengths, messages=messages)
    self.metrics = ServerMetrics(self.engine, gamma, self.session.eos_token_ids)
    self.engine.on_event = self.metrics.observe
    self._builder = None  # The request builder's thread, while the app runs (lifespan).
    self.app = self._make_app()

  # --- requests --------------------------------------------------------------------------------
  def _budget(self, asked: int | None, prompt_length: int) -> int:
    limit = self.config.max_new_tokens
    if asked is None:  # As much as fits (a prompt with no room left is refused by the checks).
      return max(1, min(limit, self.room - prompt_length))
    if not 1 <= asked <= limit:
      raise APIError(400, f'max_tokens must be in [1, {limit}] (the server\'s max_new_tokens), '
                     f'got {asked}', param='max_tokens')
    return asked

  def _sampling(self, body: protocol._SamplingFields) -> SamplingConfig:
    given = {name: getattr(body, name) for name in inputs.SAMPLING_FIELDS
             if getattr(body, name) is not None}
    try:
      return SamplingConfig(**{**vars(self.sampling), **given})
    except ValueError as e:
      raise APIError(400, str(e), param=next(iter(given), None)) from e

  def _request(self, rid: str, ids: list[int], image, body: protocol._SamplingFields,
               asked: int | None) -> tuple[inputs.Request, int]:
    if body.n != 1:
      raise APIError(400, f'n must be 1 (one choice per request), got {body.n}', param='n')
    if body.seed is not None and not 0 <= body.seed < 2 ** 32:
      raise APIError(400, f'seed must be in [0, 2**32), got {body.seed}', param='seed')
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stop) > inputs.MAX_STOP_SEQUENCES or not all(stop):
      raise APIError(400, f'stop must be at most {inputs.MAX_STOP_SEQUENCES} non-empty strings',
                     param='stop')
    budget = self._budget(asked, len(ids))
    request = inputs.Request(rid, 0, tuple(ids), image, body.seed, budget,
                             self._sampling(body), tuple(stop))
    try:
      inputs.check_ids(ids, 'the prompt', image is not None, self.session.target_config, budget,
                       self.decoder.num_draft_tokens,
                       tuple(self.session.draft_configs.values()))
      self.engine.check(request, budget)
    except ValueError as e:  # Too long for the slots or the model, or ids it does not have.
      raise APIError(400, str(e)) from e
    return request, budget

  def _chat_request(self, body: protocol.ChatCompletionRequest, rid: str):
    messages, images = [], []
    for message in body.messages:
      parts = ([protocol.ContentPart(type='text', text=message.content)]
               if isinstance(message.content, str) else message.content or [])
      content = []
      for part in parts:
        if part.type == 'text':
          content.append({'type': 'text', 'text': part.text or ''})
        elif part.image_url is None:
          raise APIError(400, 'an image_url part needs "image_url": {"url": ...}',
                         param='messages')
        else:
          try:
            images.append(media.load_image(part.image_url.url,
                                           self.config.allowed_local_media_path))
          except ValueError as e:
            raise APIError(400, str(e), param='messages') from e
          content.append({'type': 'image'})
      role = 'system' if message.role == 'developer' else message.role
      messages.append({'role': role, 'content': content})
    if len(images) > 1:
      raise APIError(400, f'at most one image per request, got {len(images)}', param='messages')
    if images and not self.with_images:
      raise APIError(400, 'this model has no vision tower: send text only', param='messages')
    if not messages:
      raise APIError(400, 'messages must not be empty', param='messages')
    try:
      ids = self.session.processor.encode(chat_prompt(self.session.processor, messages),
                                          num_images=len(images))
    except (ValueError, TypeError, jinja2.TemplateError) as e:  # The chat template refused it.
      raise APIError(400, str(e), param='messages') from e
    asked = body.max_completion_tokens if body.max_completion_tokens is not None else (
        body.max_tokens)
    return self._request(rid, ids, images[0] if images else None, body, asked)

  def _completion_request(self, body: protocol.CompletionRequest, rid: str):
    if isinstance(body.prompt, str):
      if not body.prompt:
        raise APIError(400, 'prompt must not be empty', param='prompt')
      try:
        ids = self.session.processor.encode(body.prompt, num_images=0)
      except ValueError as e:  # An <image> in a text completion's prompt.
        raise APIError(400, str(e), param='prompt') from e
    else:
      ids = list(body.prompt)
      if not ids:
        raise APIError(400, 'prompt must not be empty', param='prompt')
    return self._request(rid, ids, None, body, body.max_tokens)

  # --- decoding ----------------------------------------------------------------------------------
  def _submit(self, request: inputs.Request, budget: int):
    if self.engine.error is not None:
      raise APIError(503, 'the decoding engine has failed; see the server log',
                     kind='server_error')
    try:
      return self.engine.submit(request, budget)
    except QueueFull as e:
      raise APIError(429, str(e), kind='rate_limit_error') from e

  async def _complete(self, request, budget, chat: bool) -> dict[str, Any]:
    eid, queue = self._submit(request, budget)
    finished = None
    async with contextlib.aclosing(self.engine.events(eid, queue)) as events:
      async for event in events:
        finished = event.finished or finished
    text = finished.text(self.session.processor)
    reason = finish_reason(finished, self.session.eos_token_ids)
    usage = protocol.usage(len(request.token_ids), finished.num_generated)
    make = protocol.chat_response if chat else protocol.completion_response
    return make(request.id, self.model_name, text, reason, usage)

  async def _stream(self, request, budget, chat: bool, include_usage: bool):
    eid, queue = self._submit(request, budget)
    created = int(time.time())
    text = TextStream(self.session.processor, [s for s in request.stop if isinstance(s, str)])

    def chunk(piece: str | None, reason: str | None = None, usage=None) -> str:
      if chat:  # The last chunk's delta may be empty; the usage chunk has no choices.
        delta = None if piece is None else ({'content': piece} if piece else {})
        body = protocol.chat_chunk(request.id, self.model_name, created, delta, reason, usage)
      else:
        body = protocol.completion_chunk(request.id, self.model_name, created, piece, reason,
                                         usage)
      return f'data: {json.dumps(body, ensure_ascii=False)}\n\n'

    async def lines():
      try:
        async for line in sse():
          yield line
      finally:  # However the stream ends (a client gone before the first event too).
        self.engine.cancel(eid)

    async def sse():
      if chat:  # OpenAI's first chunk names the role.
        first = protocol.chat_chunk(request.id, self.model_name, created,
                                    {'role': 'assistant', 'content': ''})
        yield f'data: {json.dumps(first)}\n\n'
      async with contextlib.aclosing(self.engine.events(eid, queue)) as events:
        async for event in events:
          piece = text.add(event.new_tokens)
          if event.finished is None:
            if piece:
              yield chunk(piece)
            continue
          finished = event.finished
          piece += text.finish(finished.stopped_by)
          yield chunk(piece, finish_reason(finished, self.session.eos_token_ids))
          if include_usage:
            yield chunk(None, usage=protocol.usage(len(request.token_ids),
                                                   finished.num_generated))
      yield 'data: [DONE]\n\n'

    return responses.StreamingResponse(lines(), media_type='text/event-stream',
                                       headers=SSE_HEADERS)

  # --- the app -----------------------------------------------------------------------------------
  async def _body(self, http: fastapi.Request, model: type[pydantic.BaseModel]):
    self._authorize(http)
    declared = http.headers.get('content-length')
    limit = self.config.max_body_bytes
    if declared is not None and declared.isdigit() and int(declared) > limit:
      raise APIError(413, f'the request body is {declared} bytes, more than {limit}')
    data = bytearray()
    async for piece in http.stream():
      data += piece
      if len(data) > limit:
        raise APIError(413, f'the request body is more than {limit} bytes')
    try:
      body = model.model_validate_json(bytes(data))
    except pydantic.ValidationError as e:
      first = e.errors()[0]
      where = '.'.join(str(p) for p in first['loc'])
      raise APIError(400, f'{where}: {first["msg"]}' if where else first['msg'],
                     param=where or None) from e
    if body.model != self.model_name:
      raise APIError(404, f'the model {body.model!r} does not exist; this server serves '
                     f'{self.model_name!r}', param='model', code='model_not_found')
    return body

  def _authorize(self, http: fastapi.Request):
    key = self.config.api_key
    if not key:
      return
    given = http.headers.get('authorization', '')
    if not secrets.compare_digest(given.encode(), f'Bearer {key}'.encode()):
      raise APIError(401, 'a valid API key is needed: "Authorization: Bearer <key>"',
                     kind='authentication_error', code='invalid_api_key')

  def _make_app(self) -> fastapi.FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app):
      del app
      # Requests are built (image decoded, prompt templated and tokenized) off the event loop,
      # so that a large image does not hold up every other stream; on one thread, because a
      # tokenizer's settings are shared state.
      self._builder = concurrent.futures.ThreadPoolExecutor(
          max_workers=1, thread_name_prefix='mmspec-request-builder')
      self.engine.start()
      yield
      self.engine.stop()
      self._builder.shutdown(wait=False, cancel_futures=True)

    app = fastapi.FastAPI(title='mmspec-jax', lifespan=lifespan)

    @app.exception_handler(APIError)
    async def api_error(request, error: APIError):
      del request
      return responses.JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(Exception)
    async def unexpected(request, error: Exception):
      del request
      logging.exception('unexpected error', exc_info=error)
      return responses.JSONResponse(APIError(500, f'internal error: {error!r}',
                                             kind='server_error').body(), status_code=500)

    @app.get('/health')
    async def health():
      if self.engine.error is not None:
        return responses.JSONResponse({'status': 'failed'}, status_code=503)
      if not self.engine.ready.is_set():
        return responses.JSONResponse({'status': 'compiling'}, status_code=503)
      return {'status': 'ok'}

    @app.get('/v1/models')
    async def models(http: fastapi.Request):
      self._authorize(http)
      return {'object': 'list', 'data': [{'id': self.model_name, 'object': 'model',
                                          'created': 0, 'owned_by': 'mmspec-jax'}]}

    @app.get('/metrics')
    async def metrics():
      return responses.Response(self.metrics.text(), media_type='text/plain; version=0.0.4')

    @app.post('/v1/chat/completions')
    async def chat(http: fastapi.Request):
      return await self._answer(http, chat=True)

    @app.post('/v1/completions')
    async def completions(http: fastapi.Request):
      return await self._answer(http, chat=False)

    return app

  async def _answer(self, http: fastapi.Request, chat: bool):
    """A chat or text completion, streamed or whole."""
    model = protocol.ChatCompletionRequest if chat else protocol.CompletionRequest
    body = await self._body(http, model)
    build = self._chat_request if chat else self._completion_request
    request, budget = await asyncio.get_running_loop().run_in_executor(
        self._builder, build, body, protocol.completion_id('chatcmpl' if chat else 'cmpl'))
    if body.stream:
      include = bool(body.stream_options and body.stream_options.include_usage)
      return await self._stream(request, budget, chat, include)
    return await self._complete(request, budget, chat)
