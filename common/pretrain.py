"""The one pretraining runner: config -> corpus -> tokenizer -> shards -> sharded training -> checkpoints -> export,
for any model that provides a `common.recipe.Recipe`.

  python -m bert_jax.pretrain --config bert_jax/configs/tiny.py --workdir runs/bert_tiny
  python -m xlnet_jax.pretrain --config xlnet_jax/configs/base.py --workdir DIR --dry_run --target=tpu:v4-32

Each model's `pretrain.py` is `pretrain.main(RECIPE)`. Any config field can be overridden with `--config.KEY=VALUE`.
Re-running on the same workdir resumes from the newest checkpoint that verifies (data preparation is reused when its
inputs are unchanged). `--dry_run` only validates the config and compiles the train step for `--target`
(`common/fit.py`): memory per device, FLOPs, fits or not; no data, no workdir.
"""
from __future__ import annotations

import copy
import functools
import sys

import jax
import ml_collections
from absl import flags, logging
from ml_collections import config_flags

from common import checkpoint, distributed, fit, optim, sharding, storage, trainer
from common import run as run_lib
from common import recipe as recipe_lib
from common.recipe import Recipe


# ----------------------------------------------------------------------------------------------------------------------
# Config.
# ----------------------------------------------------------------------------------------------------------------------

def validate_config(recipe: Recipe, config: ml_collections.ConfigDict, num_devices: int) -> None:
  """Every check that needs no data, so a bad config is refused before any preparation or compile: the trainer
  and optimizer sections here, the model, data and dtype in the recipe. `model.vocab_size == 0` means "the
  tokenizer's vocabulary size", filled in once the tokenizer exists."""
  trainer.validate_trainer_config(config, num_devices)
  optim.validate_optim_config(config.optim, config.num_train_steps)
  recipe.validate(config)


def import_init(recipe: Recipe, config: ml_collections.ConfigDict):
  """`config.init_from` (an HF directory of the recipe's model): its architecture replaces config.model's, its
  tokenizer file the data's (continued pretraining). Returns its params."""
  return run_lib.import_init(config, recipe.load_hf_dir, recipe.architecture_fields, recipe.tokenizer_file,
                             recipe.tokenizer_field)


# ----------------------------------------------------------------------------------------------------------------------
# A run.
# ----------------------------------------------------------------------------------------------------------------------

def run(recipe: Recipe, config: ml_collections.ConfigDict, workdir: str) -> tuple[trainer.TrainState, list[dict]]:
  """Pretrains `recipe`'s model as `config` says, in `workdir` (resumed if it holds checkpoints)."""
  config = copy.deepcopy(config)
  validate_config(recipe, config, len(sharding.mesh_devices(config.mesh)))
  recipe.finalize_config(config)
  initial_params = import_init(recipe, config) if config.get('init_from') else None
  with checkpoint.WorkdirLock(workdir):  # one run per workdir, from data preparation to export
    return _run_locked(recipe, config, workdir, initial_params)


def _run_locked(recipe: Recipe, config: ml_collections.ConfigDict, workdir: str,
                initial_params) -> tuple[trainer.TrainState, list[dict]]:
  data_dir = config.get('data_dir') or storage.join(workdir, 'data')
  tokenizer, train_dir, eval_dir = run_lib.prepare_on_primary(
      lambda: recipe.prepare_data(config.data, data_dir), f'{recipe.name}_data')
  run_lib.fill_vocab_size(config.model, tokenizer.vocab_size)
  if jax.process_index() == 0:
    tokenizer.save(workdir)
  where = dict(seed=config.seed, process_index=jax.process_index(), process_count=jax.process_count())
  train_loader = recipe.make_loader(train_dir, config, tokenizer, train=True, **where)
  eval_loader = None
  if config.num_eval_batches:
    eval_loader = recipe.make_loader(eval_dir, config, tokenizer, train=False, **where)
  logging.info('train records %d (%d steps per epoch)', train_loader.num_records, train_loader.steps_per_epoch)
  state, history = trainer.train(config, recipe.make_objective(config), train_loader, eval_loader,
                                 workdir=workdir, initial_params=initial_params)
  if (recipe.learning_report is not None and eval_loader is not None and config.get('report_examples', 0)
      and jax.process_count() == 1):
    for line in recipe.learning_report(config, state.params, eval_loader, tokenizer,
                                       num_examples=int(config.report_examples)):
      print(line, flush=True)
  if config.get('export_hf') and recipe.export_workdir is not None and jax.process_index() == 0:
    out = storage.join(workdir, 'hf')
    recipe.export_workdir(workdir, out)
    print(f'exported HF model to {out}', flush=True)
  return state, history


