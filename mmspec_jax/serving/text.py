"""From OpenAI messages to prompt ids."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from mmspec_jax.data.processing import LLAVA_CHAT_TEMPLATE, MultimodalProcessor


def chat_prompt(processor: MultimodalProcessor, messages: Sequence[dict[str, Any]]) -> str:
  """The chat template applied to `messages` ({'role', 'content': [{'type': 'image'} |
  {'type': 'text', 'text'}]}), ending where the assistant's answer starts. One user message
  gives exactly processor.format_prompt's text (decode.py's prompt)."""
  template = processor.chat_template or LLAVA_CHAT_TEMPLATE
  return processor.tokenizer.apply_chat_template(
      list(messages), chat_template=template, tokenize=False, add_generation_prompt=True)
