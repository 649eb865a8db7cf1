"""Fit before launch: compile the train step for the target's devices, with no data and no hardware, and say
whether it fits.

    python -m bert_jax.pretrain --config bert_jax/configs/base.py --workdir DIR --dry_run --target=tpu:v4-32
    python -m xlnet_jax.pretrain --config xlnet_jax/configs/base.py --workdir DIR --dry_run --target=gpu:h100x8

A dry run validates the config for the target's device count, builds the abstract train state with the trainer's
own shardings (`trainer.build_setup`), lowers and compiles the real train step for abstract inputs, and prints the
per-device memory from `compiled.memory_analysis()` (arguments, outputs, donated buffers reused, temporaries,
generated code) against the device's memory, the step's FLOPs from `compiled.cost_analysis()` next to the model's
analytic count, and one verdict line. Nothing is written: no workdir, no data preparation, no checkpoint.

Where the step is compiled, best first:
  1. the attached devices, when they are the target (same platform and count): the numbers are XLA's own;
  2. a TPU target with libtpu importable: compile-only TPU devices of the target topology
     (`jax.experimental.topologies.get_topology_desc`), the exact TPU compiler, no TPU needed;
  3. otherwise fake CPU devices, as many as the target has (`jax_num_cpu_devices`): the same sharded program, but
     buffer sizes and fusion decisions are the CPU compiler's, so the memory is an ESTIMATE (the output says so).
Path 3 has to set the CPU device count before JAX starts its backends: call `prepare_devices(target)` first in
`main()`, as the entry points do.

Targets: `tpu:<generation>-<size>` with the accelerator-type names of Cloud TPU (`v4-32` = 16 chips = 16 JAX
devices; `v5litepod-16` = `v5e-16` = 16 chips; `v3-8` = 8 cores = 8 devices), `gpu:<kind>` or `gpu:<kind>x<count>`
(`gpu:h100x8`), or nothing: the attached devices. `--target_devices` and `--target_hbm_gb` override the count and
the per-device memory (e.g. a GPU kind not in the table, or a made-up small device).
"""
from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import re
from typing import Any, Mapping

import jax
import ml_collections
import numpy as np

from common.config import ConfigError

GIB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class TpuGeneration:
  hbm_gib: float            # per JAX device
  devices_per_unit: float   # JAX devices per unit of the accelerator-type suffix
  topology_prefix: str      # as libtpu names topologies ('' = no compile-only topology here)
  topology_dims: int
  chip_config: str
  peak_flops: float         # dense bf16 per JAX device


# The accelerator-type suffix counts TensorCores for v2, v3, v4 and v5p and chips for v5e and v6e. A JAX device is a
# TensorCore on v2/v3 (two per chip, 8 / 16 GiB each) and a chip elsewhere (v4 and v5p run their two cores as one
# "megacore" device).
TPU_GENERATIONS: dict[str, TpuGeneration] = {
    'v2': TpuGeneration(8, 1.0, '', 2, 'default', 22.5e12),
    'v3': TpuGeneration(16, 1.0, '', 2, 'default', 61.5e12),
    'v4': TpuGeneration(32, 0.5, 'v4', 3, 'megacore', 275e12),
    'v5p': TpuGeneration(95, 0.5, 'v5', 3, 'megacore', 459e12),
    'v5e': TpuGeneration(16, 1.0, 'v5e', 2, 'default', 197e12),
    'v6e': TpuGeneration(32, 1.0, 'v6e', 2, 'default', 918e12),
}
TPU_ALIASES = {'v5litepod': 'v5e', 'v5lite': 'v5e', 'v6': 'v6e'}

# GPU memory per device in GiB as the device reports it (the data sheet's "80 GB" H100 reports 79.6 GiB; the
# table keeps the data-sheet figure) and dense bf16 peak FLOP/s.
GPU_KINDS: dict[str, tuple[float, float]] = {
    'v100': (32, 125e12), 'a100-40gb': (40, 312e12), 'a100': (80, 312e12), 'l4': (24, 121e12),
    'l40s': (48, 362e12), 'h100': (80, 989e12), 'h200': (141, 989e12), 'b200': (180, 2250e12),
}
# JAX preallocates this fraction of GPU memory for XLA unless XLA_PYTHON_CLIENT_MEM_FRACTION says otherwise.
GPU_DEFAULT_MEM_FRACTION = 0.75


