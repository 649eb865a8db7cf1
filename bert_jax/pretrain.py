"""BERT pretraining: corpus -> WordPiece -> shards -> sharded training -> checkpoints -> HF export.

  python -m bert_jax.pretrain --config bert_jax/configs/tiny.py --workdir runs/bert_tiny
  python -m bert_jax.pretrain --config bert_jax/configs/base.py --workdir DIR --config.global_batch_size=512
  python -m bert_jax.pretrain --config bert_jax/configs/base.py --workdir DIR --dry_run --target=tpu:v4-32

The shared runner (`common/pretrain.py`) with BERT's recipe (`bert_jax/recipe.py`); flags and behaviour are the
runner's.
"""
from __future__ import annotations

import functools

from bert_jax.recipe import RECIPE
from common import pretrain

run = functools.partial(pretrain.run, RECIPE)
dry_run = functools.partial(pretrain.dry_run, RECIPE)
validate_config = functools.partial(pretrain.validate_config, RECIPE)
import_init = functools.partial(pretrain.import_init, RECIPE)

if __name__ == '__main__':
  pretrain.main(RECIPE)
