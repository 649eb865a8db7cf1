"""GPT fine-tuning as in the GPT-1 paper: task files / TFDS -> the input transformations -> `common.trainer.train`
(task loss + λ x the auxiliary LM loss) -> official metrics.

  python -m gpt_jax.finetune --task glue/rte --init HF_DIR --workdir runs/rte --data_dir glue/RTE
  python -m gpt_jax.finetune --task swag --init runs/gpt_tiny --workdir runs/swag --data_dir SWAG
  python -m gpt_jax.finetune --task learnable --init runs/gpt_tiny --workdir runs/learnable --config.lm_coef=0

`--task`: `learnable`, `glue/<name>`, `swag`, `race` (GPT-1 has no tagging or SQuAD transformation); read from
`--data_dir` (the task's original files), else from TFDS. `--init`: an HF GPT directory (`gpt_jax.export`) or a
pretraining workdir (its latest checkpoint), or `none` (random weights; the architecture and vocabulary of
`--model_from=DIR`); the task tokens are appended to its vocabulary. MRPC, QQP and STS-B read both orders of a pair
(`gpt_jax.finetune_data`). Every `--config.KEY=VALUE` of `gpt_jax/configs/finetune.py` can be overridden
(`lm_coef`: λ, 0 switches the LM term off). Writes `metrics.json` (mean ± std over `config.seeds`) and per seed
`seed_<s>/predictions.json` to `--workdir`.
"""
from __future__ import annotations

import os

import ml_collections

from common import finetune
from gpt_jax.tasks import ADAPTER, LM_COEF, adapter, load_init

__all__ = ['ADAPTER', 'load_init', 'run']


def run(config: ml_collections.ConfigDict, task: str, init: str, workdir: str | None,
        data_dir: str | None = None, model_from: str | None = None) -> dict:
  """Fine-tunes from `init` (a directory, or `none`: random weights with `model_from`'s architecture and
  tokenizer; see `finetune.bind`) with λ = `config.lm_coef`."""
  bound = finetune.bind(adapter(float(config.get('lm_coef', LM_COEF))), load_init)
  return bound(config, task, init, workdir, data_dir, model_from)


if __name__ == '__main__':
  finetune.main(run, 'GPT', os.path.join(os.path.dirname(__file__), 'configs', 'finetune.py'))
