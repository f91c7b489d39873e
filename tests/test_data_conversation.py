"""Tests for mmspec_jax.data.conversation: the LLaVA-1.5 format, the loss mask, image modes."""

import numpy as np
import pytest

from mmspec_jax.data.conversation import ConversationEncoder, encode_conversation
from data_fixtures import IMAGE_ID, llava_records, make_tokenizer

N = 5  # Image tokens per image in 'expand' mode.


@pytest.fixture(scope='module')
def tok():
  return make_tokenizer()


def runs(mask):
  """[start, stop) of each run of True."""
  edges = np.diff(np.concatenate([[0], mask.astype(np.int8), [0]]))
  return list(zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)))


def test_mask_covers_answers_and_eos_only(tok):
  turns = llava_records()[2]['conversations']  # Three rounds.
  ids, mask = encode_conversation(turns, tok)
  assert ids.dtype == np.int32 and mask.dtype == np.bool_ and ids.shape == mask.shape
  answers = [t['value'] for t in turns if t['from'] == 'gpt']
  spans = runs(mask)
  assert len(spans) == len(answers)
  for (start, stop), answer in zip(spans, answers):
    assert tok.convert_ids_to_tokens(ids[start:stop].tolist()) == answer.split() + ['</s>']
  # Everything unmasked is BOS and the user turns.
  unmasked = tok.decode(ids[~mask].tolist())
  assert unmasked.startswith('<s> USER : is it a dog ? w2 ASSISTANT :')
  assert 'red' not in unmasked and '</s>' not in unmasked


def test_pieces_equal_tokenizing_the_whole_text(tok):
  turns = llava_records()[5]['conversations']
  ids, _ = encode_conversation(turns, tok)
  text = ('USER: is the cat red ? w5 ASSISTANT: yes .</s>'
          'USER: is the dog blue ? ASSISTANT: no .</s>')
  assert ids.tolist() == tok(text)['input_ids']


def test_drop_removes_image_and_newline(tok):
  for record in llava_records()[:3]:
    ids, _ = encode_conversation(record['conversations'], tok, image_mode='drop')
    assert IMAGE_ID not in ids.tolist()
  ids, _ = encode_conversation(llava_records()[0]['conversations'], tok)
  assert ids.tolist() == tok('USER: what is in the image ? w0 ASSISTANT: a red cat .</s>'
                             )['input_ids']


def test_keep_and_expand(tok):
  from mmspec_jax.data.processing import MultimodalProcessor
  turns = llava_records()[1]['conversations']  # Placeholder at the end of the question.
  keep, keep_mask = encode_conversation(turns, tok, image_mode='keep')
  expand, expand_mask = encode_conversation(turns, tok, image_mode='expand', num_image_tokens=N)
  # The placeholder moves to the start of the turn, as in LLaVA's preprocessing.
  assert keep.tolist()[:5] == [1] + tok.convert_tokens_to_ids(['USER', ':']) + [IMAGE_ID] + \
      tok.convert_tokens_to_ids(['describe'])
  assert keep.tolist().count(IMAGE_ID) == 1
  assert expand.tolist().count(IMAGE_ID) == N
  start = expand.tolist().index(IMAGE_ID)
  assert (expand[start:start + N] == IMAGE_ID).all()
  assert len(expand) == len(keep) + N - 1 and expand_mask.sum() == keep_mask.sum()
  assert not expand_mask[expand == IMAGE_ID].any()
  # The first turn is exactly the decoding prompt of processing.py.
  processor = MultimodalProcessor(tok, image_token_index=IMAGE_ID, num_image_tokens=N)
  prompt = processor.encode(processor.format_prompt('describe the image w1'))
  assert expand.tolist()[:len(prompt)] == prompt


def test_tfds_form_and_roles(tok):
  turns = llava_records()[2]['conversations']
  decoded = {'from': [t['from'].encode() for t in turns],
             'value': [t['value'].encode() for t in turns]}
  a, am = encode_conversation(turns, tok, image_mode='expand', num_image_tokens=N)
  b, bm = encode_conversation(decoded, tok, image_mode='expand', num_image_tokens=N)
  assert a.tolist() == b.tolist() and am.tolist() == bm.tolist()
  # A leading assistant turn is skipped; a trailing question adds no loss.
  odd = [{'from': 'gpt', 'value': 'no .'}] + turns[:2] + [{'from': 'user', 'value': 'is it ?'}]
  ids, mask = encode_conversation(odd, tok)
  first, _ = encode_conversation(turns[:2], tok)
  assert ids.tolist()[:len(first)] == first.tolist() and not mask[len(first):].any()


def test_sentencepiece_like_tokenizer_spacing():
  # LLaMA-style "▁" word prefixes (normalizer: prepend "▁", spaces -> "▁"): the answer must be
  # tokenized without its leading space, or an extra "▁" token (here <unk>) would appear.
  from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
  from transformers import PreTrainedTokenizerFast
  words = ['USER:', 'ASSISTANT:', 'yes', 'hi', 'there', 'ok', '.']
  vocab = {t: i for i, t in enumerate(['<unk>', '<s>', '</s>', '<image>'] +
                                      ['\u2581' + w for w in words])}
  raw = Tokenizer(models.WordLevel(vocab, unk_token='<unk>'))
  raw.normalizer = normalizers.Sequence([normalizers.Prepend('\u2581'),
                                         normalizers.Replace(' ', '\u2581')])
  raw.pre_tokenizer = pre_tokenizers.Split('\u2581', behavior='merged_with_next')
  raw.post_processor = processors.TemplateProcessing(single='<s> $A', special_tokens=[('<s>', 1)])
  sp = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token='<s>', eos_token='</s>',
                               unk_token='<unk>', additional_special_tokens=['<image>'])
  assert sp(' yes', add_special_tokens=False)['input_ids'][0] == 0  # The trap being avoided.
  encoder = ConversationEncoder(sp)
  assert encoder.prefix_ids == [1] and not encoder.answer_space
  ids, mask = encoder([{'from': 'human', 'value': 'hi there'}, {'from': 'gpt', 'value': 'ok .'}])
  assert 0 not in ids.tolist()  # No <unk>.
  assert sp.convert_ids_to_tokens(ids[mask].tolist()) == ['\u2581ok', '\u2581.', '</s>']
  prompt_len = len(sp('USER: hi there ASSISTANT:')['input_ids'])
  assert ids.tolist()[:prompt_len] == sp('USER: hi there ASSISTANT:')['input_ids']


@pytest.mark.parametrize('kwargs, message', [
    ({'image_mode': 'crop'}, 'image_mode must be one of'),
    ({'image_mode': 'expand'}, 'num_image_tokens'),
    ({'image_mode': 'keep', 'image_token_id': 7}, 'image_token_id=7'),
])
def test_encoder_errors(tok, kwargs, message):
  with pytest.raises(ValueError, match=message):
    ConversationEncoder(tok, **kwargs)


def test_bad_turns(tok):
  with pytest.raises(ValueError, match="unknown role 'system'"):
    encode_conversation([{'from': 'system', 'value': 'x'}], tok)
  with pytest.raises(ValueError, match='two human turns'):
    encode_conversation([{'from': 'human', 'value': 'a'}, {'from': 'human', 'value': 'b'}], tok)
  with pytest.raises(ValueError, match='"from" and "value"'):
    encode_conversation([{'value': 'a'}], tok)
