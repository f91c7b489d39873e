"""Continuous batching on the device: a persistent decode state of fixed slots and the programs
that fill and advance it.

Axis legend: B slots, P rows admitted by one prefill, T their padded prompt length, C cache
positions per slot (the slot capacity plus one step's overshoot).

The state is the engine's DecodeState over B slots, each with its own caches of C positions.
Three compiled programs work on it (JetStream's prefill -> insert -> generate):
  `init`: every slot empty (done, length 0);
  `prefill`: P new requests, each into a given free slot: both caches of those rows written from a
    P-row prefill (slot index = RoPE position, so a row prefilled alone copies in unchanged), the
    first token sampled, the row's counters, budget and (per_request_sampling) sampling settings
    reset; a slot index of B drops a padding row;
  `generate_chunk`: the engine's steps, at most `chunk_steps` of them or until no slot is active,
    or (`stop_at_finish`: requests wait for a slot) until a row finishes, so that its slot is
    refilled at once; the state is donated, so the caches are updated in place.
A done row takes no tokens and grows no cache; a tree step drafts nothing for it. Which slots are
free, waiting or finished is the host's business (decoding/scheduler.py), read between chunks from
`tokens[b, previous:num_generated]` and `done`.

Exactness: every draw of a row comes from the row's own key folded with the row's own step count
(engine._step), and a row's prefill and steps read only its own slots, so a request's tokens do not
depend on the slot, the chunk it entered at or its neighbours.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from mmspec_jax import axes, sharding
from mmspec_jax.decoding.engine import DecodeState, SpeculativeDecoder
from mmspec_jax.decoding.sampling import RowSampling
from mmspec_jax.models import KVCache, text_config
from mmspec_jax.models.config import resolve_dtype
from mmspec_jax.models.kv_cache import CACHE_AXES, HEADS_FIRST_CACHE_AXES


@dataclasses.dataclass(frozen=True)
class SlotPrograms:
  """The slot programs of one engine. `engine.max_new_tokens` is the most new tokens a slot
  holds; `capacity` the most prompt + new tokens a request may need."""
  engine: SpeculativeDecoder
  num_slots: int
  capacity: int
  # Compiled programs (decoding/scheduler.py fills it), shared by every scheduler on these
  # programs: the session gives drafts of one config the same SlotPrograms.
  compiled: dict = dataclasses.field(default_factory=dict, compare=False, hash=False,
                                     repr=False)

  def __post_init__(self):
    if self.num_slots < 1:
      raise ValueError(f'the number of slots (batch_size) must be >= 1, got {self.num_slots}')
    if self.capacity <= self.engine.max_new_tokens:
      raise ValueError(f'slot capacity {self.capacity} leaves no room for a prompt beside '
                       f'max_new_tokens {self.engine.max_new_tokens}')

  @property
  def cache_length(self) -> int:
    """C: the capacity plus one verification's overshoot past a row's budget."""
    return self.capacity + self.engine.num_draft_nodes + 1

  # --- programs (jitted; run under placement.mesh_context) -------------------------------------
  @functools.cached_property
  def init(self):
    """() -> DecodeState with every slot empty."""
    return jax.jit(self._init)

  @functools.cached_property
  def prefill(self):
    """(target_params, draft_params, state, slots int32[P], tokens int32[P, T], lengths int32[P],
    images float32[P, H, W, 3] | None, keys key[P], max_new_tokens int32[P],
    row_sampling RowSampling of [P] | None) -> state."""
    return jax.jit(self._prefill, donate_argnums=(2,))

  @functools.cached_property
  def generate_chunk(self):
    """(target_params, draft_params, state, chunk_steps int32[], stop_at_finish bool[])
    -> state."""
    return jax.jit(self._generate_chunk, donate_argnums=(2,))

  @functools.cached_property
  def release(self):
    """(state, slots int32[P]) -> state with those slots done (a cancelled request's row takes no
    further steps); a slot index of B is ignored."""
    return jax.jit(lambda state, slots: state.replace(
        done=state.done.at[slots].set(True, mode='drop')), donate_argnums=(0,))

  # --- traced bodies ---------------------------------------------------------------------------
  def _init(self) -> DecodeState:
    engine, batch = self.engine, self.num_slots
    gamma = engine.num_draft_tokens
    zeros = lambda *shape: jnp.zeros(shape, jnp.int32)
    draft_cache = None
    if engine.draft is not None:
      draft_cache = KVCache.init(text_config(engine.draft.config), batch, self.cache_length,
                                 layout=engine.draft.layout)
    state = DecodeState(
        step=zeros(), rng=jax.random.split(jax.random.key(0), batch),
        tokens=zeros(batch, engine.max_new_tokens + gamma + 1), num_generated=zeros(batch),
        done=jnp.ones((batch,), bool), previous_token=zeros(batch), last_token=zeros(batch),
        target_cache=KVCache.init(text_config(engine.target.config), batch, self.cache_length,
                                  layout=engine.target.layout),
        draft_cache=draft_cache, num_target_calls=zeros(batch),
        accepted_by_position=zeros(batch, gamma), reached_by_position=zeros(batch, gamma),
        draft_calls=zeros(batch), max_new_tokens=zeros(batch),
        row_sampling=RowSampling(temperature=jnp.zeros((batch,)), top_k=zeros(batch),
                                 top_p=jnp.ones((batch,))) if engine.per_request_sampling else None)
    if engine.reads_features:  # A feature draft's pending positions (decoding/feature_step.py).
      draft = engine.draft.config
      shape = (batch, gamma + 1, len(draft.feature_layers), draft.target_hidden_size)
      dtype = resolve_dtype(text_config(engine.target.config).dtype)
      state = state.replace(pending_features=jnp.zeros(shape, dtype),
                            pending_tokens=zeros(batch, gamma + 1),
                            pending_count=jnp.ones((batch,), jnp.int32))
    return _constrain(state)

  def _prefill(self, target_params, draft_params, state, slots, tokens, lengths, images, keys,
               max_new_tokens, row_sampling=None):
    rows = self.engine.prefill_rows(
        target_params, draft_params, tokens, lengths, images, keys, max_new_tokens,
        self.cache_length, tokens.shape[1], self.cache_length, row_sampling)
    return _constrain(_insert(state, rows, jnp.asarray(slots, jnp.int32)))

  def _generate_chunk(self, target_params, draft_params, state, chunk_steps, stop_at_finish):
    state = self.engine.run_steps(target_params, draft_params, state,
                                  jnp.asarray(chunk_steps, jnp.int32),
                                  jnp.asarray(stop_at_finish, bool))
    return _constrain(state)


def _insert(state: DecodeState, rows: DecodeState, slots: jax.Array) -> DecodeState:
  """`state` with rows[p] written into slot slots[p] (a slot index past the last drops it)."""
  put = lambda whole, new, axis=0: _put_rows(whole, new, slots, axis)
  fields = {}
  for field in dataclasses.fields(DecodeState):
    name = field.name
    whole, new = getattr(state, name), getattr(rows, name)
    if name == 'step':
      fields[name] = whole
    elif isinstance(whole, KVCache):
      axis = 2 if whole.heads_first else 1
      fields[name] = whole.replace(keys=put(whole.keys, new.keys, axis),
                                   values=put(whole.values, new.values, axis),
                                   lengths=put(whole.lengths, new.lengths))
    elif whole is None:
      fields[name] = None
    else:
      fields[name] = jax.tree.map(put, whole, new)
  return DecodeState(**fields)


def _put_rows(whole: jax.Array, new: jax.Array, slots: jax.Array, axis: int) -> jax.Array:
  index = (slice(None),) * axis + (slots,)
  return whole.at[index].set(new.astype(whole.dtype), mode='drop')


def _constrain(state: DecodeState) -> DecodeState:
  """The state's layout on the active mesh: caches as the models shard them, the rest by slot."""
  def cache(c):
    if c is None:
      return None
    names = HEADS_FIRST_CACHE_AXES if c.heads_first else CACHE_AXES
    return c.replace(keys=sharding.constrain(c.keys, names),
                     values=sharding.constrain(c.values, names),
                     lengths=sharding.constrain(c.lengths, (axes.CACHE_BATCH,)))

  def by_slot(x):
    if not hasattr(x, 'ndim') or x.ndim == 0:
      return x
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      return x
    return sharding.constrain(x, (axes.BATCH,) + (None,) * (x.ndim - 1))

  fields = {f.name: getattr(state, f.name) for f in dataclasses.fields(DecodeState)}
  for name, value in fields.items():
    fields[name] = (cache(value) if name in ('target_cache', 'draft_cache')
                    else jax.tree.map(by_slot, value))
  return DecodeState(**fields)
