"""Helpers for tests that run the pretraining entry points as subprocesses: environment, prepared data shared by
every test (and pytest-xdist worker) of a session, start / signal / wait with timeouts, metrics and checkpoints
read back.

Every child runs in its own session (`start_new_session`), so a test can signal it alone and `Run.cleanup()` can
kill whatever it left. Children share one persistent JAX compilation cache per session: the first run of a config
compiles, the later ones load the executables (identical programs, identical results).
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from typing import Any, Callable, Sequence

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DRIVER = os.path.join(REPO, 'tests', 'drivers', 'recorded_run.py')
CONFIG = os.path.join(REPO, 'tests', 'drivers', 'tiny_configs.py')
MODULES = {'bert': 'bert_jax.pretrain', 'xlnet': 'xlnet_jax.pretrain'}


def shared_dir(tmp_path_factory, name: str) -> str:
  """A directory shared by the whole test session, pytest-xdist workers included."""
  base = tmp_path_factory.getbasetemp()
  if os.environ.get('PYTEST_XDIST_WORKER'):
    base = base.parent  # the workers' temp dirs are siblings under the session's
  path = os.path.join(str(base), name)
  os.makedirs(path, exist_ok=True)
  return path


def once(directory: str, make: Callable[[], None]) -> None:
  """Runs `make()` to fill `directory` unless an earlier call (any xdist worker) completed it; a failed attempt's
  leftovers are removed first."""
  from filelock import FileLock  # pylint: disable=import-outside-toplevel
  done = os.path.join(directory, 'done')
  with FileLock(directory.rstrip('/') + '.lock'):
    if not os.path.exists(done):
      for name in os.listdir(directory):
        path = os.path.join(directory, name)
        if os.path.isdir(path):
          shutil.rmtree(path)
        else:
          os.remove(path)
      make()
      with open(done, 'w') as f:
        f.write('ok\n')


SMALL_CORPUS_BYTES = 300_000


@dataclasses.dataclass(frozen=True)
class Data:
  """Prepared data of one model: where it is, and the `--config` flags that point a run at it."""
  data_dir: str
  corpus: str
  eval_corpus: str

  def flags(self) -> list[str]:
    return [f'--config.data_dir={self.data_dir}', f'--config.data.corpus={self.corpus}',
            f'--config.data.eval_corpus={self.eval_corpus}']

  def apply(self, config):
    config.data_dir = self.data_dir
    config.data.update(corpus=self.corpus, eval_corpus=self.eval_corpus)
    return config


def small_corpus(root: str) -> tuple[str, str]:
  """The first documents (~300 kB) of the embedded corpus's train split and its whole validation split."""
  from common.data import corpus  # pylint: disable=import-outside-toplevel
  train, valid = os.path.join(root, 'small_train.txt'), os.path.join(root, 'small_valid.txt')
  if not (os.path.exists(train) and os.path.exists(valid)):
    embedded = os.path.join(root, 'embedded')
    corpus.build_embedded_corpus(embedded)
    with open(os.path.join(embedded, 'train.txt'), encoding='utf-8') as f:
      documents = f.read().split('\n\n')
    kept, size = [], 0
    for document in documents:
      if size >= SMALL_CORPUS_BYTES:
        break
      kept.append(document)
      size += len(document.encode('utf-8'))
    with open(train + '.tmp', 'w', encoding='utf-8') as f:
      f.write('\n\n'.join(kept) + '\n')
    with open(os.path.join(embedded, 'valid.txt'), encoding='utf-8') as f, \
        open(valid + '.tmp', 'w', encoding='utf-8') as out:
      out.write(f.read())
    os.replace(valid + '.tmp', valid)
    os.replace(train + '.tmp', train)
  return train, valid


def shared_small_corpus(tmp_path_factory) -> tuple[str, str]:
  """`small_corpus`, built once per session (a file lock serialises pytest-xdist workers): (train, valid) files."""
  from filelock import FileLock  # pylint: disable=import-outside-toplevel
  root = shared_dir(tmp_path_factory, 'subprocess_runs')
  with FileLock(os.path.join(root, 'corpus.lock')):
    return small_corpus(root)


def prepared_data(tmp_path_factory, model: str) -> Data:
  """Prepares the tiny config's data on a slice of the embedded corpus, once per session (a file lock serialises
  pytest-xdist workers)."""
  from filelock import FileLock  # pylint: disable=import-outside-toplevel
  from tests.drivers import tiny_configs  # pylint: disable=import-outside-toplevel
  root = shared_dir(tmp_path_factory, 'subprocess_runs')
  train, valid = shared_small_corpus(tmp_path_factory)
  data = Data(os.path.join(root, f'{model}_data'), train, valid)
  with FileLock(os.path.join(root, f'{model}_data.lock')):
    config = data.apply(tiny_configs.get_config(model))
    if model == 'bert':
      from bert_jax import pretrain_data  # pylint: disable=import-outside-toplevel
    else:
      from xlnet_jax import pretrain_data  # pylint: disable=import-outside-toplevel
    pretrain_data.prepare_pretraining_data(config.data, data.data_dir)  # a no-op when already prepared
  return data


