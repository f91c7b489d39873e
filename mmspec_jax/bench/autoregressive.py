"""Section 1: autoregressive decoding of a 1.1B LLaMA against the roofline and transformers.

A TinyLlama-1.1B-shaped model with random weights is saved with transformers, converted, and
decoded greedily (batch 1, 64-token prompt, 128 new tokens, EOS off so every run makes all 128)
by our jitted loop and by transformers' `generate` on the same weights, each in float32 and in
bfloat16, with torch held to the threads JAX uses. The roofline of each precision is the
memory-bandwidth bound: bytes a decode step must read (every weight but the embedding table, of
which it gathers one row, plus the KV cache) divided by the read bandwidth measured in the same
run (timing.read_bandwidth: the fastest of several read kernels). `dtype='auto'`'s pick on this
host is reported beside the measured fastest precision.
"""

from __future__ import annotations

import os
import time
from typing import Any

import jax
import numpy as np

from mmspec_jax.bench.timing import (Timed, bandwidth_probes, best_bandwidth, interleaved,
                                     parameter_bytes)
from mmspec_jax.convert.loading import load_model
from mmspec_jax.decoding import inputs
from mmspec_jax.decoding.sampling import SamplingConfig
from mmspec_jax.decoding.session import DecodeSession
from mmspec_jax.models import precision

# TinyLlama-1.1B's shape.
LLAMA_1B = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                num_attention_heads=32, num_key_value_heads=4, vocab_size=32000,
                max_position_embeddings=2048, rms_norm_eps=1e-5, tie_word_embeddings=False)
GREEDY = SamplingConfig(temperature=0.0)
DTYPES = ('float32', 'bfloat16')


def save_random_llama(out_dir: str, shape: dict[str, Any], seed: int = 0) -> float:
  """A random LlamaForCausalLM of `shape` saved with transformers; returns the seconds taken."""
  import torch
  import transformers
  start = time.perf_counter()
  torch.manual_seed(seed)
  config = transformers.LlamaConfig(**shape, bos_token_id=1, eos_token_id=2, pad_token_id=0)
  model = transformers.LlamaForCausalLM(config).to(torch.float32).eval()
  model.save_pretrained(out_dir)
  return time.perf_counter() - start


def kv_cache_bytes(config, length: int, batch: int = 1, itemsize: int = 4) -> int:
  return 2 * config.num_layers * batch * length * config.num_kv_heads * config.head_dim * itemsize


def bytes_per_token(config, params, prompt_length: int, new_tokens: int) -> int:
  """Bytes one batch-1 decode step reads on average: the weights it uses plus the KV cache."""
  embedding = params['embed_tokens']['embedding']
  weights = parameter_bytes(params) - embedding.size * embedding.dtype.itemsize
  if config.tie_word_embeddings:  # The table is then read whole, as the output projection.
    weights += embedding.size * embedding.dtype.itemsize
  mean_context = prompt_length + new_tokens / 2
  return weights + embedding.shape[1] * embedding.dtype.itemsize + kv_cache_bytes(
      config, int(mean_context), itemsize=embedding.dtype.itemsize)


def ours(model_dir: str, prompt: np.ndarray, new_tokens: int,
         dtype: str) -> tuple[Timed, dict[str, Any]]:
  """Our greedy decoding in `dtype`, compiled and warmed up: (its timer,
  config/params/tokens/compile)."""
  session = DecodeSession.from_params(None, load_model(model_dir, dtype=dtype), dtype=dtype)
  request = inputs.Request(id=0, line=1, token_ids=tuple(int(t) for t in prompt), image=None)
  batch = inputs.make_batches([request], 1, (prompt.size,))[0]
  decoder = session.decoder(None, num_draft_tokens=0, sampling=GREEDY,
                            max_new_tokens=new_tokens, eos_token_ids=())  # EOS off.
  compile_seconds = session.compile(decoder, [batch])
  program, arguments = session.place(decoder, batch, jax.random.key(0))
  run = lambda: jax.block_until_ready(program(*arguments))
  result = run()  # The warm-up run (first runs of a program are slower), kept for its tokens.
  assert int(result.num_generated[0]) == new_tokens
  return Timed(run), {'config': session.target_config, 'params': session.target_params,
                      'compile_seconds': compile_seconds, 'tokens': np.asarray(result.tokens[0])}


def transformers_generate(model_dir: str, prompt: np.ndarray, new_tokens: int, threads: int,
                          dtype: str) -> tuple[Timed, dict[str, Any]]:
  """transformers' greedy `generate` (torch, CPU, `threads` threads) on the same weights in
  `dtype`, loaded and warmed up: (its timer, load/warm-up seconds and tokens)."""
  import torch
  import transformers
  torch.set_num_threads(threads)
  start = time.perf_counter()
  model = transformers.LlamaForCausalLM.from_pretrained(model_dir,
                                                        dtype=getattr(torch, dtype)).eval()
  load_seconds = time.perf_counter() - start
  input_ids = torch.as_tensor(prompt[None], dtype=torch.long)
  kwargs = dict(attention_mask=torch.ones_like(input_ids), max_new_tokens=new_tokens,
                min_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)

  def run():
    with torch.inference_mode():
      return model.generate(input_ids, **kwargs)
  start = time.perf_counter()
  output = run()[0, prompt.size:].numpy()  # The warm-up, reported apart like a compile.
  warmup_seconds = time.perf_counter() - start
  return Timed(run), {'warmup_seconds': warmup_seconds, 'load_seconds': load_seconds,
                      'tokens': output}


