"""The host side of continuous batching: requests wait, enter free slots, stream out, leave.

Between chunks (decoding/slots.py) the scheduler admits waiting requests into free slots (in
arrival order, or with `admission_order='longest_first'` the largest max_new_tokens first: below)
in prefill calls of up to `prefill_width` rows, each padded to the next of 1, 2, 4, ... rows (a
single refill, the common case, pays for one row) and to a length bucket; runs one chunk; reads
each occupied slot's new tokens (`tokens[b, emitted:num_generated]`); and retires the rows that
finished or were cancelled, freeing their slots for the next admission. Nothing here runs per
token: one device round trip per chunk.

    scheduler = session.scheduler(decoder, num_slots=8, capacity=512, chunk_steps=8)
    handle = scheduler.submit(request, max_new_tokens=64)
    for event in scheduler.run():        # until nothing waits or runs
      print(event.handle, event.new_tokens, event.finished)

Admission order. 'arrival' (first come first served) is fair to requests that arrive over time, as
a server's do. A batch job knows every request at the start, and there the order sets how much of
its end is a tail of long rows with empty slots beside them: 'longest_first' (longest processing
time first: the classic makespan rule) admits the largest budgets first, so the short requests fill
the slots at the end. Ties keep arrival order; a request's tokens do not depend on the order.

With `refill=False` a batch is closed: requests enter only when every slot is free, so the
batch runs until its slowest row ends (static batching on the same programs, for comparison).

A request's stop sequences (Request.stop) are looked for here, between chunks, in the tokens it
has so far. At a match its output ends (after a stop id; after the token that completes a stop
string, whose text is then cut before the string: Finished.stopped_by says which) and its slot is
freed at once; the tokens its row made past the stop in that chunk are dropped.

`submit` may be called at any time between events (a server's handlers do, from the loop that
owns the devices); `cancel(handle)` frees a request's slot at the next chunk boundary. On several
processes every process submits the same requests in the same order and so makes the same
admission decisions: the chunk's outputs are gathered onto every host (distributed.fetch).
"""

from __future__ import annotations

import bisect
import collections
import dataclasses
import itertools
import time
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import numpy as np

from mmspec_jax import distributed
from mmspec_jax.decoding import inputs, placement
from mmspec_jax.decoding.sampling import RowSampling
from mmspec_jax.decoding.slots import SlotPrograms

ADMISSION_ORDERS = ('arrival', 'longest_first')


def check_admission_order(order: str):
  if order not in ADMISSION_ORDERS:
    raise ValueError(f'admission_order must be one of {ADMISSION_ORDERS}, got {order!r}')

# Counters the scheduler reads per slot (statistics.COUNT_FIELDS but num_generated).
_COUNTERS = ('num_target_calls', 'accepted_by_position', 'reached_by_position', 'draft_calls')


def output_text(processor, token_ids: Sequence[int], stopped_by: int | str | None) -> str:
  """A request's text: its tokens decoded, cut before the stop string that ended it."""
  text = processor.decode(list(token_ids))
  return text[:text.index(stopped_by)] if isinstance(stopped_by, str) else text


@dataclasses.dataclass
class Finished:
  """A finished request: its new tokens and its counters (statistics.COUNT_FIELDS)."""
  request: inputs.Request
  token_ids: list[int]
  num_target_calls: int
  accepted_by_position: np.ndarray  # int[G]
  reached_by_position: np.ndarray  # int[G]
  draft_calls: int
  cancelled: bool
  submitted: float  # time.perf_counter() seconds
  first_token: float | None
  finished: float
  token_times: list[float]  # when each chunk's tokens arrived, one entry per token
  stopped_by: int | str | None = None  # the stop sequence that ended it, if one did

  @property
  def num_generated(self) -> int:
    return len(self.token_ids)

  def text(self, processor) -> str:
    return output_text(processor, self.token_ids, self.stopped_by)


@dataclasses.dataclass
class Event:
  """New tokens of one request after a chunk; `finished` is set on its last event."""
  handle: int
  new_tokens: list[int]
  finished: Finished | None = None


@dataclasses.dataclass
class _Active:
  handle: int
  request: inputs.Request
  slot: int
  submitted: float
  emitted: int = 0
  cancelled: bool = False
  first_token: float | None = None
  calls_seen: int = 1  # num_target_calls read at the last chunk (the prefill's 1 at entry)
  stopped_by: int | str | None = None
  token_times: list[float] = dataclasses.field(default_factory=list)


