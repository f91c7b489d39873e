"""Dynamic draft trees (EAGLE-2; decoding/dynamic_tree.py).

The verified set is a tree in candidate order, the N best by score, whatever the scores; greedy
dynamic trees are token-identical to greedy autoregressive decoding with all three drafts on
ragged image and text rows; sampled dynamic trees follow the target's distribution exactly
(test_decoding_sampling's chi-square test), and the chi-square test catches EAGLE-2's own score
(a node chosen by its own draft probability) as biased. In continuous batching (alone against
among others, greedy and sampled rows sharing a batch): test_continuous_batching.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import decoding_fixtures as fx
from test_decoding_sampling import (  # noqa: F401 (exact, models: fixtures)
    CONFIG, DRAFT_CONFIG, P_VALUE_FLOOR, SAMPLINGS, chi_square_p_value, exact, models,
    sampled_joint)
from mmspec_jax.decoding import dynamic_tree
from mmspec_jax.decoding.engine import SpeculativeDecoder
from mmspec_jax.decoding.sampling import SamplingConfig
from mmspec_jax.decoding.tree import DraftTree, DynamicTree, parse_shape, parse_tree
from mmspec_jax.models import build

MAX_NEW_TOKENS = 24
NO_EOS = (-1,)



def test_dynamic_tree_settings():
  tree = parse_tree('dynamic:6,4,24')
  assert tree == DynamicTree(6, 4, 24) and str(tree) == 'dynamic:6,4,24'
  assert tree.num_candidates == 4 + 5 * 16 and tree.window_nodes == 24
  assert DynamicTree(6, 8, 10).window_nodes == 40  # The draft's expanded nodes.
  assert tree.draft_call_widths == (4,) * 5 and DraftTree((3, 2, 1)).draft_call_widths == (3, 6)
  assert parse_shape('dynamic:3,2,5') == (DynamicTree(3, 2, 5), 0.0)
  assert parse_tree('2,2') == DraftTree((2, 2))
  with pytest.raises(ValueError, match=r'num_nodes 7 is more than the 6 candidates'):
    DynamicTree(2, 2, 7)
  with pytest.raises(ValueError, match='written "dynamic:DEPTH,TOP_K,NODES"'):
    parse_tree('dynamic:6,4')
  with pytest.raises(ValueError, match='a dynamic tree takes no confidence threshold'):
    parse_shape('dynamic:3,2,5@0.3')
  target_config, _ = fx.llava_target()
  with pytest.raises(ValueError, match='a dynamic draft tree takes no confidence_threshold'):
    SpeculativeDecoder(build(target_config), build(target_config.text), 3, SamplingConfig(), 8,
                       NO_EOS, draft_tree=DynamicTree(3, 2, 5), confidence_threshold=0.2)


def test_the_verified_set_is_the_best_n_in_candidate_order():
  """Random scores on a depth-3, top-2 candidate tree (2 + 4 + 4 candidates) whose scores fall
  from parent to child: the verified nodes are the N best, parents before children, each
  node's children consecutive in draw order; paths and attention follow the parents."""
  tree = DynamicTree(3, 2, 6)
  rng = np.random.default_rng(0)
  batch = 16
  # Depth 1: the root's children 0, 1; depth 2: candidates 2..5, children of expanded depth-1
  # nodes (both); depth 3: candidates 6..9, children of two expanded depth-2 candidates per row.
  expanded2 = np.stack([rng.choice(np.arange(2, 6), 2, replace=False) for _ in range(batch)])
  parents = np.concatenate([np.full((batch, 2), -1), np.tile([0, 0, 1, 1], (batch, 1)),
                            np.repeat(expanded2, 2, axis=1)], axis=1)
  scores = np.zeros((batch, 10))
  for c in range(10):  # Each below its parent's.
    base = np.where(parents[:, c] < 0, 0.0, scores[np.arange(batch), np.maximum(parents[:, c], 0)])
    scores[:, c] = base - rng.exponential(1.0, batch)
  tokens = np.arange(10)[None].repeat(batch, 0) + 100
  depths = np.array([1] * 2 + [2] * 4 + [3] * 4)
  expanded = [jnp.tile(jnp.array([[0, 1]]), (batch, 1)), jnp.asarray(expanded2)]
  row_tree, node_tokens, valid, expansion = dynamic_tree._rerank(  # pylint: disable=protected-access
      tree, jnp.asarray(tokens), jnp.asarray(parents, jnp.int32), jnp.asarray(scores),
      jnp.ones((batch, 10), bool), jnp.asarray(depths), expanded)
  for b in range(batch):
    chosen = sorted(np.argsort(-scores[b], kind='stable')[:6])
    assert (np.asarray(node_tokens[b]) - 100).tolist() == chosen
    verified = [-1] + chosen
    expect_parents = [-1] + [0 if parents[b, c] < 0 else verified.index(parents[b, c])
                             for c in chosen]
    assert np.asarray(row_tree.parents[b]).tolist() == expect_parents
    for node in range(1, 7):  # The path walks up the parents.
      path, up = [], node
      while up > 0:
        path.append(up)
        up = expect_parents[up]
      depth = len(path)
      assert np.asarray(row_tree.path[b, node, :depth + 1]).tolist() == [0] + path[::-1]
      assert row_tree.depths[b, node] == depth
    for node in range(7):
      children = [i for i in range(7) if expect_parents[i] == node]
      if children:  # Consecutive, so acceptance can walk them from the first.
        assert children == list(range(children[0], children[0] + len(children)))
      got, exists = row_tree.children_of(1, jnp.full((batch,), node))
      assert np.asarray(got[b])[np.asarray(exists[b])].tolist() == children
    # An expanded node's draft slot and distribution index; 0 / -1 for the others.
    fed = [0, 1] + expanded2[b].tolist()
    for i, c in enumerate(chosen, 1):
      slot = fed.index(c) if c in fed else -1
      assert row_tree.draft_slots[b, i] == slot and expansion[b, i] == slot + 1
  assert np.asarray(valid).all()
  mask = row_tree.verification_attention().mask  # [B, 7, 7]: ancestors and itself
  assert mask.shape == (batch, 7, 7) and np.asarray(mask[:, :, 0]).all()


