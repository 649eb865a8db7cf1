"""A step-indexed input pipeline: the batch of every training step is a pure function of (seed, step).

Contract of `StepLoader` (N records, global batch B, P processes):

* Records are visited epoch by epoch. Epoch `e` visits all N record ids in the order of a permutation `perm_e`
  (grain's `index_shuffle`, a keyed Feistel permutation: O(1) memory, any row computable on its own) whose key is
  derived from `(seed, e)`; with `shuffle=False` the order is the identity.
* The ragged end of an epoch: with `drop_remainder=True` (the default when shuffling, i.e. for training) an epoch
  is `steps_per_epoch = N // B` full batches and the last `N % B` rows of `perm_e` are dropped (a different set
  every epoch); N >= B is required. With `drop_remainder=False` (the default without shuffling, i.e. for eval) an
  epoch is `ceil(N / B)` batches and its last batch is completed by wrapping around to the start of the same epoch's
  order (row `j` of the epoch is `perm_e[j % N]`), so every record is seen each epoch, a few twice, and N < B works.
  Either way no batch straddles two epochs, so every batch has one epoch number: `epoch = step // steps_per_epoch`.
* The global batch of step `s` is rows `[j * B, (j + 1) * B)` of epoch `e`'s order, `e, j = divmod(s,
  steps_per_epoch)`. Process `p` of `P` reads and builds only rows `[p * B/P, (p + 1) * B/P)` of it (B % P == 0).
* `batch_fn(records, keys, epoch)` turns the host's records into a dict of numpy arrays with a leading batch axis.
  It must be row-wise (row `i` depends only on `records[i]`, `keys[i]`, `epoch`: fixed padding lengths, no
  batch-level statistics) and draw any randomness from `(seed, epoch, key)` only. Then the global batch of a step is
  the same for any process count (host batches concatenate to it) and for any starting step.

Stream order (`order='stream'`, for models that carry a memory from step to step, whose records are consecutive
pieces of one text stream): no shuffling; the records are cut into B contiguous streams of `S = N // B` records and
row `b` of the global batch of step `s` is record `b * S + (s mod S)`, so row `b` at step `s + 1` continues row `b`
at step `s` (the classic language-model `batchify`); the last `N % B` records are never read, `steps_per_epoch = S` and N >= B
is required. With `stream_groups=G` (B % G == 0) the records are first cut into G equal contiguous groups of
`M = N // G` records (e.g. forward and backward copies of a corpus) and the batch into G equal blocks of rows: row
`g * (B/G) + c` is record `g * M + c * S + (s mod S)` with `S = M // (B/G)`. Processes read their rows as above.

The iterator state is therefore just the step number: resuming with `iterate(start_step=s)` reproduces exactly the
batches `s, s + 1, ...` of an uninterrupted run, so a checkpoint only needs the step.
"""
from __future__ import annotations

from typing import Any, Callable, Iterator, Mapping, Sequence

import grain
import numpy as np
from grain.experimental import index_shuffle

BatchFn = Callable[[list, np.ndarray, int], Mapping[str, np.ndarray]]

_SHUFFLE_ROUNDS = 4
_FOREVER = 2 ** 62  # the last step of an endless iteration


def epoch_seed(seed: int, epoch: int) -> int:
  """The 32-bit permutation key of one epoch; distinct epochs (and seeds) get unrelated keys."""
  return int(np.random.SeedSequence([int(seed), int(epoch), 0x5EED]).generate_state(1, dtype=np.uint32)[0])


