"""Text corpora for pretraining, in the original BERT input format, independent of any model.

The format is the one `create_pretraining_data.py` reads: plain UTF-8 text, one sentence per line, a blank line
between documents. Three sources produce documents (lists of sentences):

* `build_embedded_corpus` writes a default corpus that needs no download: English prose every CPython installation
  ships, namely the docstrings of a fixed list of standard-library modules (modules, classes, functions, methods;
  a few packages that must not be imported are parsed with `ast` instead) plus the reference-manual topics of
  `pydoc_data.topics`. Doctest sessions, literal/code blocks and heading underlines are removed; about 1.6 MB of
  text comes out (CPython 3.11), split into train and validation by a stable hash of each document's identity.
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

Sentence splitting (`split_sentences`) is deliberately simple and deterministic: paragraphs are separated by blank
lines; inside a paragraph, lines are joined and a sentence ends at `.`, `?` or `!` (plus closing quotes/brackets)
followed by whitespace and a capital letter (optionally behind an opening quote or bracket), unless the word before
the stop is a known abbreviation (`e.g.`, `i.e.`, `etc.`, ...) or a single capital initial.
"""
from __future__ import annotations

import ast
import codecs
import contextlib
import dataclasses
import gzip
import hashlib
import importlib
import importlib.util
import inspect
import io
import json
import os
import pkgutil
import platform
import re
import sys
import sysconfig
import unicodedata
import warnings
from typing import Iterable, Iterator, Sequence

from common import storage
from common.config import UserError
from common.data import hf_datasets, tfds_import

# ---------------------------------------------------------------------------------------------------------------------
# Sentence splitting
# ---------------------------------------------------------------------------------------------------------------------

# A candidate boundary: terminal punctuation, optional closing quotes/brackets, whitespace, then (looking ahead) a
# capital letter, optionally preceded by an opening quote or bracket.
_SENTENCE_BOUNDARY = re.compile(r'([.?!]["\')\]]*)\s+(?=["\'(\[]?[A-Z])')

# Words that end with a period without ending a sentence (compared lower-cased, without the final period).
_ABBREVIATIONS = frozenset({
    'e.g', 'i.e', 'etc', 'vs', 'cf', 'al', 'approx', 'resp', 'incl', 'esp', 'fig', 'no', 'nos', 'vol', 'ch', 'sec',
    'mr', 'mrs', 'ms', 'dr', 'prof', 'st', 'jr', 'sr', 'inc', 'ltd', 'co', 'corp', 'ca', 'viz', 'a.k.a', 'u.s',
})


def normalize_whitespace(text: str) -> str:
  """Collapses every run of whitespace (including line/paragraph separators) to one space; drops Cc controls."""
  text = ' '.join(text.split())
  if not text.isprintable():
    text = ''.join(ch for ch in text if unicodedata.category(ch) != 'Cc')
  return text


def split_paragraph(paragraph: str) -> list[str]:
  """Splits one paragraph (any whitespace allowed inside) into sentences; see the module docstring for the rule."""
  paragraph = normalize_whitespace(paragraph)
  sentences, start = [], 0
  for match in _SENTENCE_BOUNDARY.finditer(paragraph):
    before = paragraph[start:match.start(1)].rsplit(' ', 1)[-1].lstrip('"\'([')
    if before.lower() in _ABBREVIATIONS or (len(before) == 1 and before.isupper()):
      continue
    sentences.append(paragraph[start:match.end(1)])
    start = match.end()
  sentences.append(paragraph[start:])
  return [s for s in sentences if s]


def split_sentences(text: str, *, line_breaks_are_paragraphs: bool = False) -> list[str]:
  """Splits `text` into sentences: paragraphs at blank lines (or at every line break), then `split_paragraph`."""
  if line_breaks_are_paragraphs:
    paragraphs = text.splitlines()
  else:
    paragraphs = re.split(r'\n[ \t\r\f\v]*\n', text.replace('\r\n', '\n'))
  return [sentence for paragraph in paragraphs for sentence in split_paragraph(paragraph)]


# ---------------------------------------------------------------------------------------------------------------------
# Embedded default corpus: standard-library docstrings + pydoc reference topics
# ---------------------------------------------------------------------------------------------------------------------

CORPUS_FORMAT_VERSION = 1
STAMP_FILE = 'corpus_stamp.json'
MIN_DOCUMENT_SENTENCES = 2
MIN_DOCUMENT_CHARS = 100
MIN_PARAGRAPH_WORDS = 3

