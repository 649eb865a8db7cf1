"""Fine-tuning tasks as trainer objectives, model-agnostic: features -> loader -> `common.trainer.train` ->
predictions -> official metrics (`common.task_metrics`). No second training loop.

A model plugs in through `ModelAdapter` (its heads, its feature converter, its encoder's parameter path); the heads
share one calling convention, `head.apply(variables, input_ids, segment_ids, input_mask, p_mask, deterministic=...)`
returning float32 logits (see `bert_jax/heads.py`). Task kinds and their losses, each a sum over the global batch
divided by a global normaliser (so gradient accumulation is exact):

  classification   label [B] int32 (-1: none)       cross-entropy, mean over labelled rows; accuracy
  regression       label [B] float32 (NaN: none)    squared error, mean over labelled rows
  token            label, label_weights [B, L]      cross-entropy weighted by label_weights, mean over their sum
  multiple_choice  label [B] int32                  cross-entropy over the choices' scores; accuracy
  squad            start/end_position [B] int32     (start CE + end CE) / 2, mean over rows

`task_kind(task)` maps a task name (`common.data.tasks` names plus `learnable`) to its kind.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import linen as nn

from common import optim, task_metrics, trainer
from common.data import pipeline, tasks

LEARNABLE = 'learnable'
KIND_OF = {'classification': 'classification', 'regression': 'regression', 'token_classification': 'token',
           'multiple_choice': 'multiple_choice', 'squad': 'squad'}
MODEL_INPUTS = ('input_ids', 'segment_ids', 'input_mask')
LABEL_FIELDS = {'classification': ('label',), 'regression': ('label',), 'token': ('label', 'label_weights'),
                'multiple_choice': ('label',), 'squad': ('p_mask', 'start_position', 'end_position')}


# ----------------------------------------------------------------------------------------------------------------
# Config.
# ----------------------------------------------------------------------------------------------------------------

def finetune_config(**overrides) -> ml_collections.ConfigDict:
  """The trainer config plus the fine-tuning fields.

  learning_rate, warmup_proportion (of the total steps), epochs, global_batch_size, max_seq_length, layer_decay,
  seeds (one run per seed; metrics reported as mean ± std), doc_stride / max_query_length / max_answer_length /
  n_best_size (SQuAD), eval_batch_size, num_train_examples / num_eval_examples / learnable_max_words (`learnable`
  only), dtype, remat, dropout (>= 0 replaces the model's dropout rates).
  """
  config = trainer.trainer_config(global_batch_size=32, log_every=50, eval_every=0, num_eval_batches=0,
                                  checkpoint_every=0, keep_checkpoints=1, progress_bar=False)
  config.optim = optim.optim_config(learning_rate=2e-5, warmup_steps=0, weight_decay=0.01, clip_grad_norm=1.0)
  config.update(dict(
      learning_rate=2e-5, warmup_proportion=0.1, epochs=3.0, max_seq_length=128, layer_decay=1.0, seeds=[0],
      doc_stride=128, max_query_length=64, max_answer_length=30, n_best_size=20, eval_batch_size=64,
      num_train_examples=2000, num_eval_examples=400, learnable_max_words=24, dtype='float32', remat=False, dropout=-1.0,
  ))
  config.update(overrides)
  return config


def task_kind(task: str) -> str:
  if task == LEARNABLE:
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


def apply_head(head, params, batch, *, deterministic: bool, rng=None):
  return head.apply({'params': params}, batch['input_ids'], batch['segment_ids'], batch['input_mask'],
                    batch.get('p_mask'), deterministic=deterministic,
                    rngs=None if rng is None else {'dropout': rng})


def make_objective(head, kind: str, template: Mapping[str, np.ndarray], flops_per_example: float,
                   seq_len: int) -> trainer.Objective:
  """The trainer objective of `head` (a model from a `ModelAdapter`) on batches shaped like `template` rows."""

  def init_variables(rng):
    dummy = {k: jnp.zeros((1, *np.shape(v)[1:]), np.asarray(v).dtype) for k, v in template.items()}
    return head.init({'params': rng}, dummy['input_ids'], dummy['segment_ids'], dummy['input_mask'],
                     dummy.get('p_mask'))

  def loss_fn(params, batch, rng, aux, norms, train):
    logits = apply_head(head, params, batch, deterministic=not train, rng=rng)
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


def make_loader(features: Mapping[str, np.ndarray], global_batch_size: int, seed: int) -> pipeline.StepLoader:
  """A shuffled, step-indexed loader over the feature rows (wrapping around when fewer rows than a batch)."""
  return pipeline.StepLoader(FeatureSource(features), lambda records, keys, epoch: pipeline.stack_rows(records),
                             global_batch_size, seed=seed, shuffle=True, drop_remainder=False,
                             process_index=jax.process_index(), process_count=jax.process_count())


def load_examples(task: str, split: str, data_dir: str | None, config: ml_collections.ConfigDict) -> list:
  """Examples of `task`'s split: generated (`learnable`), read from `data_dir`, else from TFDS."""
  if task == LEARNABLE:
    count = config.num_train_examples if split == 'train' else config.num_eval_examples
    return tasks.make_learnable_task(count, seed=0 if split == 'train' else 1,
                                     max_words=config.learnable_max_words)
  name = _registry_name(task)
  if data_dir:
    return tasks.read_task(name, data_dir, split)
  return tasks.tfds_task(name, split)


# ----------------------------------------------------------------------------------------------------------------
# Prediction and metrics.
# ----------------------------------------------------------------------------------------------------------------

def predict(head, params, features: Mapping[str, np.ndarray], batch_size: int) -> np.ndarray:
  """Logits for every row of `features` (deterministic), in row order: `[N, ...]` numpy float32."""
  params = jax.device_get(params)
  inputs = {k: np.asarray(features[k]) for k in MODEL_INPUTS + (('p_mask',) if 'p_mask' in features else ())}
  n = len(inputs['input_ids'])
  fn = jax.jit(lambda p, b: apply_head(head, p, b, deterministic=True))
  out = []
  for start in range(0, n, batch_size):
    chunk = {k: v[start:start + batch_size] for k, v in inputs.items()}
    rows = len(chunk['input_ids'])
    if rows < batch_size:  # One compiled shape: pad the last batch by repeating its first row.
      chunk = {k: np.concatenate([v, np.repeat(v[:1], batch_size - rows, 0)]) for k, v in chunk.items()}
    out.append(np.asarray(jax.device_get(fn(params, chunk)))[:rows])
  return np.concatenate(out)


def squad_predictions(examples: Sequence, windows: Sequence[dict], logits: np.ndarray, *,
                      max_answer_length: int = 30, n_best_size: int = 20) -> tuple[dict, dict]:
  """({qas_id: answer text}, {qas_id: no-answer score}) from per-window `logits [N, 2, L]` (p_mask applied).

  For each example the best (start, end) over its windows with start <= end, both window tokens at their max
  context, end - start < max_answer_length, among the `n_best_size` top starts and ends; its text is the context
  characters `tok_start_to_orig[start]..tok_end_to_orig[end]`. The no-answer score is the lowest
  `start[cls] + end[cls] - best span score` over the windows (as the original's null score difference); an answer
  is '' when no span is valid.
  """
  by_example = collections.defaultdict(list)
  for row, window in enumerate(windows):
    by_example[window['example_index']].append(row)
  answers, na_scores = {}, {}
  for example_index, rows in by_example.items():
    example = examples[example_index]
    best, best_text, null_diff = -np.inf, '', np.inf
    for row in rows:
      window = windows[row]
      start_logits, end_logits = logits[row, 0], logits[row, 1]
      offset, length = window['doc_offset'], window['paragraph_len']
      starts = np.argsort(-start_logits)[:n_best_size]
      ends = np.argsort(-end_logits)[:n_best_size]
      window_best = -np.inf
      for s in starts:
        for e in ends:
          if not (offset <= s < offset + length and offset <= e < offset + length) or e < s:
            continue
          if e - s + 1 > max_answer_length or not window['token_is_max_context'].get(int(s), True):
            continue
          score = float(start_logits[s] + end_logits[e])
          window_best = max(window_best, score)
          if score > best:
            best = score
            first = window['tok_start_to_orig'][s - offset]
            last = window['tok_end_to_orig'][e - offset]
            best_text = example.context[first:last + 1].strip()
      cls = int(window.get('cls_index', 0))
      if np.isfinite(window_best):
        null_diff = min(null_diff, float(start_logits[cls] + end_logits[cls]) - window_best)
    answers[example.qas_id] = best_text
    na_scores[example.qas_id] = float(null_diff) if np.isfinite(null_diff) else 1e9
  return answers, na_scores


def compute_metrics(task: str, kind: str, logits: np.ndarray, features: Mapping[str, np.ndarray],
                    examples: Sequence, windows: Sequence[dict] | None = None, *,
                    config: ml_collections.ConfigDict | None = None) -> tuple[dict, Any]:
  """(official metrics, predictions as plain python for the predictions file) of one evaluated split."""
  if kind == 'squad':
    answers, na_scores = squad_predictions(
        examples, windows, logits, max_answer_length=config.max_answer_length if config else 30,
        n_best_size=config.n_best_size if config else 20)
    golds = [{'id': e.qas_id, 'answers': [a['text'] for a in e.answers], 'is_impossible': e.is_impossible}
             for e in examples]
    if any(e.is_impossible for e in examples) or 'v2' in task:
      na_probs = {k: float(1 / (1 + math.exp(-max(min(v, 50.0), -50.0)))) for k, v in na_scores.items()}
      metrics = task_metrics.squad_v2_evaluate(golds, answers, na_probs)
    else:
      metrics = task_metrics.squad_v1_evaluate(golds, answers)
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float))}, answers
  if kind == 'regression':
    labels = features['label']
    preds = logits
    name = _registry_name(task)
    metrics = (task_metrics.glue_metrics(name, preds, labels) if _is_glue(name)
               else {'mse': float(np.mean((preds - labels) ** 2))})
    return metrics, preds.tolist()
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
    return task_metrics.ner_f1(pred_seqs, gold_seqs), pred_seqs
  labels = np.asarray(features['label'])
  preds = logits.argmax(-1)
  keep = labels >= 0
  name = _registry_name(task)
  if kind == 'classification' and _is_glue(name) and keep.any():
    metrics = task_metrics.glue_metrics(name, preds[keep], labels[keep])
  else:
    metrics = {'accuracy': task_metrics.accuracy(preds[keep], labels[keep])} if keep.any() else {}
  return metrics, preds.tolist()


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

  make_head(model_cfg, kind, num_labels, dtype, remat) -> flax module (see the module docstring);
  convert(task, examples, tokenizer, max_seq_length, **kwargs) -> features (SQuAD: (features, windows));
  encoder_key: the encoder's top-level parameter name, shared with pretraining ('bert', 'transformer');
  flops_per_example(model_cfg, seq_len) -> training FLOPs of one row; dropout_fields: the model config's dropouts.
  """
  make_head: Callable[..., Any]
  convert: Callable[..., Any]
  encoder_key: str
  flops_per_example: Callable[[ml_collections.ConfigDict, int], float]
  dropout_fields: tuple[str, ...] = ()


def _features(adapter, task, kind, examples, tokenizer, config, is_training):
  name = 'glue' if task == LEARNABLE else _registry_name(task)
  name = 'sst2' if task == LEARNABLE else name
  if kind == 'squad':
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


def run_task(config: ml_collections.ConfigDict, adapter: ModelAdapter, task: str, tokenizer,
             model_cfg: ml_collections.ConfigDict, encoder_params: Mapping[str, Any] | None, workdir: str | None,
             data_dir: str | None = None) -> dict:
  """Fine-tunes once per seed in `config.seeds` with `common.trainer.train`, evaluates on the dev split (train
  when the task has no dev file) and returns `{'metrics': {metric: {mean, std, values}}, 'runs': [...]}`; with a
  `workdir` also writes `metrics.json` and `seed_<s>/predictions.json` there (each seed trains in `seed_<s>/`).
  `encoder_params` None: the encoder is randomly initialised.
  """
  kind = task_kind(task)
  model_cfg = ml_collections.ConfigDict(model_cfg.to_dict())
  if config.dropout >= 0:
    for field in adapter.dropout_fields:
      model_cfg[field] = float(config.dropout)
  head = adapter.make_head(model_cfg, kind, num_labels(task), jnp.dtype(config.dtype), config.remat)
  train_examples = load_examples(task, 'train', data_dir, config)
  try:
    eval_examples = load_examples(task, 'dev', data_dir, config)
  except (FileNotFoundError, ValueError):
    eval_examples = train_examples
  train_features, _ = _features(adapter, task, kind, train_examples, tokenizer, config, True)
  eval_features, eval_windows = _features(adapter, task, kind, eval_examples, tokenizer, config, False)
  train_batch = batch_features(kind, train_features)
  num_rows = len(train_batch['input_ids'])
  steps = max(1, math.ceil(config.epochs * num_rows / config.global_batch_size))
  objective = make_objective(head, kind, train_batch, adapter.flops_per_example(model_cfg, config.max_seq_length),
                             config.max_seq_length)
  runs = []
  for seed in list(config.seeds):
    run_cfg = ml_collections.ConfigDict(config.to_dict())
    run_cfg.seed = int(seed)
    run_cfg.num_train_steps = steps
    run_cfg.optim.learning_rate = float(config.learning_rate)
    run_cfg.optim.warmup_steps = int(config.warmup_proportion * steps)
    run_cfg.optim.layer_decay = float(config.layer_decay)
    run_cfg.model = model_cfg
    seed_dir = os.path.join(workdir, f'seed_{seed}') if workdir else None
    initial = None
    if encoder_params is not None:
      fresh = jax.device_get(jax.jit(lambda r: nn.meta.unbox(objective.init_variables(r))['params'])(
          jax.random.PRNGKey(run_cfg.seed)))
      initial = graft_encoder(fresh, encoder_params, adapter.encoder_key)
    loader = make_loader(train_batch, config.global_batch_size, seed=int(seed))
    state, history = trainer.train(run_cfg, objective, loader, None, workdir=seed_dir, initial_params=initial)
    logits = predict(head, state.params, eval_features, config.eval_batch_size)
    metrics, predictions = compute_metrics(task, kind, logits, eval_features, eval_examples, eval_windows,
                                           config=config)
    runs.append(dict(seed=int(seed), metrics=metrics, history=history, steps=steps))
    if seed_dir and jax.process_index() == 0:
      with open(os.path.join(seed_dir, 'predictions.json'), 'w') as f:
        json.dump(predictions, f)
  summary = task_metrics.summarize_seeds([r['metrics'] for r in runs]) if runs[0]['metrics'] else {}
  result = dict(task=task, metrics=summary, runs=[dict(seed=r['seed'], metrics=r['metrics']) for r in runs])
  if workdir and jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, 'metrics.json'), 'w') as f:
      json.dump(result, f, indent=2, default=float)
  result['runs'] = runs
  return result
