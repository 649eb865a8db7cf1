"""BERT pretraining data: instances (segment pairs for NSP), masked-LM masking, shards and the step loader.

Pipeline (run once by `prepare_pretraining_data` with the stages of `common.data.prepare`, every stage reused when
its inputs have not changed):

  corpus (one sentence per line, blank line between documents)
    -> WordPiece tokenizer (trained on the train split, or loaded from `vocab_file`)
    -> documents of token ids (`tokenizer.encode_batch`; documents that tokenise to nothing are counted and skipped)
    -> instances `[CLS] A [SEP] B [SEP]` with an NSP label, written to ArrayRecord shards (`common.data.shards`)
    -> `make_loader`: a `common.data.pipeline.StepLoader` whose batch function pads, and masks if masking is dynamic.

Instances: `bert_jax/instances.py` (pure functions of the documents and a generator).

NSP's random document when work is split: documents are shuffled (by `seed`) and dealt round-robin into
`num_shards` groups; shard `i` is built from group `i` alone, so the random B of an instance comes from another
document of the same group (about 1/num_shards of the corpus). A group of a single document falls back to that
document (counted as `single_document_groups`). Shard contents therefore depend on (`seed`, `num_shards`) but never
on `num_workers`.

Masking: `bert_jax/masking.py`.

Static masking writes `dupe_factor` passes of every document (each pass with fresh instance boundaries and masks)
with masks baked in. Dynamic masking writes each instance once, unmasked, and the loader masks every row with a
generator seeded from `(seed, epoch, record id)`: fresh masks every epoch, identical for any process count and any
resume step. The eval loader uses fixed masks (epoch 0).

Batches (numpy, names as the original TFRecord features): `input_ids [B, L] int32`, `input_mask [B, L] int32`,
`segment_ids [B, L] int32`, `masked_lm_positions [B, P] int32`, `masked_lm_ids [B, P] int32`,
`masked_lm_weights [B, P] float32`, `next_sentence_labels [B] int32` (L = max_seq_length, P =
max_predictions_per_seq; padding positions/ids are 0 with weight 0).
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

from bert_jax import instances, masking
from bert_jax import tokenizer as bert_tokenizer
from common.data import prepare, shards
from common.data.prepare import token_dtype

if TYPE_CHECKING:
  from common.data.pipeline import StepLoader

FORMAT = 'bert_jax.pretrain_data/3'  # 2: a single-sentence chunk is split inside its sentence (instances.py);
# 3: with NSP, `dupe_factor` passes of fresh pairs for dynamic masking too.
_INSTANCE_STREAM = 1  # Tags that keep the random streams of different uses apart.
_MASK_STREAM = 2


# ----------------------------------------------------------------------------------------------------------------------
# Config.
# ----------------------------------------------------------------------------------------------------------------------

def data_config(**overrides) -> ml_collections.ConfigDict:
  """The `data` section of a BERT pretraining config (defaults: embedded corpus, small vocab, dynamic masking)."""
  cfg = ml_collections.ConfigDict(dict(
      **prepare.source_fields(),  # corpus, eval_corpus.
      vocab_file='',              # '' = train a WordPiece vocab of `vocab_size` on the train split.
      vocab_size=8000,
      do_lower_case=True,
      max_seq_length=128,
      max_predictions_per_seq=20,
      masked_lm_prob=0.15,
      short_seq_prob=0.1,
      dupe_factor=5,              # Passes over the corpus, each cutting fresh NSP pairs (and, static, fresh masks).
                                  # Without it a small corpus repeats the same pairs every epoch and NSP is memorised.
      whole_word_mask=False,
      next_sentence=True,
      masking='dynamic',          # 'dynamic' (fresh masks every epoch) or 'static' (masks written to the shards).
      **prepare.shard_fields(),   # num_shards, num_workers, seed.
  ))
  cfg.update(overrides)
  return cfg


def validate_data_config(cfg: ml_collections.ConfigDict, prefix: str = 'data') -> None:
  """Raises `ConfigError('config.<prefix>.<field>: ...')`, one line naming the first bad field."""
  check = prepare.ConfigChecker(cfg, prefix)
  is_int = prepare.is_int
  check.sources()
  check(cfg.masking in ('dynamic', 'static'), 'masking', f"must be one of ('dynamic', 'static'), got {cfg.masking!r}")
  check.tokenizer('vocab_file', 'a vocab')
  check(is_int(cfg.max_seq_length) and 5 <= cfg.max_seq_length <= 65535, 'max_seq_length',
        f'must be an integer in [5, 65535] ([CLS] A [SEP] B [SEP] needs 5), got {cfg.max_seq_length!r}')
  check.positive_ints('max_predictions_per_seq', 'dupe_factor', 'num_shards', 'num_workers', 'loader_threads')
  check(cfg.max_predictions_per_seq <= cfg.max_seq_length, 'max_predictions_per_seq',
        f'{cfg.max_predictions_per_seq} exceeds max_seq_length={cfg.max_seq_length}')
  check(isinstance(cfg.masked_lm_prob, float) and 0.0 < cfg.masked_lm_prob < 1.0, 'masked_lm_prob',
        f'must be in (0, 1), got {cfg.masked_lm_prob!r}')
  check(isinstance(cfg.short_seq_prob, float) and 0.0 <= cfg.short_seq_prob <= 1.0, 'short_seq_prob',
        f'must be in [0, 1], got {cfg.short_seq_prob!r}')
  check.seed()
  check.booleans('whole_word_mask', 'next_sentence', 'do_lower_case')


# ----------------------------------------------------------------------------------------------------------------------
# Tokenizer facts the data needs.
# ----------------------------------------------------------------------------------------------------------------------

def describe_tokenizer(tokenizer: Any) -> dict[str, Any]:
  """The ids the data pipeline needs, from a tokenizer object (attributes) or a mapping with the same keys.

  Returns `{vocab_size, pad_id, unk_id, cls_id, sep_id, mask_id, is_continuation}` with `is_continuation` a
  `[vocab_size] bool` array (True for `##` pieces) or None.
  """
  get = tokenizer.get if isinstance(tokenizer, Mapping) else functools.partial(getattr, tokenizer)
  info = {key: int(get(key)) for key in ('vocab_size', 'pad_id', 'unk_id', 'cls_id', 'sep_id', 'mask_id')}
  is_cont = get('is_continuation', None)
  info['is_continuation'] = None if is_cont is None else np.asarray(is_cont, dtype=bool)
  return info


def vocab_digest(tokenizer: Any) -> str:
  """A hash of the vocabulary (every id's token string), for fingerprints."""
  id_to_token = getattr(tokenizer, 'id_to_token', None)
  size = int(tokenizer.vocab_size)
  if callable(id_to_token):
    tokens = [id_to_token(i) for i in range(size)]
  elif id_to_token is not None:
    tokens = list(id_to_token)
  else:
    tokens = [size]
  return hashlib.sha256(json.dumps(tokens).encode()).hexdigest()[:32]


# ----------------------------------------------------------------------------------------------------------------------
# Batches.
# ----------------------------------------------------------------------------------------------------------------------

def pad_batch(rows: Sequence[Mapping[str, Any]], *, max_seq_length: int,
              max_predictions_per_seq: int) -> dict[str, np.ndarray]:
  """Pads per-row `{input_ids [n], num_a, masked_lm_positions [p], masked_lm_ids [p], next_sentence_label}` to
  the trainer's batch dict (names and shapes in the module docstring)."""
  b, length, preds = len(rows), max_seq_length, max_predictions_per_seq
  batch = {
      'input_ids': np.zeros([b, length], np.int32),
      'input_mask': np.zeros([b, length], np.int32),
      'segment_ids': np.zeros([b, length], np.int32),
      'masked_lm_positions': np.zeros([b, preds], np.int32),
      'masked_lm_ids': np.zeros([b, preds], np.int32),
      'masked_lm_weights': np.zeros([b, preds], np.float32),
      'next_sentence_labels': np.zeros([b], np.int32),
  }
  for r, row in enumerate(rows):
    ids = row['input_ids']
    n, num_a = len(ids), int(row['num_a'])
    if n > length:
      raise ValueError(f'a record has {n} tokens, more than max_seq_length={length}')
    batch['input_ids'][r, :n] = ids
    batch['input_mask'][r, :n] = 1
    batch['segment_ids'][r, num_a:n] = 1
    positions = row['masked_lm_positions']
    p = int(np.count_nonzero(row['masked_lm_weights'])) if 'masked_lm_weights' in row else len(positions)
    if p > preds:
      raise ValueError(f'a record has {p} predictions, more than max_predictions_per_seq={preds}')
    batch['masked_lm_positions'][r, :p] = positions[:p]
    batch['masked_lm_ids'][r, :p] = row['masked_lm_ids'][:p]
    batch['masked_lm_weights'][r, :p] = 1.0
    batch['next_sentence_labels'][r] = int(row['next_sentence_label'])
  return batch


def _static_batch(records, keys, epoch, *, max_seq_length, max_predictions_per_seq):
  del keys, epoch  # Masks are in the records.
  return pad_batch(records, max_seq_length=max_seq_length, max_predictions_per_seq=max_predictions_per_seq)


def _dynamic_batch(records, keys, epoch, *, seed, fixed_epoch, max_seq_length, mask_kwargs):
  """Masks every row with a generator seeded from (seed, epoch, record id), then pads."""
  epoch = epoch if fixed_epoch is None else fixed_epoch
  rows = []
  for record, key in zip(records, keys):
    rng = np.random.default_rng([seed, _MASK_STREAM, int(epoch), int(key)])
    input_ids, positions, ids, weights = masking.mask_tokens(record['input_ids'], rng, **mask_kwargs)
    rows.append({'input_ids': input_ids, 'num_a': record['num_a'], 'masked_lm_positions': positions,
                 'masked_lm_ids': ids, 'masked_lm_weights': weights,
                 'next_sentence_label': record['next_sentence_label']})
  return pad_batch(rows, max_seq_length=max_seq_length,
                   max_predictions_per_seq=mask_kwargs['max_predictions_per_seq'])


def make_loader(shard_dir: str | os.PathLike, data_cfg: ml_collections.ConfigDict, tokenizer_info: Any,
                global_batch_size: int, *, seed: int, process_index: int = 0, process_count: int = 1,
                shuffle: bool = True, fixed_masks: bool | None = None, prefetch: int = 2) -> 'StepLoader':
  """A `StepLoader` over BERT shards producing the trainer's batch dict (see the module docstring).

  Train: `shuffle=True` (per-epoch permutation, ragged tail dropped, fresh dynamic masks every epoch). Eval:
  `shuffle=False` (records in order, the last batch of a pass completed by wrapping around, so an eval set smaller
  than a batch works) and masks fixed (`fixed_masks` defaults to `not shuffle`). Static shards carry their masks;
  `seed` then only shuffles.
  `tokenizer_info` is a tokenizer or the mapping `describe_tokenizer` returns.
  """
  from common.data.pipeline import StepLoader  # pylint: disable=import-outside-toplevel
  reader = shards.ShardReader(shard_dir)
  written = reader.metadata['info'].get('settings', {})
  if written.get('max_seq_length', data_cfg.max_seq_length) != data_cfg.max_seq_length:
    raise ValueError(f'{shard_dir} was written with max_seq_length={written["max_seq_length"]}, '
                     f'config says {data_cfg.max_seq_length}')
  masking_kind = written.get('masking', 'static' if 'masked_lm_positions' in reader.features else 'dynamic')
  if masking_kind == 'static':
    if written.get('max_predictions_per_seq', 0) > data_cfg.max_predictions_per_seq:
      raise ValueError(f'{shard_dir} holds up to {written["max_predictions_per_seq"]} predictions per sequence, '
                       f'config max_predictions_per_seq={data_cfg.max_predictions_per_seq}')
    batch_fn = functools.partial(_static_batch, max_seq_length=data_cfg.max_seq_length,
                                 max_predictions_per_seq=data_cfg.max_predictions_per_seq)
  else:
    info = describe_tokenizer(tokenizer_info)
    fixed = (not shuffle) if fixed_masks is None else fixed_masks
    batch_fn = functools.partial(_dynamic_batch, seed=int(seed), fixed_epoch=0 if fixed else None,
                                 max_seq_length=data_cfg.max_seq_length,
                                 mask_kwargs=masking.mask_settings(data_cfg, info))
  return StepLoader(reader, batch_fn, global_batch_size, seed=seed, process_index=process_index,
                    process_count=process_count, shuffle=shuffle, prefetch=prefetch,
                    num_threads=int(data_cfg.get('loader_threads', 1)))


# ----------------------------------------------------------------------------------------------------------------------
# Writing shards.
# ----------------------------------------------------------------------------------------------------------------------

def _shard_features(settings: 'ShardSettings') -> dict[str, tuple[str, tuple]]:
  token = token_dtype(settings.vocab_size)
  features = {'input_ids': (token, (None,)), 'num_a': ('uint16', ()), 'next_sentence_label': ('uint8', ())}
  if settings.masking == 'static':
    features.update(masked_lm_positions=('uint16', (None,)), masked_lm_ids=(token, (None,)))
  return features


def _shard_tasks(documents: Sequence[tuple[np.ndarray, np.ndarray]], settings: 'ShardSettings',
                 info: Mapping[str, Any]) -> list[dict[str, Any]]:
  """Shuffled documents dealt round-robin into `num_shards` groups, one task (a packed group) per shard."""
  num_shards, dtype = settings.num_shards, token_dtype(info['vocab_size'])
  return [{'shard': shard, 'settings': settings, 'tokenizer': dict(info),
           **prepare.pack_documents(documents[shard::num_shards], dtype)} for shard in range(num_shards)]


def _shard_records(task: Mapping[str, Any]):
  """Worker side: the records of one shard (its document group, cut, shuffled and, if static, masked)."""
  s = task['settings']
  documents = [np.split(tokens, np.cumsum(lengths)[:-1]) for tokens, lengths in prepare.unpack_documents(task)]
  rng = np.random.default_rng([s.seed, _INSTANCE_STREAM, task['shard']])
  passes = s.dupe_factor  # 1 unless masks (static) or NSP pairs differ from pass to pass (ShardSettings).
  cut = []
  for _ in range(passes):
    for d in range(len(documents)):
      cut.extend(instances.create_instances_from_document(
          documents, d, max_seq_length=s.max_seq_length, short_seq_prob=s.short_seq_prob, rng=rng,
          cls_id=s.cls_id, sep_id=s.sep_id, next_sentence=s.next_sentence))
  mask_kwargs = masking.mask_settings(s, task['tokenizer']) if s.masking == 'static' else None
  for index in rng.permutation(len(cut)):
    instance = cut[index]
    record = {'input_ids': instance['input_ids'], 'num_a': instance['num_a'],
              'next_sentence_label': instance['next_sentence_label']}
    if mask_kwargs is not None:
      input_ids, positions, ids, weights = masking.mask_tokens(instance['input_ids'], rng, **mask_kwargs)
      num = int(np.count_nonzero(weights))
      record.update(input_ids=input_ids, masked_lm_positions=positions[:num], masked_lm_ids=ids[:num])
    yield record
  return {'single_document_groups': int(len(documents) == 1 and s.next_sentence)}


def _summary(metadata: Mapping[str, Any], stats: Mapping[str, Any]) -> dict[str, Any]:
  """Mean length, padding and random-next fractions (and mean predictions when static) of written shards."""
  features = stats['features']
  max_len = metadata['info']['settings']['max_seq_length']
  records = max(1, metadata['num_records'])
  summary = {
      'instances': metadata['num_records'],
      'mean_length': round(features['input_ids']['mean'], 3),
      'padding_fraction': round(1.0 - features['input_ids']['mean'] / max_len, 4),
      'random_next_fraction': round(features['next_sentence_label']['sum'] / records, 4),
  }
  if 'masked_lm_positions' in features:
    summary['mean_predictions'] = round(features['masked_lm_positions']['mean'], 3)
  return summary


@dataclasses.dataclass(frozen=True)
class ShardSettings:
  """Everything the written instances depend on besides the documents and the vocabulary (part of the shards'
  fingerprint and metadata). The masking fields are set only for static masking (masks written to the shards)."""
  max_seq_length: int
  short_seq_prob: float
  next_sentence: bool
  masking: str
  do_lower_case: bool
  vocab_size: int
  cls_id: int
  sep_id: int
  seed: int
  num_shards: int
  dupe_factor: int = 1
  masked_lm_prob: float | None = None
  max_predictions_per_seq: int | None = None
  whole_word_mask: bool | None = None

  @classmethod
  def from_config(cls, cfg: ml_collections.ConfigDict, info: Mapping[str, Any], *, seed: int,
                  num_shards: int) -> 'ShardSettings':
    static = {}
    if cfg.masking == 'static':
      static = dict(masked_lm_prob=float(cfg.masked_lm_prob), max_predictions_per_seq=int(cfg.max_predictions_per_seq),
                    whole_word_mask=bool(cfg.whole_word_mask))
    if cfg.masking == 'static' or cfg.next_sentence:
      static['dupe_factor'] = int(cfg.dupe_factor)
    return cls(max_seq_length=int(cfg.max_seq_length), short_seq_prob=float(cfg.short_seq_prob),
               next_sentence=bool(cfg.next_sentence), masking=str(cfg.masking), do_lower_case=bool(cfg.do_lower_case),
               vocab_size=int(info['vocab_size']), cls_id=int(info['cls_id']), sep_id=int(info['sep_id']),
               seed=int(seed), num_shards=int(num_shards), **static)

  def to_json(self) -> dict[str, Any]:
    return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


# What the shards hold and how documents become them (`common.data.prepare.write_tokenized_shards`).
SHARD_FORMAT = prepare.ShardFormat(FORMAT, make_tasks=_shard_tasks, make_records=_shard_records,
                                   features=_shard_features, summary=_summary, private_info=('is_continuation',))


def write_pretraining_shards(documents: Iterable[Sequence[str]], tokenizer: Any, out_dir: str | os.PathLike,
                             cfg: ml_collections.ConfigDict, *, num_shards: int, num_workers: int, seed: int,
                             input_fingerprint: str | None = None,
                             read_stats: Any = None) -> dict[str, Any]:
  """Tokenises documents, cuts instances (masks them too if `cfg.masking == 'static'`) and writes shards.

  Args:
    documents: documents, each a list of sentence strings.
    tokenizer: has `encode_batch(texts) -> list[list[int]]` (no special tokens added), `vocab_size`, the special
      ids, `is_continuation` (for static whole-word masking) and `id_to_token` (for the fingerprint).
    cfg: a `data_config()`; the instance and masking fields are used.
    input_fingerprint: identifies the documents (e.g. a hash of the corpus files); then a complete shard directory
      with the same fingerprint is reused without reading `documents`. Without it the documents are read and
      hashed first.
    read_stats: the corpus reader's counters (a `ReadStats` or a dict: bad lines, ...), filled while `documents`
      is consumed; stored in the metadata as `input.reader`.
  Returns:
    stats: record count, per-feature totals, tokenisation counters, `summary` (mean length, padding and
    random-next fractions), `reused`, `fingerprint`.
  """
  info = describe_tokenizer(tokenizer)
  settings = ShardSettings.from_config(cfg, info, seed=seed, num_shards=num_shards)
  return prepare.write_tokenized_shards(documents, tokenizer, out_dir, SHARD_FORMAT, settings=settings, info=info,
                                        tokenizer_digest=vocab_digest(tokenizer), num_workers=num_workers,
                                        input_fingerprint=input_fingerprint, read_stats=read_stats)


# ----------------------------------------------------------------------------------------------------------------------
# Corpus -> tokenizer -> shards.
# ----------------------------------------------------------------------------------------------------------------------

TOKENIZER = prepare.TokenizerSpec(given_field='vocab_file', trained_file='vocab.txt',
                                  train=bert_tokenizer.train_wordpiece, load=bert_tokenizer.load_tokenizer)


def prepare_pretraining_data(data_cfg: ml_collections.ConfigDict, work_dir: str | os.PathLike):
  """Corpus -> WordPiece vocabulary -> train and eval shards under `work_dir` (`common.data.prepare`); every stage
  is reused when unchanged. The eval split has `prepare.eval_num_shards` shards. Returns
  `(tokenizer, train_dir, eval_dir)`."""
  validate_data_config(data_cfg)
  return prepare.prepare_pretraining_data(
      data_cfg, work_dir, TOKENIZER, write_pretraining_shards,
      eval_num_shards=prepare.eval_num_shards(data_cfg))
