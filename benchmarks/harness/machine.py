"""The machine: cores, pinning, resident memory and the fp32 matmul peak that MFU is measured against."""
from __future__ import annotations

import dataclasses
import os
import resource
import time
from typing import Callable

import jax
import jax.numpy as jnp


def cores() -> int:
  """CPU cores this process may run on."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:
    return os.cpu_count() or 1


def pin_to_one_core() -> None:
  """As `taskset -c N`: one core for the whole process (call before JAX or torch start their threads)."""
  os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})


def rss_bytes() -> int:
  with open('/proc/self/statm') as f:
    return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')


def max_rss_bytes() -> int:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _square_matmul_peak(matmul: Callable[[int], Callable[[], None]], sizes, repeats) -> tuple[float, float]:
  """(best FLOP/s by wall time, best FLOP per process CPU-second) of square fp32 matmuls of the given sizes."""
  best_wall = best_cpu = 0.0
  for n in sizes:
    run = matmul(n)
    run()
    for _ in range(repeats):
      t, c = time.perf_counter(), time.process_time()
      run()
      flops = 2.0 * n ** 3
      best_wall = max(best_wall, flops / (time.perf_counter() - t))
      best_cpu = max(best_cpu, flops / max(time.process_time() - c, 1e-9))
  return best_wall, best_cpu


def jax_matmul_peak(sizes=(2048, 3072), repeats=3) -> tuple[float, float]:
  """What `common.metrics.measure_matmul_peak` measures (a jitted square fp32 matmul `[n, n] x [n, n]`), by wall
  time and per CPU-second."""
  def matmul(n):
    a = jax.device_put(jnp.ones((n, n), jnp.float32), jax.devices()[0])
    f = jax.jit(lambda x, y: x @ y)
    return lambda: f(a, a).block_until_ready()
  return _square_matmul_peak(matmul, sizes, repeats)


def torch_matmul_peak(sizes=(2048, 3072), repeats=3) -> tuple[float, float]:
  """The same square fp32 matmuls in torch (for information: MFU is against JAX's)."""
  import torch  # pylint: disable=import-outside-toplevel

  def matmul(n):
    a = torch.ones(n, n)
    return lambda: torch.mm(a, a)
  return _square_matmul_peak(matmul, sizes, repeats)


@dataclasses.dataclass
class Peak:
  """Best fp32 matmul FLOP/s seen in this run (measure before and after the timed rounds: load comes and goes)."""
  jax: float = 0.0            # FLOP/s, wall time
  jax_per_cpu_s: float = 0.0  # FLOP per process CPU-second
  torch: float = float('nan')

  def measure(self, with_torch: bool) -> 'Peak':
    wall, per_cpu = jax_matmul_peak()
    self.jax, self.jax_per_cpu_s = max(self.jax, wall), max(self.jax_per_cpu_s, per_cpu)
    if with_torch:
      now = torch_matmul_peak()[0]
      self.torch = now if self.torch != self.torch else max(self.torch, now)
    return self

  def describe(self) -> str:
    torch = '' if self.torch != self.torch else f', torch {self.torch / 1e9:.0f} GFLOP/s'
    return (f'fp32 matmul peak: JAX {self.jax / 1e9:.0f} GFLOP/s ({self.jax_per_cpu_s / 1e9:.0f} GFLOP per '
            f'CPU-second){torch} (best of 2048^2 and 3072^2, before and after timing); MFU is against JAX\'s')
