"""The cells of the comparison: one pretraining run per objective, one fine-tuning run (all seeds) per objective and
task. A finished cell leaves `cell.json` in its directory (written atomically, with the settings it was run under);
a rerun with the same settings returns it without recomputing, an unfinished cell resumes from its own checkpoints
(the trainer's), and a cell run under other settings is refused instead of being mixed into the table.
"""
from __future__ import annotations

import copy
import hashlib
import importlib
import json
import math
import os
import time
from typing import Any, Mapping

import jax
import ml_collections
import numpy as np

from benchmarks.compare import objectives
from common import metrics as metrics_lib
from common import pretrain
from common import recipe as recipe_lib
from common import run as run_lib
from common.finetune_eval import main_metric
from common.tasks import registry

CELL_FILE = 'cell.json'
LN2 = math.log(2.0)

# The eval metric that is each model's pretraining loss, and its unit (per predicted token of its own tokenizer).
PRETRAIN_LOSS = {
    'bert': ('eval/mlm_loss', 'masked WordPiece token'),
    'xlnet': ('eval/lm_loss', 'predicted sentencepiece token (permutation LM)'),
    'gpt': ('eval/lm_loss', 'byte-level BPE token (left-to-right)'),
    'elmo': ('eval/lm_loss', 'word (mean of the forward and backward LMs)'),
}


def settings_hash(settings: Mapping[str, Any]) -> str:
  return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def read_cell(cell_dir: str, settings: Mapping[str, Any]) -> dict | None:
  """The finished cell in `cell_dir`, None when there is none; refuses a cell run under other settings."""
  path = os.path.join(cell_dir, CELL_FILE)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    cell = json.load(f)
  if cell.get('settings_hash') != settings_hash(settings):
    raise ValueError(f'{path} was computed with other settings ({cell.get("settings")}); use another --out or '
                     f'delete that directory')
  return cell


def write_cell(cell_dir: str, settings: Mapping[str, Any], cell: dict) -> dict:
  cell = dict(cell, settings=dict(settings), settings_hash=settings_hash(settings))
  os.makedirs(cell_dir, exist_ok=True)
  tmp = os.path.join(cell_dir, CELL_FILE + '.tmp')
  with open(tmp, 'w') as f:
    json.dump(cell, f, indent=1, default=float)
  os.replace(tmp, os.path.join(cell_dir, CELL_FILE))
  return cell


def _count_params(params) -> int:
  return int(sum(np.size(x) for x in jax.tree.leaves(params)))


def _flops_per_example(recipe, config: ml_collections.ConfigDict) -> float:
  config = copy.deepcopy(config)
  recipe.finalize_config(config)
  return float(recipe.make_objective(config).flops_per_example)


def pretrain_cell(spec: objectives.ObjectiveSpec, preset: ml_collections.ConfigDict, cell_dir: str, corpus: str,
                  eval_corpus: str) -> dict:
  """Pretrains `spec` for the preset's FLOP budget in `cell_dir` (the data prepared once first: the vocabulary size
  is part of the FLOP count) and records steps, FLOPs, parameters, wall time, the train curve and the final eval."""
  config = objectives.pretrain_config(spec, preset, corpus, eval_corpus)
  settings = dict(kind='pretrain', objective=spec.name, config=config.to_dict(), budget=preset.budget_flops)
  cell = read_cell(cell_dir, settings)
  if cell is not None:
    return dict(cell, **read_run(cell_dir, spec, cell['flops_per_example'] * cell['settings']['config']
                                 ['global_batch_size']))
  recipe = recipe_lib.get(spec.model)
  config.data_dir = os.path.join(cell_dir, 'data')
  tokenizer, _, _ = recipe.prepare_data(config.data, config.data_dir)
  run_lib.fill_vocab_size(config.model, tokenizer.vocab_size)
  per_example = _flops_per_example(recipe, config)
  steps = objectives.set_steps(config, per_example, preset.budget_flops, preset.warmup_fraction)
  start = time.time()
  state, _ = pretrain.run(recipe, config, cell_dir)
  wall = time.time() - start
  if int(state.step) != steps:  # A preemption notice stops the trainer with a checkpoint: not a finished cell.
    raise RuntimeError(f'{spec.name}: pretraining stopped at step {int(state.step)} of {steps}; rerun to resume')
  flops_per_step = per_example * config.global_batch_size
  return write_cell(cell_dir, settings, dict(
      objective=spec.name, model=spec.model, steps=steps, flops_per_example=per_example,
      flops=steps * flops_per_step, params=_count_params(state.params), wall_s=wall,
      tokens_per_example=_tokens_per_example(config), vocab_size=int(config.model.vocab_size),
      **read_run(cell_dir, spec, flops_per_step)))


