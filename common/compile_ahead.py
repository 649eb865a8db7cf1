"""Programs a run needs only later (the prediction programs of its evaluation, the checksums of its checkpoints),
compiled on a thread while the main thread compiles and runs the train step.

JAX keeps what it compiles in one cache per process, so a later call of the same jitted function on arguments of
the same shapes, dtypes and placement finds the executable instead of compiling it again; its results do not
depend on which thread compiled it. On a CPU host the train step's compilation and steps leave cores idle part of
the time (much of XLA's compilation is single-threaded), and on an accelerator the host is idle while the device
runs the steps, so the later programs cost the run little or no wall time. `wait()` before the first call of one
of them, so that nothing is compiled twice; a failure on the thread is only logged (the call then compiles as it
would have).
"""
from __future__ import annotations

import threading
from typing import Callable

from absl import logging as absl_logging


class Ahead:
  """`work()` on a thread: compiling, e.g. `jax.jit(f).lower(*shapes).compile()` for the shapes, dtypes and
  placements the later calls will have (nothing is computed). Not a daemon thread: a run that ends (or fails)
  before it waits for the work lets the interpreter finish the compilation before exiting, where tearing down a
  thread inside XLA's compiler aborts the process."""

  def __init__(self, name: str, work: Callable[[], None]):
    self.name = name
    self.error: BaseException | None = None
    self._work = work
    self._thread = threading.Thread(target=self._run, name=f'compile-ahead-{name}', daemon=False)
    self._thread.start()

  def _run(self) -> None:
    try:
      self._work()
    except Exception as e:  # pylint: disable=broad-except
      self.error = e
      absl_logging.info('compiling %s ahead failed (it compiles when first used): %s', self.name, e)

  def wait(self) -> None:
    self._thread.join()


def wait(ahead: Ahead | None) -> None:
  if ahead is not None:
    ahead.wait()
