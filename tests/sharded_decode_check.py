"""Run in a subprocess with 8 fake CPU devices: speculative decoding on several (data, tensor)
meshes against one device, and a checkpoint saved on one mesh restored onto another.
Prints one JSON line of results."""

import json
import os
import sys
import tempfile

os.environ['XLA_FLAGS'] = ('--xla_force_host_platform_device_count=8 '
                           + os.environ.get('MMSPEC_TEST_XLA_FLAGS', ''))

import jax  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
import decoding_fixtures as fx  # noqa: E402
from mmspec_jax import sharding  # noqa: E402
from mmspec_jax.sharding import DRAFT_RULES  # noqa: E402
from mmspec_jax.convert.loading import load_model, save_converted  # noqa: E402
from mmspec_jax.decoding import placement  # noqa: E402
from mmspec_jax.decoding.engine import SpeculativeDecoder  # noqa: E402
from mmspec_jax.decoding.sampling import SamplingConfig  # noqa: E402
from mmspec_jax.decoding.tree import DraftTree, DynamicTree  # noqa: E402
from mmspec_jax.models import Layout, build  # noqa: E402

MESHES = [(8, 1), (4, 2), (2, 4), (1, 8)]
LAYOUT = Layout(layers='unrolled', fused_projections=True)


def batch_of_eight(config):
  """Eight ragged rows, image and text, right-padded with <pad> (past the draft's ids)."""
  rows, images = [], []
  for seed in range(3):
    seed_rows, seed_images = fx.ragged_rows(config, seed)
    rows += seed_rows
    images.append(seed_images)
  tokens, lengths = fx.pad_rows(rows[:8])
  return tokens, lengths, np.concatenate(images)[:8]


def decode(mesh, decoder, target_config, target_params, draft_config, draft_params, inputs):
  target_params = jax.device_put(target_params, placement.param_shardings(target_config, mesh))
  draft_params = jax.device_put(draft_params, placement.param_shardings(draft_config, mesh,
                                                                        DRAFT_RULES))
  q_proj = target_params['language_model']['layers']['self_attn']['q_proj']['kernel']
  # The layout decode.py uses off TPU: unrolled layers and fused projections, placed on their
  # own logical shardings (q/k/v by kv head over tensor, when the kv heads divide it).
  target_params = placement.decoding_params(target_config, target_params, LAYOUT, mesh)
  draft_params = placement.decoding_params(draft_config, draft_params, LAYOUT, mesh, DRAFT_RULES)
  # The draft runs replicated (its own rules): no weight of it is split over any mesh axis.
  assert all(leaf.sharding.is_fully_replicated for leaf in jax.tree.leaves(draft_params))
  qkv_proj = target_params['language_model']['layers_0']['self_attn']['qkv_proj']['kernel']
  wanted = placement.param_shardings(target_config, mesh, layout=LAYOUT)
  wanted = wanted['language_model']['layers_0']['self_attn']['qkv_proj']['kernel']
  assert qkv_proj.sharding.spec == wanted.spec, (qkv_proj.sharding.spec, wanted.spec)
  kv_heads_divide = target_config.text.num_kv_heads % mesh.shape['tensor'] == 0
  assert (qkv_proj.sharding.spec[1] == 'tensor') == kv_heads_divide, qkv_proj.sharding.spec
  with placement.mesh_context(mesh):
    tokens, lengths, _ = inputs
    draft_length = decoder.draft_prompt_length([t[:n] for t, n in zip(tokens, lengths)],
                                               tokens.shape[1], multiple=1)
    result = decoder.generate(target_params, draft_params, *placement.place_inputs(*inputs, mesh),
                              jax.random.key(0), draft_prompt_length=draft_length)
  return jax.device_get(result), str(q_proj.sharding.spec)


def continuous_on_a_mesh(target_config, target_params, draft_config, draft_params):
  """Continuous batching of text requests, greedy and sampled sharing the batch, over 3 slots
  (a number the data axis of 4 does not divide) on a 4x2 mesh, against each request decoded
  alone on one device."""
  from mmspec_jax.decoding import inputs  # pylint: disable=import-outside-toplevel
  from mmspec_jax.decoding.session import DecodeSession  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  budgets = (9, 3, 12, 5, 7, 12)
  requests = [inputs.Request(f'r{i}', i, tuple(int(t) for t in rng.integers(
      1, fx.BASE_VOCAB, size=4 + 3 * i)), None,
      sampling=SamplingConfig(temperature=1.0 if i % 2 else 0.0)) for i in range(6)]
  layout = {'layers': 'unrolled', 'fused_projections': True}

  def decode_all(mesh, num_slots, one_by_one):
    session = DecodeSession.from_params(None, (target_config, target_params),
                                        {'draft': (draft_config, draft_params)},
                                        layout_config=layout, mesh=mesh)
    decoder = session.decoder('draft', num_draft_tokens=3, sampling=SamplingConfig(),
                              max_new_tokens=16, requests=requests, eos_token_ids=())
    scheduler = session.scheduler(decoder, num_slots=num_slots, capacity=64, chunk_steps=2,
                                  prefill_width=2, key=jax.random.key(1))
    batches = [[pair] for pair in zip(requests, budgets)] if one_by_one else [
        list(zip(requests, budgets))]
    tokens = {}
    for work in batches:
      tokens.update({e.finished.request.id: e.finished.token_ids for e in scheduler.run(work)
                     if e.finished is not None})
    return tokens

  alone = decode_all(sharding.make_mesh({'data': 1}, jax.devices()[:1]), 1, True)
  together = decode_all(sharding.make_mesh({'data': 4, 'tensor': 2}), 3, False)
  return {'tokens_equal': alone == together,
          'lengths': [len(alone[r.id]) for r in requests] == list(budgets)}


