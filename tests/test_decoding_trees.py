"""Tree drafting and the adaptive draft length (decoding/tree.py, tree_step.py).

Greedy tree decoding is token-identical to greedy autoregressive decoding: both drafts, a ragged
batch with images, several tree shapes, with and without a confidence threshold. A chain tree is
today's chain engine, program for program; the tree step run on a chain gives the chain's tokens
and statistics. Tree attention at the model level equals extending each node's own path.
(Sampled trees: test_decoding_sampling.py.)
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import decoding_fixtures as fx
from mmspec_jax.decoding.engine import SpeculativeDecoder
from mmspec_jax.decoding.sampling import SamplingConfig
from mmspec_jax.decoding.tree import DraftTree
from mmspec_jax.models import KVCache, Layout, LlamaConfig, build, init_params
from mmspec_jax.models.layout import arrange_params

MAX_NEW_TOKENS = 24
GREEDY = SamplingConfig()


def _decoder(target_config, draft_config, gamma, tree=None, threshold=0.0):
  return SpeculativeDecoder(build(target_config), build(draft_config) if draft_config else None,
                            gamma, GREEDY, MAX_NEW_TOKENS, (-1,), draft_tree=tree,
                            confidence_threshold=threshold)


def _decode(decoder, target_params, draft_params, inputs):
  tokens, lengths, _ = inputs
  draft_length = decoder.draft_prompt_length([t[:n] for t, n in zip(tokens, lengths)],
                                             tokens.shape[1], multiple=1)
  return decoder.generate(target_params, draft_params, *inputs, jax.random.key(0),
                          draft_prompt_length=draft_length)



@pytest.fixture(scope='module')
def setting():
  target_config, target_params = fx.llava_target()
  inputs = fx.ragged_batch(target_config)
  autoregressive = _decode(_decoder(target_config, None, 0), target_params, None, inputs)
  drafts = {'language': fx.language_draft(target_config, target_params),
            'adapter': fx.adapter_draft(target_config, target_params)}
  return target_config, target_params, inputs, fx.generated_rows(autoregressive), drafts


@pytest.fixture(scope='module')
def chain(setting):
  """The language draft's chain of 3: (its decoder, its result)."""
  target_config, target_params, inputs, _, drafts = setting
  draft_config, draft_params = drafts['language']
  decoder = _decoder(target_config, draft_config, 3)
  return decoder, _decode(decoder, target_params, draft_params, inputs)


def _tau(result):
  return float((result.num_generated - 1).sum() / (result.num_target_calls - 1).sum())


@pytest.mark.parametrize('kind, branching, threshold', [
    ('language', (2, 2, 1), 0.0),
    ('language', (1, 1, 1, 1), 0.5),  # The adaptive chain.
    ('adapter', (3, 2, 2), 0.5),  # An adaptive tree.
])
def test_greedy_tree_decoding_equals_autoregressive(setting, chain, kind, branching, threshold):
  target_config, target_params, inputs, autoregressive, drafts = setting
  draft_config, draft_params = drafts[kind]
  tree = DraftTree(branching)
  result = _decode(_decoder(target_config, draft_config, tree.depth, tree, threshold),
                   target_params, draft_params, inputs)
  assert fx.generated_rows(result) == autoregressive
  steps = int((result.num_target_calls - 1).sum())
  accepted = int(result.num_accepted.sum())
  assert 0 < accepted < steps * tree.depth  # Accepts and rejects both happened.
  calls = np.asarray(result.draft_calls)
  per_step = calls / (np.asarray(result.num_target_calls) - 1)
  if threshold:  # Rows stopped early, and never drafted fewer than one call past the root.
    assert per_step.min() >= 1 and calls.sum() < steps * tree.depth
  else:
    np.testing.assert_array_equal(per_step, tree.depth)
  if kind == 'language' and not threshold:  # The tree holds its chain of 3, and accepts more.
    assert _tau(result) > _tau(chain[1])


