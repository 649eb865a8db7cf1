"""Process-group initialisation shared by every entry point (TPU pods, SLURM GPU clusters, one machine).

Call `initialize()` first thing in `main()`, BEFORE any JAX computation: before `jax.devices()`, before creating an
array, before `jax.jit` runs. Once a JAX backend exists the process group can no longer be formed, and
`initialize()` then raises instead of silently training N independent copies.

    from common import distributed

    def main(argv):
      distributed.initialize()
      logging.info('%s', distributed.describe())
      if distributed.is_primary():
        ...  # write config files, export, print summaries

Where the settings come from (the first source that applies wins, field by field for 1 and 2):
  1. explicit arguments to `initialize()`;
  2. the environment `JAX_COORDINATOR_ADDRESS` (host:port), `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID` and optionally
     `JAX_LOCAL_DEVICE_IDS` (comma-separated) -- what `launch/slurm.py` exports in every task;
  3. a SLURM job step (`srun`): coordinator = first host of `SLURM_STEP_NODELIST`, port `JAX_COORDINATOR_PORT` or
     derived from `SLURM_JOB_ID`; `SLURM_NTASKS` processes, this one `SLURM_PROCID`. One task per node drives all
     of the node's GPUs; several tasks per node drive one GPU each (`SLURM_LOCALID`);
  4. a Cloud TPU slice with several hosts: `jax.distributed.initialize()` with no arguments, which reads the TPU
     VM metadata (every worker must run the same command, e.g. `launch/tpu.py run`);
  5. otherwise a single process: nothing to do.
"""
from __future__ import annotations

import glob
import inspect
import os
import re
import urllib.request
from typing import Sequence

import jax
from absl import logging

_DONE = False

ENV_ADDRESS = 'JAX_COORDINATOR_ADDRESS'
ENV_NUM_PROCESSES = 'JAX_NUM_PROCESSES'
ENV_PROCESS_ID = 'JAX_PROCESS_ID'
ENV_LOCAL_DEVICE_IDS = 'JAX_LOCAL_DEVICE_IDS'
ENV_PORT = 'JAX_COORDINATOR_PORT'

_METADATA_URL = 'http://metadata.google.internal/computeMetadata/v1/instance/attributes/'


def slurm_port(job_id: int) -> int:
  """The coordinator port of SLURM job `job_id` when none is given: 20000..39999, the same on every node.

  `launch/slurm.py` writes the same formula into its sbatch scripts.
  """
  return 20000 + job_id % 20000


def first_slurm_host(nodelist: str) -> str:
  """The first host of a SLURM node list: 'gpu[003-005,010],cpu1' -> 'gpu003'; 'a1,b2' -> 'a1'."""
  nodelist = nodelist.strip()
  match = re.match(r'([^,\[]*)(?:\[([^\]]*)\]([^,]*))?', nodelist)
  prefix, ranges, rest = match.groups()
  if ranges is None:
    return prefix
  first = re.split(r'[,-]', ranges)[0]
  return prefix + first + (first_slurm_host(rest) if rest else '')


def _int_env(name: str) -> int | None:
  value = os.environ.get(name, '').strip()
  if not value:
    return None
  try:
    return int(value)
  except ValueError:
    raise ValueError(f'{name}={value!r} is not an integer') from None


def _device_ids_env() -> list[int] | None:
  value = os.environ.get(ENV_LOCAL_DEVICE_IDS, '').strip()
  if not value:
    return None
  try:
    return [int(x) for x in value.split(',')]
  except ValueError:
    raise ValueError(f'{ENV_LOCAL_DEVICE_IDS}={value!r} is not a comma-separated list of integers') from None


def _slurm_settings() -> tuple[str, int, int, list[int] | None] | None:
  """(coordinator, num_processes, process_id, local_device_ids) inside an `srun` step, else None."""
  env = os.environ
  if not all(k in env for k in ('SLURM_JOB_ID', 'SLURM_STEP_NODELIST', 'SLURM_PROCID')):
    return None
  num_processes = _int_env('SLURM_STEP_NUM_TASKS') or _int_env('SLURM_NTASKS') or 1
  num_nodes = _int_env('SLURM_STEP_NUM_NODES') or _int_env('SLURM_JOB_NUM_NODES') or num_processes
  port = _int_env(ENV_PORT) or slurm_port(_int_env('SLURM_JOB_ID'))
  address = f'{first_slurm_host(env["SLURM_STEP_NODELIST"])}:{port}'
  local_ids = None
  if num_processes > num_nodes and _int_env('SLURM_LOCALID') is not None:
    local_ids = [_int_env('SLURM_LOCALID')]  # one process per device
  return address, num_processes, _int_env('SLURM_PROCID'), local_ids


def _has_tpu_chips() -> bool:
  return bool(glob.glob('/dev/accel[0-9]*') or glob.glob('/dev/vfio/[0-9]*'))


