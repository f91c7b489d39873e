"""The input side of a training run: tokenizer checks, local data preparation, iterators."""

from __future__ import annotations

import jax

from mmspec_jax import distributed
from mmspec_jax.convert.loading import read_config
from mmspec_jax.data import builders
from mmspec_jax.data.pipeline import make_iterator
from mmspec_jax.models import LlavaConfig, text_config
from mmspec_jax.models.config import from_dict
from mmspec_jax.data.vocabulary import check_compatible_vocabularies, check_tokenizer_fits


class DataSetup:
  """Prepares (if asked) and opens the run's dataset; one iterator per split."""

  def __init__(self, config, image_model):
    """image_model: the LLaVA config whose image tokens multimodal batches carry, or None."""
    from transformers import AutoTokenizer
    self.config = config
    self.tokenizer_dir = config.tokenizer or config.target
    if not self.tokenizer_dir:
      raise ValueError('no tokenizer: set config.tokenizer (a directory with the target\'s '
                       'tokenizer) or config.target')
    self.tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_dir)
    model_vocab = text_config(from_dict(config.model.to_dict())).vocab_size
    # Added tokens included: special ones may lie past the model's ids (a draft's <image> and
    # <pad>), regular text may not.
    check_tokenizer_fits(self.tokenizer, model_vocab, f'the tokenizer in {self.tokenizer_dir!r}')
    if config.target and config.tokenizer:
      # The draft must mean by each id what the target means, or it can never be accepted.
      target_tokenizer = AutoTokenizer.from_pretrained(config.target)
      check_compatible_vocabularies(target_tokenizer, self.tokenizer, model_vocab,
                                    text_config(read_config(config.target)).vocab_size)
    self.image_model = image_model
    self.preprocess_images = None
    kind = config.data.kind
    if kind not in ('pretrain', 'chat', 'multimodal'):
      raise ValueError(f"unknown config.data.kind {kind!r}; expected 'pretrain', 'chat' or "
                       "'multimodal'")
    if kind == 'multimodal':
      if not isinstance(image_model, LlavaConfig):
        raise ValueError('multimodal data needs a LLaVA model for its image tokens and image '
                         'preprocessing: set config.target (or train a LLaVA with task llava)')
      from mmspec_jax.data.processing import MultimodalProcessor
      self.preprocess_images = MultimodalProcessor.from_pretrained(
          config.target or self.tokenizer_dir).preprocess_images
    self.name = self._prepare()

  def _prepare(self) -> str:
    data = self.config.data
    if not data.data_dir:
      raise ValueError('config.data.data_dir is empty: the TFDS directory of prepared datasets')
    spec = data.prepare
    if spec.builder:
      sources = {'text_corpus': dict(files=spec.files),
                 'llava_conversations': dict(json_files=spec.json_files,
                                             image_folder=spec.image_folder)}
      if spec.builder not in sources:
        raise ValueError(f'unknown config.data.prepare.builder {spec.builder!r}; expected one of '
                         f'{sorted(sources)}')
      if distributed.is_primary():
        builders.prepare(spec.builder, data.data_dir, config_name=spec.config_name,
                         validation_fraction=spec.validation_fraction, **sources[spec.builder])
      distributed.barrier('data prepared')  # The other hosts read what process 0 wrote.
      return data.name or f'{spec.builder}/{spec.config_name}'
    if not data.name:
      raise ValueError('config.data.name is empty: name a prepared dataset (e.g. lm1b) or set '
                       'config.data.prepare to build one from local files')
    return data.name

  def _iterator(self, split: str, seed: int):
    config, data = self.config, self.config.data
    process_count = jax.process_count()
    if config.batch_size % process_count:
      raise ValueError(f'batch_size {config.batch_size} does not split over {process_count} hosts')
    source = builders.load_source(self.name, data.data_dir, split=split,
                                  text_key=data.text_key if data.kind == 'pretrain' else None)
    extra = {}
    if data.kind == 'multimodal':
      extra = dict(num_image_tokens=self.image_model.num_image_tokens,
                   image_token_id=self.image_model.image_token_index,
                   preprocess_images=self.preprocess_images)
    return make_iterator(
        data.kind, source, self.tokenizer, batch_size=config.batch_size // process_count,
        seq_len=data.seq_len, seed=seed, process_index=jax.process_index(),
        process_count=process_count, text_key=data.text_key, prefetch=data.prefetch,
        workers=data.workers, **extra)

  def train_iterator(self):
    return self._iterator(self.config.data.train_split, self.config.seed)

  def eval_iterator(self):
    """The same held-out batches at every evaluation (a fixed seed)."""
    return self._iterator(self.config.data.eval_split, seed=0)