def read_run(cell_dir: str, spec: objectives.ObjectiveSpec, flops_per_step: float) -> dict:
  """From a pretraining run's metrics.jsonl: the train curve of the objective's own loss (FLOPs, nats), the final
  eval metrics, that loss in bits per predicted unit (`PRETRAIN_LOSS`); from goodput.jsonl the trainer's wall time
  summed over its invocations."""
  rows = metrics_lib.read_jsonl(os.path.join(cell_dir, 'metrics.jsonl'))
  loss_key, unit = PRETRAIN_LOSS[spec.model]
  train_key = 'train/' + loss_key.split('/', 1)[1]
  curve = [(r['step'] * flops_per_step, r[train_key]) for r in rows if train_key in r]
  evals = [r for r in rows if any(k.startswith('eval/') for k in r)]
  final_eval = {k: v for k, v in evals[-1].items() if k.startswith('eval/')} if evals else {}
  loss = final_eval.get(loss_key)
  goodput = os.path.join(cell_dir, 'goodput.jsonl')  # one line per trainer invocation (a resumed run has several)
  wall = sum(r['wall_s'] for r in metrics_lib.read_jsonl(goodput)) if os.path.exists(goodput) else None
  return dict(train_curve=curve, final_eval=final_eval, loss_bits=None if loss is None else loss / LN2,
              loss_unit=unit, train_wall_s=wall)


def _tokens_per_example(config: ml_collections.ConfigDict) -> int:
  data = config.data
  return int(data.get('max_seq_length', 0) or data.get('seq_len', 0))


def finetune_config(spec: objectives.ObjectiveSpec, preset: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The model's fine-tuning defaults with the preset's recipe, the same for every objective (the feature-based
  task model on a frozen biLM has its own learning rate: it trains from scratch)."""
  config = importlib.import_module(f'{spec.model}_jax.configs.finetune').get_config()
  ft = preset.finetune
  config.update(learning_rate=ft.learning_rate, epochs=ft.epochs, global_batch_size=ft.batch_size,
                max_seq_length=ft.max_seq_length, num_train_examples=ft.num_train_examples,
                num_eval_examples=ft.num_eval_examples, warmup_proportion=ft.warmup_proportion,
                seeds=tuple(preset.seeds))
  config.mesh.update(**preset.mesh)
  if spec.downstream == 'feature-based':
    config.update(preset.feature_based.to_dict())
  return config


def finetune_cell(spec: objectives.ObjectiveSpec, task: str, preset: ml_collections.ConfigDict, cell_dir: str,
                  init_dir: str, data_dir: str | None) -> dict:
  """Fine-tunes (or, for ELMo, trains the feature-based task model on) `task` from the pretrained `init_dir` with
  every seed of the preset; `random-init` objectives take only the architecture and tokenizer from `init_dir`."""
  config = finetune_config(spec, preset)
  name = registry.canonical_task(task)
  if registry.task_info(name).kind == 'squad' and 'squad' in preset:
    config.update(preset.squad.to_dict())
  settings = dict(kind='finetune', objective=spec.name, task=name, config=config.to_dict(), data_dir=data_dir,
                  init=os.path.abspath(init_dir))
  cell = read_cell(cell_dir, settings)
  if cell is not None:
    return cell
  run = importlib.import_module(f'{spec.model}_jax.finetune').run
  start = time.time()
  if spec.pretrained:
    result = run(config, name, init_dir, cell_dir, data_dir)
  else:
    result = run(config, name, 'none', cell_dir, data_dir, model_from=init_dir)
  if result.get('partial'):
    raise RuntimeError(f'{spec.name} / {name} was stopped at {result["partial"]}; rerun to resume')
  summary = result['metrics']
  means = {k: v['mean'] for k, v in summary.items()}
  return write_cell(cell_dir, settings, dict(objective=spec.name, task=name, metrics=summary,
                                             main_metric=main_metric(means), wall_s=time.time() - start))
