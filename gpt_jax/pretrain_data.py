"""GPT pretraining data: documents packed into contiguous rows, shards, and the step loader.

Pipeline (run once by `prepare_pretraining_data` with the stages of `common.data.prepare`, every stage reused when
its inputs have not changed):

  corpus (one sentence per line, blank line between documents)
    -> byte-level BPE (trained on the train split, or loaded from `vocab_file` + the `merges.txt` beside it)
    -> documents of token ids (each sentence encoded with a leading space, so sentences stay separated by one
       space as the BPE saw them in training; documents that tokenise to nothing are counted and skipped)
    -> `pack_rows`: per shard, its documents as one stream `<|endoftext|> doc <|endoftext|> doc ...` cut into rows
       of `max_seq_length + 1` tokens, consecutive rows overlapping by one token, so every token of the stream but
       the first is a target exactly once and no row is padded except the stream's last
    -> `make_loader`: a `common.data.pipeline.StepLoader` whose batch function is `rows_to_batch`.

Rows see across document boundaries (the separator tells the model a new document starts), as GPT-2's packing.
Documents are shuffled (by `seed`) and dealt round-robin into `num_shards` groups; shard `i` is group `i`'s stream,
so shard contents depend on (`seed`, `num_shards`) but never on `num_workers`.

Batches (numpy): `input_ids [B, L] int32` (row[:-1], 0 past the end), `target_ids [B, L] int32` (row[1:]),
`target_weights [B, L] float32` (1 where a target exists), L = `max_seq_length`.
"""
from __future__ import annotations

import functools
import os
from typing import Any, Iterable, Mapping, Sequence

import ml_collections
import numpy as np

from common.data import prepare, shards

FORMAT = 'gpt_jax.pretrain_data/1'


def data_config(**overrides) -> ml_collections.ConfigDict:
  """The `data` section of a GPT pretraining config (defaults: embedded corpus, a small trained BPE)."""
  cfg = ml_collections.ConfigDict(dict(
      **prepare.source_fields(),  # corpus, eval_corpus.
      vocab_file='',              # '' = train a byte-level BPE of `vocab_size`; else a vocab.json (merges.txt beside).
      vocab_size=8000,
      do_lower_case=False,        # A byte-level BPE keeps case: must stay False.
      max_seq_length=128,
      **prepare.shard_fields(),   # num_shards, num_workers, seed, loader_threads.
  ))
  cfg.update(overrides)
  return cfg


def validate_data_config(cfg: ml_collections.ConfigDict, prefix: str = 'data') -> None:
  """Raises `ConfigError('config.<prefix>.<field>: ...')`, one line naming the first bad field."""
  check = prepare.ConfigChecker(cfg, prefix)
  check.sources()
  check.tokenizer('vocab_file', 'a byte-level BPE')
  check(prepare.is_int(cfg.vocab_size) and (cfg.vocab_file != '' or cfg.vocab_size > 257), 'vocab_size',
        f'must exceed the 256 byte tokens and <|endoftext|> to train a BPE, got {cfg.vocab_size!r}')
  check(prepare.is_int(cfg.max_seq_length) and 2 <= cfg.max_seq_length <= 65535, 'max_seq_length',
        f'must be an integer in [2, 65535], got {cfg.max_seq_length!r}')
  check(cfg.do_lower_case is False, 'do_lower_case', f'a byte-level BPE keeps case: must be False, got '
        f'{cfg.do_lower_case!r}')
  check.positive_ints('num_shards', 'num_workers', 'loader_threads')
  check.seed()


# ----------------------------------------------------------------------------------------------------------------------
# Documents -> rows -> batches (pure).
# ----------------------------------------------------------------------------------------------------------------------

def pack_rows(documents: Sequence[np.ndarray], seq_len: int, eot_id: int) -> list[np.ndarray]:
  """Token-id documents -> rows of `seq_len + 1` ids (the last row may be shorter, at least 2 ids).

  The stream is `eot doc_0 eot doc_1 ... eot doc_n`; row r is `stream[r * seq_len : r * seq_len + seq_len + 1]`.
  """
  if not documents:
    return []
  eot = np.asarray([eot_id], np.int64)
  stream = np.concatenate([piece for doc in documents for piece in (eot, np.asarray(doc, np.int64))])
  starts = range(0, max(1, len(stream) - 1), seq_len)
  return [stream[s:s + seq_len + 1] for s in starts]


def rows_to_batch(rows: Sequence[np.ndarray], seq_len: int) -> dict[str, np.ndarray]:
  """Rows of at most `seq_len + 1` ids -> the batch dict (module docstring), shorter rows padded with weight 0."""
  batch = {'input_ids': np.zeros([len(rows), seq_len], np.int32),
           'target_ids': np.zeros([len(rows), seq_len], np.int32),
           'target_weights': np.zeros([len(rows), seq_len], np.float32)}
  for r, row in enumerate(rows):
    row = np.asarray(row)
    if len(row) > seq_len + 1:
      raise ValueError(f'a row has {len(row)} tokens, more than max_seq_length + 1 = {seq_len + 1}')
    n = len(row) - 1
    batch['input_ids'][r, :n] = row[:-1]
    batch['target_ids'][r, :n] = row[1:]
    batch['target_weights'][r, :n] = 1.0
  return batch


def _batch_of_records(records, keys, epoch, *, seq_len):
  del keys, epoch
  return rows_to_batch([record['tokens'] for record in records], seq_len)


