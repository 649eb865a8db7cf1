"""ELMo feature-based fine-tuning on the registry's tasks (Peters et al. 2018, section 3.3): task files / the
generated task -> words (`elmo_jax.tokenizer.split_words`) -> character ids -> a small task model trained by
`common.trainer.train` on the frozen biLM's scalar-mixed layers (`elmo_jax.task_model`) -> official metrics.

  python -m elmo_jax.finetune --task glue/rte --init runs/elmo_tiny --workdir runs/rte --data_dir glue/RTE
  python -m elmo_jax.finetune --task glue/sts-b --init BILM_DIR --workdir runs/stsb --data_dir glue/STS-B \
      --config.seeds=0,1,2
  python -m elmo_jax.finetune --task learnable --init runs/elmo_tiny --workdir runs/learnable

`--task`: a classification task (`learnable`, `glue/<name>`; one text -> `classification`, a pair -> `pair`), a
regression task (`glue/sts-b` -> `regression` / `pair_regression`) or a tagging task (`conll2003` -> `tagging`, one
tag per word: ELMo reads whole words, so no word is split); multiple choice and SQuAD are not offered. Read from
`--data_dir` (the task's original files), else from TFDS, by the readers the other models use (`common.tasks`).
`--init`: a pretraining workdir (its newest checkpoint) or a biLM directory (`options.json` + `weights.hdf5`), or
`none` (a random frozen biLM with the architecture of `--model_from=DIR`). Every `--config.KEY=VALUE` of
`elmo_jax/configs/finetune.py` can be overridden. Writes `metrics.json` (mean ± std over `config.seeds`, the layout
of `common.finetune`) and per seed `seed_<s>/predictions.json` to `--workdir`.

The runner shares with `common.finetune` the readers (`load_train_and_eval`), the metrics of the task kinds
(`common.task_kinds` through `evaluate_predictions`), the trainer, the best-evaluation tracking and the summary; its
own part is the conversion to character ids, the loader of those rows (each batch cut to the smallest of
`config.length_buckets` lengths that holds it: the LSTMs' cost grows with the length) and the prediction loop.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from common import finetune as common_finetune
from common import storage, task_kinds, tasks, trainer
from common.config import UserError
from common.data import pipeline
from common.finetune_config import main, regression_bias, resolve_init, run_seeds
from common.finetune_eval import BestEvaluation, evaluate_predictions, final_evaluation, json_safe
from common.finetune_loader import FeatureSource, bucket_lengths, load_train_and_eval
from elmo_jax import features, task_model, tokenizer, weights
from elmo_jax import model as elmo_model

__all__ = ['convert', 'load_init', 'model_kind', 'predict', 'run']

# A registry kind -> the task model's kind for one text and for a pair of texts.
MODEL_KINDS = {'classification': ('classification', 'pair'), 'regression': ('regression', 'pair_regression'),
               'token': ('tagging', 'tagging')}


def load_init(path: str) -> tuple[ml_collections.ConfigDict, Any, None]:
  """(biLM config, biLM params, None) of a pretraining workdir or a biLM directory (`features.load_bilm`); a
  missing or unusable directory is a one-line UserError."""
  from common import checkpoint  # pylint: disable=import-outside-toplevel
  if not storage.isdir(path):
    raise UserError(f'--init {path!r}: not a directory (give an ELMo pretraining workdir or a biLM directory with '
                    f'{weights.OPTIONS_FILE} and weights.hdf5)')
  has_options = storage.exists(storage.join(path, weights.OPTIONS_FILE))
  if not has_options and not storage.exists(storage.join(path, checkpoint.CONFIG_FILE)):
    raise UserError(f'--init {path!r}: neither {weights.OPTIONS_FILE} (a biLM directory) nor '
                    f'{checkpoint.CONFIG_FILE} (a pretraining workdir) found there')
  bilm = features.load_bilm(path)
  return bilm.config, bilm.params, None


def _random_bilm(cfg: ml_collections.ConfigDict) -> features.BiLM:
  """A biLM of architecture `cfg` with random weights (`--init none`)."""
  chars = int(cfg.max_characters_per_token)
  variables = jax.jit(elmo_model.ElmoBiLM(cfg).init)({'params': jax.random.PRNGKey(0)},
                                                     jnp.zeros((1, 3, chars), jnp.int32), jnp.array([3]))
  params = jax.tree.map(np.asarray, jax.device_get(jax.tree.map(
      lambda x: x.unbox() if hasattr(x, 'unbox') else x, variables['params'], is_leaf=lambda x: hasattr(x, 'unbox'))))
  return features.BiLM(cfg, params)


def model_kind(task: str, examples: Sequence) -> str:
  """The task model's kind (`task_model.KINDS`) of `task` given its examples (a pair when any has a `text_b`)."""
  info = tasks.command_line_task(task)
  if info.kind not in MODEL_KINDS:
    raise UserError(f'--task {task}: ELMo fine-tuning offers classification, regression and tagging tasks; '
                    f'{task} is a {info.kind} task')
  single, pair = MODEL_KINDS[info.kind]
  return pair if any(getattr(e, 'text_b', None) is not None for e in examples) else single


