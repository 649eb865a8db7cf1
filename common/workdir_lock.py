"""One run per workdir: an exclusive lock held by process 0 for the whole run (`WorkdirLock`)."""
from __future__ import annotations

import contextlib
import datetime
import json
import os
import socket
import threading
import time

import jax

from common import storage
from common.config import UserError

LOCK_FILE = 'lock.json'


class WorkdirBusy(UserError):
  """Another run holds the workdir."""


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


class WorkdirLock:
  """An exclusive, re-entrant (within a process) lock on a workdir, held by process 0.

  Local workdirs: `fcntl.flock` on WORKDIR/lock.json, which the kernel releases when the holder dies however it
  dies, so a lock is never stale; the file names the holder (host, pid, start time) for the refusal message.
  Remote workdirs (no flock): the holder rewrites the file every `heartbeat_s`; a file whose heartbeat is older than
  `stale_s`, or whose holder is a dead process on this host, is stale and taken over.
  """
  _held: dict[str, list] = {}   # path -> [lock, depth]
  _guard = threading.Lock()

  def __init__(self, workdir: str, *, heartbeat_s: float = 60.0, stale_s: float = 300.0):
    self.root = storage.as_path(storage.absolute(workdir))
    self.path = self.root / LOCK_FILE
    self.heartbeat_s, self.stale_s = heartbeat_s, stale_s
    self._file = None
    self._stop = threading.Event()
    self._thread = None

  def _holder(self) -> dict:
    return dict(host=socket.gethostname(), pid=os.getpid(), since=datetime.datetime.now().isoformat(timespec='seconds'),
                heartbeat=time.time())

  @staticmethod
  def _describe(info: dict) -> str:
    return f"pid {info.get('pid')} on {info.get('host')} (since {info.get('since')})"

  def _refuse(self, info: dict) -> None:
    raise WorkdirBusy(f'{self.root} is in use by another run: {self._describe(info)}; wait for it to end or use '
                      f'another --workdir (if that run is gone, remove {self.path})')

  def _acquire_local(self) -> None:
    import fcntl  # pylint: disable=import-outside-toplevel
    os.makedirs(os.fspath(self.root), exist_ok=True)
    f = open(os.fspath(self.path), 'a+', encoding='utf-8')  # pylint: disable=consider-using-with
    try:
      fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      f.seek(0)
      try:
        info = json.loads(f.read() or '{}')
      except ValueError:
        info = {}
      f.close()
      self._refuse(info)
    f.seek(0)
    f.truncate()
    f.write(json.dumps(self._holder()))
    f.flush()
    self._file = f

  def _acquire_remote(self) -> None:
    self.root.mkdir(parents=True, exist_ok=True)
    if self.path.exists():
      try:
        info = json.loads(self.path.read_text())
      except ValueError:
        info = {}
      dead_here = info.get('host') == socket.gethostname() and not _pid_alive(int(info.get('pid', -1)))
      fresh = time.time() - float(info.get('heartbeat', 0)) < self.stale_s
      if fresh and not dead_here:
        self._refuse(info)
    self.path.write_text(json.dumps(self._holder()))

    def beat():
      while not self._stop.wait(self.heartbeat_s):
        self.path.write_text(json.dumps(self._holder()))
    self._thread = threading.Thread(target=beat, daemon=True, name='workdir-lock-heartbeat')
    self._thread.start()

  def __enter__(self) -> 'WorkdirLock':
    if jax.process_index() != 0:
      return self
    key = os.fspath(self.path)
    with self._guard:
      if key in self._held:
        self._held[key][1] += 1
        return self
      if not storage.is_remote(key):
        self._acquire_local()
      else:
        self._acquire_remote()
      self._held[key] = [self, 1]
    return self

  def __exit__(self, *exc) -> None:
    if jax.process_index() != 0:
      return
    key = os.fspath(self.path)
    with self._guard:
      entry = self._held.get(key)
      if entry is None:
        return
      entry[1] -= 1
      if entry[1] > 0:
        return
      del self._held[key]
      owner = entry[0]
    if owner._file is not None:
      import fcntl  # pylint: disable=import-outside-toplevel
      with contextlib.suppress(OSError):
        owner._file.seek(0)
        owner._file.truncate()
      fcntl.flock(owner._file.fileno(), fcntl.LOCK_UN)
      owner._file.close()
      owner._file = None
    else:
      owner._stop.set()
      with contextlib.suppress(OSError):
        owner.path.unlink()
