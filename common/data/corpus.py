"""Text corpora for pretraining, in the original BERT input format, independent of any model.

The format is the one `create_pretraining_data.py` reads: plain UTF-8 text, one sentence per line, a blank line
between documents. Three sources produce documents (lists of sentences):

* the embedded corpus (`common.data.embedded_corpus`; `build_embedded_corpus` and `default_cache_dir` are importable
  from here too): a default corpus that needs no download, the docstrings and reference topics every CPython ships.
* `iter_documents` reads user files in the format above (local or remote paths, globs and `.gz` accepted). Bad
  lines (invalid UTF-8, only control characters) and documents left empty are counted in a `ReadStats` (in total and
  per file) and skipped; lines longer than `max_line_chars` are split into sentences. `scan_files` reads files once
  up front and refuses (`UserError`, naming the file) one that yields no document or whose undecodable fraction
  exceeds a limit, so a bad corpus fails before any preparation.
* `tfds_documents` reads a TensorFlow Datasets text dataset (imported lazily; `pip install .[tfds]`).
* An HF datasets source `hf:PATH[:SPLIT][#COLUMN]` (`common.data.hf_datasets`: a `save_to_disk` directory, parquet
  or arrow files) stands wherever a file may: each row is a document whose lines are its sentences, read, checked
  and counted as the lines of a file are.

`documents_from_source('embedded' | 'tfds:NAME[/CONFIG][:SPLIT]' | 'path,glob,hf:...,...')` dispatches between them.
Sentences are split by `common.data.sentences`.
"""
from __future__ import annotations

import codecs
import contextlib
import dataclasses
import gzip
import os
import re
from typing import Iterable, Iterator, Sequence

from common import storage
from common.config import UserError
from common.data import hf_datasets, tfds_import
# Re-exported: the data preparation, task data and tests build the embedded corpus through this module.
from common.data.embedded_corpus import build_embedded_corpus, default_cache_dir
from common.data.sentences import is_control_only, split_long_line, split_sentences

# ---------------------------------------------------------------------------------------------------------------------
# Reading files in the BERT format
# ---------------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class ReadStats:
  """Counters filled while reading. `lines`: sentences yielded; `bad_lines`: skipped lines (invalid UTF-8, only
  control characters, undecodable TFDS texts); `empty_documents`: documents skipped because nothing in them survived;
  `long_lines`: lines longer than `max_line_chars`, each split into `long_line_pieces` sentences (nothing dropped);
  `sources`: the same counters per file (`SourceCounts`), in reading order."""
  documents: int = 0
  lines: int = 0
  bad_lines: int = 0
  empty_documents: int = 0
  files: int = 0
  long_lines: int = 0
  long_line_pieces: int = 0
  sources: dict = dataclasses.field(default_factory=dict, compare=False)


@dataclasses.dataclass
class SourceCounts:
  """What one file held: `lines` non-blank lines read (`undecodable` of them skipped), `documents` kept,
  `sentences` yielded, `empty_documents` dropped, `long_lines` split into `long_line_pieces`."""
  lines: int = 0
  undecodable: int = 0
  documents: int = 0
  sentences: int = 0
  empty_documents: int = 0
  long_lines: int = 0
  long_line_pieces: int = 0

  @property
  def undecodable_fraction(self) -> float:
    return self.undecodable / self.lines if self.lines else 0.0


# A line longer than this many bytes is not text: reading stops with an error naming the file.
MAX_LINE_BYTES = 64 << 20
# Lines longer than this many characters are split into sentences (`split_long_line`); config `data.max_line_chars`.
DEFAULT_MAX_LINE_CHARS = 10_000
# A file with more undecodable lines than this fraction is refused; config `data.max_undecodable_fraction`.
DEFAULT_MAX_UNDECODABLE_FRACTION = 0.05
_READ_CHUNK = 1 << 20
_GLOB_MAGIC = re.compile(r'[*?[]')


def expand_paths(paths: str | Sequence[str]) -> list[str]:
  """Files named by paths and glob patterns (`~` expanded), in the given order, each glob sorted, duplicates dropped.

  Paths may be local or remote (`gs://...`, anything `etils.epath` opens; see `common.storage`). An HF datasets
  source (`hf:PATH[:SPLIT][#COLUMN]`, `common.data.hf_datasets`) is kept as it is, one entry read like a file.
  Raises FileNotFoundError naming the pattern when a path is not a file or a glob matches no file, ValueError when
  no path is given.
  """
  if isinstance(paths, (str, os.PathLike)):
    paths = [paths]
  if not paths:
    raise ValueError('no input file given')
  files = []
  for pattern in paths:
    if hf_datasets.is_source(pattern):
      hf_datasets.check_exists(pattern)
      if pattern not in files:
        files.append(pattern)
      continue
    pattern = storage.fspath(pattern)
    if _GLOB_MAGIC.search(pattern):
      matches = storage.glob(pattern)
      if not matches:
        raise FileNotFoundError(f'no file matches the pattern {pattern!r}')
    elif storage.isfile(pattern):
      matches = [pattern]
    elif storage.exists(pattern):
      raise FileNotFoundError(f'not a file: {pattern!r}')
    else:
      raise FileNotFoundError(f'no such file: {pattern!r}')
    files.extend(m for m in matches if m not in files)
  return files


