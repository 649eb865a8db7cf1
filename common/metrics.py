"""Metric writers (JSONL + TensorBoard), throughput, model FLOPs and MFU.

Only process 0 writes; every other process gets a writer that drops everything. The workdir may be local or remote
(`gs://...`): both files go through `common.storage.AppendFile`, so on an object store they are uploaded whole on
flush (JSONL at most every `upload_every` seconds, TensorBoard event files whenever tensorboardX flushes) and on
`close()`.
"""
from __future__ import annotations

import json
import sys
import time
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from common import storage

# Dense bf16 peak FLOP/s per chip/device, from vendor data sheets (dense, no sparsity).
PEAK_FLOPS_BY_DEVICE_KIND = {
    'TPU v2': 45e12 / 2, 'TPU v3': 123e12 / 2, 'TPU v4': 275e12, 'TPU v5 lite': 197e12, 'TPU v5e': 197e12,
    'TPU v5p': 459e12, 'TPU v5': 459e12, 'TPU v6 lite': 918e12, 'TPU v6e': 918e12,
    'NVIDIA H100': 989e12, 'NVIDIA H200': 989e12, 'NVIDIA A100': 312e12, 'NVIDIA L4': 121e12,
}


def measure_matmul_peak(n: int = 2048, dtype=jnp.float32, repeats: int = 5, device=None) -> float:
  """FLOP/s of a large square matmul on one device: the practical peak used for MFU where no data sheet applies."""
  device = device or jax.local_devices()[0]
  a = jax.device_put(jnp.ones((n, n), dtype), device)
  b = jax.device_put(jnp.ones((n, n), dtype), device)
  f = jax.jit(lambda x, y: x @ y)
  f(a, b).block_until_ready()
  best = float('inf')
  for _ in range(repeats):
    t = time.perf_counter()
    f(a, b).block_until_ready()
    best = min(best, time.perf_counter() - t)
  return 2.0 * n ** 3 / best


_MEASURED_PEAK: dict[str, float] = {}  # device kind -> FLOP/s, measured once per process


def peak_flops_per_device(override: float = 0.0) -> tuple[float, str]:
  """(peak FLOP/s of one device, where the number comes from). `override > 0` wins; CPUs are measured, once per
  process (a run of several seeds or tasks trains several times; the measurement takes a second or two)."""
  if override > 0:
    return float(override), 'config'
  kind = jax.devices()[0].device_kind
  for prefix, value in sorted(PEAK_FLOPS_BY_DEVICE_KIND.items(), key=lambda kv: -len(kv[0])):
    if kind.startswith(prefix):
      return value, f'data sheet ({kind})'
  if kind not in _MEASURED_PEAK:
    _MEASURED_PEAK[kind] = measure_matmul_peak()
  return _MEASURED_PEAK[kind], f'measured fp32 matmul ({kind})'


def mfu(model_flops_per_sec: float, peak_flops: float) -> float:
  """Model FLOP/s over the peak, or NaN ("n/a") when that is not a utilisation: no positive peak, or a ratio above
  1 (a measured CPU peak collapses when other processes load the machine while it is measured)."""
  if not peak_flops or peak_flops <= 0 or not np.isfinite(peak_flops):
    return float('nan')
  value = float(model_flops_per_sec) / float(peak_flops)
  return value if 0.0 <= value <= 1.0 else float('nan')


def is_mfu_key(key: str) -> bool:
  return key == 'mfu' or key.endswith('/mfu')


class _EventFileFactory:
  """tensorboardX's writer factory for remote schemes: event files through `storage.AppendFile`.

  tensorboardX picks a factory by the scheme of the log directory; its own `gs` one raises ImportError without the
  google-cloud-storage client (which `MetricWriter` used to take for a missing tensorboardX, turning TensorBoard off
  without a word) and has no other scheme. This one serves every scheme `etils.epath` opens.
  """

  def open(self, path):
    return storage.AppendFile(path, upload_every=0.0)

  def directory_check(self, path):
    storage.makedirs(path)


def _import_tensorboardx() -> None:
  """Imports tensorboardX without torch where torch is installed but not yet imported: tensorboardX imports it
  (1.5 to 2.5 s of a run's start-up on a CPU host) only to accept torch tensors, and everything logged here is a
  Python or numpy number. A later `import torch` anywhere works as usual."""
  if 'tensorboardX' in sys.modules or 'torch' in sys.modules:
    return
  sys.modules['torch'] = None  # `import torch` raises ImportError, which tensorboardX takes for "not installed"
  try:
    import tensorboardX.record_writer  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
    import tensorboardX.summary  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
  finally:
    del sys.modules['torch']


