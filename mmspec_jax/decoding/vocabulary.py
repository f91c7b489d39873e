"""Draft and target must mean the same token by the same id.

The target's text vocabulary may be padded past its tokenizer (LLaVA: 32064 rows, 32000 ids), and
the draft's may be smaller; that is fine as long as every id the draft can emit means the same
token to both tokenizers.
"""

from __future__ import annotations


def check_compatible_vocabularies(target_tokenizer, draft_tokenizer, draft_vocab_size: int,
                                  target_vocab_size: int):
  """Raises ValueError naming the first disagreement."""
  if draft_vocab_size > target_vocab_size:
    raise ValueError(f'incompatible draft: its vocabulary ({draft_vocab_size}) is larger than the '
                     f'target\'s ({target_vocab_size})')
  target_vocab = target_tokenizer.get_vocab()  # token -> id
  target_by_id = {i: t for t, i in target_vocab.items()}
  for token, index in sorted(draft_tokenizer.get_vocab().items(), key=lambda kv: kv[1]):
    if index >= draft_vocab_size:
      continue  # Added tokens the draft model cannot emit (e.g. <image>) do not matter.
    if target_by_id.get(index) != token:
      raise ValueError(
          f'incompatible draft vocabulary: draft id {index} is {token!r} but the target '
          f'tokenizer has {target_by_id.get(index)!r} there; the draft must use the target\'s '
          'tokenizer (a prefix of its ids)')
