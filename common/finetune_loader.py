"""Fine-tuning data: a task's examples (`load_examples`) -> the model's features (`convert`) -> the step-indexed,
length-bucketed loader of their rows (`TaskLoader`)."""
from __future__ import annotations

import collections
import threading
from typing import Callable, Iterable, Mapping, Sequence

import jax
import ml_collections
import numpy as np
from absl import logging as absl_logging

from common import finetune_packing, task_kinds, tasks
from common.config import UserError
from common.data import pipeline


class FeatureSource:
  """Random access to the rows of a feature dict (`{name: [N, ...]}`): `source[i] -> {name: [...]}`."""

  def __init__(self, features: Mapping[str, np.ndarray]):
    self.features = dict(features)
    self.size = len(next(iter(self.features.values())))

  def __len__(self) -> int:
    return self.size

  def __getitem__(self, index: int) -> dict:
    return {k: v[index] for k, v in self.features.items()}


def batch_features(kind: str | task_kinds.TaskKind, features: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Only what the model and the loss read (drops bookkeeping such as word_index)."""
  return {k: features[k] for k in task_kinds.MODEL_INPUTS + task_kinds.get(kind).label_fields}


INDEX_FIELDS = ('start_position', 'end_position', 'cls_index')  # Positions: valid only under right trimming.


def bucket_lengths(max_seq_length: int, count: int) -> list[int]:
  """`count` sequence lengths up to `max_seq_length`: `max_seq_length * i / count` for i = 1..count rounded up to a
  multiple of 8 (at most `max_seq_length`, duplicates dropped); `count` <= 1: `[max_seq_length]`."""
  if count <= 1:
    return [int(max_seq_length)]
  length = int(max_seq_length)
  return sorted({min(length, -(-length * i // (8 * count)) * 8) for i in range(1, count + 1)} | {length})


def fold_lengths(lengths: Sequence[int], min_batches: int) -> dict[int, int]:
  """{length: the length it is computed at} for batches whose bucket lengths are `lengths` (one per batch): a length
  fewer than `min_batches` batches use is folded into the next longer one in use (its counts added there, so
  several rare lengths can fold into one), saving a compiled program at the cost of a few longer batches; the
  longest length in use stays. `min_batches` <= 1 folds nothing."""
  counts = collections.Counter(int(n) for n in lengths)
  used = sorted(counts)
  folded, carried = {}, []
  for i, length in enumerate(used):
    carried.append(length)
    if i + 1 < len(used) and sum(counts[n] for n in carried) < min_batches:
      continue
    folded.update({n: length for n in carried})
    carried = []
  return folded


def padding_side(features: Mapping[str, np.ndarray]) -> tuple[str, np.ndarray]:
  """('right' or 'left', the length each example needs `[N]`): the columns a row cannot lose, counted from the
  side its real tokens start at (BERT pads right, XLNet's classification rows pad left). A multiple-choice example
  needs its longest choice. Rows with index fields (SQuAD) are always trimmed on the right."""
  mask = np.asarray(features['input_mask']) > 0
  length = mask.shape[-1]
  any_real = mask.any(-1)
  last = np.where(any_real, length - np.argmax(mask[..., ::-1], -1), 1)  # right trimming keeps [:last]
  first = np.where(any_real, np.argmax(mask, -1), length - 1)            # left trimming keeps [first:]
  right, left = last, length - first
  if right.ndim > 1:  # [N, C] choices -> the example's longest
    right, left = right.max(-1), left.max(-1)
  if any(k in features for k in INDEX_FIELDS) or right.sum() <= left.sum():
    return 'right', right.astype(np.int64)
  return 'left', left.astype(np.int64)


_TABLE_CACHE_IDS = 1 << 22  # record ids (8 bytes each) of cached epoch tables beyond the last three epochs


class TaskLoader(pipeline.StepLoader):
  """The shuffled, step-indexed loader of a task's feature rows (wrapping around when fewer rows than a batch),
  padded per batch: the global batch of step s is cut to the smallest of `buckets` that holds its longest example
  (every array shaped like `input_ids` is cut on its last axis, on the padding side, see `padding_side`), so the
  train step sees at most `len(buckets)` shapes and compiles at most that many programs. The length is a function
  of the global batch's rows, i.e. of (seed, s), like the rows themselves: every process cuts the same, a resumed
  run sees the same shapes, and gradient accumulation splits rows of one length. Cutting padding changes no
  result beyond float rounding (padding is masked; XLNet's relative positions are offsets between real tokens).

  `group` > 1 (`config.group_by_length`): within each window of `group` consecutive batches of an epoch, the rows
  are sorted by length before they are cut into batches, and the window's batches are shuffled, so a batch holds
  rows of similar length (far less padding; batches are then less random, as with HF's `group_by_length`). Every
  epoch still takes each row once, in a (seed, epoch)-determined order. Default 0: the plain shuffled order.

  `stop()` (optional) ends the iteration at the next batch when it returns True (a preemption notice that arrived
  outside the trainer's loop; the trainer then checkpoints the step reached).
  """

  def __init__(self, features: Mapping[str, np.ndarray], global_batch_size: int, seed: int,
               buckets: Sequence[int] | None = None, stop: Callable[[], bool] | None = None, group: int = 0):
    super().__init__(FeatureSource(features), lambda records, keys, epoch: pipeline.stack_rows(records),
                     global_batch_size, seed=seed, shuffle=True, drop_remainder=False,
                     process_index=jax.process_index(), process_count=jax.process_count())
    self.shape = tuple(np.shape(features['input_ids']))
    self.seq_len = self.shape[-1]
    self.side, self._need = padding_side(features)
    self.buckets = sorted({int(b) for b in (buckets or ()) if 0 < int(b) < self.seq_len} | {self.seq_len})
    if self.side == 'left' and any(k in features for k in INDEX_FIELDS):
      self.buckets = [self.seq_len]
    self._real = np.asarray(features['input_mask']).reshape(len(self._need), -1).astype(bool).sum(-1)
    self.stop = stop
    self.started_at = 0
    self.group = int(group)
    self._tables: dict[int, np.ndarray] = {}
    self._lock = threading.Lock()

  def _epoch_table(self, epoch: int) -> np.ndarray:
    """Global record ids `[steps_per_epoch, global_batch]` of `epoch` (recent epochs are cached, the last three and
    as many more as fit in `_TABLE_CACHE_IDS` ids: the length and token counts of a step read them too, and a run's
    throughput summary reads every step again after training)."""
    with self._lock:
      table = self._tables.get(epoch)
    if table is not None:
      return table
    first = epoch * self.steps_per_epoch
    table = np.stack([pipeline.StepLoader.record_ids(self, first + i, slice(None))
                      for i in range(self.steps_per_epoch)])
    if self.group > 1:
      rng = np.random.default_rng([self.seed, epoch, 0x6B75])
      for start in range(0, len(table), self.group):
        block = table[start:start + self.group]
        flat = block.reshape(-1)
        ordered = flat[np.argsort(self._need[flat], kind='stable')].reshape(block.shape)
        table[start:start + self.group] = ordered[rng.permutation(len(block))]
    with self._lock:
      self._tables[epoch] = table
      for old in sorted(self._tables)[:-3]:
        if sum(t.size for t in self._tables.values()) <= _TABLE_CACHE_IDS:
          break
        del self._tables[old]
    return table

  def record_ids(self, step: int, rows: slice | None = None) -> np.ndarray:
    epoch, batch_in_epoch, rows = self.locate(step, rows)
    return self._epoch_table(epoch)[batch_in_epoch, rows]

  def length(self, step: int) -> int:
    """The padded length of step `step`'s global batch."""
    need = int(self.example_lengths(step).max())
    return next(b for b in self.buckets if b >= need)

  def example_lengths(self, step: int, ids: np.ndarray | None = None) -> np.ndarray:
    """The positions each example of step `step`'s global batch (or of the record `ids`) needs (`padding_side`)."""
    return self._need[self.record_ids(step, slice(None)) if ids is None else ids]

  def real_tokens(self, step: int) -> int:
    """Non-padding tokens in step `step`'s global batch (every choice of a multiple-choice example)."""
    return int(self._real[self.record_ids(step, slice(None))].sum())

  def computed_rows(self, step: int) -> int:
    """Sequences the step computes (B * C for B examples of C choices; fewer when packed)."""
    del step
    return self.global_batch_size * self.tokens_per_row() // self.seq_len

  def tokens_per_row(self) -> int:
    """Positions of one example at full length (C * L for C choices)."""
    return int(np.prod(self.shape[1:]))

  def host_batch(self, step: int) -> dict[str, np.ndarray]:
    batch = super().host_batch(step)
    length = self.length(step)
    if length == self.seq_len:
      return batch
    cut = slice(None, length) if self.side == 'right' else slice(self.seq_len - length, None)
    return {k: (np.ascontiguousarray(v[..., cut]) if tuple(np.shape(v)[1:]) == self.shape[1:] else v)
            for k, v in batch.items()}

  def iterate(self, start_step: int = 0, num_steps: int | None = None):
    self.started_at = int(start_step)
    batches = super().iterate(start_step, num_steps)
    try:
      for item in batches:
        if self.stop is not None and self.stop():
          return
        yield item
    finally:
      batches.close()

  def fold_buckets(self, steps: int, min_batches: int) -> None:
    """Keeps only the bucket lengths that steps 0 .. `steps` - 1 compute at after `fold_lengths`: a length fewer
    than `min_batches` of them would use is computed at the next longer one in use (one compiled program less).
    A function of the run's steps, like the lengths themselves: a resumed run folds the same."""
    if min_batches > 1 and len(self.buckets) > 1:
      kept = set(fold_lengths([self.length(s) for s in range(steps)], min_batches).values())
      self.buckets = sorted(kept | {self.seq_len})


class PackedTaskLoader(finetune_packing.PackingMixin, TaskLoader):
  """A `TaskLoader` whose steps come packed (`common.finetune_packing`): the same examples per step, laid end to
  end in `num_rows` rows of the features' full length."""


def make_loader(features: Mapping[str, np.ndarray], global_batch_size: int, seed: int,
                buckets: Sequence[int] | None = None, stop: Callable[[], bool] | None = None,
                group: int = 0, steps: int = 0, min_bucket_batches: int = 0, pack: bool = False,
                row_multiple: int = 1) -> TaskLoader:
  """A `TaskLoader` over the feature rows; without `buckets` every batch keeps the features' full length. With
  `steps` and `min_bucket_batches`, the buckets those steps use are folded (`TaskLoader.fold_buckets`). With
  `pack` (right-padded rows, `steps` > 0): a `PackedTaskLoader` whose row count is the most any of those steps
  needs, rounded up to a multiple of `row_multiple` (the devices the batch is split over; buckets unused)."""
  loader = (PackedTaskLoader if pack else TaskLoader)(features, global_batch_size, seed, buckets, stop, group)
  if pack:
    if steps <= 0 or loader.side != 'right' or len(loader.shape) != 2:
      raise ValueError('packing needs the run\'s steps and right-padded single-sequence rows')
    loader.buckets = [loader.seq_len]
    loader.num_rows = finetune_packing.rows_for_steps(loader.example_lengths, steps, loader.seq_len, row_multiple)
  elif steps:
    loader.fold_buckets(steps, min_bucket_batches)
  return loader


def min_bucket_batches(config: ml_collections.ConfigDict) -> int:
  """`config.min_bucket_batches` (0 or 1: no folding); a negative or non-integer value is refused."""
  value = config.get('min_bucket_batches', 0)
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
    raise UserError(f'config.min_bucket_batches: must be an integer >= 0 (0 = keep every bucket), got {value!r}')
  return int(value)


def packing(config: ml_collections.ConfigDict, adapter, kind: str | task_kinds.TaskKind) -> bool:
  """Whether the run trains on packed rows: `config.pack_examples` (a bool, else a UserError) and it applies (see
  `finetune_config`); where it does not, one log line says why."""
  value = config.get('pack_examples', False)
  if not isinstance(value, (bool, np.bool_)):
    raise UserError(f'config.pack_examples: must be true or false, got {value!r}')
  if not value:
    return False
  name = task_kinds.get(kind).name
  if not getattr(adapter, 'packs', False):
    why = 'the model\'s heads do not read packed rows'
  elif name not in finetune_packing.PACKED_KINDS:
    why = f'{name} is not one of {finetune_packing.PACKED_KINDS}'
  elif int(config.get('grad_accum_steps', 1)) != 1:
    why = 'gradient accumulation splits rows'
  elif jax.process_count() > 1:
    why = 'several processes'
  else:
    return True
  absl_logging.info('config.pack_examples: not packing (%s)', why)
  return False


def computed_positions(loader: TaskLoader, steps: Iterable[int]) -> int:
  """Positions (padding included) that `loader`'s `steps` compute."""
  return sum(loader.computed_rows(s) * loader.length(s) for s in steps)


def batch_shards(config: ml_collections.ConfigDict) -> int:
  """How many ways the trainer splits a batch's rows: the mesh's data x fsdp size (`config.mesh`)."""
  from common import sharding  # pylint: disable=import-outside-toplevel
  data, fsdp, _ = sharding.resolve_mesh_shape(config.mesh, len(sharding.mesh_devices(config.mesh)))
  return data * fsdp


def example_limit(config: ml_collections.ConfigDict, split: str) -> int:
  """`config.num_train_examples` (split 'train') or `num_eval_examples` (any other split); 0 = all. A negative or
  non-integer value is refused."""
  field = 'num_train_examples' if split == 'train' else 'num_eval_examples'
  value = config.get(field, 0)
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
    raise UserError(f'config.{field}: must be an integer >= 0 (0 = every example), got {value!r}')
  return int(value)


def load_examples(task: str, split: str, data_dir: str | None, config: ml_collections.ConfigDict) -> list:
  """Examples of `task`'s split: generated (`learnable`), read from `data_dir` (`hf:PATH`: a saved HF DatasetDict),
  else from TFDS; the first `example_limit(config, split)` of them when that is not 0 (for every task: a question of
  SQuAD, a sentence of CoNLL, an article's question of RACE counts as one example, whatever the windows or choices
  it becomes)."""
  limit = example_limit(config, split)
  info = tasks.task_info(tasks.registry_name(task))
  if info.generate is not None:
    return info.generate(split, limit, config)
  name = tasks.registry_name(task)
  if data_dir and data_dir.startswith('hf:'):  # A DatasetDict saved by HF datasets (GLUE tasks).
    from common.data import hf_datasets  # pylint: disable=import-outside-toplevel
    examples = hf_datasets.read_task(name, data_dir, split)
  else:
    examples = tasks.read_task(name, data_dir, split) if data_dir else tasks.tfds_task(name, split)
  if limit and len(examples) > limit:
    absl_logging.info('%s %s: the first %d of %d examples (config.num_%s_examples)', task, split, limit,
                      len(examples), 'train' if split == 'train' else 'eval')
    examples = list(examples)[:limit]
  return examples


def load_train_and_eval(task: str, data_dir: str | None, config: ml_collections.ConfigDict) -> tuple[list, list]:
  """`task`'s train and dev examples (`load_examples`); a task without a dev split is evaluated on its training
  examples, with a warning. No usable training example is a one-line UserError."""
  train_examples = load_examples(task, 'train', data_dir, config)
  if not train_examples:
    raise UserError(f'{task}: no usable training examples (every row was missing or skipped as bad; see the log)')
  try:
    return train_examples, load_examples(task, 'dev', data_dir, config)
  except (FileNotFoundError, ValueError) as error:
    absl_logging.warning('%s: no dev split (%s); the metrics below are on the TRAINING examples', task, error)
    return train_examples, train_examples


def convert(adapter, task: str, kind: str | task_kinds.TaskKind, examples, tokenizer,
            config: ml_collections.ConfigDict, is_training: bool) -> tuple[dict, list | None]:
  """(features, windows) of `examples` by the model's converter (`adapter.convert`); windows None but for SQuAD."""
  kind = task_kinds.get(kind)
  out = adapter.convert(tasks.registry_name(task), examples, tokenizer, config.max_seq_length,
                        **kind.feature_options(config, is_training))
  return out if kind.windows else (out, None)