@dataclasses.dataclass
class Target:
  """What the run will train on. `num_devices` / `hbm_bytes` are None for 'local' until `resolve_local()`."""
  name: str
  platform: str                 # 'tpu' | 'gpu' | 'cpu' | 'local'
  num_devices: int | None
  hbm_bytes: float | None       # per device
  usable_fraction: float = 1.0  # of hbm_bytes that XLA may use
  peak_flops: float = 0.0       # per device, 0 = unknown
  generation: str = ''          # TPU generation ('v4', ...)
  hbm_source: str = 'data sheet'


def _tpu_target(spec: str) -> Target:
  match = re.fullmatch(r'(v\d+[a-z]*)-(\d+)', spec)
  if not match:
    raise ConfigError(f'--target: {spec!r} is not a TPU accelerator type like tpu:v4-32 or tpu:v5litepod-16')
  generation, size = TPU_ALIASES.get(match.group(1), match.group(1)), int(match.group(2))
  if generation not in TPU_GENERATIONS:
    raise ConfigError(f'--target: unknown TPU generation {match.group(1)!r}; known: {sorted(TPU_GENERATIONS)}')
  gen = TPU_GENERATIONS[generation]
  devices = size * gen.devices_per_unit
  if devices < 1 or devices != int(devices):
    raise ConfigError(f'--target: tpu:{spec} does not name a whole number of devices')
  return Target(f'tpu:{spec}', 'tpu', int(devices), gen.hbm_gib * GIB, 1.0, gen.peak_flops, generation)


def _gpu_target(spec: str) -> Target:
  match = re.fullmatch(r'([a-z0-9-]+?)(?:x(\d+))?', spec)
  kind = match.group(1) if match else spec
  if kind not in GPU_KINDS:
    raise ConfigError(f'--target: unknown GPU kind {spec!r}; known: {sorted(GPU_KINDS)} (add x<count>, e.g. '
                      'gpu:h100x8, or give --target_hbm_gb)')
  hbm, peak = GPU_KINDS[kind]
  fraction = float(os.environ.get('XLA_PYTHON_CLIENT_MEM_FRACTION', GPU_DEFAULT_MEM_FRACTION))
  return Target(f'gpu:{spec}', 'gpu', int(match.group(2) or 1), hbm * GIB, fraction, peak)


def parse_target(spec: str | None, *, hbm_gb: float | None = None, num_devices: int | None = None) -> Target:
  """`tpu:v4-32`, `gpu:h100`, `gpu:h100x8` or None/'' (the attached devices), with optional overrides."""
  spec = (spec or '').strip().lower()
  if not spec or spec == 'local':
    target = Target('local', 'local', None, None)
  elif spec.startswith('tpu:'):
    target = _tpu_target(spec[4:])
  elif spec.startswith('gpu:'):
    target = _gpu_target(spec[4:])
  else:
    raise ConfigError(f'--target: {spec!r} must be tpu:<type>-<size>, gpu:<kind>[x<count>] or empty (attached)')
  if num_devices is not None:
    if num_devices < 1:
      raise ConfigError(f'--target_devices: must be >= 1, got {num_devices}')
    target.num_devices = int(num_devices)
    target.name += f' ({num_devices} devices)'
  if hbm_gb is not None:
    if hbm_gb <= 0:
      raise ConfigError(f'--target_hbm_gb: must be > 0, got {hbm_gb}')
    target.hbm_bytes, target.usable_fraction, target.hbm_source = float(hbm_gb) * GIB, 1.0, '--target_hbm_gb'
  return target


def _backends_initialized() -> bool:
  from jax._src import xla_bridge  # pylint: disable=import-outside-toplevel
  return bool(xla_bridge.backends_are_initialized())


def libtpu_available() -> bool:
  return importlib.util.find_spec('libtpu') is not None


def prepare_devices(target: Target) -> None:
  """Before any JAX computation: asks for as many CPU devices as the target has, for the fake-device compile.

  Harmless when the attached devices or a TPU topology end up being used (the CPU devices are then unused).
  """
  if target.platform == 'local' or target.num_devices is None or _backends_initialized():
    return
  jax.config.update('jax_num_cpu_devices', int(target.num_devices))


