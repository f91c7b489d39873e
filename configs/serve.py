r"""python serve.py --config=configs/serve.py --config.target=DIR [--config.draft=DIR] \
    [--config.port=8000] [--config.batch_size=8] [--config.num_draft_tokens=5]

An OpenAI-compatible server (/v1/chat/completions, /v1/completions, /v1/models, /health,
/metrics) over the continuous-batching engine. Every decode.py model and decoding setting applies;
temperature, top_k, top_p and max_new_tokens are the defaults of requests that give none.
"""

from mmspec_jax.serving.defaults import serve_config


def get_config():
  return serve_config()
