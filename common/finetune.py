"""Fine-tuning tasks as trainer objectives, model-agnostic: features -> loader -> `common.trainer.train` ->
predictions -> official metrics (`common.task_metrics`). No second training loop.

A model plugs in through `ModelAdapter` (its heads, its feature converter, its encoder's parameter path); the heads
share one calling convention, `head.apply(variables, input_ids, segment_ids, input_mask, p_mask, deterministic=...)`
returning float32 logits (see `bert_jax/heads.py`); the beam head also takes `cls_index` and, for its training
outputs, `start_position`, and returns a dict (`head_inputs`, `common.squad_beam`). What the models' heads, feature
converters and entry points have in common lives here too (`head_width` ... `span_logits`, `pair_features` ...
`convert_by_kind`, `load_init_dir`, `main`). Task kinds and their losses, each a sum over the global batch divided
by a global normaliser (so gradient accumulation is exact):

  classification   label [B] int32 (-1: none)       cross-entropy, mean over labelled rows; accuracy
  regression       label [B] float32 (NaN: none)    squared error, mean over labelled rows
  token            label, label_weights [B, L]      cross-entropy weighted by label_weights, mean over their sum
  multiple_choice  label [B] int32                  cross-entropy over the choices' scores; accuracy
  squad            start/end_position [B] int32     (start CE + end CE) / 2, mean over rows
  squad_beam       + is_impossible, cls_index [B]   (start CE + end CE) / 2 + 0.5 BCE(answerability), mean over
                                                    rows (XLNet's beam-search heads, `common.squad_beam`)

`task_kind(task)` maps a task name (`common.data.tasks` names plus `learnable`) to its kind; a SQuAD task trains
the kind of `config.squad_head` ('simple' -> squad, 'beam' -> squad_beam; '' the model's default, the first of
`ModelAdapter.squad_heads`), see `objective_kind`. The squad kinds write `predictions.json` (the answer per
question), `nbest_predictions.json` and `null_odds.json` (the no-answer score per question) for every seed.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import shutil
import signal
import sys
import threading
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging as absl_logging
from flax import linen as nn

from common import checkpoint, optim, squad_beam, task_metrics, trainer
from common.config import UserError
from common.data import pipeline, tasks

LEARNABLE = 'learnable'
KIND_OF = {'classification': 'classification', 'regression': 'regression', 'token_classification': 'token',
           'multiple_choice': 'multiple_choice', 'squad': 'squad'}
MODEL_INPUTS = ('input_ids', 'segment_ids', 'input_mask')
LABEL_FIELDS = {'classification': ('label',), 'regression': ('label',), 'token': ('label', 'label_weights'),
                'multiple_choice': ('label',), 'squad': ('p_mask', 'start_position', 'end_position'),
                'squad_beam': ('p_mask', 'cls_index', 'start_position', 'end_position', 'is_impossible')}
SQUAD_KINDS = ('squad', 'squad_beam')
SQUAD_HEADS = {'simple': 'squad', 'beam': 'squad_beam'}  # config.squad_head -> objective kind


# ----------------------------------------------------------------------------------------------------------------
# Config.
# ----------------------------------------------------------------------------------------------------------------

def finetune_config(**overrides) -> ml_collections.ConfigDict:
  """The trainer config plus the fine-tuning fields.

  learning_rate, warmup_proportion (of the total steps), epochs, global_batch_size, max_seq_length, layer_decay,
  seeds (a tuple: one run per seed, metrics reported as mean ± std; empty: the one run of `seed`; on the command
  line `--config.seeds=0,1,2` or `'[0,1,2]'`), doc_stride / max_query_length / max_answer_length /
  n_best_size (SQuAD), squad_head ('simple', 'beam' or '' for the model's default) with start_n_top / end_n_top
  (the beam's widths), eval_batch_size, num_train_examples / num_eval_examples (the first N examples of the train /
  dev split, every task; 0 = all, `learnable` generates 2000 / 400), learnable_max_words, length_buckets (pad each
  batch to the smallest of this many lengths, multiples of 8 up to max_seq_length, that fits its longest row; 1 =
  every row padded to max_seq_length; see `TaskLoader`), group_by_length (K > 1: batches of rows of similar length,
  sorted within windows of K batches; 0 = plain shuffle), dtype, remat, dropout (>= 0 replaces the model's dropout
  rates). eval_every (N > 0: evaluate the dev split with the task's metrics every N steps and at the end), with
  select_best (report, and write the predictions and parameters of, the evaluation with the best `best_metric`;
  '' = the task's main metric, see `main_metric`).
  """
  config = trainer.trainer_config(global_batch_size=32, log_every=50, eval_every=0, num_eval_batches=0,
                                  checkpoint_every=0, keep_checkpoints=1, progress_bar=False)
  config.optim = optim.optim_config(learning_rate=2e-5, warmup_steps=0, weight_decay=0.01, clip_grad_norm=1.0)
  config.update(dict(
      learning_rate=2e-5, warmup_proportion=0.1, epochs=3.0, max_seq_length=128, layer_decay=1.0, seeds=(),
      doc_stride=128, max_query_length=64, max_answer_length=30, n_best_size=20, squad_head='', start_n_top=5,
      end_n_top=5, eval_batch_size=64,
      num_train_examples=0, num_eval_examples=0, learnable_max_words=24, length_buckets=4, group_by_length=0,
      select_best=True, best_metric='',
      dtype='float32',
      remat=False, dropout=-1.0,
  ))
  config.update(overrides)
  return config


def run_seeds(config: ml_collections.ConfigDict) -> list[int]:
  """The seeds to run: `config.seeds` (a tuple, list or one int), or `[config.seed]` when it is empty."""
  seeds = config.get('seeds', ())
  if seeds is None or (isinstance(seeds, str) and not seeds.strip()):
    seeds = ()
  if isinstance(seeds, (int, np.integer)):
    seeds = (seeds,)
  seeds = [int(s) for s in seeds]
  if len(set(seeds)) != len(seeds):
    raise UserError(f'config.seeds: {seeds} repeats a seed (each seed trains in its own seed_<s>/ directory)')
  return seeds or [int(config.get('seed', 0))]


def task_names() -> list[str]:
  """Every task as `--task` spells it: glue/<name>, squad/v1.1, race/high, conll2003, learnable, ..."""
  names = [LEARNABLE]
  for name in tasks.TASKS:
    for prefix in ('squad', 'race'):
      if name.startswith(prefix + '_'):
        names.append(f'{prefix}/{name[len(prefix) + 1:]}')
        break
    else:
      names.append(name if name in ('conll2003', 'swag', 'race') else f'glue/{name}')
  return sorted(names)


def check_task(task: str) -> str:
  """`task` if it names a task; else a one-line UserError listing the spellings `--task` accepts."""
  if task == LEARNABLE:
    return task
  try:
    tasks.canonical_task(_registry_name(task))
  except ValueError:
    import difflib  # pylint: disable=import-outside-toplevel
    close = difflib.get_close_matches(task, task_names(), n=1)
    raise UserError(f'unknown task {task!r}{f" (did you mean {close[0]!r}?)" if close else ""}; known tasks: '
                    f'{", ".join(task_names())}') from None
  return task


def task_kind(task: str) -> str:
  if check_task(task) == LEARNABLE:
    return 'classification'
  return KIND_OF[tasks.task_info(_registry_name(task)).kind]


def _registry_name(task: str) -> str:
  return task.split('/', 1)[1] if task.startswith('glue/') else task


def num_labels(task: str) -> int:
  if task == LEARNABLE:
    return 2
  return max(tasks.task_info(_registry_name(task)).num_labels, 1)


# ----------------------------------------------------------------------------------------------------------------
# The objective.
# ----------------------------------------------------------------------------------------------------------------

def task_sums(kind: str, logits: jax.Array, batch: Mapping[str, jax.Array]) -> dict:
  """Scalar sums over the batch: `loss` (summed per-row or per-token loss), `correct` (where defined)."""
  if kind in ('classification', 'multiple_choice'):
    labels = batch['label']
    valid = (labels >= 0).astype(jnp.float32)
    safe = jnp.maximum(labels, 0)
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, safe)
    correct = (jnp.argmax(logits, -1) == safe).astype(jnp.float32)
    return dict(loss=jnp.sum(nll * valid), correct=jnp.sum(correct * valid))
  if kind == 'regression':
    labels = batch['label']
    valid = ~jnp.isnan(labels)
    err = jnp.where(valid, logits - jnp.where(valid, labels, 0.0), 0.0)
    return dict(loss=jnp.sum(err * err))
  if kind == 'token':
    weights = batch['label_weights'].astype(jnp.float32)
    safe = jnp.maximum(batch['label'], 0)
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, safe)
    correct = (jnp.argmax(logits, -1) == safe).astype(jnp.float32)
    return dict(loss=jnp.sum(nll * weights), correct=jnp.sum(correct * weights))
  if kind == 'squad':
    start = optax.softmax_cross_entropy_with_integer_labels(logits[:, 0], batch['start_position'])
    end = optax.softmax_cross_entropy_with_integer_labels(logits[:, 1], batch['end_position'])
    return dict(loss=jnp.sum(start + end) / 2.0)
  if kind == 'squad_beam':
    return squad_beam.loss_sums(logits, batch)
  raise ValueError(f'unknown task kind {kind!r}')


def task_normalizers(kind: str, batch: Mapping[str, jax.Array]) -> dict:
  if kind in ('classification', 'multiple_choice'):
    count = jnp.sum((batch['label'] >= 0).astype(jnp.float32))
  elif kind == 'regression':
    count = jnp.sum((~jnp.isnan(batch['label'])).astype(jnp.float32))
  elif kind == 'token':
    count = jnp.sum(batch['label_weights'].astype(jnp.float32))
  else:
    count = jnp.asarray(batch['input_ids'].shape[0], jnp.float32)
  return {'rows': jnp.maximum(count, 1.0)}


def head_inputs(kind: str, batch: Mapping[str, Any], *, targets: bool) -> dict:
  """The keyword inputs of `kind`'s head beyond the common four: the beam head reads `cls_index`, and with
  `targets` (the loss) the gold `start_position`."""
  if kind != 'squad_beam':
    return {}
  out = {'cls_index': batch['cls_index']}
  if targets:
    out['start_position'] = batch['start_position']
  return out


def apply_head(head, params, batch, *, deterministic: bool, rng=None, kind: str = 'classification',
               targets: bool = False):
  """`head`'s outputs on `batch` (see `head_inputs` for `kind` and `targets`)."""
  return head.apply({'params': params}, batch['input_ids'], batch['segment_ids'], batch['input_mask'],
                    batch.get('p_mask'), deterministic=deterministic,
                    rngs=None if rng is None else {'dropout': rng}, **head_inputs(kind, batch, targets=targets))


def make_objective(head, kind: str, template: Mapping[str, np.ndarray], flops_per_example: float,
                   seq_len: int) -> trainer.Objective:
  """The trainer objective of `head` (a model from a `ModelAdapter`) on batches shaped like `template` rows."""

  def init_variables(rng):
    dummy = {k: jnp.zeros((1, *np.shape(v)[1:]), np.asarray(v).dtype) for k, v in template.items()}
    return head.init({'params': rng}, dummy['input_ids'], dummy['segment_ids'], dummy['input_mask'],
                     dummy.get('p_mask'), **head_inputs(kind, dummy, targets=True))

  def loss_fn(params, batch, rng, aux, norms, train):
    logits = apply_head(head, params, batch, deterministic=not train, rng=rng, kind=kind, targets=True)
    sums = task_sums(kind, logits, batch)
    return sums['loss'] / norms['rows'], (sums, aux)

  def finalize(sums, norms):
    out = {'task_loss': sums['loss'] / norms['rows']}
    if 'correct' in sums:
      out['accuracy'] = sums['correct'] / norms['rows']
    return out

  return trainer.Objective(init_variables=init_variables, loss_fn=loss_fn,
                           normalizers=lambda batch: task_normalizers(kind, batch), finalize=finalize,
                           flops_per_example=flops_per_example, tokens_per_example=seq_len)


# ----------------------------------------------------------------------------------------------------------------
# The models' task layers: what BERT's and XLNet's heads share.
# ----------------------------------------------------------------------------------------------------------------

HEAD_KINDS = ('classification', 'regression', 'token', 'multiple_choice', 'squad')
POOLED_KINDS = ('classification', 'regression', 'multiple_choice')  # Read one vector per sequence.


def check_head_kind(kind: str, kinds: Sequence[str] = HEAD_KINDS) -> None:
  if kind not in kinds:
    raise ValueError(f'kind must be one of {tuple(kinds)}, got {kind!r}')


def head_width(kind: str, num_labels: int) -> int:
  """Outputs of the task layer's dense: K labels (classification, token), 2 (squad: start, end) or 1 score."""
  return {'classification': num_labels, 'token': num_labels, 'squad': 2}.get(kind, 1)


def flatten_choices(kind: str, input_ids, segment_ids, input_mask) -> tuple:
  """Multiple choice `[B, C, L] -> [B * C, L]` (one row per choice); other kinds unchanged."""
  if kind != 'multiple_choice':
    return input_ids, segment_ids, input_mask
  return tuple(x.reshape(-1, x.shape[-1]) for x in (input_ids, segment_ids, input_mask))


def pooled_logits(kind: str, logits: jax.Array, input_shape: Sequence[int]) -> jax.Array:
  """The dense's float32 output on pooled vectors -> classification `[B, K]`, regression `[B]`, multiple choice
  `[B, C]` (`input_shape`: the inputs' shape before `flatten_choices`)."""
  logits = logits.astype(jnp.float32)
  if kind == 'regression':
    return logits[:, 0]
  if kind == 'multiple_choice':
    return logits.reshape(input_shape[0], input_shape[1])
  return logits


def span_logits(logits: jax.Array, p_mask: jax.Array | None) -> jax.Array:
  """The simple span head: the dense's `[B, L, 2]` output -> float32 `[B, 2, L]` (start, end), positions with
  p_mask 1 at `squad_beam.NEG_INF`."""
  logits = jnp.swapaxes(logits.astype(jnp.float32), 1, 2)
  if p_mask is not None:
    logits = jnp.where(p_mask[:, None, :] > 0, squad_beam.NEG_INF, logits)
  return logits


# ----------------------------------------------------------------------------------------------------------------
# The models' feature converters: what does not depend on the sequence layout.
# ----------------------------------------------------------------------------------------------------------------
# A layout is `layout(tokenizer, ids_a, ids_b | None) -> (ids, segment ids)` without padding; a padder
# `pad(rows, max_seq_length, pad_id) -> {input_ids, segment_ids, input_mask}`.

def check_length(max_seq_length: int, minimum: int) -> None:
  if max_seq_length < minimum:
    raise ValueError(f'max_seq_length={max_seq_length} is too short (at least {minimum})')


def label_array(labels: Sequence, regression: bool | None) -> np.ndarray:
  """label `[N]`: int32 class indices (None -> -1), or float32 scores (None -> NaN) when regressing (default: when
  any label is a float)."""
  if regression is None:
    regression = any(isinstance(label, float) for label in labels)
  if regression:
    return np.array([np.nan if label is None else float(label) for label in labels], dtype=np.float32)
  return np.array([-1 if label is None else int(label) for label in labels], dtype=np.int32)


def pair_features(examples: Sequence, tokenizer, max_seq_length: int, layout: Callable, pad: Callable, *,
                  regression: bool | None = None) -> dict[str, np.ndarray]:
  """Single texts / text pairs (`tasks.PairExample`) -> the padded rows and `label` (see `label_array`). A pair is
  cut to L - 3 tokens with `truncate_seq_pair` (the longer side loses its last token first), a single text to
  L - 2."""
  check_length(max_seq_length, 3)
  ids_a = tokenizer.encode_batch([e.text_a for e in examples])
  pairs = [i for i, e in enumerate(examples) if e.text_b is not None]
  ids_b: list = [None] * len(examples)
  for i, ids in zip(pairs, tokenizer.encode_batch([examples[i].text_b for i in pairs])):
    ids_b[i] = ids
  rows = []
  for a, b in zip(ids_a, ids_b):
    a = list(a)
    if b is None:
      rows.append(layout(tokenizer, a[:max_seq_length - 2], None))
    else:
      b = list(b)
      tasks.truncate_seq_pair(a, b, max_seq_length - 3)
      rows.append(layout(tokenizer, a, b))
  features = pad(rows, max_seq_length, tokenizer.pad_id)
  features['label'] = label_array([e.label for e in examples], regression)
  return features


def _choice_row(tokenizer, layout, context: list[int], qa: list[int], max_seq_length: int,
                max_qa_length: int | None):
  context, qa = list(context), list(qa)
  if max_qa_length is None:
    tasks.truncate_seq_pair(context, qa, max_seq_length - 3)
  else:  # XLNet's run_race.py: keep the end of question+option, then as much context as fits.
    qa = qa[-max_qa_length:] if len(qa) > max_qa_length else qa
    qa = qa[-(max_seq_length - 3):] if len(qa) > max_seq_length - 3 else qa
    context = context[:max_seq_length - 3 - len(qa)]
  return layout(tokenizer, context, qa)


def choice_features(examples: Sequence, tokenizer, max_seq_length: int, layout: Callable, pad: Callable, *,
                    max_qa_length: int | None = None) -> dict[str, np.ndarray]:
  """Multiple-choice examples -> the padded rows `[N, C, L]` and label `[N]` int32 (-1: None).

  Choice c of an example is the pair (context, `join_question_ending(question, ending_c)`); every example must have
  the same number of endings C. `max_qa_length` selects RACE's truncation (keep the last `max_qa_length`
  question+ending tokens, then as much context as fits); None truncates the pair with `truncate_seq_pair` (SWAG).
  Truncating one choice never shortens the context of the next.
  """
  check_length(max_seq_length, 4)
  num_choices = {len(e.endings) for e in examples}
  if len(num_choices) > 1:
    raise ValueError(f'examples have different numbers of endings: {sorted(num_choices)}')
  c = num_choices.pop() if num_choices else 0
  contexts = tokenizer.encode_batch([e.context for e in examples])
  qas = tokenizer.encode_batch([tasks.join_question_ending(e.question, ending) for e in examples
                                for ending in e.endings])
  rows = [_choice_row(tokenizer, layout, contexts[i], qas[i * c + j], max_seq_length, max_qa_length)
          for i in range(len(examples)) for j in range(c)]
  features = {name: array.reshape(len(examples), c, max_seq_length)
              for name, array in pad(rows, max_seq_length, tokenizer.pad_id).items()}
  features['label'] = label_array([e.label for e in examples], regression=False)
  return features


def tagged_pieces(examples: Sequence, tokenizer, label_list: Sequence[str], budget: int
                  ) -> list[list[tuple[int, list[int]]]]:
  """Per tagged sentence (`tasks.TokenExample`), `(tag index, piece ids)` of each word whose first piece fits in
  `budget` tokens, in order; the last kept word may lose its final pieces. Each word is encoded on its own; one
  with no pieces becomes `tokenizer.unk_id`. A sentence whose words and tags differ in number, or a tag not in
  `label_list`, raises ValueError."""
  tag_index = {tag: i for i, tag in enumerate(label_list)}
  pieces = iter(tokenizer.encode_batch([word for e in examples for word in e.words]))
  out = []
  for example in examples:
    if len(example.words) != len(example.tags):
      raise ValueError(f'example {example.guid}: {len(example.words)} words but {len(example.tags)} tags')
    words, used = [], 0
    for tag in example.tags:
      word_ids = next(pieces) or [tokenizer.unk_id]
      if tag not in tag_index:
        raise ValueError(f'example {example.guid}: tag {tag!r} is not in label_list {list(label_list)}')
      if used >= budget:
        continue  # Consume the remaining words' pieces.
      kept = list(word_ids[:budget - used])
      words.append((tag_index[tag], kept))
      used += len(kept)
    out.append(words)
  return out


def convert_by_kind(task: str, examples: Sequence, tokenizer, max_seq_length: int, *, pair: Callable,
                    multiple_choice: Callable, token: Callable, squad: Callable, **kwargs):
  """A model's converter of `task`'s kind (`tasks.task_info(task).kind`) applied to `examples`; keyword arguments
  go to it (SQuAD returns `(features, windows)`, every other kind a features dict). RACE defaults to
  `max_qa_length=128`, tagging to the task's label list."""
  info = tasks.task_info(task)
  if info.kind in ('classification', 'regression'):
    return pair(examples, tokenizer, max_seq_length, regression=info.kind == 'regression', **kwargs)
  if info.kind == 'multiple_choice':
    if info.name.startswith('race'):
      kwargs.setdefault('max_qa_length', 128)
    return multiple_choice(examples, tokenizer, max_seq_length, **kwargs)
  if info.kind == 'token_classification':
    kwargs.setdefault('label_list', info.labels)
    return token(examples, tokenizer, max_seq_length, **kwargs)
  if info.kind == 'squad':
    return squad(examples, tokenizer, max_seq_length, **kwargs)
  raise AssertionError(info.kind)


# ----------------------------------------------------------------------------------------------------------------
# Data.
# ----------------------------------------------------------------------------------------------------------------

class FeatureSource:
  """Random access to the rows of a feature dict (`{name: [N, ...]}`): `source[i] -> {name: [...]}`."""

  def __init__(self, features: Mapping[str, np.ndarray]):
    self.features = dict(features)
    self.size = len(next(iter(self.features.values())))

  def __len__(self) -> int:
    return self.size

  def __getitem__(self, index: int) -> dict:
    return {k: v[index] for k, v in self.features.items()}


def batch_features(kind: str, features: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Only what the model and the loss read (drops bookkeeping such as word_index)."""
  return {k: features[k] for k in MODEL_INPUTS + LABEL_FIELDS[kind]}


INDEX_FIELDS = ('start_position', 'end_position', 'cls_index')  # Positions: valid only under right trimming.


def bucket_lengths(max_seq_length: int, count: int) -> list[int]:
  """`count` sequence lengths up to `max_seq_length`: `max_seq_length * i / count` for i = 1..count rounded up to a
  multiple of 8 (at most `max_seq_length`, duplicates dropped); `count` <= 1: `[max_seq_length]`."""
  if count <= 1:
    return [int(max_seq_length)]
  length = int(max_seq_length)
  return sorted({min(length, -(-length * i // (8 * count)) * 8) for i in range(1, count + 1)} | {length})


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
    """Global record ids `[steps_per_epoch, global_batch]` of `epoch` (the last few epochs are cached: the length
    and token counts of a step read them too)."""
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
        del self._tables[old]
    return table

  def record_ids(self, step: int, rows: slice | None = None) -> np.ndarray:
    epoch, batch_in_epoch, rows = self.locate(step, rows)
    return self._epoch_table(epoch)[batch_in_epoch, rows]

  def length(self, step: int) -> int:
    """The padded length of step `step`'s global batch."""
    need = int(self._need[self.record_ids(step, slice(None))].max())
    return next(b for b in self.buckets if b >= need)

  def real_tokens(self, step: int) -> int:
    """Non-padding tokens in step `step`'s global batch (every choice of a multiple-choice example)."""
    return int(self._real[self.record_ids(step, slice(None))].sum())

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


def make_loader(features: Mapping[str, np.ndarray], global_batch_size: int, seed: int,
                buckets: Sequence[int] | None = None, stop: Callable[[], bool] | None = None,
                group: int = 0) -> TaskLoader:
  """A `TaskLoader` over the feature rows; without `buckets` every batch keeps the features' full length."""
  return TaskLoader(features, global_batch_size, seed, buckets, stop, group)


LEARNABLE_COUNTS = {'train': 2000, 'dev': 400}  # Generated when num_train/eval_examples is 0.


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
  if task == LEARNABLE:
    return tasks.make_learnable_task(limit or LEARNABLE_COUNTS.get(split, 400), seed=0 if split == 'train' else 1,
                                     max_words=config.learnable_max_words)
  name = _registry_name(task)
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


# ----------------------------------------------------------------------------------------------------------------
# Prediction and metrics.
# ----------------------------------------------------------------------------------------------------------------

def predict_function(head, kind: str = 'classification') -> Callable:
  """`head`'s jitted inference `(params, batch) -> outputs`; build it once to predict several times."""
  return jax.jit(lambda p, b: apply_head(head, p, b, deterministic=True, kind=kind))


def predict(head, params, features: Mapping[str, np.ndarray], batch_size: int, kind: str = 'classification',
            fn: Callable | None = None, buckets: Sequence[int] | None = None):
  """`head`'s outputs for every row of `features` (deterministic), in row order: numpy `[N, ...]` (a dict of them
  for the beam head). `fn`: a `predict_function(head, kind)` to reuse. With `buckets` (see `TaskLoader`), the
  pooled kinds (classification, regression, multiple choice: outputs without a sequence axis) predict the rows
  sorted by length, each batch cut to the smallest bucket that holds it (at most `len(buckets)` compiled shapes);
  the other kinds keep the full length."""
  params = jax.device_get(params)
  names = MODEL_INPUTS + (('p_mask',) if 'p_mask' in features else ()) + (
      ('cls_index',) if kind == 'squad_beam' else ())
  inputs = {k: np.asarray(features[k]) for k in names}
  n = len(inputs['input_ids'])
  fn = fn or predict_function(head, kind)
  shape = inputs['input_ids'].shape
  order, side, need = np.arange(n), 'right', np.full(n, shape[-1])
  lengths = sorted({int(b) for b in (buckets or ()) if 0 < int(b) < shape[-1]} | {shape[-1]})
  if kind in POOLED_KINDS and len(lengths) > 1:
    side, need = padding_side(inputs)
    order = np.argsort(need, kind='stable')
  out = []
  for start in range(0, n, batch_size):
    index = order[start:start + batch_size]
    chunk = {k: v[index] for k, v in inputs.items()}
    rows = len(index)
    if rows < batch_size:  # One compiled shape per length: pad the last batch by repeating its first row.
      chunk = {k: np.concatenate([v, np.repeat(v[:1], batch_size - rows, 0)]) for k, v in chunk.items()}
    length = next(b for b in lengths if b >= need[index].max())
    if length < shape[-1]:
      cut = slice(None, length) if side == 'right' else slice(shape[-1] - length, None)
      chunk = {k: (np.ascontiguousarray(v[..., cut]) if v.shape[1:] == shape[1:] else v) for k, v in chunk.items()}
    out.append(jax.tree.map(lambda x, r=rows: np.asarray(x)[:r], jax.device_get(fn(params, chunk))))
  result = jax.tree.map(lambda *chunks: np.concatenate(chunks), *out)
  inverse = np.empty_like(order)
  inverse[order] = np.arange(n)
  return jax.tree.map(lambda x: x[inverse], result)


def squad_nbest(examples: Sequence, windows: Sequence[dict], logits: np.ndarray, *, max_answer_length: int = 30,
                n_best_size: int = 20, cls_index: Sequence[int] | None = None) -> tuple[dict, dict, dict]:
  """The simple span head's ({qas_id: answer}, {qas_id: n-best list}, {qas_id: no-answer score}) from per-window
  `logits [N, 2, L]` (p_mask applied), as BERT's `run_squad.py`.

  Candidates: per window, the `n_best_size` top starts x top ends that form a valid span (`squad_beam.
  window_span_ok`: in the window's context, start at its max context, start <= end, at most `max_answer_length`
  tokens), ranked by start + end logit over all windows of the example; an n-best entry is {text, probability,
  start_logit, end_logit}, deduplicated by text, the first `n_best_size` kept (a single '' entry when no span is
  valid). The answer is the best span's text ('' when none). The no-answer score is the lowest
  `start[cls] + end[cls] - best span score` over the windows that have a valid span (1e9 when none), `cls` being
  the row's `cls_index` (default 0, BERT's [CLS]).
  """
  answers, nbest, na_scores = {}, {}, {}
  for example_index, rows in squad_beam.rows_by_example(windows).items():
    example = examples[example_index]
    candidates, null_diff = [], np.inf  # (score, start logit, end logit, row, start, end) in encounter order
    for row in rows:
      window = windows[row]
      start_logits, end_logits = logits[row, 0], logits[row, 1]
      starts = np.argsort(-start_logits)[:n_best_size]
      ends = np.argsort(-end_logits)[:n_best_size]
      window_best = -np.inf
      for s in starts:
        for e in ends:
          if squad_beam.window_span_ok(window, int(s), int(e), max_answer_length):
            score = float(start_logits[s] + end_logits[e])
            window_best = max(window_best, score)
            candidates.append((score, float(start_logits[s]), float(end_logits[e]), row, int(s), int(e)))
      cls = int(cls_index[row]) if cls_index is not None else 0
      if np.isfinite(window_best):
        null_diff = min(null_diff, float(start_logits[cls] + end_logits[cls]) - window_best)
    entries = [dict(text=text, start_logit=a, end_logit=b)
               for text, a, b in squad_beam.nbest_spans(example, windows, candidates, n_best_size)]
    answers[example.qas_id] = entries[0]['text'] if entries else ''
    entries = entries or [dict(text='', start_logit=0.0, end_logit=0.0)]
    probs = squad_beam.softmax([e['start_logit'] + e['end_logit'] for e in entries])
    nbest[example.qas_id] = [dict(text=e['text'], probability=p, start_logit=e['start_logit'],
                                  end_logit=e['end_logit']) for e, p in zip(entries, probs)]
    na_scores[example.qas_id] = float(null_diff) if np.isfinite(null_diff) else 1e9
  return answers, nbest, na_scores


def squad_predictions(examples: Sequence, windows: Sequence[dict], logits: np.ndarray, *,
                      max_answer_length: int = 30, n_best_size: int = 20,
                      cls_index: Sequence[int] | None = None) -> tuple[dict, dict]:
  """({qas_id: answer text}, {qas_id: no-answer score}) of the simple span head (see `squad_nbest`)."""
  answers, _, na_scores = squad_nbest(examples, windows, logits, max_answer_length=max_answer_length,
                                      n_best_size=n_best_size, cls_index=cls_index)
  return answers, na_scores


def squad_metrics(task: str, examples: Sequence, answers: Mapping[str, str],
                  na_probs: Mapping[str, float]) -> dict:
  """The official SQuAD metrics: v2.0 (with the best no-answer threshold search over `na_probs`) when the task is
  v2 or any example is unanswerable, else v1.1; numbers only."""
  golds = [{'id': e.qas_id, 'answers': [a['text'] for a in e.answers], 'is_impossible': e.is_impossible}
           for e in examples]
  if any(e.is_impossible for e in examples) or 'v2' in task:
    metrics = task_metrics.squad_v2_evaluate(golds, answers, na_probs)
  else:
    metrics = task_metrics.squad_v1_evaluate(golds, answers)
  return {k: v for k, v in metrics.items() if isinstance(v, (int, float))}


def _sigmoid(x: float) -> float:
  return float(1 / (1 + math.exp(-max(min(x, 50.0), -50.0))))


def evaluate_predictions(task: str, kind: str, logits, features: Mapping[str, np.ndarray], examples: Sequence,
                         windows: Sequence[dict] | None = None, *,
                         config: ml_collections.ConfigDict | None = None) -> tuple[dict, dict]:
  """(official metrics, {file name: plain python content}) of one evaluated split: `predictions.json` for every
  kind; the squad kinds add `nbest_predictions.json` and `null_odds.json`.

  SQuAD na_probs for the v2 metrics: the simple head's no-answer score through a sigmoid; the beam head's null odds
  (the answerability logit) as they are (`evaluate-v2.0.py --na-prob-file null_odds.json`; its `best_exact` /
  `best_f1` are the original's reported numbers).
  """
  if kind in SQUAD_KINDS:
    options = dict(max_answer_length=config.max_answer_length if config else 30,
                   n_best_size=config.n_best_size if config else 20)
    if kind == 'squad_beam':
      answers, nbest, null_odds = squad_beam.beam_predictions(examples, windows, logits, **options)
      na_probs = null_odds
    else:
      answers, nbest, null_odds = squad_nbest(examples, windows, logits, cls_index=features.get('cls_index'),
                                              **options)
      na_probs = {k: _sigmoid(v) for k, v in null_odds.items()}
    files = {'predictions.json': answers, 'nbest_predictions.json': nbest, 'null_odds.json': null_odds}
    return squad_metrics(task, examples, answers, na_probs), files
  if kind == 'regression':
    labels = features['label']
    preds = logits
    name = _registry_name(task)
    metrics = (task_metrics.glue_metrics(name, preds, labels) if _is_glue(name)
               else {'mse': float(np.mean((preds - labels) ** 2))})
    return metrics, {'predictions.json': preds.tolist()}
  if kind == 'token':
    label_names = tasks.task_info(task).labels
    pred_ids = logits.argmax(-1)
    pred_seqs, gold_seqs = [], []
    for i, example in enumerate(examples):
      positions = np.flatnonzero(features['label_weights'][i] > 0)
      tags = [label_names[int(pred_ids[i, p])] for p in positions]
      tags += ['O'] * (len(example.words) - len(tags))
      pred_seqs.append(tags)
      gold_seqs.append(list(example.tags))
    return task_metrics.ner_f1(pred_seqs, gold_seqs), {'predictions.json': pred_seqs}
  labels = np.asarray(features['label'])
  preds = logits.argmax(-1)
  keep = labels >= 0
  name = _registry_name(task)
  if kind == 'classification' and _is_glue(name) and keep.any():
    metrics = task_metrics.glue_metrics(name, preds[keep], labels[keep])
  else:
    metrics = {'accuracy': task_metrics.accuracy(preds[keep], labels[keep])} if keep.any() else {}
  return metrics, {'predictions.json': preds.tolist()}


def compute_metrics(task: str, kind: str, logits, features: Mapping[str, np.ndarray], examples: Sequence,
                    windows: Sequence[dict] | None = None, *,
                    config: ml_collections.ConfigDict | None = None) -> tuple[dict, Any]:
  """(official metrics, the content of `predictions.json`) of one evaluated split (see `evaluate_predictions`)."""
  metrics, files = evaluate_predictions(task, kind, logits, features, examples, windows, config=config)
  return metrics, files['predictions.json']


def _is_glue(name: str) -> bool:
  try:
    task_metrics.glue_task_name(name)
    return True
  except ValueError:
    return False


# ----------------------------------------------------------------------------------------------------------------
# A whole run.
# ----------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ModelAdapter:
  """What a model contributes to fine-tuning.

  make_head(model_cfg, kind, num_labels, dtype, remat, **head_options) -> flax module (see the module docstring;
      `kind` is the objective kind, the beam head also gets start_n_top and end_n_top);
  convert(task, examples, tokenizer, max_seq_length, **kwargs) -> features (SQuAD: (features, windows));
  encoder_key: the encoder's top-level parameter name, shared with pretraining ('bert', 'transformer');
  flops_per_example(model_cfg, seq_len) -> training FLOPs of one row; dropout_fields: the model config's dropouts;
  squad_heads: the SQuAD heads it offers (keys of SQUAD_HEADS), its default first.
  """
  make_head: Callable[..., Any]
  convert: Callable[..., Any]
  encoder_key: str
  flops_per_example: Callable[[ml_collections.ConfigDict, int], float]
  dropout_fields: tuple[str, ...] = ()
  squad_heads: tuple[str, ...] = ('simple',)


def objective_kind(kind: str, config: ml_collections.ConfigDict, adapter: ModelAdapter) -> str:
  """The kind trained for a task of `kind`: for 'squad', that of `config.squad_head` ('' = the adapter's default)."""
  if kind != 'squad':
    return kind
  name = config.get('squad_head', '') or adapter.squad_heads[0]
  if name not in adapter.squad_heads:
    raise ValueError(f'config.squad_head: {name!r} is not offered by this model; choose one of '
                     f'{list(adapter.squad_heads)} (or \'\' for {adapter.squad_heads[0]!r})')
  return SQUAD_HEADS[name]


def head_options(kind: str, config: ml_collections.ConfigDict) -> dict:
  """Keyword arguments of `ModelAdapter.make_head` beyond the common five."""
  if kind == 'squad_beam':
    return dict(start_n_top=int(config.start_n_top), end_n_top=int(config.end_n_top))
  return {}


def _features(adapter, task, kind, examples, tokenizer, config, is_training):
  name = 'glue' if task == LEARNABLE else _registry_name(task)
  name = 'sst2' if task == LEARNABLE else name
  if kind in SQUAD_KINDS:
    return adapter.convert(name, examples, tokenizer, config.max_seq_length, doc_stride=config.doc_stride,
                           max_query_length=config.max_query_length, is_training=is_training)
  return adapter.convert(name, examples, tokenizer, config.max_seq_length), None


def graft_encoder(params: Mapping[str, Any], encoder: Mapping[str, Any] | None, encoder_key: str) -> dict:
  """`params` (a freshly initialised head model) with its encoder subtree replaced by `encoder` (pretrained)."""
  params = dict(params)
  if encoder is not None:
    if encoder_key not in params:
      raise ValueError(f'the task model has no {encoder_key!r} subtree')
    fresh, given = jax.tree_util.tree_structure(params[encoder_key]), jax.tree_util.tree_structure(encoder)
    if fresh != given:
      raise ValueError(f'pretrained {encoder_key!r} parameters do not match the model: {given} vs {fresh}')
    params[encoder_key] = jax.tree.map(np.asarray, encoder)
  return params


class StopNotice:
  """A SIGTERM (preemption notice) that arrives outside the trainer's loop: loading, tokenizing, compiling,
  evaluating. It is remembered and acted on at the next safe point (`TaskLoader.stop`, before the next seed), so the
  run still checkpoints and exits 0. Inside the loop the trainer's own watch handles it. One process only: with
  several, the coordination service's notifier must stay in place (the trainer's sync point decides)."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self) -> 'StopNotice':
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def __exit__(self, *exc_info) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None


def _mean_flops_and_length(adapter, model_cfg, loader: TaskLoader, steps: int) -> tuple[float, float]:
  """(training FLOPs, positions) of one example averaged over the run's `steps` batches at their padded lengths:
  what the trainer's model FLOP/s and tokens/s then count (it takes one number per example)."""
  lengths = collections.Counter(loader.length(s) for s in range(steps))
  choices = loader.tokens_per_row() // loader.seq_len
  flops = sum(n * adapter.flops_per_example(model_cfg, length) for length, n in lengths.items()) / steps
  positions = sum(n * length for length, n in lengths.items()) / steps
  return flops * choices, positions * choices


def throughput(history: Sequence[dict], loader: TaskLoader, start_step: int) -> dict:
  """Real (non-padding) tokens/s per log interval of `history` (added to its entries as `real_tokens_per_sec`,
  from the trainer's own interval timing), and over the run: the padding actually computed and what full padding
  would have computed. The first interval includes compilation; `real_tokens_per_sec` of the summary is the
  median of the later ones (the first when there is only one)."""
  previous, rates = start_step, []
  for entry in history:
    if 'steps_per_sec' not in entry or entry['step'] <= previous:
      continue
    steps = range(previous, entry['step'])
    real = sum(loader.real_tokens(s) for s in steps)
    entry['real_tokens_per_sec'] = real * entry['steps_per_sec'] / len(steps)
    rates.append(entry['real_tokens_per_sec'])
    previous = entry['step']
  steps = range(start_step, previous)
  if not steps:
    return {}
  real = sum(loader.real_tokens(s) for s in steps)
  rows = loader.global_batch_size * loader.tokens_per_row() // loader.seq_len
  computed = sum(rows * loader.length(s) for s in steps)
  full = rows * loader.seq_len * len(steps)
  return dict(real_tokens_per_sec=float(np.median(rates[1:] if len(rates) > 1 else rates)),
              padding_computed=1.0 - real / computed, padding_without_buckets=1.0 - real / full,
              lengths=sorted({loader.length(s) for s in steps}), buckets=list(loader.buckets), steps=len(steps))


def _json_safe(value):
  """`value` with every non-finite float as None (JSON has no NaN: one seed's std is undefined)."""
  if isinstance(value, dict):
    return {k: _json_safe(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_json_safe(v) for v in value]
  if isinstance(value, (float, np.floating)):
    return float(value) if math.isfinite(value) else None
  if isinstance(value, np.integer):
    return int(value)
  return value


# The metric a task is judged by, in order of preference among those it reports (GLUE's per-task choice: MCC for
# CoLA, Pearson for STS-B, F1 where it is reported, else accuracy; SQuAD v2 at its best threshold).
MAIN_METRICS = ('mcc', 'pearson', 'best_f1', 'f1', 'accuracy', 'exact_match', 'exact')


def main_metric(metrics: Mapping[str, Any], preferred: str = '') -> str:
  """The name of the metric to select the best evaluation by: `preferred` when given, else `MAIN_METRICS`'s first."""
  numeric = [k for k, v in metrics.items() if isinstance(v, (int, float, np.floating, np.integer))]
  if preferred:
    if preferred not in numeric:
      raise UserError(f'config.best_metric: {preferred!r} is not among the metrics this task reports: {numeric}')
    return preferred
  for name in MAIN_METRICS:
    if name in numeric:
      return name
  return numeric[0]


class BestEvaluation:
  """Tracks the evaluations of one fine-tuning run (`eval_fn` for the trainer) and keeps the best one's metrics,
  output files and parameters (on the host)."""

  def __init__(self, evaluate_params: Callable[[Any], tuple[dict, dict]], preferred: str = ''):
    self.evaluate_params = evaluate_params
    self.preferred = preferred
    self.best = None   # (step, metrics, files, host params)
    self.last = None   # (step, metrics, files)
    self.metric = ''

  def __call__(self, step: int, params: Any) -> dict:
    metrics, files = self.evaluate_params(params)
    self.metric = self.metric or main_metric(metrics, self.preferred)
    self.last = (step, metrics, files)
    if self.best is None or metrics[self.metric] > self.best[1][self.metric]:
      self.best = (step, metrics, files, jax.device_get(params))
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float, np.floating, np.integer))}


def run_task(config: ml_collections.ConfigDict, adapter: ModelAdapter, task: str, tokenizer,
             model_cfg: ml_collections.ConfigDict, encoder_params: Mapping[str, Any] | None, workdir: str | None,
             data_dir: str | None = None) -> dict:
  """Fine-tunes once per seed of `run_seeds(config)` with `common.trainer.train`, evaluates on the dev split (train
  when the task has no dev file) and returns `{'metrics': {metric: {mean, std, values}}, 'runs': [...]}`; with a
  `workdir` also writes `metrics.json` and `seed_<s>/predictions.json` there (each seed trains in `seed_<s>/`;
  SQuAD adds `nbest_predictions.json` and `null_odds.json` next to it). Each run's entry holds its `metrics`,
  `history`, `steps`, `predictions` ({file name: content}) and `throughput` (real tokens/s, padding; see
  `throughput`). `encoder_params` None: the encoder is randomly initialised.

  A preemption notice (SIGTERM) stops the run with the step reached checkpointed: the result then has `partial`
  ({seed, step, steps}), no `metrics`, and nothing is evaluated or written for the unfinished seed, nor
  `metrics.json`; the same call on the same workdir resumes and ends as an uninterrupted run.
  """
  with StopNotice() as notice:
    return _run_task(config, adapter, task, tokenizer, model_cfg, encoder_params, workdir, data_dir, notice)


def _run_task(config, adapter, task, tokenizer, model_cfg, encoder_params, workdir, data_dir, notice):
  kind = objective_kind(task_kind(task), config, adapter)
  seeds = run_seeds(config)
  model_cfg = ml_collections.ConfigDict(model_cfg.to_dict())
  if config.dropout >= 0:
    for field in adapter.dropout_fields:
      model_cfg[field] = float(config.dropout)
  head = adapter.make_head(model_cfg, kind, num_labels(task), jnp.dtype(config.dtype), config.remat,
                           **head_options(kind, config))
  train_examples = load_examples(task, 'train', data_dir, config)
  if not train_examples:
    raise ValueError(f'{task}: no usable training examples (every row was missing or skipped as bad; see the log)')
  try:
    eval_examples = load_examples(task, 'dev', data_dir, config)
  except (FileNotFoundError, ValueError) as error:
    absl_logging.warning('%s: no dev split (%s); the metrics below are on the TRAINING examples', task, error)
    eval_examples = train_examples
  train_features, _ = _features(adapter, task, kind, train_examples, tokenizer, config, True)
  eval_features, eval_windows = _features(adapter, task, kind, eval_examples, tokenizer, config, False)
  train_batch = batch_features(kind, train_features)
  num_rows = len(train_batch['input_ids'])
  steps = max(1, math.ceil(config.epochs * num_rows / config.global_batch_size))
  buckets = bucket_lengths(config.max_seq_length, int(config.get('length_buckets', 1)))
  stop = lambda: notice.requested
  group = int(config.get('group_by_length', 0))
  planned = make_loader(train_batch, config.global_batch_size, seed=seeds[0], buckets=buckets, group=group)
  flops, positions = _mean_flops_and_length(adapter, model_cfg, planned, steps)
  objective = make_objective(head, kind, train_batch, flops, max(1, round(positions)))
  init_params = jax.jit(lambda r: nn.meta.unbox(objective.init_variables(r))['params'])
  predict_fn = predict_function(head, kind)
  runs, partial = [], None
  for seed in seeds:
    run_cfg = ml_collections.ConfigDict(config.to_dict())
    run_cfg.seed = int(seed)
    run_cfg.num_train_steps = steps
    run_cfg.optim.learning_rate = float(config.learning_rate)
    run_cfg.optim.warmup_steps = int(config.warmup_proportion * steps)
    run_cfg.optim.layer_decay = float(config.layer_decay)
    run_cfg.model = model_cfg
    seed_dir = os.path.join(workdir, f'seed_{seed}') if workdir else None
    if notice.requested:
      partial = dict(seed=int(seed), step=_checkpointed_step(seed_dir), steps=steps)
      break
    initial = None
    if encoder_params is not None:
      fresh = jax.device_get(init_params(jax.random.PRNGKey(run_cfg.seed)))
      initial = graft_encoder(fresh, encoder_params, adapter.encoder_key)
    loader = make_loader(train_batch, config.global_batch_size, seed=int(seed), buckets=buckets, stop=stop,
                         group=group)
    def evaluate_params(params):
      logits = predict(head, params, eval_features, config.eval_batch_size, kind, fn=predict_fn, buckets=buckets)
      return evaluate_predictions(task, kind, logits, eval_features, eval_examples, eval_windows, config=config)
    tracker = BestEvaluation(evaluate_params, config.best_metric) if config.eval_every else None
    state, history = trainer.train(run_cfg, objective, loader, None, workdir=seed_dir, initial_params=initial,
                                   eval_fn=tracker)
    reached = int(jax.device_get(state.step))
    if reached < steps:  # Stopped by a preemption notice, the step reached checkpointed.
      partial = dict(seed=int(seed), step=reached, steps=steps)
      break
    speed = throughput(history, loader, loader.started_at)
    best = None
    if tracker is None or tracker.last is None:
      metrics, files = evaluate_params(state.params)
    elif config.select_best:
      best_step, metrics, files, best_params = tracker.best
      best = dict(step=best_step, metric=tracker.metric, value=metrics[tracker.metric], last_step=tracker.last[0])
      if seed_dir and jax.process_index() == 0:
        _save_params(os.path.join(seed_dir, 'best'), best_params)
      absl_logging.warning('seed %d: best %s %.4f at step %d of %d (reported)', seed, tracker.metric,
                           best['value'], best_step, steps)
    else:
      _, metrics, files = tracker.last
    runs.append(dict(seed=int(seed), metrics=metrics, history=history, steps=steps, predictions=files,
                     throughput=speed, train_examples=len(train_examples), best=best))
    if speed and jax.process_index() == 0:
      absl_logging.info('seed %d: real tokens/s %.0f; padding %.1f %% of the computed tokens (%.1f %% at full '
                        'length); batch lengths %s', seed, speed['real_tokens_per_sec'],
                        100 * speed['padding_computed'], 100 * speed['padding_without_buckets'], speed['lengths'])
    if seed_dir and jax.process_index() == 0:
      for name, content in files.items():
        with open(os.path.join(seed_dir, name), 'w') as f:
          json.dump(_json_safe(content), f, indent=2 if name == 'nbest_predictions.json' else None)
  if partial is not None:
    return dict(task=task, metrics={}, partial=partial, runs=runs)
  summary = task_metrics.summarize_seeds([r['metrics'] for r in runs]) if runs[0]['metrics'] else {}
  result = dict(task=task, metrics=summary, runs=[dict(seed=r['seed'], metrics=r['metrics'], best=r['best'],
                                                       throughput=r['throughput']) for r in runs])
  if workdir and jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, 'metrics.json'), 'w') as f:
      json.dump(_json_safe(result), f, indent=2)
  result['runs'] = runs
  return result