def dry_run(recipe: Recipe, config: ml_collections.ConfigDict, target: fit.Target) -> fit.FitReport:
  """Validates `config` for `target`'s devices and compiles its train step there; prepares no data, writes nothing.

  `model.vocab_size` must be set (no tokenizer is built); with `init_from` the architecture is read from the
  directory's config (`recipe.read_architecture`).
  """
  config = copy.deepcopy(config)
  if config.get('init_from') and recipe.read_architecture is not None:
    architecture = recipe.read_architecture(config.init_from)
    for field in recipe.architecture_fields:
      config.model[field] = architecture.get(field, config.model[field])
  fit.require_vocab_size(config.model)
  target = fit.resolve_local(target)
  validate_config(recipe, config, target.num_devices)
  recipe.finalize_config(config)
  return fit.check_fit(config, recipe.make_objective(config), recipe.batch_template(config), target)


def bind(recipe: Recipe):
  """`run, dry_run, validate_config, import_init` with `recipe` bound: what a model's `pretrain` module exports."""
  return tuple(functools.partial(f, recipe) for f in (run, dry_run, validate_config, import_init))


# ----------------------------------------------------------------------------------------------------------------------
# Command line.
# ----------------------------------------------------------------------------------------------------------------------

def main(recipe: Recipe) -> None:
  """The `python -m <model>_jax.pretrain` command line: `--config FILE --workdir DIR [--dry_run --target=...]`."""
  flag_values = flags.FLAGS
  config_flags.DEFINE_config_file('config', None, 'Config file (a get_config() module).', lock_config=False)
  flags.DEFINE_string('workdir', None, 'Where checkpoints, metrics, the tokenizer and the HF export go.')
  fit.add_flags(flags)
  flags.adopt_module_key_flags(fit)  # --dry_run and --target show in --help
  flags.mark_flags_as_required(['config', 'workdir'])

  def run_main(argv):
    del argv
    if flag_values.dry_run:  # one process, before any JAX computation: it may choose the CPU device count
      run_lib.quiet_logging(flag_values)
      return fit.dry_run_main(flag_values, lambda config, target: dry_run(recipe, config, target))
    distributed.initialize()  # multi-host: from the TPU VM, SLURM or JAX_* environment; a no-op on one host
    run_lib.quiet_logging(flag_values)
    run(recipe, flag_values.config, flag_values.workdir)
    return None

  run_lib.app_run(run_main)


def _recipe_from_argv(argv: list[str]) -> Recipe:
  """`--model NAME` (or `--model=NAME`) taken out of `argv`: the recipe of `<NAME>_jax`."""
  for i, arg in enumerate(argv):
    if arg == '--model' and i + 1 < len(argv):
      name = argv[i + 1]
      del argv[i:i + 2]
      return recipe_lib.get(name)
    if arg.startswith('--model='):
      del argv[i]
      return recipe_lib.get(arg.split('=', 1)[1])
  print('error: --model NAME is required (bert, xlnet, gpt, elmo)', file=sys.stderr)
  raise SystemExit(2)


if __name__ == '__main__':  # python -m common.pretrain --model bert --config ... --workdir ...
  main(run_lib.guard(_recipe_from_argv)(sys.argv))
