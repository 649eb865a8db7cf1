"""Every file the project reads or writes goes through here: local paths and any scheme `etils.epath` knows
(`gs://`, `s3://`, ...), with the same calls.

Paths are plain strings everywhere else in the code (`join` keeps a `gs://bucket/run` a URL; `os.path.abspath`
would turn it into `./gs:/bucket/run`). What object stores cannot do is handled here, once:

* no rename: `write_bytes` / `write_text` / `write_json` are atomic locally (temporary file + `os.replace`) and a
  single object upload remotely (an object appears whole or not at all);
* no append: `AppendFile` (metrics JSONL, TensorBoard event files) appends to a local mirror and uploads the whole
  file on `flush()` (at most every `upload_every` seconds) and on `close()`; an existing remote file is downloaded
  first, so a resumed run continues it;
* native libraries that open local paths only (ArrayRecord, sentencepiece, tokenizers' trainers):
  `local_file(path)` gives a readable local copy, `staged_dir(path)` a local directory uploaded to `path` when the
  block ends without error, `mirror_dir(path)` a local copy of a remote directory, cached by a key.

`is_remote(path)` tells the two kinds apart: a path with a `scheme://` prefix (other than `file://`).
"""
from __future__ import annotations

import contextlib
import glob as glob_lib
import hashlib
import json
import os
import posixpath
import re
import shutil
import tempfile
import time
from typing import Any, Iterator, Sequence

from etils import epath

PathLike = str | os.PathLike

_SCHEME = re.compile(r'^[A-Za-z][A-Za-z0-9+.-]*://')
_GLOB_MAGIC = re.compile(r'[*?[]')


# ----------------------------------------------------------------------------------------------------------------------
# Names.
# ----------------------------------------------------------------------------------------------------------------------

def fspath(path: PathLike) -> str:
  """`path` as a string; `file://` stripped, `~` expanded for local paths."""
  path = os.fspath(path)
  if path.startswith('file://'):
    path = path[len('file://'):]
  return path if is_remote(path) else os.path.expanduser(path)


def is_remote(path: PathLike) -> bool:
  """True for a `scheme://...` path (gs://, s3://, ...), False for a local one."""
  path = os.fspath(path)
  return bool(_SCHEME.match(path)) and not path.startswith('file://')


def as_path(path: PathLike) -> epath.Path:
  return epath.Path(fspath(path))


def join(base: PathLike, *parts: str) -> str:
  """`os.path.join` that keeps URLs URLs (`join('gs://b/run', 'data')` is `'gs://b/run/data'`)."""
  base = fspath(base)
  return posixpath.join(base, *parts) if is_remote(base) else os.path.join(base, *parts)


def basename(path: PathLike) -> str:
  return posixpath.basename(fspath(path).rstrip('/'))


def dirname(path: PathLike) -> str:
  path = fspath(path)
  return posixpath.dirname(path.rstrip('/')) if is_remote(path) else os.path.dirname(os.path.abspath(path))


def absolute(path: PathLike) -> str:
  """An absolute local path, or the URL unchanged."""
  path = fspath(path)
  return path if is_remote(path) else os.path.abspath(path)


def same_file(a: PathLike, b: PathLike) -> bool:
  return absolute(a) == absolute(b)


# ----------------------------------------------------------------------------------------------------------------------
# Queries.
# ----------------------------------------------------------------------------------------------------------------------

def exists(path: PathLike) -> bool:
  return as_path(path).exists()


def isdir(path: PathLike) -> bool:
  return as_path(path).is_dir()


def isfile(path: PathLike) -> bool:
  p = as_path(path)
  return p.exists() and not p.is_dir()


def listdir(path: PathLike) -> list[str]:
  """Names in a directory (sorted); [] when it does not exist."""
  p = as_path(path)
  if not p.exists():
    return []
  return sorted(child.name for child in p.iterdir())


def stat_identity(path: PathLike) -> list:
  """A cheap identity of a file for fingerprints: [absolute path or URL, size, mtime in ns (local) or s (remote)]."""
  path = fspath(path)
  if not is_remote(path):
    st = os.stat(path)
    return [os.path.abspath(path), st.st_size, st.st_mtime_ns]
  st = as_path(path).stat()
  return [path, int(st.length), int(st.mtime)]


