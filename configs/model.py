"""A model preset as a config: `--config=configs/model.py:llava_1_5_7b`.

Presets: llava_1_5_7b, llava_1_5_13b, draft_115m, tiny_llama, tiny_llava
(mmspec_jax/models/presets.py). Fields can be overridden, e.g. `--config.text.dtype=bfloat16`.
"""

from mmspec_jax.models import presets


def get_config(name: str = 'llava_1_5_7b'):
  return presets.as_config_dict(presets.get(name))
