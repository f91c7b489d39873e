"""Tiny target/draft pairs whose agreement is partial, so acceptance and rejection both occur.

Drafts are derived from the target: the language-only draft is the target's language model with
noise; the adapter draft is the target's language model and projector with noise. Weights are
scaled up so logits spread and greedy choices are not near-ties.
"""

from __future__ import annotations

import jax
import numpy as np

from mmspec_jax.models import AdapterDraftConfig, init_params, presets

IMAGE_ROWS_TEXT_LENGTHS = (3, 9)  # Two image rows with different prompt lengths.


def perturb(params, seed, scale):
  """params plus Gaussian noise of `scale` times each leaf's standard deviation."""
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(treedef, [
      leaf + scale * leaf.std() * jax.random.normal(k, leaf.shape, leaf.dtype)
      for leaf, k in zip(leaves, keys)])


def llava_target():
  config = presets.get('tiny_llava')
  params = jax.tree.map(lambda x: x * 1.5, init_params(config, jax.random.key(0)))
  return config, params


def language_draft(target_config, target_params, noise=0.03):
  return target_config.text, perturb(target_params['language_model'], 1, noise)


def adapter_draft(target_config, target_params, noise=0.03):
  config = AdapterDraftConfig(text=target_config.text,
                              vision_hidden_size=target_config.vision.hidden_size,
                              image_token_index=target_config.image_token_index)
  params = {'language_model': target_params['language_model'],
            'multi_modal_projector': target_params['multi_modal_projector']}
  return config, perturb(params, 2, noise)


def ragged_batch(config, seed=0):
  """Three rows: two with an image (different lengths), one text-only. Right-padded."""
  rng = np.random.RandomState(seed)
  rows = [[1] + [config.image_token_index] * config.num_image_tokens
          + rng.randint(3, 250, n).tolist() for n in IMAGE_ROWS_TEXT_LENGTHS]
  rows.append([1] + rng.randint(3, 250, 6).tolist())
  lengths = np.array([len(r) for r in rows], np.int32)
  tokens = np.zeros((len(rows), lengths.max()), np.int32)
  for i, row in enumerate(rows):
    tokens[i, :len(row)] = row
  size = config.vision.image_size
  images = rng.rand(len(rows), size, size, 3).astype(np.float32)
  images[2] = 0  # The text-only row's image slot is never read.
  return tokens, lengths, images