def glob(pattern: PathLike) -> list[str]:
  """Files (not directories) matching a glob pattern, sorted; `**` works locally only."""
  pattern = fspath(pattern)
  if not is_remote(pattern):
    return sorted(p for p in glob_lib.glob(pattern, recursive=True) if os.path.isfile(p))
  magic = _GLOB_MAGIC.search(pattern)
  if magic is None:
    return [pattern] if isfile(pattern) else []
  if '**' in pattern:
    raise ValueError(f'recursive "**" patterns are not supported on remote storage: {pattern!r}')
  root = pattern[:pattern.rfind('/', 0, magic.start()) + 1]  # The fixed directory part, ending with '/'.
  matches = as_path(root).glob(pattern[len(root):])
  return sorted(str(m) for m in matches if not m.is_dir())


# ----------------------------------------------------------------------------------------------------------------------
# Whole-file reads and writes.
# ----------------------------------------------------------------------------------------------------------------------

def open_file(path: PathLike, mode: str = 'r'):
  """A file object; text modes are UTF-8. Append ('a') works locally only: see `AppendFile`."""
  path = fspath(path)
  if not is_remote(path):
    return open(path, mode, **({} if 'b' in mode else {'encoding': 'utf-8'}))
  if 'a' in mode:
    raise ValueError(f'cannot append to {path}: remote objects are written whole (use storage.AppendFile)')
  return as_path(path).open(mode)


def read_bytes(path: PathLike) -> bytes:
  return as_path(path).read_bytes()


def read_text(path: PathLike) -> str:
  return read_bytes(path).decode('utf-8')


def read_json(path: PathLike) -> Any:
  return json.loads(read_bytes(path))


def makedirs(path: PathLike) -> None:
  as_path(path).mkdir(parents=True, exist_ok=True)


def write_bytes(path: PathLike, data: bytes) -> None:
  """Writes a whole file atomically: a temporary file renamed into place locally, one object upload remotely.

  The parent directory is created.
  """
  path = fspath(path)
  if is_remote(path):
    makedirs(dirname(path))
    with as_path(path).open('wb') as f:
      f.write(data)
    return
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f'{path}.tmp-{os.getpid()}'
  with open(tmp, 'wb') as f:
    f.write(data)
  os.replace(tmp, path)


def write_text(path: PathLike, text: str) -> None:
  write_bytes(path, text.encode('utf-8'))


def write_json(path: PathLike, value: Any, **kwargs) -> None:
  write_text(path, json.dumps(value, **kwargs))


def remove(path: PathLike, missing_ok: bool = True) -> None:
  as_path(path).unlink(missing_ok=missing_ok)


def copy_file(src: PathLike, dst: PathLike) -> None:
  """Copies one file between any two places (local or remote), replacing `dst`."""
  src, dst = fspath(src), fspath(dst)
  if not is_remote(src) and not is_remote(dst):
    os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
    shutil.copyfile(src, dst)
    return
  makedirs(dirname(dst))
  with open_file(src, 'rb') as fin, open_file(dst, 'wb') as fout:
    shutil.copyfileobj(fin, fout, 16 << 20)


def copy_tree(src: PathLike, dst: PathLike, names: Sequence[str] | None = None) -> None:
  """Copies the files of directory `src` (recursively; or only the top-level `names`) into `dst`."""
  src, dst = fspath(src), fspath(dst)
  makedirs(dst)
  if names is not None:
    for name in names:
      copy_file(join(src, name), join(dst, name))
    return
  for root, _, files in as_path(src).walk():
    relative = os.path.relpath(str(root), src) if not is_remote(src) else str(root)[len(src):].strip('/')
    for name in sorted(files):
      parts = [p for p in relative.replace(os.sep, '/').split('/') if p and p != '.']
      copy_file(join(str(root), name), join(dst, *parts, name))


