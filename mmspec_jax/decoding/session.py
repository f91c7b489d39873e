"""One decode session: a target and its drafts loaded once onto a mesh, and the compiled programs
that decode batches of requests with them.

decode.py's runner, the evaluation, the data stage that asks the target for answers
(mmspec_jax/distillation.py) and the benchmarks all decode through this object:

  session = DecodeSession(target_dir, {'language': draft_dir}, dtype='float32')
  requests = session.read_requests('prompts.jsonl', max_new_tokens=64, num_draft_tokens=5)
  decoder = session.decoder('language', num_draft_tokens=5, sampling=SamplingConfig(),
                            max_new_tokens=64)
  batches = inputs.make_batches(requests, batch_size=8, buckets=(128, 256))
  compile_seconds = session.compile(decoder, batches)     # one program per prompt-length bucket
  for batch in batches:
    result, seconds = session.decode(decoder, batch, jax.random.key(0))  # on this host

Everything that can be checked is checked when the session is built, before any weights are
loaded: the models' kinds, the adapter draft against the target's vision tower, each draft's
vocabulary against the target's. On several processes every process builds the same session and
decodes the same batches; each batch is split over all devices of all hosts and `decode`
returns the whole result on every host.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mmspec_jax import distributed, sharding
from mmspec_jax.convert.hub import resolve_model
from mmspec_jax.convert.loading import read_config
from mmspec_jax.decoding import inputs, placement
from mmspec_jax.decoding.engine import SpeculativeDecoder
from mmspec_jax.decoding.scheduler import Scheduler
from mmspec_jax.decoding.slots import SlotPrograms
from mmspec_jax.decoding.sampling import SamplingConfig
from mmspec_jax.decoding.tree import DraftTree, DynamicTree
from mmspec_jax.models import (AdapterDraftConfig, FeatureDraftConfig, LlamaConfig, LlavaConfig,
                               build, parameter_count, text_config)
from mmspec_jax.models import precision
from mmspec_jax.models.config import SUPPORTED_DTYPES, ModelConfig, with_dtype
from mmspec_jax.data.processing import TOKENIZER_FILES, MultimodalProcessor, pad_batch
from mmspec_jax.data.vocabulary import check_compatible_vocabularies

DRAFT_KINDS = {LlamaConfig: 'language', AdapterDraftConfig: 'adapter',
               FeatureDraftConfig: 'feature'}


def target_config(target: str, dtype: str) -> ModelConfig:
  """The target's config in `dtype` (no weights read); refused unless LLaVA or LLaMA."""
  if dtype not in SUPPORTED_DTYPES:
    raise ValueError(f'unsupported dtype {dtype!r}; expected one of {SUPPORTED_DTYPES}')
  config = with_dtype(read_config(target), dtype)
  if not isinstance(config, (LlavaConfig, LlamaConfig)):
    raise ValueError(f'target {target!r} must be a LLaVA or LLaMA model, not an adapter draft')
  return config


def _in_dtype(config: ModelConfig, params: Any, dtype: str) -> tuple[ModelConfig, Any]:
  """A model in memory computing in `dtype`, its floating-point params cast to it."""
  config = with_dtype(config, dtype)
  if params is not None:
    params = jax.tree.map(
        lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, params)
  return config, params


def draft_config(draft: str, target: ModelConfig, dtype: str) -> ModelConfig:
  """A draft's config in `dtype`, checked against the target's (no weights read)."""
  config = with_dtype(read_config(draft), dtype)
  if not isinstance(config, (LlamaConfig, AdapterDraftConfig, FeatureDraftConfig)):
    raise ValueError(f'draft {draft!r} must be a LLaMA, adapter or feature draft model, not '
                     f'{type(config).__name__}')
  if isinstance(config, FeatureDraftConfig):
    try:
      config.check_target(text_config(target))
    except ValueError as error:
      raise ValueError(f'draft {draft!r}: {error}') from None
  if isinstance(config, AdapterDraftConfig) and isinstance(target, LlavaConfig):
    # The adapter reads the target's vision features and fills the target's placeholders.
    if config.vision_hidden_size != target.vision.hidden_size:
      raise ValueError(f'adapter draft {draft!r} expects vision features of width '
                       f'{config.vision_hidden_size}, the target\'s vision tower gives '
                       f'{target.vision.hidden_size}')
    if config.image_token_index != target.image_token_index:
      raise ValueError(f'adapter draft {draft!r} uses image token {config.image_token_index}, '
                       f'the target {target.image_token_index}')
  return config


