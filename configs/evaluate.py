r"""The paper's evaluation (mmspec-evaluate; docs/world_and_evaluation.md): tau and MBSU per task x
draft x gamma x sampling, and the target's answer quality.

  mmspec-evaluate --config.target=DIR --config.drafts=language:DIR,adapter:DIR \
      --config.data_dir=WORLD --config.out_dir=RESULTS [--config.gammas=1,3,5] \
      [--config.shapes='3,2,1;1,1,1,1,1,1,1@0.4']
"""

import ml_collections


def get_config():
  config = ml_collections.ConfigDict()
  # Target model directory (HF or converted) or Hub id.
  config.target = ''
  # The drafts, comma-separated NAME:DIR; NAME "language" or "adapter" is checked against the
  # model's kind, any other name is free.
  config.drafts = ''
  # Holds test_{task}.json (LLaVA-format records) and images/.
  config.data_dir = ''
  # Tasks to evaluate, comma-separated.
  config.tasks = 'captioning,sqa,conversation'
  # Draft tokens per step to evaluate, comma-separated.
  config.gammas = '1,2,3,4,5,6,7'
  # Trees or adaptive lengths beside the gammas, separated by ';': "3,2,1" (branching per depth),
  # "1,1,1,1,1@0.4" (a chain of 5 that stops below draft confidence 0.4).
  config.shapes = ''
  # greedy (temperature 0) and/or sample (temperature 1), comma-separated.
  config.samplings = 'greedy,sample'
  # Tokens per answer at most.
  config.max_new_tokens = 64
  # Rows decoded together.
  config.batch_size = 16
  # The first records of each task used.
  config.num_examples = 32
  # Where results.json, results.md and tau_vs_gamma.png go (created if missing).
  config.out_dir = ''
  # Base PRNG seed.
  config.seed = 0
  # 'float32' | 'bfloat16' | 'float16'.
  config.dtype = 'float32'
  return config