def _sentence_rows(sentences: Sequence[Sequence[str]], config, max_characters: int, suffix: str = '') -> dict:
  batch = features.sentences_to_batch(sentences, max_seq_length=int(config.max_seq_length),
                                      max_characters=max_characters)
  return {k + suffix: v for k, v in batch.items()}


def convert(task: str, kind: str, examples: Sequence, config, max_characters: int) -> tuple[dict, dict]:
  """(the task model's rows `{char_ids, lengths, word_mask, [..._b], labels}`, what `common.task_kinds` evaluates:
  `{label}` or, for tagging, `{label_weights}` at the kept words' positions) of `examples`. Texts are split into
  words as in pretraining; a tagging example keeps its own words. Words beyond `max_seq_length - 2` are cut."""
  if kind == 'tagging':
    names = {name: i for i, name in enumerate(tasks.label_list(tasks.registry_name(task)))}
    rows = _sentence_rows([e.words for e in examples], config, max_characters)
    labels = np.zeros(rows['word_mask'].shape, np.int32)
    for i, example in enumerate(examples):
      tags = [names[t] for t in example.tags][:int(rows['lengths'][i]) - 2]
      labels[i, 1:1 + len(tags)] = tags
    rows['labels'] = labels
    return rows, {'label_weights': rows['word_mask']}
  rows = _sentence_rows([tokenizer.split_words(e.text_a) for e in examples], config, max_characters)
  if kind in task_model.PAIR_KINDS:
    rows.update(_sentence_rows([tokenizer.split_words(e.text_b or '') for e in examples], config, max_characters,
                               '_b'))
  if kind in task_model.REGRESSION_KINDS:
    rows['labels'] = np.asarray([math.nan if e.label is None else float(e.label) for e in examples], np.float32)
  else:
    rows['labels'] = np.asarray([-1 if e.label is None else int(e.label) for e in examples], np.int32)
  return rows, {'label': rows['labels']}


def _cut(batch: dict, buckets: Sequence[int]) -> dict:
  """`batch` cut on its length axis to the smallest of `buckets` that holds its longest sentence (`<S>`, `</S>`
  included)."""
  full = batch['word_mask'].shape[1]
  need = max(int(np.max(batch[k])) for k in ('lengths', 'lengths_b') if k in batch)
  length = next(b for b in sorted(buckets) if b >= need)
  if length >= full:
    return batch
  return {k: (np.ascontiguousarray(v[:, :length]) if v.ndim >= 2 and v.shape[1] == full else v)
          for k, v in batch.items()}


def predict(predictor: Callable, params, rows: dict, batch_size: int, buckets: Sequence[int]) -> np.ndarray:
  """The task model's outputs on every row, in row order (rows sorted by length into batches cut as in training,
  the last batch padded with copies of its first row; tagging logits padded back to the full length)."""
  params = jax.device_get(params)
  full = rows['word_mask'].shape[1]
  need = np.maximum(rows['lengths'], rows.get('lengths_b', rows['lengths']))
  order = np.argsort(need, kind='stable')
  inputs = {k: v for k, v in rows.items() if k != 'labels'}
  out = []
  for start in range(0, len(order), batch_size):
    index = order[start:start + batch_size]
    index = np.concatenate([index, np.repeat(index[:1], batch_size - len(index))])
    logits = np.asarray(predictor(params, _cut({k: v[index] for k, v in inputs.items()}, buckets)))
    if logits.ndim == 3:
      logits = np.pad(logits, [(0, 0), (0, full - logits.shape[1]), (0, 0)])
    out.append(logits[:min(batch_size, len(order) - start)])
  result = np.concatenate(out)
  inverse = np.empty_like(order)
  inverse[order] = np.arange(len(order))
  return result[inverse]


@dataclasses.dataclass
class _Plan:
  """What every seed's run of a task shares."""
  task: str
  kind: str
  train_rows: dict
  eval_rows: dict
  eval_labels: dict
  eval_examples: list
  train_examples: int
  steps: int
  buckets: list
  objective: trainer.Objective
  predictor: Callable

  def evaluate(self, config, params) -> tuple[dict, dict]:
    outputs = predict(self.predictor, params, self.eval_rows, int(config.eval_batch_size), self.buckets)
    registry_kind = tasks.command_line_task(self.task).kind
    return evaluate_predictions(self.task, task_kinds.get(registry_kind), outputs, self.eval_labels,
                                self.eval_examples, config=config)


def _head_options(config) -> dict:
  return dict(hidden_size=int(config.task_hidden_size), layer_norm=bool(config.scalar_mix_layer_norm))


