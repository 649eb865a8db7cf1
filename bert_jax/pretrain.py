"""BERT pretraining: corpus -> WordPiece -> shards -> sharded training -> checkpoints -> HF export.

  python -m bert_jax.pretrain --config bert_jax/configs/tiny.py --workdir runs/bert_tiny
  python -m bert_jax.pretrain --config bert_jax/configs/base.py --workdir DIR --config.global_batch_size=512
  python -m bert_jax.pretrain --config bert_jax/configs/base.py --workdir DIR --dry_run --target=tpu:v4-32

Any config field can be overridden with `--config.KEY=VALUE`. Re-running on the same workdir resumes from the latest
checkpoint (data preparation is reused when its inputs are unchanged). `--dry_run` only validates the config and
compiles the train step for `--target` (`common/fit.py`): memory per device, FLOPs, fits or not; no data, no workdir.
"""
from __future__ import annotations

import copy

import jax
import ml_collections
from absl import flags, logging
from ml_collections import config_flags

from bert_jax import model as bert_model
from bert_jax import objective as bert_objective
from bert_jax import pretrain_data
from common import checkpoint, distributed, fit, optim, storage, trainer
from common import run as run_lib
from common.config import require


def validate_config(config: ml_collections.ConfigDict, num_devices: int) -> None:
  """Every check that needs no data: refuses a bad config before any preparation or compile.

  `model.vocab_size == 0` means "the tokenizer's vocabulary size", filled in after the tokenizer exists.
  """
  trainer.validate_trainer_config(config, num_devices)
  pretrain_data.validate_data_config(config.data)
  optim.validate_optim_config(config.optim, config.num_train_steps)
  model_cfg = copy.deepcopy(config.model)
  if model_cfg.vocab_size == 0:
    model_cfg.vocab_size = 1
  bert_model.validate_model_config(model_cfg)
  require(config.data.max_seq_length <= config.model.max_position_embeddings, 'data.max_seq_length',
          f'{config.data.max_seq_length} exceeds model.max_position_embeddings={config.model.max_position_embeddings}')
  require(config.model.type_vocab_size >= 2 or not config.data.next_sentence, 'model.type_vocab_size',
          'must be >= 2 for sentence pairs (data.next_sentence=True)')
  bert_objective.compute_dtype(config.dtype)


ARCHITECTURE_FIELDS = ('vocab_size', 'hidden_size', 'num_hidden_layers', 'num_attention_heads', 'intermediate_size',
                       'hidden_act', 'max_position_embeddings', 'type_vocab_size', 'layer_norm_eps')


def import_init(config: ml_collections.ConfigDict):
  """`config.init_from` (an HF BERT directory, or an original TF release): its architecture replaces config.model's,
  its vocab the data's."""
  from bert_jax import export  # pylint: disable=import-outside-toplevel
  return run_lib.import_init(config, export.load_hf_dir, ARCHITECTURE_FIELDS, 'vocab.txt', 'vocab_file')


def run(config: ml_collections.ConfigDict, workdir: str) -> tuple[trainer.TrainState, list[dict]]:
  config = copy.deepcopy(config)
  validate_config(config, jax.device_count())
  initial_params = import_init(config) if config.get('init_from') else None
  with checkpoint.WorkdirLock(workdir):  # one run per workdir, from data preparation to export
    return _run_locked(config, workdir, initial_params)


def _run_locked(config: ml_collections.ConfigDict, workdir: str,
                initial_params) -> tuple[trainer.TrainState, list[dict]]:
  data_dir = config.get('data_dir') or storage.join(workdir, 'data')
  tokenizer, train_dir, eval_dir = run_lib.prepare_on_primary(
      lambda: pretrain_data.prepare_pretraining_data(config.data, data_dir), 'bert_data')
  run_lib.fill_vocab_size(config.model, tokenizer.vocab_size)
  if jax.process_index() == 0:
    tokenizer.save(workdir)
  common_args = dict(seed=config.seed, process_index=jax.process_index(), process_count=jax.process_count())
  train_loader = pretrain_data.make_loader(train_dir, config.data, tokenizer, config.global_batch_size,
                                           shuffle=True, **common_args)
  eval_loader = None
  if config.num_eval_batches:
    eval_loader = pretrain_data.make_loader(eval_dir, config.data, tokenizer, config.global_batch_size,
                                            shuffle=False, **common_args)
  logging.info('train records %d (%d steps per epoch)', train_loader.num_records, train_loader.steps_per_epoch)
  state, history = trainer.train(config, bert_objective.make_objective(config), train_loader, eval_loader,
                                 workdir=workdir, initial_params=initial_params)
  if config.export_hf and jax.process_index() == 0:
    from bert_jax import export  # pylint: disable=import-outside-toplevel
    out = storage.join(workdir, 'hf')
    export.export_workdir(workdir, out)
    print(f'exported HF model to {out}', flush=True)
  return state, history


def dry_run(config: ml_collections.ConfigDict, target: fit.Target) -> fit.FitReport:
  """Validates `config` for `target`'s devices and compiles its train step there; prepares no data, writes nothing.

  `model.vocab_size` must be set (no tokenizer is built); with `init_from` the architecture is read from the HF
  directory's config.json.
  """
  config = copy.deepcopy(config)
  if config.get('init_from'):
    config_file = storage.join(config.init_from, 'config.json')
    if not storage.isfile(config_file):  # an original TF release (see bert_jax.import_tf): same field names
      config_file = storage.join(config.init_from, 'bert_config.json')
    hf_cfg = storage.read_json(config_file)
    for field in ARCHITECTURE_FIELDS:
      config.model[field] = hf_cfg.get(field, config.model[field])
  fit.require_vocab_size(config.model)
  target = fit.resolve_local(target)
  validate_config(config, target.num_devices)
  template = pretrain_data.pad_batch([], max_seq_length=config.data.max_seq_length,
                                     max_predictions_per_seq=config.data.max_predictions_per_seq)
  return fit.check_fit(config, bert_objective.make_objective(config), template, target)


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
  flags.DEFINE_string('workdir', None, 'Where checkpoints, metrics, the vocab and the HF export go.')
  fit.add_flags(flags)
  flags.adopt_module_key_flags(fit)  # --dry_run and --target show in --help
  flags.mark_flags_as_required(['config', 'workdir'])
  run_lib.app_run(main)
