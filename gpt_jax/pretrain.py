"""GPT pretraining: corpus -> byte-level BPE -> packed rows -> sharded training -> checkpoints -> HF export.

  python -m gpt_jax.pretrain --config gpt_jax/configs/tiny.py --workdir runs/gpt_tiny
  python -m gpt_jax.pretrain --config gpt_jax/configs/gpt2.py --workdir DIR --dry_run --target=tpu:v4-32

The shared runner (`common/pretrain.py`) with GPT's recipe (`gpt_jax/recipe.py`); flags and behaviour are the
runner's.
"""
from __future__ import annotations

from common import pretrain
from gpt_jax.recipe import RECIPE

run, dry_run, validate_config, import_init = pretrain.bind(RECIPE)

if __name__ == '__main__':
  pretrain.main(RECIPE)