def decode_line(raw: bytes) -> str | None:
  """A stripped line decoded as UTF-8; '' for a blank line, None for a bad line (invalid UTF-8 / only controls)."""
  try:
    text = raw.decode('utf-8')
  except UnicodeDecodeError:
    return None
  return clean_line(text)


def clean_line(text: str) -> str | None:
  """A line of text stripped; '' for a blank line, None for a line made only of control characters."""
  text = text.strip()
  if text and not text.isprintable() and is_control_only(text):
    return None
  return text


def _raw_lines(f, path: str) -> Iterator[bytes]:
  """The lines of a binary file object (without a size limit per read call), each at most `MAX_LINE_BYTES`."""
  pending = b''
  while True:
    chunk = f.read(_READ_CHUNK)
    if not chunk:
      break
    pending += chunk
    lines = pending.split(b'\n')
    pending = lines.pop()
    yield from lines
    if len(pending) > MAX_LINE_BYTES:
      raise UserError(f'{path}: a line longer than {MAX_LINE_BYTES >> 20} MiB; is it a text corpus (one sentence a '
                      'line)?')
  if pending:
    yield pending


@contextlib.contextmanager
def _open_binary(path: str):
  with storage.open_file(path, 'rb') as raw:
    if path.endswith('.gz'):
      with gzip.GzipFile(fileobj=raw, mode='rb') as f:
        yield f
    else:
      yield raw


def iter_documents(paths: str | Sequence[str], stats: ReadStats | None = None, *,
                   max_line_chars: int = DEFAULT_MAX_LINE_CHARS) -> Iterator[list[str]]:
  """Yields each document (list of sentence lines, stripped) of files in the BERT format.

  Blank (whitespace-only) lines separate documents; the end of a file ends a document. Files are read as bytes
  (`.gz` through gzip) and each line is decoded on its own, so one bad line costs only that line. A UTF-8 byte-order
  mark at the start of a file is ignored. A line longer than `max_line_chars` characters is split into sentences
  (`split_long_line`; 0 = never split), counted in `stats.long_lines`.
  """
  files = expand_paths(paths)  # Fails here, before iteration starts, on a missing file.
  return _iter_file_documents(files, stats if stats is not None else ReadStats(), max_line_chars)


def _iter_file_documents(files: list[str], stats: ReadStats, max_line_chars: int = DEFAULT_MAX_LINE_CHARS
                         ) -> Iterator[list[str]]:
  for path in files:
    stats.files += 1
    counts = stats.sources.setdefault(path, SourceCounts())
    if hf_datasets.is_source(path):
      yield from _iter_row_documents(hf_datasets.iter_texts(path), stats, counts, max_line_chars)
      continue
    document, had_lines = [], False
    with _open_binary(path) as f:
      for number, raw in enumerate(_raw_lines(f, path)):
        if number == 0 and raw.startswith(codecs.BOM_UTF8):
          raw = raw[len(codecs.BOM_UTF8):]
        text = decode_line(raw)
        if text == '':
          if had_lines:
            yield from _finish_document(document, stats, counts)
            document, had_lines = [], False
          continue
        _add_line(text, document, stats, counts, max_line_chars)
        had_lines = True
    if had_lines:
      yield from _finish_document(document, stats, counts)


def _add_line(text: str | None, document: list[str], stats: ReadStats, counts: SourceCounts,
              max_line_chars: int) -> None:
  """Counts one non-blank line (None: undecodable) and appends it to `document`, split when longer than
  `max_line_chars`."""
  counts.lines += 1
  if text is None:
    counts.undecodable += 1
    stats.bad_lines += 1
  elif max_line_chars and len(text) > max_line_chars:
    pieces = split_long_line(text, max_line_chars)
    counts.long_lines += 1
    counts.long_line_pieces += len(pieces)
    stats.long_lines += 1
    stats.long_line_pieces += len(pieces)
    document.extend(pieces)
  else:
    document.append(text)


