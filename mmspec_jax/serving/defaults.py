"""serve.py's configuration: decode.py's model and decoding settings (decoding/defaults.py), the
run's sampling settings as each request's defaults, and the server's own."""

import ml_collections

from mmspec_jax.decoding.defaults import decode_config

# decode.py's settings that a server has no use for (its requests come over HTTP, one at a time).
# A server admits in arrival order: its requests arrive over time, and none may wait behind
# later, longer ones.
_BATCH_JOB_ONLY = ('prompts', 'output', 'raw_prompt', 'batching', 'admission_order')


def serve_config() -> ml_collections.ConfigDict:
  config = decode_config()
  for name in _BATCH_JOB_ONLY:
    del config[name]
  # Where to listen: localhost unless said otherwise.
  config.host = '127.0.0.1'
  config.port = 8000
  # The model name clients send ("model"); '' = a Hub id as given, "mmspec-demo" for the demo
  # pair, else the target directory's name.
  config.served_model_name = ''
  # Requests that may wait for a slot beyond the running ones; more get 429.
  config.max_waiting = 256
  # A bearer token every /v1 request must carry ('' = none needed).
  config.api_key = ''
  # A folder whose files requests may name as file:// image URLs ('' = none).
  config.allowed_local_media_path = ''
  # Request bodies larger than this get 413 (an image as a base64 data URL is ~1.4x its file).
  config.max_body_bytes = 20 * 1024 * 1024
  return config
