"""Host memory for XLA:CPU: freed buffers kept for reuse instead of handed back to the kernel after every step.

XLA:CPU allocates each execution's temporaries and outputs with the C library's `malloc` on its worker threads. glibc
serves those threads from per-thread arenas of at most 64 MiB, so a larger buffer (a BERT step's temporaries are
hundreds of MiB) always comes from a fresh `mmap` and goes back with `munmap` when freed: every step then touches
new pages, and the kernel faults in and zeroes every one of them (a MiniLM fine-tuning step: ~54,000 faults, 223 MB
a step, about a quarter of its time; `benchmarks/README.md`, "Host memory"). `keep_freed_memory()` makes every thread
allocate from glibc's main heap, never from `mmap`, and never trims that heap: a training loop's buffers are reused
from the second step on, as accelerator runtimes' caching allocators reuse device memory. The price is that the
process keeps its high-water mark of host memory until it exits.

It must run while the process has a single thread (a thread takes its arena at its first allocation, and
importing JAX already starts one), so importing the `common` package runs it, and every model package imports
`common` first: `python -m bert_jax.pretrain` and the other entry points get it before anything imports JAX. A
program that imports JAX (or starts threads) before any of our packages runs with the allocator as it is. It does
nothing where JAX will run on an accelerator (the step's buffers are on the device there, and a single arena would
serialise a multi-threaded input pipeline), outside glibc, or with `XLNET_BERT_JAX_MALLOC=default`.
"""
from __future__ import annotations

import ctypes
import importlib.util
import os
import pkgutil
import sys

__all__ = ['ENV', 'keep_freed_memory']

ENV = 'XLNET_BERT_JAX_MALLOC'  # 'default': leave the C library's allocator as it is

# mallopt(3) parameters (glibc's malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_NEVER_TRIM = 2**31 - 1  # mallopt takes an int: the most it accepts (2 GiB of free heap top before a trim)

_applied: bool | None = None  # None: not tried in this process


def keep_freed_memory() -> bool:
  """Applies the settings above unless one of the conditions says not to; True iff they are in effect.

  Idempotent: later calls return the first call's answer."""
  global _applied  # pylint: disable=global-statement
  if _applied is None:
    _applied = _apply()
  return _applied


def _apply() -> bool:
  if os.environ.get(ENV, '').strip().lower() == 'default' or not sys.platform.startswith('linux'):
    return False
  if _threads() != 1 or _jax_backend_initialized() or _accelerator_expected():
    return False
  try:
    mallopt = ctypes.CDLL(None).mallopt  # the allocator this process links (glibc's; absent elsewhere, e.g. musl)
  except (OSError, AttributeError):
    return False
  mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
  if not mallopt(_M_ARENA_MAX, 1):
    return False
  return bool(mallopt(_M_MMAP_MAX, 0) and mallopt(_M_TRIM_THRESHOLD, _NEVER_TRIM))


def _threads() -> int:
  """The process's OS threads (Python's and native ones alike)."""
  try:
    return len(os.listdir('/proc/self/task'))
  except OSError:
    return 0


def _jax_backend_initialized() -> bool:
  """Too late: JAX's CPU client exists and its threads already hold their arenas."""
  if 'jax' not in sys.modules:
    return False
  from jax._src import xla_bridge  # pylint: disable=import-outside-toplevel
  return xla_bridge.backends_are_initialized()


def _accelerator_expected() -> bool:
  """Whether JAX's default backend will be an accelerator: JAX_PLATFORMS names one, or (unset) a TPU or GPU
  plugin is installed."""
  platforms = os.environ.get('JAX_PLATFORMS', '').strip().lower()
  if 'jax' in sys.modules and not platforms:
    import jax  # pylint: disable=import-outside-toplevel
    platforms = (jax.config.jax_platforms or '').strip().lower()
  if platforms:
    return platforms.split(',')[0].strip() not in ('cpu', '')
  if importlib.util.find_spec('libtpu') is not None:
    return True
  try:
    import jax_plugins  # pylint: disable=import-outside-toplevel
  except ImportError:
    return False
  return any(True for _ in pkgutil.iter_modules(jax_plugins.__path__))
