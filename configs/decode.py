r"""python decode.py --config=configs/decode.py --config.target=DIR [--config.draft=DIR] \
    --config.prompts=IN.jsonl --config.output=OUT.jsonl [--config.num_draft_tokens=5] \
    [--config.draft_tree=3,2,1] [--config.confidence_threshold=0.0] \
    [--config.temperature=0.0] [--config.top_k=0] [--config.top_p=1.0] \
    [--config.max_new_tokens=128] [--config.batch_size=8] [--config.seed=0]

Speculative (or, without a draft, plain autoregressive) decoding of a JSONL file of prompts.
Input lines: {"id": ..., "prompt": "...", "image": "path"} or {"id": ..., "input_ids": [...],
"image": "path"}; "image" is optional. Writes OUT.jsonl (one line per input line, in input order)
and OUT.summary.json (run statistics), and prints the statistics table.
"""

from mmspec_jax.decoding.defaults import decode_config


def get_config():
  return decode_config()