def _plan(config, task: str, bilm: features.BiLM, data_dir: str | None) -> _Plan:
  train_examples, eval_examples = load_train_and_eval(task, data_dir, config)
  kind = model_kind(task, train_examples)
  chars = int(bilm.config.max_characters_per_token)
  train_rows, _ = convert(task, kind, train_examples, config, chars)
  eval_rows, eval_labels = convert(task, kind, eval_examples, config, chars)
  labels = max(tasks.command_line_task(task).num_labels, 1)
  dropout = float(config.dropout) if config.dropout >= 0 else 0.1
  objective = task_model.make_task_objective(bilm, kind, labels, max_seq_length=int(config.max_seq_length),
                                             dropout=dropout, **_head_options(config))
  predictor = task_model.make_predictor(bilm, kind, labels, **_head_options(config))
  steps = max(1, math.ceil(config.epochs * len(train_examples) / config.global_batch_size))
  buckets = bucket_lengths(int(config.max_seq_length), int(config.get('length_buckets', 1)))
  return _Plan(task, kind, train_rows, eval_rows, eval_labels, eval_examples, len(train_examples), steps, buckets,
               objective, predictor)


def _run_seed(config, plan: _Plan, seed: int, seed_dir: str | None) -> tuple[dict | None, dict | None]:
  """(the run's entry, None), or (None, partial) when a preemption notice stopped it (the step reached
  checkpointed); the entries are those of `common.finetune.run_task`."""
  loader = pipeline.StepLoader(FeatureSource(plan.train_rows),
                               lambda records, keys, epoch: _cut(pipeline.stack_rows(records), plan.buckets),
                               config.global_batch_size, seed=seed, shuffle=True, drop_remainder=False,
                               process_index=jax.process_index(), process_count=jax.process_count())
  run_cfg = ml_collections.ConfigDict(config.to_dict())
  run_cfg.update(seed=seed, num_train_steps=plan.steps)
  run_cfg.optim.update(learning_rate=float(config.learning_rate),
                       warmup_steps=int(config.warmup_proportion * plan.steps))
  evaluate_params = lambda params: plan.evaluate(config, params)
  # Without periodic evals the trainer still runs the final one, while the final checkpoint is written.
  tracker = BestEvaluation(evaluate_params, config.best_metric, keep_best=bool(config.eval_every))
  bias = common_finetune.mean_label_bias(config, plan.kind in task_model.REGRESSION_KINDS,
                                         plan.train_rows['labels'], task_model.OUTPUT_LAYER)
  # The trainer's own draw, the output bias set (made while the train step compiles; not at all on resume).
  initial = functools.partial(common_finetune.fresh_params, plan.objective, seed, bias) if bias else None
  state, history = trainer.train(run_cfg, plan.objective, loader, None, workdir=seed_dir, eval_fn=tracker,
                                 initial_params=initial)
  reached = int(jax.device_get(state.step))
  if reached < plan.steps:
    return None, dict(seed=seed, step=reached, steps=plan.steps)
  metrics, files, best, _ = final_evaluation(tracker, evaluate_params, state.params, config.select_best)
  if seed_dir and jax.process_index() == 0:
    os.makedirs(seed_dir, exist_ok=True)
    for name, content in files.items():
      with open(os.path.join(seed_dir, name), 'w') as f:
        json.dump(json_safe(content), f)
  return dict(seed=seed, metrics=metrics, history=history, steps=plan.steps, predictions=files, throughput={},
              train_examples=plan.train_examples, best=best), None


def run(config: ml_collections.ConfigDict, task: str, init: str, workdir: str | None, data_dir: str | None = None,
        model_from: str | None = None) -> dict:
  """Fine-tunes a task model on the frozen biLM of `init` once per seed of `run_seeds(config)` and returns
  `{'task', 'metrics': {metric: {mean, std, values}}, 'runs': [...]}` as `common.finetune.run_task` does (with a
  `workdir`, also `metrics.json` and `seed_<s>/predictions.json` there; `partial` when a preemption notice stopped
  a seed, which the same call resumes)."""
  info = tasks.command_line_task(task)
  if info.kind not in MODEL_KINDS:
    model_kind(task, ())  # The one-line refusal, before any weights are read.
  regression_bias(config)  # a bad value is refused before the weights and the data are read
  model_cfg, params, _ = resolve_init(init, model_from, load_init)
  bilm = features.BiLM(model_cfg, params) if params is not None else _random_bilm(model_cfg)
  plan = _plan(config, task, bilm, data_dir)
  runs, partial = [], None
  for seed in run_seeds(config):
    seed_dir = os.path.join(workdir, f'seed_{seed}') if workdir else None
    entry, partial = _run_seed(config, plan, int(seed), seed_dir)
    if partial is not None:
      break
    runs.append(entry)
  return common_finetune.summarize(task, runs, partial, workdir)


if __name__ == '__main__':
  main(run, 'ELMo', os.path.join(os.path.dirname(__file__), 'configs', 'finetune.py'))
