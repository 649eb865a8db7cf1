"""Fine-tuning settings and command line: the config (`finetune_config`), the seeds to run, the `--init` choice, how a
metric is printed, and `main`, the command line of the models' `python -m <model>_jax.finetune`."""
from __future__ import annotations

import math
import sys
from typing import Any, Callable, Mapping

import ml_collections
import numpy as np

from common import optim, tasks, trainer
from common.config import UserError


def finetune_config(**overrides) -> ml_collections.ConfigDict:
  """The trainer config plus the fine-tuning fields.

  learning_rate, warmup_proportion (of the total steps), epochs, global_batch_size, max_seq_length, layer_decay,
  seeds (a tuple: one run per seed, metrics reported as mean ± std; empty: the one run of `seed`; on the command
  line `--config.seeds=0,1,2` or `'[0,1,2]'`), doc_stride / max_query_length / max_answer_length /
  n_best_size (SQuAD), squad_head ('simple', 'beam' or '' for the model's default) with start_n_top / end_n_top
  (the beam's widths), eval_batch_size, num_train_examples / num_eval_examples (the first N examples of the train /
  dev split, every task; 0 = all, `learnable` generates 2000 / 400), learnable_max_words, length_buckets (pad each
  batch to the smallest of this many lengths, multiples of 8 up to max_seq_length, that fits its longest row; 1 =
  every row padded to max_seq_length; see `TaskLoader`), min_bucket_batches (a bucket length that fewer than this
  many of the run's training batches, or of an evaluation's batches, would use is computed at the next longer length
  in use: one compiled program less for a few longer batches; 0 = every bucket), group_by_length (K > 1: batches of
  rows of similar length, sorted within windows of K batches; 0 = plain shuffle), pack_examples (True: a
  classification or regression task of a model whose heads read packed rows, BERT's, trains on each step's
  examples laid end to end in a few rows, `common.finetune_packing`: the same examples and results up to float
  rounding, far fewer positions computed, one compiled step; ignored where it does not apply: other kinds and
  models, several processes, gradient accumulation, or when the packed rows would compute no fewer positions than
  the length buckets), dtype, remat, dropout (>= 0
  replaces the model's dropout rates), regression_bias ('label_mean', the default: a regression head's output bias
  starts at the mean training label; 'zero': at 0, as the original BERT and HF start every head; see
  `regression_bias`). eval_every (N > 0: evaluate the dev split with the task's metrics every N
  steps and at the end), with select_best (report, and write the predictions and parameters of, the evaluation with
  the best `best_metric`; '' = the task's main metric, see `main_metric`).
  """
  config = trainer.trainer_config(global_batch_size=32, log_every=50, eval_every=0, num_eval_batches=0,
                                  checkpoint_every=0, keep_checkpoints=1, progress_bar=False)
  config.optim = optim.optim_config(learning_rate=2e-5, warmup_steps=0, weight_decay=0.01, clip_grad_norm=1.0)
  config.update(dict(
      learning_rate=2e-5, warmup_proportion=0.1, epochs=3.0, max_seq_length=128, layer_decay=1.0, seeds=(),
      doc_stride=128, max_query_length=64, max_answer_length=30, n_best_size=20, squad_head='', start_n_top=5,
      end_n_top=5, eval_batch_size=64,
      num_train_examples=0, num_eval_examples=0, learnable_max_words=24, length_buckets=4, min_bucket_batches=8,
      group_by_length=0, pack_examples=True,
      select_best=True, best_metric='',
      dtype='float32',
      remat=False, dropout=-1.0, regression_bias='label_mean',
  ))
  config.update(overrides)
  return config


REGRESSION_BIAS = ('label_mean', 'zero')


def regression_bias(config: ml_collections.ConfigDict) -> str:
  """`config.regression_bias`, refused (a UserError) when it is not one of `REGRESSION_BIAS`.

  Why the mean: fine-tuning moves a freshly drawn head slowly (Adam moves a weight by about the learning rate a
  step, 2e-5 by default, so in a few hundred steps a bias travels well under 0.01). A regression head that starts
  at 0 must then reach labels centred far from 0 (STS-B: 0 to 5, mean 2.7) through its initial weights alone, whose
  reach is bounded by the sum of their magnitudes (~5.5 for 384 weights drawn at 0.02) times a tanh-bounded pooled
  vector: the scores stay compressed towards 0 and the run depends on how large the head's draw happened to be.
  Started at the mean, the head only has to span the labels' spread (benchmarks/README.md, run T).
  """
  value = config.get('regression_bias', 'zero')
  if value not in REGRESSION_BIAS:
    raise UserError(f'config.regression_bias: must be one of {REGRESSION_BIAS}, got {value!r}')
  return value


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


RANDOM_INIT = 'none'


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
    tasks.check_task(values.task)  # before any model is loaded
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
