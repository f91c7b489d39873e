"""Tiny target/draft pairs in the paper's vocabulary layout, whose agreement is partial, so
acceptance and rejection both occur.

The layout is LLaVA-1.5's beside the paper's draft, shrunk: the draft has the base vocabulary
(BASE_VOCAB = 256 ids, as 32000), the target's prompts carry <image> = 256 and <pad> = 257 past it
(as 32000 and 32001), and the target's text vocabulary is padded to 264 (as 32064). Prompts are
right-padded with PAD_TOKEN, so every draft reads ids it does not have.

Drafts are derived from the target: the language-only draft is the target's language model cut
to the base vocabulary, with noise; the adapter draft adds the target's projector. Weights are
scaled up so logits spread and greedy choices are not near-ties.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from mmspec_jax.decoding import inputs
from mmspec_jax.models import (AdapterDraftConfig, FeatureDraftConfig, default_feature_layers,
                               init_params, presets)

IMAGE_ROWS_TEXT_LENGTHS = (3, 9)  # Two image rows with different prompt lengths.
TARGET = presets.get('tiny_llava')
BASE_VOCAB = TARGET.image_token_index  # The draft's ids: everything before <image>.
PAD_TOKEN = TARGET.text.pad_token_id
assert (BASE_VOCAB, PAD_TOKEN) == (256, 257) and TARGET.text.vocab_size > PAD_TOKEN


def perturb(params, seed, scale):
  """params plus Gaussian noise of `scale` times each leaf's standard deviation."""
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(treedef, [
      leaf + scale * leaf.std() * jax.random.normal(k, leaf.shape, leaf.dtype)
      for leaf, k in zip(leaves, keys)])


def llava_target():
  """The tiny LLaVA, its LM head silent on the ids past the base vocabulary (logit 0, far below
  the top of ~5-unit logits): a trained LLaVA never answers with <image>, <pad> or padding
  rows, while a random one would, and a draft could then never match it."""
  params = jax.tree.map(lambda x: x * 1.5, init_params(TARGET, jax.random.key(0)))
  head = params['language_model']['lm_head']
  head['kernel'] = head['kernel'].at[:, BASE_VOCAB:].set(0)
  return TARGET, params


def cut_to_base_vocabulary(language_model_params, vocab_size):
  """A (scanned-layout) Llama's params keeping the first `vocab_size` ids of its embedding and LM
  head: the target's own language model as a draft of the paper's vocabulary."""
  params = dict(language_model_params)
  params['embed_tokens'] = {'embedding': params['embed_tokens']['embedding'][:vocab_size]}
  params['lm_head'] = {'kernel': params['lm_head']['kernel'][:, :vocab_size]}
  return params


def base_text_config(target_config):
  """The target's language model config with the base vocabulary: the ids before <image>."""
  return dataclasses.replace(target_config.text, vocab_size=target_config.image_token_index,
                             pad_token_id=None)


def language_draft(target_config, target_params, noise=0.03):
  config = base_text_config(target_config)
  params = cut_to_base_vocabulary(target_params['language_model'], config.vocab_size)
  return config, perturb(params, 1, noise)


def adapter_draft(target_config, target_params, noise=0.03):
  config = AdapterDraftConfig(text=base_text_config(target_config),
                              vision_hidden_size=target_config.vision.hidden_size,
                              image_token_index=target_config.image_token_index)
  params = {'language_model': cut_to_base_vocabulary(target_params['language_model'],
                                                     config.text.vocab_size),
            'multi_modal_projector': target_params['multi_modal_projector']}
  return config, perturb(params, 2, noise)


def feature_draft(target_config, target_params, noise=0.03):
  """A feature draft that is the target's own language model one position behind, with noise
  (`shifted_feature_draft`): partial agreement with the target."""
  text = base_text_config(target_config)
  config, params = shifted_feature_draft(
      text, cut_to_base_vocabulary(target_params['language_model'], text.vocab_size),
      default_feature_layers(text.num_layers))
  return config, perturb(params, 2, noise)