class _WaitingQueue:
  """Waiting (handle, request, budget, submitted) entries in admission order: arrival, or the
  largest budget first with ties in arrival order. One FIFO per budget, so that a batch job
  submitting N requests costs O(N log B) for B distinct budgets, not O(N^2)."""

  def __init__(self, longest_first: bool):
    self._longest_first = longest_first
    self._queues: dict[int, collections.deque] = {}
    self._keys: list[int] = []  # Ascending: the first key's queue enters first.
    self._size = 0

  def _key(self, entry) -> int:
    return -entry[2] if self._longest_first else 0

  def append(self, entry):
    key = self._key(entry)
    if key not in self._queues:
      self._queues[key] = collections.deque()
      bisect.insort(self._keys, key)
    self._queues[key].append(entry)
    self._size += 1

  @property
  def head(self):
    return self._queues[self._keys[0]][0]

  def popleft(self):
    queue = self._queues[self._keys[0]]
    entry = queue.popleft()
    if not queue:
      del self._queues[self._keys.pop(0)]
    self._size -= 1
    return entry

  def discard(self, handles):
    """Drops the entries whose handle is in `handles`."""
    kept = [entry for entry in self if entry[0] not in handles]
    self._queues, self._keys, self._size = {}, [], 0
    for entry in kept:
      self.append(entry)

  def __iter__(self):
    for key in self._keys:
      yield from self._queues[key]

  def __len__(self) -> int:
    return self._size


