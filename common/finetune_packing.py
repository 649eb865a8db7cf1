"""Packed fine-tuning batches: a step's examples laid end to end in a few rows instead of one padded row each.

A classification or regression batch of short sentences is mostly padding (GLUE's CoLA: 12 real tokens of 64 per
row). Packing computes the same examples in far fewer positions and changes no result beyond float rounding: the
step keeps its B examples (the very ones, in the same order, that the unpacked loader gives it), each example
attends only to itself, its positions restart at 0 and its pooled vector is read at its own first token.

A packed global batch of B examples in R rows of P positions (P = the features' `max_seq_length`):
  input_ids, segment_ids, input_mask, position_ids, example_ids   `[R, P]`
  pool_at     `[B]` int32: the flat index (row * P + column) of each example's first token ([CLS])
  label (and any other per-example field)                          `[B]`, as unpacked
`example_ids` is 1 + the example's slot in its row (0: padding); `attention.packed_mask(example_ids)` is the
attention mask. R is fixed for a run (`rows_for_steps`: the most rows any of its steps needs), so the train step
compiles once. A model whose task heads read these fields says so (`ModelAdapter.packs`; BERT's do).
"""
from __future__ import annotations

from typing import Callable, Mapping, Sequence

import numpy as np

from common import task_kinds
from common.data import pipeline

PACKING_FIELDS = ('position_ids', 'example_ids', 'pool_at')
PACKED_KINDS = ('classification', 'regression')


def first_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
  """Example indices grouped into rows of at most `capacity` positions: longest first (ties by index), each into
  the first row with room. Deterministic; at most 11/9 of the optimal row count plus one."""
  rows, room = [], []
  for i in sorted(range(len(lengths)), key=lambda j: (-int(lengths[j]), j)):
    n = int(lengths[i])
    if n > capacity:
      raise ValueError(f'an example of {n} positions does not fit a row of {capacity}')
    for r, free in enumerate(room):
      if n <= free:
        rows[r].append(i)
        room[r] -= n
        break
    else:
      rows.append([i])
      room.append(capacity - n)
  return rows


def pack_batch(batch: Mapping[str, np.ndarray], lengths: Sequence[int], num_rows: int) -> dict[str, np.ndarray]:
  """The packed form (module docstring) of an unpacked, right-padded batch `{input_ids: [B, P], ..., label: [B]}`
  whose example i has `lengths[i]` real positions, in `num_rows` rows."""
  width = int(np.shape(batch['input_ids'])[1])
  rows = first_fit_decreasing(lengths, width)
  if len(rows) > num_rows:
    raise ValueError(f'the batch needs {len(rows)} packed rows, more than the {num_rows} the run compiled for')
  out = {name: np.zeros((num_rows, width), np.asarray(batch[name]).dtype) for name in task_kinds.MODEL_INPUTS}
  out['position_ids'] = np.zeros((num_rows, width), np.int32)
  out['example_ids'] = np.zeros((num_rows, width), np.int32)
  pool_at = np.zeros(len(lengths), np.int32)
  for r, members in enumerate(rows):
    column = 0
    for slot, i in enumerate(members, 1):
      n = int(lengths[i])
      span = slice(column, column + n)
      for name in task_kinds.MODEL_INPUTS:
        out[name][r, span] = batch[name][i, :n]
      out['position_ids'][r, span] = np.arange(n)
      out['example_ids'][r, span] = slot
      pool_at[i] = r * width + column
      column += n
  out['pool_at'] = pool_at
  out.update({k: np.asarray(v) for k, v in batch.items() if k not in task_kinds.MODEL_INPUTS})
  return out


def rows_for_steps(lengths_of_step: Callable[[int], np.ndarray], steps: int, width: int,
                   multiple: int = 1) -> int:
  """The most packed rows any of steps 0 .. `steps` - 1 needs (`lengths_of_step(s)`: its examples' lengths),
  rounded up to a multiple of `multiple` (the devices the batch is split over)."""
  most = max((len(first_fit_decreasing(lengths_of_step(s), width)) for s in range(steps)), default=1)
  return -(-most // multiple) * multiple


class PackingMixin:
  """Makes a `common.finetune_loader.TaskLoader` yield packed batches (module docstring) of `num_rows` rows: each
  step packs exactly the examples the unpacked loader would give it, so the epoch order, resumption and
  `group_by_length` are unchanged. One process only (the pool indices are global rows)."""
  num_rows: int = 0

  def host_batch(self, step: int) -> dict[str, np.ndarray]:
    batch = pipeline.StepLoader.host_batch(self, step)
    return pack_batch(batch, self.example_lengths(step, self.record_ids(step)), self.num_rows)

  def length(self, step: int) -> int:
    del step
    return self.seq_len

  def computed_rows(self, step: int) -> int:
    del step
    return self.num_rows