def _save_params(path: str, params: Any) -> None:
  """The selected parameters as a plain orbax pytree (`orbax.checkpoint.StandardCheckpointer().restore(path)`)."""
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  if os.path.exists(path):
    shutil.rmtree(path)
  with ocp.StandardCheckpointer() as saver:
    saver.save(os.path.abspath(path), params)


def _checkpointed_step(seed_dir: str | None) -> int:
  """The latest checkpointed step of a seed's run (0 when none)."""
  if not seed_dir or not os.path.isdir(checkpoint.checkpoint_dir(seed_dir)):
    return 0
  manager = checkpoint.make_manager(seed_dir, async_save=False)
  try:
    return int(manager.latest_step() or 0)
  finally:
    manager.close()


# ----------------------------------------------------------------------------------------------------------------
# The entry points (`python -m bert_jax.finetune`, `python -m xlnet_jax.finetune`).
# ----------------------------------------------------------------------------------------------------------------

RANDOM_INIT = 'none'


def load_init_dir(path: str, load_hf_dir: Callable[[str], tuple], vocab_file: str, vocab_what: str,
                  load_tokenizer: Callable[..., Any], default_lower_case: bool,
                  tokenizer_from_json: Callable[[str, bool | None], Any] | None = None) -> tuple:
  """(model config, params, tokenizer) from a pretraining workdir (its latest checkpoint and run config) or else an
  HF directory (`load_hf_dir(path) -> (model config, params)`). The vocabulary is `path/vocab_file`, else (when
  given) `tokenizer_from_json(path/tokenizer.json, do_lower_case)`, lower-cased as `tokenizer_config.json`'s
  `do_lower_case` says (without that file or field: None to `tokenizer_from_json`, which then follows
  tokenizer.json's normaliser, `default_lower_case` for `vocab_file`). Neither file: FileNotFoundError naming
  `vocab_what`, before any weights are read."""
  vocab = os.path.join(path, vocab_file)
  tokenizer_json = os.path.join(path, 'tokenizer.json')
  use_json = not os.path.exists(vocab) and tokenizer_from_json is not None and os.path.exists(tokenizer_json)
  if not os.path.exists(vocab) and not use_json:
    also = ' (or tokenizer.json)' if tokenizer_from_json is not None else ''
    raise FileNotFoundError(f'{vocab}{also} not found: the init directory must hold {vocab_what}')
  do_lower_case = None
  config_file = os.path.join(path, 'tokenizer_config.json')
  if os.path.exists(config_file):
    with open(config_file) as f:
      do_lower_case = json.load(f).get('do_lower_case')
  do_lower_case = None if do_lower_case is None else bool(do_lower_case)
  if use_json:
    tokenizer = tokenizer_from_json(tokenizer_json, do_lower_case)
  else:
    tokenizer = load_tokenizer(vocab, do_lower_case=default_lower_case if do_lower_case is None else do_lower_case)
  if os.path.exists(os.path.join(path, checkpoint.CONFIG_FILE)) and os.path.isdir(checkpoint.checkpoint_dir(path)):
    params, run_config = checkpoint.restore_params(path)
    model_cfg = ml_collections.ConfigDict(run_config.model.to_dict())
  else:
    model_cfg, params = load_hf_dir(path)
  return model_cfg, params, tokenizer


