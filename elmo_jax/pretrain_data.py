"""ELMo pretraining data: corpus -> word vocabulary -> sentence shards -> batches of padded sentences.

Documents -> rows (`sentence_rows`, written once to shards): every sentence is one row of word ids; a sentence
longer than `max_seq_length - 2` words is cut into consecutive pieces of that many words. Documents are shuffled
once with the data seed (`common.data.prepare`), rows keep their document's order within a shard.

Rows -> batch (`rows_to_batch`, row-wise, at load time): row `b` becomes `<S> w_1 .. w_n </S>` padded at the end to
`max_seq_length`:

  token_ids  [batch, max_seq_length] int32          word ids (`<UNK>` for unknown words), 0 at padding
  char_ids   [batch, max_seq_length, chars] int32   character ids of every word, padding-character rows at padding
  lengths    [batch] int32                          n + 2 real tokens

The objective predicts token t+1 from the forward LM at t and token t-1 from the backward LM at t, over real
tokens only.
"""
from __future__ import annotations

import functools
import os
from typing import Any, Iterable, Mapping, Sequence

import ml_collections
import numpy as np

from common import storage
from common.data import prepare, shards
from common.data.prepare import token_dtype

FORMAT = 'elmo_jax.pretrain_data/1'
SOFTMAX_KINDS = ('full', 'sampled')


def data_config(**overrides) -> ml_collections.ConfigDict:
  """The `data` section of an ELMo pretraining config (defaults: embedded corpus, full softmax)."""
  fields = dict(
      **prepare.source_fields(),  # corpus, eval_corpus.
      vocab_file='',              # '' = count the words of the train split.
      vocab_size=8000,            # at most this many words (with <S>, </S>, <UNK>)
      max_seq_length=32,          # tokens of a row, <S> and </S> included
      softmax='full',             # 'full', or 'sampled' (training only; eval is always the full softmax)
      num_sampled=64,             # words drawn (log-uniform, i.e. Zipfian over the frequency-ordered vocabulary)
      **prepare.shard_fields(),   # num_shards, num_workers, seed, loader_threads.
  )
  return ml_collections.ConfigDict({**fields, **overrides})


def validate_data_config(cfg: ml_collections.ConfigDict, prefix: str = 'data') -> None:
  """Raises `ConfigError('config.<prefix>.<field>: ...')`, one line naming the first bad field."""
  check = prepare.ConfigChecker(cfg, prefix)
  check.sources()
  check.tokenizer('vocab_file', 'a word vocabulary')
  check(prepare.is_int(cfg.max_seq_length) and 3 <= cfg.max_seq_length <= 65535, 'max_seq_length',
        f'must be an integer in [3, 65535] (<S> w </S> needs 3), got {cfg.max_seq_length!r}')
  check(cfg.softmax in SOFTMAX_KINDS, 'softmax', f'must be one of {SOFTMAX_KINDS}, got {cfg.softmax!r}')
  check.positive_ints('num_sampled', 'num_shards', 'num_workers', 'loader_threads')
  check.seed()


# ----------------------------------------------------------------------------------------------------------------------
# Documents -> rows, rows -> batch (pure).
# ----------------------------------------------------------------------------------------------------------------------

def sentence_rows(tokens: np.ndarray, sentence_lengths: np.ndarray, max_words: int) -> list[np.ndarray]:
  """One document `(tokens [t], sentence_lengths [s])` -> rows of at most `max_words` word ids each."""
  rows = []
  for sentence in np.split(tokens, np.cumsum(sentence_lengths)[:-1]):
    rows.extend(sentence[start:start + max_words] for start in range(0, len(sentence), max_words))
  return rows


def rows_to_batch(rows: Sequence[np.ndarray], *, max_seq_length: int, char_table: np.ndarray, bos_id: int,
                  eos_id: int) -> dict[str, np.ndarray]:
  """Rows of word ids -> the batch dict of the module docstring. `char_table [vocab, chars]` gives every word's
  characters (`WordVocabulary.char_table`)."""
  batch = len(rows)
  token_ids = np.zeros([batch, max_seq_length], np.int32)
  lengths = np.zeros([batch], np.int32)
  for b, row in enumerate(rows):
    words = np.asarray(row, np.int64)[:max_seq_length - 2]
    n = len(words) + 2
    token_ids[b, :n] = np.concatenate([[bos_id], words, [eos_id]])
    lengths[b] = n
  char_ids = char_table[token_ids]
  padding = np.arange(max_seq_length)[None, :] >= lengths[:, None]
  char_ids[padding] = _padding_chars(char_table.shape[1])
  return {'token_ids': token_ids, 'char_ids': char_ids.astype(np.int32), 'lengths': lengths}


def _padding_chars(max_characters: int) -> np.ndarray:
  from elmo_jax.tokenizer import PAD_CHAR  # pylint: disable=import-outside-toplevel
  return np.full([max_characters], PAD_CHAR, np.int32)


def batch_template(max_seq_length: int, max_characters: int, batch_size: int = 1) -> dict[str, np.ndarray]:
  """A batch of the right shapes and dtypes (empty sentences), for compiling without data."""
  table = np.zeros([2, max_characters], np.int32)
  return rows_to_batch([np.zeros([0], np.int32)] * batch_size, max_seq_length=max_seq_length, char_table=table,
                       bos_id=0, eos_id=1)


def _batch_fn(records, keys, epoch, **kwargs):
  del keys, epoch  # nothing random: a batch is its rows
  return rows_to_batch([r['ids'] for r in records], **kwargs)


