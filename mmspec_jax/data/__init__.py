"""Input data: TFDS builders for local files, LLaVA conversation tokenization, packing, batches.

  builders.py             prepare(), load_source(); re-exports the two builders below
  text_corpus.py          TextCorpus: plain-text / JSONL files -> {'text'}
  llava_conversations.py  LlavaConversations: LLaVA JSON + image folder -> conversations, image
  local_files.py          what both builders share: globs, stable held-out split, provenance
  conversation.py         LLaVA-1.5 conversation -> (token ids, loss mask)
  packing.py              examples -> rows of inputs / targets / loss_mask / positions / segments
  pipeline.py             BatchIterator (deterministic, resumable, the same global batches on
                          any number of hosts), make_iterator(), merge_states()

Nothing here imports the models or the training code; the training loop consumes BatchIterator.
Modules are imported on use (`from mmspec_jax.data import pipeline`): the builders pull in
tensorflow_datasets, which conversation, packing and pipeline do not need.
"""