# Top-level standard-library modules whose docstrings form the corpus: modules that import without side effects (no
# windows, no terminal changes, no output). Packages are walked for their submodules (sorted), minus test packages.
# Modules missing from a given Python version are skipped. Never add: test, idlelib, tkinter, turtle, turtledemo,
# antigravity, this, readline, rlcompleter, curses, ensurepip, venv, site, lib2to3, distutils (a setuptools shim may
# stand in for it), encodings.
STDLIB_MODULES = (
    '_collections_abc', '_pydecimal', '_pyio', '_strptime', '_threading_local',
    'abc', 'aifc', 'argparse', 'array', 'ast', 'asynchat', 'asyncio', 'asyncore', 'atexit', 'audioop', 'base64',
    'bdb', 'binascii', 'bisect', 'builtins', 'bz2', 'cProfile', 'calendar', 'cgi', 'cgitb', 'chunk', 'cmath', 'cmd',
    'code', 'codecs', 'codeop', 'collections', 'colorsys', 'compileall', 'concurrent', 'configparser', 'contextlib',
    'contextvars', 'copy', 'copyreg', 'crypt', 'csv', 'ctypes', 'dataclasses', 'datetime', 'dbm', 'decimal',
    'difflib', 'dis', 'doctest', 'email', 'enum', 'errno', 'faulthandler', 'fcntl', 'filecmp', 'fileinput', 'fnmatch',
    'fractions', 'ftplib', 'functools', 'gc', 'genericpath', 'getopt', 'getpass', 'gettext', 'glob', 'graphlib',
    'grp', 'gzip', 'hashlib', 'heapq', 'hmac', 'html', 'http', 'imaplib', 'imghdr', 'imp', 'importlib', 'inspect',
    'io', 'ipaddress', 'itertools', 'json', 'keyword', 'linecache', 'locale', 'logging', 'lzma', 'mailbox', 'mailcap',
    'marshal', 'math', 'mimetypes', 'mmap', 'modulefinder', 'multiprocessing', 'netrc', 'nis', 'nntplib', 'ntpath',
    'nturl2path', 'numbers', 'opcode', 'operator', 'optparse', 'os', 'pathlib', 'pdb', 'pickle', 'pickletools',
    'pipes', 'pkgutil', 'platform', 'plistlib', 'poplib', 'posix', 'posixpath', 'pprint', 'profile', 'pstats', 'pty',
    'pwd', 'py_compile', 'pyclbr', 'pydoc', 'pyexpat', 'queue', 'quopri', 'random', 're', 'reprlib', 'resource',
    'runpy', 'sched', 'secrets', 'select', 'selectors', 'shelve', 'shlex', 'shutil', 'signal', 'smtpd', 'smtplib',
    'sndhdr', 'socket', 'socketserver', 'spwd', 'sqlite3', 'sre_compile', 'sre_constants', 'sre_parse', 'ssl', 'stat',
    'statistics', 'string', 'stringprep', 'struct', 'subprocess', 'sunau', 'symtable', 'sys', 'sysconfig', 'syslog',
    'tabnanny', 'tarfile', 'telnetlib', 'tempfile', 'termios', 'textwrap', 'threading', 'time', 'timeit', 'token',
    'tokenize', 'tomllib', 'trace', 'traceback', 'tracemalloc', 'tty', 'types', 'typing', 'unicodedata', 'unittest',
    'urllib', 'uu', 'uuid', 'warnings', 'wave', 'weakref', 'webbrowser', 'wsgiref', 'xdrlib', 'xml', 'xmlrpc',
    'zipapp', 'zipfile', 'zipimport', 'zlib', 'zoneinfo',
)
# Standard-library packages that must never be imported here (they open windows or change global state) but whose
# source files document them well: their docstrings are read by parsing the source with `ast`, never executed.
PARSED_ONLY_MODULES = ('idlelib', 'lib2to3', 'tkinter', 'turtle', 'turtledemo')
_SKIPPED_NAME_PARTS = frozenset({'test', 'tests', 'idle_test', '__main__'})

_HEADING_UNDERLINE = re.compile(r'^([=\-*~^#"+`\'.:_])\1{2,}$')
_CODE_MARKERS = ('==', '!=', '->', '+=', '::=', ' = ', '</', '/>', '\\x', '\\n')
_CODE_INDENT = 3


