"""decode.py's configuration and its defaults (configs/decode.py returns this; the demo and the
tests start from it too, so a new setting reaches every caller)."""

import ml_collections

from mmspec_jax import distributed, sharding


def decode_config() -> ml_collections.ConfigDict:
  """Every setting of decode.py, with its default."""
  config = ml_collections.ConfigDict()
  # Target model: a Hugging Face LLaVA/LLaMA directory or a converted one (mmspec_config.json);
  # '' = the checkpoints `make demo` trained (target and language-only draft).
  config.target = ''
  # Draft model directory (LLaMA or adapter draft, HF or converted); '' = plain autoregressive.
  config.draft = ''
  # Draft tokens proposed per verification step (gamma); must be >= 1 when a draft is given.
  config.num_draft_tokens = 5
  # A tree of candidates instead of a chain: branching factors per depth, e.g. '3,2,1,1' (the
  # root's 3 children, 2 children each, ...); its depth replaces num_draft_tokens. '' = a chain.
  # Greedy trees take each node's top tokens; sampled trees draw without replacement and verify
  # by recursive rejection sampling (exact). See decoding/tree.py. 'dynamic:D,K,N' grows each
  # row's own tree (EAGLE-2): D depths, the K best nodes expanded per depth into K children each,
  # the N best verified (decoding/dynamic_tree.py).
  config.draft_tree = ''
  # Adaptive draft length: a row stops drafting when the draft's largest next-token probability
  # falls below this, and drafting stops once every unfinished row has. 0 = a fixed length.
  config.confidence_threshold = 0.0
  # Sampling temperature; 0 = greedy (argmax).
  config.temperature = 0.0
  # Keep only the k most likely tokens before sampling; 0 = off.
  config.top_k = 0
  # Nucleus sampling mass in (0, 1]; 1 = off.
  config.top_p = 1.0
  # Tokens generated per prompt at most (EOS stops a row earlier).
  config.max_new_tokens = 128
  # Rows decoded together: the number of slots (continuous) or the batch (static; the last is
  # padded with copies of its first row).
  config.batch_size = 8
  # 'continuous': a finished row's slot is refilled with the next waiting request between chunks
  # (decoding/scheduler.py) | 'static': closed batches, each decoded until its slowest row ends.
  config.batching = 'continuous'
  # Continuous batching: steps per chunk (one host round trip per chunk: fewer, longer chunks
  # cost less dispatch but refill finished slots later).
  config.chunk_steps = 8
  # Continuous batching: positions per slot (the longest prompt + max_new_tokens a request may
  # need); 0 = what this run's requests need.
  config.slot_capacity = 0
  # Continuous batching: which waiting request enters a free slot first. 'longest_first': the
  # largest max_new_tokens first (every request of the file is known at the start, so the long
  # ones run beside others instead of alone at the end) | 'arrival': input order.
  config.admission_order = 'longest_first'
  # Continuous batching: new requests prefilled together (padded to a length bucket).
  config.prefill_width = 4
  # The run's PRNG seed. A request samples from fold_in(key(seed), hash of its id), or from
  # key(its own "seed") when its JSONL line gives one: never from its batch or position.
  config.seed = 0
  # One question instead of a file: its answer is printed as it streams, then its statistics.
  config.prompt = ''
  # The image of config.prompt (a PNG/JPEG/WebP path); '' = a text-only prompt.
  config.image = ''
  # Input JSONL path. Relative "image" paths are resolved against this file's directory.
  config.prompts = ''
  # Output JSONL path; the summary goes next to it (OUT.jsonl -> OUT.summary.json).
  config.output = ''
  # True: "prompt" is the full model input (only tokenized); False: wrapped in the chat template.
  config.raw_prompt = False
  # Compute and parameter dtype of both models: 'float32' | 'bfloat16' | 'float16' | 'auto' (the
  # faster of bfloat16 and float32 on this host: bfloat16 on accelerators, a probe on CPU that
  # says what it picked; models/precision.py).
  config.dtype = 'float32'
  # Prompts are right-padded to the smallest bucket that fits, so a run compiles a few shapes;
  # longer prompts use their length rounded up to a multiple of 64.
  config.length_buckets = (64, 128, 256, 512, 1024, 2048, 4096)
  # Devices: mesh axis sizes (-1 takes the rest): batch over data x fsdp, heads and MLP over
  # tensor, e.g. --config.mesh.data=2 --config.mesh.tensor=4 on 8 chips. Train and decode share
  # the logical-axis rules (mmspec_jax/sharding.py).
  config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  # How both models' language layers run (mmspec_jax/models/layout.py). layers: 'scanned' (one
  # stacked array per weight, nn.scan) | 'unrolled' (one array per layer) | '' = the backend's
  # default (scanned on TPU, unrolled elsewhere). output_major_kernels: True | False | '' = the
  # default (on CPU: True in bfloat16; in float32 True for the draft and for a target decoding
  # alone, False for a target that verifies drafts). min_matmul_rows: matmuls over fewer rows are
  # padded to this many; 0 = the default (3 for bfloat16 on CPU, whose kernels for 1-2 rows cost
  # ~10x more, else 1). cache_dtype: the KV cache's dtype; '' = the default (float32 for bfloat16
  # on CPU, which has no bfloat16 scatter; else the compute dtype). attention over the KV cache:
  # 'blockwise' (pure JAX, reads only the live blocks) | 'cudnn' (jax.nn.dot_product_attention's fused kernel on NVIDIA GPUs) | 'xla' (the
  # same API's XLA implementation) | 'pallas' (JAX's TPU paged-attention kernel, heads-first cache;
  # meant for bfloat16 on TPU, interpreted elsewhere).
  config.layout = ml_collections.ConfigDict(dict(
      layers='', fused_projections=True, output_major_kernels='', min_matmul_rows=0,
      cache_dtype='', attention='blockwise', attention_block_size=256))
  config.logical_axis_rules = sharding.DEFAULT_RULES
  # Several processes (multi-host TPU slices, GPU clusters): config.multihost and
  # config.distributed (mmspec_jax/distributed.py); every process runs the same command.
  distributed.add_config(config)
  # The draft's own rules: by default data parallel over the whole mesh (sharding.DRAFT_RULES).
  config.draft_logical_axis_rules = sharding.DRAFT_RULES
  return config