def _tensorboard_writer(logdir: str):
  """A tensorboardX `SummaryWriter` on `logdir` (local or remote)."""
  _import_tensorboardx()
  from tensorboardX import SummaryWriter, record_writer  # pylint: disable=import-outside-toplevel
  if storage.is_remote(logdir):
    record_writer.register_writer_factory(logdir.split(':', 1)[0], _EventFileFactory())
  return SummaryWriter(logdir)


class MetricWriter:
  """Writes scalars to `workdir/metrics.jsonl` and TensorBoard (`workdir/tensorboard`), process 0 only.

  `workdir` may be remote (see the module docstring); a resumed run appends to the existing `metrics.jsonl`. An
  `mfu` scalar that is not a utilisation (above 1 or non-finite, see `mfu`) is not written: it is n/a, said once on
  stderr, never a number above 1.
  """

  def __init__(self, workdir: str | None, enabled: bool | None = None, upload_every: float = 30.0):
    self.enabled = (jax.process_index() == 0) if enabled is None else enabled
    self._jsonl = None
    self._tb = None
    self.progress = None  # a tqdm bar, set by the trainer while one is shown
    self._mfu_warned = False
    if self.enabled and workdir:
      storage.makedirs(workdir)
      self._jsonl = storage.AppendFile(storage.join(workdir, 'metrics.jsonl'), upload_every=upload_every)
      try:
        self._tb = _tensorboard_writer(storage.join(workdir, 'tensorboard'))
      except ImportError as e:  # tensorboardX is a dependency; say so loudly if it is missing. JSONL still works.
        print(f'WARNING: no TensorBoard output ({e}); metrics go to metrics.jsonl only', file=sys.stderr, flush=True)
        self._tb = None

  def write(self, step: int, scalars: Mapping[str, Any], prefix: str = '') -> None:
    if not self.enabled:
      return
    clean = {f'{prefix}{k}': float(np.asarray(v)) for k, v in scalars.items()}
    for key in [k for k, v in clean.items() if is_mfu_key(k) and not 0.0 <= v <= 1.0]:
      if not self._mfu_warned:
        self.text(f'{key} {clean[key]:.3g} is not a utilisation (the peak FLOP/s it divides by is too low: a CPU '
                  'peak measured under load); MFU is n/a and not written')
        self._mfu_warned = True
      del clean[key]
    if self._jsonl is not None:
      self._jsonl.write((json.dumps({'step': int(step), **clean}) + '\n').encode('utf-8'))
      self._jsonl.flush()
    if self._tb is not None:
      for k, v in clean.items():
        self._tb.add_scalar(k, v, int(step))

  def text(self, message: str) -> None:
    if self.enabled:
      if self.progress is not None:  # a progress bar owns the line: print above it
        self.progress.write(message, file=sys.stderr)
      else:
        print(message, file=sys.stderr, flush=True)

  def config(self, config: Mapping[str, Any], metric_names: Sequence[str] = ()) -> None:
    """The run's config to TensorBoard: the whole of it as text, and its scalar fields as hparams (with
    `metric_names`, e.g. 'eval/loss', as the metrics to compare runs by)."""
    if not self.enabled or self._tb is None:
      return
    flat = dict(_flatten(config))
    self._tb.add_text('config', '```\n' + json.dumps(config, indent=2, sort_keys=True, default=str) + '\n```', 0)
    from tensorboardX.summary import hparams  # pylint: disable=import-outside-toplevel
    values = {k: v for k, v in flat.items() if isinstance(v, (bool, int, float, str)) and v is not None}
    experiment, start, end = hparams(values, {name: 0.0 for name in metric_names})
    for summary in (experiment, start, end):
      self._tb.file_writer.add_summary(summary)

  def close(self) -> None:
    if self._jsonl is not None:
      self._jsonl.close()
    if self._tb is not None:
      self._tb.close()


def _flatten(tree: Mapping[str, Any], prefix: str = ''):
  for key, value in tree.items():
    if isinstance(value, Mapping):
      yield from _flatten(value, f'{prefix}{key}.')
    else:
      yield f'{prefix}{key}', value


def read_jsonl(path: str) -> list[dict]:
  return [json.loads(line) for line in storage.read_text(path).splitlines() if line.strip()]
