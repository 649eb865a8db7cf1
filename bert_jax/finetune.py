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

from common import finetune
from bert_jax.tasks import ADAPTER, load_init

__all__ = ['ADAPTER', 'load_init', 'run']


run = finetune.bind(ADAPTER, load_init)

if __name__ == '__main__':
  finetune.main(run, 'BERT', os.path.join(os.path.dirname(__file__), 'configs', 'finetune.py'))