def check_draft_vocabulary(draft: str, processor: MultimodalProcessor, target: ModelConfig,
                           config: ModelConfig):
  has_tokenizer = any(os.path.isfile(os.path.join(draft, f)) for f in TOKENIZER_FILES)
  # A draft directory without tokenizer files is taken to share the target's tokenizer.
  draft_tokenizer = (MultimodalProcessor.from_pretrained(draft).tokenizer if has_tokenizer
                     else processor.tokenizer)
  try:
    check_compatible_vocabularies(processor.tokenizer, draft_tokenizer,
                                  text_config(config).vocab_size, text_config(target).vocab_size)
  except ValueError as e:
    raise ValueError(f'draft {draft!r}: {e}') from e


def eos_token_ids(target: ModelConfig, processor: MultimodalProcessor | None
                  ) -> tuple[int, ...]:
  """The target's text EOS id(s) (several for LLaMA 3), else the tokenizer's, else none."""
  eos = text_config(target).eos_token_id
  if eos is None and processor is not None:
    eos = processor.eos_token_id
  if eos is None:
    return ()
  return tuple(int(i) for i in eos) if isinstance(eos, (tuple, list)) else (int(eos),)


@dataclasses.dataclass(frozen=True)
class Decoder:
  """A decoder of the session: which draft (None: the target alone), gamma and sampling, and
  whether its programs take images (a run without any passes none: no vision tower runs)."""
  draft: str | None
  num_draft_tokens: int
  sampling: SamplingConfig
  max_new_tokens: int
  with_images: bool
  eos_token_ids: tuple[int, ...]
  draft_tree: DraftTree | DynamicTree | None = None
  confidence_threshold: float = 0.0
  # Each request samples under its own settings (Request.sampling; `sampling` the default).
  per_request_sampling: bool = False


