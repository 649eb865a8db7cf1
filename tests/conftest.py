"""Test setup: 8 fake CPU devices, configured before JAX initialises its backends; a persistent compilation cache
per test process, so a program compiled again (every `trainer.train` call jits afresh) is loaded, not rebuilt."""
import os

import pytest

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('TRANSFORMERS_OFFLINE', '1')

import jax  # noqa: E402

jax.config.update('jax_default_matmul_precision', 'highest')

# Programs that compile faster than this are not worth a file (the eager ops' many tiny programs among them).
CACHE_MIN_COMPILE_SECS = 0.2


def pytest_configure(config):
  """`make test` groups tests with `--dist loadgroup`; pytest 9.2 with pytest-xdist <= 3.8 silently does not (the
  worker-side check below would then stop the run with an xdist internal error): say so in one line first."""
  if getattr(config.option, 'dist', 'no') != 'loadgroup':
    return
  import xdist  # pylint: disable=import-outside-toplevel
  from packaging.version import Version  # pylint: disable=import-outside-toplevel
  if Version(pytest.__version__) >= Version('9.2') and Version(xdist.__version__) <= Version('3.8.0'):
    raise pytest.UsageError(f'pytest {pytest.__version__} with pytest-xdist {xdist.__version__} does not group '
                            '`--dist loadgroup` tests: install the versions setup.cfg pins (pytest<9.2)')


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
  """Under `--dist loadgroup` (`make test`), every test marked `xdist_group` must carry its group in its node id
  (pytest-xdist's scheduler keys on it); where a pytest / pytest-xdist pair drops it, the grouped tests would
  spread over workers and redo their shared fixtures, so the run stops here instead."""
  if not getattr(config.option, 'loadgroup', False):
    return
  lost = [item.nodeid for item in items if item.get_closest_marker('xdist_group') and '@' not in item.nodeid]
  if lost:
    raise pytest.UsageError(f'--dist loadgroup does not group {lost[0]} (and {len(lost) - 1} more) with pytest '
                            f'{pytest.__version__}: install the versions setup.cfg pins')


@pytest.fixture(scope='session', autouse=True)
def compilation_cache(tmp_path_factory):
  """One cache directory per test process (an xdist worker never reads an entry another is still writing), also
  for the runs it starts as subprocesses (`JAX_COMPILATION_CACHE_DIR`, which the trainer's default 'auto' keeps):
  no test reads or fills the user's cache. A loaded executable is the one compiled before, so results are
  bit-identical with or without the cache."""
  from jax.experimental.compilation_cache import compilation_cache as cache  # pylint: disable=import-outside-toplevel
  path = str(tmp_path_factory.mktemp('jax_cache_in_process'))
  os.environ['JAX_COMPILATION_CACHE_DIR'] = path
  jax.config.update('jax_compilation_cache_dir', path)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', CACHE_MIN_COMPILE_SECS)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)
  cache.reset_cache()
  yield

