"""LLaMA (draft) logits against transformers (torch, float32) from the same checkpoint."""

import dataclasses

import numpy as np
import pytest
import torch

from mmspec_jax.testing import tiny_hf as hf_builders
from mmspec_jax.convert.loading import load_model
from mmspec_jax.models import build
from mmspec_jax.models.config import RopeScaling

TOLERANCE = 1e-4
LLAMA3_ROPE = {'rope_type': 'llama3', 'rope_theta': 500000.0, 'factor': 8.0,
               'low_freq_factor': 1.0, 'high_freq_factor': 4.0,
               'original_max_position_embeddings': 16}
LINEAR_ROPE = {'rope_type': 'linear', 'rope_theta': 10000.0, 'factor': 2.0}

CASES = [
    dict(num_kv_heads=4, tied=False, num_shards=1),  # Multi-head attention.
    dict(num_kv_heads=2, tied=False, num_shards=2),  # Grouped-query attention, sharded files.
    dict(num_kv_heads=1, tied=True, num_shards=1),  # Multi-query, tied embeddings.
    dict(num_kv_heads=2, tied=False, num_shards=1, rope=LINEAR_ROPE),
    dict(num_kv_heads=2, tied=True, num_shards=1, rope=LLAMA3_ROPE),
]


@pytest.mark.parametrize('case', CASES, ids=lambda c: '-'.join(
    str(v['rope_type'] if isinstance(v, dict) else v) for v in c.values()))
def test_llama_logits_match_transformers(case, tmp_path):
  case = dict(case)
  num_shards = case.pop('num_shards')
  hf_model = hf_builders.tiny_llama(**case)
  hf_builders.save(hf_model, str(tmp_path), num_shards=num_shards)
  config, params = load_model(str(tmp_path))
  assert config.tie_word_embeddings == case['tied']
  assert ('lm_head' in params) != case['tied']

  tokens = np.random.RandomState(1).randint(0, hf_builders.TEXT_VOCAB, (2, 40)).astype(np.int32)
  with torch.no_grad():
    reference = hf_model(input_ids=torch.tensor(tokens, dtype=torch.long)).logits.numpy()
  logits = np.asarray(build(config).apply({'params': params}, tokens))
  worst = np.abs(logits - reference).max()
  print(f'max |logit diff|: {worst:.2e}')
  assert worst <= TOLERANCE
  assert reference.std() > 0.5
  if 'rope' in case:  # The scaling matters at these positions: ignoring it would fail.
    unscaled = dataclasses.replace(config, rope_scaling=RopeScaling())
    assert np.abs(np.asarray(build(unscaled).apply({'params': params}, tokens))
                  - reference).max() > 100 * TOLERANCE