def _iter_row_documents(texts: Iterable[str | bytes | None], stats: ReadStats, counts: SourceCounts,
                        max_line_chars: int) -> Iterator[list[str]]:
  """One document per text (a dataset row): its non-blank lines are its sentences, read as the lines of a file are
  (bytes decoded line by line, a leading byte-order mark ignored, undecodable and control-only lines counted and
  skipped, long lines split). Blank lines inside a text separate nothing; a text with no usable line (empty,
  missing) counts as an empty document."""
  for value in texts:
    document = []
    if isinstance(value, (bytes, bytearray, memoryview)):
      raw = bytes(value)
      if raw.startswith(codecs.BOM_UTF8):
        raw = raw[len(codecs.BOM_UTF8):]
      lines = (decode_line(line) for line in raw.split(b'\n'))
    elif isinstance(value, str):
      lines = (clean_line(line) for line in value.removeprefix('\ufeff').split('\n'))
    else:
      lines = ()
    for text in lines:
      if text != '':
        _add_line(text, document, stats, counts, max_line_chars)
    yield from _finish_document(document, stats, counts)


def _finish_document(document: list[str], stats: ReadStats, counts: SourceCounts | None = None
                     ) -> Iterator[list[str]]:
  if document:
    stats.documents += 1
    stats.lines += len(document)
    if counts is not None:
      counts.documents += 1
      counts.sentences += len(document)
    yield document
  else:
    stats.empty_documents += 1
    if counts is not None:
      counts.empty_documents += 1


# ---------------------------------------------------------------------------------------------------------------------
# Checking sources before anything is prepared from them
# ---------------------------------------------------------------------------------------------------------------------

def check_file(path: str, counts: SourceCounts, *, max_undecodable_fraction: float) -> None:
  """Raises `UserError` naming `path` when it yielded no document or too many undecodable lines."""
  if counts.undecodable and counts.undecodable_fraction > max_undecodable_fraction:
    raise UserError(
        f'{path}: {counts.undecodable} of {counts.lines} lines ({counts.undecodable_fraction:.1%}) are not UTF-8 '
        f'text (limit {max_undecodable_fraction:.1%}, config data.max_undecodable_fraction); is it a text corpus?')
  if counts.documents == 0:
    if hf_datasets.is_source(path):
      what = ('has no text (no rows, or empty texts only)' if counts.lines == 0
              else f'has {counts.lines} lines but no usable sentence')
      raise UserError(f'{path} {what}: a corpus dataset needs a text column, one document a row, one sentence a '
                      'line')
    what = ('has no text (empty, or blank lines only)' if counts.lines == 0
            else f'has {counts.lines} lines but no usable sentence')
    raise UserError(f'{path} {what}: a corpus file needs text, one sentence a line, a blank line between documents')


def scan_files(files: Sequence[str], *, max_undecodable_fraction: float = DEFAULT_MAX_UNDECODABLE_FRACTION,
               max_line_chars: int = DEFAULT_MAX_LINE_CHARS,
               known: dict | None = None) -> dict[str, SourceCounts]:
  """Reads every file once and checks it (`check_file`); returns `{path: SourceCounts}` in the given order.

  Raises `UserError` naming the first bad file. `known` maps a path to counts already taken (reused as they are, e.g.
  from a cache keyed by the file's identity).
  """
  out = {}
  for path in files:
    if known and path in known:
      counts = known[path]
    else:
      stats = ReadStats()
      for _ in _iter_file_documents([path], stats, max_line_chars):
        pass
      counts = stats.sources[path]
    check_file(path, counts, max_undecodable_fraction=max_undecodable_fraction)
    out[path] = counts
  return out


def _count_line(name: str, c: SourceCounts) -> str:
  line = (f'{name}: {c.documents} documents, {c.sentences} sentences from {c.lines} lines, '
          f'{c.undecodable} undecodable ({c.undecodable_fraction:.2%}) skipped, {c.empty_documents} empty documents '
          f'dropped')
  if c.long_lines:
    line += f', {c.long_lines} long lines split into {c.long_line_pieces} sentences'
  return line


def format_counts(counts: dict[str, SourceCounts], max_lines: int = 20) -> list[str]:
  """One line per source: documents, sentences, lines, undecodable, empty documents, long lines split.

  With more than `max_lines` sources: a line with the totals, then the sources that had undecodable lines, empty
  documents or long lines (most undecodable first), at most `max_lines` of them.
  """
  if len(counts) <= max_lines:
    return [_count_line(path, c) for path, c in counts.items()]
  total = SourceCounts()
  for c in counts.values():
    for field in dataclasses.fields(SourceCounts):
      setattr(total, field.name, getattr(total, field.name) + getattr(c, field.name))
  lines = [_count_line(f'{len(counts)} files', total)]
  noisy = sorted(((path, c) for path, c in counts.items() if c.undecodable or c.empty_documents or c.long_lines),
                 key=lambda item: (-item[1].undecodable_fraction, -item[1].long_lines, item[0]))
  lines += [_count_line(path, c) for path, c in noisy[:max_lines]]
  if len(noisy) > max_lines:
    lines.append(f'... {len(noisy) - max_lines} more files with skipped, empty or split lines')
  return lines


