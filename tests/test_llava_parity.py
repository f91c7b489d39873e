"""LLaVA logits against transformers (torch, float32) from the same checkpoint, to 1e-4."""

import numpy as np
import pytest
import torch

from mmspec_jax.testing import tiny_hf as hf_builders
from mmspec_jax.convert.loading import load_model
from mmspec_jax.models import KVCache, build
from mmspec_jax.models.llava import Llava

TOLERANCE = 1e-4

# Every option appears at least once, without the full Cartesian product (each case compiles).
CASES = [
    dict(num_kv_heads=2, tied=False, feature_layer=-2, strategy='default', layout='legacy',
         num_shards=1),
    dict(num_kv_heads=4, tied=True, feature_layer=-1, strategy='full', layout='new',
         num_shards=3),
    dict(num_kv_heads=4, tied=False, feature_layer=-2, strategy='full', layout='legacy',
         num_shards=2),
    dict(num_kv_heads=2, tied=True, feature_layer=1, strategy='default', layout='new',
         num_shards=1),
]


def _pad(rows, pad_id=hf_builders.PAD_TOKEN):  # <pad>, a target id in the paper's layout.
  lengths = np.array([len(r) for r in rows], np.int32)
  tokens = np.full((len(rows), lengths.max()), pad_id, np.int32)
  for i, row in enumerate(rows):
    tokens[i, :len(row)] = row
  return tokens, lengths


@pytest.mark.parametrize('case', CASES, ids=lambda c: '-'.join(f'{v}' for v in c.values()))
def test_llava_logits_match_transformers(case, tmp_path):
  case = dict(case)
  layout, num_shards = case.pop('layout'), case.pop('num_shards')
  hf_model = hf_builders.tiny_llava(**case)
  hf_builders.save(hf_model, str(tmp_path), layout=layout, num_shards=num_shards)
  config, params = load_model(str(tmp_path))
  assert config.vision_feature_select_strategy == case['strategy']
  assert config.text.tie_word_embeddings == case['tied']

  rng = np.random.RandomState(0)
  rows = hf_builders.llava_prompts(rng, config.num_image_tokens)
  images = rng.randn(len(rows), 3, 28, 28).astype(np.float32)  # NCHW, as transformers takes
  references = []
  with torch.no_grad():
    for row, image in zip(rows, images):  # Each row alone, unpadded: the ground truth.
      references.append(hf_model(input_ids=torch.tensor([row]),
                                 pixel_values=torch.tensor(image[None])).logits[0].numpy())

  tokens, lengths = _pad(rows)
  nhwc = images.transpose(0, 2, 3, 1)
  model = build(config)
  logits = np.asarray(model.apply({'params': params}, tokens, nhwc))
  worst = max(np.abs(logits[i, :n] - ref).max() for i, (n, ref) in enumerate(zip(lengths,
                                                                               references)))
  print(f'max |logit diff| full forward: {worst:.2e}')
  assert worst <= TOLERANCE
  assert min(ref.std() for ref in references) > 0.5  # Logits spread: the comparison has teeth.

  # The cached path gives the same last-token logits.
  cache = KVCache.init(config.text, len(rows), 64)
  last, cache = model.apply({'params': params}, tokens, lengths, cache, nhwc,
                            method=Llava.prefill)
  worst_last = max(np.abs(np.asarray(last[i]) - ref[-1]).max()
                   for i, ref in enumerate(references))
  print(f'max |logit diff| prefill: {worst_last:.2e}')
  assert worst_last <= TOLERANCE
  np.testing.assert_array_equal(np.asarray(cache.lengths), lengths)
