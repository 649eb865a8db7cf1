"""Pretraining data preparation stages shared by every model: corpus -> tokenizer -> tokenised documents -> shards.

`prepare_pretraining_data` runs these stages under one work directory for any model (which gives its tokenizer spec
and shard writer), each reused when its inputs have not changed:

  `sources_from_config` (`common.data.sources`) the train files (the embedded corpus is built, a tfds source dumped
                       to text once, under `work_dir/corpus/`) and the eval source (files, or a source string).
  `prepare_tokenizer`  the tokenizer: a given file (saved into `work_dir/tokenizer/`), or one trained on the train
                       files, retrained only when `tokenizer/trained_from.json` (file identities + settings) changes.
  `write_splits`       `work_dir/train/` and `work_dir/eval/`, each written by the model's shard writer from
                       documents read lazily, with an input fingerprint made of the source files' identities.

The model's shard writer calls `write_tokenized_shards`, which fingerprints (format, settings, tokenizer digest,
input fingerprint), reuses a complete shard directory with that fingerprint without reading the documents, and
otherwise tokenises the documents (`tokenize_documents`), shuffles them with the writer's seed, lets the model cut
them into tasks (`pack_documents` / `unpack_documents` carry a group of documents to a worker) and writes the shards
(`common.data.shards`). Everything model-specific (settings, grouping, records, features, summary) comes from the
caller; this module knows no model.

Tokenised documents are `(tokens [t], sentence_lengths [s])` pairs: the ids of the document's sentences
concatenated (`token_dtype(vocab_size)`) and the number of tokens of each sentence (int32, all > 0).
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import sys
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from common import storage
from common.config import require
from common.data import corpus, shards
from common.data.sources import Sources, describe_files, lazy_documents, report_sources, sources_from_config

_SHUFFLE_STREAM = 3  # Random stream tag of the document shuffle; a model's own random streams use other tags.
STAMP_FILE = 'trained_from.json'

log = logging.getLogger(__name__)

Document = tuple[np.ndarray, np.ndarray]  # (tokens [t], sentence_lengths [s]).


# ----------------------------------------------------------------------------------------------------------------------
# Config.
# ----------------------------------------------------------------------------------------------------------------------

def source_fields() -> dict[str, Any]:
  """The data-config fields naming the corpus (`corpus_sources`), with their defaults; first in a `data_config`."""
  return dict(
      corpus='embedded',          # 'embedded', 'tfds:NAME:SPLIT', or comma-separated paths/globs of text files
                                  # and 'hf:PATH[:SPLIT][#COLUMN]' HF datasets.
      eval_corpus='',             # '' = the embedded validation split (only when corpus == 'embedded').
      max_undecodable_fraction=corpus.DEFAULT_MAX_UNDECODABLE_FRACTION,  # A file with more bad lines is refused.
      max_line_chars=corpus.DEFAULT_MAX_LINE_CHARS,  # Longer lines are split into sentences; 0 = never split.
  )


EVAL_SHARDS = 2  # Shards of the eval split (fewer when `num_shards` is smaller); see `eval_num_shards`.


def eval_num_shards(data_cfg: Any) -> int:
  """How many shards the eval split is written as: `min(num_shards, EVAL_SHARDS)`. A function of `num_shards`
  alone, so the eval data, like the train data, never depends on `num_workers` (for BERT the shard count decides
  which documents NSP's random sentences come from)."""
  return max(1, min(int(data_cfg.num_shards), EVAL_SHARDS))


def shard_fields() -> dict[str, Any]:
  """The data-config fields of the shard writers (`write_splits`) and of the loader (`loader_threads`: threads that
  build batches ahead of training), with their defaults; last in a `data_config`."""
  return dict(num_shards=8, num_workers=2, seed=12345, loader_threads=1)


def is_int(value: Any) -> bool:
  """An int that is not a bool."""
  return isinstance(value, int) and not isinstance(value, bool)


class ConfigChecker:
  """Checks the fields of a data config in the caller's order: `checker(condition, field, message)` raises
  `ConfigError('config.<prefix>.<field>: <message>')` when `condition` is false; the methods check common fields."""

  def __init__(self, cfg: Any, prefix: str = 'data'):
    self.cfg = cfg
    self.prefix = prefix

  def __call__(self, condition: bool, field: str, message: str) -> None:
    require(condition, f'{self.prefix}.{field}', message)

  def sources(self) -> None:
    """`corpus` names a corpus; `eval_corpus` is given unless `corpus` is 'embedded'."""
    cfg = self.cfg
    self(isinstance(cfg.corpus, str) and cfg.corpus != '', 'corpus', 'must name a corpus')
    self(cfg.corpus == 'embedded' or cfg.eval_corpus != '', 'eval_corpus',
         f'is required when corpus is not "embedded" (corpus={cfg.corpus!r})')
    fraction = cfg.get('max_undecodable_fraction', corpus.DEFAULT_MAX_UNDECODABLE_FRACTION)
    self(isinstance(fraction, (int, float)) and not isinstance(fraction, bool) and 0.0 <= fraction <= 1.0,
         'max_undecodable_fraction', f'must be a number in [0, 1], got {fraction!r}')
    max_chars = cfg.get('max_line_chars', corpus.DEFAULT_MAX_LINE_CHARS)
    self(is_int(max_chars) and (max_chars == 0 or max_chars >= 64), 'max_line_chars',
         f'must be 0 (never split) or an integer >= 64, got {max_chars!r}')

  def tokenizer(self, file_field: str, trained: str) -> None:
    """`cfg[file_field]` is '' or an existing file; without a file `vocab_size` is an integer >= 100 to train
    `trained` (e.g. 'a vocab')."""
    cfg, path = self.cfg, self.cfg[file_field]
    self(path == '' or storage.isfile(path) or storage.isdir(path), file_field, f'{path!r} does not exist')
    self(path != '' or (is_int(cfg.vocab_size) and cfg.vocab_size >= 100), 'vocab_size',
         f'must be an integer >= 100 to train {trained}, got {cfg.vocab_size!r}')

  def positive_ints(self, *fields: str) -> None:
    """Each of `fields` is an integer > 0."""
    for field in fields:
      value = self.cfg[field]
      self(is_int(value) and value > 0, field, f'must be a positive integer, got {value!r}')

  def seed(self) -> None:
    """`seed` is an integer >= 0."""
    self(is_int(self.cfg.seed) and self.cfg.seed >= 0, 'seed', f'must be an integer >= 0, got {self.cfg.seed!r}')

  def booleans(self, *fields: str) -> None:
    """Each of `fields` is True or False."""
    for field in fields:
      value = self.cfg[field]
      self(isinstance(value, bool), field, f'must be True or False, got {value!r}')


# ----------------------------------------------------------------------------------------------------------------------
# Documents.
# ----------------------------------------------------------------------------------------------------------------------

def hash_documents(documents: Sequence[Sequence[str]]) -> str:
  """A hash of every sentence of every document, for fingerprints of documents given in memory."""
  digest = hashlib.sha256()
  for document in documents:
    for sentence in document:
      digest.update(sentence.encode('utf-8', 'surrogatepass'))
      digest.update(b'\n')
    digest.update(b'\x00')
  return digest.hexdigest()[:32]


# ----------------------------------------------------------------------------------------------------------------------
# Tokenizer.
# ----------------------------------------------------------------------------------------------------------------------

def prepare_tokenizer(tokenizer_dir: str, *, given: str, trained_path: str, train_files: Sequence[str],
                      settings: Mapping[str, Any], train: Callable[[], str], load: Callable[[str], Any]) -> Any:
  """The tokenizer of a run, loaded with `load(path)`.

  With a `given` file (a vocab or model path; '' for none) that file is loaded and the tokenizer saved into
  `tokenizer_dir` (`tokenizer.save`). Otherwise `train()` writes `trained_path` (and returns its path) unless
  `tokenizer_dir/trained_from.json` records the same train files (`describe_files`) and `settings` (JSON values,
  e.g. vocab size and lower-casing) and `trained_path` exists.
  """
  if given:
    path = given
  else:
    stamp_path = storage.join(tokenizer_dir, STAMP_FILE)
    stamp = {'files': describe_files(train_files), **settings}
    path = trained_path
    previous = None
    if storage.exists(stamp_path) and storage.exists(path):
      previous = storage.read_json(stamp_path)
    if previous != json.loads(json.dumps(stamp)):
      path = train()
      storage.write_json(stamp_path, stamp)
  tokenizer = load(path)
  if given:
    tokenizer.save(tokenizer_dir)
  return tokenizer


def token_dtype(vocab_size: int) -> str:
  """The smallest dtype that stores every id of the vocabulary in shards."""
  return 'uint16' if vocab_size <= 65536 else 'int32'


def tokenize_documents(documents: Iterable[Sequence[str]], tokenizer: Any, stats: dict,
                       batch_documents: int = 512) -> list[Document]:
  """Documents of sentence strings -> `(tokens [t], sentence_lengths [s])` per non-empty document.

  Sentences are stripped, blank ones dropped; sentences and documents that tokenise to nothing are dropped and
  counted (`stats['sentences_empty']`, `stats['documents_empty']`). `tokenizer` has `vocab_size` and
  `encode_batch(texts) -> list[list[int]]` (no special tokens added).
  """
  from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel
  dtype = token_dtype(int(tokenizer.vocab_size))
  out: list[Document] = []
  for key in ('documents', 'documents_empty', 'sentences', 'sentences_empty', 'tokens'):
    stats.setdefault(key, 0)
  bar = tqdm(desc='tokenizing', unit=' docs', disable=not sys.stderr.isatty(), dynamic_ncols=True)

  def flush(batch):
    texts = [s for doc in batch for s in doc]
    encoded = tokenizer.encode_batch(texts) if texts else []
    k = 0
    for doc in batch:
      pieces = [np.asarray(ids, dtype=dtype) for ids in encoded[k:k + len(doc)]]
      k += len(doc)
      stats['documents'] += 1
      kept = [p for p in pieces if len(p)]
      stats['sentences_empty'] += len(pieces) - len(kept)
      if not kept:
        stats['documents_empty'] += 1
        continue
      lengths = np.asarray([len(p) for p in kept], np.int32)
      stats['sentences'] += len(kept)
      stats['tokens'] += int(lengths.sum())
      out.append((np.concatenate(kept), lengths))
    bar.update(len(batch))

  batch = []
  for document in documents:
    batch.append([s.strip() for s in document if s and s.strip()])
    if len(batch) >= batch_documents:
      flush(batch)
      batch = []
  if batch:
    flush(batch)
  bar.close()
  return out


# ----------------------------------------------------------------------------------------------------------------------
# Shards.
# ----------------------------------------------------------------------------------------------------------------------

def pack_documents(documents: Sequence[Document], dtype: str) -> dict[str, np.ndarray]:
  """A group of tokenised documents as three flat arrays, cheap to send to a writer process.

  Returns `{'tokens': [T] dtype, 'sentence_lengths': [S] int32, 'document_sentences': [D] int32}`.
  """
  return {
      'tokens': np.concatenate([d[0] for d in documents]) if documents else np.zeros([0], dtype),
      'sentence_lengths': np.concatenate([d[1] for d in documents]) if documents else np.zeros([0], np.int32),
      'document_sentences': np.asarray([len(d[1]) for d in documents], np.int32)}


def unpack_documents(packed: Mapping[str, np.ndarray]) -> list[Document]:
  """Inverse of `pack_documents`: `(tokens [t], sentence_lengths [s])` per document (views into `packed`)."""
  sentence_lengths = packed['sentence_lengths']
  token_offsets = np.concatenate([[0], np.cumsum(sentence_lengths)]).astype(np.int64)
  documents, start = [], 0
  for count in np.asarray(packed['document_sentences']).tolist():
    documents.append((packed['tokens'][token_offsets[start]:token_offsets[start + count]],
                      sentence_lengths[start:start + count]))
    start += count
  return documents


def reader_counters(read_stats: Any) -> dict[str, Any]:
  """A corpus reader's counters (a `corpus.ReadStats` or a mapping) as a plain dict."""
  return dataclasses.asdict(read_stats) if dataclasses.is_dataclass(read_stats) else dict(read_stats)


def summarize(metadata: Mapping[str, Any], summary: Callable[[Mapping[str, Any], Mapping[str, Any]], dict], *,
              reused: bool) -> dict[str, Any]:
  """The stats a shard writer returns: the shard stats, the input counters, `summary(metadata, stats)`, `reused`
  and `fingerprint`."""
  stats = dict(metadata['stats'])
  stats.update(metadata['info'].get('input', {}))
  stats.update(summary=summary(metadata, stats), reused=reused, fingerprint=metadata['fingerprint'])
  return stats


@dataclasses.dataclass(frozen=True)
class ShardFormat:
  """What a model writes into shards, for `write_tokenized_shards`.

  Attributes:
    name: the format's name and version, part of every fingerprint (a new version rewrites existing shards).
    make_tasks: `(documents, settings, info) -> tasks`, one task per shard, from the shuffled tokenised documents
      (`pack_documents` makes a group of them cheap to send to a writer process).
    make_records: `task -> records` of one shard; a module-level function (it runs in writer processes).
    features: `settings -> schema` of the records (`common.data.shards`).
    summary: `(metadata, stats) -> dict`, a few numbers describing written shards (see `summarize`).
    private_info: keys of the tokenizer info not stored in the metadata (per-id tables).
  """
  name: str
  make_tasks: Callable[[list[Document], Mapping[str, Any], Mapping[str, Any]], list[Any]]
  make_records: Callable[[Any], Iterable[Mapping[str, Any]]]
  features: Callable[[Mapping[str, Any]], shards.Features]
  summary: Callable[[Mapping[str, Any], Mapping[str, Any]], dict]
  private_info: tuple[str, ...] = ()


TOKENS_PER_WRITER = 1_000_000  # A writer process is started per this many tokens, up to `num_workers`.


def writer_processes(num_workers: int, num_tokens: int) -> int:
  """Writer processes for `num_tokens` tokens: at most `num_workers`, and one per `TOKENS_PER_WRITER` tokens. A
  spawned writer costs seconds to start (it imports the model's package), as long as writing a few hundred
  thousand tokens in this process takes. The shards do not depend on the count."""
  return max(1, min(int(num_workers), int(num_tokens) // TOKENS_PER_WRITER))


def write_tokenized_shards(documents: Iterable[Sequence[str]], tokenizer: Any, out_dir: str | os.PathLike,
                           shard_format: ShardFormat, *, settings: Mapping[str, Any], info: Mapping[str, Any],
                           tokenizer_digest: str, num_workers: int, input_fingerprint: str | None = None,
                           read_stats: Any = None) -> dict[str, Any]:
  """Documents -> shards in `out_dir`, or the shards already there when their fingerprint matches.

  The fingerprint covers `shard_format.name`, `settings`, `tokenizer_digest` and `input_fingerprint`; a complete
  directory with it is reused without reading `documents`. Otherwise the documents are tokenised, shuffled, cut into
  tasks and written (`shard_format`); the metadata `info` holds `settings`, `input_fingerprint`, `input`
  (tokenisation counters, `reader`) and `tokenizer` (`info` without `shard_format.private_info`).

  Args:
    documents: documents, each a list of sentence strings.
    tokenizer: for `tokenize_documents`.
    settings: everything besides the documents and the tokenizer that the records depend on: a frozen dataclass
      with `to_json()` (the model's shard settings) or a mapping of JSON values; its `seed` also shuffles the
      documents.
    info: the tokenizer facts the records need (ids, per-id tables).
    tokenizer_digest: identifies the tokenizer (vocabulary) in the fingerprint.
    input_fingerprint: identifies the documents; without one they are read and hashed first (`hash_documents`).
    read_stats: the corpus reader's counters, filled while `documents` is consumed; stored as `input.reader`.
  Returns:
    `summarize(metadata, shard_format.summary)`: record count, per-feature totals, counters, `summary`, `reused`,
    `fingerprint`.
  """
  settings_json = settings.to_json() if hasattr(settings, 'to_json') else dict(settings)
  if input_fingerprint is None:
    documents = documents if isinstance(documents, (list, tuple)) else list(documents)
    input_fingerprint = hash_documents(documents)
  fp = shards.fingerprint(shard_format.name, settings_json, tokenizer_digest, input_fingerprint)
  existing = shards.is_complete(out_dir, fp)
  if existing is not None:
    log.info('reusing %d records in %s', existing['num_records'], out_dir)
    return summarize(existing, shard_format.summary, reused=True)

  counters: dict[str, Any] = {}
  docs = tokenize_documents(documents, tokenizer, counters)
  order = np.random.default_rng([int(settings_json['seed']), _SHUFFLE_STREAM]).permutation(len(docs))
  tasks = shard_format.make_tasks([docs[j] for j in order], settings, info)
  del docs
  if read_stats is not None:
    counters['reader'] = reader_counters(read_stats)
  writers = writer_processes(num_workers, counters['tokens'])
  if writers < num_workers:
    log.info('%s: %d tokens, written by %d writer process(es) of the %d allowed (one per %d tokens: starting a '
             'process costs more than it saves on less)', out_dir, counters['tokens'], writers, num_workers,
             TOKENS_PER_WRITER)
  metadata = shards.write_shards(
      out_dir, tasks, shard_format.make_records, shard_format.features(settings), num_workers=writers,
      fingerprint=fp, info={'settings': settings_json, 'input_fingerprint': input_fingerprint, 'input': counters,
                            'tokenizer': {k: v for k, v in info.items() if k not in shard_format.private_info}},
      desc=f'writing {storage.basename(out_dir)} shards')
  stats = summarize(metadata, shard_format.summary, reused=metadata.get('reused', False))
  log.info('wrote %s: %s', out_dir, json.dumps(stats['summary']))
  return stats


def write_splits(write: Callable[..., Any], sources: Sources, work_dir: str, *, num_shards: int,
                 eval_num_shards: int, seed: int) -> tuple[str, str]:
  """Writes `work_dir/train` (seed `seed`) and `work_dir/eval` (seed `seed + 1`); returns the two directories.

  `write(documents, *, out_dir, num_shards, seed, input_fingerprint, read_stats)` is the model's shard writer; it
  gets the documents lazily (`lazy_documents`), so reused shards cost no reading, and an input fingerprint made of
  the source files' identities (`describe_files`) or of the source string (plus `max_line_chars` when a file has
  lines that long). Ends by printing the per-file counts (`report_sources`).
  """
  dirs = (storage.join(work_dir, 'train'), storage.join(work_dir, 'eval'))
  for source, out_dir, shard_count, split_seed in ((sources.train_files, dirs[0], num_shards, seed),
                                                   (sources.eval_source, dirs[1], eval_num_shards, seed + 1)):
    read_stats = corpus.ReadStats()
    identity = source if isinstance(source, str) else describe_files(source)
    if not isinstance(source, str) and any(sources.counts.get(f, corpus.SourceCounts()).long_lines for f in source):
      identity = [identity, {'max_line_chars': sources.max_line_chars}]
    write(lazy_documents(source, read_stats, sources.max_line_chars), out_dir=out_dir, num_shards=shard_count,
          seed=split_seed, input_fingerprint=shards.fingerprint(identity), read_stats=read_stats)
  report_sources(sources)
  return dirs


@dataclasses.dataclass(frozen=True)
class TokenizerSpec:
  """How a model gets its tokenizer from a data config.

  given_field: the data field naming a tokenizer file to use as is ('' there = train one);
  trained_file: the file `train` writes under `tokenizer/`;
  train(files, vocab_size, out, *, do_lower_case) -> the trained file's path, `out` being `tokenizer/` joined with
      `train_out` (a directory, or a file prefix);
  load(path, *, do_lower_case) -> the tokenizer (with `vocab_size`, `save(dir)`, `encode_batch`).
  """
  given_field: str
  trained_file: str
  train: Callable[..., str]
  load: Callable[..., Any]
  train_out: str = ''


def _train_out(tokenizer_dir: str, spec: TokenizerSpec) -> str:
  return storage.join(tokenizer_dir, spec.train_out) if spec.train_out else tokenizer_dir


def prepare_pretraining_data(data_cfg: Any, work_dir: str, tokenizer_spec: TokenizerSpec, write: Callable[..., Any],
                             *, eval_num_shards: int) -> tuple[Any, str, str]:
  """The one data pipeline, corpus -> tokenizer -> train and eval shards under `work_dir`, every stage reused when
  its inputs are unchanged. Returns `(tokenizer, train_dir, eval_dir)`.

  Layout: `work_dir/corpus/` (the embedded corpus or text dumps of TFDS / HF sources), `work_dir/tokenizer/`,
  `work_dir/train/`, `work_dir/eval/` (shards + metadata.json). `write(documents, *, tokenizer, cfg, num_workers,
  out_dir, num_shards, seed, input_fingerprint, read_stats)` is the model's shard writer (its pure "document ->
  rows" functions run inside it).
  """
  work_dir = storage.fspath(work_dir)
  sources = sources_from_config(data_cfg, storage.join(work_dir, 'corpus'))
  tokenizer_dir = storage.join(work_dir, 'tokenizer')
  lower = bool(data_cfg.do_lower_case)
  tokenizer = prepare_tokenizer(
      tokenizer_dir, given=data_cfg[tokenizer_spec.given_field],
      trained_path=storage.join(tokenizer_dir, tokenizer_spec.trained_file), train_files=sources.train_files,
      settings={'vocab_size': data_cfg.vocab_size, 'do_lower_case': data_cfg.do_lower_case},
      train=lambda: tokenizer_spec.train(sources.train_files, data_cfg.vocab_size,
                                         _train_out(tokenizer_dir, tokenizer_spec), do_lower_case=lower),
      load=lambda path: tokenizer_spec.load(path, do_lower_case=lower))
  write_split = functools.partial(write, tokenizer=tokenizer, cfg=data_cfg, num_workers=data_cfg.num_workers)
  train_dir, eval_dir = write_splits(write_split, sources, work_dir, num_shards=data_cfg.num_shards,
                                     eval_num_shards=eval_num_shards, seed=data_cfg.seed)
  return tokenizer, train_dir, eval_dir