def _tpu_metadata(key: str, timeout: float = 2.0) -> str | None:
  request = urllib.request.Request(_METADATA_URL + key, headers={'Metadata-Flavor': 'Google'})
  try:
    with urllib.request.urlopen(request, timeout=timeout) as response:
      return response.read().decode().strip()
  except OSError:
    return None


def tpu_host_count() -> int:
  """Hosts in this Cloud TPU slice (times MEGASCALE_NUM_SLICES); 0 when this is not a TPU VM."""
  slices = _int_env('MEGASCALE_NUM_SLICES') or 1
  hostnames = os.environ.get('TPU_WORKER_HOSTNAMES') or os.environ.get('TPU_PROCESS_ADDRESSES')
  if hostnames:
    return len(hostnames.split(',')) * slices
  if not _has_tpu_chips():
    return 0
  if os.environ.get('TPU_SKIP_MDS_QUERY'):
    return slices
  endpoints = _tpu_metadata('worker-network-endpoints')
  return (len(endpoints.split(',')) if endpoints else 1) * slices


def _deactivate_kwargs() -> dict:
  """Stops JAX's own cluster detection from overriding what we pass (jax >= 0.4.36).

  Without it, under SLURM JAX restricts every process to GPU `SLURM_LOCALID`, i.e. one GPU per node when there is
  one task per node.
  """
  params = inspect.signature(jax.distributed.initialize).parameters
  if 'cluster_detection_method' in params and jax.__version_info__ >= (0, 4, 36):
    return {'cluster_detection_method': 'deactivate'}
  return {}


def _backends_initialized() -> bool:
  try:
    from jax._src import xla_bridge  # pylint: disable=import-outside-toplevel
    return bool(xla_bridge.backends_are_initialized())
  except (ImportError, AttributeError):
    return False


def _jax_initialized() -> bool:
  is_initialized = getattr(jax.distributed, 'is_initialized', None)
  return bool(is_initialized()) if is_initialized is not None else False


def _check_backends(source: str) -> None:
  if _backends_initialized():
    raise RuntimeError(f'common.distributed.initialize() was called after JAX started its backend ({source}); '
                       'call it first in main(), before any JAX computation')


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, local_device_ids: Sequence[int] | None = None) -> None:
  """Joins this process to the job's process group; does nothing for a single process. Idempotent.

  Must run before any JAX computation (see the module docstring for where the settings come from).
  Raises ValueError for incomplete or inconsistent settings, naming the missing field.
  """
  global _DONE
  if _DONE or _jax_initialized():
    _DONE = True
    return

  address = coordinator_address or os.environ.get(ENV_ADDRESS) or None
  count = num_processes if num_processes is not None else _int_env(ENV_NUM_PROCESSES)
  index = process_id if process_id is not None else _int_env(ENV_PROCESS_ID)
  device_ids = list(local_device_ids) if local_device_ids is not None else _device_ids_env()

  if address is not None or count is not None or index is not None:
    source = 'explicit arguments / JAX_* environment'
    missing = [name for name, value in (('coordinator_address (JAX_COORDINATOR_ADDRESS)', address),
                                        ('num_processes (JAX_NUM_PROCESSES)', count),
                                        ('process_id (JAX_PROCESS_ID)', index)) if value is None]
    if count == 1 and index in (None, 0):
      _DONE = True
      return
    if missing:
      raise ValueError(f'distributed settings incomplete: missing {", ".join(missing)}')
    if count < 1 or not 0 <= index < count:
      raise ValueError(f'process_id={index} is not in [0, num_processes={count})')
    if ':' not in address:
      raise ValueError(f'coordinator_address={address!r} must be host:port')
  elif (slurm := _slurm_settings()) is not None:
    source = 'SLURM'
    address, count, index, slurm_ids = slurm
    device_ids = device_ids if device_ids is not None else slurm_ids
    if count == 1:
      _DONE = True
      return
  elif tpu_host_count() > 1:
    _check_backends('Cloud TPU')
    logging.info('distributed: multi-host Cloud TPU slice, letting JAX read the TPU metadata')
    jax.distributed.initialize()
    _DONE = True
    return
  else:
    _DONE = True
    return

  _check_backends(source)
  logging.info('distributed: %s: process %d of %d, coordinator %s%s', source, index, count, address,
               f', local devices {device_ids}' if device_ids is not None else '')
  kwargs = {} if device_ids is not None else _deactivate_kwargs()
  jax.distributed.initialize(coordinator_address=address, num_processes=count, process_id=index,
                             local_device_ids=device_ids, **kwargs)
  _DONE = True


def is_primary() -> bool:
  """True on process 0, the one that writes shared files, logs summaries and exports."""
  return jax.process_index() == 0


def describe() -> str:
  """One line: process index/count, local/global device counts, platform and device kind."""
  devices = jax.local_devices()
  kind = devices[0].device_kind if devices else 'none'
  return (f'process {jax.process_index()}/{jax.process_count()}, devices {jax.local_device_count()} local / '
          f'{jax.device_count()} global, platform {jax.default_backend()} ({kind})')
