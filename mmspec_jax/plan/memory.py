r"""Will it fit, and how fast? Compiles full-size programs on abstract shapes and reports
per-device memory and the cost of each decoding call.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 \
      mmspec-plan --config.mesh.tensor=8   (or python -m mmspec_jax.plan ...)

Lowers and compiles, without allocating a single weight, (1) the whole speculative decoding
program (prefill with images, the while_loop of drafting and verification) for the target and
draft presets, (2) continuous batching's persistent state of `slots.num_slots` slots x
`slots.capacity` positions and its chunk program (decoding/slots.py), and (3) the draft's train
step, on the mesh of the devices present (real TPU/GPU
devices, or fake CPU ones), then prints per-device parameter, KV cache and temporary bytes from the
compiled programs' memory analysis and whether they fit `memory_per_device_gib`; then (4) the
cost report of `mmspec_jax/plan/costs.py`: bytes, flops and temporaries of one target step, one
verification and one draft step at `live_length`, against the ideal bytes, with the step times and
speculative speedup they predict. Models run in the decoding layout of `config.layout`.
"""

from __future__ import annotations

import functools
import json
import math
import os
import sys
import time

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from absl import app, flags

from mmspec_jax import cli, sharding
from mmspec_jax.demo import artifacts
from mmspec_jax.plan import costs as plan_costs
from mmspec_jax.decoding import placement
from mmspec_jax.decoding.engine import SpeculativeDecoder
from mmspec_jax.decoding.session import eos_token_ids
from mmspec_jax.decoding.slots import SlotPrograms
from mmspec_jax.decoding.tree import parse_tree
from mmspec_jax.decoding.sampling import SamplingConfig
from mmspec_jax.models import (AdapterDraftConfig, FeatureDraftConfig, KVCache, LlavaConfig,
                               abstract_params, build, presets, text_config)
from mmspec_jax.models.config import with_dtype
from mmspec_jax.models.layout import Layout
from mmspec_jax.training.optimizer import make_optimizer
from mmspec_jax.training.step import Objective, state_shardings, train_step

GIB = 1024 ** 3


def _bytes_per_device(structs) -> int:
  """Bytes of one device's shards of abstract arrays with shardings."""
  total = 0
  for leaf in jax.tree.leaves(structs):
    shard = leaf.sharding.shard_shape(leaf.shape)
    itemsize = (8 if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key)  # A threefry key.
                else np.dtype(leaf.dtype).itemsize)
    total += math.prod(shard) * itemsize
  return total


def _abstract(config, mesh, rules, layout: Layout):
  return sharding.placed_structs(nn.unbox(abstract_params(config, layout)),
                                 placement.param_shardings(config, mesh, rules, layout))


def _memory(compiled) -> dict[str, int]:
  analysis = compiled.memory_analysis()
  fields = ('argument_size_in_bytes', 'output_size_in_bytes', 'temp_size_in_bytes',
            'alias_size_in_bytes', 'generated_code_size_in_bytes')
  return {name: int(getattr(analysis, name, 0) or 0) for name in fields}


def _models(config, mesh, rules, draft_rules, layout: Layout):
  """(target config, draft config | None, their abstract placed params, the decoder) as decode.py
  builds them: the target's EOS, the draft placed by its own rules."""
  target = with_dtype(presets.get(config.target), config.dtype)
  draft = with_dtype(presets.get(config.draft), config.dtype) if config.draft else None
  target_params = _abstract(target, mesh, rules, layout)
  draft_params = _abstract(draft, mesh, draft_rules, layout) if draft else None
  tree = parse_tree(config.draft_tree) if draft and config.get('draft_tree') else None
  gamma = (tree.depth if tree else config.num_draft_tokens) if draft else 0
  decoder = SpeculativeDecoder(build(target, layout), build(draft, layout) if draft else None,
                               gamma, SamplingConfig(temperature=config.temperature),
                               config.max_new_tokens, eos_token_ids(target, None),
                               draft_rules=draft_rules, draft_tree=tree, confidence_threshold=(
                                   config.get('confidence_threshold', 0.0) if draft else 0.0))
  return target, draft, target_params, draft_params, decoder


def _describe(config, decoder) -> str:
  tree = decoder.draft_tree
  return (f'{config.target} + {config.draft or "(none)"}, '
          + (f'tree {tree}' if tree and not tree.is_chain else
             f'gamma {decoder.num_draft_tokens}'))


