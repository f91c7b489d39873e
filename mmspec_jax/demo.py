"""`make demo`: the whole path on an embedded default, offline.

1. Builds a small random LLaVA-1.5-shaped checkpoint with transformers (target: CLIP tower,
   projector, LLaMA; word tokenizer, CLIP processor, chat template) and a language-only draft that
   carries the target's language model, both in the Hugging Face on-disk layout.
2. Converts the target (`python -m mmspec_jax.convert` does the same).
3. Decodes a JSONL of image and text prompts with `decode.py`'s runner: autoregressive, then
   speculative (gamma = 3), and checks the outputs are token-identical (greedy is lossless) and
   identical to transformers' `generate` on the same weights.

The random models' text is noise; what the demo shows is the machinery. Trained models on a
synthetic multimodal world replace them in a later release.
"""

from __future__ import annotations

import json
import os
import tempfile

import ml_collections
import numpy as np

from mmspec_jax import sharding

NUM_DRAFT_TOKENS = 3
MAX_NEW_TOKENS = 16
PROMPTS = [
    {'id': 'image-1', 'prompt': 'w10 w11 w12', 'image': 'red.png'},
    {'id': 'image-2', 'prompt': 'w40 w41 w42 w43 w44', 'image': 'noise.png'},
    {'id': 'text-1', 'prompt': 'w20 w21 w22'},
    {'id': 'image-3', 'prompt': 'w70', 'image': 'red.png'},
    {'id': 'text-2', 'prompt': 'w90 w91 w92 w93 w94 w95 w96'},
]


def _build_checkpoints(root: str):
  from PIL import Image
  from mmspec_jax.testing import tiny_hf
  target, draft = os.path.join(root, 'target-hf'), os.path.join(root, 'draft-hf')
  llava = tiny_hf.tiny_llava(seed=0)
  tiny_hf.save(llava, target)
  tiny_hf.save_llava_processor(tiny_hf.word_tokenizer(), target)
  tiny_hf.save(tiny_hf.llama_from_llava(llava), draft)
  tiny_hf.word_tokenizer().save_pretrained(draft)
  rng = np.random.default_rng(0)
  Image.fromarray(rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)).save(
      os.path.join(root, 'noise.png'))
  Image.new('RGB', (36, 36), (220, 30, 30)).save(os.path.join(root, 'red.png'))
  with open(os.path.join(root, 'prompts.jsonl'), 'w') as f:
    f.writelines(json.dumps(row) + '\n' for row in PROMPTS)
  return llava, target, draft


def _run(root: str, target: str, draft: str, name: str):
  from mmspec_jax.decoding import runner
  config = ml_collections.ConfigDict(dict(
      target=target, draft=draft, num_draft_tokens=NUM_DRAFT_TOKENS if draft else 0,
      temperature=0.0, top_k=0, top_p=1.0, max_new_tokens=MAX_NEW_TOKENS, batch_size=4, seed=0,
      prompts=os.path.join(root, 'prompts.jsonl'), output=os.path.join(root, f'{name}.jsonl'),
      raw_prompt=False, dtype='float32', length_buckets=(32, 64),
      mesh=dict(data=-1, fsdp=1, tensor=1), logical_axis_rules=sharding.DEFAULT_RULES))
  stats = runner.run(config)
  with open(config.output) as f:
    rows = [json.loads(line) for line in f]
  return stats, rows


def _transformers_greedy(llava, target: str, row: dict, root: str) -> list[int]:
  import torch
  from PIL import Image
  from mmspec_jax.processing import MultimodalProcessor
  processor = MultimodalProcessor.from_pretrained(target)
  has_image = 'image' in row
  ids = processor.encode(processor.format_prompt(row['prompt'], has_image=has_image),
                         num_images=int(has_image))
  kwargs = {}
  if has_image:
    pixels = processor.preprocess_images([Image.open(os.path.join(root, row['image']))])
    kwargs['pixel_values'] = torch.tensor(pixels.transpose(0, 3, 1, 2))
  with torch.no_grad():
    out = llava.generate(input_ids=torch.tensor([ids]), max_new_tokens=MAX_NEW_TOKENS,
                         do_sample=False, pad_token_id=0, **kwargs)
  generated = out[0, len(ids):].tolist()
  eos = llava.config.text_config.eos_token_id
  return generated[:generated.index(eos) + 1] if eos in generated else generated


def main():
  from mmspec_jax.convert.loading import load_model, save_converted
  from mmspec_jax.decoding.statistics import format_table
  with tempfile.TemporaryDirectory() as root:
    print('building an embedded LLaVA-1.5-shaped checkpoint and a language-only draft ...')
    llava, target_hf, draft = _build_checkpoints(root)
    config, params = load_model(target_hf)
    target = os.path.join(root, 'target-converted')
    save_converted(target, config, params, source_dir=target_hf)
    print(f'converted the target to {target}')

    ar_stats, ar_rows = _run(root, target, '', 'autoregressive')
    spec_stats, spec_rows = _run(root, target, draft, 'speculative')
    print('\n== autoregressive ==\n' + format_table(ar_stats))
    print(f'\n== speculative, gamma {NUM_DRAFT_TOKENS} ==\n' + format_table(spec_stats))
    print('\nper row (the draft never sees the image: it agrees on text rows, less on image '
          'rows):')
    for row in spec_rows:
      steps = row['num_target_calls'] - 1
      tau = (len(row['token_ids']) - 1) / steps if steps else float('nan')
      print(f"  {row['id']:8s} tau {tau:4.2f}  {row['text']!r}")
    identical = [a['token_ids'] for a in ar_rows] == [s['token_ids'] for s in spec_rows]
    reference = [_transformers_greedy(llava, target_hf, row, root) for row in PROMPTS]
    matches_hf = reference == [a['token_ids'] for a in ar_rows]
  print(f'\nspeculative == autoregressive (greedy): {identical}')
  print(f'autoregressive == transformers generate: {matches_hf}')
  if not (identical and matches_hf):
    raise SystemExit('MISMATCH')


if __name__ == '__main__':
  main()
