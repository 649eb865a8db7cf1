"""What the training loop watches and reports besides the step itself: throughput and MFU of the logged steps, the
goodput line (where a run's wall time went), a profiler trace of chosen steps, the progress bar, and the preemption
notice (SIGTERM) that stops a run at a step every process agrees on.
"""
from __future__ import annotations

import contextlib
import json
import math
import signal
import sys
import threading
import time

import jax
import ml_collections

from common import metrics as metrics_lib
from common import storage
from common.config import require


def profile_window(config: ml_collections.ConfigDict) -> tuple[int, int] | None:
  """(first, last) step of `config.profile_steps` ('A,B' or 'A'), or None when empty."""
  spec = str(config.get('profile_steps', '') or '').strip()
  if not spec:
    return None
  try:
    bounds = [int(x) for x in spec.split(',')]
  except ValueError:
    bounds = []
  require(len(bounds) in (1, 2) and 1 <= bounds[0] <= bounds[-1], 'profile_steps',
          f"must be 'A,B' with 1 <= A <= B (steps to trace), got {spec!r}")
  return bounds[0], bounds[-1]


def with_perplexity(values: dict, objective) -> dict:
  """`values` plus `perplexity` = exp(values[objective.perplexity_of]) when the objective has one."""
  key = objective.perplexity_of
  if key and key in values:
    values = dict(values, perplexity=math.exp(min(float(values[key]), 700.0)))
  return values


class StepClock:
  """Throughput of the steps since the last log step.

  `values(metrics)` is read only once the step's metrics are on the host (dispatch is asynchronous: before that, the
  steps may still be running) and restarts the clock.
  """

  def __init__(self, global_batch_size: int, objective, total_peak: float):
    self.global_batch_size = global_batch_size
    self.objective = objective
    self.total_peak = total_peak
    self.start = time.perf_counter()
    self.steps = 0

  def tick(self) -> None:
    """Counts one more step dispatched since the last log step."""
    self.steps += 1

  def values(self, metrics) -> dict:
    """The logged values of a log step: the step's metrics (scalars on device) plus perplexity, steps/s, tokens/s,
    model FLOP/s and MFU over the steps since the last log step."""
    values = with_perplexity({k: float(v) for k, v in jax.device_get(metrics).items()}, self.objective)
    elapsed = time.perf_counter() - self.start
    examples = self.steps * self.global_batch_size
    values['steps_per_sec'] = self.steps / elapsed
    values['tokens_per_sec'] = examples * self.objective.tokens_per_example / elapsed
    values['model_flops_per_sec'] = examples * self.objective.flops_per_example / elapsed
    values['mfu'] = metrics_lib.mfu(values['model_flops_per_sec'], self.total_peak)  # NaN (n/a) above 1
    self.start, self.steps = time.perf_counter(), 0
    return values


def total_peak_flops(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
                     writer: metrics_lib.MetricWriter) -> float:
  """Peak FLOP/s of the whole mesh (the MFU denominator), announced with the mesh shape."""
  peak, peak_source = metrics_lib.peak_flops_per_device(config.peak_flops_per_device)
  on_cpu = jax.devices()[0].platform == 'cpu'
  total_peak = peak if on_cpu else peak * mesh.size  # fake CPU devices share one CPU
  writer.text(f'mesh {dict(mesh.shape)}; peak {total_peak / 1e9:.1f} GFLOP/s ({peak_source})')
  return total_peak


def step_line(step: int, values: dict) -> str:
  """The one-line summary of a log step printed when there is no progress bar."""
  return (f"step {step}: loss {values['loss']:.4f} lr {values['learning_rate']:.2e} "
          f"grad_norm {values['grad_norm']:.3f} tokens/s {values['tokens_per_sec']:.0f} "
          f"mfu {values['mfu']:.3f}")