def test_a_chain_tree_is_todays_engine(setting, chain):
  """(1, 1, 1) without a threshold compiles to the very program of gamma 3; the tree step, made
  to run on the same chain (a threshold no probability falls below), gives the same tokens and
  statistics."""
  target_config, target_params, inputs, _, drafts = setting
  draft_config, draft_params = drafts['language']
  chain_decoder, expected = chain
  as_tree = _decoder(target_config, draft_config, 3, DraftTree.chain(3))
  lower = lambda d: d.generate.lower(target_params, draft_params, *inputs,
                                     jax.random.key(0)).as_text()
  assert not as_tree.uses_tree_step and lower(as_tree) == lower(chain_decoder)
  stepped = _decoder(target_config, draft_config, 3, DraftTree.chain(3), threshold=1e-30)
  assert stepped.uses_tree_step
  result = _decode(stepped, target_params, draft_params, inputs)
  for field in ('tokens', 'num_generated', 'num_target_calls', 'accepted_by_position',
                'reached_by_position', 'draft_calls'):
    np.testing.assert_array_equal(getattr(result, field), getattr(expected, field), field)


def test_tree_shape():
  tree = DraftTree((2, 3, 1))
  assert (tree.depth, tree.num_nodes, tree.num_parents) == (3, 14, 9)
  assert tree.level_sizes == (1, 2, 6, 6) and tree.level_starts == (0, 1, 3, 9, 15)
  np.testing.assert_array_equal(tree.parents,
                                [-1, 0, 0, 1, 1, 1, 2, 2, 2, 3, 4, 5, 6, 7, 8])
  np.testing.assert_array_equal(tree.depths, [0, 1, 1] + [2] * 6 + [3] * 6)
  assert tree.ancestors[14].nonzero()[0].tolist() == [0, 2, 8, 14]
  assert tree.ancestors.sum() == 15 + 14 + 12 + 6  # Self, root, depth 1 and depth 2 ancestors.
  np.testing.assert_array_equal(tree.children(2, jnp.array([1, 2])), [[3, 4, 5], [6, 7, 8]])
  attention = tree.draft_attention(2)  # Depth 2's six nodes, at window slots 2 .. 7.
  np.testing.assert_array_equal(attention.slots, np.arange(2, 8))
  assert attention.mask.shape == (6, 8) and attention.mask[0].nonzero()[0].tolist() == [0, 2]
  # Node 3's path past the draft's length (which counts the root): node 1, then itself.
  assert attention.path.tolist()[0] == [0, 2, 2]
  verification = tree.verification_attention()  # Node 14: the root, nodes 2 and 8, itself.
  assert verification.path.tolist()[14] == [0, 2, 8, 14] and verification.path.shape == (15, 4)
  assert DraftTree.parse('2,3,1') == tree == DraftTree.parse('2x3x1') and str(tree) == '2x3x1'
  assert DraftTree.chain(2).is_chain and not tree.is_chain


@pytest.mark.parametrize('bad, message', [('', 'at least one depth'), ('2,0', 'factor >= 1'),
                                          ('two', 'written as branching factors')])
def test_bad_trees_are_refused(bad, message):
  with pytest.raises(ValueError, match=message):
    DraftTree.parse(bad)


def test_engine_refuses_inconsistent_settings(setting):
  target_config, _, _, _, drafts = setting
  draft_config, _ = drafts['language']
  with pytest.raises(ValueError, match='has depth 2, but num_draft_tokens is 3'):
    _decoder(target_config, draft_config, 3, DraftTree((2, 2)))
  with pytest.raises(ValueError, match=r'confidence_threshold must be in \[0, 1\)'):
    _decoder(target_config, draft_config, 3, threshold=1.0)
  # A threshold without a tree: the adaptive chain of gamma.
  adaptive = _decoder(target_config, draft_config, 3, threshold=0.5)
  assert adaptive.draft_tree == DraftTree.chain(3) and adaptive.uses_tree_step