def make_loader(shard_dir: str | os.PathLike, config: ml_collections.ConfigDict, tokenizer: Any = None, *,
                train: bool, seed: int, process_index: int = 0, process_count: int = 1) -> 'Any':
  """A `StepLoader` over GPT shards producing `rows_to_batch` batches of `config.global_batch_size` rows.

  Train: shuffled every epoch, ragged tail dropped. Eval: in order, the last batch completed by wrapping around.
  """
  from common.data.pipeline import StepLoader  # pylint: disable=import-outside-toplevel
  del tokenizer  # the rows are final: nothing is drawn at load time
  data_cfg = config.data
  reader = shards.ShardReader(shard_dir)
  written = reader.metadata['info'].get('settings', {}).get('max_seq_length', data_cfg.max_seq_length)
  if written != data_cfg.max_seq_length:
    raise ValueError(f'{shard_dir} was written with max_seq_length={written}, config says {data_cfg.max_seq_length}')
  batch_fn = functools.partial(_batch_of_records, seq_len=int(data_cfg.max_seq_length))
  return StepLoader(reader, batch_fn, config.global_batch_size, seed=seed, process_index=process_index,
                    process_count=process_count, shuffle=train, num_threads=int(data_cfg.get('loader_threads', 1)))


# ----------------------------------------------------------------------------------------------------------------------
# Writing shards.
# ----------------------------------------------------------------------------------------------------------------------

class _SpacedSentences:
  """Encodes every sentence with a leading space (the BPE was trained on sentences joined by spaces)."""

  def __init__(self, tokenizer: Any):
    self.tokenizer = tokenizer
    self.vocab_size = tokenizer.vocab_size

  def encode_batch(self, texts: Iterable[str]) -> list[list[int]]:
    return self.tokenizer.encode_batch([' ' + text for text in texts])


def _shard_tasks(documents: Sequence[tuple[np.ndarray, np.ndarray]], settings: Mapping[str, Any],
                 info: Mapping[str, Any]) -> list[dict[str, Any]]:
  """Shuffled documents dealt round-robin into `num_shards` groups, one task per shard."""
  num_shards, dtype = settings['num_shards'], prepare.token_dtype(info['vocab_size'])
  return [{'settings': settings, **prepare.pack_documents(documents[shard::num_shards], dtype)}
          for shard in range(num_shards)]


def _shard_records(task: Mapping[str, Any]):
  """Worker side: the rows of one shard's stream."""
  s = task['settings']
  documents = [tokens for tokens, _ in prepare.unpack_documents(task)]
  dtype = prepare.token_dtype(s['vocab_size'])
  for row in pack_rows(documents, s['max_seq_length'], s['eot_id']):
    yield {'tokens': row.astype(dtype)}
  return {}


def _summary(metadata: Mapping[str, Any], stats: Mapping[str, Any]) -> dict[str, Any]:
  max_len = metadata['info']['settings']['max_seq_length'] + 1
  mean = stats['features']['tokens']['mean'] if metadata['num_records'] else 0.0
  return {'rows': metadata['num_records'], 'mean_length': round(mean, 3),
          'padding_fraction': round(1.0 - mean / max_len, 4)}


SHARD_FORMAT = prepare.ShardFormat(
    FORMAT, make_tasks=_shard_tasks, make_records=_shard_records,
    features=lambda settings: {'tokens': (prepare.token_dtype(settings['vocab_size']), (None,))}, summary=_summary)


def write_pretraining_shards(documents: Iterable[Sequence[str]], tokenizer: Any, out_dir: str | os.PathLike,
                             cfg: ml_collections.ConfigDict, *, num_shards: int, num_workers: int, seed: int,
                             input_fingerprint: str | None = None, read_stats: Any = None) -> dict[str, Any]:
  """Tokenises documents (sentence strings), packs them into rows and writes shards; returns the shard stats
  (`common.data.prepare.write_tokenized_shards`)."""
  info = {'vocab_size': int(tokenizer.vocab_size), 'eot_id': int(tokenizer.eot_id)}
  settings = dict(max_seq_length=int(cfg.max_seq_length), seed=int(seed), num_shards=int(num_shards), **info)
  return prepare.write_tokenized_shards(documents, _SpacedSentences(tokenizer), out_dir, SHARD_FORMAT,
                                        settings=settings, info=info, tokenizer_digest=tokenizer.digest(),
                                        num_workers=num_workers, input_fingerprint=input_fingerprint,
                                        read_stats=read_stats)


def _train_bpe(files: Sequence[str], vocab_size: int, out_dir: str, do_lower_case: bool) -> str:
  from gpt_jax import tokenizer as gpt_tokenizer  # pylint: disable=import-outside-toplevel
  del do_lower_case  # always False (validated): a byte-level BPE keeps case
  return gpt_tokenizer.train_bpe(files, vocab_size, out_dir)


def _load_bpe(path: str, do_lower_case: bool) -> Any:
  from gpt_jax import tokenizer as gpt_tokenizer  # pylint: disable=import-outside-toplevel
  del do_lower_case
  return gpt_tokenizer.load_tokenizer(path)


# How the data pipeline gets the byte-level BPE: `vocab_file` as given, or trained into `tokenizer/vocab.json`.
TOKENIZER = prepare.TokenizerSpec(given_field='vocab_file', trained_file='vocab.json', train=_train_bpe,
                                  load=_load_bpe)


def prepare_pretraining_data(data_cfg: ml_collections.ConfigDict, work_dir: str | os.PathLike):
  """Corpus -> byte-level BPE -> train and eval shards under `work_dir` (`common.data.prepare`); every stage is
  reused when unchanged. The eval split has `prepare.eval_num_shards` shards. Returns
  `(tokenizer, train_dir, eval_dir)`."""
  validate_data_config(data_cfg)
  return prepare.prepare_pretraining_data(
      data_cfg, work_dir, TOKENIZER, write_pretraining_shards,
      eval_num_shards=prepare.eval_num_shards(data_cfg))
