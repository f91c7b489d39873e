"""Token ids against models: does a tokenizer fit a model, do a draft and a target mean the same
token by the same id. Used by training (data setup) and decoding (the draft check) alike.

The paper's pair: the draft has the base LLaMA vocabulary (32000 ids); LLaVA-1.5's tokenizer adds
the special tokens `<image>` (32000) and `<pad>` (32001), and the target pads its text vocabulary
to 32064. So a tokenizer may have ids past a model's vocabulary, but only special added tokens:
the model embeds such ids as zeros and never proposes them (models/llama.py `in_vocabulary`). A
regular text token past the vocabulary is text the model could never read or write: refused.

Tokenizers are compared in full, added tokens included (`get_vocab()`, `len(tokenizer)`), not by
`tokenizer.vocab_size`, which leaves the added tokens out.
"""

from __future__ import annotations


def tokens_by_id(tokenizer) -> dict[int, str]:
  """id -> token over the whole tokenizer, added tokens included."""
  return {index: token for token, index in tokenizer.get_vocab().items()}


def num_ids(tokenizer) -> int:
  """How many ids the tokenizer uses: len(tokenizer), or more if its ids have gaps."""
  return max([len(tokenizer)] + [index + 1 for index in tokenizer.get_vocab().values()])


def special_ids(tokenizer) -> set[int]:
  """Ids of the tokenizer's special tokens (<s>, </s>, <unk>, <image>, <pad>, ...)."""
  ids = set(tokenizer.all_special_ids)
  ids.update(index for index, token in tokenizer.added_tokens_decoder.items() if token.special)
  return ids


def check_tokenizer_fits(tokenizer, vocab_size: int, what: str = 'the tokenizer'):
  """Raises ValueError naming the first regular (non-special) token at an id >= vocab_size.

  Special added tokens past the vocabulary (<image>, <pad>) are allowed: the model zeroes them.
  `what` names the tokenizer in the message (e.g. "the tokenizer in '/path'").
  """
  specials = special_ids(tokenizer)
  for index, token in sorted(tokens_by_id(tokenizer).items()):
    if index >= vocab_size and index not in specials:
      raise ValueError(
          f'{what} has the regular token {token!r} at id {index}, past the model\'s '
          f'{vocab_size} ids: the model could never read or write it (only special tokens such '
          'as <image> and <pad> may lie past a model\'s vocabulary)')


def check_compatible_vocabularies(target_tokenizer, draft_tokenizer, draft_vocab_size: int,
                                  target_vocab_size: int):
  """Raises ValueError naming the first disagreement between a draft and its target.

  - the draft model has no more ids than the target's text vocabulary;
  - the target tokenizer (added tokens included) fits the target's text vocabulary;
  - every id both tokenizers have means the same token (special added tokens included: a draft
    tokenizer with <image> and <pad> exchanged is refused);
  - every id of the draft tokenizer that the draft model has is one the target tokenizer has;
  - the draft tokenizer's ids at or past draft_vocab_size are special tokens (`check_tokenizer_fits`).
  """
  if draft_vocab_size > target_vocab_size:
    raise ValueError(f'incompatible draft: its vocabulary ({draft_vocab_size}) is larger than the '
                     f'target\'s ({target_vocab_size})')
  target_ids = num_ids(target_tokenizer)
  if target_ids > target_vocab_size:
    raise ValueError(f'the target tokenizer has {target_ids} ids (added tokens included) but the '
                     f'target\'s text vocabulary only {target_vocab_size}: it does not match the '
                     'target')
  target_by_id = tokens_by_id(target_tokenizer)
  for index, token in sorted(tokens_by_id(draft_tokenizer).items()):
    if index not in target_by_id and index >= draft_vocab_size:
      continue  # Not the target's and never the draft model's (a special token, checked below).
    if target_by_id.get(index) != token:
      raise ValueError(
          f'incompatible draft vocabulary: draft id {index} is {token!r} but the target '
          f'tokenizer has {target_by_id.get(index)!r} there; the draft must use the target\'s '
          'tokenizer (a prefix of its ids)')
  try:
    check_tokenizer_fits(draft_tokenizer, draft_vocab_size, 'the draft tokenizer')
  except ValueError as e:
    raise ValueError(f'incompatible draft vocabulary: {e}') from e
