"""A request's text while its tokens stream in (decode.py's one prompt, the server's streams)."""

from __future__ import annotations

from collections.abc import Sequence

from mmspec_jax.decoding.scheduler import output_text
from mmspec_jax.data.processing import MultimodalProcessor


class TextStream:
  """The text of a growing token sequence, handed out in pieces whose concatenation is
  final_text: a piece never ends inside a multi-byte character (the tokenizer decodes a partial
  one as U+FFFD, held back until it completes) and never reaches into a possible stop string (the
  last len(longest stop) - 1 characters wait until the request ends). Its pieces add up to
  scheduler.output_text, decode.py's text."""

  def __init__(self, processor: MultimodalProcessor, stop_strings: Sequence[str] = ()):
    self.processor = processor
    self.tokens: list[int] = []
    self.sent = 0  # Characters handed out so far.
    self.stop_strings = tuple(stop_strings)
    self.holdback = max((len(s) for s in stop_strings), default=1) - 1

  def add(self, token_ids: Sequence[int]) -> str:
    """The text that is safe to hand out after these new tokens ('' if none)."""
    self.tokens += list(token_ids)
    text = self.processor.decode(self.tokens)
    safe = len(text.rstrip('\ufffd')) - self.holdback
    for stop in self.stop_strings:  # A whole stop string: nothing from its start on.
      if stop in text:
        safe = min(safe, text.index(stop))
    if safe <= self.sent:
      return ''
    piece, self.sent = text[self.sent:safe], safe
    return piece

  def finish(self, stopped_by: int | str | None) -> str:
    """The rest of the text once the request has ended."""
    text = output_text(self.processor, self.tokens, stopped_by)
    piece, self.sent = text[self.sent:], len(text)
    return piece