def plan_decoding(config, mesh, rules, draft_rules, layout: Layout) -> dict:
  """The whole decoding program, as decode.py's static batching compiles it: its cache sized to
  the prompt (the language-only draft of LLaVA holds no image slots)."""
  target, draft, target_params, draft_params, decoder = _models(config, mesh, rules, draft_rules,
                                                                layout)
  tree = decoder.draft_tree
  image_shape, prompt = None, [0] * config.prompt_length
  if isinstance(target, LlavaConfig):
    image_shape = (target.vision.image_size, target.vision.image_size, 3)
    prompt[:target.num_image_tokens] = [target.image_token_index] * target.num_image_tokens
  draft_prompt_length = decoder.draft_prompt_length([prompt], config.prompt_length)
  inputs = placement.input_structs(config.batch_size, config.prompt_length, image_shape, mesh,
                                   rules)
  start = time.time()
  keys = placement.keys_struct(config.batch_size, mesh, rules)
  with placement.mesh_context(mesh, rules):
    compiled = decoder.generate.lower(target_params, draft_params, *inputs, keys,
                                      draft_prompt_length=draft_prompt_length).compile()
  new_positions = config.max_new_tokens + decoder.num_draft_nodes + 1
  cache_length = config.prompt_length + new_positions
  caches = [(target, cache_length, rules)]
  if draft:
    caches.append((draft, (draft_prompt_length or config.prompt_length) + new_positions,
                   draft_rules))
  cache_structs = []
  for model, length, model_rules in caches:
    cache = jax.eval_shape(lambda m=model, n=length: KVCache.init(
        text_config(m), config.batch_size, n, layout=layout))
    cache_structs.append(sharding.placed_structs(cache, sharding.tree_shardings(
        cache, KVCache.logical_axes(layout.cache_heads_first), mesh, model_rules)))
  return {
      'program': f'speculative decoding {_describe(config, decoder)}, batch '
                 f'{config.batch_size}, {cache_length} positions'
                 + (f' (draft {caches[1][1]})' if draft else '') + f', layers {layout.layers}',
      'compile_seconds': round(time.time() - start, 1),
      'parameter_bytes': _bytes_per_device([target_params, draft_params]),
      'draft_parameter_bytes': _bytes_per_device(draft_params),
      'kv_cache_bytes': _bytes_per_device(cache_structs),
      **_memory(compiled)}


def plan_training(config, mesh, rules) -> dict:
  model = with_dtype(presets.get(config.draft), config.dtype, 'float32')
  train = config.train
  # The optimizer's hyperparameters do not change its memory; its structure does.
  optimizer = make_optimizer(ml_collections.ConfigDict(dict(
      learning_rate=1e-4, warmup_steps=10, num_train_steps=1000, end_learning_rate_factor=0.1,
      adam_b1=0.9, adam_b2=0.95, adam_eps=1e-8, weight_decay=0.1, max_grad_norm=1.0)))
  shardings, abstract_state = state_shardings(model, optimizer, mesh, rules)
  rows = (train.batch_size, train.seq_len)
  batch = {name: jax.ShapeDtypeStruct(rows, dtype, sharding=placement.batch_sharding(rows, mesh,
                                                                                      rules))
           for name, dtype in (('inputs', np.int32), ('targets', np.int32),
                               ('loss_mask', np.float32), ('positions', np.int32),
                               ('segment_ids', np.int32))}
  step = jax.jit(functools.partial(train_step, Objective(build(model)), optimizer,
                                   train.num_micro_batches),
                 out_shardings=(shardings, None), donate_argnums=0)
  start = time.time()
  with placement.mesh_context(mesh, rules):
    compiled = step.lower(abstract_state, batch).compile()
  return {
      'program': f'train step {config.draft}, batch {train.batch_size} x {train.seq_len}, '
                 f'{train.num_micro_batches} micro-batches',
      'compile_seconds': round(time.time() - start, 1),
      'parameter_bytes': _bytes_per_device(abstract_state.params),
      'optimizer_bytes': _bytes_per_device(abstract_state.opt_state),
      **_memory(compiled)}


def plan_slots(config, mesh, rules, draft_rules, layout: Layout) -> dict:
  """Continuous batching's persistent decode state (both caches of every slot, the tokens and
  counters) and its chunk program, which updates the state in place (donated)."""
  _, _, target_params, draft_params, decoder = _models(config, mesh, rules, draft_rules, layout)
  slots = config.slots
  programs = SlotPrograms(decoder, slots.num_slots, slots.capacity)
  start = time.time()
  with placement.mesh_context(mesh, rules):
    shardings = programs.init.lower().compile().output_shardings
    state = jax.tree.map(lambda s, where: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=where),
                         jax.eval_shape(programs.init), shardings)
    compiled = programs.generate_chunk.lower(target_params, draft_params, state,
                                             np.int32(1), np.bool_(True)).compile()
  caches = [c for c in (state.target_cache, state.draft_cache) if c is not None]
  return {
      'program': f'continuous batching {_describe(config, decoder)}, {slots.num_slots} slots x '
                 f'{slots.capacity} positions ({programs.cache_length} cached), one chunk',
      'compile_seconds': round(time.time() - start, 1),
      'parameter_bytes': _bytes_per_device([target_params, draft_params]),
      'state_bytes': _bytes_per_device(state),
      'kv_cache_bytes': _bytes_per_device(caches),
      **_memory(compiled)}


