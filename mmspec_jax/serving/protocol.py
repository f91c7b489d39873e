"""The OpenAI API's request and response bodies, as the server reads and writes them.

Requests ignore fields they do not know (as OpenAI's API does); `top_k` is an extension (vLLM has
it too). Errors are OpenAI's: {"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

import pydantic


class _Lenient(pydantic.BaseModel):
  model_config = pydantic.ConfigDict(extra='ignore')


class ImageURL(_Lenient):
  url: str
  detail: str | None = None


class ContentPart(_Lenient):
  type: Literal['text', 'image_url']
  text: str | None = None
  image_url: ImageURL | None = None


class ChatMessage(_Lenient):
  role: Literal['system', 'user', 'assistant', 'developer']
  content: str | list[ContentPart] | None = None


class StreamOptions(_Lenient):
  include_usage: bool = False


class _SamplingFields(_Lenient):
  """What chat and text completions share."""
  model: str
  max_tokens: int | None = None
  temperature: float | None = None
  top_p: float | None = None
  top_k: int | None = None
  seed: int | None = None
  stop: str | list[str] | None = None
  stream: bool = False
  stream_options: StreamOptions | None = None
  n: int = 1


class ChatCompletionRequest(_SamplingFields):
  messages: list[ChatMessage]
  max_completion_tokens: int | None = None


class CompletionRequest(_SamplingFields):
  prompt: str | list[int]


class APIError(Exception):
  """An error the client caused (or a full queue): OpenAI's error body with an HTTP status."""

  def __init__(self, status: int, message: str, *, param: str | None = None,
               kind: str = 'invalid_request_error', code: str | None = None):
    super().__init__(message)
    self.status, self.message, self.param, self.kind, self.code = (status, message, param, kind,
                                                                  code)

  def body(self) -> dict[str, Any]:
    return {'error': {'message': self.message, 'type': self.kind, 'param': self.param,
                      'code': self.code}}


def completion_id(prefix: str) -> str:
  return f'{prefix}-{uuid.uuid4().hex}'


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
  return {'prompt_tokens': prompt_tokens, 'completion_tokens': completion_tokens,
          'total_tokens': prompt_tokens + completion_tokens}


def chat_response(rid: str, model: str, text: str, finish_reason: str | None,
                  usage_: dict[str, int]) -> dict[str, Any]:
  return {'id': rid, 'object': 'chat.completion', 'created': int(time.time()), 'model': model,
          'choices': [{'index': 0, 'message': {'role': 'assistant', 'content': text},
                       'finish_reason': finish_reason, 'logprobs': None}],
          'usage': usage_}


def chat_chunk(rid: str, model: str, created: int, delta: dict[str, Any] | None,
               finish_reason: str | None = None, usage_: dict[str, int] | None = None
               ) -> dict[str, Any]:
  """A streamed chunk: a delta (and finish reason), or, with `usage_`, the usage chunk (no
  choices)."""
  choices = [] if delta is None else [{'index': 0, 'delta': delta,
                                       'finish_reason': finish_reason, 'logprobs': None}]
  return {'id': rid, 'object': 'chat.completion.chunk', 'created': created, 'model': model,
          'choices': choices, 'usage': usage_}


def completion_response(rid: str, model: str, text: str, finish_reason: str | None,
                        usage_: dict[str, int]) -> dict[str, Any]:
  return {'id': rid, 'object': 'text_completion', 'created': int(time.time()), 'model': model,
          'choices': [{'index': 0, 'text': text, 'finish_reason': finish_reason,
                       'logprobs': None}],
          'usage': usage_}


def completion_chunk(rid: str, model: str, created: int, text: str | None,
                     finish_reason: str | None = None, usage_: dict[str, int] | None = None
                     ) -> dict[str, Any]:
  choices = [] if text is None else [{'index': 0, 'text': text, 'finish_reason': finish_reason,
                                      'logprobs': None}]
  return {'id': rid, 'object': 'text_completion', 'created': created, 'model': model,
          'choices': choices, 'usage': usage_}
