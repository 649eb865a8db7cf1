"""Fine-tuning evaluation: a task kind's post-processing of predictions into the official metrics and output files
(`evaluate_predictions`, dispatched to `common.task_kinds`), the best of a run's evaluations (`BestEvaluation`), and
what a run reports about its speed (`throughput`)."""
from __future__ import annotations

import collections
import math
from typing import Any, Callable, Mapping, Sequence

import jax
import ml_collections
import numpy as np

from common import task_kinds
from common.config import UserError
from common.finetune_loader import TaskLoader, computed_positions


def evaluate_predictions(task: str, kind: str | task_kinds.TaskKind, logits, features: Mapping[str, np.ndarray],
                         examples: Sequence, windows: Sequence[dict] | None = None, *,
                         config: ml_collections.ConfigDict | None = None) -> tuple[dict, dict]:
  """(official metrics, {file name: plain python content}) of one evaluated split: `predictions.json` for every
  kind; the squad kinds add `nbest_predictions.json` and `null_odds.json` (`common.squad_predictions.evaluate`)."""
  return task_kinds.get(kind).evaluate(task, logits, features, examples, windows, config)


def compute_metrics(task: str, kind: str | task_kinds.TaskKind, logits, features: Mapping[str, np.ndarray],
                    examples: Sequence, windows: Sequence[dict] | None = None, *,
                    config: ml_collections.ConfigDict | None = None) -> tuple[dict, Any]:
  """(official metrics, the content of `predictions.json`) of one evaluated split (see `evaluate_predictions`)."""
  metrics, files = evaluate_predictions(task, kind, logits, features, examples, windows, config=config)
  return metrics, files['predictions.json']


def mean_flops_and_length(adapter, model_cfg, loader: TaskLoader, steps: int) -> tuple[float, float]:
  """(training FLOPs, positions) of one example averaged over the run's `steps` batches at their padded lengths:
  what the trainer's model FLOP/s and tokens/s then count (it takes one number per example)."""
  computed = collections.Counter((loader.length(s), loader.computed_rows(s)) for s in range(steps))
  examples = steps * loader.global_batch_size
  flops = sum(n * rows * adapter.flops_per_example(model_cfg, length) for (length, rows), n in computed.items())
  positions = sum(n * rows * length for (length, rows), n in computed.items())
  return flops / examples, positions / examples


def throughput(history: Sequence[dict], loader: TaskLoader, start_step: int) -> dict:
  """Real (non-padding) tokens/s per log interval of `history` (added to its entries as `real_tokens_per_sec`,
  from the trainer's own interval timing), and over the run: the padding actually computed and what full padding
  would have computed. The first interval includes compilation; `real_tokens_per_sec` of the summary is the
  median of the later ones (the first when there is only one)."""
  previous, rates, real_tokens = start_step, [], {}
  for entry in history:
    if 'steps_per_sec' not in entry or entry['step'] <= previous:
      continue
    steps = range(previous, entry['step'])
    real_tokens.update((s, loader.real_tokens(s)) for s in steps)
    entry['real_tokens_per_sec'] = sum(real_tokens[s] for s in steps) * entry['steps_per_sec'] / len(steps)
    rates.append(entry['real_tokens_per_sec'])
    previous = entry['step']
  steps = range(start_step, previous)
  if not steps:
    return {}
  real = sum(real_tokens[s] for s in steps)
  computed = computed_positions(loader, steps)
  full = loader.global_batch_size * loader.tokens_per_row() * len(steps)
  return dict(real_tokens_per_sec=float(np.median(rates[1:] if len(rates) > 1 else rates)),
              padding_computed=1.0 - real / computed, padding_without_buckets=1.0 - real / full,
              lengths=sorted({loader.length(s) for s in steps}), buckets=list(loader.buckets), steps=len(steps))


def json_safe(value):
  """`value` with every non-finite float as None (JSON has no NaN: one seed's std is undefined)."""
  if isinstance(value, dict):
    return {k: json_safe(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [json_safe(v) for v in value]
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
  """Tracks the evaluations of one fine-tuning run (`eval_fn` for the trainer) and keeps the last one's metrics and
  output files, and with `keep_best` the best one's too, with its parameters (on the host). Without `keep_best`
  (a run evaluated only at its end) it is the trainer's final evaluation, which then runs while the final
  checkpoint is being written."""

  def __init__(self, evaluate_params: Callable[[Any], tuple[dict, dict]], preferred: str = '',
               keep_best: bool = True):
    self.evaluate_params = evaluate_params
    self.preferred = preferred
    self.keep_best = keep_best
    self.best = None   # (step, metrics, files, host params)
    self.last = None   # (step, metrics, files)
    self.metric = ''

  def __call__(self, step: int, params: Any) -> dict:
    metrics, files = self.evaluate_params(params)
    self.metric = self.metric or main_metric(metrics, self.preferred)
    self.last = (step, metrics, files)
    if self.keep_best and (self.best is None or metrics[self.metric] > self.best[1][self.metric]):
      self.best = (step, metrics, files, jax.device_get(params))
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float, np.floating, np.integer))}


def final_evaluation(tracker: BestEvaluation | None, evaluate_params: Callable[[Any], tuple[dict, dict]],
                     final_params: Any, select_best: bool) -> tuple[dict, dict, dict | None, Any]:
  """(metrics, files, best, best params) a run reports: the final parameters evaluated when nothing was tracked;
  else the best tracked evaluation (`select_best`; `best` describes it, its parameters are returned) or the last."""
  if tracker is None or tracker.last is None:
    metrics, files = evaluate_params(final_params)
    return metrics, files, None, None
  if select_best and tracker.best is not None:
    best_step, metrics, files, best_params = tracker.best
    best = dict(step=best_step, metric=tracker.metric, value=metrics[tracker.metric], last_step=tracker.last[0])
    return metrics, files, best, best_params
  _, metrics, files = tracker.last
  return metrics, files, None, None