@pytest.fixture(scope='module')
def setting():
  target_config, target_params = fx.llava_target()
  batch = fx.ragged_batch(target_config)
  autoregressive = SpeculativeDecoder(build(target_config), None, 0, SamplingConfig(),
                                      MAX_NEW_TOKENS, NO_EOS).generate(
                                          target_params, None, *batch, jax.random.key(0))
  drafts = {'language': fx.language_draft(target_config, target_params),
            'adapter': fx.adapter_draft(target_config, target_params),
            'feature': fx.feature_draft(target_config, target_params)}
  return target_config, target_params, batch, fx.generated_rows(autoregressive), drafts


@pytest.mark.parametrize('kind, tree', [
    ('feature', DynamicTree(4, 3, 10)),
    ('language', DynamicTree(3, 3, 8)),
    ('adapter', DynamicTree(3, 2, 5)),
])
def test_greedy_dynamic_trees_equal_autoregressive(setting, kind, tree):
  target_config, target_params, batch, autoregressive, drafts = setting
  draft_config, draft_params = drafts[kind]
  decoder = SpeculativeDecoder(build(target_config), build(draft_config), tree.depth,
                               SamplingConfig(), MAX_NEW_TOKENS, NO_EOS, draft_tree=tree)
  tokens, lengths, _ = batch
  draft_length = decoder.draft_prompt_length([t[:n] for t, n in zip(tokens, lengths)],
                                             tokens.shape[1], multiple=1)
  result = decoder.generate(target_params, draft_params, *batch, jax.random.key(0),
                            draft_prompt_length=draft_length)
  assert fx.generated_rows(result) == autoregressive
  steps = int((result.num_target_calls - 1).sum())
  accepted = int(result.num_accepted.sum())
  assert 0 < accepted < steps * tree.depth  # Accepts and rejects both happened.


DYNAMIC_CASES = {  # A depth-3 tree over the three sampled tokens.
    'temperature': DynamicTree(3, 2, 4),
    'top_p': DynamicTree(3, 3, 7),
}


def _sampled_dynamic_joint(models, sampling, tree, draft=None):
  target_params, draft_params = models
  draft_config, draft_params = draft or (DRAFT_CONFIG, draft_params)
  decoder = SpeculativeDecoder(build(CONFIG), build(draft_config), tree.depth, sampling,
                               max_new_tokens=3, eos_token_ids=NO_EOS, draft_tree=tree)
  return sampled_joint(target_params, draft_params, sampling, decoder)


@pytest.mark.parametrize('case', list(DYNAMIC_CASES))
def test_sampled_dynamic_trees_follow_the_target(models, exact, case):
  sampling = SAMPLINGS[case]
  counts, result = _sampled_dynamic_joint(models, sampling, DYNAMIC_CASES[case])
  p_value = chi_square_p_value(counts, exact(sampling))
  accepted = np.asarray(result.accepted_by_position)
  print(f'{case}: p = {p_value:.3f}, accepted at depth 1 {accepted[:, 0].mean():.2f}')
  assert p_value > P_VALUE_FLOOR
  assert 0.1 < accepted[:, 0].mean() < 0.95


def test_a_sampled_dynamic_feature_tree_follows_the_target(models, exact):
  sampling = SAMPLINGS['temperature']
  draft = fx.shifted_feature_draft(DRAFT_CONFIG, models[1], (0,))
  counts, result = _sampled_dynamic_joint(models, sampling, DynamicTree(3, 2, 5), draft)
  assert chi_square_p_value(counts, exact(sampling)) > P_VALUE_FLOOR
  assert 0.1 < np.asarray(result.accepted_by_position)[:, 0].mean() < 0.95


def _own_probability_scores(parent_value, child_q, rows, greedy_engine):
  """EAGLE-2's score for every row: a node chosen by its own draft probability."""
  value = parent_value[:, :, None] + jnp.log(child_q)
  return value, value


def test_choosing_a_sampled_node_by_its_own_probability_is_caught(models, exact, monkeypatch):
  """Verifying the children of highest draft probability (EAGLE-2's rule) favours likely drafts
  over what recursive rejection sampling assumes (draws in order): the test sees the bias."""
  monkeypatch.setattr(dynamic_tree, '_scores', _own_probability_scores)
  sampling = SAMPLINGS['temperature']
  counts, _ = _sampled_dynamic_joint(models, sampling, DynamicTree(3, 3, 4))
  p_value = chi_square_p_value(counts, exact(sampling))
  jax.clear_caches()  # Nothing traced with the planted bug may outlive this test.
  assert p_value < P_VALUE_FLOOR, p_value
