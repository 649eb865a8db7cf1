"""Flags every benchmark script shares, and the header it prints."""
from __future__ import annotations

import argparse
import os
import sys

import jax

from benchmarks.harness import machine
from common import host_memory


def add_run_flags(parser: argparse.ArgumentParser, *, steps: int = 10, per_round: int = 2, warmup: int = 2) -> None:
  """--steps --round --warmup --dtype --threads --no-hf --profile --experiments --only --json."""
  parser.add_argument('--steps', type=int, default=steps, help='timed steps of each side')
  parser.add_argument('--round', type=int, default=per_round, help='steps of one side per interleaved round')
  parser.add_argument('--warmup', type=int, default=warmup, help='untimed steps of each side after compilation')
  parser.add_argument('--dtype', default='float32', choices=('float32', 'bfloat16'), help='our compute dtype')
  parser.add_argument('--threads', type=int, default=0, help='torch threads (0: the cores this process may use)')
  parser.add_argument('--no-hf', action='store_true', help='time ours only')
  parser.add_argument('--profile', action='store_true', help='per-op trace of our step and a forward / backward split')
  parser.add_argument('--experiments', action='store_true', help='time variants of our step against the baseline')
  parser.add_argument('--only', default='', help='with --experiments: comma-separated variant names to run')
  parser.add_argument('--json', default='', metavar='OUT', help='write the numbers to this JSON file')


def require_positive(parser: argparse.ArgumentParser, args: argparse.Namespace, names) -> None:
  """A one-line usage error for the first of `names` (flag names without dashes) that is not positive."""
  for name in (*names, 'steps', 'round'):
    value = getattr(args, name)
    if value <= 0:
      parser.error(f'--{name.replace("_", "-")} must be positive, got {value}')


def environment(args: argparse.Namespace) -> dict:
  """The run's environment (for the JSON), after a note when XLA_FLAGS asks for fake devices."""
  if 'xla_force_host_platform_device_count' in os.environ.get('XLA_FLAGS', ''):
    print('note: XLA_FLAGS asks for fake CPU devices; the benchmark uses the first device only', file=sys.stderr)
  return dict(cores=machine.cores(), torch_threads=args.threads or machine.cores(), device=str(jax.devices()[0]),
              jax_version=jax.__version__, load_average_start=os.getloadavg(),
              host_memory_kept=host_memory.keep_freed_memory())


def reference_versions() -> dict:
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  return dict(torch_version=torch.__version__, transformers_version=transformers.__version__)
