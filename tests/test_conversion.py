"""Conversion round trips (converted directory, the CLI, export to HF) and refusals of bad input."""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
import transformers

from mmspec_jax.testing import tiny_hf as hf_builders
from mmspec_jax.convert.export import export_llama_to_hf, export_to_hf
from mmspec_jax.convert.hf_config import ConversionError
from mmspec_jax.convert.loading import load_model, save_converted
from mmspec_jax.models import build, init_params, presets

TOLERANCE = 1e-4
TOKENS = np.random.RandomState(0).randint(0, 120, (2, 12)).astype(np.int32)


@pytest.fixture(scope='module')
def llama_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp('hf_llama'))
  model = hf_builders.tiny_llama(seed=3)
  hf_builders.save(model, path)
  with torch.no_grad():
    reference = model(input_ids=torch.tensor(TOKENS, dtype=torch.long)).logits.numpy()
  return path, reference


def _logits(config, params, tokens=TOKENS):
  return np.asarray(build(config).apply({'params': params}, tokens))


def test_converted_directory_round_trip(llama_dir, tmp_path):
  hf_dir, reference = llama_dir
  config, params = load_model(hf_dir)
  save_converted(str(tmp_path / 'out'), config, params, source_dir=hf_dir)
  config2, params2 = load_model(str(tmp_path / 'out'))
  assert config2 == config
  np.testing.assert_allclose(_logits(config2, params2), reference, atol=TOLERANCE)
  with pytest.raises(ConversionError, match='already exists'):
    save_converted(str(tmp_path / 'out'), config, params)


def _hub_cache(tmp_path, repo_id: str, files_from: str) -> str:
  """A Hugging Face hub cache holding `files_from`'s files as repo_id's snapshot (the layout
  huggingface_hub writes: models--ORG--NAME/snapshots/REVISION and refs/main)."""
  cache = tmp_path / 'hub'
  repo = cache / ('models--' + repo_id.replace('/', '--'))
  snapshot = repo / 'snapshots' / 'abc123'
  shutil.copytree(files_from, snapshot)
  (repo / 'refs').mkdir()
  (repo / 'refs' / 'main').write_text('abc123')
  return str(cache)


def _console_script(name: str) -> str:
  return os.path.join(os.path.dirname(sys.executable), name)


def test_cli_converts_a_hub_id_to_bfloat16_from_any_directory(llama_dir, tmp_path):
  """mmspec-convert, run from another directory, finds a Hub id in the local cache offline."""
  hf_dir, reference = llama_dir
  out = tmp_path / 'bf16'
  env = {**os.environ, 'HF_HUB_CACHE': _hub_cache(tmp_path, 'tiny-org/tiny-llama', hf_dir),
         'HF_HUB_OFFLINE': '1'}
  result = subprocess.run(
      [_console_script('mmspec-convert'), '--config.hf_dir=tiny-org/tiny-llama',
       f'--config.out_dir={out}', '--config.dtype=bfloat16'], capture_output=True, text=True,
      timeout=300, cwd=tmp_path, env=env)
  assert result.returncode == 0, result.stderr
  assert 'converted' in result.stdout and '[1/' in result.stdout  # Progress is shown.
  assert os.path.isfile(out / 'mmspec_config.json') and os.path.isfile(out / 'config.json')
  config, params = load_model(str(out))
  assert config.param_dtype == 'bfloat16'
  assert all(leaf.dtype == jax.numpy.bfloat16 for leaf in jax.tree.leaves(params))
  assert np.abs(_logits(config, params) - reference).max() < 0.5  # bfloat16 rounding only.
  # An id the cache lacks, offline: named, with the cache searched.
  result = subprocess.run(
      [_console_script('mmspec-convert'), '--config.hf_dir=tiny-org/missing',
       f'--config.out_dir={tmp_path / "missing"}'], capture_output=True, text=True,
      timeout=300, cwd=tmp_path, env=env)
  assert result.returncode != 0 and 'Traceback' not in result.stderr
  assert "'tiny-org/missing' is neither a directory nor in the Hugging Face cache" in result.stderr
  assert env['HF_HUB_CACHE'] in result.stderr and 'HF_HUB_OFFLINE is set' in result.stderr


def test_cli_reports_errors_without_a_traceback(tmp_path):
  (tmp_path / 'config.json').write_text(json.dumps({'model_type': 'mistral'}))
  result = subprocess.run(
      [sys.executable, '-m', 'mmspec_jax.convert', f'--config.hf_dir={tmp_path}',
       f'--config.out_dir={tmp_path / "out"}'], capture_output=True, text=True, timeout=300)
  assert result.returncode != 0
  assert "unsupported model_type 'mistral'" in result.stderr
  assert 'Traceback' not in result.stderr


