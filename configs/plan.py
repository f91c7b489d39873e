r"""The 7B-scale plan check: compile on abstract shapes, report per-device memory and the cost
(bytes, flops, temporaries, predicted step times and speedup) of one decoding step.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 \
      python -m mmspec_jax.plan --config=configs/plan.py --config.mesh.tensor=8

  # LLaVA-1.5-13B on the same 8 devices:
  ... --config.target=llava_1_5_13b
"""

import ml_collections

from mmspec_jax import sharding


def get_config():
  config = ml_collections.ConfigDict()
  # Model presets (mmspec_jax/models/presets.py): the target and the draft ('' = no draft;
  # 'feature_llava_7b': an EAGLE-3-style feature draft of the 7B target).
  config.target = 'llava_1_5_7b'
  config.draft = 'draft_115m'
  # Decoding: rows, prompt tokens (576 of them image placeholders), new tokens, gamma.
  config.batch_size = 8
  config.prompt_length = 1024
  config.max_new_tokens = 1024  # prompt + new = 2048 positions.
  config.num_draft_tokens = 5
  # A tree instead of a chain ('5,1,1,1,1,1': configs/decode.py), and an adaptive length's
  # threshold: the decoding program is then compiled with them.
  config.draft_tree = ''
  config.confidence_threshold = 0.0
  config.temperature = 0.0
  # Continuous batching's persistent state: slots x capacity (the longest prompt + new tokens a
  # request may bring); num_slots 0 skips it.
  config.slots = ml_collections.ConfigDict(dict(num_slots=16, capacity=4096))
  # Compute and parameter dtype for decoding (the train step keeps float32 parameters).
  config.dtype = 'bfloat16'
  # The draft's train step (batch_size 0 skips it).
  config.train = ml_collections.ConfigDict(dict(batch_size=64, seq_len=2048,
                                                num_micro_batches=4))
  # Per-device memory to check against, e.g. 16 GiB for a TPU v5e chip.
  config.memory_per_device_gib = 16.0
  # The cost report (mmspec_jax/plan/costs.py): one target step, one verification and one draft
  # step compiled apart (and a feature draft's fc), each row's target cache holding `live_length`
  # valid positions (the language-only draft's then holds live_length - num_image_tokens: no
  # image slots). Chains: a tree's calls are not costed here. 1536 =
  # prompt + half the new tokens: the mean live length over the decode phase. 0 skips the report.
  config.live_length = 1536
  # Block efficiency at num_draft_tokens for the predicted speedup; 0 = the mean greedy tau of
  # `make demo`'s draft of the same kind (language, adapter or feature) at that gamma when its
  # results exist, else the paper's (about 2.56 at gamma 5). The report says which it used.
  config.tau = 0.0
  # The dtype the cost calls compile in; '' = `dtype`, except float32 on CPU (XLA:CPU has no
  # bfloat16 scatter and converts the whole cache around each write; TPU and GPU do not).
  config.cost_dtype = ''
  # How the models' language layers run (models/layout.py, as configs/decode.py): the TPU's
  # decoding layout, whatever machine runs the plan (a field left out or empty takes the TPU's
  # default). layers: 'scanned' | 'unrolled'; output_major_kernels: True | False | '' (default);
  # attention: 'blockwise' | 'xla' | 'cudnn' | 'pallas' (the cost report measures blockwise).
  config.layout = ml_collections.ConfigDict(dict(
      layers='scanned', fused_projections=True, output_major_kernels='', attention='blockwise',
      attention_block_size=256))
  config.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=1, tensor=-1))
  config.logical_axis_rules = sharding.DEFAULT_RULES
  # The draft's own rules, as decode.py's: data parallel over the whole mesh.
  config.draft_logical_axis_rules = sharding.DRAFT_RULES
  return config
