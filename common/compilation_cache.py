"""JAX's persistent compilation cache, on by default.

Compiling a train step takes seconds to minutes (a MiniLM fine-tuning step ~8 s on two CPU cores, BERT-base far
more), and a rerun, another seed, a resumed job or the next task of a sweep compiles the same program again. The
trainer config's `compilation_cache_dir` decides where compiled programs persist:

* `'auto'` (default): `$XLNET_BERT_JAX_CACHE/jax/<host>` (`~/.cache/xlnet_bert_jax/...` without the variable),
  at most `AUTO_MAX_BYTES` (least recently used entries are evicted first), unless JAX already has a cache
  directory (`JAX_COMPILATION_CACHE_DIR` or `jax.config`), which is then used as it is. `<host>` names the machine
  type and its CPU's instruction-set flags, so a home directory shared by different machines never hands one an
  executable compiled for another's CPU (JAX's own key does not hold the host CPU).
* a directory, local or `gs://`: that one, unbounded (JAX's default).
* `'none'` (or `'off'`, `''`; any case): this project turns nothing on (a cache JAX was given by its own settings
  still applies).

What JAX keys an entry by: the program, the devices, the compile options and XLA flags, and the jax/jaxlib
versions; only compilations that took >= 1 s are stored (`jax_persistent_cache_min_compile_time_secs`). A
loaded executable is the one compiled before, so results are bit-identical with or without the cache. An entry
that cannot be read (cut short by a crash, damaged on disk) is reported as a warning and compiled again.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import platform

import jax

from common import storage

AUTO = 'auto'
OFF = ('', 'none', 'off')   # compared without case or surrounding blanks, as 'auto' is
AUTO_MAX_BYTES = 4 << 30


def _cpu_flags() -> str:
  try:
    with open('/proc/cpuinfo', encoding='utf-8', errors='replace') as f:
      for line in f:
        if line.startswith(('flags', 'Features')):   # x86, arm
          return ' '.join(sorted(line.split(':', 1)[1].split()))
  except OSError:
    pass
  return platform.processor()


def host_key() -> str:
  """`<machine>-<12 hex digits of the CPU's feature flags>`, e.g. `x86_64-3f2a...`."""
  return f'{platform.machine() or "cpu"}-{hashlib.sha256(_cpu_flags().encode()).hexdigest()[:12]}'


def auto_dir() -> str:
  return os.path.join(storage.cache_root(), 'jax', host_key())


def validate(setting: str) -> None:
  """Refuses a setting that is not a string: 'auto', 'none' or a directory (before anything is compiled)."""
  if not isinstance(setting, str):
    raise ValueError(f"compilation_cache_dir: {setting!r} is not 'auto', 'none' or a directory")


def use(setting: str) -> str | None:
  """Applies `setting` (see the module docstring) and returns the cache directory JAX now uses, or None.

  Changing the directory resets JAX's cache object, so it takes effect even if something compiled before."""
  validate(setting)
  current = jax.config.jax_compilation_cache_dir
  word = setting.strip().lower()
  if word in OFF:
    return current
  if word == AUTO:
    if current:
      return current
    path = auto_dir()
    # The bound needs `filelock` (a dependency); without it the cache is kept unbounded rather than failing.
    if jax.config.jax_compilation_cache_max_size == -1 and importlib.util.find_spec('filelock') is not None:
      jax.config.update('jax_compilation_cache_max_size', AUTO_MAX_BYTES)
  else:
    path = setting
  if path != current:
    from jax.experimental.compilation_cache import compilation_cache  # pylint: disable=import-outside-toplevel
    jax.config.update('jax_compilation_cache_dir', path)
    compilation_cache.reset_cache()
  return path