def shifted_feature_draft(text, language_model_params, feature_layers):
  """A feature draft whose decoder is `language_model_params` (a LLaMA of the target's width)
  and whose input projection passes the next token's embedding and drops the fused features:
  its position i computes what that model computes for token i + 1 (RoPE is relative), short of
  the prompt's first token and, for a LLaVA target, the image (placeholders embed as zeros past
  its vocabulary)."""
  width = text.hidden_size
  config = FeatureDraftConfig(text=text, target_hidden_size=width, feature_layers=feature_layers)
  identity = np.eye(width, dtype=np.float32)
  return config, {
      'fc': {'kernel': np.zeros((len(feature_layers), width, width), np.float32)},
      'input_proj': {'kernel': np.stack([identity, np.zeros_like(identity)])},
      'language_model': language_model_params}


def pad_rows(rows, length=None):
  """(tokens int32[B, T] right-padded with PAD_TOKEN, lengths int32[B])."""
  lengths = np.array([len(r) for r in rows], np.int32)
  tokens = np.full((len(rows), length or lengths.max()), PAD_TOKEN, np.int32)
  for i, row in enumerate(rows):
    tokens[i, :len(row)] = row
  return tokens, lengths


def ragged_rows(config, seed=0):
  """Three prompts: two with an image (different lengths), one text-only."""
  rng = np.random.RandomState(seed)
  rows = [[1] + [config.image_token_index] * config.num_image_tokens
          + rng.randint(3, 250, n).tolist() for n in IMAGE_ROWS_TEXT_LENGTHS]
  rows.append([1] + rng.randint(3, 250, 6).tolist())
  size = config.vision.image_size
  images = rng.rand(len(rows), size, size, 3).astype(np.float32)
  images[2] = 0  # The text-only row's image slot is never read.
  return rows, images


def ragged_batch(config, seed=0):
  """Three rows: two with an image (different lengths), one text-only. Right-padded with
  PAD_TOKEN. Returns (tokens int32[3, T], lengths int32[3], images float32[3, H, W, 3])."""
  rows, images = ragged_rows(config, seed)
  return (*pad_rows(rows), images)


def generated_rows(result):
  """Each row's new tokens of a DecodeResult, as lists."""
  return [np.asarray(result.tokens)[b, :int(result.num_generated[b])].tolist()
          for b in range(result.tokens.shape[0])]


CONTINUOUS_BUDGETS = (9, 3, 12, 5, 7, 12)


def alone_and_together(session, draft_name, **decoder_kwargs):
  """Six text requests with their own budgets decoded by `session`'s draft `draft_name`, each
  alone in one slot and all over 2 slots, entering as slots free up: (alone, together), each
  {request id: the finished request}. decoder_kwargs: `session.decoder`'s (sampling, tree)."""
  rng = np.random.default_rng(0)
  requests = [inputs.Request(f'r{i}', i, tuple(int(t) for t in rng.integers(
      1, BASE_VOCAB, size=4 + 3 * i)), None) for i in range(len(CONTINUOUS_BUDGETS))]
  decoder = session.decoder(draft_name, num_draft_tokens=3, max_new_tokens=16,
                            requests=requests, eos_token_ids=(), **decoder_kwargs)

  def decode(num_slots, batches):
    scheduler = session.scheduler(decoder, num_slots=num_slots, capacity=64, chunk_steps=2,
                                  prefill_width=2, key=jax.random.key(1))
    finished = {}
    for work in batches:
      finished.update({e.finished.request.id: e.finished for e in scheduler.run(work)
                       if e.finished is not None})
    return finished

  alone = decode(1, [[pair] for pair in zip(requests, CONTINUOUS_BUDGETS)])
  together = decode(2, [list(zip(requests, CONTINUOUS_BUDGETS))])
  assert [len(alone[r.id].token_ids) for r in requests] == list(CONTINUOUS_BUDGETS)
  return alone, together