# (The unrolled layout's tree calls run in sharded_decode_check.py; the heads-first cache's and
# the fused kernels' tree attention against blockwise, in test_pallas_attention.py.)
def test_tree_attention_equals_each_path_as_a_sequence():
  """Each node's logits from one tree call over a cached prompt equal those of a full forward
  of its row's prompt followed by the node's own path (the target's call, and the draft's
  depth-by-depth calls); after the path to a leaf is moved into place, the cache continues as
  if that path had been fed as a plain sequence."""
  config = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_layers=2,
                       num_heads=4, num_kv_heads=2, head_dim=8, max_position_embeddings=128,
                       eos_token_id=None, bos_token_id=None)
  layout = Layout(attention_block_size=4)  # Blocks of the cache, and one of them partly live.
  model = build(config, layout)
  params = arrange_params(init_params(config, jax.random.key(0)), layout, config.num_kv_heads)
  apply = jax.jit(functools.partial(model.apply, {'params': params}), static_argnames='method')
  tree = DraftTree((2, 3, 1))
  rng = np.random.RandomState(0)
  lengths = [7, 5]
  prompt = rng.randint(0, 50, (2, 7)).astype(np.int32)
  _, cache = apply(prompt, np.array(lengths, np.int32), KVCache.init(config, 2, 64, layout=layout),
                   method='prefill')
  nodes = rng.randint(0, 50, (2, tree.num_nodes + 1)).astype(np.int32)  # [root, N nodes]
  logits, written = apply(nodes, cache, tree=tree.verification_attention(), method='extend')
  np.testing.assert_array_equal(written.lengths, lengths)  # A tree call does not advance.

  def path_to(node):
    path = [node]
    while path[-1] > 0:
      path.append(int(tree.parents[path[-1]]))
    return path[::-1]  # The root .. the node.
  # Every (row, node) as one right-padded sequence: the row's prompt, then the node's path.
  sequences = np.zeros((2 * (tree.num_nodes + 1), 7 + tree.depth + 1), np.int32)
  for row in range(2):
    for node in range(tree.num_nodes + 1):
      path = nodes[row, path_to(node)]
      sequences[row * (tree.num_nodes + 1) + node, :lengths[row] + len(path)] = np.concatenate(
          [prompt[row, :lengths[row]], path])
  full = np.asarray(apply(sequences)).reshape(2, tree.num_nodes + 1, -1, config.vocab_size)
  for row in range(2):
    last = [lengths[row] + tree.depths[node] for node in range(tree.num_nodes + 1)]
    np.testing.assert_allclose(logits[row], full[row, np.arange(len(last)), last], atol=2e-5)

  # The draft: the root in the prefix, then depth by depth.
  _, draft_cache = apply(nodes[:, :1], cache, method='extend')
  for depth in range(1, tree.depth):
    start, end = tree.level_starts[depth], tree.level_starts[depth + 1]
    level, draft_cache = apply(nodes[:, start:end], draft_cache,
                               tree=tree.draft_attention(depth), method='extend')
    np.testing.assert_allclose(level, logits[:, start:end], atol=2e-5)

  # Moving the path to the last leaf into place; the next tokens see it as a plain prefix.
  path = np.tile(path_to(tree.num_nodes)[1:], (2, 1))  # [B, D]
  moved = written.move_slots(written.lengths + 1, jnp.asarray(path - 1))
  moved = moved.with_lengths(written.lengths + 1 + tree.depth)
  following = rng.randint(0, 50, (2, 2)).astype(np.int32)
  after_move, _ = apply(following, moved, method='extend')
  as_chain, _ = apply(np.concatenate([nodes[:, :1], np.take_along_axis(nodes, path, 1),
                                      following], axis=1), cache, method='extend')
  np.testing.assert_allclose(after_move, as_chain[:, -2:], atol=2e-5)
