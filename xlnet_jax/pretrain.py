"""XLNet pretraining: corpus -> sentencepiece -> stream-ordered shards -> sharded PLM training with memory -> HF.

  python -m xlnet_jax.pretrain --config xlnet_jax/configs/tiny.py --workdir runs/xlnet_tiny
  python -m xlnet_jax.pretrain --config xlnet_jax/configs/base.py --workdir DIR --config.global_batch_size=512
  python -m xlnet_jax.pretrain --config xlnet_jax/configs/base.py --workdir DIR --dry_run --target=gpu:h100x8

The shared runner (`common/pretrain.py`) with XLNet's recipe (`xlnet_jax/recipe.py`): a rerun resumes memory
included; `model.reuse_len` and `model.bi_data` follow the data section.
"""
from __future__ import annotations

from common import pretrain
from xlnet_jax.recipe import RECIPE

run, dry_run, validate_config, import_init = pretrain.bind(RECIPE)

if __name__ == '__main__':
  pretrain.main(RECIPE)
