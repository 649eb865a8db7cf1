"""XLNet fine-tuning: task files / TFDS -> sentencepiece features -> `common.trainer.train` -> official metrics.

  python -m xlnet_jax.finetune --task glue/mrpc --init HF_DIR --workdir runs/mrpc --data_dir glue/MRPC
  python -m xlnet_jax.finetune --task squad/v1.1 --init runs/xlnet_tiny --workdir runs/squad --data_dir SQUAD
  python -m xlnet_jax.finetune --task learnable --init runs/xlnet_tiny --workdir runs/learnable \
      --config.seeds='[0,1,2]'

`--task`: `learnable` (generated: does a given word occur), `glue/<name>`, `squad/v1.1`, `squad/v2.0`, `conll2003`,
`swag`, `race`; read from `--data_dir` (the task's original files), else from TFDS. `--init`: an HF XLNet directory
(imported offline) or a pretraining workdir (its latest checkpoint); the vocabulary is the init directory's
`spiece.model`. Every `--config.KEY=VALUE` of `xlnet_jax/configs/finetune.py` can be overridden. Writes
`metrics.json` (mean ± std over `config.seeds`) and per seed `seed_<s>/predictions.json` to `--workdir`.
"""
from __future__ import annotations

import json
import os

import ml_collections
from absl import app, flags
from ml_collections import config_flags

from common import checkpoint
from common import finetune
from xlnet_jax import finetune_data
from xlnet_jax import heads
from xlnet_jax import model as xlnet_model
from xlnet_jax import tokenizer as xlnet_tokenizer

ADAPTER = finetune.ModelAdapter(
    make_head=heads.make_head, convert=finetune_data.convert_examples, encoder_key='transformer',
    flops_per_example=lambda cfg, seq_len: xlnet_model.flops_per_example(cfg, seq_len, 0),
    dropout_fields=('dropout', 'dropatt'))


def load_init(path: str):
  """(model config, encoder params `transformer/...`, tokenizer) from an HF XLNet directory or a pretraining
  workdir. Fine-tuning runs without memory (mem_len and reuse_len are set to 0)."""
  if os.path.exists(os.path.join(path, checkpoint.CONFIG_FILE)) and os.path.isdir(checkpoint.checkpoint_dir(path)):
    params, run_config = checkpoint.restore_params(path)
    model_cfg = ml_collections.ConfigDict(run_config.model.to_dict())
  else:
    from xlnet_jax import export  # pylint: disable=import-outside-toplevel
    model_cfg, params, _ = export.load_hf_dir(path, return_info=True)
  model_cfg.mem_len, model_cfg.reuse_len = 0, 0
  spiece = os.path.join(path, xlnet_tokenizer.MODEL_FILE)
  if not os.path.exists(spiece):
    raise FileNotFoundError(f'{spiece} not found: the init directory must hold the sentencepiece model')
  do_lower_case = False
  config_file = os.path.join(path, 'tokenizer_config.json')
  if os.path.exists(config_file):
    with open(config_file) as f:
      do_lower_case = bool(json.load(f).get('do_lower_case', False))
  return model_cfg, params['transformer'], xlnet_tokenizer.load_tokenizer(spiece, do_lower_case=do_lower_case)


def run(config: ml_collections.ConfigDict, task: str, init: str, workdir: str | None,
        data_dir: str | None = None) -> dict:
  model_cfg, encoder, tokenizer = load_init(init)
  return finetune.run_task(config, ADAPTER, task, tokenizer, model_cfg, encoder, workdir, data_dir)


def main(argv):
  del argv
  result = run(FLAGS.config, FLAGS.task, FLAGS.init, FLAGS.workdir, FLAGS.data_dir)
  for name, value in result['metrics'].items():
    print(f"{name}: {value['mean']:.4f} ± {value['std']:.4f}", flush=True)


if __name__ == '__main__':
  FLAGS = flags.FLAGS
  config_flags.DEFINE_config_file(
      'config', os.path.join(os.path.dirname(__file__), 'configs', 'finetune.py'), 'Fine-tuning config file.',
      lock_config=False)
  flags.DEFINE_string('task', None, 'learnable, glue/<name>, squad/v1.1, squad/v2.0, conll2003, swag, race.')
  flags.DEFINE_string('init', None, 'An HF XLNet directory or a pretraining workdir.')
  flags.DEFINE_string('workdir', None, 'Where checkpoints, predictions and metrics.json go.')
  flags.DEFINE_string('data_dir', None, 'The task\'s original files; without it the task is read from TFDS.')
  flags.mark_flags_as_required(['task', 'init', 'workdir'])
  app.run(main)
