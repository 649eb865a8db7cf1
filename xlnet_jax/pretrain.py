"""XLNet pretraining: corpus -> sentencepiece -> stream-ordered shards -> sharded PLM training with memory -> HF.

  python -m xlnet_jax.pretrain --config xlnet_jax/configs/tiny.py --workdir runs/xlnet_tiny
  python -m xlnet_jax.pretrain --config xlnet_jax/configs/base.py --workdir DIR --config.global_batch_size=512
  python -m xlnet_jax.pretrain --config xlnet_jax/configs/base.py --workdir DIR --dry_run --target=gpu:h100x8

Any config field can be overridden with `--config.KEY=VALUE`. Re-running on the same workdir resumes from the latest
checkpoint, memory included. `model.reuse_len` and `model.bi_data` follow the data section. `--dry_run` only
validates the config and compiles the train step for `--target` (`common/fit.py`); no data, no workdir.
"""
from __future__ import annotations

import copy

import jax
import ml_collections
from absl import flags, logging
from ml_collections import config_flags

from common import checkpoint, distributed, fit, optim, storage, trainer
from common import run as run_lib
from common.config import require
from xlnet_jax import model as xlnet_model
from xlnet_jax import objective as xlnet_objective
from xlnet_jax import pretrain_data


def validate_config(config: ml_collections.ConfigDict, num_devices: int) -> None:
  """Every check that needs no data; `model.vocab_size == 0` means the tokenizer's vocabulary size."""
  trainer.validate_trainer_config(config, num_devices)
  pretrain_data.validate_data_config(config.data)
  optim.validate_optim_config(config.optim, config.num_train_steps)
  model_cfg = copy.deepcopy(config.model)
  if model_cfg.vocab_size == 0:
    model_cfg.vocab_size = 1
  xlnet_model.validate_model_config(model_cfg)
  data = config.data
  require(config.model.reuse_len in (0, data.reuse_len), 'model.reuse_len',
          f'{config.model.reuse_len} differs from data.reuse_len={data.reuse_len} (leave it 0: it follows the data)')
  require(config.model.bi_data in (False, data.bi_data), 'model.bi_data',
          f'{config.model.bi_data} differs from data.bi_data={data.bi_data}')
  require(not data.bi_data or config.global_batch_size % 2 == 0, 'global_batch_size',
          f'{config.global_batch_size} must be even with data.bi_data (forward and backward halves)')
  require(config.model.mem_len == 0 or config.model.mem_len >= data.reuse_len, 'model.mem_len',
          f'{config.model.mem_len} is shorter than data.reuse_len={data.reuse_len}: the reused part would not fit')
  xlnet_objective.compute_dtype(config.dtype)


# What defines the network (taken from an `init_from` directory); memory, reuse and bi_data stay the run's choice.
ARCHITECTURE_FIELDS = ('vocab_size', 'd_model', 'n_layer', 'n_head', 'd_head', 'd_inner', 'ff_activation',
                       'untie_r', 'layer_norm_eps')


def import_init(config: ml_collections.ConfigDict):
  """`config.init_from` (an HF XLNet directory): its architecture replaces config.model's, its spiece.model the
  data's (continued pretraining, as `bert_jax.pretrain` does for BERT)."""
  from xlnet_jax import export  # pylint: disable=import-outside-toplevel
  return run_lib.import_init(config, export.load_hf_dir, ARCHITECTURE_FIELDS, 'spiece.model', 'spiece_model')


def run(config: ml_collections.ConfigDict, workdir: str) -> tuple[trainer.TrainState, list[dict]]:
  config = copy.deepcopy(config)
  validate_config(config, jax.device_count())
  config.model.reuse_len = config.data.reuse_len
  config.model.bi_data = config.data.bi_data
  initial_params = import_init(config) if config.get('init_from') else None
  with checkpoint.WorkdirLock(workdir):  # one run per workdir, from data preparation to export
    return _run_locked(config, workdir, initial_params)


def _run_locked(config: ml_collections.ConfigDict, workdir: str,
                initial_params) -> tuple[trainer.TrainState, list[dict]]:
  data_dir = config.get('data_dir') or storage.join(workdir, 'data')
  tokenizer, train_dir, eval_dir = run_lib.prepare_on_primary(
      lambda: pretrain_data.prepare_pretraining_data(config.data, data_dir), 'xlnet_data')
  run_lib.fill_vocab_size(config.model, tokenizer.vocab_size)
  if jax.process_index() == 0:
    tokenizer.save(workdir)
  common_args = dict(seed=config.seed, process_index=jax.process_index(), process_count=jax.process_count())
  train_loader = pretrain_data.make_loader(train_dir, config.data, config.global_batch_size, **common_args)
  eval_loader = None
  if config.num_eval_batches:
    eval_loader = pretrain_data.make_loader(eval_dir, config.data, config.global_batch_size, **common_args)
  logging.info('train records %d (%d steps per epoch)', train_loader.num_records, train_loader.steps_per_epoch)
  state, history = trainer.train(config, xlnet_objective.make_objective(config), train_loader, eval_loader,
                                 workdir=workdir, initial_params=initial_params)
  if config.export_hf and jax.process_index() == 0:
    from xlnet_jax import export  # pylint: disable=import-outside-toplevel
    out = storage.join(workdir, 'hf')
    export.export_workdir(workdir, out)
    print(f'exported HF model to {out}', flush=True)
  return state, history


def dry_run(config: ml_collections.ConfigDict, target: fit.Target) -> fit.FitReport:
  """Validates `config` for `target`'s devices and compiles its train step there; prepares no data, writes nothing.

  `model.vocab_size` must be set: no sentencepiece model is trained.
  """
  config = copy.deepcopy(config)
  fit.require_vocab_size(config.model)
  target = fit.resolve_local(target)
  validate_config(config, target.num_devices)
  config.model.reuse_len = config.data.reuse_len
  config.model.bi_data = config.data.bi_data
  template = pretrain_data.rows_to_batch([], seq_len=config.data.seq_len, reuse_len=config.data.reuse_len,
                                         sep_id=0, cls_id=0)
  return fit.check_fit(config, xlnet_objective.make_objective(config), template, target)


def main(argv):
  del argv
  if FLAGS.dry_run:  # one process, before any JAX computation: it may choose the CPU device count
    run_lib.quiet_logging(FLAGS)
    return fit.dry_run_main(FLAGS, dry_run)
  distributed.initialize()  # multi-host: from the TPU VM, SLURM or JAX_* environment; a no-op on one host
  run_lib.quiet_logging(FLAGS)
  run(FLAGS.config, FLAGS.workdir)


if __name__ == '__main__':
  FLAGS = flags.FLAGS
  config_flags.DEFINE_config_file('config', None, 'Config file (a get_config() module).', lock_config=False)
  flags.DEFINE_string('workdir', None, 'Where checkpoints, metrics, the spiece model and the HF export go.')
  fit.add_flags(flags)
  flags.adopt_module_key_flags(fit)  # --dry_run and --target show in --help
  flags.mark_flags_as_required(['config', 'workdir'])
  run_lib.app_run(main)