def resolve_local(target: Target) -> Target:
  """Fills in a 'local' target from the attached devices (memory from the runtime, else the host's RAM)."""
  if target.platform != 'local':
    return target
  from common import metrics  # pylint: disable=import-outside-toplevel
  devices = jax.local_devices()
  platform = devices[0].platform
  count = target.num_devices or jax.device_count()
  hbm, source = target.hbm_bytes, target.hbm_source
  if hbm is None:
    stats = devices[0].memory_stats() or {}
    if stats.get('bytes_limit'):
      hbm, source = float(stats['bytes_limit']), 'runtime bytes_limit'
    else:
      ram = os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')
      hbm, source = ram / len(devices), f'host RAM / {len(devices)} local devices'
  peak = 0.0
  for prefix, value in metrics.PEAK_FLOPS_BY_DEVICE_KIND.items():
    if devices[0].device_kind.startswith(prefix):
      peak = value
  return dataclasses.replace(target, name=f'the attached {devices[0].device_kind} devices', platform=platform,
                             num_devices=count, hbm_bytes=hbm, hbm_source=source, peak_flops=peak)


def _topology_name(gen: TpuGeneration, chips: int) -> str | None:
  """libtpu's topology name for a power-of-two chip count: 'v4:2x2x4' for 16 v4 chips, 'v5e:4x4' for 16 v5e."""
  if chips < 1 or chips & (chips - 1) or not gen.topology_prefix:
    return None
  dims = [2, 2, 1] if gen.topology_dims == 3 and chips >= 4 else [1] * gen.topology_dims
  while math.prod(dims) > chips:  # 1 or 2 chips of a 3-D generation
    dims[dims.index(max(dims))] //= 2
  while math.prod(dims) < chips:  # double the smallest dimension, the last one first
    smallest = min(dims)
    dims[len(dims) - 1 - dims[::-1].index(smallest)] *= 2
  return f'{gen.topology_prefix}:' + 'x'.join(map(str, dims))


def _tpu_topology_devices(target: Target) -> list:
  gen = TPU_GENERATIONS[target.generation]
  name = _topology_name(gen, target.num_devices)
  if name is None:
    raise ValueError(f'no compile-only topology for {target.num_devices} {target.generation} devices')
  # Off a TPU VM, libtpu would otherwise keep asking the cloud metadata server for the host's TPU (minutes of
  # retries before it gives up); a compile-only topology needs nothing from it.
  os.environ.setdefault('TPU_SKIP_MDS_QUERY', '1')
  # No chip is opened, so several dry runs on one machine need not exclude each other through libtpu's lockfile.
  os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
  dims = [int(d) for d in name.split(':')[1].split('x')]
  bounds = tuple(min(d, 2) for d in dims[:2]) + (1,)
  wrap = tuple(len(dims) == 3 and target.num_devices >= 64 or d >= 16 for d in dims)
  wrap = wrap + (False,) * (3 - len(wrap))
  topology = topologies.get_topology_desc(topology_name=name, platform='tpu', chip_config_name=gen.chip_config,
                                          chips_per_host_bounds=bounds, num_slices=1, wrap=wrap)
  return list(topology.devices)


def target_devices(target: Target) -> tuple[list, str]:
  """(devices to compile for, how they were obtained: one line for the report)."""
  attached = jax.devices()
  if target.platform == attached[0].platform and target.num_devices == len(attached):
    return attached, f'compiled for the attached devices ({len(attached)} x {attached[0].device_kind})'
  if target.platform == 'tpu' and libtpu_available():
    try:
      devices = _tpu_topology_devices(target)
      return devices, f'compiled for a compile-only TPU {target.generation} topology ({len(devices)} devices)'
    except Exception as error:  # pylint: disable=broad-except
      fallback = f'compile-only TPU topology failed ({type(error).__name__}: {error}); '
  else:
    fallback = ''
  cpus = jax.devices('cpu')
  if len(cpus) != target.num_devices:
    raise RuntimeError(f'{target.name} has {target.num_devices} devices but the CPU backend has {len(cpus)}: call '
                       'common.fit.prepare_devices(target) before any JAX computation (a fresh process)')
  return cpus, (fallback + f'ESTIMATE: compiled for {len(cpus)} fake CPU devices standing in for {target.name}; '
                'buffer sizes and fusion are the CPU compiler\'s, not the target\'s')