# ---------------------------------------------------------------------------------------------------------------------
# TensorFlow Datasets
# ---------------------------------------------------------------------------------------------------------------------

def _import_tfds():
  return tfds_import.import_tfds('Reading a TFDS corpus')


def decode_text(value) -> str | None:
  """A TFDS text feature (bytes, numpy bytes or str) as str; None when it is not valid UTF-8."""
  if isinstance(value, str):
    return value
  if hasattr(value, 'item') and not isinstance(value, bytes):  # A 0-d numpy array.
    value = value.item()
    if isinstance(value, str):
      return value
  try:
    return bytes(value).decode('utf-8')
  except UnicodeDecodeError:
    return None


def text_to_document(text: str) -> list[str]:
  """One TFDS example's text as a document: every line break is a paragraph break, then `split_sentences`;
  sentences made only of control characters are dropped."""
  return [s for s in split_sentences(text, line_breaks_are_paragraphs=True) if not is_control_only(s)]


def tfds_documents(name: str, split: str, text_key: str = 'text', data_dir: str | None = None,
                   stats: ReadStats | None = None) -> Iterator[list[str]]:
  """Yields every example of a TFDS dataset (`name` may be `NAME/CONFIG`) as a document of sentences.

  The text is `example[text_key]`; undecodable texts count as bad lines, texts with no sentence as empty documents.
  TFDS is imported and the dataset opened (downloaded and prepared if needed) when this is called, not when the
  first document is read, so a missing package or dataset fails early.
  """
  tfds = _import_tfds()
  dataset = tfds.load(name, split=split, data_dir=data_dir, shuffle_files=False)
  return _iter_tfds_documents(tfds, dataset, name, text_key, stats if stats is not None else ReadStats())


def _iter_tfds_documents(tfds, dataset, name: str, text_key: str, stats: ReadStats) -> Iterator[list[str]]:
  stats.files += 1
  for example in tfds.as_numpy(dataset):
    if text_key not in example:
      raise KeyError(f'TFDS dataset {name!r} has no feature {text_key!r}; features: {sorted(example)}')
    text = decode_text(example[text_key])
    if text is None:
      stats.bad_lines += 1
      continue
    document = text_to_document(text)
    if not document:
      stats.empty_documents += 1
      continue
    stats.documents += 1
    stats.lines += len(document)
    yield document


# ---------------------------------------------------------------------------------------------------------------------
# One entry point for every source
# ---------------------------------------------------------------------------------------------------------------------

def parse_tfds_source(source: str) -> tuple[str, str]:
  """'tfds:NAME[/CONFIG][:SPLIT]' -> (NAME[/CONFIG], SPLIT); the split defaults to 'train'."""
  spec = source[len('tfds:'):]
  name, _, split = spec.partition(':')
  if not name:
    raise ValueError(f'bad TFDS source {source!r}: expected tfds:NAME[/CONFIG][:SPLIT]')
  return name, split or 'train'


def documents_from_source(source: str | Sequence[str], *, cache_dir: str | None = None,
                          stats: ReadStats | None = None, text_key: str = 'text',
                          data_dir: str | None = None,
                          max_line_chars: int = DEFAULT_MAX_LINE_CHARS) -> Iterator[list[str]]:
  """Documents from a source string.

  * `'embedded'` / `'embedded:valid'`: the embedded corpus (train / validation split), built once in the directory
    `cache_dir` (default `default_cache_dir()/embedded_corpus`).
  * `'tfds:NAME[/CONFIG][:SPLIT]'`: a TFDS dataset, text in feature `text_key`, stored under `data_dir`.
  * anything else: comma-separated file paths or glob patterns (or a sequence of them) in the BERT format, and HF
    datasets sources (`hf:PATH[:SPLIT][#COLUMN]`).
  """
  if isinstance(source, str) and source in ('embedded', 'embedded:train', 'embedded:valid'):
    out_dir = cache_dir or os.path.join(default_cache_dir(), 'embedded_corpus')
    build_embedded_corpus(out_dir)
    split = 'valid' if source.endswith(':valid') else 'train'
    return iter_documents(storage.join(out_dir, f'{split}.txt'), stats, max_line_chars=max_line_chars)
  if isinstance(source, str) and source.startswith('tfds:'):
    name, split = parse_tfds_source(source)
    return tfds_documents(name, split, text_key=text_key, data_dir=data_dir, stats=stats)
  paths = [p for p in source.split(',') if p] if isinstance(source, str) else list(source)
  return iter_documents(paths, stats, max_line_chars=max_line_chars)
