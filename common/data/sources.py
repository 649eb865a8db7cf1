"""Where a run's documents come from: the `corpus` / `eval_corpus` settings resolved into checked text files (the
embedded corpus built, a TFDS source dumped once), read lazily, with per-file counts. The first stage of
`common.data.prepare`."""
from __future__ import annotations

import dataclasses
import json
import os
import sys
from typing import Any, Iterable, Iterator, Sequence

from common import storage
from common.data import corpus, hf_datasets

CHECKED_FILE = 'checked_sources.json'



def describe_files(paths: Sequence[str]) -> list:
  """Cheap identity of input files for fingerprints: (absolute path or URL, size, modification time); for an HF
  datasets source (`hf:...`) the source and the identities of its data files (`hf_datasets.identity`)."""
  return [hf_datasets.identity(path) if hf_datasets.is_source(path) else storage.stat_identity(path)
          for path in paths]


def source_files(source: str) -> list[str] | None:
  """The text files of a path/glob source (comma-separated; `hf:...` sources are kept as entries, read like files),
  or None for other sources ('tfds:...', 'embedded...')."""
  if source.startswith('tfds:') or source.startswith('embedded'):
    return None
  return corpus.expand_paths([p for p in source.split(',') if p.strip()])


def dump_documents(documents: Iterable[Sequence[str]], path: str) -> None:
  """Writes documents in the corpus format (one sentence a line, a blank line after each document), atomically
  (a temporary file renamed locally; one object, written when complete, remotely)."""
  remote = storage.is_remote(path)
  tmp = path if remote else path + '.tmp'
  with storage.open_file(tmp, 'w') as f:
    for document in documents:
      for sentence in document:
        f.write(sentence.replace('\n', ' ').strip() + '\n')
      f.write('\n')
  if not remote:
    os.replace(tmp, path)


def lazy_documents(source: Sequence[str] | str, stats: corpus.ReadStats,
                   max_line_chars: int = corpus.DEFAULT_MAX_LINE_CHARS) -> Iterator[list[str]]:
  """Documents of a list of files or a source string, read only when iterated (so reused shards cost nothing)."""
  if isinstance(source, str):
    yield from corpus.documents_from_source(source, stats=stats, max_line_chars=max_line_chars)
  else:
    yield from corpus.iter_documents(source, stats=stats, max_line_chars=max_line_chars)


@dataclasses.dataclass(frozen=True)
class Sources:
  """Where the documents of a run come from.

  train_files: text files in the corpus format (the tokenizer trainer reads them too).
  eval_source: text files, or a source string for `corpus.documents_from_source` ('tfds:...', 'embedded:...').
  counts: `{path: corpus.SourceCounts}` of every file checked by `check_sources` (train files, then eval files).
  max_line_chars: lines longer than this are split into sentences (0: never).
  """
  train_files: list[str]
  eval_source: list[str] | str
  counts: dict = dataclasses.field(default_factory=dict)
  max_line_chars: int = corpus.DEFAULT_MAX_LINE_CHARS


def check_sources(files: Sequence[str], cache_dir: str, *, max_undecodable_fraction: float,
                  max_line_chars: int) -> dict[str, corpus.SourceCounts]:
  """Reads each file once (`corpus.scan_files`) and refuses a bad one with a `UserError` naming it, before anything
  is prepared. Counts are cached in `cache_dir/checked_sources.json` by file identity (`describe_files`) and
  `max_line_chars`, so an unchanged file is not read again."""
  cache_path = storage.join(cache_dir, CHECKED_FILE)
  cache = {}
  if storage.exists(cache_path):
    try:
      cache = storage.read_json(cache_path)
    except (OSError, ValueError):
      cache = {}
  keys = {path: json.dumps([identity, max_line_chars]) for path, identity in zip(files, describe_files(files))}
  known = {path: corpus.SourceCounts(**cache[key]) for path, key in keys.items()
           if isinstance(cache.get(key), dict)}
  counts = corpus.scan_files(files, max_undecodable_fraction=max_undecodable_fraction,
                             max_line_chars=max_line_chars, known=known)
  if any(path not in known for path in files):
    cache.update({keys[path]: dataclasses.asdict(c) for path, c in counts.items()})
    storage.write_json(cache_path, cache, indent=1)
  return counts


def corpus_sources(corpus_source: str, eval_corpus: str, corpus_dir: str, *,
                   max_undecodable_fraction: float = corpus.DEFAULT_MAX_UNDECODABLE_FRACTION,
                   max_line_chars: int = corpus.DEFAULT_MAX_LINE_CHARS) -> Sources:
  """Resolves the `corpus` / `eval_corpus` settings of a data config into files under or outside `corpus_dir`, and
  checks every file (`check_sources`): a file that yields no document or has more than `max_undecodable_fraction`
  undecodable lines is refused here, naming it, before a tokenizer or a shard is made.

  'embedded' builds the embedded corpus in `corpus_dir` (once) and, without `eval_corpus`, evaluates on its
  validation split. A tfds train source is dumped once to `corpus_dir/train.txt` so a tokenizer trainer can read it.
  """
  storage.makedirs(corpus_dir)
  if corpus_source == 'embedded':
    train_files = [storage.join(corpus_dir, 'train.txt')]
    if not all(storage.exists(p) for p in (train_files[0], storage.join(corpus_dir, 'valid.txt'))):
      corpus.build_embedded_corpus(corpus_dir)
    eval_source = eval_corpus or storage.join(corpus_dir, 'valid.txt')
  else:
    train_files = source_files(corpus_source)
    eval_source = eval_corpus
    if train_files is None:  # tfds: dump once to text so the tokenizer trainer can read it.
      dumped = storage.join(corpus_dir, 'train.txt')
      if not storage.exists(dumped):
        dump_documents(corpus.documents_from_source(corpus_source), dumped)
      train_files = [dumped]
  eval_files = source_files(eval_source)
  checked = list(train_files) + [f for f in eval_files or [] if f not in train_files]
  counts = check_sources(checked, corpus_dir, max_undecodable_fraction=max_undecodable_fraction,
                         max_line_chars=max_line_chars)
  return Sources(train_files=train_files, eval_source=eval_files if eval_files is not None else eval_source,
                 counts=counts, max_line_chars=max_line_chars)


def sources_from_config(data_cfg: Any, corpus_dir: str) -> Sources:
  """`corpus_sources` with the fields of a data config (`source_fields`)."""
  return corpus_sources(
      data_cfg.corpus, data_cfg.eval_corpus, corpus_dir,
      max_undecodable_fraction=data_cfg.get('max_undecodable_fraction', corpus.DEFAULT_MAX_UNDECODABLE_FRACTION),
      max_line_chars=data_cfg.get('max_line_chars', corpus.DEFAULT_MAX_LINE_CHARS))


def report_sources(sources: Sources) -> None:
  """Prints the per-file counts of `sources` (process 0 only), one line per file."""
  try:
    import jax  # pylint: disable=import-outside-toplevel
    if jax.process_index() != 0:
      return
  except ImportError:
    pass
  for line in corpus.format_counts(sources.counts):
    print(f'corpus {line}', file=sys.stderr, flush=True)
