"""BERT fine-tuning: task files / TFDS -> WordPiece features -> `common.trainer.train` -> official metrics.

  python -m bert_jax.finetune --task glue/mrpc --init HF_DIR --workdir runs/mrpc --data_dir glue/MRPC
  python -m bert_jax.finetune --task squad/v1.1 --init runs/bert_tiny --workdir runs/squad --data_dir SQUAD
  python -m bert_jax.finetune --task learnable --init runs/bert_tiny --workdir runs/learnable \
      --config.seeds='[0,1,2]'

`--task`: `learnable` (generated: does a given word occur), `glue/<name>`, `squad/v1.1`, `squad/v2.0`, `conll2003`,
`swag`, `race`; read from `--data_dir` (the task's original files), else from TFDS. `--init`: an HF BERT directory
(imported offline) or a pretraining workdir (its latest checkpoint), or `none` (random weights; the architecture
and vocabulary of `--model_from=DIR`); the vocabulary is the directory's `vocab.txt`, else the WordPiece vocabulary
inside its `tokenizer.json`. Every `--config.KEY=VALUE` of `bert_jax/configs/finetune.py` can be overridden. Writes
`metrics.json` (mean ± std over `config.seeds`) and per seed `seed_<s>/predictions.json` to `--workdir` (SQuAD
also `nbest_predictions.json` and `null_odds.json`, the no-answer score per question).
"""
from __future__ import annotations

import os

import ml_collections

from bert_jax import finetune_data
from bert_jax import heads
from bert_jax import model as bert_model
from bert_jax import tokenizer as bert_tokenizer
from common import finetune

ADAPTER = finetune.ModelAdapter(
    make_head=heads.make_head, convert=finetune_data.convert_examples, encoder_key='bert',
    flops_per_example=lambda cfg, seq_len: bert_model.flops_per_example(cfg, seq_len, 0),
    dropout_fields=('hidden_dropout_prob', 'attention_probs_dropout_prob'))


def _load_hf_dir(path: str):
  from bert_jax import export  # pylint: disable=import-outside-toplevel
  model_cfg, params, _ = export.load_hf_dir(path, return_info=True)
  return model_cfg, params


def load_init(path: str):
  """(model config, encoder params `bert/...`, tokenizer) from an HF BERT directory or a pretraining workdir."""
  model_cfg, params, tokenizer = finetune.load_init_dir(
      path, _load_hf_dir, bert_tokenizer.VOCAB_FILE, 'the WordPiece vocabulary', bert_tokenizer.load_tokenizer,
      default_lower_case=True, tokenizer_from_json=bert_tokenizer.tokenizer_from_json)
  return model_cfg, params['bert'], tokenizer


def run(config: ml_collections.ConfigDict, task: str, init: str, workdir: str | None,
        data_dir: str | None = None, model_from: str | None = None) -> dict:
  """Fine-tunes from `init` (a directory, or `none`: random weights with `model_from`'s architecture and
  tokenizer; see `finetune.resolve_init`)."""
  model_cfg, encoder, tokenizer = finetune.resolve_init(init, model_from, load_init)
  return finetune.run_task(config, ADAPTER, task, tokenizer, model_cfg, encoder, workdir, data_dir)


if __name__ == '__main__':
  finetune.main(run, 'BERT', os.path.join(os.path.dirname(__file__), 'configs', 'finetune.py'))
