"""Host memory for XLA:CPU: a step's buffers reused from the previous step instead of faulted in afresh.

XLA:CPU allocates each execution's temporaries and outputs with the C library's `malloc`. With JAX's default
asynchronous dispatch it does so on its worker threads, which glibc serves from per-thread arenas of at most
64 MiB: a larger buffer (a BERT step's temporaries are hundreds of MiB) always comes from a fresh `mmap` and goes
back with `munmap` when freed, so every step touches new pages and the kernel faults in and zeroes every one of them
(a MiniLM fine-tuning step: ~54,000 faults, 223 MB; 10 to 25 % of the step, `benchmarks/README.md`, "Host memory").

`keep_freed_memory()` runs single-device CPU computations on the calling thread (JAX's
`jax_cpu_enable_async_dispatch=False`), whose buffers then come from glibc's main heap, and makes that heap never
use `mmap` and never shrink: a training loop's buffers are reused from the step after the first, as accelerator
runtimes' caching allocators reuse device memory. The price: the process keeps its high-water mark of host memory
until it exits, and the Python thread waits for each single-device computation instead of running ahead of it
(a step's host work, a few ms, no longer overlaps the step). Computations over several devices keep their
asynchronous dispatch, and with it the faults. Results are unchanged: nothing but where memory comes from moves.

Importing the `common` package runs it (every model package imports `common` before its modules run), so it must
happen before JAX creates its CPU client (the first JAX computation or `jax.devices()`); in a notebook, import
`common` first. It does nothing where JAX will run on an accelerator (`JAX_PLATFORMS` names one, or a TPU or GPU
plugin is installed), outside glibc on Linux, once the CPU client exists, or with `XLNET_BERT_JAX_MALLOC=default`.
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
  if _jax_backend_initialized() or _accelerator_expected():
    return False
  try:
    mallopt = ctypes.CDLL(None).mallopt  # the allocator this process links (glibc's; absent elsewhere, e.g. musl)
  except (OSError, AttributeError):
    return False
  mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
  if not (mallopt(_M_MMAP_MAX, 0) and mallopt(_M_TRIM_THRESHOLD, _NEVER_TRIM)):
    return False
  import jax  # pylint: disable=import-outside-toplevel
  jax.config.update('jax_cpu_enable_async_dispatch', False)  # read when the CPU client is created
  return True


def _jax_backend_initialized() -> bool:
  """Too late: JAX's CPU client exists, with its dispatch mode."""
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