class DecodeSession:
  """See the module docstring."""

  def __init__(self, target: str, drafts: Mapping[str, str] | None = None, *,
               dtype: str = 'float32', mesh_shape: Mapping[str, int] | None = None,
               rules: Sequence[tuple[str, Any]] = sharding.DEFAULT_RULES,
               draft_rules: Sequence[tuple[str, Any]] = sharding.DRAFT_RULES,
               layout_config: Mapping[str, Any] | None = None):
    """Args:
      target: the LLaVA (or LLaMA) target's directory, Hugging Face or converted, or a Hub id.
      drafts: {name: directory or Hub id} of the drafts to decode with (LLaMA or adapter drafts).
      dtype: compute and parameter dtype of every model; 'auto': the faster on this host for
        the session's calls (models/precision.py).
      mesh_shape: axis -> size (-1 fills); default every device on `data`.
      rules, draft_rules: logical axis rules of the target and of the drafts.
      layout_config: decode.py's config.layout (attention kernel, scan); default the backend's.
    """
    dtype = precision.resolve(dtype, verifies=bool(drafts))
    target = resolve_model(target)  # A Hub id -> its cached snapshot.
    drafts = {name: resolve_model(directory) for name, directory in (drafts or {}).items()}
    self.target_dir, self.draft_dirs, self.dtype = target, drafts, dtype
    self.rules, self.draft_rules = tuple(map(tuple, rules)), tuple(map(tuple, draft_rules))
    self.target_config = target_config(target, dtype)
    self.processor = MultimodalProcessor.from_pretrained(target)
    self.draft_configs = {}
    for name, directory in drafts.items():
      self.draft_configs[name] = draft_config(directory, self.target_config, dtype)
      check_draft_vocabulary(directory, self.processor, self.target_config,
                             self.draft_configs[name])
    self._finish(layout_config, mesh_shape)

  @classmethod
  def from_params(cls, processor: MultimodalProcessor | None, target: tuple[ModelConfig, Any],
                  drafts: Mapping[str, tuple[ModelConfig, Any]] | None = None, *,
                  dtype: str = 'float32', layout_config: Mapping[str, Any] | None = None,
                  mesh: jax.sharding.Mesh | None = None) -> DecodeSession:
    """A session over models already in memory, as canonical (config, params) pairs, placed on
    `mesh` (default: every device on `data`; the benchmarks: a target widened in memory has no
    directory). Without a
    processor (a model with no tokenizer, decoding given token ids), prompts are padded with
    the model's pad id, and requests may carry no image."""
    session = cls.__new__(cls)
    session.target_dir, session.dtype = None, precision.resolve(dtype, verifies=bool(drafts))
    session.draft_dirs = {name: None for name in drafts or {}}
    session.rules, session.draft_rules = sharding.DEFAULT_RULES, sharding.DRAFT_RULES
    target = _in_dtype(*target, session.dtype)
    drafts = {name: _in_dtype(*model, session.dtype) for name, model in (drafts or {}).items()}
    session.target_config, session.processor = target[0], processor
    session.draft_configs = {name: config for name, (config, _) in drafts.items()}
    session._finish(layout_config, None, mesh)
    session.target_params = placement.decoding_params(
        target[0], target[1], session.target_layout, session.mesh, session.rules)
    session.draft_params = {
        name: None if params is None else placement.decoding_params(
            config, params, session.draft_layout, session.mesh, session.draft_rules)
        for name, (config, params) in drafts.items()}
    return session

  def _finish(self, layout_config, mesh_shape, mesh=None):
    """What both constructors set once the configs and the processor are known."""
    self.eos_token_ids = eos_token_ids(self.target_config, self.processor)
    self.image_shape = None
    if isinstance(self.target_config, LlavaConfig):
      vision = self.target_config.vision
      self.image_shape = (vision.image_size, vision.image_size, vision.num_channels)
    self.target_layout = placement.decoding_layout(
        layout_config, verifies=bool(self.draft_configs), dtype=self.dtype)
    self.draft_layout = placement.decoding_layout(layout_config, dtype=self.dtype)
    self.mesh = mesh or sharding.make_mesh(dict(mesh_shape or {'data': -1}))
    self._image_size_checked = False
    self._decoders: dict[Decoder, SpeculativeDecoder] = {}
    self._compiled: dict[tuple[Decoder, int, int, int | None], Any] = {}
    self._slot_programs: dict[tuple[Decoder, int, int], SlotPrograms] = {}
    self.target_params = self.draft_params = None

  def with_target(self, config: ModelConfig, params: Any) -> DecodeSession:
    """This in-memory session's drafts (as arranged) beside another target (canonical params)."""
    return DecodeSession.from_params(
        self.processor, (config, params),
        {name: (c, None) for name, c in self.draft_configs.items()}, dtype=self.dtype
    )._with_draft_params(self.draft_params)

  def _with_draft_params(self, draft_params):
    self.draft_params = draft_params
    return self

  # --- loading ------------------------------------------------------------------------------
  def load(self) -> DecodeSession:
    """Loads every model straight onto the mesh, in its decoding layout (once)."""
    if self.target_params is None:
      logging.info('loading target %s', self.target_dir)
      self.target_params = placement.load_for_decoding(
          self.target_dir, self.target_config, self.dtype, self.mesh, self.rules,
          layout=self.target_layout)
      self.draft_params = {}
      for name, directory in self.draft_dirs.items():
        logging.info('loading draft %s', directory)
        self.draft_params[name] = placement.load_for_decoding(
            directory, self.draft_configs[name], self.dtype, self.mesh, self.draft_rules,
            layout=self.draft_layout)
    return self

  def parameter_counts(self) -> dict[str | None, int]:
    """{None: the target's, draft name: the draft's} parameter counts (after load())."""
    self.load()
    return {None: parameter_count(self.target_params),
            **{name: parameter_count(p) for name, p in self.draft_params.items()}}

  # --- requests -------------------------------------------------------------------------------
  def read_requests(self, path: str, *, max_new_tokens: int, num_draft_tokens: int = 0,
                    raw_prompt: bool = False,
                    sampling: SamplingConfig | None = None) -> list[inputs.Request]:
    """decode.py's JSONL prompts, validated for this target and every draft; `sampling`: the
    run's settings, the default of a request's own."""
    requests = inputs.read_requests(
        path, self.processor, self.target_config, raw_prompt=raw_prompt,
        max_new_tokens=max_new_tokens, num_draft_tokens=num_draft_tokens,
        drafts=tuple(self.draft_configs.values()), sampling=sampling)
    self.check_images(requests)
    return requests

  def prompt_request(self, prompt: str, image: str | None, *, max_new_tokens: int,
                     num_draft_tokens: int = 0, raw_prompt: bool = False,
                     sampling: SamplingConfig | None = None) -> inputs.Request:
    """One request from a prompt and an optional image path (relative to the working directory),
    checked as a JSONL line is."""
    row = {'id': 'prompt', 'prompt': prompt, **({'image': image} if image else {})}
    request = inputs.parse_request(
        row, 'the prompt', os.path.join(os.getcwd(), 'prompt'), 1, self.processor,
        self.target_config, raw_prompt=raw_prompt, max_new_tokens=max_new_tokens,
        num_draft_tokens=num_draft_tokens, drafts=tuple(self.draft_configs.values()),
        sampling=sampling)
    self.check_images([request])
    return request

  def check_images(self, requests: Sequence[inputs.Request]):
    """The processor must produce what the vision tower was built for; checked on one image."""
    image = next((r.image for r in requests if r.image is not None), None)
    if image is None or self._image_size_checked or self.image_shape is None:
      return
    pixels = self.processor.preprocess_images([image])
    if pixels.shape[1:] != self.image_shape:
      raise ValueError(f'the image processor of {image!r} gives pixels of shape '
                       f'{pixels.shape[1:]}, the target\'s vision tower expects '
                       f'{self.image_shape}')
    self._image_size_checked = True

  def batch_arrays(self, batch: inputs.Batch, with_images: bool = True,
                   pixels: Sequence[np.ndarray | None] | None = None):
    """(tokens int32[B, T], lengths int32[B], images float32[B, H, W, 3] or None). `pixels`:
    each row's preprocessed image (float32[H, W, 3]), when already computed."""
    rows = [r.token_ids for r in batch.requests]
    if self.processor is None:
      pad_id = text_config(self.target_config).pad_token_id or 0
      tokens, lengths = pad_batch(rows, pad_id, pad_to=batch.length)
    else:
      tokens, lengths = self.processor.pad_batch(rows, pad_to=batch.length)
    if self.image_shape is None or not with_images:
      return tokens, lengths, None
    # Rows without an image get zeros: they have no placeholders, so the zeros are never read.
    images = np.zeros((len(batch.requests),) + self.image_shape, np.float32)
    rows = [i for i, r in enumerate(batch.requests) if r.image is not None]
    if pixels is not None:
      for i in rows:
        images[i] = pixels[i]
    elif rows:
      images[rows] = self.processor.preprocess_images([batch.requests[i].image for i in rows])
    return tokens, lengths, images

  # --- decoders and programs ------------------------------------------------------------------
  def decoder(self, draft: str | None, *, num_draft_tokens: int, sampling: SamplingConfig,
              max_new_tokens: int, requests: Sequence[inputs.Request] = (),
              eos_token_ids: Sequence[int] | None = None,
              draft_tree: DraftTree | DynamicTree | None = None,
              confidence_threshold: float = 0.0,
              per_request_sampling: bool | None = None,
              with_images: bool | None = None) -> Decoder:
    """The decoder for these settings, built once. `requests`: those it will decode; its
    programs take images when the target is a LLaVA and any of them has one. `eos_token_ids`:
    default the target's; () lets every row run to max_new_tokens (the benchmarks).
    `draft_tree` (its depth must be num_draft_tokens) and `confidence_threshold`: the engine's.
    `per_request_sampling`: whether each row samples under its request's own settings (default:
    when any of `requests` gives settings other than `sampling`; slot programs only).
    `with_images`: whether its programs take images (default: from `requests`)."""
    if draft is not None and draft not in self.draft_configs:
      raise ValueError(f'unknown draft {draft!r}; this session has {sorted(self.draft_configs)}')
    if draft is not None and num_draft_tokens < 1:
      raise ValueError(f'num_draft_tokens (gamma) must be >= 1 with a draft, got '
                       f'{num_draft_tokens}')
    if with_images is None:
      with_images = any(r.image is not None for r in requests)
    with_images = with_images and self.image_shape is not None
    eos = self.eos_token_ids if eos_token_ids is None else tuple(eos_token_ids)
    if per_request_sampling is None:
      per_request_sampling = any(r.sampling not in (None, sampling) for r in requests)
    spec = Decoder(draft, num_draft_tokens if draft is not None else 0, sampling,
                   max_new_tokens, with_images, eos, draft_tree if draft is not None else None,
                   confidence_threshold if draft is not None else 0.0, per_request_sampling)
    if spec not in self._decoders:
      self._decoders[spec] = SpeculativeDecoder(
          target=build(self.target_config, self.target_layout),
          draft=None if draft is None else build(self.draft_configs[draft], self.draft_layout),
          num_draft_tokens=spec.num_draft_tokens, sampling=sampling,
          max_new_tokens=max_new_tokens, eos_token_ids=spec.eos_token_ids,
          draft_rules=self.draft_rules, draft_tree=spec.draft_tree,
          confidence_threshold=spec.confidence_threshold,
          per_request_sampling=per_request_sampling)
    return spec

  def engine(self, decoder: Decoder) -> SpeculativeDecoder:
    return self._decoders[decoder]

  def _program_key(self, decoder: Decoder, batch: inputs.Batch, draft_prompt_length=None):
    engine = self._decoders[decoder]
    if draft_prompt_length is None:
      draft_prompt_length = engine.draft_prompt_length([r.token_ids for r in batch.requests],
                                                        batch.length)
    return decoder, len(batch.requests), batch.length, draft_prompt_length

  def compile(self, decoder: Decoder, batches: Sequence[inputs.Batch],
              draft_prompt_length: int | None = None) -> float:
    """Compiles (ahead of time) one program per distinct batch shape; returns the seconds.

    draft_prompt_length: one draft prompt width for every batch (default: each batch's own).
    """
    self.load()
    start = time.perf_counter()
    for batch in batches:
      key = self._program_key(decoder, batch, draft_prompt_length)
      if key not in self._compiled:
        self._compiled[key] = self._compile_program(self._decoders[decoder], *key)
    return time.perf_counter() - start

  def _compile_program(self, engine: SpeculativeDecoder, decoder: Decoder, batch_size: int,
                       length: int, draft_prompt_length: int | None):
    """One ahead-of-time compiled `generate` for batches of this shape."""
    image_shape = self.image_shape if decoder.with_images else None
    with placement.mesh_context(self.mesh, self.rules):
      return engine.generate.lower(
          self.target_params, self._params(decoder),
          *placement.input_structs(batch_size, length, image_shape, self.mesh, self.rules),
          placement.keys_struct(batch_size, self.mesh, self.rules),
          draft_prompt_length=draft_prompt_length).compile()

  def scheduler(self, decoder: Decoder, *, num_slots: int, capacity: int, chunk_steps: int = 8,
                buckets: Sequence[int] = inputs.DEFAULT_BUCKETS, prefill_width: int = 4,
                key: jax.Array | None = None, refill: bool = True,
                admission_order: str = 'arrival') -> Scheduler:
    """Continuous batching with this decoder over `num_slots` slots of `capacity` positions
    (the longest prompt + max_new_tokens a request may bring; the decoder's max_new_tokens is the
    most any request may ask for); `chunk_steps` steps per chunk; new requests are prefilled
    `prefill_width` at a time, padded to a length bucket. `key`: the run's key, from which a
    request without a seed draws (inputs.request_keys); `refill=False`: closed batches on the
    same programs (the benchmark's static baseline); `admission_order`: 'arrival' (first come first
    served) or 'longest_first' (the largest max_new_tokens first: a batch job's shorter tail).
    See decoding/scheduler.py."""
    # Drafts of one config share their programs (each runs with its own params): the key names
    # a draft by its config.
    same_programs = dataclasses.replace(
        decoder, draft=None if decoder.draft is None else self.draft_configs[decoder.draft])
    programs_key = (same_programs, num_slots, capacity)
    if programs_key not in self._slot_programs:
      self._slot_programs[programs_key] = SlotPrograms(self._decoders[decoder], num_slots,
                                                       capacity)
    self.load()
    return Scheduler(self, decoder, self._slot_programs[programs_key], chunk_steps=chunk_steps,
                     buckets=buckets, prefill_width=prefill_width,
                     run_key=jax.random.key(0) if key is None else key, refill=refill,
                     admission_order=admission_order)

  def _params(self, decoder: Decoder):
    return None if decoder.draft is None else self.draft_params[decoder.draft]

  def place(self, decoder: Decoder, batch: inputs.Batch, key: jax.Array,
            draft_prompt_length: int | None = None):
    """(the batch's compiled program, its placed arguments): tokens, lengths, images and the
    rows' keys, inputs.request_keys(batch.requests, key), on the mesh."""
    program = self._compiled.get(self._program_key(decoder, batch, draft_prompt_length))
    if program is None:
      raise ValueError('this batch\'s program is not compiled: call compile() with its batches '
                       'first')
    arrays = self.batch_arrays(batch, decoder.with_images)
    placed = placement.place_inputs(*arrays, self.mesh, self.rules)
    keys = placement.place_keys(inputs.request_keys(batch.requests, key), self.mesh, self.rules)
    return program, (self.target_params, self._params(decoder), *placed, keys)

  def decode(self, decoder: Decoder, batch: inputs.Batch, key: jax.Array,
             draft_prompt_length: int | None = None):
    """Decodes one batch with its compiled program: (the engine's result on this host, as numpy
    arrays, every row included; the seconds the program ran)."""
    program, arguments = self.place(decoder, batch, key, draft_prompt_length)
    start = time.perf_counter()
    result = jax.block_until_ready(program(*arguments))
    seconds = time.perf_counter() - start
    return jax.tree.map(np.asarray, distributed.fetch(result)), seconds
