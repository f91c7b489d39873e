"""LLaVA-1.5 conversations -> token ids and a loss mask that covers the assistant's answers.

The text is the LLaVA-1.5 (vicuna v1) format without a system prompt:

  <s>USER: <image>\\n{q1} ASSISTANT: {a1}</s>USER: {q2} ASSISTANT: {a2}</s>

BOS comes first when the tokenizer adds one. The loss mask is True exactly on the tokens of each
answer and on the EOS closing it: the draft learns to answer and to stop, never to write the
user's turns.

Each piece ("USER: ... ASSISTANT:", the answer, EOS) is tokenized on its own and the ids are
concatenated, so the mask boundaries are exact by construction rather than recovered from offsets.
Tokenizer caveats:
  - The answer follows "ASSISTANT:" after a space. Whether the answer is tokenized as " {a}" or
    "{a}" is probed once per tokenizer (whichever reproduces the tokens of "ASSISTANT: yes"):
    SentencePiece (LLaMA) adds its own "▁" word prefix, so it takes "{a}"; byte-level BPE
    (GPT-2 style) takes " {a}"; whitespace-split vocabularies take either.
  - A SentencePiece tokenizer gives the first word of every piece the "▁" prefix, also right
    after "</s>" where tokenizing the whole string might not. The first turn, BOS + "USER: ...
    ASSISTANT:", is exactly what processing.MultimodalProcessor.encode() produces for the
    decoding prompt, which is the part that has to match.

Image modes (`<image>` is the placeholder of the LLaVA JSON; each placeholder is first moved to
the start of its turn followed by a newline, as LLaVA's own preprocessing does):
  'drop'    the placeholder and the newline after it are removed: a language-only draft.
  'keep'    one image token id per placeholder.
  'expand'  num_image_tokens copies of the image token id per placeholder, as LlavaProcessor
            does; the model writes one image feature into each copy.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

IMAGE_PLACEHOLDER = '<image>'
IMAGE_MODES = ('drop', 'keep', 'expand')
_HUMAN = ('human', 'user')
_ASSISTANT = ('gpt', 'assistant')
_PLACEHOLDER_AND_NEWLINE = re.compile(re.escape(IMAGE_PLACEHOLDER) + r'\n?')
_PROBE_HEAD, _PROBE_ANSWER = 'ASSISTANT:', 'yes'


def _as_str(value: Any) -> str:
  return value.decode('utf-8') if isinstance(value, bytes) else str(value)


def conversation_turns(conversations: Sequence[Mapping[str, Any]] | Mapping[str, Sequence[Any]]
                       ) -> list[tuple[str, str]]:
  """(role, text) pairs from a LLaVA JSON list [{'from', 'value'}, ...] or from the decoded TFDS
  feature {'from': [...], 'value': [...]} (whose strings are bytes)."""
  if isinstance(conversations, Mapping):
    roles, values = conversations.get('from'), conversations.get('value')
    if roles is None or values is None or len(roles) != len(values):
      raise ValueError("conversations must be {'from': [...], 'value': [...]} of equal lengths "
                       'or a list of {"from", "value"} turns')
    return [(_as_str(r), _as_str(v)) for r, v in zip(roles, values)]
  turns = []
  for turn in conversations:
    if not isinstance(turn, Mapping) or 'from' not in turn or 'value' not in turn:
      raise ValueError(f'a conversation turn must have "from" and "value", got {turn!r}')
    turns.append((_as_str(turn['from']), _as_str(turn['value'])))
  return turns


def question_answer_pairs(turns: Sequence[tuple[str, str]]) -> list[tuple[str, str | None]]:
  """Alternating human/assistant turns -> [(question, answer), ...].

  Leading assistant turns are skipped (as LLaVA's training code does); a trailing question has
  answer None. Roles 'human'/'user' and 'gpt'/'assistant' are accepted.
  """
  pairs: list[tuple[str, str | None]] = []
  for index, (role, text) in enumerate(turns):
    if role not in _HUMAN + _ASSISTANT:
      raise ValueError(f'conversation turn {index}: unknown role {role!r}; expected one of '
                       f'{_HUMAN + _ASSISTANT}')
    if role in _HUMAN:
      if pairs and pairs[-1][1] is None:
        raise ValueError(f'conversation turn {index}: two human turns in a row')
      pairs.append((text, None))
    elif pairs:
      if pairs[-1][1] is not None:
        raise ValueError(f'conversation turn {index}: two assistant turns in a row')
      pairs[-1] = (pairs[-1][0], text)
  return pairs


class ConversationEncoder:
  """Encodes conversations with a Hugging Face tokenizer (see the module docstring).

  Probes the tokenizer once (BOS, answer spacing, the image token), so build one and reuse it.
  """

  def __init__(self, tokenizer, *, image_mode: str = 'drop', num_image_tokens: int | None = None,
               image_token_id: int | None = None):
    """Args:
      tokenizer: a transformers tokenizer (fast or slow).
      image_mode: 'drop', 'keep' or 'expand'.
      num_image_tokens: copies per image in 'expand' mode (576 for LLaVA-1.5 at 336 px).
      image_token_id: the id "<image>" tokenizes to; defaults to the tokenizer's. Must agree with
        the tokenizer when both exist.
    """
    if image_mode not in IMAGE_MODES:
      raise ValueError(f'image_mode must be one of {IMAGE_MODES}, got {image_mode!r}')
    if tokenizer.eos_token_id is None:
      raise ValueError('the tokenizer has no EOS token; answers must end with one')
    self.tokenizer = tokenizer
    self.image_mode = image_mode
    self.eos_id = int(tokenizer.eos_token_id)
    self.image_token_id = None
    self.num_image_tokens = 1
    if image_mode != 'drop':
      ids = self._encode(IMAGE_PLACEHOLDER)
      if len(ids) != 1:
        raise ValueError(f'image_mode={image_mode!r} needs a tokenizer that maps '
                         f'{IMAGE_PLACEHOLDER!r} to one token id (add it as a special token); '
                         f'it gives {ids}')
      if image_token_id is not None and image_token_id != ids[0]:
        raise ValueError(f'image_token_id={image_token_id} but the tokenizer maps '
                         f'{IMAGE_PLACEHOLDER!r} to {ids[0]}')
      self.image_token_id = ids[0]
    if image_mode == 'expand':
      if not num_image_tokens or num_image_tokens < 1:
        raise ValueError(f"image_mode='expand' needs num_image_tokens >= 1, got "
                         f'{num_image_tokens!r}')
      self.num_image_tokens = int(num_image_tokens)
    self.prefix_ids = self._special_prefix()
    self.answer_space = self._answer_takes_space()

  def _encode(self, text: str) -> list[int]:
    return [int(i) for i in self.tokenizer(text, add_special_tokens=False)['input_ids']]

  def _special_prefix(self) -> list[int]:
    # What the tokenizer itself puts in front of a text (BOS for LLaMA, nothing for GPT-2).
    full = [int(i) for i in self.tokenizer(_PROBE_ANSWER)['input_ids']]
    plain = self._encode(_PROBE_ANSWER)
    if plain and full[len(full) - len(plain):] == plain:
      return full[:len(full) - len(plain)]
    return []

  def _answer_takes_space(self) -> bool:
    joint = self._encode(f'{_PROBE_HEAD} {_PROBE_ANSWER}')
    head = self._encode(_PROBE_HEAD)
    if head + self._encode(f' {_PROBE_ANSWER}') == joint:
      return True
    return head + self._encode(_PROBE_ANSWER) != joint  # Neither matches: keep the literal text.

  def _place_images(self, text: str) -> str:
    count = text.count(IMAGE_PLACEHOLDER)
    stripped = _PLACEHOLDER_AND_NEWLINE.sub('', text).strip()
    if self.image_mode == 'drop' or count == 0:
      return stripped
    return (IMAGE_PLACEHOLDER + '\n') * count + stripped

  def _encode_prompt(self, text: str) -> list[int]:
    ids = self._encode(text)
    if self.image_token_id is None:
      return ids
    count = text.count(IMAGE_PLACEHOLDER)
    found = ids.count(self.image_token_id)
    if found != count:
      raise ValueError(f'{count} {IMAGE_PLACEHOLDER} in {text!r} but {found} image token ids '
                       f'({self.image_token_id}) after tokenization')
    out: list[int] = []
    for i in ids:
      out.extend([i] * (self.num_image_tokens if i == self.image_token_id else 1))
    return out

  def __call__(self, conversations) -> tuple[np.ndarray, np.ndarray]:
    """Encodes one conversation.

    Args:
      conversations: LLaVA turns [{'from', 'value'}, ...] or the TFDS-decoded
        {'from': [...], 'value': [...]}.
    Returns:
      (ids int32[L], loss_mask bool[L]): loss_mask is True on answer tokens and their EOS.
    """
    ids = list(self.prefix_ids)
    mask = [False] * len(ids)
    for question, answer in question_answer_pairs(conversation_turns(conversations)):
      prompt = self._encode_prompt(f'USER: {self._place_images(question)} ASSISTANT:')
      ids += prompt
      mask += [False] * len(prompt)
      if answer is None:
        break
      if self.image_mode != 'drop' and IMAGE_PLACEHOLDER in answer:
        raise ValueError(f'{IMAGE_PLACEHOLDER} in an assistant turn: {answer!r}')
      answer = _PLACEHOLDER_AND_NEWLINE.sub('', answer).strip()
      answer_ids = self._encode(f' {answer}' if self.answer_space else answer) + [self.eos_id]
      ids += answer_ids
      mask += [True] * len(answer_ids)
    return np.asarray(ids, np.int32), np.asarray(mask, np.bool_)


def encode_conversation(conversations, tokenizer, *, image_mode: str = 'drop',
                        num_image_tokens: int | None = None,
                        image_token_id: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """One-off ConversationEncoder(tokenizer, ...)(conversations): (ids int32[L], mask bool[L])."""
  return ConversationEncoder(tokenizer, image_mode=image_mode, num_image_tokens=num_image_tokens,
                             image_token_id=image_token_id)(conversations)