class StepLoader:
  """Builds the host's share of the global batch of any step (see the module docstring for the exact contract).

  `source` is any random-access source of records (`__len__`, `__getitem__`, optionally `__getitems__`), e.g. a
  `common.data.shards.ShardReader`. `iterate` runs the batch building in grain (`num_threads` threads,
  `prefetch` batches ahead).
  """

  def __init__(self, source: Any, batch_fn: BatchFn, global_batch_size: int, *, seed: int, process_index: int = 0,
               process_count: int = 1, shuffle: bool = True, prefetch: int = 2, drop_remainder: bool | None = None,
               order: str | None = None, stream_groups: int = 1, num_threads: int = 1):
    """`order`: None (the default: 'shuffled' if `shuffle` else 'sequential', the epoch contract above) or
    'stream' (stream order; `shuffle` and `drop_remainder` are then ignored); `stream_groups`: see the module
    docstring (stream order only)."""
    self.source = source
    self.batch_fn = batch_fn
    self.global_batch_size = int(global_batch_size)
    self.seed = int(seed)
    self.process_index = int(process_index)
    self.process_count = int(process_count)
    self.shuffle = bool(shuffle)
    self.drop_remainder = self.shuffle if drop_remainder is None else bool(drop_remainder)
    self.prefetch = max(1, int(prefetch))
    self.num_threads = max(1, int(num_threads))
    self.num_records = len(source)
    if self.global_batch_size <= 0:
      raise ValueError(f'global_batch_size must be positive, got {self.global_batch_size}')
    if self.process_count <= 0 or not 0 <= self.process_index < self.process_count:
      raise ValueError(f'process_index={self.process_index} is not in [0, process_count={self.process_count})')
    if self.global_batch_size % self.process_count:
      raise ValueError(f'global_batch_size={self.global_batch_size} is not divisible by process_count='
                       f'{self.process_count}: every process must get the same number of rows')
    self.host_batch_size = self.global_batch_size // self.process_count
    self.order = order if order is not None else ('shuffled' if self.shuffle else 'sequential')
    if self.order not in ('shuffled', 'sequential', 'stream'):
      raise ValueError(f"order must be None, 'shuffled', 'sequential' or 'stream', got {order!r}")
    self.stream_groups = int(stream_groups)
    if self.order != 'stream' and (self.num_records == 0 or (self.drop_remainder and
                                                             self.num_records < self.global_batch_size)):
      raise ValueError(f'the source has {self.num_records} records, fewer than one global batch of '
                       f'{self.global_batch_size} (drop_remainder={self.drop_remainder})')
    if self.order == 'stream':
      self._init_streams()
    elif self.stream_groups != 1:
      raise ValueError(f"stream_groups={self.stream_groups} needs order='stream'")
    elif self.drop_remainder:
      self.steps_per_epoch = self.num_records // self.global_batch_size
    else:
      self.steps_per_epoch = -(-self.num_records // self.global_batch_size)

  def _init_streams(self) -> None:
    """Stream order: B streams of `steps_per_epoch` consecutive records (in `stream_groups` groups)."""
    groups = self.stream_groups
    if groups <= 0 or self.global_batch_size % groups:
      raise ValueError(f'global_batch_size={self.global_batch_size} is not divisible by stream_groups={groups}')
    self.shuffle, self.drop_remainder = False, True
    self._rows_per_group = self.global_batch_size // groups
    self._group_records = self.num_records // groups
    self.steps_per_epoch = self._group_records // self._rows_per_group
    if self.steps_per_epoch == 0:
      raise ValueError(f'the source has {self.num_records} records, fewer than one per stream: '
                       f'{self.global_batch_size} streams in {groups} group(s) need at least '
                       f'{self.global_batch_size} records')

  def epoch_of(self, step: int) -> int:
    return int(step) // self.steps_per_epoch

  def locate(self, step: int, rows: slice | None = None) -> tuple[int, int, slice]:
    """(epoch, batch within the epoch, rows) of `step`'s global batch; `rows` defaults to this host's."""
    if step < 0:
      raise ValueError(f'step must be >= 0, got {step}')
    epoch, batch_in_epoch = divmod(int(step), self.steps_per_epoch)
    if rows is None:
      rows = slice(self.process_index * self.host_batch_size, (self.process_index + 1) * self.host_batch_size)
    return epoch, batch_in_epoch, rows

  def record_ids(self, step: int, rows: slice | None = None) -> np.ndarray:
    """Global record ids `[rows]` of the global batch of `step` (default: this host's rows). `[n] int64`."""
    epoch, batch_in_epoch, rows = self.locate(step, rows)
    start, stop, _ = rows.indices(self.global_batch_size)
    if self.order == 'stream':
      group, column = np.divmod(np.arange(start, stop, dtype=np.int64), self._rows_per_group)
      return group * self._group_records + column * self.steps_per_epoch + batch_in_epoch
    first = batch_in_epoch * self.global_batch_size
    positions = np.arange(first + start, first + stop, dtype=np.int64) % self.num_records
    if not self.shuffle:
      return positions
    key = epoch_seed(self.seed, epoch)
    last = self.num_records - 1
    shuffled = [index_shuffle(i, max_index=last, seed=key, rounds=_SHUFFLE_ROUNDS) for i in positions.tolist()]
    return np.asarray(shuffled, dtype=np.int64)

  def host_batch(self, step: int) -> dict[str, np.ndarray]:
    """This process's rows of the global batch of `step`: `batch_fn` output, leading axis `host_batch_size`."""
    keys = self.record_ids(step)
    if hasattr(self.source, '__getitems__'):
      records = list(self.source.__getitems__(keys.tolist()))
    else:
      records = [self.source[int(k)] for k in keys]
    return dict(self.batch_fn(records, keys, self.epoch_of(step)))

  def global_batch(self, step: int) -> dict[str, np.ndarray]:
    """The whole global batch of `step` built in this process (tests, debugging)."""
    keys = self.record_ids(step, slice(None))
    records = [self.source[int(k)] for k in keys]
    return dict(self.batch_fn(records, keys, self.epoch_of(step)))

  def iterate(self, start_step: int = 0, num_steps: int | None = None) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    """Yields `(step, host_batch)` from `start_step` on (forever, or `num_steps` batches), in step order.

    A grain pipeline over the step numbers builds up to `prefetch` batches ahead on `num_threads` threads; since a
    batch is a pure function of its step, any number of threads gives the same batches. Closing the generator
    stops them.
    """
    end = _FOREVER if num_steps is None else int(start_step) + int(num_steps)
    steps = grain.MapDataset.range(int(start_step), end).map(lambda step: (step, self.host_batch(step)))
    yield from steps.to_iter_dataset(grain.ReadOptions(num_threads=self.num_threads,
                                                       prefetch_buffer_size=self.prefetch))


def stack_rows(rows: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
  """Stacks same-shaped per-row dicts into a batch dict: `{name: [len(rows), ...]}`."""
  return {name: np.stack([row[name] for row in rows]) for name in rows[0]}
