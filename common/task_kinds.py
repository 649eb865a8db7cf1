"""Task kinds: one object per head family, looked up once per task (`get(name)`), holding everything that depends on
the family: the label fields, the task layer's width and the shaping of its output, the loss sums and their
normaliser, and the post-processing of predictions into the official metrics and output files. One vocabulary of
names: a task's `kind` in the registry (`common.tasks`) is one of them, and so is the `kind` of the models' heads.

Each loss is a sum over the global batch divided by a global normaliser (so gradient accumulation is exact):

  classification   label [B] int32 (-1: none)       cross-entropy, mean over labelled rows; accuracy
  regression       label [B] float32 (NaN: none)    squared error, mean over labelled rows
  token            label, label_weights [B, L]      cross-entropy weighted by label_weights, mean over their sum
  multiple_choice  label [B] int32                  cross-entropy over the choices' scores; accuracy
  squad            start/end_position [B] int32     (start CE + end CE) / 2, mean over rows
  squad_beam       + is_impossible, cls_index [B]   (start CE + end CE) / 2 + 0.5 BCE(answerability), mean over
                                                    rows (XLNet's beam-search heads, `xlnet_jax.squad_heads`)

A SQuAD task (kind 'squad') trains the kind of `config.squad_head` ('simple' -> squad, 'beam' -> squad_beam; '' the
model's default, the first head it offers), see `TaskKind.choose`. The squad kinds write `predictions.json` (the
answer per question), `nbest_predictions.json` and `null_odds.json` (the no-answer score per question).

The models' heads read from a kind: `flatten_inputs` (multiple choice `[B, C, L] -> [B * C, L]`), whether the layer
reads one pooled vector per sequence (`pooled`), whether dropout precedes its dense (`dropout`), its width
(`head_width`) and `outputs` (the dense's output -> the kind's float32 logits); `beam` marks the beam heads.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from common import layers, squad_predictions, task_metrics, tasks

NEG_INF = -1e30
MODEL_INPUTS = ('input_ids', 'segment_ids', 'input_mask')
SQUAD_HEADS = {'simple': 'squad', 'beam': 'squad_beam'}  # config.squad_head -> kind


def _labelled_rows(labels: jax.Array) -> jax.Array:
  return jnp.sum((labels >= 0).astype(jnp.float32))


def _cross_entropy_sums(logits: jax.Array, labels: jax.Array, weights: jax.Array) -> dict:
  """{'loss', 'correct'}: cross-entropy and argmax hits summed with `weights` (labels < 0 count as class 0)."""
  safe = jnp.maximum(labels, 0)
  nll = optax.softmax_cross_entropy_with_integer_labels(logits, safe)
  correct = layers.argmax_hits(logits, safe)
  return dict(loss=jnp.sum(nll * weights), correct=jnp.sum(correct * weights))


def _is_glue(task: str) -> bool:
  try:
    task_metrics.glue_task_name(task.split('/', 1)[1] if task.startswith('glue/') else task)
    return True
  except ValueError:
    return False


class TaskKind:
  """The base: a pooled head of `head_width` outputs over `label_fields` (see the module docstring)."""
  name = ''
  label_fields: tuple[str, ...] = ('label',)
  converter = 'pair'           # Which of a model's converters makes its features (pair, multiple_choice, token, squad).
  convert_options: Mapping[str, Any] = {}
  pooled = True                # The task layer reads one vector per sequence.
  dropout = True               # Dropout before the task layer's dense.
  beam = False                 # The beam-search span heads.
  windows = False              # Examples become windows (SQuAD): conversion returns (features, windows).
  predict_fields: tuple[str, ...] = ()  # Inputs of prediction beyond MODEL_INPUTS and p_mask.

  def choose(self, squad_head: str, offered: Sequence[str]) -> 'TaskKind':
    """The kind trained for a task of this kind (`squad_head` and the heads a model offers matter to SQuAD only)."""
    del squad_head, offered
    return self

  def head_width(self, num_labels: int) -> int:
    del num_labels
    return 1

  def flatten_inputs(self, input_ids, segment_ids, input_mask) -> tuple:
    return input_ids, segment_ids, input_mask

  def outputs(self, logits: jax.Array, input_shape: Sequence[int], p_mask: jax.Array | None) -> jax.Array:
    """The dense's output -> the kind's float32 logits (`input_shape`: the inputs' shape before `flatten_inputs`)."""
    del input_shape, p_mask
    return logits.astype(jnp.float32)

  def head_options(self, config) -> dict:
    """Keyword arguments of a model's `make_head` beyond the common five."""
    del config
    return {}

  def head_inputs(self, batch: Mapping[str, Any], *, targets: bool) -> dict:
    """The keyword inputs of the head beyond the common four (`targets`: for the loss)."""
    del batch, targets
    return {}

  def feature_options(self, config, is_training: bool) -> dict:
    """Keyword arguments of the model's converter beyond (examples, tokenizer, max_seq_length)."""
    del config, is_training
    return {}

  def loss_sums(self, logits, batch: Mapping[str, jax.Array]) -> dict:
    """Scalar sums over the batch: `loss` (summed per-row or per-token loss), `correct` (where defined)."""
    return _cross_entropy_sums(logits, batch['label'], (batch['label'] >= 0).astype(jnp.float32))

  def normalizers(self, batch: Mapping[str, jax.Array]) -> dict:
    return {'rows': jnp.maximum(self.count(batch), 1.0)}

  def count(self, batch: Mapping[str, jax.Array]) -> jax.Array:
    return _labelled_rows(batch['label'])

  def evaluate(self, task: str, outputs, features: Mapping[str, np.ndarray], examples: Sequence,
               windows: Sequence[dict] | None, config) -> tuple[dict, dict]:
    """(official metrics, {file name: plain python content}) of one evaluated split: `predictions.json` for every
    kind (see the subclasses for the metrics)."""
    labels = np.asarray(features['label'])
    preds = outputs.argmax(-1)
    keep = labels >= 0
    metrics = {'accuracy': task_metrics.accuracy(preds[keep], labels[keep])} if keep.any() else {}
    return metrics, {'predictions.json': preds.tolist()}


class Classification(TaskKind):
  """`[B, K]` logits; GLUE's metrics for a GLUE task, else accuracy."""
  name = 'classification'
  convert_options = {'regression': False}

  def head_width(self, num_labels: int) -> int:
    return num_labels

  def evaluate(self, task, outputs, features, examples, windows, config):
    labels = np.asarray(features['label'])
    preds = outputs.argmax(-1)
    keep = labels >= 0
    if not (_is_glue(task) and keep.any()):
      return super().evaluate(task, outputs, features, examples, windows, config)
    name = task.split('/', 1)[1] if task.startswith('glue/') else task
    return task_metrics.glue_metrics(name, preds[keep], labels[keep]), {'predictions.json': preds.tolist()}


class Regression(TaskKind):
  """`[B]` scores; GLUE's metrics (STS-B: Pearson, Spearman) for a GLUE task, else the mean squared error."""
  name = 'regression'
  convert_options = {'regression': True}

  def outputs(self, logits, input_shape, p_mask):
    return logits.astype(jnp.float32)[:, 0]

  def loss_sums(self, logits, batch):
    labels = batch['label']
    valid = ~jnp.isnan(labels)
    err = jnp.where(valid, logits - jnp.where(valid, labels, 0.0), 0.0)
    return dict(loss=jnp.sum(err * err))

  def count(self, batch):
    return jnp.sum((~jnp.isnan(batch['label'])).astype(jnp.float32))

  def evaluate(self, task, outputs, features, examples, windows, config):
    labels, preds = features['label'], outputs
    name = task.split('/', 1)[1] if task.startswith('glue/') else task
    metrics = (task_metrics.glue_metrics(name, preds, labels) if _is_glue(task)
               else {'mse': float(np.mean((preds - labels) ** 2))})
    return metrics, {'predictions.json': preds.tolist()}


class MultipleChoice(TaskKind):
  """`[B, C]` scores, one per choice (each choice a row of the encoder); accuracy."""
  name = 'multiple_choice'
  converter = 'multiple_choice'

  def flatten_inputs(self, input_ids, segment_ids, input_mask):
    return tuple(x.reshape(-1, x.shape[-1]) for x in (input_ids, segment_ids, input_mask))

  def outputs(self, logits, input_shape, p_mask):
    return logits.astype(jnp.float32).reshape(input_shape[0], input_shape[1])


class Token(TaskKind):
  """`[B, L, K]` logits per token, the tag on a word's first piece; CoNLL's entity F1 over the words."""
  name = 'token'
  label_fields = ('label', 'label_weights')
  converter = 'token'
  pooled = False

  def head_width(self, num_labels: int) -> int:
    return num_labels

  def loss_sums(self, logits, batch):
    return _cross_entropy_sums(logits, batch['label'], batch['label_weights'].astype(jnp.float32))

  def count(self, batch):
    return jnp.sum(batch['label_weights'].astype(jnp.float32))

  def evaluate(self, task, outputs, features, examples, windows, config):
    label_names = tasks.task_info(task).labels
    pred_ids = outputs.argmax(-1)
    pred_seqs, gold_seqs = [], []
    for i, example in enumerate(examples):
      positions = np.flatnonzero(features['label_weights'][i] > 0)
      tags = [label_names[int(pred_ids[i, p])] for p in positions]
      tags += ['O'] * (len(example.words) - len(tags))  # Words cut off by max_seq_length.
      pred_seqs.append(tags)
      gold_seqs.append(list(example.tags))
    return task_metrics.ner_f1(pred_seqs, gold_seqs), {'predictions.json': pred_seqs}


class Squad(TaskKind):
  """The simple span head: `[B, 2, L]` start and end logits (p_mask 1 -> NEG_INF); SQuAD's official metrics."""
  name = 'squad'
  label_fields = ('p_mask', 'start_position', 'end_position')
  converter = 'squad'
  pooled = False
  dropout = False
  windows = True

  def choose(self, squad_head, offered):
    name = squad_head or offered[0]
    if name not in offered:
      raise ValueError(f'config.squad_head: {name!r} is not offered by this model; choose one of '
                       f'{list(offered)} (or \'\' for {offered[0]!r})')
    return KINDS[SQUAD_HEADS[name]]

  def head_width(self, num_labels: int) -> int:
    del num_labels
    return 2

  def outputs(self, logits, input_shape, p_mask):
    logits = jnp.swapaxes(logits.astype(jnp.float32), 1, 2)
    if p_mask is not None:
      logits = jnp.where(p_mask[:, None, :] > 0, NEG_INF, logits)
    return logits

  def feature_options(self, config, is_training):
    return dict(doc_stride=config.doc_stride, max_query_length=config.max_query_length, is_training=is_training)

  def loss_sums(self, logits, batch):
    start = optax.softmax_cross_entropy_with_integer_labels(logits[:, 0], batch['start_position'])
    end = optax.softmax_cross_entropy_with_integer_labels(logits[:, 1], batch['end_position'])
    return dict(loss=jnp.sum(start + end) / 2.0)

  def count(self, batch):
    return jnp.asarray(batch['input_ids'].shape[0], jnp.float32)

  def evaluate(self, task, outputs, features, examples, windows, config):
    return squad_predictions.evaluate(
        task, outputs, features, examples, windows, beam=self.beam,
        max_answer_length=config.max_answer_length if config else 30, n_best_size=config.n_best_size if config else 20)


class SquadBeam(Squad):
  """The beam-search span heads (XLNet's `run_squad.py`): a dict of outputs, see `xlnet_jax.squad_heads`."""
  name = 'squad_beam'
  label_fields = ('p_mask', 'cls_index', 'start_position', 'end_position', 'is_impossible')
  beam = True
  predict_fields = ('cls_index',)

  def head_options(self, config):
    return dict(start_n_top=int(config.start_n_top), end_n_top=int(config.end_n_top))

  def head_inputs(self, batch, *, targets):
    out = {'cls_index': batch['cls_index']}
    if targets:
      out['start_position'] = batch['start_position']
    return out

  def loss_sums(self, logits, batch):
    """{'loss': the per-row loss summed over the batch, 'cls_loss': its answerability part} from the training
    outputs (start_logits, end_logits, cls_logits) and start_position, end_position, is_impossible `[B]`."""
    start = optax.softmax_cross_entropy_with_integer_labels(logits['start_logits'], batch['start_position'])
    end = optax.softmax_cross_entropy_with_integer_labels(logits['end_logits'], batch['end_position'])
    cls = optax.sigmoid_binary_cross_entropy(logits['cls_logits'], batch['is_impossible'].astype(jnp.float32))
    return dict(loss=jnp.sum((start + end) / 2.0 + 0.5 * cls), cls_loss=jnp.sum(cls))


KINDS: dict[str, TaskKind] = {kind.name: kind for kind in (Classification(), Regression(), Token(), MultipleChoice(),
                                                           Squad(), SquadBeam())}
HEAD_KINDS = ('classification', 'regression', 'token', 'multiple_choice', 'squad')  # What every model's heads offer.
SQUAD_KINDS = ('squad', 'squad_beam')


def get(kind: str | TaskKind) -> TaskKind:
  """The kind object of `kind` (a name, or a kind already)."""
  if isinstance(kind, TaskKind):
    return kind
  if kind not in KINDS:
    raise ValueError(f'unknown task kind {kind!r}')
  return KINDS[kind]


def check_head_kind(kind: str, kinds: Sequence[str] = HEAD_KINDS) -> TaskKind:
  """The kind object of `kind`, one of the `kinds` a model's heads offer; ValueError otherwise."""
  if kind not in kinds:
    raise ValueError(f'kind must be one of {tuple(kinds)}, got {kind!r}')
  return KINDS[kind]