class Scheduler:
  """See the module docstring. Built by DecodeSession.scheduler."""

  def __init__(self, session, decoder, programs: SlotPrograms, *, chunk_steps: int,
               buckets: Sequence[int], prefill_width: int, run_key: jax.Array,
               refill: bool = True, admission_order: str = 'arrival'):
    if chunk_steps < 1:
      raise ValueError(f'chunk_steps must be >= 1, got {chunk_steps}')
    if prefill_width < 1:
      raise ValueError(f'prefill_width must be >= 1, got {prefill_width}')
    check_admission_order(admission_order)
    self.admission_order = admission_order
    self.session, self.decoder, self.programs = session, decoder, programs
    self.chunk_steps, self.buckets = chunk_steps, tuple(buckets)
    self.prefill_width = min(prefill_width, programs.num_slots)
    self.run_key, self.refill = run_key, refill
    self._handles = itertools.count()
    self._waiting = _WaitingQueue(longest_first=admission_order == 'longest_first')
    self._active: dict[int, _Active] = {}  # slot -> the request in it
    self._cancelled: set[int] = set()
    self._pixels: dict[int, np.ndarray] = {}  # handle -> its image preprocessed ahead of entry
    self._staged = None  # (handle, _prefill_inputs of it alone): the head request, ready to enter
    self._state = None
    # (length, width) -> program; 'chunk' and 'release': on the SlotPrograms, shared.
    self._compiled_prefill: dict[tuple[int, int], Any] = programs.compiled.setdefault(
        'prefill', {})
    self.reset_counters()
    self._last_step = 0
    self._view = None

  def reset_counters(self):
    """Slot-steps (chunks x slots) and the active row-steps among them (utilization), overall
    and while requests waited; chunks and prefill calls run."""
    self.slot_steps = self.slot_steps_while_waiting = 0
    self.active_row_steps = self.active_row_steps_while_waiting = 0
    self.chunks = self.prefills = 0

  # --- requests ------------------------------------------------------------------------------
  def check(self, request: inputs.Request, max_new_tokens: int):
    """Refuses, by name, a request that cannot fit a slot."""
    engine = self.programs.engine
    if not 1 <= max_new_tokens <= engine.max_new_tokens:
      raise ValueError(f'request {request.id!r}: max_new_tokens must be in [1, '
                       f'{engine.max_new_tokens}] (the slots\' new-token capacity), got '
                       f'{max_new_tokens}')
    need = len(request.token_ids) + max_new_tokens
    if need > self.programs.capacity:
      raise ValueError(f'request {request.id!r}: prompt ({len(request.token_ids)} tokens) + '
                       f'max_new_tokens ({max_new_tokens}) = {need} exceeds the slot capacity '
                       f'{self.programs.capacity}')
    if request.image is not None and not self.decoder.with_images:
      raise ValueError(f'request {request.id!r} has an image, but this decoder was built '
                       'without images (pass requests with images to session.decoder)')
    if (request.sampling not in (None, self.decoder.sampling)
        and not self.decoder.per_request_sampling):
      raise ValueError(f'request {request.id!r} gives its own sampling settings, but this decoder '
                       'samples every row alike (session.decoder(..., per_request_sampling=True))')
    if any(isinstance(s, str) for s in request.stop) and self.session.processor is None:
      raise ValueError(f'request {request.id!r} has stop strings, but this session has no '
                       'tokenizer to read its tokens as text')

  def submit(self, request: inputs.Request, max_new_tokens: int | None = None) -> int:
    """Queues a request (checked now); returns its handle."""
    budget = self.programs.engine.max_new_tokens if max_new_tokens is None else max_new_tokens
    self.check(request, budget)
    handle = next(self._handles)
    self._waiting.append((handle, request, budget, time.perf_counter()))
    return handle

  def cancel(self, handle: int):
    """Frees a running request's slot at the next chunk boundary, or drops a waiting one then;
    either way its last event (Finished.cancelled) comes from that step."""
    self._cancelled.add(handle)

  @property
  def num_waiting(self) -> int:
    return len(self._waiting)

  @property
  def num_running(self) -> int:
    return len(self._active)

  @property
  def utilization(self) -> float | None:
    """Active row-steps / slot-steps over the chunks run so far."""
    return self.active_row_steps / self.slot_steps if self.slot_steps else None

  @property
  def utilization_while_waiting(self) -> float | None:
    """Utilization over the chunks run while requests waited for a slot: what refilling
    controls (the rest is the workload's end, when slots empty and nothing waits)."""
    if not self.slot_steps_while_waiting:
      return None
    return self.active_row_steps_while_waiting / self.slot_steps_while_waiting

  @property
  def idle(self) -> bool:
    return not self._waiting and not self._active

  # --- programs --------------------------------------------------------------------------------
  def _placed(self, value):
    return placement.place_rows(value, self.session.mesh, self.session.rules)

  def _params(self):
    return self.session.target_params, self.session._params(self.decoder)

  @property
  def prefill_widths(self) -> tuple[int, ...]:
    """The prefill programs' row counts: 1 (a slot refilled as its row ends, the common case), the
    powers of two below prefill_width and prefill_width (admissions together). A prefill's rows
    cost nearly their count (a 2-row prefill of the demo pair ~1.8x a 1-row one): padding a group
    of 2 to 4 rows would pay for 2 rows of nothing."""
    widths = {self.prefill_width}
    width = 1
    while width < self.prefill_width:
      widths.add(width)
      width *= 2
    return tuple(sorted(widths))

  def _prefill_program(self, length: int, width: int):
    program = self._compiled_prefill.get((length, width))
    if program is None:
      session = self.session
      image_shape = session.image_shape if self.decoder.with_images else None
      with placement.mesh_context(session.mesh, session.rules):
        structs = placement.input_structs(width, length, image_shape, session.mesh, session.rules)
        rows = placement.input_structs(width, 1, None, session.mesh, session.rules)[1]
        row_sampling = None
        if self.decoder.per_request_sampling:
          struct = lambda dtype: placement.rows_struct((width,), dtype, session.mesh,
                                                       session.rules)
          row_sampling = RowSampling(struct(np.float32), struct(np.int32), struct(np.float32))
        program = self.programs.prefill.lower(
            *self._params(), self.state, rows, *structs,
            placement.keys_struct(width, session.mesh, session.rules), rows,
            row_sampling).compile()
      self._compiled_prefill[(length, width)] = program
    return program

  def _chunk_program(self):
    compiled = self.programs.compiled
    if 'chunk' not in compiled:
      with placement.mesh_context(self.session.mesh, self.session.rules):
        compiled['chunk'] = self.programs.generate_chunk.lower(
            *self._params(), self.state, np.int32(self.chunk_steps), np.bool_(True)).compile()
    return compiled['chunk']

  def _release_program(self, width: int):
    key = ('release', width)
    if key not in self.programs.compiled:
      with placement.mesh_context(self.session.mesh, self.session.rules):
        rows = placement.input_structs(width, 1, None, self.session.mesh, self.session.rules)[1]
        self.programs.compiled[key] = self.programs.release.lower(self.state, rows).compile()
    return self.programs.compiled[key]

  @property
  def state(self):
    if self._state is None:
      self.session.load()
      with placement.mesh_context(self.session.mesh, self.session.rules):
        self._state = self.programs.init()
    return self._state

  def compile(self, lengths: Sequence[int] = ()) -> float:
    """Compiles the chunk program and a prefill per prompt length bucket; returns the seconds."""
    start = time.perf_counter()
    self._chunk_program()
    self._release_program(self.prefill_width)
    for length in sorted(set(lengths)):
      for width in self.prefill_widths:
        self._prefill_program(length, width)
    return time.perf_counter() - start

  def bucket(self, request: inputs.Request) -> int:
    return inputs.bucket_length(len(request.token_ids), self.buckets)

  # --- the loop --------------------------------------------------------------------------------
  def _admit(self) -> list[Event]:
    """Fills free slots from the head of the queue, one prefill per `prefill_width` rows;
    returns the last events of the waiting requests that were cancelled."""
    dropped = [entry for entry in self._waiting if entry[0] in self._cancelled]
    if dropped:
      self._waiting.discard(self._cancelled)
      self._cancelled.difference_update(entry[0] for entry in dropped)
      for entry in dropped:
        self._pixels.pop(entry[0], None)
    now = time.perf_counter()
    events = [Event(handle, [], Finished(
        request, [], 0, np.zeros(self._counter_shape('accepted_by_position').shape, np.int64),
        np.zeros(self._counter_shape('reached_by_position').shape, np.int64), 0, True,
        submitted, None, now, [])) for handle, request, _, submitted in dropped]
    free = [s for s in range(self.programs.num_slots) if s not in self._active]
    if not self.refill and self._active:
      return events  # Closed batches: the next enters when every slot is free.
    admitted = []
    while self._waiting and len(admitted) < len(free):
      admitted.append(self._waiting.popleft())
    for start in range(0, len(admitted), self.prefill_width):
      group = admitted[start:start + self.prefill_width]
      slots = free[start:start + len(group)]
      self._prefill(group, slots)
    return events

  def _prepare_waiting(self):
    """Work for the requests that enter next (the head of the queue, in admission order),
    done while a chunk runs so that admitting them waits on none of it: their images
    preprocessed, and the head request's inputs built and placed as a one-row prefill (the common
    admission: one slot freed by a chunk that ended at a finish)."""
    if self.decoder.with_images:
      for handle, request, _, _ in itertools.islice(self._waiting, self.programs.num_slots):
        if request.image is not None and handle not in self._pixels:
          self._pixels[handle] = self.session.processor.preprocess_images([request.image])[0]
    if self.refill and self._waiting and (self._staged is None
                                           or self._staged[0] != self._waiting.head[0]):
      head = self._waiting.head
      self._staged = (head[0], self._prefill_inputs([head], 1))

  def _prefill_inputs(self, group, width: int):
    """(bucket length, the placed prefill arguments but the slots) of `group`'s requests padded
    to `width` rows."""
    session = self.session
    requests = [request for _, request, _, _ in group]
    padded = requests + [requests[0]] * (width - len(requests))
    length = max(self.bucket(r) for r in requests)
    batch = inputs.Batch(0, tuple(padded), len(requests), length)
    pixels = [self._pixels.get(handle) for handle, _, _, _ in group]
    pixels = None if any(p is None and r.image is not None for p, r in zip(pixels, requests)) else (
        pixels + [pixels[0]] * (width - len(group)))
    tokens, lengths, images = session.batch_arrays(batch, self.decoder.with_images, pixels)
    budgets = np.array([b for _, _, b, _ in group] + [1] * (width - len(group)), np.int32)
    keys = inputs.request_keys(padded, self.run_key)
    row_sampling = None
    if self.decoder.per_request_sampling:
      row_sampling = jax.tree.map(self._placed, RowSampling.of(
          [r.sampling or self.decoder.sampling for r in padded]))
    placed = placement.place_inputs(tokens, lengths, images, session.mesh, session.rules)
    return length, (*placed, placement.place_keys(keys, session.mesh, session.rules),
                    self._placed(budgets), row_sampling)

  def _prefill(self, group, slots):
    width = min(w for w in self.prefill_widths if w >= len(group))
    staged, self._staged = self._staged, None
    if len(group) == 1 and staged is not None and staged[0] == group[0][0]:
      length, arguments = staged[1]
    else:
      length, arguments = self._prefill_inputs(group, width)
    for handle, _, _, _ in group:
      self._pixels.pop(handle, None)
    num_slots = self.programs.num_slots
    slot_rows = np.array(slots + [num_slots] * (width - len(slots)), np.int32)  # Past: dropped.
    program = self._prefill_program(length, width)
    self.prefills += 1
    self._state = program(*self._params(), self.state, self._placed(slot_rows), *arguments)
    for (handle, request, _, submitted), slot in zip(group, slots):
      self._active[slot] = _Active(handle, request, slot, submitted)

  def _release(self, slots: list[int]):
    """Marks cancelled rows done on the device, so that no chunk steps for them."""
    width, num_slots = self.prefill_width, self.programs.num_slots
    for start in range(0, len(slots), width):
      part = slots[start:start + width]
      rows = np.array(part + [num_slots] * (width - len(part)), np.int32)
      self._state = self._release_program(width)(self.state, self._placed(rows))

  def step(self) -> list[Event]:
    """Admits, runs one chunk, collects: the events of this chunk."""
    cancelled = [s for s, a in self._active.items() if a.handle in self._cancelled]
    for slot in cancelled:
      self._active[slot].cancelled = True
    if cancelled:
      self._release(cancelled)
    events = [self._retire(slot, [], time.perf_counter()) for slot in cancelled]
    events += self._admit()
    if not self._active:
      return events
    program = self._chunk_program()
    # Requests wait for a slot: end the chunk when a row finishes, so its slot refills at once.
    waiting = self.refill and bool(self._waiting)
    state = program(*self._params(), self.state, np.int32(self.chunk_steps), np.bool_(waiting))
    self._state = state
    self._prepare_waiting()  # While the chunk runs (dispatch is asynchronous).
    view = distributed.fetch({'tokens': state.tokens, 'num_generated': state.num_generated,
                              'done': state.done, 'step': state.step,
                              **{name: getattr(state, name) for name in _COUNTERS}})
    view = jax.tree.map(np.asarray, view)
    now = time.perf_counter()
    steps = int(view['step']) - self._last_step
    self._last_step = int(view['step'])
    self.chunks += 1
    self.slot_steps += steps * self.programs.num_slots
    if waiting:
      self.slot_steps_while_waiting += steps * self.programs.num_slots
    self._view = view
    stopped = []
    for slot in sorted(self._active):
      active = self._active[slot]
      calls = int(view['num_target_calls'][slot])
      self.active_row_steps += calls - active.calls_seen
      if waiting:
        self.active_row_steps_while_waiting += calls - active.calls_seen
      active.calls_seen = calls
      generated = int(view['num_generated'][slot])
      if active.request.stop:
        keep, active.stopped_by = self._stop(active.request, view['tokens'][slot, :generated],
                                             active.emitted)
        if active.stopped_by is not None:
          generated = keep
          stopped.append(slot)
      new = view['tokens'][slot, active.emitted:generated].tolist()
      active.emitted = generated
      if new:
        active.token_times += [now] * len(new)
        if active.first_token is None:
          active.first_token = now
      if view['done'][slot] or active.stopped_by is not None:
        events.append(self._retire(slot, new, now))
      elif new:
        events.append(Event(active.handle, new))
    if stopped:
      self._release(stopped)  # Their rows take no more steps (a new request may reuse them).
    return events

  def _stop(self, request: inputs.Request, tokens: np.ndarray, seen: int):
    """(tokens kept, the stop sequence) at the first stop of `request` in int[n] `tokens` that
    ends past the first `seen` (already checked), or (n, None)."""
    ids = {s for s in request.stop if isinstance(s, int)}
    strings = [s for s in request.stop if isinstance(s, str)]
    text_of = lambda end: self.session.processor.decode(tokens[:end])
    has_string = bool(strings) and any(s in text_of(len(tokens)) for s in strings)
    for end in range(seen + 1, len(tokens) + 1):
      if int(tokens[end - 1]) in ids:
        return end, int(tokens[end - 1])
      if has_string:
        text = text_of(end)
        found = [s for s in strings if s in text]
        if found:  # The one that starts first: the text is cut there.
          return end, min(found, key=text.index)
    return len(tokens), None

  def _retire(self, slot: int, new: list[int], now: float) -> Event:
    active = self._active.pop(slot)
    self._cancelled.discard(active.handle)
    view = self._view
    count = lambda name: (view[name][slot] if view is not None else
                          np.zeros_like(self._counter_shape(name)))
    tokens = (view['tokens'][slot, :active.emitted].tolist() if view is not None else [])
    finished = Finished(
        request=active.request, token_ids=tokens,
        num_target_calls=int(count('num_target_calls')),
        accepted_by_position=np.array(count('accepted_by_position')),
        reached_by_position=np.array(count('reached_by_position')),
        draft_calls=int(count('draft_calls')), cancelled=active.cancelled,
        submitted=active.submitted, first_token=active.first_token, finished=now,
        token_times=active.token_times, stopped_by=active.stopped_by)
    return Event(active.handle, new, finished)

  def _counter_shape(self, name):
    gamma = self.programs.engine.num_draft_tokens
    return np.zeros((gamma,) if name.endswith('position') else (), np.int64)

  def run(self, requests: Sequence[tuple[inputs.Request, int]] = ()) -> Iterator[Event]:
    """Submits `requests` ((request, max_new_tokens) pairs) and steps until idle, yielding
    every event. More may be submitted between events."""
    for request, budget in requests:
      self.submit(request, budget)
    while not self.idle:
      yield from self.step()
