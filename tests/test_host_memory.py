"""`common.host_memory`: a training loop's host buffers reused instead of faulted in afresh every step, set up by
importing our packages before any JAX computation, and left alone where it cannot or should not apply."""
import json
import os
import subprocess
import sys

import pytest

from common import host_memory

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# An entry point (`app_run`) whose main runs one jitted program again and again, each call returning a fresh
# 84 MB buffer (more than the 64 MiB a worker thread's glibc arena can hold), and reports the page faults per call.
_PROBE = r'''
import json, resource, sys
from common import host_memory, run as run_lib

def main(argv):
  import jax, jax.numpy as jnp
  double = jax.jit(lambda a: a * 2.0 + 1.0)
  a = jnp.ones((21_000_000,), jnp.float32)
  for _ in range(4):  # compiled, and the heap grown towards its working size
    jax.block_until_ready(double(a))
  faults = []  # per call: its buffer's pages first touched in it
  for _ in range(6):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    out = double(a)
    jax.block_until_ready(out)
    del out  # freed (a little later, on XLA's side)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
  print(json.dumps(dict(faults=faults, pages=a.nbytes / resource.getpagesize(),
                        kept=host_memory.keep_freed_memory())))

run_lib.app_run(main)
'''


def _probe(**env) -> dict:
  full_env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'XLA_FLAGS': '', **env}
  out = subprocess.run([sys.executable, '-c', _PROBE], cwd=REPO, env=full_env, capture_output=True, text=True,
                       timeout=300, check=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


LINUX_ONLY = pytest.mark.skipif(not sys.platform.startswith('linux'), reason='glibc malloc')


@LINUX_ONLY
def test_an_entry_point_reuses_host_buffers_where_the_default_allocator_faults_them_in_every_call():
  kept = _probe()
  default = _probe(**{host_memory.ENV: 'default'})
  assert kept['kept'] and not default['kept']
  # The default: every page of the output is new memory in every call (allocated on an XLA thread, glibc mmaps
  # and munmaps it), which is what makes the other figure meaningful.
  assert min(default['faults']) >= 0.9 * default['pages'], default
  # Kept: calls reuse a buffer freed before them (the main heap may still grow in a call or two, so the best call
  # is asserted, not every one).
  assert min(kept['faults']) <= 0.05 * kept['pages'], kept


def test_it_does_not_apply_when_told_not_to_too_late_or_for_an_accelerator(monkeypatch):
  monkeypatch.setenv(host_memory.ENV, 'default')
  assert not host_memory._apply()  # pylint: disable=protected-access
  monkeypatch.delenv(host_memory.ENV)
  import jax  # pylint: disable=import-outside-toplevel
  jax.devices()  # this process's CPU client exists, its dispatch mode chosen
  assert not host_memory._apply()  # pylint: disable=protected-access
  for platforms, accelerator in (('tpu', True), ('cuda,cpu', True), ('cpu', False), ('CPU', False)):
    monkeypatch.setenv('JAX_PLATFORMS', platforms)
    assert host_memory._accelerator_expected() is accelerator, platforms  # pylint: disable=protected-access


@LINUX_ONLY
def test_a_model_package_sets_it_before_its_module_imports_jax():
  """`python -m elmo_jax.finetune` imports JAX at the top of its module; its package imports `common` first."""
  code = 'import elmo_jax.finetune, jax; from common import host_memory; print(host_memory.keep_freed_memory())'
  out = subprocess.run([sys.executable, '-c', code], cwd=REPO, env={**os.environ, 'JAX_PLATFORMS': 'cpu'},
                       capture_output=True, text=True, timeout=300, check=True)
  assert out.stdout.strip().splitlines()[-1] == 'True', out.stdout