def resolve_init(init: str, model_from: str | None, load_init: Callable[[str], tuple]) -> tuple:
  """(model config, encoder params or None, tokenizer) of `--init`: a directory for `load_init`, or `none` (random
  weights) with the architecture and tokenizer of `model_from` (whose weights are not used)."""
  if init == RANDOM_INIT:
    if not model_from:
      raise UserError('--init=none trains from random weights and takes the architecture and the tokenizer from '
                       '--model_from=DIR (an HF directory or a pretraining workdir); --model_from is missing')
    model_cfg, _, tokenizer = load_init(model_from)
    return model_cfg, None, tokenizer
  if model_from:
    raise UserError('--model_from is only for --init=none (the --init directory gives the architecture)')
  return load_init(init)


def format_metric(name: str, summary: Mapping[str, Any]) -> str:
  """`name: mean ± std` over several seeds, `name: value` for one (a single run has no spread)."""
  values = summary.get('values') or [summary['mean']]
  if len(values) == 1 or summary.get('std') is None or not math.isfinite(summary['std']):
    return f"{name}: {summary['mean']:.4f}"
  return f"{name}: {summary['mean']:.4f} ± {summary['std']:.4f} ({len(values)} seeds)"


def main(run: Callable[..., dict], model_name: str, config_file: str) -> None:
  """The command line of a model's fine-tuning: flags --config (default `config_file`; every `--config.KEY=VALUE`
  overrides), --task, --init (`none`: random weights, with --model_from), --workdir, --data_dir; calls
  `run(config, task, init, workdir, data_dir, model_from=...)` and prints each metric (mean ± std over several
  seeds). A run stopped by a preemption notice prints how far it got and exits 0 without metrics."""
  from absl import flags  # pylint: disable=import-outside-toplevel
  from ml_collections import config_flags  # pylint: disable=import-outside-toplevel
  config_flags.DEFINE_config_file('config', config_file, 'Fine-tuning config file.', lock_config=False)
  flags.DEFINE_string('task', None, 'learnable, glue/<name>, squad/v1.1, squad/v2.0, conll2003, swag, race.')
  flags.DEFINE_string('init', None, f'An HF {model_name} directory or a pretraining workdir; `none` for random '
                      'weights (architecture and tokenizer from --model_from).')
  flags.DEFINE_string('model_from', None, 'With --init=none: the HF directory or pretraining workdir whose '
                      'architecture and tokenizer are used (not its weights).')
  flags.DEFINE_string('workdir', None, 'Where checkpoints, predictions and metrics.json go.')
  flags.DEFINE_string('data_dir', None, 'The task\'s original files; without it the task is read from TFDS.')
  flags.mark_flags_as_required(['task', 'init', 'workdir'])
  values = flags.FLAGS
  for name in ('config', 'task', 'init', 'model_from', 'workdir', 'data_dir'):  # Listed by --helpshort.
    values.register_key_flag_for_module(sys.argv[0], values[name])

  from common import run as run_lib  # pylint: disable=import-outside-toplevel

  def _main(argv):
    del argv
    run_lib.quiet_logging(values)  # checkpointing libraries log every save at INFO
    check_task(values.task)  # before any model is loaded
    result = run(values.config, values.task, values.init, values.workdir, values.data_dir,
                 model_from=values.model_from)
    if result.get('partial'):
      part = result['partial']
      print(f"partial run: seed {part['seed']} stopped at step {part['step']} of {part['steps']} (preemption "
            f"notice), checkpointed; no metrics written. Run the same command again to resume.", flush=True)
      return
    for name, value in result['metrics'].items():
      print(format_metric(name, value), flush=True)

  run_lib.app_run(_main)  # user errors (bad flag value, missing file) as one line, exit 2; --help exits 0
