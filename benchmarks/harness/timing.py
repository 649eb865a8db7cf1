"""Interleaved timing rounds and one comparison run: the reference built first (its RSS growth is its own), the
peak measured around the rounds, our steps compiled, warmed up and timed in the same rounds."""
from __future__ import annotations

import dataclasses
import math
import statistics
import time
from typing import Callable

from benchmarks.harness import machine
from benchmarks.harness.steps import JaxStep, TorchStep

REFERENCE = 'hf'   # the reference's name in `Run.times`


def interleaved(runners: dict[str, Callable[[int], None]], steps: int, per_round: int,
                cpu: dict[str, list[float]] | None = None) -> dict[str, list[float]]:
  """Wall seconds per step of each runner, one entry per round; rounds alternate the order of the runners, so that
  load from other processes falls on all alike.

  `cpu`, if given, receives the process CPU seconds per step (all threads) in the same layout. Under load from
  other processes CPU time varies far less than wall time (a busy machine delays work more than it adds to it).
  """
  names = list(runners)
  times: dict[str, list[float]] = {n: [] for n in names}
  if cpu is not None:
    cpu.update({n: [] for n in names})
  for r in range(max(1, math.ceil(steps / per_round))):
    for name in (names if r % 2 == 0 else names[::-1]):
      t, c = time.perf_counter(), time.process_time()
      runners[name](per_round)
      times[name].append((time.perf_counter() - t) / per_round)
      if cpu is not None:
        cpu[name].append((time.process_time() - c) / per_round)
  return times


def quartiles(values: list[float]) -> tuple[float, float]:
  """(first, third) quartile; both the value itself when there is one."""
  if len(values) < 2:
    return values[0], values[0]
  q1, _, q3 = statistics.quantiles(values, n=4, method='inclusive')
  return q1, q3


def median_ratio(a: list[float], b: list[float]) -> float:
  """Median over rounds of a[i] / b[i]: robust to load that changes between rounds."""
  return statistics.median(x / y for x, y in zip(a, b))


@dataclasses.dataclass
class Run:
  """What one comparison measured. `times` / `cpu`: seconds per step of each timed side, one entry per round."""
  peak: machine.Peak
  steps: dict[str, JaxStep]
  reference: TorchStep | None
  reference_flops_counted: float
  reference_rss_delta: int
  times: dict[str, list[float]]
  cpu: dict[str, list[float]]
  per_round: int

  def timed(self, name: str) -> bool:
    return name in self.times

  def step_s(self, name: str) -> float:
    return statistics.median(self.times[name])

  def cpu_s(self, name: str) -> float:
    return statistics.median(self.cpu[name])

  def speedup(self, name: str, over: str) -> dict:
    """How much faster `name` is than `over`: median of per-round ratios (wall, CPU time) and fastest rounds."""
    return dict(median=median_ratio(self.times[over], self.times[name]),
                fastest=min(self.times[over]) / min(self.times[name]),
                cpu_time=median_ratio(self.cpu[over], self.cpu[name]))

  def summary(self, name: str, flops: float, tokens: int) -> dict:
    """Step time, tokens/s and MFU (`flops` per step against the JAX peak) of a timed side."""
    t, c = self.step_s(name), self.cpu_s(name)
    return dict(step_s=t, step_s_quartiles=quartiles(self.times[name]), step_s_rounds=self.times[name], cpu_s=c,
                cpu_s_rounds=self.cpu[name], tokens_per_s=tokens / t, mfu=flops / t / self.peak.jax,
                mfu_cpu_time=flops / c / self.peak.jax_per_cpu_s)


def run_comparison(build_steps: dict[str, Callable[[], JaxStep]], build_reference: Callable[[], TorchStep] | None,
                   *, steps: int, per_round: int, warmup: int, untimed: tuple[str, ...] = ()) -> Run:
  """Builds the reference, measures the peak, builds and warms up our steps (in order; `untimed` ones are
  compiled for their FLOPs and memory only), times all in interleaved rounds (the first of ours, then the
  reference, then the rest), and measures the peak again (the best is kept)."""
  reference, counted, rss_delta = None, float('nan'), 0
  if build_reference is not None:
    rss0 = machine.rss_bytes()
    reference = build_reference()
    counted = reference.counted_flops()  # the first warm-up step
    reference.run(max(warmup - 1, 0))
    rss_delta = machine.max_rss_bytes() - rss0
  peak = machine.Peak().measure(with_torch=reference is not None)
  built: dict[str, JaxStep] = {}
  for name, build in build_steps.items():
    built[name] = build()
    if name not in untimed:
      built[name].run(1)
      built[name].run(max(warmup - 1, 0))
  runners = {name: step.run for name, step in built.items() if name not in untimed}
  if reference is not None:
    first, *rest = runners.items()
    runners = dict([first, (REFERENCE, reference.run), *rest])
  cpu: dict[str, list[float]] = {}
  times = interleaved(runners, steps, per_round, cpu)
  peak.measure(with_torch=reference is not None)
  return Run(peak, built, reference, counted, rss_delta, times, cpu, per_round)