# ----------------------------------------------------------------------------------------------------------------
# The check itself.
# ----------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class FitReport:
  target: Target
  how: str                          # which devices the step was compiled for
  mesh: dict
  memory: dict                      # name -> bytes per device (from memory_analysis)
  state: dict                       # name -> bytes per device (params, optimizer, carried), from the shardings
  total_bytes: float               # the sum of `memory`, or XLA's own peak estimate where that is larger
  peak_bytes: float                 # XLA's peak estimate (0 = not reported)
  budget_bytes: float
  xla_flops_per_device: float
  analytic_flops: float             # whole step, all devices
  global_batch_size: int
  grad_accum_steps: int

  @property
  def fits(self) -> bool:
    return self.total_bytes <= self.budget_bytes

  @property
  def margin_bytes(self) -> float:
    return self.budget_bytes - self.total_bytes


def _bytes_per_device(tree: Any) -> float:
  """Bytes one device holds of a tree of `ShapeDtypeStruct`s with shardings (the largest shard)."""
  total = 0.0
  for leaf in jax.tree.leaves(tree):
    shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
    total += math.prod(shape) * np.dtype(leaf.dtype).itemsize
  return total


def _cost(compiled) -> dict:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  return dict(cost or {})


def require_vocab_size(model_cfg: ml_collections.ConfigDict, field: str = 'vocab_size') -> None:
  """A dry run prepares no tokenizer, so the vocabulary size must be in the config."""
  if not model_cfg[field]:
    raise ConfigError(f'config.model.{field}: 0 means "the tokenizer\'s", which a dry run does not build; set it, '
                      f'e.g. --config.model.{field}=30522')


def check_fit(config: ml_collections.ConfigDict, objective, host_batch_template: Mapping[str, np.ndarray],
              target: Target) -> FitReport:
  """Compiles the trainer's train step for `target` with abstract inputs and measures it.

  `host_batch_template`: the loader's batch dict for any number of rows (e.g. 0): names, trailing shapes, dtypes.
  The config must already be validated for `target.num_devices`.
  """
  from common import sharding, trainer  # pylint: disable=import-outside-toplevel

  target = resolve_local(target)
  devices, how = target_devices(target)
  mesh = sharding.make_mesh(config.mesh, devices=devices)
  setup = trainer.build_setup(config, objective, mesh)
  _, jitted = trainer.compile_train_step(setup, objective, config)
  batch = {name: jax.ShapeDtypeStruct((config.global_batch_size, *np.shape(value)[1:]), np.asarray(value).dtype,
                                      sharding=sharding.batch_sharding(mesh, np.ndim(value)))
           for name, value in host_batch_template.items()}
  compiled = trainer.lower_train_step(jitted, setup, batch).compile()

  stats = compiled.memory_analysis()
  memory = {
      'arguments (state + batch)': float(stats.argument_size_in_bytes),
      'outputs (new state + metrics)': float(stats.output_size_in_bytes),
      'donated, reused by outputs': -float(stats.alias_size_in_bytes),
      'temporaries (activations, grads)': float(stats.temp_size_in_bytes),
      'generated code': float(stats.generated_code_size_in_bytes),
  }
  state = setup.abstract_state
  state_bytes = {'parameters': _bytes_per_device(state.params), 'optimizer state': _bytes_per_device(state.opt_state),
                 'carried (memory)': _bytes_per_device(state.aux)}
  peak = float(getattr(stats, 'peak_memory_in_bytes', 0) or 0)  # 0 where the backend does not say
  return FitReport(
      target=target, how=how, mesh=dict(mesh.shape), memory=memory, state=state_bytes,
      total_bytes=max(sum(memory.values()), peak), peak_bytes=peak,
      budget_bytes=float(target.hbm_bytes) * target.usable_fraction,
      xla_flops_per_device=float(_cost(compiled).get('flops', 0.0)),
      analytic_flops=float(objective.flops_per_example) * config.global_batch_size,
      global_batch_size=int(config.global_batch_size), grad_accum_steps=int(config.grad_accum_steps))


def _size(x: float, unit: float) -> str:
  return f'{x / unit:10.3f} ' + ('GiB' if unit == GIB else 'MiB')


def _duration(seconds: float) -> str:
  return f'{seconds * 1e3:.3g} ms' if seconds >= 1e-3 else f'{seconds * 1e6:.3g} us'