# ----------------------------------------------------------------------------------------------------------------------
# Local views for libraries that only open local files.
# ----------------------------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def local_file(path: PathLike, suffix: str = '') -> Iterator[str]:
  """A local path with the content of `path`: `path` itself when local, else a temporary copy removed afterwards."""
  path = fspath(path)
  if not is_remote(path):
    yield path
    return
  with tempfile.TemporaryDirectory(prefix='xbj-') as tmp:
    local = os.path.join(tmp, basename(path) + suffix)
    copy_file(path, local)
    yield local


@contextlib.contextmanager
def staged_dir(path: PathLike) -> Iterator[str]:
  """A local directory whose files end up in `path`: `path` itself (created) when local; else a temporary directory
  uploaded to `path` when the block ends without an exception (nothing is uploaded otherwise)."""
  path = fspath(path)
  if not is_remote(path):
    os.makedirs(path, exist_ok=True)
    yield path
    return
  with tempfile.TemporaryDirectory(prefix='xbj-stage-') as tmp:
    yield tmp
    copy_tree(tmp, path)


def cache_root() -> str:
  """`$XLNET_BERT_JAX_CACHE` or `~/.cache/xlnet_bert_jax`."""
  return os.environ.get('XLNET_BERT_JAX_CACHE') or os.path.join(os.path.expanduser('~'), '.cache', 'xlnet_bert_jax')


def mirror_dir(path: PathLike, names: Sequence[str], key: str) -> str:
  """A local directory holding the files `names` of directory `path`: `path` itself when local; else a copy under
  `cache_root()/mirror/<hash of path and key>/`, reused while every file is there with the remote size.

  `key` identifies the content (e.g. a shard fingerprint), so a rewritten remote directory gets a fresh copy.
  """
  path = fspath(path)
  if not is_remote(path):
    return path
  digest = hashlib.sha256(f'{path}\n{key}'.encode()).hexdigest()[:24]
  local = os.path.join(cache_root(), 'mirror', digest)
  os.makedirs(local, exist_ok=True)
  for name in names:
    target = os.path.join(local, name)
    remote = join(path, name)
    if os.path.exists(target) and os.path.getsize(target) == as_path(remote).stat().length:
      continue
    tmp = f'{target}.tmp-{os.getpid()}'
    copy_file(remote, tmp)
    os.replace(tmp, target)
  return local


# ----------------------------------------------------------------------------------------------------------------------
# Appending.
# ----------------------------------------------------------------------------------------------------------------------

class AppendFile:
  """A binary file opened for appending, local or remote.

  Local: the file itself, opened in append mode, flushed on `flush()`. Remote (object stores cannot append): the
  existing object, if any, is downloaded into a local mirror; writes go to the mirror, and `flush()` uploads the
  whole mirror when something changed and `upload_every` seconds have passed since the last upload (0: always);
  `close()` always uploads. A process killed between uploads loses at most the last `upload_every` seconds.
  """

  def __init__(self, path: PathLike, upload_every: float = 30.0):
    self.path = fspath(path)
    self.upload_every = float(upload_every)
    self._remote = is_remote(self.path)
    self._dirty = False
    self._last_upload = None  # Never: the first flush uploads.
    if not self._remote:
      os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
      self._file = open(self.path, 'ab')
      self._tmpdir = None
      return
    self._tmpdir = tempfile.TemporaryDirectory(prefix='xbj-append-')
    self._local = os.path.join(self._tmpdir.name, basename(self.path))
    if exists(self.path):
      copy_file(self.path, self._local)
    self._file = open(self._local, 'ab')
    makedirs(dirname(self.path))

  def write(self, data: bytes) -> int:
    self._dirty = True
    return self._file.write(data)

  def flush(self, force: bool = False) -> None:
    self._file.flush()
    if self._remote and self._dirty and (force or self._last_upload is None
                                         or time.monotonic() - self._last_upload >= self.upload_every):
      self._upload()

  def _upload(self) -> None:
    copy_file(self._local, self.path)
    self._dirty = False
    self._last_upload = time.monotonic()

  def close(self) -> None:
    if self._file.closed:
      return
    self._file.close()
    if self._remote:
      if self._dirty:
        self._upload()
      self._tmpdir.cleanup()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