def _is_code_line(line: str) -> bool:
  """A line of a cleaned docstring that is code or markup rather than prose.

  Code: a line starting with `#`, `@`, `$`, `%`, `|` or `+` (comments, decorators, prompts, tables), a heading
  underline (`=====`), a short section heading (`Args:`, `Example::`), a line containing a typical code token (`==`,
  `->`, ` = `, `::=`, ...), or one made of fewer than 70 % letters and spaces. A line indented by `_CODE_INDENT`
  columns or more (literal blocks, examples) is code unless it is at least 90 % letters and spaces, has no brackets
  or `=`, and does not end with `:`.
  """
  stripped = line.strip()
  if stripped[0] in '#@$%|+' or _HEADING_UNDERLINE.match(stripped):
    return True
  if stripped.endswith(':') and len(stripped.split()) <= 2:
    return True
  if any(marker in stripped for marker in _CODE_MARKERS):
    return True
  prose_fraction = sum(ch.isalpha() or ch == ' ' for ch in stripped) / len(stripped)
  if len(line) - len(line.lstrip(' ')) >= _CODE_INDENT:
    return prose_fraction < 0.9 or stripped.endswith(':') or any(ch in stripped for ch in '=()[]{}')
  return prose_fraction < 0.7


def docstring_paragraphs(text: str) -> list[str]:
  """Prose paragraphs of a docstring or reference-manual topic, each one string with lines joined by spaces.

  Doctest sessions (a `>>>` line and everything after it up to the next blank line) and code-ish lines
  (`_is_code_line`) are dropped; a dropped line ends the current paragraph, as does a blank line. Paragraphs of fewer
  than `MIN_PARAGRAPH_WORDS` words (headings such as `Args:`) are dropped.
  """
  paragraphs, current, in_doctest = [], [], False

  def flush():
    if current:
      paragraph = normalize_whitespace(' '.join(current))
      if len(paragraph.split()) >= MIN_PARAGRAPH_WORDS:
        paragraphs.append(paragraph)
      current.clear()

  for line in inspect.cleandoc(text).expandtabs(8).splitlines():
    stripped = line.strip()
    if not stripped:
      flush()
      in_doctest = False
      continue
    if stripped.startswith('>>>'):
      in_doctest = True
    if in_doctest or _is_code_line(line):
      flush()
      continue
    current.append(stripped)
  flush()
  return paragraphs


def _import_quietly(name: str):
  """Imports a module with warnings, stdout and stderr suppressed; returns None on any failure."""
  try:
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
        contextlib.redirect_stderr(io.StringIO()):
      warnings.simplefilter('ignore')
      return importlib.import_module(name)
  except (Exception, SystemExit):  # An optional C extension, a platform module, a deprecated module: skip it.
    return None


def _submodule_names(package) -> list[str]:
  names = []
  try:
    infos = sorted(pkgutil.iter_modules(package.__path__, package.__name__ + '.'), key=lambda info: info.name)
  except Exception:
    return names
  for info in infos:
    if _SKIPPED_NAME_PARTS.intersection(info.name.split('.')):
      continue
    names.append(info.name)
    if info.ispkg:
      subpackage = _import_quietly(info.name)
      if subpackage is not None and hasattr(subpackage, '__path__'):
        names.extend(_submodule_names(subpackage))
  return names


def stdlib_module_names() -> list[str]:
  """The modules the embedded corpus is made from, in a fixed order: `STDLIB_MODULES` and their submodules."""
  names = []
  for top in sorted(STDLIB_MODULES):
    module = _import_quietly(top)
    if module is None:
      continue
    names.append(top)
    if hasattr(module, '__path__'):
      names.extend(_submodule_names(module))
  return names


def _is_stdlib_object(value) -> bool:
  module_name = getattr(value, '__module__', None)
  if not isinstance(module_name, str):
    return False
  return module_name.split('.')[0] in sys.stdlib_module_names


def _safe_doc(value) -> str | None:
  try:
    doc = getattr(value, '__doc__', None)
  except Exception:
    return None
  return doc if isinstance(doc, str) else None


def _canonical_name(value, fallback: str) -> str:
  """`module.qualname` of a class or routine, the same whichever module re-exports it."""
  module_name = getattr(value, '__module__', None)
  qualname = getattr(value, '__qualname__', None)
  if isinstance(module_name, str) and isinstance(qualname, str):
    return f'{module_name}.{qualname}'
  return fallback


