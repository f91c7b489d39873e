"""`make demo`: convert a LLaVA-1.5-shaped checkpoint and decode from an image prompt with our
KV cache, side by side with transformers on the same weights.

The checkpoint is embedded: a small random LLaVA built with transformers and saved in the on-disk
Hugging Face layout (no download). Torch is used only to build it and as the reference.
"""

from __future__ import annotations

import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from mmspec_jax.convert.loading import load_model
from mmspec_jax.models import KVCache, Llava, build, parameter_count

NEW_TOKENS = 24


def _embedded_checkpoint(out_dir: str, seed: int = 0) -> str:
  import torch
  import transformers
  text = transformers.LlamaConfig(
      vocab_size=1064, hidden_size=128, intermediate_size=344, num_hidden_layers=4,
      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512)
  vision = transformers.CLIPVisionConfig(
      hidden_size=64, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
      image_size=112, patch_size=14, hidden_act='quick_gelu')
  config = transformers.LlavaConfig(vision_config=vision, text_config=text,
                                    image_token_index=1000, vision_feature_layer=-2,
                                    vision_feature_select_strategy='default')
  torch.manual_seed(seed)
  model = transformers.LlavaForConditionalGeneration(config)
  with torch.no_grad():  # Wider than the default init, so greedy choices are not near-ties.
    for param in model.parameters():
      if param.ndim > 1:
        param.mul_(6.0)
  model.save_pretrained(out_dir)
  return out_dir


def _reference_greedy(hf_dir: str, prompt: np.ndarray, image_nchw: np.ndarray) -> list[int]:
  import torch
  import transformers
  model = transformers.LlavaForConditionalGeneration.from_pretrained(hf_dir).eval()
  with torch.no_grad():
    out = model.generate(input_ids=torch.tensor(prompt[None], dtype=torch.long),
                         pixel_values=torch.tensor(image_nchw), max_new_tokens=NEW_TOKENS,
                         do_sample=False, pad_token_id=0)
  return out[0, len(prompt):].tolist()


def main():
  with tempfile.TemporaryDirectory() as workdir:
    hf_dir = _embedded_checkpoint(workdir)
    start = time.time()
    config, params = load_model(hf_dir)
    print(f'converted {parameter_count(params):,} parameters from {hf_dir} '
          f'in {time.time() - start:.1f}s')

    rng = np.random.RandomState(0)
    size = config.vision.image_size
    image = rng.rand(1, size, size, 3).astype(np.float32)
    prompt = np.array([1] + [config.image_token_index] * config.num_image_tokens
                      + rng.randint(3, 999, 8).tolist(), np.int32)
    model = build(config)
    prefill = jax.jit(lambda p, t, n, c, i: model.apply({'params': p}, t, n, c, i,
                                                        method=Llava.prefill))
    extend = jax.jit(lambda p, t, c: model.apply({'params': p}, t, c, method=Llava.extend),
                     donate_argnums=2)

    start = time.time()
    cache = KVCache.init(config.text, 1, len(prompt) + NEW_TOKENS)
    logits, cache = prefill(params, prompt[None], np.array([len(prompt)]), cache, image)
    tokens = [int(jnp.argmax(logits[0]))]
    while len(tokens) < NEW_TOKENS and tokens[-1] != config.text.eos_token_id:
      logits, cache = extend(params, np.array([[tokens[-1]]], np.int32), cache)
      tokens.append(int(jnp.argmax(logits[0, -1])))
    elapsed = time.time() - start
    reference = _reference_greedy(hf_dir, prompt, image.transpose(0, 3, 1, 2))

  print(f'prompt: {len(prompt)} tokens ({config.num_image_tokens} image placeholders)')
  print(f'mmspec-jax   greedy: {tokens}  ({elapsed:.2f}s, compile included)')
  print(f'transformers greedy: {reference}')
  print('identical' if tokens == reference else 'MISMATCH')
  if tokens != reference:
    raise SystemExit(1)


if __name__ == '__main__':
  main()
