"""XLNet pretraining data: one text stream, rows `[reuse | A <sep> B <sep> <cls>]`, whole-word span masks, shards.

Pipeline (run once by `prepare_pretraining_data` with the stages of `common.data.prepare`, every stage reused when
its inputs have not changed):

  corpus (one sentence per line, blank line between documents)
    -> sentencepiece model with XLNet's symbols (`xlnet_jax.tokenizer`; trained on the train split or given)
    -> documents of ids, shuffled (by `seed`) and cut into `num_shards` contiguous groups of about equal size
    -> per group, one stream: the documents concatenated, `<eod>` after each (it belongs to the document's last
       sentence, as in the original where a blank line adds `<eod>` to the sentence before it)
    -> rows cut from the stream in order, masked, written to ArrayRecord shards (`common.data.shards`)
    -> `make_loader`: a `common.data.pipeline.StepLoader` in stream order.

Rows and span masks: `xlnet_jax/rows.py` (pure functions of the stream and a generator).

`bi_data` (as the original): the backward stream of a group is its forward stream reversed, cut into rows the same
way (word boundaries follow the reversed text). Shards hold all forward rows, then all backward rows (equal
counts); the loader (`stream_groups=2`) puts forward streams in the first half of the global batch and backward
streams in the second half, which is where the model's bi-directional relative positions expect them.

Batches (numpy): `input_ids [B, L] int32`, `segment_ids [B, L] int32`, `input_mask [B, L] int32` (1 = real token;
rows are full, so all ones; the original XLNet's `input_mask` uses the opposite convention), `is_target [B, L] bool`,
`is_special [B, L] bool` (`<sep>`, `<cls>`), `next_sentence_labels [B] int32`. The targets are the input tokens at
the target positions; `xlnet_jax.permutation.sample_permutation` turns `is_target`/`is_special` into the masks on
device.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

import ml_collections
import numpy as np

from common.data import prepare, shards
from common.data.prepare import token_dtype
from xlnet_jax import rows
from xlnet_jax import tokenizer as xlnet_tokenizer

if TYPE_CHECKING:
  from common.data.pipeline import StepLoader

FORMAT = 'xlnet_jax.pretrain_data/1'
_ROW_STREAM = 1  # Tag that keeps the random stream of the rows apart from the document shuffle's.


# ----------------------------------------------------------------------------------------------------------------------
# Config.
# ----------------------------------------------------------------------------------------------------------------------

def data_config(**overrides) -> ml_collections.ConfigDict:
  """The `data` section of an XLNet pretraining config (defaults: the original's 512/256/85, embedded corpus)."""
  cfg = ml_collections.ConfigDict(dict(
      **prepare.source_fields(),  # corpus, eval_corpus.
      spiece_model='',            # '' = train a sentencepiece model of `vocab_size` on the train split.
      vocab_size=8000,
      do_lower_case=False,
      seq_len=512,
      reuse_len=256,
      num_predict=85,
      mask_alpha=6,
      mask_beta=1,
      max_ngram=5,
      perm_size=0,                # Factorisation-order block length; 0 = reuse_len.
      bi_data=False,
      **prepare.shard_fields(),   # num_shards, num_workers, seed.
  ))
  cfg.update(overrides)
  return cfg


def effective_perm_size(cfg: ml_collections.ConfigDict) -> int:
  """`perm_size`, with 0 meaning `reuse_len`."""
  return int(cfg.perm_size) or int(cfg.reuse_len)


def validate_data_config(cfg: ml_collections.ConfigDict, prefix: str = 'data') -> None:
  """Raises `ConfigError('config.<prefix>.<field>: ...')`, one line naming the first bad field."""
  check = prepare.ConfigChecker(cfg, prefix)
  is_int = prepare.is_int
  check.sources()
  check.tokenizer('spiece_model', 'a sentencepiece model')
  check(is_int(cfg.seq_len) and 8 <= cfg.seq_len <= 65535, 'seq_len',
        f'must be an integer in [8, 65535], got {cfg.seq_len!r}')
  check(is_int(cfg.reuse_len) and 1 <= cfg.reuse_len <= cfg.seq_len - 5, 'reuse_len',
        f'must be an integer in [1, seq_len - 5 = {cfg.seq_len - 5}] (reuse_len < seq_len, and A <sep> B <sep> <cls> '
        f'needs 5 tokens), got {cfg.reuse_len!r}')
  check(is_int(cfg.num_predict) and 1 <= cfg.num_predict <= cfg.seq_len - cfg.reuse_len, 'num_predict',
        f'must be an integer in [1, seq_len - reuse_len = {cfg.seq_len - cfg.reuse_len}], got {cfg.num_predict!r}')
  check.positive_ints('mask_alpha', 'mask_beta', 'max_ngram', 'num_shards', 'num_workers', 'loader_threads')
  check(is_int(cfg.perm_size) and cfg.perm_size >= 0, 'perm_size',
        f'must be an integer >= 0 (0 = reuse_len), got {cfg.perm_size!r}')
  perm_size = effective_perm_size(cfg)
  rest = cfg.seq_len - cfg.reuse_len
  check(cfg.reuse_len % perm_size == 0 and rest % perm_size == 0, 'perm_size',
        f'{perm_size} must divide reuse_len={cfg.reuse_len} and seq_len - reuse_len={rest} (each part is cut into '
        'blocks of perm_size, as in the original)')
  check.seed()
  check.booleans('do_lower_case', 'bi_data')


# ----------------------------------------------------------------------------------------------------------------------
# Tokenizer facts the data needs.
# ----------------------------------------------------------------------------------------------------------------------

def describe_tokenizer(tokenizer: Any) -> dict[str, Any]:
  """`{vocab_size, sep_id, cls_id, eod_id, space_id, is_word_start [vocab_size] bool}` from a tokenizer or such a
  mapping (`space_id`: the bare '▁' piece, -1 if none)."""
  get = tokenizer.get if isinstance(tokenizer, Mapping) else functools.partial(getattr, tokenizer)
  info = {key: int(get(key)) for key in ('vocab_size', 'sep_id', 'cls_id', 'eod_id')}
  info['space_id'] = int(get('space_id', -1))
  info['is_word_start'] = np.asarray(get('is_word_start'), dtype=bool)
  if info['is_word_start'].shape != (info['vocab_size'],):
    raise ValueError(f'is_word_start has shape {info["is_word_start"].shape}, expected ({info["vocab_size"]},)')
  return info


def tokenizer_digest(tokenizer: Any) -> str:
  """A hash of the vocabulary (every piece) and the word-start table, for fingerprints."""
  pieces = getattr(tokenizer, 'pieces', None)
  if pieces is None:
    pieces = [tokenizer.id_to_piece(i) for i in range(int(tokenizer.vocab_size))]
  digest = hashlib.sha256(json.dumps(list(pieces)).encode())
  digest.update(np.packbits(np.asarray(tokenizer.is_word_start, bool)).tobytes())
  digest.update(json.dumps([bool(getattr(tokenizer, 'do_lower_case', False)),
                            bool(getattr(tokenizer, 'keep_accents', False))]).encode())
  return digest.hexdigest()[:32]


# ----------------------------------------------------------------------------------------------------------------------
# Batches.
# ----------------------------------------------------------------------------------------------------------------------

def rows_to_batch(rows: Sequence[Mapping[str, Any]], *, seq_len: int, reuse_len: int, sep_id: int,
                  cls_id: int) -> dict[str, np.ndarray]:
  """Per-row records -> the trainer's batch dict (names and shapes in the module docstring)."""
  b = len(rows)
  batch = {
      'input_ids': np.zeros([b, seq_len], np.int32),
      'segment_ids': np.zeros([b, seq_len], np.int32),
      'input_mask': np.ones([b, seq_len], np.int32),
      'is_target': np.zeros([b, seq_len], bool),
      'is_special': np.zeros([b, seq_len], bool),
      'next_sentence_labels': np.zeros([b], np.int32),
  }
  for r, row in enumerate(rows):
    ids = np.asarray(row['input_ids'])
    if len(ids) != seq_len:
      raise ValueError(f'a record has {len(ids)} tokens, seq_len is {seq_len}')
    batch['input_ids'][r] = ids
    batch['segment_ids'][r, reuse_len + int(row['a_len']) + 1:] = 1
    batch['segment_ids'][r, -1] = 2
    batch['is_target'][r, np.asarray(row['target_positions'], np.int64)] = True
    batch['next_sentence_labels'][r] = int(row['next_sentence_label'])
  batch['is_special'] = (batch['input_ids'] == sep_id) | (batch['input_ids'] == cls_id)
  return batch


def _batch_fn(records, keys, epoch, **kwargs):
  del keys, epoch  # Masks are in the records.
  return rows_to_batch(records, **kwargs)


def make_loader(shard_dir: str | os.PathLike, data_cfg: ml_collections.ConfigDict, global_batch_size: int, *,
                seed: int, process_index: int = 0, process_count: int = 1, prefetch: int = 2) -> 'StepLoader':
  """A `StepLoader` over XLNet shards in stream order: row `b` at step `s + 1` continues row `b` at step `s`.

  With `bi_data` the first half of the global batch holds forward streams and the second half backward streams
  (`global_batch_size` must be even). The rows are a pure function of the step (masks are in the shards; `seed`
  is kept for the common loader interface).
  """
  from common.data.pipeline import StepLoader  # pylint: disable=import-outside-toplevel
  reader = shards.ShardReader(shard_dir)
  written = reader.metadata['info'].get('settings', {})
  for field in ('seq_len', 'reuse_len', 'bi_data'):
    if field in written and written[field] != data_cfg[field]:
      raise ValueError(f'{shard_dir} was written with {field}={written[field]!r}, config says {data_cfg[field]!r}')
  if written.get('num_predict', 0) > data_cfg.num_predict:
    raise ValueError(f'{shard_dir} holds up to {written["num_predict"]} targets per row, config num_predict='
                     f'{data_cfg.num_predict}')
  groups = 2 if written.get('bi_data', data_cfg.bi_data) else 1
  if global_batch_size % groups:
    raise ValueError(f'bi_data needs an even global batch (forward and backward halves), got {global_batch_size}')
  batch_fn = functools.partial(_batch_fn, seq_len=int(data_cfg.seq_len), reuse_len=int(data_cfg.reuse_len),
                               sep_id=int(written['sep_id']), cls_id=int(written['cls_id']))
  return StepLoader(reader, batch_fn, global_batch_size, seed=seed, process_index=process_index,
                    process_count=process_count, prefetch=prefetch, order='stream', stream_groups=groups,
                    num_threads=int(data_cfg.get('loader_threads', 1)))


# ----------------------------------------------------------------------------------------------------------------------
# Writing shards.
# ----------------------------------------------------------------------------------------------------------------------

def split_groups(sizes: Sequence[int], num_groups: int) -> list[tuple[int, int]]:
  """Contiguous `[start, stop)` ranges of items with about equal total size (cut at `k * total / num_groups`)."""
  cumulative = np.cumsum(np.asarray(sizes, np.int64))
  total = int(cumulative[-1]) if len(cumulative) else 0
  cuts = [0] + [int(np.searchsorted(cumulative, total * k / num_groups, side='left')) + 1
                for k in range(1, num_groups)] + [len(sizes)]
  cuts = np.maximum.accumulate(np.minimum(cuts, len(sizes)))
  return [(int(cuts[k]), int(cuts[k + 1])) for k in range(num_groups)]


def _shard_features(settings: 'ShardSettings') -> dict[str, tuple[str, tuple]]:
  return {'input_ids': (token_dtype(settings.vocab_size), (settings.seq_len,)), 'a_len': ('uint16', ()),
          'target_positions': ('uint16', (None,)), 'next_sentence_label': ('uint8', ()), 'offset': ('uint32', ())}


def _shard_tasks(documents: Sequence[tuple[np.ndarray, np.ndarray]], settings: 'ShardSettings',
                 info: Mapping[str, Any]) -> list[dict[str, Any]]:
  """Shuffled documents cut into `num_shards` contiguous groups of about equal token count; one task (a packed
  group) per group and direction, all forward tasks first."""
  groups = split_groups([len(d[0]) + 1 for d in documents], settings.num_shards)
  dtype = token_dtype(info['vocab_size'])
  return [{'group': g, 'backward': backward, 'settings': settings, 'tokenizer': info,
           **prepare.pack_documents(documents[lo:hi], dtype)}
          for backward in ((False, True) if settings.bi_data else (False,)) for g, (lo, hi) in enumerate(groups)]


def _shard_records(task: Mapping[str, Any]):
  """Worker side: the rows of one group's stream (forward or backward), in stream order."""
  s = task['settings']
  info = task['tokenizer']
  tokens, sentence_start = rows.build_stream(prepare.unpack_documents(task), s.eod_id)
  word_start = rows.word_starts(tokens, info)
  if task['backward']:
    tokens = tokens[::-1].copy()
    sentence_start = rows.reverse_boundaries(sentence_start)
    word_start = rows.reverse_boundaries(word_start)
  rng = np.random.default_rng([s.seed, _ROW_STREAM, task['group'], int(task['backward'])])
  counters: dict[str, int] = {}
  yield from rows.create_rows(tokens, sentence_start, word_start, seq_len=s.seq_len, reuse_len=s.reuse_len,
                              num_predict=s.num_predict, max_ngram=s.max_ngram, mask_alpha=s.mask_alpha,
                              mask_beta=s.mask_beta, info=info, rng=rng, counters=counters)
  count = rows.num_rows(len(tokens), s.seq_len, s.reuse_len)
  tail = len(tokens) - ((count - 1) * s.reuse_len + s.seq_len) if count else len(tokens)
  counters.update(stream_tokens=len(tokens), tail_tokens=tail, eod=int(np.count_nonzero(tokens == s.eod_id)))
  return counters


def _summary(metadata: Mapping[str, Any], stats: Mapping[str, Any]) -> dict[str, Any]:
  """Row count, random-next fraction, target, span and segment-A statistics of written shards."""
  features = stats['features']
  rows = max(1, metadata['num_records'])
  return {
      'rows': metadata['num_records'],
      'random_next_fraction': round(features['next_sentence_label']['sum'] / rows, 4),
      'mean_targets': round(features['target_positions']['mean'], 3),
      'min_targets': features['target_positions']['min_len'],
      'fill_fraction': round(stats.get('fill_targets', 0) / max(1, stats.get('targets', 0)), 4),
      'mean_span_words': round(stats.get('span_words', 0) / max(1, stats.get('spans', 0)), 3),
      'mean_a_len': round(features['a_len']['mean'], 2),
  }


@dataclasses.dataclass(frozen=True)
class ShardSettings:
  """Everything the written rows depend on besides the documents and the vocabulary (part of the shards'
  fingerprint and metadata)."""
  seq_len: int
  reuse_len: int
  num_predict: int
  mask_alpha: int
  mask_beta: int
  max_ngram: int
  bi_data: bool
  do_lower_case: bool
  vocab_size: int
  sep_id: int
  cls_id: int
  eod_id: int
  seed: int
  num_shards: int

  @classmethod
  def from_config(cls, cfg: ml_collections.ConfigDict, info: Mapping[str, Any], *, seed: int,
                  num_shards: int) -> 'ShardSettings':
    return cls(seq_len=int(cfg.seq_len), reuse_len=int(cfg.reuse_len), num_predict=int(cfg.num_predict),
               mask_alpha=int(cfg.mask_alpha), mask_beta=int(cfg.mask_beta), max_ngram=int(cfg.max_ngram),
               bi_data=bool(cfg.bi_data), do_lower_case=bool(cfg.do_lower_case), vocab_size=int(info['vocab_size']),
               sep_id=int(info['sep_id']), cls_id=int(info['cls_id']), eod_id=int(info['eod_id']), seed=int(seed),
               num_shards=int(num_shards))

  def to_json(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


# What the shards hold and how documents become them (`common.data.prepare.write_tokenized_shards`).
SHARD_FORMAT = prepare.ShardFormat(FORMAT, make_tasks=_shard_tasks, make_records=_shard_records,
                                   features=_shard_features, summary=_summary, private_info=('is_word_start',))


def write_pretraining_shards(documents: Iterable[Sequence[str]], tokenizer: Any, out_dir: str | os.PathLike,
                             cfg: ml_collections.ConfigDict, *, num_shards: int, num_workers: int, seed: int,
                             input_fingerprint: str | None = None, read_stats: Any = None) -> dict[str, Any]:
  """Tokenises documents, builds the streams, cuts and masks rows and writes them to shards in stream order.

  Documents are shuffled with `seed` and cut into `num_shards` contiguous groups of about equal token count; shard
  `g` holds the rows of group `g`'s stream (and, with `bi_data`, shard `num_shards + g` those of its reversal).
  The output depends on (`seed`, `num_shards`), never on `num_workers`.

  Args:
    documents: documents, each a list of sentence strings.
    tokenizer: has `encode_batch(texts) -> list[list[int]]`, `vocab_size`, `sep_id`, `cls_id`, `eod_id`,
      `is_word_start`, `pieces` (or `id_to_piece`).
    cfg: a `data_config()`; the row and masking fields are used.
    input_fingerprint: identifies the documents; then complete shards with the same fingerprint are reused without
      reading `documents`. Without it the documents are read and hashed first.
    read_stats: the corpus reader's counters, stored in the metadata as `input.reader`.
  Returns:
    stats: record count, per-feature totals, counters, `summary`, `reused`, `fingerprint`.
  """
  info = describe_tokenizer(tokenizer)
  settings = ShardSettings.from_config(cfg, info, seed=seed, num_shards=num_shards)
  return prepare.write_tokenized_shards(documents, tokenizer, out_dir, SHARD_FORMAT, settings=settings, info=info,
                                        tokenizer_digest=tokenizer_digest(tokenizer), num_workers=num_workers,
                                        input_fingerprint=input_fingerprint, read_stats=read_stats)


# ----------------------------------------------------------------------------------------------------------------------
# Corpus -> tokenizer -> shards.
# ----------------------------------------------------------------------------------------------------------------------

TOKENIZER = prepare.TokenizerSpec(given_field='spiece_model', trained_file='spiece.model', train_out='spiece',
                                  train=xlnet_tokenizer.train_sentencepiece, load=xlnet_tokenizer.load_tokenizer)


def prepare_pretraining_data(data_cfg: ml_collections.ConfigDict, work_dir: str | os.PathLike):
  """Corpus -> sentencepiece model -> train and eval shards under `work_dir` (`common.data.prepare`); every stage
  is reused when unchanged. The eval split is one stream (one shard, two with `bi_data`). Returns
  `(tokenizer, train_dir, eval_dir)`."""
  validate_data_config(data_cfg)
  return prepare.prepare_pretraining_data(data_cfg, work_dir, TOKENIZER, write_pretraining_shards,
                                          eval_num_shards=1)
