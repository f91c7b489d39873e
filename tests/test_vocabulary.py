"""mmspec_jax.data.vocabulary on the paper's layout, shrunk: a draft with the 128-id base vocabulary,
the full tokenizer's <image> (128) and <pad> (129) past it, a target text vocabulary of 136."""

import pytest

from mmspec_jax.testing import tiny_hf
from mmspec_jax.data.vocabulary import (check_compatible_vocabularies, check_tokenizer_fits, num_ids,
                                   special_ids)

DRAFT, TARGET = tiny_hf.BASE_VOCAB, tiny_hf.TEXT_VOCAB


@pytest.fixture(scope='module')
def tokenizer():
  return tiny_hf.word_tokenizer()


def test_the_real_layout_is_compatible(tokenizer):
  # The trap: vocab_size leaves the added tokens out; the tokenizer has two ids more.
  assert tokenizer.vocab_size == DRAFT and len(tokenizer) == num_ids(tokenizer) == DRAFT + 2
  assert {tiny_hf.IMAGE_TOKEN, tiny_hf.PAD_TOKEN} <= special_ids(tokenizer)
  check_tokenizer_fits(tokenizer, DRAFT)  # <image> and <pad> past the draft are special.
  check_tokenizer_fits(tokenizer, TARGET)
  check_compatible_vocabularies(tokenizer, tokenizer, DRAFT, TARGET)
  check_compatible_vocabularies(tokenizer, tiny_hf.word_tokenizer(), DRAFT, TARGET)
  check_compatible_vocabularies(tokenizer, tokenizer, TARGET, TARGET)  # A full-vocabulary draft.


def test_a_swapped_word_is_named(tokenizer):
  with pytest.raises(ValueError, match="incompatible draft vocabulary: draft id 5 is 'w6' but "
                                       "the target tokenizer has 'w5' there"):
    check_compatible_vocabularies(tokenizer, tiny_hf.word_tokenizer(swap=(5, 6)), DRAFT, TARGET)


def test_swapped_special_tokens_past_the_draft_are_named(tokenizer):
  """<image> and <pad> exchanged: the draft never emits them, but the ids must still agree."""
  swapped = tiny_hf.word_tokenizer(swap=(tiny_hf.IMAGE_TOKEN, tiny_hf.PAD_TOKEN))
  with pytest.raises(ValueError, match="draft id 128 is '<pad>' but the target tokenizer has "
                                       "'<image>' there"):
    check_compatible_vocabularies(tokenizer, swapped, DRAFT, TARGET)


def test_regular_tokens_past_the_draft_vocabulary_are_named(tokenizer):
  # A draft model smaller than the base vocabulary: w120 .. w127 could never be drafted.
  with pytest.raises(ValueError, match="the draft tokenizer has the regular token 'w120' at id "
                                       "120, past the model's 120 ids"):
    check_compatible_vocabularies(tokenizer, tokenizer, 120, TARGET)
  # A regular (not special) token added past the base vocabulary, only in the draft's tokenizer.
  extended = tiny_hf.word_tokenizer()
  extended.add_tokens(['extra'])
  assert extended.convert_tokens_to_ids('extra') == DRAFT + 2
  with pytest.raises(ValueError, match="regular token 'extra' at id 130, past the model's 128"):
    check_compatible_vocabularies(tokenizer, extended, DRAFT, TARGET)
  with pytest.raises(ValueError, match="the tokenizer in 'x' has the regular token 'extra'"):
    check_tokenizer_fits(extended, DRAFT, "the tokenizer in 'x'")


def test_vocabulary_sizes_are_checked(tokenizer):
  with pytest.raises(ValueError, match=r'its vocabulary \(137\) is larger than the target.s '
                                       r'\(136\)'):
    check_compatible_vocabularies(tokenizer, tokenizer, TARGET + 1, TARGET)
  # The target's text vocabulary must hold its whole tokenizer, added tokens included.
  with pytest.raises(ValueError, match=r'the target tokenizer has 130 ids \(added tokens '
                                       r'included\) but the target.s text vocabulary only 129'):
    check_compatible_vocabularies(tokenizer, tokenizer, DRAFT, DRAFT + 1)
