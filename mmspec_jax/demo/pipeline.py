"""`make demo`: the whole system on an offline synthetic world, from nothing.

1. Generates the world (images of shapes; captioning, science-QA-like and conversation tasks; a
   text corpus; a BPE tokenizer), deterministically.
2. Trains, with train.py's stages and configs/world.py: a small LLaVA target from scratch, a
   language-only draft (pretraining on text, then chat), and an adapter draft (stages 1 and 2);
   then has the target answer every 6th training record (ANSWER_STRIDE) (mmspec_jax/distillation/target_answers.py)
   and distills both drafts toward its distributions on its own answers; and trains the feature
   draft (EAGLE-3 style) on the same answers and the target's layer outputs.
3. Decodes a handful of held-out images speculatively, printing question, answer and tau per row.
4. Runs the paper's evaluation: tau and MBSU per task x gamma x draft (greedy), each draft
   before and after distillation, and the feature draft.

Everything is cached under artifacts/ (git ignores it): a rerun reuses the world, the checkpoints
and the evaluation, and only decodes the examples again.
"""

from __future__ import annotations

import json
import os
import time

from absl import app

from mmspec_jax import cli
from mmspec_jax.demo import artifacts

STAGES = ('target', 'draft_pretrain', 'draft_chat', 'adapter_stage1', 'adapter_stage2')
# Trained after the target has answered the training prompts, on its answers.
DISTILLED = ('draft_distill', 'adapter_distill', 'feature_distill')
# Each draft before and after distillation on the target's answers, and the feature draft.
DRAFTS = {'language': 'draft_chat', 'adapter': 'adapter_stage2',
          'language_distilled': 'draft_distill', 'adapter_distilled': 'adapter_distill',
          'feature': 'feature_distill'}
# Every ANSWER_STRIDE-th training record is answered by the target: the distillation stages read
# 150 steps x 16 rows, each of these 1,500 records 1.6 times.
ANSWER_STRIDE = 6
# Greedy only, four gammas: each (draft, gamma, sampling) compiles its own program (~8 s here),
# and four drafts at seven gammas and two samplings would cost the demo 4 minutes of compiling.
# `python -m mmspec_jax.evaluation` runs any grid.
EVALUATION_GAMMAS = (1, 3, 5, 7)
EVALUATION_SAMPLINGS = ('greedy',)
EXAMPLES_PER_TASK = 2
GAMMA = 3


def _world_config(stage: str):
  return cli.load_config(f'world:{stage}')


def _banner(text: str):
  print(f'\n=== {text} ===', flush=True)


def build_world():
  from mmspec_jax.data.world import generate_world
  world = artifacts.world_dir()
  if os.path.isfile(os.path.join(world, 'manifest.json')):
    print(f'world: reusing {world}')
    return world
  _banner('generating the world')
  generate_world(world, progress=lambda line: print(line, flush=True))
  return world


def train_models(stages=STAGES):
  from mmspec_jax.training.loop import Trainer
  for stage in stages:
    if artifacts.is_trained(stage):
      print(f'{stage}: reusing {artifacts.export_dir(stage)}')
      continue
    _banner(f'training {stage}')
    start = time.time()
    Trainer(_world_config(stage), artifacts.run_dir(stage)).run()
    print(f'{stage}: trained in {time.time() - start:.0f}s')


def ask_target(world: str):
  """The target's own answers to every ANSWER_STRIDE-th training record (greedy), resumable."""
  from mmspec_jax.decoding.session import DecodeSession
  from mmspec_jax.distillation.target_answers import TargetAnswers
  out = artifacts.target_answers_path()
  if os.path.isfile(out):
    print(f'target answers: reusing {out}')
    return
  _banner('the target answers the training prompts (the distilled drafts\' data)')
  start = time.time()
  os.makedirs(os.path.dirname(out), exist_ok=True)
  prompts = os.path.join(os.path.dirname(out), 'prompts.json')
  with open(os.path.join(world, 'train_all.json')) as f:
    records = json.load(f)[::ANSWER_STRIDE]
  with open(prompts, 'w') as f:
    json.dump(records, f)
  session = DecodeSession(artifacts.export_dir('target'))
  counts = TargetAnswers(session, max_new_tokens=96, batch_size=32).run(
      [prompts], os.path.join(world, 'images'), out)
  print(f'target answers: {counts["answers"]} answers to {counts["records"]} records in '
        f'{time.time() - start:.0f}s -> {out}')