def progress_bar(config: ml_collections.ConfigDict, start_step: int, writer: metrics_lib.MetricWriter):
  """A tqdm bar over the run's steps on process 0 when stderr is a terminal (and `config.progress_bar`), else None;
  the writer prints above it while it is shown."""
  if not (config.progress_bar and sys.stderr.isatty() and jax.process_index() == 0):
    return None
  from tqdm import tqdm  # pylint: disable=import-outside-toplevel
  progress = tqdm(total=config.num_train_steps, initial=start_step, unit='step', dynamic_ncols=True)
  writer.progress = progress
  return progress


class PreemptionWatch:
  """SIGTERM (the preemption notice) -> stop at the next step every process agrees on.

  One process: a Python SIGTERM handler sets a flag, checked after every step. Several processes: the flag must be
  agreed on, so the check is `multihost_utils.reached_preemption_sync_point`, fed by the coordination service's own
  SIGTERM notifier that `jax.distributed.initialize` starts (no Python handler then, which would replace it).
  """

  def __init__(self):
    self.requested = False
    self._previous = None
    self._multi = jax.process_count() > 1
    if not self._multi and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def reached(self, step: int) -> bool:
    if self._multi:
      from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
      return multihost_utils.reached_preemption_sync_point(step)
    return self.requested

  def close(self) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None


class Goodput:
  """Where a run's wall time goes: productive steps versus compile (the first step), eval, checkpoints, restore.

  Appends one JSON line per run to WORKDIR/goodput.jsonl, so the closing line also covers the earlier runs
  (restarts) of the same workdir.
  """

  def __init__(self, workdir: str | None):
    self.workdir = workdir
    self.start = time.perf_counter()
    self.parts = dict(restore=0.0, compile=0.0, eval=0.0, checkpoint=0.0)
    self.steps = 0

  @contextlib.contextmanager
  def timed(self, part: str):
    t = time.perf_counter()
    try:
      yield
    finally:
      self.parts[part] += time.perf_counter() - t

  def finish(self, writer: metrics_lib.MetricWriter) -> None:
    wall = time.perf_counter() - self.start
    productive = max(0.0, wall - sum(self.parts.values()))
    record = dict(wall_s=round(wall, 3), productive_s=round(productive, 3), steps=self.steps,
                  **{f'{k}_s': round(v, 3) for k, v in self.parts.items()})
    runs = [record]
    if self.workdir and jax.process_index() == 0:
      path = storage.join(self.workdir, 'goodput.jsonl')
      if storage.exists(path):
        runs = [json.loads(line) for line in storage.read_text(path).splitlines() if line.strip()] + runs
      storage.write_text(path, ''.join(json.dumps(r) + '\n' for r in runs))
    parts = ', '.join(f'{k} {v:.1f} s' for k, v in self.parts.items())
    line = (f'goodput {productive / max(wall, 1e-9):.2f}: steps {productive:.1f} s of {wall:.1f} s wall '
            f'({self.steps} steps; {parts}; data loading and logging count as steps)')
    if len(runs) > 1:
      total = sum(r['wall_s'] for r in runs)
      line += (f'; all {len(runs)} runs of this workdir: {sum(r["productive_s"] for r in runs) / total:.2f} '
               f'({total:.1f} s wall)')
    writer.text(line)


class Profiler:
  """A `jax.profiler` trace of steps A..B (`config.profile_steps`) in WORKDIR/profile, process 0 only."""

  def __init__(self, config, workdir: str | None, writer: metrics_lib.MetricWriter):
    self.window = profile_window(config) if workdir and jax.process_index() == 0 else None
    self.directory = storage.join(workdir, 'profile') if workdir else None
    self.writer = writer
    self.active = False

  def before(self, step: int) -> None:
    """Called before step `step` (1-based) runs."""
    if self.window and step == self.window[0] and not self.active:
      jax.profiler.start_trace(self.directory)
      self.active = True

  def after(self, step: int, state) -> None:
    if self.active and step >= self.window[1]:
      self.stop(state)

  def stop(self, state) -> None:
    if self.active:
      jax.block_until_ready(state)
      jax.profiler.stop_trace()
      self.active = False
      self.writer.text(f'profile of steps {self.window[0]}-{self.window[1]} written to {self.directory}')
