"""XLNet fine-tuning: task files / TFDS -> sentencepiece features -> `common.trainer.train` -> official metrics.

  python -m xlnet_jax.finetune --task glue/mrpc --init HF_DIR --workdir runs/mrpc --data_dir glue/MRPC
  python -m xlnet_jax.finetune --task squad/v1.1 --init runs/xlnet_tiny --workdir runs/squad --data_dir SQUAD
  python -m xlnet_jax.finetune --task learnable --init runs/xlnet_tiny --workdir runs/learnable \
      --config.seeds='[0,1,2]'

`--task`: `learnable` (generated: does a given word occur), `glue/<name>`, `squad/v1.1`, `squad/v2.0`, `conll2003`,
`swag`, `race`; read from `--data_dir` (the task's original files), else from TFDS. `--init`: an HF XLNet directory
(imported offline) or a pretraining workdir (its latest checkpoint), or `none` (random weights; the architecture
and vocabulary of `--model_from=DIR`); the vocabulary is the directory's `spiece.model`. Every
`--config.KEY=VALUE` of `xlnet_jax/configs/finetune.py` can be overridden. Writes `metrics.json` (mean ± std over
`config.seeds`) and per seed `seed_<s>/predictions.json` to `--workdir`.

SQuAD trains the original `run_squad.py` heads by default (`--config.squad_head=beam`: start logits, end logits
conditioned on the start with a `start_n_top` x `end_n_top` beam at inference, an answerability classifier;
`xlnet_jax.squad_heads`); `--config.squad_head=simple` trains the plain start/end span head instead. Both write
`nbest_predictions.json` and `null_odds.json` next to `predictions.json`; for v2.0 the metrics include the official
best-threshold search over the null odds (`best_exact`, `best_f1`, the numbers the original reports).
"""
from __future__ import annotations

import os

from common import finetune
from xlnet_jax.tasks import ADAPTER, load_init

__all__ = ['ADAPTER', 'load_init', 'run']


run = finetune.bind(ADAPTER, load_init)

if __name__ == '__main__':
  finetune.main(run, 'XLNet', os.path.join(os.path.dirname(__file__), 'configs', 'finetune.py'))
