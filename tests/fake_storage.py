"""A fake `gs://` for tests: `etils.epath` resolves `gs://BUCKET/...` to a temporary directory, with the limits of an
object store (no append, no directory rename), and every access is recorded.

`etils.epath` picks a path's backend from its scheme (`gpath._PREFIX_TO_BACKEND`, TensorFlow's gfile first when TF
is installed); `fake_gcs(root)` swaps the `gs` backend for `FakeObjectStore` while the block runs. Code that bypasses
`epath` (`open`, `os.makedirs`, `glob`) with a `gs://` string writes a local `gs:` folder in the current directory
instead, which is what the tests check for.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Iterator
from unittest import mock

from etils.epath import backend as backend_lib
from etils.epath import gpath

PREFIX = 'gs://'


@dataclasses.dataclass(eq=False)
class FakeObjectStore(backend_lib._OsPathBackend):  # pylint: disable=protected-access
  """`gs://X` is the file `root/X`. Opens, writes and the other calls are counted in `calls`."""
  root: str
  calls: dict = dataclasses.field(default_factory=dict)
  written: list = dataclasses.field(default_factory=list)

  def _local(self, path) -> str:
    path = os.fspath(path)
    if not path.startswith(PREFIX):
      raise AssertionError(f'fake gs backend got a non-gs path: {path!r}')
    return os.path.join(self.root, path[len(PREFIX):])

  def _url(self, local) -> str:
    return PREFIX + os.path.relpath(os.fspath(local), self.root).replace(os.sep, '/')

  def _count(self, name):
    self.calls[name] = self.calls.get(name, 0) + 1

  def open(self, path, mode):
    self._count('open')
    if 'a' in mode or '+' in mode:
      raise OSError(f'fake object store: mode {mode!r} is not supported ({path})')
    local = self._local(path)
    if 'w' in mode:
      self.written.append(os.fspath(path))
      os.makedirs(os.path.dirname(local), exist_ok=True)  # Objects need no parent "directory".
    return super().open(local, mode)

  def exists(self, path):
    self._count('exists')
    return super().exists(self._local(path))

  def isdir(self, path):
    return super().isdir(self._local(path))

  def listdir(self, path):
    self._count('listdir')
    return super().listdir(self._local(path))

  def glob(self, path):
    self._count('glob')
    return [self._url(p) for p in super().glob(self._local(path))]

  def walk(self, top, *, top_down=True, on_error=None):
    for root, dirs, files in super().walk(self._local(top), top_down=top_down, on_error=on_error):
      yield self._url(root), dirs, files

  def makedirs(self, path, *, exist_ok=False, mode=None):
    return super().makedirs(self._local(path), exist_ok=True)

  def mkdir(self, path, *, exist_ok=False, mode=None):
    return super().makedirs(self._local(path), exist_ok=True)

  def rmtree(self, path):
    return super().rmtree(self._local(path))

  def remove(self, path):
    return super().remove(self._local(path))

  def rename(self, path, dst):
    if os.path.isdir(self._local(path)):
      raise OSError('fake object store: directories cannot be renamed')
    return super().rename(self._local(path), self._local(dst))

  def replace(self, path, dst):
    return super().replace(self._local(path), self._local(dst))

  def copy(self, path, dst, overwrite):
    return super().copy(self._local(path), self._local(dst), overwrite=overwrite)

  def stat(self, path):
    return super().stat(self._local(path))


@contextlib.contextmanager
def fake_gcs(root: str) -> Iterator[FakeObjectStore]:
  """While the block runs, `epath.Path('gs://...')` lives under `root`."""
  os.makedirs(root, exist_ok=True)
  store = FakeObjectStore(root=os.fspath(root))
  backends = dict(gpath._PREFIX_TO_BACKEND)  # pylint: disable=protected-access
  backends['gs'] = store
  with mock.patch.object(gpath, '_PREFIX_TO_BACKEND', backends), \
      mock.patch.object(gpath, '_is_tf_installed', lambda: False):
    yield store


def local_gs_folders(directory: str) -> list[str]:
  """Any `gs:` entry (what `open('gs://...')` or `os.makedirs('gs://...')` create) under `directory`."""
  found = []
  for root, dirs, files in os.walk(directory):
    found.extend(os.path.join(root, name) for name in dirs + files if name.startswith('gs:'))
  return found
