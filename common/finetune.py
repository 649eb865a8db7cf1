"""The one fine-tuning runner: a task's examples -> the model's features -> `common.trainer.train` -> predictions ->
official metrics, once per seed. No second training loop; model-agnostic.

A model plugs in a `common.model_adapter.ModelAdapter` (its heads, its feature converters, its encoder's parameter
path; `<model>_jax/tasks.py`), and `python -m bert_jax.finetune` / `xlnet_jax.finetune` are thin entry points over
`main`. The task comes from the registry (`common.tasks`), its head family from `common.task_kinds`, looked up once
(`training_kind`: a SQuAD task trains the kind of `config.squad_head`). The pieces: settings
(`common.finetune_config`), data and the length-bucketed loader (`common.finetune_loader`), the objective and
prediction (`common.finetune_head`), evaluation (`common.finetune_eval`; SQuAD's in `common.squad_predictions`).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import shutil
import signal
import threading
from typing import Any, Callable, Mapping

import jax
import ml_collections
import numpy as np
from absl import logging as absl_logging
from flax import linen as nn

from common import checkpoint, compile_ahead, layers, task_kinds, task_metrics, tasks, trainer
from common import metrics as metrics_lib
from common.finetune_config import finetune_config, format_metric, main, regression_bias, resolve_init, run_seeds
from common.finetune_eval import (BestEvaluation, evaluate_predictions, final_evaluation, json_safe,
                                  mean_flops_and_length, throughput)
from common.finetune_head import check_graft, compile_predict, graft_encoder, make_objective, predict, predict_function
from common.finetune_loader import (batch_features, batch_shards, bucket_lengths, computed_positions, convert,
                                    fold_lengths, load_examples, load_train_and_eval, make_loader, min_bucket_batches,
                                    packing)
from common.model_adapter import ModelAdapter
from common.tasks import check_task, task_names

# What callers of the runner use (the entry points, the benchmarks, the tests); defined in the modules above.
__all__ = ['BestEvaluation', 'ModelAdapter', 'batch_features', 'bind', 'bucket_lengths', 'check_task', 'convert',
           'evaluate_predictions', 'finetune_config', 'fold_lengths', 'format_metric', 'fresh_params',
           'graft_encoder', 'load_examples', 'main', 'make_loader', 'make_objective', 'mean_label_bias',
           'num_labels', 'packing', 'predict', 'predict_function', 'resolve_init', 'run_seeds', 'run_task',
           'summarize', 'task_kind', 'task_names', 'training_kind']


def task_kind(task: str) -> str:
  """The kind (a `common.task_kinds` name) of a `--task` name."""
  return tasks.command_line_task(task).kind


def num_labels(task: str) -> int:
  return max(tasks.command_line_task(task).num_labels, 1)


def training_kind(task: str, config: ml_collections.ConfigDict, adapter: ModelAdapter) -> task_kinds.TaskKind:
  """The kind trained for `task`: its own, or for SQuAD that of `config.squad_head` ('' = the model's default)."""
  return task_kinds.get(task_kind(task)).choose(config.get('squad_head', ''), adapter.squad_heads)


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


@dataclasses.dataclass
class _Plan:
  """What every seed's run of a task shares: the head, its objective and inputs, and the evaluation split."""
  task: str
  kind: task_kinds.TaskKind
  head: Any
  model_cfg: ml_collections.ConfigDict
  train_batch: dict
  steps: int
  buckets: list
  pack: bool
  objective: trainer.Objective
  eval_features: dict
  eval_examples: list
  eval_windows: list | None
  train_examples: int
  predict_ahead: compile_ahead.Ahead | None = None  # the prediction programs, compiled while the run trains

  def compile_predict_ahead(self, config, predict_fn, param_shapes) -> None:
    self.predict_ahead = compile_ahead.Ahead('predictions', lambda: compile_predict(
        predict_fn, param_shapes, self.eval_features, config.eval_batch_size, self.kind, buckets=self.buckets,
        min_bucket_batches=min_bucket_batches(config)))

  def evaluate(self, config, params, predict_fn) -> tuple[dict, dict]:
    compile_ahead.wait(self.predict_ahead)
    logits = predict(self.head, params, self.eval_features, config.eval_batch_size, self.kind, fn=predict_fn,
                     buckets=self.buckets, min_bucket_batches=min_bucket_batches(config))
    return evaluate_predictions(self.task, self.kind, logits, self.eval_features, self.eval_examples,
                                self.eval_windows, config=config)


def bind(adapter: ModelAdapter, load_init: Callable[[str], tuple]) -> Callable[..., dict]:
  """A model entry point's `run(config, task, init, workdir, data_dir=None, model_from=None)`: fine-tunes from
  `init` (a directory, or `none`: random weights with `model_from`'s architecture and tokenizer; see
  `resolve_init`) with `adapter`."""
  def run(config: ml_collections.ConfigDict, task: str, init: str, workdir: str | None, data_dir: str | None = None,
          model_from: str | None = None) -> dict:
    model_cfg, encoder, tokenizer = resolve_init(init, model_from, load_init)
    return run_task(config, adapter, task, tokenizer, model_cfg, encoder, workdir, data_dir)
  return run


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
  trainer.use_compilation_cache(config.get('compilation_cache_dir', ''))  # the prediction programs too
  with StopNotice() as notice:
    kind = training_kind(task, config, adapter)
    seeds = run_seeds(config)
    regression_bias(config)  # a bad value is refused before the data is read
    plan = _plan(config, adapter, task, kind, seeds[0], tokenizer, model_cfg, data_dir)
    output_bias = _output_bias(config, plan, adapter)
    runs, partial = [], None
    init_head, param_shapes = _head_initializer(plan, adapter.encoder_key)
    encoder_shapes = {adapter.encoder_key: param_shapes[adapter.encoder_key]}
    if encoder_params is not None:
      check_graft(param_shapes, encoder_params, adapter.encoder_key)  # refused before anything trains
    predict_fn = predict_function(plan.head, plan.kind)
    # The MFU denominator is a matmul timed on this host (once per process): timed while the prediction programs
    # compile on a thread, it would read low and inflate every logged MFU.
    metrics_lib.peak_flops_per_device(config.peak_flops_per_device)
    plan.compile_predict_ahead(config, predict_fn, param_shapes)
    for seed in seeds:
      seed_dir = os.path.join(workdir, f'seed_{seed}') if workdir else None
      if notice.requested:
        partial = dict(seed=int(seed), step=_checkpointed_step(seed_dir), steps=plan.steps)
        break
      initial = None  # made by the trainer while the train step compiles (not at all on resume)
      if encoder_params is not None:
        initial = functools.partial(_grafted_params, init_head, int(seed), encoder_shapes, encoder_params,
                                    adapter.encoder_key, output_bias)
      elif output_bias:  # random weights (the trainer's own draw), the output bias set
        initial = functools.partial(fresh_params, plan.objective, int(seed), output_bias)
      run, partial = _run_seed(config, plan, int(seed), initial, seed_dir, lambda: notice.requested, predict_fn)
      if partial is not None:
        break
      runs.append(run)
    return summarize(task, runs, partial, workdir)


def _grafted_params(init_head, seed: int, encoder_shapes: dict, encoder_params, encoder_key: str,
                    output_bias: dict | None = None) -> dict:
  """The run's starting parameters: the head's fresh init for `seed`, the pretrained encoder grafted in, the
  output bias set where `output_bias` says (`_output_bias`)."""
  fresh = dict(jax.device_get(init_head(jax.random.PRNGKey(seed))), **encoder_shapes)
  return _with_output_bias(graft_encoder(fresh, encoder_params, encoder_key), output_bias)


def fresh_params(objective: trainer.Objective, seed: int, output_bias: dict | None) -> dict:
  """The parameters the trainer would draw for a fresh run of `seed` (`trainer.seed_keys`), the output bias set
  (`output_bias`, e.g. `mean_label_bias`'s)."""
  draw = jax.jit(lambda rng: nn.meta.unbox(objective.init_variables(rng))['params'])
  return _with_output_bias(jax.device_get(draw(trainer.seed_keys(seed)[0])), output_bias)


def mean_label_bias(config, regression: bool, labels, layer: str) -> dict | None:
  """{`layer`: the mean of the training `labels`} for a `regression` task under `config.regression_bias`
  'label_mean' (`common.finetune_config.regression_bias` says why), else None."""
  if not regression or regression_bias(config) != 'label_mean':
    return None
  labels = np.asarray(labels, np.float64)
  labels = labels[np.isfinite(labels)]  # NaN: an unlabelled row
  if not labels.size:
    return None
  absl_logging.info('config.regression_bias: the regression head starts at the mean training label %.4f',
                    labels.mean())
  return {layer: float(labels.mean())}


def _output_bias(config, plan: _Plan, adapter: ModelAdapter) -> dict | None:
  """`mean_label_bias` of `plan`'s training labels in the adapter's output layer (None for a kind other than
  regression, whose features may hold no `label`: SQuAD's)."""
  if plan.kind.name != 'regression':
    return None
  return mean_label_bias(config, True, plan.train_batch['label'], adapter.output_layer)


def _with_output_bias(params: dict, output_bias: dict | None) -> dict:
  """`params` with each `output_bias` layer's bias filled with its value."""
  if not output_bias:
    return params
  params = dict(params)
  for layer, value in output_bias.items():
    if 'bias' not in params.get(layer, {}):
      raise ValueError(f'the head has no output layer {layer!r} with a bias (ModelAdapter.output_layer)')
    params[layer] = dict(params[layer], bias=np.full_like(np.asarray(params[layer]['bias']), value))
  return params


def _head_initializer(plan: _Plan, encoder_key: str) -> tuple[Callable, dict]:
  """(jitted `rng -> the fresh parameters of every subtree but the encoder`, the shapes of all the parameters): the
  encoder's initialisers are dead code in that program (the pretrained encoder replaces them), so XLA never
  compiles them; the head's values are those of the full init (each parameter's bits come from its own key)."""
  params = lambda r: nn.meta.unbox(plan.objective.init_variables(r))['params']
  shapes = jax.eval_shape(params, jax.random.PRNGKey(0))
  head = jax.jit(lambda r: {k: v for k, v in params(r).items() if k != encoder_key})
  return head, shapes


def _plan(config, adapter: ModelAdapter, task: str, kind: task_kinds.TaskKind, first_seed: int, tokenizer, model_cfg,
          data_dir) -> _Plan:
  """The head, features, objective and evaluation split of `task` trained as `kind` (every seed's run shares
  them; the FLOPs are counted on the batches of `first_seed`)."""
  model_cfg = ml_collections.ConfigDict(model_cfg.to_dict())
  if config.dropout >= 0:
    for field in adapter.dropout_fields:
      model_cfg[field] = float(config.dropout)
  head = adapter.make_head(model_cfg, kind.name, num_labels(task), layers.compute_dtype(config.dtype), config.remat,
                           **kind.head_options(config))
  train_examples, eval_examples = load_train_and_eval(task, data_dir, config)
  train_features, _ = convert(adapter, task, kind, train_examples, tokenizer, config, True)
  eval_features, eval_windows = convert(adapter, task, kind, eval_examples, tokenizer, config, False)
  train_batch = batch_features(kind, train_features)
  steps = max(1, math.ceil(config.epochs * len(train_batch['input_ids']) / config.global_batch_size))
  buckets = bucket_lengths(config.max_seq_length, int(config.get('length_buckets', 1)))
  planned = make_loader(train_batch, config.global_batch_size, seed=first_seed, buckets=buckets,
                        **_loader_options(config, steps, pack=False))
  pack = False
  if packing(config, adapter, kind):
    packed = make_loader(train_batch, config.global_batch_size, seed=first_seed, buckets=buckets,
                         **_loader_options(config, steps, pack=True))
    pack = computed_positions(packed, range(steps)) < computed_positions(planned, range(steps))
    if pack:
      planned = packed
    else:  # e.g. a small batch split over many devices: a row per example anyway
      absl_logging.info('config.pack_examples: not packing (%d rows a step would compute no fewer positions)',
                        packed.num_rows)
  flops, positions = mean_flops_and_length(adapter, model_cfg, planned, steps)
  objective = make_objective(head, kind, train_batch, flops, max(1, round(positions)))
  return _Plan(task, kind, head, model_cfg, train_batch, steps, buckets, pack, objective, eval_features,
               eval_examples, eval_windows, len(train_examples))


def _loader_options(config, steps: int, pack: bool) -> dict:
  """`make_loader`'s keyword arguments for a run of `steps` steps (every seed's loader, packed or not)."""
  return dict(group=int(config.get('group_by_length', 0)), steps=steps, min_bucket_batches=min_bucket_batches(config),
              pack=pack, row_multiple=batch_shards(config))


def _run_config(config, plan: _Plan, seed: int) -> ml_collections.ConfigDict:
  run_cfg = ml_collections.ConfigDict(config.to_dict())
  run_cfg.seed = seed
  run_cfg.num_train_steps = plan.steps
  run_cfg.optim.learning_rate = float(config.learning_rate)
  run_cfg.optim.warmup_steps = int(config.warmup_proportion * plan.steps)
  run_cfg.optim.layer_decay = float(config.layer_decay)
  run_cfg.model = plan.model_cfg
  return run_cfg


def _run_seed(config, plan: _Plan, seed: int, initial, seed_dir: str | None, stop: Callable[[], bool],
              predict_fn) -> tuple[dict | None, dict | None]:
  """(the run's entry, None), or (None, partial) when a preemption notice stopped it (the step reached
  checkpointed)."""
  loader = make_loader(plan.train_batch, config.global_batch_size, seed=seed, buckets=plan.buckets, stop=stop,
                       **_loader_options(config, plan.steps, plan.pack))
  evaluate_params = lambda params: plan.evaluate(config, params, predict_fn)
  # Without periodic evals the trainer still runs the final one, while the final checkpoint is written.
  tracker = BestEvaluation(evaluate_params, config.best_metric, keep_best=bool(config.eval_every))
  state, history = trainer.train(_run_config(config, plan, seed), plan.objective, loader, None, workdir=seed_dir,
                                 initial_params=initial, eval_fn=tracker)
  reached = int(jax.device_get(state.step))
  if reached < plan.steps:  # Stopped by a preemption notice, the step reached checkpointed.
    return None, dict(seed=seed, step=reached, steps=plan.steps)
  speed = throughput(history, loader, loader.started_at)
  metrics, files, best, best_params = final_evaluation(tracker, evaluate_params, state.params, config.select_best)
  if best is not None:
    if seed_dir and jax.process_index() == 0:
      _save_params(os.path.join(seed_dir, 'best'), best_params)
    absl_logging.warning('seed %d: best %s %.4f at step %d of %d (reported)', seed, best['metric'],
                         best['value'], best['step'], plan.steps)
  if speed and jax.process_index() == 0:
    absl_logging.info('seed %d: real tokens/s %.0f; padding %.1f %% of the computed tokens (%.1f %% at full '
                      'length); batch lengths %s', seed, speed['real_tokens_per_sec'],
                      100 * speed['padding_computed'], 100 * speed['padding_without_buckets'], speed['lengths'])
  if seed_dir and jax.process_index() == 0:
    for name, content in files.items():
      with open(os.path.join(seed_dir, name), 'w') as f:
        json.dump(json_safe(content), f, indent=2 if name == 'nbest_predictions.json' else None)
  return dict(seed=seed, metrics=metrics, history=history, steps=plan.steps, predictions=files, throughput=speed,
              train_examples=plan.train_examples, best=best), None


def summarize(task: str, runs: list[dict], partial: dict | None, workdir: str | None) -> dict:
  """The result of a fine-tuning run of every seed (`run_task`; see there), shared by the runners that do not go
  through `run_task` (ELMo's feature-based one); writes `metrics.json` to `workdir` when every seed finished."""
  if partial is not None:
    return dict(task=task, metrics={}, partial=partial, runs=runs)
  summary = task_metrics.summarize_seeds([r['metrics'] for r in runs]) if runs[0]['metrics'] else {}
  result = dict(task=task, metrics=summary, runs=[dict(seed=r['seed'], metrics=r['metrics'], best=r['best'],
                                                       throughput=r['throughput']) for r in runs])
  if workdir and jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, 'metrics.json'), 'w') as f:
      json.dump(json_safe(result), f, indent=2)
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
