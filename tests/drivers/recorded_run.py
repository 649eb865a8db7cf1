"""Runs a pretraining entry point exactly as `python -m MODULE ARGS...`, recording every host batch it trains on.

  python tests/drivers/recorded_run.py --record FILE [--step_delay S] [--nan_from_step K] -- MODULE ARGS...

`--record FILE` appends one JSON line per batch the training loop takes from its loader (`StepLoader.iterate`):
`{"step": s, "process": p, "processes": P, "rows": [digest of row 0, ...]}`, flushed at once, so the lines of a
killed run survive it. A row digest covers every array of the row (name, dtype, shape, bytes). The loop takes a
batch only to train on it at once, so the recorded steps are the steps trained (a SIGKILL may land between taking
and finishing the last one).

`--step_delay S` sleeps S seconds before handing out each batch (gives a test time to interrupt a tiny run).
`--nan_from_step K` multiplies every floating-point array of the batches of steps >= K by NaN (non-finite loss).
`--disk_bytes N` makes the free space of a directory look like N bytes minus what is stored under it (a small
disk where tmpfs cannot be mounted; only free-space checks see it).
Neither changes which batches are trained or what they hold up to that point.

PyTorch is kept out of the process (`tensorboardX` imports it only if it can, and nothing in training needs it):
that saves seconds at every start of these short runs.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import runpy
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def row_digests(batch: dict) -> list[str]:
  """One hex digest per row of a batch dict of `[rows, ...]` numpy arrays."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  rows = len(next(iter(batch.values())))
  out = []
  for i in range(rows):
    h = hashlib.sha256()
    for name in sorted(batch):
      row = np.ascontiguousarray(batch[name][i])
      h.update(f'{name}:{row.dtype}:{row.shape}:'.encode())
      h.update(row.tobytes())
    out.append(h.hexdigest()[:16])
  return out


def install(record: str | None, step_delay: float, nan_from_step: int | None) -> None:
  """Wraps `StepLoader.iterate` so every batch handed to the training loop is recorded (and optionally altered)."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  from common.data import pipeline  # pylint: disable=import-outside-toplevel

  original = pipeline.StepLoader.iterate
  sink = open(record, 'a', buffering=1) if record else None  # pylint: disable=consider-using-with

  def iterate(self, start_step=0, num_steps=None):
    for step, batch in original(self, start_step, num_steps):
      if nan_from_step is not None and step >= nan_from_step:
        batch = {k: v * np.nan if np.issubdtype(v.dtype, np.floating) else v for k, v in batch.items()}
      if step_delay:
        time.sleep(step_delay)
      if sink is not None:
        sink.write(json.dumps({'step': int(step), 'process': self.process_index, 'processes': self.process_count,
                               'rows': row_digests(batch)}) + '\n')
      yield step, batch

  pipeline.StepLoader.iterate = iterate


def limit_disk(size: int) -> None:
  import shutil  # pylint: disable=import-outside-toplevel
  usage = shutil.disk_usage

  def used(path):
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)
  shutil.disk_usage = lambda path: usage(path)._replace(free=max(0, size - used(path)))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--record', default=None)
  parser.add_argument('--step_delay', type=float, default=0.0)
  parser.add_argument('--nan_from_step', type=int, default=None)
  parser.add_argument('--disk_bytes', type=int, default=None)
  parser.add_argument('module')
  parser.add_argument('args', nargs=argparse.REMAINDER)
  args = parser.parse_args()
  sys.path.insert(0, REPO)
  sys.modules['torch'] = None  # `import torch` now raises ImportError
  install(args.record, args.step_delay, args.nan_from_step)
  if args.disk_bytes is not None:
    limit_disk(args.disk_bytes)
  sys.argv = [args.module, *args.args]
  runpy.run_module(args.module, run_name='__main__', alter_sys=True)


if __name__ == '__main__':
  main()