def child_env(cache_dir: str | None, devices: int, **extra: str) -> dict:
  """A clean CPU environment: no JAX/SLURM/TPU settings leaking in, `devices` fake CPU devices, the repo importable."""
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(('SLURM_', 'JAX_', 'TPU_', 'MEGASCALE_', 'PYTEST_')) and k != 'XLA_FLAGS'}
  env.update(PYTHONPATH=REPO, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='3', TPU_SKIP_MDS_QUERY='1',
             XLA_FLAGS=f'--xla_force_host_platform_device_count={devices} --xla_backend_optimization_level=0')
  if cache_dir:
    env.update(JAX_COMPILATION_CACHE_DIR=cache_dir, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0')
  env.update(extra)
  return env


def train_argv(model: str, workdir: str, data: Data, overrides: Sequence[str] = (), *, record: str | None = None,
               step_delay: float = 0.0, nan_from_step: int | None = None) -> list[str]:
  """argv of one run of the real entry point under the recording driver, tiny config, `--config.KEY=VALUE`s."""
  argv = [sys.executable, DRIVER]
  if record:
    argv += ['--record', record]
  if step_delay:
    argv += ['--step_delay', str(step_delay)]
  if nan_from_step is not None:
    argv += ['--nan_from_step', str(nan_from_step)]
  return argv + ['--', MODULES[model], f'--config={CONFIG}:{model}', f'--workdir={workdir}', *data.flags(),
                 *overrides]


class Run:
  """One child process; its stdout and stderr go to `log` (read back with `output()`)."""

  def __init__(self, argv: Sequence[str], env: dict, log: str):
    self.log = log
    self.started = time.monotonic()
    with open(log, 'ab') as sink:  # the child writes through its own copy of the descriptor
      self.proc = subprocess.Popen(list(argv), env=env, cwd=REPO, stdout=sink, stderr=subprocess.STDOUT,
                                   start_new_session=True)

  @property
  def pid(self) -> int:
    return self.proc.pid

  def alive(self) -> bool:
    return self.proc.poll() is None

  def signal(self, signum: int) -> None:
    if self.alive():
      os.kill(self.proc.pid, signum)

  def wait(self, timeout: float) -> int:
    """The exit status; on timeout the child's process group is killed and the test fails with its output."""
    try:
      return self.proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
      self.cleanup()
      raise AssertionError(f'{self.proc.args} did not finish in {timeout} s:\n{self.output()[-3000:]}') from None

  def output(self) -> str:
    with open(self.log, errors='replace') as f:
      return f.read()

  def cleanup(self) -> None:
    """Kills the child's whole process group (its session) if anything is left."""
    if self.proc.poll() is None:
      try:
        os.killpg(self.proc.pid, signal.SIGKILL)
      except ProcessLookupError:
        pass
      self.proc.wait(timeout=30)


def run_to_end(argv: Sequence[str], env: dict, log: str, timeout: float = 180) -> tuple[int, str]:
  run = Run(argv, env, log)
  try:
    return run.wait(timeout), run.output()
  finally:
    run.cleanup()


def metric_steps(workdir: str, offset: int = 0) -> list[int]:
  """Steps logged to WORKDIR/metrics.jsonl from byte `offset` on (complete lines only)."""
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return []
  with open(path, 'rb') as f:
    f.seek(offset)
    data = f.read()
  return [json.loads(line)['step'] for line in data.split(b'\n')[:-1] if line.strip()]


def file_size(path: str) -> int:
  return os.path.getsize(path) if os.path.exists(path) else 0


def wait_for_step(run: Run, workdir: str, step: int, timeout: float, offset: int = 0) -> int:
  """Waits until the run has logged a step >= `step` (after byte `offset` of the metrics); returns the last one."""
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    steps = metric_steps(workdir, offset)
    if steps and max(steps) >= step:
      return max(steps)
    if not run.alive():
      raise AssertionError(f'the run exited ({run.proc.returncode}) before logging step {step}:\n'
                           f'{run.output()[-3000:]}')
    time.sleep(0.02)
  run.cleanup()
  raise AssertionError(f'no step {step} within {timeout} s:\n{run.output()[-3000:]}')


def read_records(path: str) -> list[dict]:
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def checkpoint_steps(workdir: str) -> list[int]:
  """Complete checkpoints as orbax sees them (its temporary directories of unfinished saves are not steps)."""
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  from common import checkpoint  # pylint: disable=import-outside-toplevel
  directory = checkpoint.checkpoint_dir(workdir)
  if not os.path.isdir(directory):
    return []
  manager = ocp.CheckpointManager(directory, item_names=('state', 'meta'),
                                  options=ocp.CheckpointManagerOptions(create=False, read_only=True))
  try:
    return sorted(manager.all_steps())
  finally:
    manager.close()


def restore_state(workdir: str, step: int | None = None) -> dict:
  """The whole saved TrainState (params, optimizer state, step, RNG, carried memory) as a tree of numpy arrays.

  Read as plain arrays, whatever devices and processes wrote it (restoring with the saved shardings fails in a
  process that does not have the writer's devices, e.g. after a two-process run).
  """
  from common import checkpoint  # pylint: disable=import-outside-toplevel
  return checkpoint.read_state(workdir, step)


def assert_trees_equal(a: Any, b: Any, what: str) -> None:
  """Bitwise equality of two trees of arrays (same structure), naming the first leaf that differs."""
  import jax  # pylint: disable=import-outside-toplevel
  flat_a = jax.tree_util.tree_flatten_with_path(a)[0]
  flat_b = jax.tree_util.tree_flatten_with_path(b)[0]
  assert [p for p, _ in flat_a] == [p for p, _ in flat_b], f'{what}: different tree structure'
  for (path, x), (_, y) in zip(flat_a, flat_b):
    x, y = np.asarray(x), np.asarray(y)
    assert x.shape == y.shape and x.dtype == y.dtype, f'{what}{jax.tree_util.keystr(path)}: {x.shape} vs {y.shape}'
    if not np.array_equal(x, y, equal_nan=True):
      diff = np.max(np.abs(x.astype(np.float64) - y.astype(np.float64)))
      raise AssertionError(f'{what}{jax.tree_util.keystr(path)} differs (max |diff| {diff:.3g})')


def max_abs_diff(a: Any, b: Any) -> float:
  import jax  # pylint: disable=import-outside-toplevel
  return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