def run_section(work_dir: str, *, prompt_length: int = 64, new_tokens: int = 128,
                repeats: int = 3, log) -> dict[str, Any]:
  """Both decoders in both precisions and the bandwidth probes, prepared, then timed round-robin
  `repeats` times (the roofline's bandwidth is measured between the very runs it bounds)."""
  model_dir = os.path.join(work_dir, 'llama_1b_hf')
  log(f'[1/4] saving a random 1.1B LLaMA with transformers to {model_dir}')
  save_seconds = save_random_llama(model_dir, LLAMA_1B)
  prompt = np.random.default_rng(0).integers(3, LLAMA_1B['vocab_size'], prompt_length)
  threads = len(os.sched_getaffinity(0))
  runs, timers = {}, []
  for dtype in DTYPES:
    log(f'[1/4] {dtype}: compiling ours, loading transformers')
    mine, mine_info = ours(model_dir, prompt, new_tokens, dtype)
    config, params = mine_info.pop('config'), mine_info.pop('params')
    theirs, theirs_info = transformers_generate(model_dir, prompt, new_tokens, threads, dtype)
    runs[dtype] = {'bytes_per_token': bytes_per_token(config, params, prompt_length, new_tokens),
                   'parameters': int(sum(x.size for x in jax.tree.leaves(params))),
                   'ours': (mine, mine_info), 'transformers': (theirs, theirs_info)}
    timers += [mine, theirs]
    del params
  probe_bytes = 1 << 29
  probes = bandwidth_probes(probe_bytes)
  log(f'[1/4] batch 1, {prompt_length}-token prompt, {new_tokens} new tokens: ours and '
      f'transformers in {" and ".join(DTYPES)}, and the bandwidth probes, {repeats} interleaved '
      'runs')
  interleaved([*probes.values(), *timers], repeats)
  bandwidth = best_bandwidth(probes, probe_bytes)
  log(f'[1/4] read bandwidth {bandwidth["bytes_per_second"] / 1e9:.1f} GB/s '
      f'({bandwidth["kernel"]}, its fastest run)')
  section = {'model': {**LLAMA_1B, 'parameters': runs['float32']['parameters']},
             'prompt_length': prompt_length, 'new_tokens': new_tokens, 'batch': 1,
             'save_seconds': save_seconds, 'threads': threads, 'read_bandwidth': bandwidth,
             'precisions': {}}
  reference = runs['float32']['ours'][1]['tokens']
  for dtype, run in runs.items():
    roofline = bandwidth['bytes_per_second'] / run['bytes_per_token']
    (mine, mine_info), (theirs, theirs_info) = run['ours'], run['transformers']
    ours_rate, theirs_rate = mine.timing().rate(new_tokens), theirs.timing().rate(new_tokens)
    same = mine_info['tokens'] == theirs_info['tokens']
    section['precisions'][dtype] = {
        'bytes_per_token': run['bytes_per_token'], 'roofline_tokens_per_second': roofline,
        'ours': {'tokens_per_second': ours_rate, 'timing': mine.timing().as_dict(),
                 'compile_seconds': mine_info['compile_seconds']},
        'transformers': {'tokens_per_second': theirs_rate, 'timing': theirs.timing().as_dict(),
                         'warmup_seconds': theirs_info['warmup_seconds'],
                         'load_seconds': theirs_info['load_seconds']},
        'fraction_of_roofline': ours_rate['median'] / roofline,
        # Greedy tokens of both on random weights: equal unless float noise flips a near-tie.
        'same_tokens_as_transformers': int(same.sum()),
        'same_tokens_as_ours_float32': int((mine_info['tokens'] == reference).sum()),
        'first_difference': int(np.argmin(same)) if not same.all() else None}
    log(f'[1/4] {dtype}: ours {ours_rate["median"]:.2f} tokens/s, transformers '
        f'{theirs_rate["median"]:.2f}, roofline {roofline:.2f}')
  best = lambda name: max(DTYPES, key=lambda d: section['precisions'][d][name][
      'tokens_per_second']['median'])
  rate = lambda dtype, name: section['precisions'][dtype][name]['tokens_per_second']['median']
  fastest, theirs_fastest = best('ours'), best('transformers')
  section.update(
      fastest_precision=fastest, auto_precision=precision.auto_dtype(),
      fraction_of_roofline=section['precisions'][fastest]['fraction_of_roofline'],
      speedup_over_transformers=rate(fastest, 'ours') / rate(theirs_fastest, 'transformers'),
      transformers_fastest_precision=theirs_fastest)
  log(f"[1/4] fastest: ours in {fastest}, transformers in {theirs_fastest}; dtype='auto' picks "
      f'{section["auto_precision"]}')
  return section