def _module_docstrings(module) -> Iterator[tuple[str, str | None]]:
  """(identity, docstring) of a module, the classes and routines found in it and their methods and properties.

  Only objects whose `__module__` is a standard-library module are visited, so nothing a third-party package may
  have attached to a module enters the corpus. Identities use the defining module and qualified name.
  """
  name = module.__name__
  yield f'module:{name}', _safe_doc(module)
  try:
    items = sorted(vars(module).items())
  except Exception:
    return
  for attr, value in items:
    if not _is_stdlib_object(value):
      continue
    if inspect.isclass(value):
      owner = _canonical_name(value, f'{name}.{attr}')
      yield f'class:{owner}', _safe_doc(value)
      try:
        members = sorted(vars(value).items())
      except Exception:
        continue
      for member_name, member in members:
        if inspect.isroutine(member) or isinstance(member, (property, classmethod, staticmethod)):
          yield f'member:{owner}.{member_name}', _safe_doc(member)
    elif inspect.isroutine(value):
      yield f'function:{_canonical_name(value, f"{name}.{attr}")}', _safe_doc(value)


def _source_files(module_name: str) -> list[tuple[str, str]]:
  """(relative name, path) of the `.py` files of a top-level module or package, found without importing it."""
  try:
    spec = importlib.util.find_spec(module_name)
  except (Exception, SystemExit):
    return []
  stdlib_dir = os.path.realpath(sysconfig.get_paths()['stdlib'])
  if spec is None or not spec.origin or not os.path.realpath(spec.origin).startswith(stdlib_dir + os.sep):
    return []  # Missing, or shadowed by a third-party copy.
  if not spec.submodule_search_locations:
    return [(module_name, spec.origin)] if spec.origin and spec.origin.endswith('.py') else []
  files = []
  for location in sorted(spec.submodule_search_locations):
    for directory, subdirs, names in os.walk(location):
      subdirs[:] = sorted(d for d in subdirs if d not in _SKIPPED_NAME_PARTS and not d.startswith('__'))
      for file_name in sorted(names):
        if file_name.endswith('.py'):
          path = os.path.join(directory, file_name)
          relative = os.path.relpath(path, location)[:-len('.py')].replace(os.sep, '.')
          files.append((f'{module_name}.{relative}', path))
  return files


def _parsed_docstrings(module_name: str) -> Iterator[tuple[str, str | None]]:
  """(identity, docstring) of every module, class and function in the source of a module that is never imported."""
  for relative, path in _source_files(module_name):
    try:
      with open(path, 'rb') as f:
        tree = ast.parse(f.read(), filename=path)
    except (OSError, SyntaxError, ValueError):
      continue
    yield f'source:{relative}', ast.get_docstring(tree, clean=False)
    for node in ast.walk(tree):
      if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
        yield f'source:{relative}:{node.name}:{node.lineno}', ast.get_docstring(node, clean=False)


def _raw_sources() -> list[tuple[str, str]]:
  """(identity, raw text) of every documentation source, each docstring text once (the first one visited wins)."""
  sources, seen = [], set()

  def add(pairs):
    for identity, doc in pairs:
      if doc and doc.strip() and doc not in seen:
        seen.add(doc)
        sources.append((identity, doc))

  with warnings.catch_warnings():
    warnings.simplefilter('ignore')  # Touching deprecated attributes (typing.io, ...) warns.
    for module_name in stdlib_module_names():
      module = _import_quietly(module_name)
      if module is not None:
        add(_module_docstrings(module))
    for module_name in PARSED_ONLY_MODULES:
      add(_parsed_docstrings(module_name))
  topics_module = _import_quietly('pydoc_data.topics')
  topics = getattr(topics_module, 'topics', {}) if topics_module is not None else {}
  add((f'topic:{topic}', topics[topic]) for topic in sorted(topics))
  return sources