def _peak(report: dict) -> int:
  return (report['argument_size_in_bytes'] + report['output_size_in_bytes']
          + report['temp_size_in_bytes'] - report['alias_size_in_bytes'])


def run(config) -> list[dict]:
  mesh = sharding.make_mesh(config.mesh.to_dict())
  rules = tuple(tuple(rule) for rule in config.logical_axis_rules)
  draft_rules = tuple(tuple(rule) for rule in config.draft_logical_axis_rules)
  # The layout decoding would use on TPU, whatever runs the plan (fields left out of
  # config.layout, or empty, take the TPU's defaults).
  layout = placement.decoding_layout(config.layout, backend='tpu')
  print(f'{len(jax.devices())} {jax.devices()[0].platform} devices, mesh {dict(mesh.shape)}, '
        f'{config.dtype}, {layout}', flush=True)
  reports = [plan_decoding(config, mesh, rules, draft_rules, layout)]
  if config.slots.num_slots:
    reports.append(plan_slots(config, mesh, rules, draft_rules, layout))
  if config.draft and config.train.batch_size:
    if isinstance(presets.get(config.draft), FeatureDraftConfig):
      # Its stage (feature_distill) runs the frozen target in the step: not planned here.
      print(f'\n(no train step planned for the feature draft {config.draft}: its training '
            'step runs the frozen target beside it)')
    else:
      reports.append(plan_training(config, mesh, rules))
  for report in reports:
    report['peak_bytes'] = _peak(report)
    report['fits'] = report['peak_bytes'] <= config.memory_per_device_gib * GIB
    print(f"\n{report['program']} (compiled in {report['compile_seconds']}s)")
    for name, value in report.items():
      if name.endswith('bytes'):
        print(f'  {name:32s} {value / GIB:9.3f} GiB per device')
    verdict = 'fits' if report['fits'] else 'does NOT fit'
    print(f"  -> {verdict} in {config.memory_per_device_gib} GiB per device")
  if config.live_length:
    tau, source = assumed_tau(config)
    with config.unlocked():
      config.tau = tau
    reports[0]['costs'] = plan_costs.report(config, mesh, rules, draft_rules, layout)
    reports[0]['costs']['tau_source'] = source
    print(f'\ntau {tau:.2f}: {source}')
    plan_costs.print_report(reports[0]['costs'])
  return reports


# The paper's block efficiency on LLaVA-1.5-7B with its 115M draft: MBSU 2.37 at gamma 5 with
# c = 115M / 7B (../shared/PAPER.md) is tau = 2.37 * (5c + 1), about 2.56.
PAPER_TAU = 2.56


def _draft_kind(config) -> str:
  """The demo's draft of the plan's draft's kind: 'feature', 'adapter' or 'language'."""
  draft = presets.get(config.draft) if config.draft else None
  if isinstance(draft, FeatureDraftConfig):
    return 'feature'
  return 'adapter' if isinstance(draft, AdapterDraftConfig) else 'language'


def assumed_tau(config, results_path: str | None = None) -> tuple[float, str]:
  """The tau the predicted speedup assumes, and where it comes from: config.tau when set (> 0);
  else the mean greedy tau of `make demo`'s draft of the same kind (language-only, adapter or
  feature) at config.num_draft_tokens over its tasks, when its evaluation results exist; else
  the paper's."""
  if config.tau:
    return float(config.tau), 'config.tau'
  path = results_path or os.path.join(artifacts.results_dir(), 'results.json')
  gamma, kind = config.num_draft_tokens, _draft_kind(config)
  try:
    with open(path, encoding='utf-8') as f:
      cells = json.load(f)['cells']
    taus = [c['block_efficiency'] for c in cells
            if c.get('draft') == kind and c.get('sampling') == 'greedy'
            and c.get('gamma') == gamma and not c.get('shape')]
  except (OSError, ValueError, KeyError, TypeError):
    taus = []
  if taus:
    return sum(taus) / len(taus), (f"the mean greedy tau of make demo's {kind} draft at "
                                   f'gamma {gamma} over its {len(taus)} tasks ({path}; measured '
                                   'on the offline world\'s small pair, not on LLaVA-1.5-7B)')
  return PAPER_TAU, ("the paper's: MBSU 2.37 at gamma 5 on LLaVA-1.5-7B with its 115M draft, "
                     f'tau about {PAPER_TAU} (no make demo results at {path})')


def _define_flags():
  flags.DEFINE_string('output', '', 'Optional JSON file for the reports.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  cli.configure_console()
  try:
    reports = run(cli.config())
  except ValueError as e:
    sys.exit(f'error: {e}')
  if flags.FLAGS.output:
    with open(flags.FLAGS.output, 'w') as f:
      json.dump(reports, f, indent=2)


def command():
  cli.run_command(main, usage=__doc__, default_config='plan', define_flags=_define_flags)


if __name__ == '__main__':
  command()
