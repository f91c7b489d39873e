"""Section 4: transformers assisted generation on the exported HF copies of the demo pair.

`generate(assistant_model=...)` decodes one row at a time, so everything here is batch 1: the
same held-out prompts, as image prompts (the LLaVA target sees the image) and as text prompts (the
placeholders dropped), through transformers plain and assisted (its default schedule, and a
constant gamma like ours) and through our decoder autoregressively and speculatively. Whatever
transformers does with image prompts is reported as it is, an exception included.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import numpy as np

from mmspec_jax.bench import speculative
from mmspec_jax.bench.timing import time_runs


def text_only(pair: speculative.Pair) -> speculative.Pair:
  """The same prompts with their image placeholders (and images) removed."""
  image_token = pair.target_config.image_token_index
  requests = [dataclasses.replace(r, image=None,
                                  token_ids=tuple(t for t in r.token_ids if t != image_token))
              for r in pair.requests]
  return dataclasses.replace(pair, requests=requests)


def _hf_inputs(pair: speculative.Pair, num_prompts: int):
  """Per prompt: dict of torch inputs for `generate` (input_ids, attention_mask, pixel_values)."""
  import torch
  rows = []
  for request in pair.requests[:num_prompts]:
    ids = torch.as_tensor([request.token_ids], dtype=torch.long)
    row = {'input_ids': ids, 'attention_mask': torch.ones_like(ids)}
    if request.image is not None:
      images = pair.processor.preprocess_images([request.image])  # [1, H, W, 3]
      row['pixel_values'] = torch.as_tensor(images).permute(0, 3, 1, 2).contiguous()
    rows.append(row)
  return rows


def _hf_decode(model, rows, max_new_tokens: int, repeats: int, eos, **kwargs) -> dict[str, Any]:
  import torch
  settings = dict(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=list(eos),
                  pad_token_id=eos[0], **kwargs)

  def run():
    with torch.inference_mode():
      return [model.generate(**row, **settings)[0, row['input_ids'].shape[1]:] for row in rows]
  start = time.perf_counter()
  try:
    outputs = run()
  except Exception as e:  # Reported as it is: what a user of transformers would meet.
    return {'error': f'{type(e).__name__}: {e}'.splitlines()[0][:300]}
  warmup = time.perf_counter() - start
  timing = time_runs(run, repeats=repeats, warmup=0)
  new_tokens = sum(len(o) for o in outputs)
  return {'new_tokens': new_tokens, 'tokens_per_second': timing.rate(new_tokens),
          'timing': timing.as_dict(), 'warmup_seconds': warmup,
          'tokens': [o.numpy() for o in outputs]}


def transformers_target(pair: speculative.Pair, target_hf: str, dtype: str, *, num_prompts: int,
                        max_new_tokens: int, repeats: int, threads: int, log) -> dict[str, Any]:
  """transformers' greedy `generate` of the target exported to `target_hf`, in `dtype`, on the
  pair's first prompts (batch 1): tokens/s, timing and warm-up seconds (or the error)."""
  import torch
  import transformers
  torch.set_num_threads(threads)
  torch_dtype = getattr(torch, dtype)
  model = transformers.AutoModelForImageTextToText.from_pretrained(
      target_hf, dtype=torch_dtype).eval()
  rows = [{name: value.to(torch_dtype) if value.is_floating_point() else value
           for name, value in row.items()} for row in _hf_inputs(pair, num_prompts)]
  run = _hf_decode(model, rows, max_new_tokens, repeats, pair.session.eos_token_ids)
  run.pop('tokens', None)
  rate = run.get('tokens_per_second', {}).get('median')
  log(f'[3/4] transformers, {dtype}: ' + (f'{rate:.2f} tokens/s' if rate else run['error']))
  return run


def run_section(pair: speculative.Pair, target_hf: str, draft_hf: str, *, num_prompts: int,
                max_new_tokens: int, gamma: int, repeats: int, threads: int,
                log) -> dict[str, Any]:
  import torch
  import transformers
  torch.set_num_threads(threads)
  target = transformers.AutoModelForImageTextToText.from_pretrained(
      target_hf, dtype=torch.float32).eval()
  draft = transformers.AutoModelForCausalLM.from_pretrained(draft_hf, dtype=torch.float32).eval()
  eos = pair.session.eos_token_ids
  results = {}
  for kind, prompts in (('image', pair), ('text', text_only(pair))):
    rows = _hf_inputs(prompts, num_prompts)
    mine_ar = speculative.decode(prompts, 0, 1, num_prompts, max_new_tokens, repeats)
    mine_spec = speculative.decode(prompts, gamma, 1, num_prompts, max_new_tokens, repeats)
    runs = {
        'transformers': _hf_decode(target, rows, max_new_tokens, repeats, eos),
        'transformers_assisted_default': _hf_decode(target, rows, max_new_tokens, repeats, eos,
                                                    assistant_model=draft),
        f'transformers_assisted_gamma{gamma}': _hf_decode(
            target, rows, max_new_tokens, repeats, eos, assistant_model=draft,
            num_assistant_tokens=gamma, num_assistant_tokens_schedule='constant',
            assistant_confidence_threshold=0.0),
        'ours_autoregressive': mine_ar,
        f'ours_speculative_gamma{gamma}': mine_spec,
    }
    reference = mine_ar['tokens']
    for name, run in runs.items():
      if 'tokens' in run:
        outputs = run.pop('tokens')
        run['rows_identical_to_ours_autoregressive'] = sum(
            np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(outputs, reference))
      rate = run.get('tokens_per_second', {}).get('median')
      log(f'[4/4] {kind} prompts, {name}: '
          + (f'{rate:.0f} tokens/s' if rate else run.get('error', '')))
    results[kind] = runs
  return results