def format_report(report: FitReport) -> str:
  t = report.target
  lines = [f'dry run for {t.name}: {t.num_devices} device{"s" if t.num_devices != 1 else ""}, mesh {report.mesh}',
           f'  {report.how}', '', 'per-device memory of one train step (compiled.memory_analysis()):']
  unit = GIB if report.total_bytes >= GIB / 4 else 2 ** 20
  for name, value in report.memory.items():
    lines.append(f'  {name:<34}{_size(value, unit)}')
  if report.peak_bytes > sum(report.memory.values()):
    lines.append(f'  {"peak (XLA buffer assignment)":<34}{_size(report.peak_bytes, unit)}')
  lines.append(f'  {"total":<34}{_size(report.total_bytes, unit)}')
  budget_note = (f'{t.hbm_source}' + (f', {t.usable_fraction:.0%} usable by XLA' if t.usable_fraction != 1.0 else ''))
  lines.append(f'  {"device memory":<34}{_size(t.hbm_bytes, unit)}   ({budget_note})')
  lines.append('  of which the train state (from its shardings): ' +
               ', '.join(f'{k} {_size(v, unit).strip()}' for k, v in report.state.items() if v))
  lines.append('')
  xla_total = report.xla_flops_per_device * t.num_devices
  lines.append(f'FLOPs per step: XLA cost_analysis {report.xla_flops_per_device:.3e} per device x {t.num_devices} '
               f'= {xla_total:.3e}; analytic (model matmuls, fwd + bwd) {report.analytic_flops:.3e}'
               + (f' (ratio {xla_total / report.analytic_flops:.2f})' if report.analytic_flops else ''))
  if report.grad_accum_steps > 1:
    lines.append(f'  (XLA counts the body of the {report.grad_accum_steps}-step accumulation loop once)')
  if t.peak_flops:
    seconds = report.analytic_flops / (t.peak_flops * t.num_devices)
    lines.append(f'  at the data-sheet peak ({t.peak_flops / 1e12:.0f} TFLOP/s per device) a step takes at least '
                 f'{_duration(seconds)}')
  lines.append('')
  pct = abs(report.margin_bytes) / report.budget_bytes * 100 if report.budget_bytes else float('inf')
  size = lambda x: _size(x, unit).strip()
  if report.fits:
    lines.append(f'VERDICT: fits: {size(report.total_bytes)} of {size(report.budget_bytes)} per device, margin '
                 f'{size(report.margin_bytes)} ({pct:.0f}% free)')
  else:
    lines.append(f'VERDICT: does not fit: needs {size(report.total_bytes)} per device, {size(report.budget_bytes)} '
                 f'available, short by {size(-report.margin_bytes)} ({pct:.0f}% over)')
  return '\n'.join(lines)


def add_flags(flags_module) -> None:
  """The dry-run flags every entry point defines (in its `__main__` block)."""
  flags_module.DEFINE_bool('dry_run', False, 'Validate the config and compile the train step for --target without '
                           'data or training; print memory per device, FLOPs and whether it fits. Exit status 0 when '
                           'it fits, 3 when it does not.')
  flags_module.DEFINE_string('target', '', 'Dry run target: tpu:<type>-<size> (tpu:v4-32), gpu:<kind>[x<count>] '
                             '(gpu:h100x8), or empty for the attached devices.')
  flags_module.DEFINE_float('target_hbm_gb', None, 'Dry run: memory per device in GiB (overrides the table).')
  flags_module.DEFINE_integer('target_devices', None, 'Dry run: number of devices (overrides the target\'s).')
  flags_module.DEFINE_alias('dry-run', 'dry_run')  # the launchers' spelling works here too


def dry_run_main(flag_values, dry_run_fn: Any) -> int:
  """What an entry point's `main()` does for `--dry_run`: target, devices, check, report. Returns the exit status.

  `dry_run_fn(config, target) -> FitReport`; must run before any other JAX computation in the process.
  """
  target = parse_target(flag_values.target, hbm_gb=flag_values.target_hbm_gb,
                        num_devices=flag_values.target_devices)
  prepare_devices(target)
  report = dry_run_fn(flag_values.config, target)
  print(format_report(report), flush=True)
  return 0 if report.fits else 3

