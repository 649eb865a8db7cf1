"""The default pretraining corpus, which needs no download: English prose every CPython installation ships.

`build_embedded_corpus` writes it in the BERT format (one sentence per line, a blank line between documents): the
docstrings of a fixed list of standard-library modules (modules, classes, functions, methods; a few packages that
must not be imported are parsed with `ast` instead) plus the reference-manual topics of `pydoc_data.topics`.
Doctest sessions, literal/code blocks and heading underlines are removed; about 1.6 MB of text comes out (CPython
3.11), split into train and validation by a stable hash of each document's identity (`is_validation_document`).
"""
from __future__ import annotations

import ast
import contextlib
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
import warnings
from typing import Iterable, Iterator

from common import storage
from common.data.sentences import is_control_only, normalize_whitespace, split_paragraph

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