@pytest.mark.parametrize('tied', [False, True])
def test_export_round_trip_through_transformers(tied, tmp_path):
  config = presets.get('tiny_llama')
  config = type(config)(**{**config.__dict__, 'tie_word_embeddings': tied})
  params = init_params(config, jax.random.key(7))
  # The embedding starts at std 0.02; spread it so that tied logits are not all near zero.
  params = {**params, 'embed_tokens': {'embedding': params['embed_tokens']['embedding'] * 25}}
  tokenizer_dir = tmp_path / 'tokenizer'
  hf_builders.tiny_tokenizer().save_pretrained(str(tokenizer_dir))
  out = export_llama_to_hf(params, config, str(tmp_path / 'hf'), tokenizer_dir=str(tokenizer_dir))
  tokenizer = transformers.AutoTokenizer.from_pretrained(out)
  assert tokenizer('hello world').input_ids == [1, 5, 6]
  hf_model = transformers.LlamaForCausalLM.from_pretrained(out).eval()
  with torch.no_grad():
    reference = hf_model(input_ids=torch.tensor(TOKENS, dtype=torch.long)).logits.numpy()
  ours = _logits(config, params)
  assert reference.std() > 0.5
  assert hf_model.config.tie_word_embeddings == tied
  np.testing.assert_allclose(ours, reference, atol=TOLERANCE)
  # And back: the exported directory converts to the same parameters.
  _, params2 = load_model(out)
  jax.tree.map(np.testing.assert_array_equal, params2, params)


def _broken_copy(hf_dir, tmp_path, edit):
  from safetensors.torch import load_file, save_file
  tensors = load_file(os.path.join(hf_dir, 'model.safetensors'))
  edit(tensors)
  out = tmp_path / 'broken'
  out.mkdir()
  (out / 'config.json').write_text(open(os.path.join(hf_dir, 'config.json')).read())
  save_file(tensors, str(out / 'model.safetensors'))
  return str(out)


def test_missing_tensor_is_named(llama_dir, tmp_path):
  broken = _broken_copy(llama_dir[0], tmp_path,
                        lambda t: t.pop('model.layers.1.mlp.up_proj.weight'))
  with pytest.raises(ConversionError, match=r"missing tensor 'model\.layers\.1\.mlp\.up_proj"):
    load_model(broken)


def test_unexpected_shape_is_named(llama_dir, tmp_path):
  def edit(tensors):
    tensors['model.norm.weight'] = torch.ones(7)
  broken = _broken_copy(llama_dir[0], tmp_path, edit)
  with pytest.raises(ConversionError, match=r"unexpected shape for tensor 'model\.norm\.weight': "
                                            r'expected \(48,\), found \(7,\)'):
    load_model(broken)


def test_pickled_weights_refused_unless_allowed(llama_dir, tmp_path):
  from safetensors.torch import load_file
  hf_dir, reference = llama_dir
  out = tmp_path / 'pickled'
  out.mkdir()
  (out / 'config.json').write_text(open(os.path.join(hf_dir, 'config.json')).read())
  torch.save(load_file(os.path.join(hf_dir, 'model.safetensors')), out / 'pytorch_model.bin')
  with pytest.raises(ConversionError, match='pickled .*allow_pickle'):
    load_model(str(out))
  config, params = load_model(str(out), allow_pickle=True)
  np.testing.assert_allclose(_logits(config, params), reference, atol=TOLERANCE)


@pytest.mark.parametrize('config_json, message', [
    ({'model_type': 'mistral'}, "unsupported model_type 'mistral'"),
    ({'model_type': 'llama', 'rope_scaling': {'rope_type': 'dynamic', 'factor': 2.0}},
     "unsupported rope_scaling type 'dynamic'"),
    ({'model_type': 'llama', 'hidden_act': 'gelu'}, "unsupported hidden_act 'gelu'"),
])
def test_unsupported_configs_are_refused(config_json, message, tmp_path):
  (tmp_path / 'config.json').write_text(json.dumps(config_json))
  with pytest.raises(ConversionError, match=message):
    load_model(str(tmp_path))


def test_missing_directory_and_weights(tmp_path):
  with pytest.raises(ConversionError, match='does not exist'):
    load_model(str(tmp_path / 'nowhere'))
  with pytest.raises(ConversionError, match='no config.json'):
    load_model(str(tmp_path))
  hf_builders.llama_text_config().save_pretrained(str(tmp_path))
  with pytest.raises(ConversionError, match='no weights'):
    load_model(str(tmp_path))


def test_unsupported_vision_tower_is_refused(tmp_path):
  config = transformers.LlavaConfig(
      vision_config=transformers.SiglipVisionConfig(hidden_size=32, num_hidden_layers=1),
      text_config=hf_builders.llama_text_config())
  config.save_pretrained(str(tmp_path))
  with pytest.raises(ConversionError, match="unsupported vision tower model_type 'siglip"):
    load_model(str(tmp_path))


def test_llava_export_round_trip_through_transformers(tmp_path):
  config = presets.get('tiny_llava')
  params = init_params(config, jax.random.key(2))
  out = export_to_hf(params, config, str(tmp_path / 'llava_hf'))
  hf_model = transformers.LlavaForConditionalGeneration.from_pretrained(out).eval()
  rng = np.random.RandomState(0)
  size = config.vision.image_size
  tokens = np.array([[1] + [config.image_token_index] * config.num_image_tokens + [5, 9, 17]])
  images = rng.rand(1, size, size, 3).astype(np.float32)
  with torch.no_grad():
    reference = hf_model(input_ids=torch.tensor(tokens, dtype=torch.long),
                         pixel_values=torch.tensor(images.transpose(0, 3, 1, 2))).logits.numpy()
  ours = np.asarray(build(config).apply({'params': params}, tokens, images))
  assert reference.std() > 0.5
  np.testing.assert_allclose(ours, reference, atol=TOLERANCE)
  _, params2 = load_model(out)  # And back, every tensor (unused CLIP layers included).
  jax.tree.map(np.testing.assert_array_equal, params2, params)
