"""The server's one owner of the devices: a thread that runs the continuous-batching scheduler
(decoding/scheduler.py) and hands each request's events to the coroutine awaiting them.

HTTP handlers never touch the device: they validate, `submit` (a command on a thread-safe queue)
and await the request's events on an asyncio queue; `cancel` (a client gone) frees the slot at
the next chunk boundary. The thread compiles every program first (`ready` is set then), steps the
scheduler while anything waits or runs, and sleeps on the command queue otherwise.

On several processes (hosts) process 0 runs this loop and sends each iteration's commands (the
requests it admits, the cancellations) to the others before it steps (distributed.HostMessages);
every other process runs `follow()`, applying the same commands in the same order and stepping
when process 0 steps, so that every process runs the same programs on the same state.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import pickle
import queue
import threading
from collections.abc import AsyncIterator, Sequence

from mmspec_jax import distributed
from mmspec_jax.decoding import inputs
from mmspec_jax.decoding.scheduler import Event, Scheduler

# How long the idle loop sleeps on the command queue before looking at `stopping` again.
_IDLE_POLL_SECONDS = 0.05


class QueueFull(Exception):
  """More requests wait than `max_waiting`."""


@dataclasses.dataclass
class _Stream:
  loop: asyncio.AbstractEventLoop
  queue: asyncio.Queue


def _put(stream: _Stream, item):
  """Hands `item` to the stream's event loop (none left to hear it once that loop has closed)."""
  try:
    stream.loop.call_soon_threadsafe(stream.queue.put_nowait, item)
  except RuntimeError:
    pass