def main():
  target_config, target_params = fx.llava_target()
  draft_config, draft_params = fx.language_draft(target_config, target_params)
  target_params = jax.tree.map(np.asarray, target_params)
  draft_params = jax.tree.map(np.asarray, draft_params)
  decoder = SpeculativeDecoder(build(target_config, LAYOUT), build(draft_config, LAYOUT), 3,
                               SamplingConfig(), 16, (-1,), draft_rules=DRAFT_RULES)
  inputs = batch_of_eight(target_config)
  single = sharding.make_mesh({'data': 1}, jax.devices()[:1])
  reference, _ = decode(single, decoder, target_config, target_params, draft_config,
                        draft_params, inputs)
  results = {'accepted': int(reference.accepted_by_position.sum())}
  for data, tensor in MESHES:
    mesh = sharding.make_mesh({'data': data, 'tensor': tensor})
    result, spec = decode(mesh, decoder, target_config, target_params, draft_config,
                          draft_params, inputs)
    results[f'{data}x{tensor}'] = {
        'tokens_equal': bool((result.tokens == reference.tokens).all()),
        'stats_equal': bool((result.num_generated == reference.num_generated).all()
                            and (result.num_target_calls == reference.num_target_calls).all()
                            and (result.accepted_by_position
                                 == reference.accepted_by_position).all()
                            and (result.reached_by_position
                                 == reference.reached_by_position).all()),
        'q_proj_spec': spec}

  def against_the_chain(draft, tree=None):
    """Greedy decoding with `draft` (and `tree`) on a (4, 2) mesh against the chain on one
    device: whether the tokens are equal, and the drafts accepted."""
    config, params = draft
    decoder = SpeculativeDecoder(build(target_config, LAYOUT), build(config, LAYOUT), 3,
                                 SamplingConfig(), 16, (-1,), draft_rules=DRAFT_RULES,
                                 draft_tree=tree)
    result, _ = decode(sharding.make_mesh({'data': 4, 'tensor': 2}), decoder, target_config,
                       target_params, config, jax.tree.map(np.asarray, params), inputs)
    return {'tokens_equal': bool((result.tokens == reference.tokens).all()
                                 and (result.num_generated == reference.num_generated).all()),
            'accepted': int(result.accepted_by_position.sum())}

  # A tree decoder on a mesh: the same greedy tokens as the chain on one device.
  results['tree_4x2'] = against_the_chain((draft_config, draft_params), DraftTree((2, 2, 1)))
  # The feature draft on a mesh: its pending target features [B, G + 1, K, D] ride in the
  # state with the batch split over data; greedy, so the chain's tokens on one device.
  feature = fx.feature_draft(target_config, target_params)
  results['feature_4x2'] = against_the_chain(feature)
  # A dynamic tree on a mesh: each row's own tree attention (a batch axis in its pattern).
  results['dynamic_4x2'] = against_the_chain(feature, DynamicTree(3, 2, 5))

  results['continuous_4x2'] = continuous_on_a_mesh(target_config, target_params, draft_config,
                                                   draft_params)

  # A converted checkpoint saved from one mesh restores onto another.
  save_mesh = sharding.make_mesh({'data': 4, 'tensor': 2})
  restore_mesh = sharding.make_mesh({'data': 2, 'tensor': 4})
  with tempfile.TemporaryDirectory() as directory:
    saved = jax.device_put(target_params, placement.param_shardings(target_config, save_mesh))
    save_converted(os.path.join(directory, 'ckpt'), target_config, saved)
    restored_shardings = placement.param_shardings(target_config, restore_mesh)
    _, restored = load_model(os.path.join(directory, 'ckpt'), shardings=restored_shardings)
    equal = jax.tree.map(lambda a, b: bool((np.asarray(a) == b).all()), restored, target_params)
    placed = jax.tree.map(lambda a, s: a.sharding == s, restored, restored_shardings)
    results['restore_equal'] = all(jax.tree.leaves(equal))
    results['restore_on_target_shardings'] = all(jax.tree.leaves(placed))
  print(json.dumps(results))


if __name__ == '__main__':
  main()
