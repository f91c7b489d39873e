"""Batched speculative decoding as one jitted `lax.while_loop`.

Axis legend: B batch, T prompt length, G draft tokens per step (gamma), V target vocabulary,
N output capacity (max_new_tokens + G + 1).

Each step: the draft proposes G tokens autoregressively from its own cache; the target scores
all G + 1 positions in one `extend`; every row accepts its own count n; both caches roll back, per
row, to the accepted length (arithmetic on `lengths`). No host round trip until all rows finish.

Cache invariant between steps, for a row whose context is c_0 .. c_{m-1}:
  the target cache holds c_0 .. c_{m-2}: `last_token` = c_{m-1} is fed at the next verification;
  the draft cache holds at least c_0 .. c_{m-3} and its length says exactly that: the next draft
  call feeds [c_{m-2}, c_{m-1}] = [previous_token, last_token]. Re-feeding c_{m-2} rewrites an
  identical entry when the draft already had it, and supplies it when all G drafts were accepted
  (the last draft is never fed to the draft). So every draft call is fed the same way.

With `num_draft_tokens == 0` and no draft the same loop is plain autoregressive decoding.

A feature draft (EAGLE-3 style) reads the target's layer outputs: its cache invariant, and the
pending positions the verification hands it, are decoding/feature_step.py's.

With a `draft_tree` (decoding/tree.py) a step drafts a tree of candidates and verifies it in one
target pass (decoding/tree_step.py); G is then the tree's depth, and the cache invariant holds as
above once the accepted path is moved into place. A chain tree without a confidence threshold
runs the chain step below, unchanged.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from mmspec_jax.decoding import acceptance
from mmspec_jax.decoding import sampling as sampling_lib
from mmspec_jax.decoding import dynamic_tree, feature_step, tree_step
from mmspec_jax.decoding.tree import DraftTree, DynamicTree
from mmspec_jax.decoding.sampling import (RowSampling, SamplingConfig, pad_vocabulary,
                                          probabilities, row_probabilities, sample, sample_rows)
from mmspec_jax.models import (AdapterDraft, AdapterDraftConfig, FeatureDraft, FeatureDraftConfig,
                               KVCache, Llava, LlavaConfig, text_config)


@flax.struct.dataclass
class DecodeState:
  step: jax.Array  # int32[]
  rng: jax.Array  # key[B]: each row's own stream, folded with the step
  tokens: jax.Array  # int32[B, N]: new tokens of each row
  num_generated: jax.Array  # int32[B]
  done: jax.Array  # bool[B]
  previous_token: jax.Array  # int32[B]: c_{m-2}, re-fed to the draft
  last_token: jax.Array  # int32[B]: c_{m-1}, in neither cache yet
  target_cache: KVCache
  draft_cache: KVCache | None
  num_target_calls: jax.Array  # int32[B], the prefill included
  accepted_by_position: jax.Array  # int32[B, G]: steps in which draft position i was accepted
  reached_by_position: jax.Array  # int32[B, G]: steps in which draft position i was verified
  draft_calls: jax.Array  # int32[B]: draft calls made for the row (the prefill excluded)
  max_new_tokens: jax.Array  # int32[B]: each row's own budget (<= the engine's max_new_tokens)
  # Each row's own sampling settings (an engine with per_request_sampling), else None.
  row_sampling: RowSampling | None = None
  # A feature draft's pending positions (decoding/feature_step.py), else None: the target's
  # features there [B, G + 1, K, Dt], the token after each int32[B, G + 1], how many int32[B].
  pending_features: jax.Array | None = None
  pending_tokens: jax.Array | None = None
  pending_count: jax.Array | None = None


@flax.struct.dataclass
class DecodeResult:
  tokens: jax.Array  # int32[B, max_new_tokens]; entries past num_generated are 0
  num_generated: jax.Array  # int32[B]
  num_target_calls: jax.Array  # int32[B]: 1 prefill + verification steps
  # Steps in which draft position i was accepted (and kept), and in which it counted at all:
  # every draft before it accepted, and the row still wanting a token there (statistics.py).
  accepted_by_position: jax.Array  # int32[B, G]
  reached_by_position: jax.Array  # int32[B, G]
  # Draft calls made while the row was drafting (steps x gamma for a chain; fewer with a
  # confidence threshold): the draft's share of the cost (statistics.memory_bound_speedup).
  draft_calls: jax.Array  # int32[B]

  @property
  def num_accepted(self) -> jax.Array:
    """int32[B]: draft tokens accepted in all."""
    return self.accepted_by_position.sum(axis=1)


def _draft_token(rng: jax.Array, draft_logits: jax.Array, sampling: SamplingConfig,
                 vocab_size: int):
  """A draft token and the exact distribution q it was drawn from (padded to the target's V)."""
  return sample(rng, pad_vocabulary(draft_logits, vocab_size), sampling)


@dataclasses.dataclass(frozen=True)
class SpeculativeDecoder:
  """Static description of a decoding run; `generate` is its jitted program."""
  target: nn.Module  # Llava or Llama
  draft: nn.Module | None  # Llama (language-only), AdapterDraft, FeatureDraft, or None (AR)
  num_draft_tokens: int
  sampling: SamplingConfig
  max_new_tokens: int
  eos_token_ids: tuple[int, ...]
  # Logical-axis rules the draft runs under (sharding.DRAFT_RULES: replicated weights, batch over
  # the data axes), so its few heads pay no all-reduces; None: the ambient rules, as the target.
  draft_rules: tuple | None = None
  # A tree of candidates (its depth must be num_draft_tokens), static or dynamic (EAGLE-2);
  # None: a chain of gamma tokens.
  draft_tree: DraftTree | DynamicTree | None = None
  # Adaptive draft length: a row stops drafting when the draft's largest next-token probability
  # falls below this (0: never).
  confidence_threshold: float = 0.0
  # Each row samples under its own settings (DecodeState.row_sampling, set at prefill; greedy
  # and sampled rows in one batch); `sampling` is then the default of rows given none.
  per_request_sampling: bool = False

  def __post_init__(self):
    if self.draft is None and self.num_draft_tokens != 0:
      raise ValueError('num_draft_tokens must be 0 without a draft model')
    if self.draft is not None and self.num_draft_tokens < 1:
      raise ValueError(f'num_draft_tokens (gamma) must be >= 1, got {self.num_draft_tokens}')
    if self.draft_tree is not None and self.draft_tree.depth != self.num_draft_tokens:
      raise ValueError(f'draft_tree {self.draft_tree} has depth {self.draft_tree.depth}, but '
                       f'num_draft_tokens is {self.num_draft_tokens}: they must be equal')
    if not 0 <= self.confidence_threshold < 1:
      raise ValueError(f'confidence_threshold must be in [0, 1) (0: a fixed draft length), got '
                       f'{self.confidence_threshold}')
    if self.confidence_threshold > 0 and self.draft is None:
      raise ValueError('confidence_threshold needs a draft model')
    if self.confidence_threshold > 0 and isinstance(self.draft_tree, DynamicTree):
      raise ValueError('a dynamic draft tree takes no confidence_threshold: it already drafts '
                       'by the draft\'s confidence')
    if self.confidence_threshold > 0 and self.draft_tree is None:
      # An adaptive chain runs the tree step on the chain of gamma.
      object.__setattr__(self, 'draft_tree', DraftTree.chain(self.num_draft_tokens))
    if self.max_new_tokens < 1:
      raise ValueError(f'max_new_tokens must be >= 1, got {self.max_new_tokens}')
    if self.reads_features:
      self.draft.config.check_target(text_config(self.target.config))
    if self.draft is not None:
      draft_vocab = text_config(self.draft.config).vocab_size
      if draft_vocab > self.vocab_size:
        raise ValueError(f'the draft vocabulary ({draft_vocab}) is larger than the target\'s '
                         f'({self.vocab_size})')

  @property
  def reads_features(self) -> bool:
    """Whether the draft reads the target's layer outputs (decoding/feature_step.py)."""
    return isinstance(self.draft, FeatureDraft)

  @property
  def uses_tree_step(self) -> bool:
    """Whether steps run decoding/tree_step.py: a branching tree, or any adaptive length."""
    return self.draft is not None and (self.confidence_threshold > 0 or (
        self.draft_tree is not None and not self.draft_tree.is_chain))

  @property
  def greedy(self) -> bool:
    """Whether every row decodes greedily (a program without sampling)."""
    return self.sampling.greedy and not self.per_request_sampling

  def probabilities(self, logits: jax.Array, rows: RowSampling | None) -> jax.Array:
    """float32[B, ..., V]: the distributions tokens are drawn from, under the engine's setting
    or each row's own (`rows`)."""
    return probabilities(logits, self.sampling) if rows is None else row_probabilities(logits,
                                                                                       rows)

  def sample(self, rng: jax.Array, logits: jax.Array, rows: RowSampling | None):
    """(int32[B, ...] tokens, float32[B, ..., V] their distributions); rng key[B]."""
    return sample(rng, logits, self.sampling) if rows is None else sample_rows(rng, logits, rows)

  def draft_token(self, rng: jax.Array, draft_logits: jax.Array, rows: RowSampling | None):
    """_draft_token under the engine's setting or each row's own (`rows`)."""
    if rows is None:
      return _draft_token(rng, draft_logits, self.sampling, self.vocab_size)
    return sample_rows(rng, pad_vocabulary(draft_logits, self.vocab_size), rows)

  @property
  def num_draft_nodes(self) -> int:
    """Cache slots past a row's length that a step writes: gamma for a chain, the tree's nodes
    for a static tree (a dynamic tree's draft may write more: DynamicTree.window_nodes)."""
    return self.draft_tree.window_nodes if self.draft_tree is not None else self.num_draft_tokens

  @property
  def vocab_size(self) -> int:
    return text_config(self.target.config).vocab_size

  @property
  def image_token_index(self) -> int | None:
    return self.target.config.image_token_index if isinstance(self.target, Llava) else None

  @functools.cached_property
  def generate(self):
    """jitted (target_params, draft_params, tokens int32[B, T], lengths int32[B],
    images float32[B, H, W, 3] | None, rng, draft_prompt_length=None) -> DecodeResult.

    draft_prompt_length (static): the draft's prompt width, from `draft_prompt_length(prompts,
    T)`; its cache holds that many positions plus the new tokens' (default T).

    rng: a key per row (key[B]), or one key (row b then gets fold_in(rng, b)). A row's sampled
    tokens depend only on its key and its prompt, not on the other rows, the batch size or the
    padded prompt length: every draw of row b comes from row b's key.
    """
    return jax.jit(self._generate, static_argnames=('draft_prompt_length',))

  def draft_prompt_length(self, prompts, length: int, multiple: int = 64) -> int | None:
    """The static `draft_prompt_length` for a batch of prompts (token ids, placeholders
    included) padded to `length`: the language-only draft of a LLaVA target reads the text alone,
    so its prompt and cache need no room for the image slots (576 per image at 7B). Rounded up to
    `multiple` so that few programs are compiled. None (the prompt length) for other drafts."""
    if self.draft is None or self.image_token_index is None or isinstance(
        self.draft, (AdapterDraft, FeatureDraft)):
      return None
    text = max(sum(1 for i in ids if i != self.image_token_index) for ids in prompts)
    return min(-(-text // multiple) * multiple, length)

  def _draft_rules(self):
    if self.draft_rules is None:
      return contextlib.nullcontext()
    return nn.logical_axis_rules(self.draft_rules)

  # --- prefill ---------------------------------------------------------------------------------

  def _prefill_target(self, params, tokens, lengths, images, cache_length):
    """(last logits, cache, vision features or None, the feature draft's target features
    [B, T, K, Dt] or None)."""
    cache = KVCache.init(text_config(self.target.config), tokens.shape[0], cache_length,
                         layout=self.target.layout)
    variables = {'params': params}
    method, extra = 'prefill', ()
    if self.reads_features:
      method, extra = 'prefill_with_features', (self.draft.config.feature_layers,)
    if images is None or not isinstance(self.target, Llava):
      out = self.target.apply(variables, tokens, lengths, cache, *extra, method=method)
      return out[:2] + (None, out[2] if extra else None)
    vision_features = self.target.apply(variables, images, method=Llava.encode_image)
    features = self.target.apply(variables, vision_features, method=Llava.project)
    out = self.target.apply(variables, tokens, lengths, cache, *extra, image_features=features,
                            method=method)
    return out[:2] + (vision_features, out[2] if extra else None)

  def _draft_prompt(self, tokens, lengths):
    """The language-only draft reads the text alone: image placeholders are removed."""
    if self.image_token_index is None or isinstance(self.draft, (AdapterDraft, FeatureDraft)):
      return tokens, lengths
    is_image = (tokens == self.image_token_index) & (
        jnp.arange(tokens.shape[1])[None, :] < lengths[:, None])
    order = jnp.argsort(is_image, axis=1, stable=True)  # Text first, in order.
    return jnp.take_along_axis(tokens, order, axis=1), lengths - is_image.sum(axis=1)

  def _prefill_draft(self, params, tokens, lengths, vision_features, prompt_length,
                     cache_length=None):
    """Prefills all but the last prompt token (see the cache invariant). prompt_length: the
    draft's static prompt width (every row's draft prompt must fit it); cache_length: the
    draft cache's positions (default the prompt width, the new tokens and one step's)."""
    tokens, lengths = self._draft_prompt(tokens, lengths)
    tokens = tokens[:, :prompt_length]
    if cache_length is None:
      cache_length = prompt_length + self.max_new_tokens + self.num_draft_nodes + 1
    cache = KVCache.init(text_config(self.draft.config), tokens.shape[0], cache_length,
                         layout=self.draft.layout)
    kwargs = {}
    if isinstance(self.draft, AdapterDraft) and vision_features is not None:
      kwargs['vision_features'] = vision_features
    _, cache = self.draft.apply({'params': params}, tokens, lengths - 1, cache, method='prefill',
                                **kwargs)
    last_prompt_token = jnp.take_along_axis(tokens, (lengths - 1)[:, None], axis=1)[:, 0]
    return cache, last_prompt_token

  # --- one step --------------------------------------------------------------------------------

  def _propose(self, params, state: DecodeState, rng):
    """G draft tokens int32[B, G], their distributions float32[B, G, V], the draft cache.
    rng: key[B]."""
    variables = {'params': params}
    rngs = jnp.swapaxes(sampling_lib.split(rng, self.num_draft_tokens), 0, 1)  # key[G, B]
    first = jnp.stack([state.previous_token, state.last_token], axis=1)  # [B, 2]
    logits, cache = self.draft.apply(variables, first, state.draft_cache, method='extend')
    token, probs = self.draft_token(rngs[0], logits[:, -1], state.row_sampling)

    def draft_one(carry, step_rng):
      cache, token = carry
      logits, cache = self.draft.apply(variables, token[:, None], cache, method='extend')
      new_token, probs = self.draft_token(step_rng, logits[:, -1], state.row_sampling)
      return (cache, new_token), (new_token, probs)

    (cache, _), (tokens, all_probs) = jax.lax.scan(draft_one, (cache, token), rngs[1:])
    tokens = jnp.concatenate([token[:, None], tokens.T], axis=1)  # [B, G]
    all_probs = jnp.concatenate([probs[:, None], all_probs.transpose(1, 0, 2)], axis=1)
    return tokens, all_probs, cache

  def _step(self, target_params, draft_params, state: DecodeState) -> DecodeState:
    # Each row's key folded with the row's own step count (its verifications so far), never the
    # loop's: a row's draws do not depend on when it entered a batch (decoding/slots.py).
    rng = jax.vmap(jax.random.fold_in)(state.rng, state.num_target_calls - 1)  # key[B]
    rng = sampling_lib.split(rng, 2)
    draft_rng, accept_rng = rng[:, 0], rng[:, 1]
    if self.uses_tree_step:
      with self._draft_rules():
        if isinstance(self.draft_tree, DynamicTree):
          (node_tokens, node_valid, draft_probs, draft_calls, drafted, draft_cache,
           tree) = dynamic_tree.propose(self, draft_params, state, draft_rng)
        else:
          (node_tokens, node_valid, draft_probs, draft_calls, drafted,
           draft_cache) = tree_step.propose(self, draft_params, state, draft_rng)
          tree = self.draft_tree
      num_accepted, emitted, path, target_cache, features = tree_step.verify(
          self, target_params, state, node_tokens, node_valid, draft_probs, accept_rng, tree)
      # A feature draft keeps none of the tree: its accepted path is fed again, on the target's
      # features, at the next step (decoding/feature_step.py).
      target_cache, kept = tree_step.keep_path(
          target_cache, None if self.reads_features else draft_cache, path, tree)
      draft_cache = draft_cache if self.reads_features else kept
    else:
      num_accepted, emitted, target_cache, draft_cache, features = self._chain_step(
          target_params, draft_params, state, draft_rng, accept_rng)
      draft_calls = drafted = self.num_draft_tokens
    return self._advance(state, num_accepted, emitted, target_cache, draft_cache, draft_calls,
                         drafted, features)

  def _chain_step(self, target_params, draft_params, state: DecodeState, draft_rng, accept_rng):
    """Drafts and verifies a chain of gamma tokens: (n accepted int32[B], emitted int32[B, G + 1],
    both caches, the target's features at the G + 1 positions for a feature draft or None)."""
    batch = state.last_token.shape[0]
    if self.reads_features:
      with self._draft_rules():
        draft_tokens, draft_probs, draft_cache = feature_step.propose(self, draft_params, state,
                                                                      draft_rng)
    elif self.num_draft_tokens:
      with self._draft_rules():
        draft_tokens, draft_probs, draft_cache = self._propose(draft_params, state, draft_rng)
    else:
      draft_tokens = jnp.zeros((batch, 0), jnp.int32)
      draft_probs = jnp.zeros((batch, 0, self.vocab_size), jnp.float32)
      draft_cache = None

    verify = jnp.concatenate([state.last_token[:, None], draft_tokens], axis=1)  # [B, G + 1]
    features = None
    if self.reads_features:
      target_logits, target_cache, features = self.target.apply(
          {'params': target_params}, verify, state.target_cache,
          self.draft.config.feature_layers, method='extend_with_features')
    else:
      target_logits, target_cache = self.target.apply({'params': target_params}, verify,
                                                      state.target_cache, method='extend')
    if self.greedy:
      num_accepted, emitted = acceptance.greedy_accept(draft_tokens, target_logits)
    else:
      # A greedy row among sampled ones has one-hot p and q: speculative sampling then accepts
      # exactly while the draft equals the target's argmax and emits the argmax, as greedy does.
      num_accepted, emitted = acceptance.speculative_accept(
          accept_rng, draft_tokens, draft_probs,
          self.probabilities(target_logits, state.row_sampling))
    return num_accepted, emitted, target_cache, draft_cache, features

  def _advance(self, state: DecodeState, num_accepted, emitted, target_cache, draft_cache,
               draft_calls, drafted, features=None) -> DecodeState:
    """Keeps each row's accepted tokens and rolls both caches back to its accepted context.
    drafted: the depths (positions) each row drafted this step; an adaptive length's undrafted
    positions are not counted as reached. features: a feature draft's, from the verification
    (its draft cache is already where it stays: feature_step.propose)."""
    gamma = self.num_draft_tokens
    active = ~state.done
    count = self._kept_count(emitted, num_accepted + 1, state.num_generated,
                             state.max_new_tokens)
    count = jnp.where(active, count, 0)
    tokens = _write_rows(state.tokens, emitted, state.num_generated, count)
    num_generated = state.num_generated + count
    hit_eos = jnp.any(self._is_eos(emitted) & (jnp.arange(gamma + 1)[None] < count[:, None]), 1)
    done = state.done | hit_eos | (num_generated >= state.max_new_tokens)

    # Roll both caches back to the accepted context: all but the newly emitted last token.
    grown = jnp.where(active, num_accepted + 1, 0)
    target_cache = target_cache.with_lengths(state.target_cache.lengths + grown)
    pending = (state.pending_features, state.pending_tokens, state.pending_count)
    if self.reads_features:
      draft_cache = draft_cache.with_lengths(jnp.where(active, draft_cache.lengths,
                                                       state.draft_cache.lengths))
      pending = feature_step.next_pending(state, features, emitted, num_accepted, active)
    elif draft_cache is not None:
      draft_cache = draft_cache.with_lengths(state.draft_cache.lengths + grown)
    take = lambda i: jnp.take_along_axis(emitted, i[:, None], axis=1)[:, 0]
    previous = jnp.where(num_accepted > 0, take(jnp.maximum(num_accepted - 1, 0)),
                         state.last_token)
    positions = jnp.arange(gamma)[None, :]
    return DecodeState(
        step=state.step + 1, rng=state.rng, tokens=tokens, num_generated=num_generated,
        done=done,
        previous_token=jnp.where(active, previous, state.previous_token),
        last_token=jnp.where(active, take(num_accepted), state.last_token),
        target_cache=target_cache, draft_cache=draft_cache,
        num_target_calls=state.num_target_calls + active,
        # Accepted drafts that the row keeps, and the positions it verified and still wanted:
        # EOS or the budget may cut a step short (count is 0 for a finished row).
        accepted_by_position=state.accepted_by_position
        + (positions < jnp.minimum(num_accepted, count)[:, None]),
        reached_by_position=state.reached_by_position + (positions < jnp.minimum(
            jnp.minimum(num_accepted + 1, count), drafted)[:, None]),
        draft_calls=state.draft_calls + jnp.where(active, draft_calls, 0),
        max_new_tokens=state.max_new_tokens, row_sampling=state.row_sampling,
        pending_features=pending[0], pending_tokens=pending[1], pending_count=pending[2])

  def _is_eos(self, tokens):
    return jnp.isin(tokens, jnp.asarray(self.eos_token_ids, jnp.int32))

  def _kept_count(self, emitted, count, num_generated, max_new_tokens):
    """Tokens of this step a row keeps: up to and including its first EOS, within the row's
    budget int32[B]."""
    within = jnp.arange(emitted.shape[1])[None] < count[:, None]
    eos = self._is_eos(emitted) & within
    count = jnp.where(jnp.any(eos, axis=1), jnp.argmax(eos, axis=1) + 1, count)
    return jnp.minimum(count, max_new_tokens - num_generated)

  # --- the program -----------------------------------------------------------------------------

  def _generate(self, target_params, draft_params, tokens, lengths, images, rng,
                draft_prompt_length=None):
    tokens = jnp.asarray(tokens, jnp.int32)
    batch, prompt_length = tokens.shape
    # Room for the prompt, every new token and one step's overshoot past the budget.
    cache_length = prompt_length + self.max_new_tokens + self.num_draft_nodes + 1
    state = self.prefill_rows(
        target_params, draft_params, tokens, lengths, images, sampling_lib.row_keys(rng, batch),
        jnp.full((batch,), self.max_new_tokens, jnp.int32), cache_length,
        draft_prompt_length or prompt_length)
    state = self.run_steps(target_params, draft_params, state)
    return DecodeResult(tokens=state.tokens[:, :self.max_new_tokens],
                        num_generated=state.num_generated,
                        num_target_calls=state.num_target_calls,
                        accepted_by_position=state.accepted_by_position,
                        reached_by_position=state.reached_by_position,
                        draft_calls=state.draft_calls)

  def prefill_rows(self, target_params, draft_params, tokens, lengths, images, rng,
                   max_new_tokens, cache_length: int, draft_prompt_length: int,
                   draft_cache_length: int | None = None,
                   row_sampling: RowSampling | None = None) -> DecodeState:
    """The decode state of new rows after their prefill and first token (traced, in a jitted
    program). tokens int32[B, T], lengths int32[B], images float32[B, H, W, 3] | None, rng
    key[B] (the rows' own keys), max_new_tokens int32[B] (each <= the engine's); the caches hold
    `cache_length` (draft: `draft_cache_length`, default its prompt width + the new tokens').
    row_sampling: each row's settings (per_request_sampling only; default the engine's)."""
    tokens = jnp.asarray(tokens, jnp.int32)
    lengths = jnp.asarray(lengths, jnp.int32)
    batch = tokens.shape[0]
    if not self.per_request_sampling:
      row_sampling = None
    elif row_sampling is None:
      row_sampling = RowSampling.of([self.sampling] * batch)
    else:
      row_sampling = jax.tree.map(jnp.asarray, row_sampling)
    gamma = self.num_draft_tokens
    rng = sampling_lib.split(rng, 2)  # key[B, 2]
    prefill_rng, loop_rng = rng[:, 0], rng[:, 1]
    logits, target_cache, vision_features, target_features = self._prefill_target(
        target_params, tokens, lengths, images, cache_length)
    first, _ = self.sample(prefill_rng, logits, row_sampling)  # [B]
    draft_cache, previous = None, jnp.zeros_like(first)
    pending = (None, None, None)
    if self.reads_features:
      with self._draft_rules():
        draft_cache, *pending = feature_step.prefill_draft(
            self, draft_params, tokens, lengths, target_features, first,
            draft_cache_length or cache_length)
    elif self.draft is not None:
      with self._draft_rules():
        draft_cache, previous = self._prefill_draft(
            draft_params, tokens, lengths, vision_features, draft_prompt_length,
            draft_cache_length)
    capacity = self.max_new_tokens + gamma + 1
    return DecodeState(
        step=jnp.zeros((), jnp.int32), rng=loop_rng,
        tokens=jnp.zeros((batch, capacity), jnp.int32).at[:, 0].set(first),
        num_generated=jnp.ones((batch,), jnp.int32),
        done=self._is_eos(first) | (max_new_tokens <= 1),
        previous_token=previous, last_token=first,
        target_cache=target_cache, draft_cache=draft_cache,
        num_target_calls=jnp.ones((batch,), jnp.int32),
        accepted_by_position=jnp.zeros((batch, gamma), jnp.int32),
        reached_by_position=jnp.zeros((batch, gamma), jnp.int32),
        draft_calls=jnp.zeros((batch,), jnp.int32),
        max_new_tokens=jnp.asarray(max_new_tokens, jnp.int32), row_sampling=row_sampling,
        pending_features=pending[0], pending_tokens=pending[1], pending_count=pending[2])

  def run_steps(self, target_params, draft_params, state: DecodeState,
                max_steps: jax.Array | None = None,
                stop_at_finish: jax.Array | None = None) -> DecodeState:
    """Steps until every row is done, or `max_steps` (int32[]) steps have run, or (when
    `stop_at_finish`, bool[], holds) after the step in which a row finished (traced)."""
    start, done_at_start = state.step, state.done

    def running(s):
      going = jnp.any(~s.done)
      if max_steps is not None:
        going = going & (s.step - start < max_steps)
      if stop_at_finish is not None:
        going = going & ~(stop_at_finish & jnp.any(s.done & ~done_at_start))
      return going

    return jax.lax.while_loop(
        running, functools.partial(self._step, target_params, draft_params), state)


def _write_rows(buffer, values, offsets, counts):
  """buffer int32[B, N]; writes values[b, :counts[b]] at buffer[b, offsets[b]:]."""
  width = values.shape[1]
  columns = offsets[:, None] + jnp.arange(width)[None, :]
  columns = jnp.where(jnp.arange(width)[None, :] < counts[:, None], columns, buffer.shape[1])
  rows = jnp.arange(buffer.shape[0])[:, None]
  return buffer.at[rows, columns].set(values, mode='drop')


def check_request(target_config, prompts, max_new_tokens: int, num_draft_tokens: int = 0,
                  drafts=()):
  """Host-side checks, with messages naming the row, before anything is compiled.

  prompts: each row's token ids (image placeholders included); drafts: the configs of the drafts
  that will decode them with `num_draft_tokens` (for the evaluation, the largest gamma).

  A row's positions run to prompt + max_new_tokens - 1, and the last verification may write
  gamma - 1 more: its drafts past the last token the row keeps. Every position a model is fed
  must lie below its max_position_embeddings.
  """
  text = text_config(target_config)
  overshoot = max(num_draft_tokens - 1, 0)
  image_token = target_config.image_token_index if isinstance(target_config, LlavaConfig) else None
  for row, ids in enumerate(prompts):
    length = len(ids)
    if length < 1:
      raise ValueError(f'row {row}: empty prompt')
    if length + max_new_tokens + overshoot > text.max_position_embeddings:
      past = f' + {overshoot} draft positions verified past the budget' if overshoot else ''
      raise ValueError(f'row {row}: prompt ({length} tokens) + max_new_tokens ({max_new_tokens})'
                       f'{past} exceeds the target\'s {text.max_position_embeddings} positions')
    for draft in drafts:
      draft_length = length
      if image_token is not None and not isinstance(draft, (AdapterDraftConfig,
                                                             FeatureDraftConfig)):
        # The language-only draft reads the text alone (see SpeculativeDecoder._draft_prompt).
        draft_length = sum(1 for i in ids if i != image_token)
        if draft_length < 1:
          raise ValueError(f'row {row}: the prompt is only image placeholders; the language-only '
                           'draft reads the text alone and needs at least one text token (a BOS)')
      limit = text_config(draft).max_position_embeddings
      if draft_length + max_new_tokens + overshoot > limit:
        raise ValueError(f'row {row}: the draft reads {draft_length} prompt tokens + '
                         f'max_new_tokens ({max_new_tokens}) + {overshoot} drafted past the '
                         f'budget, more than its {limit} positions')