def embedded_documents() -> list[tuple[str, list[str]]]:
  """All documents of the embedded corpus as (identity, sentences), sorted by identity.

  A document needs at least `MIN_DOCUMENT_SENTENCES` sentences and `MIN_DOCUMENT_CHARS` characters. Docstrings that
  clean up to the same sentences (a C class and its pure-Python twin) are kept once, under the smallest identity.
  """
  identity_of = {}
  for identity, text in _raw_sources():
    sentences = tuple(s for paragraph in docstring_paragraphs(text) for s in split_paragraph(paragraph)
                      if not is_control_only(s))
    if len(sentences) >= MIN_DOCUMENT_SENTENCES and sum(map(len, sentences)) >= MIN_DOCUMENT_CHARS:
      identity_of[sentences] = min(identity, identity_of.get(sentences, identity))
  by_identity = {}
  for sentences, identity in identity_of.items():
    by_identity.setdefault(identity, list(sentences))
  return sorted(by_identity.items())


def is_validation_document(identity: str, validation_fraction: float) -> bool:
  """Stable split: the first 8 bytes of sha256(identity), as a fraction of 2**64, below `validation_fraction`."""
  digest = hashlib.sha256(identity.encode('utf-8')).digest()
  return int.from_bytes(digest[:8], 'big') < validation_fraction * 2.0**64


def _format_documents(documents: Iterable[list[str]]) -> bytes:
  return '\n'.join('\n'.join(sentences) + '\n' for sentences in documents).encode('utf-8')


def _sha256_file(path: str) -> str:
  return hashlib.sha256(storage.read_bytes(path)).hexdigest()


def _write_atomically(path: str, data: bytes) -> None:
  storage.write_bytes(path, data)


def build_embedded_corpus(out_dir: str, validation_fraction: float = 0.02) -> dict:
  """Writes `train.txt` and `valid.txt` (BERT format) of the embedded corpus under `out_dir`.

  Idempotent: if `corpus_stamp.json` matches (format version, Python version, fraction, file hashes) nothing is
  rebuilt. Returns `{'train': {'documents', 'sentences', 'bytes'}, 'valid': {...}}`.
  """
  if not 0.0 <= validation_fraction < 1.0:
    raise ValueError(f'validation_fraction must be in [0, 1), got {validation_fraction!r}')
  storage.makedirs(out_dir)
  stamp_path = storage.join(out_dir, STAMP_FILE)
  key = dict(format_version=CORPUS_FORMAT_VERSION, python_version=platform.python_version(),
             python_implementation=platform.python_implementation(), validation_fraction=validation_fraction)
  paths = {split: storage.join(out_dir, f'{split}.txt') for split in ('train', 'valid')}
  if storage.exists(stamp_path):
    try:
      stamp = storage.read_json(stamp_path)
      if stamp.get('key') == key and all(storage.exists(p) and _sha256_file(p) == stamp['sha256'][split]
                                         for split, p in paths.items()):
        return stamp['counts']
    except (OSError, ValueError, KeyError, TypeError):
      pass  # A damaged stamp: rebuild.

  splits = {'train': [], 'valid': []}
  for identity, sentences in embedded_documents():
    splits['valid' if is_validation_document(identity, validation_fraction) else 'train'].append(sentences)
  counts, hashes = {}, {}
  for split, documents in splits.items():
    data = _format_documents(documents)
    _write_atomically(paths[split], data)
    counts[split] = dict(documents=len(documents), sentences=sum(map(len, documents)), bytes=len(data))
    hashes[split] = hashlib.sha256(data).hexdigest()
  _write_atomically(stamp_path, json.dumps(dict(key=key, counts=counts, sha256=hashes), indent=2).encode())
  return counts


def default_cache_dir() -> str:
  """`$XLNET_BERT_JAX_CACHE` or `~/.cache/xlnet_bert_jax`."""
  return storage.cache_root()


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


def is_control_only(text: str) -> bool:
  """True when every character is whitespace or a Unicode control/format/unassigned character (category C*)."""
  return all(ch.isspace() or unicodedata.category(ch)[0] == 'C' for ch in text)


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


def split_long_line(text: str, max_chars: int) -> list[str]:
  """A line longer than `max_chars` as sentences (`split_paragraph`), each piece still longer cut at the last space
  before `max_chars` (or at `max_chars` inside a word longer than that). Nothing is dropped but whitespace."""
  if len(text) <= max_chars:
    return [text]
  pieces = []
  for sentence in split_paragraph(text):
    while len(sentence) > max_chars:
      cut = sentence.rfind(' ', 0, max_chars + 1)
      if cut <= 0:
        cut = max_chars
      pieces.append(sentence[:cut].strip())
      sentence = sentence[cut:].strip()
    if sentence:
      pieces.append(sentence)
  return [p for p in pieces if p]


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