class ServingEngine:
  """See the module docstring. `on_event(request, event)` (optional) sees every event on the
  engine's thread (the metrics)."""

  def __init__(self, scheduler: Scheduler, *, max_waiting: int,
               compile_lengths: Sequence[int] = (), on_event=None,
               messages: distributed.HostMessages | None = None):
    self.scheduler, self.max_waiting = scheduler, max_waiting
    self._compile_lengths = tuple(compile_lengths)
    self.on_event = on_event
    self.messages = messages  # To the other processes (None: this one alone).
    self._commands: queue.SimpleQueue = queue.SimpleQueue()
    self._ids = itertools.count()
    self._lock = threading.Lock()
    self._in_flight = 0  # Submitted and not yet finished (waiting or running).
    self._streams: dict[int, _Stream] = {}  # Our id -> its stream, until the engine takes it.
    # Engine thread only: our id -> scheduler handle, and per handle its id, stream and request.
    self._handles: dict[int, int] = {}
    self._live: dict[int, tuple[int, _Stream | None, inputs.Request]] = {}
    self.ready = threading.Event()
    self.stopping = threading.Event()
    self.error: BaseException | None = None
    self._thread = threading.Thread(target=self._run, name='mmspec-engine', daemon=True)

  # --- called from HTTP handlers -----------------------------------------------------------------
  def start(self):
    self._thread.start()

  @property
  def num_slots(self) -> int:
    return self.scheduler.programs.num_slots

  @property
  def num_running(self) -> int:
    return min(self._in_flight, self.num_slots)

  @property
  def num_waiting(self) -> int:
    return self._in_flight - self.num_running

  def check(self, request: inputs.Request, max_new_tokens: int):
    """The scheduler's checks (capacity, images, settings); host logic only, safe here."""
    self.scheduler.check(request, max_new_tokens)

  def submit(self, request: inputs.Request, max_new_tokens: int) -> tuple[int, asyncio.Queue]:
    """Queues a checked request: (its id, the asyncio queue its events arrive on; None ends
    them, an exception in the engine arrives as itself)."""
    if self.stopping.is_set():
      raise QueueFull('the server is shutting down')
    with self._lock:
      if self._in_flight >= self.num_slots + self.max_waiting:
        raise QueueFull(f'{self.num_waiting} requests are waiting (max_waiting '
                        f'{self.max_waiting}): try again later')
      self._in_flight += 1
    rid = next(self._ids)
    stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
    self._streams[rid] = stream  # Before the command: the engine takes it when it applies that.
    self._commands.put(('submit', rid, request, max_new_tokens))
    if self.error is not None or not self._thread.is_alive() and self.ready.is_set():
      self._streams.pop(rid, None)  # The engine is gone: nothing would ever answer.
      raise QueueFull('the decoding engine has stopped')
    return rid, stream.queue

  def cancel(self, rid: int):
    self._commands.put(('cancel', rid))

  async def events(self, rid: int, events: asyncio.Queue) -> AsyncIterator[Event]:
    """The request's events until its last; cancels it if the consumer stops early."""
    finished = False
    try:
      while True:
        event = await events.get()
        if isinstance(event, BaseException):
          raise RuntimeError(f'the decoding engine failed: {event!r}') from event
        yield event
        if event.finished is not None:
          finished = True
          return
    finally:
      if not finished:
        self.cancel(rid)

  def stop(self, timeout: float | None = None):
    """Stops admitting; what runs finishes, then the thread ends."""
    self.stopping.set()
    self._commands.put(('wake',))
    self._thread.join(timeout)

  # --- the engine thread ----------------------------------------------------------------------
  def _run(self):
    try:
      seconds = self.scheduler.compile(self._compile_lengths)
      logging.info('serving programs compiled in %.1fs', seconds)
      self.ready.set()
      while True:
        commands = self._take_commands(block=self.scheduler.idle)
        for command in commands:
          self._apply(command)
        done = self.stopping.is_set() and self.scheduler.idle and self._commands.empty()
        stepping = not self.scheduler.idle
        if self.messages is not None and (commands or done or stepping):
          self.messages.send(pickle.dumps((commands, done)))
        if done:
          if self.messages is not None:
            logging.info('sent the last of %d messages', self.messages.sent)
            # Process 0 holds the coordination service that carries the messages: it may not
            # exit before every process has read the last one.
            distributed.barrier('mmspec serving stopped')
          return
        if stepping:
          chunks = self.scheduler.chunks
          for event in self.scheduler.step():
            self._deliver(event)
          if self.messages is not None and self.scheduler.chunks != chunks:
            self.messages.forget_read()  # What every process has read (once per chunk).
    except BaseException as e:  # Every waiting coroutine hears of it; /health turns 503.
      logging.exception('the decoding engine failed')
      self.error = e
      for stream in [s for _, s, _ in self._live.values()] + list(self._streams.values()):
        _put(stream, e)
      if self.messages is not None:
        self.messages.send(pickle.dumps(([], 'failed')))

  def follow(self):
    """The loop of a process other than 0: process 0's commands, and its steps, until it stops."""
    seconds = self.scheduler.compile(self._compile_lengths)
    logging.info('serving programs compiled in %.1fs', seconds)
    while True:
      commands, done = pickle.loads(self.messages.receive())
      if done == 'failed':
        raise RuntimeError('the decoding engine of process 0 failed; see its log')
      for command in commands:
        self._apply(command)
      if done:
        distributed.barrier('mmspec serving stopped')
        return
      if not self.scheduler.idle:
        for event in self.scheduler.step():
          if event.finished is not None:  # Nothing streams here: forget it.
            rid, _, _ = self._live.pop(event.handle)
            del self._handles[rid]

  def _take_commands(self, block: bool) -> list[tuple]:
    """The commands queued by the handlers (waiting a moment for one when `block`)."""
    try:
      commands = [self._commands.get(timeout=_IDLE_POLL_SECONDS) if block else (
          self._commands.get_nowait())]
    except queue.Empty:
      return []
    while True:
      try:
        commands.append(self._commands.get_nowait())
      except queue.Empty:
        return [c for c in commands if c[0] != 'wake']

  def _apply(self, command):
    if command[0] == 'submit':
      _, rid, request, max_new_tokens = command
      handle = self.scheduler.submit(request, max_new_tokens)
      self._handles[rid] = handle
      self._live[handle] = (rid, self._streams.pop(rid, None), request)
    elif command[0] == 'cancel':
      handle = self._handles.get(command[1])
      if handle is not None:
        self.scheduler.cancel(handle)

  def _deliver(self, event: Event):
    rid, stream, request = self._live[event.handle]
    if self.on_event is not None:
      self.on_event(request, event)
    if event.finished is not None:
      del self._live[event.handle], self._handles[rid]
      with self._lock:
        self._in_flight -= 1
    _put(stream, event)