def _example_prompts(world: str, path: str):
  """A few held-out questions of each task, as decode.py input lines."""
  rows = []
  for task in ('captioning', 'sqa', 'conversation'):
    with open(os.path.join(world, f'test_{task}.json')) as f:
      records = json.load(f)[:EXAMPLES_PER_TASK]
    for record in records:
      question = record['conversations'][0]['value'].replace('<image>', '').strip()
      rows.append({'id': f'{task}/{record["id"]}', 'prompt': question,
                   'image': os.path.join('images', record['image'])})
  with open(path, 'w') as f:
    f.writelines(json.dumps(row) + '\n' for row in rows)
  return rows


def decode_examples(world: str):
  from mmspec_jax.decoding import runner, statistics
  from mmspec_jax.decoding.defaults import decode_config
  _banner(f'speculative decoding of held-out images (the distilled language-only draft, '
          f'gamma {GAMMA})')
  results = artifacts.results_dir()
  os.makedirs(results, exist_ok=True)
  prompts = os.path.join(world, 'demo_prompts.jsonl')
  rows = _example_prompts(world, prompts)
  config = decode_config()
  config.update(dict(
      target=artifacts.export_dir('target'),
      draft=artifacts.export_dir(DRAFTS['language_distilled']),
      num_draft_tokens=GAMMA, temperature=0.0, max_new_tokens=96, batch_size=len(rows),
      prompts=prompts, output=os.path.join(results, 'demo_decode.jsonl'),
      length_buckets=(256,)))
  stats = runner.run(config)
  with open(config.output) as f:
    outputs = [json.loads(line) for line in f]
  for row, out in zip(rows, outputs):
    steps = out['num_target_calls'] - 1
    tau = (len(out['token_ids']) - 1) / steps if steps else float('nan')
    print(f"\n[{out['id']}] tau {tau:.2f}\n  Q: {row['prompt']}\n  A: {out['text']}")
  print('\n' + statistics.format_table(stats))


def _complete(summary: str) -> bool:
  with open(summary) as f:
    return bool(json.load(f).get('complete'))


def evaluate_models(world: str):
  from mmspec_jax.evaluation import evaluate
  results = artifacts.results_dir()
  markdown = os.path.join(results, 'results.md')
  summary = os.path.join(results, 'results.json')
  newest_model = max(os.path.getmtime(artifacts.export_dir(s)) for s in STAGES + DISTILLED)
  if (os.path.isfile(markdown) and os.path.getmtime(markdown) > newest_model
      and _complete(summary)):
    _banner(f'evaluation (cached: {markdown})')
    with open(markdown) as f:
      print(f.read())
    return
  _banner('the paper\'s evaluation: tau and MBSU per task, gamma, draft and sampling')
  evaluate(artifacts.export_dir('target'),
           {name: artifacts.export_dir(stage) for name, stage in DRAFTS.items()}, world,
           gammas=EVALUATION_GAMMAS, samplings=EVALUATION_SAMPLINGS, max_new_tokens=64,
           batch_size=16, num_examples=32, out_dir=results)
  print(open(markdown).read())
  print(f'(also {summary} and {os.path.join(results, "tau_vs_gamma.png")})')


def main():
  start = time.time()
  world = build_world()
  train_models()
  ask_target(world)
  train_models(DISTILLED)
  decode_examples(world)
  evaluate_models(world)
  print(f'\nmake demo finished in {time.time() - start:.0f}s; artifacts in {artifacts.ROOT}/')


def command():
  def run(argv):
    if len(argv) > 1:
      raise app.UsageError(f'unexpected arguments: {argv[1:]}')
    cli.configure_console()
    main()
  cli.run_command(run, usage=__doc__, default_config=None)


if __name__ == '__main__':
  command()