def make_loader_from_source(source: Any, config: ml_collections.ConfigDict, tokenizer: Any, *, seed: int,
                            shuffle: bool, process_index: int = 0, process_count: int = 1, prefetch: int = 2):
  """A `StepLoader` over any random-access source of `{'ids': [n]}` rows (shards, or a list in tests)."""
  from common.data.pipeline import StepLoader  # pylint: disable=import-outside-toplevel
  batch_fn = functools.partial(_batch_fn, max_seq_length=config.data.max_seq_length,
                               char_table=tokenizer.char_table(config.model.max_characters_per_token),
                               bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id)
  return StepLoader(source, batch_fn, config.global_batch_size, seed=seed, process_index=process_index,
                    process_count=process_count, shuffle=shuffle, prefetch=prefetch,
                    num_threads=int(config.data.get('loader_threads', 1)))


def make_loader(shard_dir: str | os.PathLike, config: ml_collections.ConfigDict, tokenizer: Any, *, seed: int,
                shuffle: bool, process_index: int = 0, process_count: int = 1, prefetch: int = 2):
  """A `StepLoader` over sentence shards producing the batch dict of the module docstring (train: shuffled,
  eval: in order, the last batch of a pass completed by wrapping around)."""
  reader = shards.ShardReader(shard_dir)
  written = reader.metadata['info'].get('settings', {})
  max_words = config.data.max_seq_length - 2
  if written.get('max_words', max_words) > max_words:
    raise ValueError(f'{shard_dir} was written with rows of up to {written["max_words"]} words, config '
                     f'max_seq_length={config.data.max_seq_length} holds {max_words}')
  return make_loader_from_source(reader, config, tokenizer, seed=seed, shuffle=shuffle, process_index=process_index,
                                 process_count=process_count, prefetch=prefetch)


# ----------------------------------------------------------------------------------------------------------------------
# Writing shards.
# ----------------------------------------------------------------------------------------------------------------------

def _shard_features(settings: Mapping[str, Any]) -> dict[str, tuple[str, tuple]]:
  return {'ids': (token_dtype(settings['vocab_size']), (None,))}


def _shard_tasks(documents: Sequence[tuple[np.ndarray, np.ndarray]], settings: Mapping[str, Any],
                 info: Mapping[str, Any]) -> list[dict[str, Any]]:
  """Shuffled documents dealt round-robin into `num_shards` groups, one task (a packed group) per shard."""
  num_shards, dtype = settings['num_shards'], token_dtype(info['vocab_size'])
  return [{'settings': settings, **prepare.pack_documents(documents[shard::num_shards], dtype)}
          for shard in range(num_shards)]


def _shard_records(task: Mapping[str, Any]):
  """Worker side: the rows of one shard's documents, in order."""
  max_words = task['settings']['max_words']
  for tokens, lengths in prepare.unpack_documents(task):
    for row in sentence_rows(tokens, lengths, max_words):
      yield {'ids': row}
  return {}


def _summary(metadata: Mapping[str, Any], stats: Mapping[str, Any]) -> dict[str, Any]:
  features = stats['features']
  return {'rows': metadata['num_records'], 'mean_words': round(features['ids']['mean'], 3)}


SHARD_FORMAT = prepare.ShardFormat(FORMAT, make_tasks=_shard_tasks, make_records=_shard_records,
                                   features=_shard_features, summary=_summary)


def write_pretraining_shards(documents: Iterable[Sequence[str]], tokenizer: Any, out_dir: str | os.PathLike,
                             cfg: ml_collections.ConfigDict, *, num_shards: int, num_workers: int, seed: int,
                             input_fingerprint: str | None = None, read_stats: Any = None) -> dict[str, Any]:
  """Splits documents into words, cuts sentence rows and writes shards (reused when the fingerprint matches)."""
  info = {'vocab_size': int(tokenizer.vocab_size)}
  settings = dict(max_words=int(cfg.max_seq_length) - 2, vocab_size=info['vocab_size'], seed=int(seed),
                  num_shards=int(num_shards))
  return prepare.write_tokenized_shards(documents, tokenizer, out_dir, SHARD_FORMAT, settings=settings, info=info,
                                        tokenizer_digest=tokenizer.digest(), num_workers=num_workers,
                                        input_fingerprint=input_fingerprint, read_stats=read_stats)


def prepare_pretraining_data(data_cfg: ml_collections.ConfigDict, work_dir: str | os.PathLike):
  """Corpus -> word vocabulary -> train and eval shards under `work_dir`; every stage reused when unchanged.

  Returns `(vocabulary, train_dir, eval_dir)`.
  """
  from elmo_jax import tokenizer as elmo_tokenizer  # pylint: disable=import-outside-toplevel
  validate_data_config(data_cfg)
  work_dir = storage.fspath(work_dir)
  sources = prepare.sources_from_config(data_cfg, storage.join(work_dir, 'corpus'))
  vocab_dir = storage.join(work_dir, 'tokenizer')
  size = data_cfg.vocab_size
  vocabulary = prepare.prepare_tokenizer(
      vocab_dir, given=data_cfg.vocab_file, train_files=sources.train_files,
      trained_path=storage.join(vocab_dir, elmo_tokenizer.VOCAB_FILE),
      settings={'vocab_size': size, 'splitter': 'words/1'},
      train=lambda: elmo_tokenizer.train_vocabulary(sources.train_files, size, vocab_dir),
      load=elmo_tokenizer.load_vocabulary)
  eval_shards = prepare.eval_num_shards(data_cfg)
  train_dir, eval_dir = prepare.write_splits(
      functools.partial(write_pretraining_shards, tokenizer=vocabulary, cfg=data_cfg, num_workers=data_cfg.num_workers),
      sources, work_dir, num_shards=data_cfg.num_shards, eval_num_shards=eval_shards, seed=data_cfg.seed)
  return vocabulary, train_dir, eval_dir
