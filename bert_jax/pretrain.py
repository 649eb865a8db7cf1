"""BERT pretraining: corpus -> WordPiece -> shards -> sharded training -> checkpoints -> HF export.

  python -m bert_jax.pretrain --config bert_jax/configs/tiny.py --workdir runs/bert_tiny
  python -m bert_jax.pretrain --config bert_jax/configs/base.py --workdir DIR --config.global_batch_size=512
  python -m bert_jax.pretrain --config bert_jax/configs/base.py --workdir DIR --dry_run --target=tpu:v4-32

The shared runner (`common/pretrain.py`) with BERT's recipe (`bert_jax/recipe.py`); flags and behaviour are the
runner's.
"""
from __future__ import annotations

from bert_jax.recipe import RECIPE
from common import pretrain

run, dry_run, validate_config, import_init = pretrain.bind(RECIPE)

if __name__ == '__main__':
  pretrain.main(RECIPE)
