"""XLNet pretraining: corpus -> sentencepiece -> stream-ordered shards -> sharded PLM training with memory -> HF.

  python -m xlnet_jax.pretrain --config xlnet_jax/configs/tiny.py --workdir runs/xlnet_tiny
  python -m xlnet_jax.pretrain --config xlnet_jax/configs/base.py --workdir DIR --config.global_batch_size=512
  python -m xlnet_jax.pretrain --config xlnet_jax/configs/base.py --workdir DIR --dry_run --target=gpu:h100x8

The shared runner (`common/pretrain.py`) with XLNet's recipe (`xlnet_jax/recipe.py`): a rerun resumes memory
included; `model.reuse_len` and `model.bi_data` follow the data section.
"""
from __future__ import annotations

import functools

from common import pretrain
from xlnet_jax.recipe import RECIPE

run = functools.partial(pretrain.run, RECIPE)
dry_run = functools.partial(pretrain.dry_run, RECIPE)
validate_config = functools.partial(pretrain.validate_config, RECIPE)
import_init = functools.partial(pretrain.import_init, RECIPE)

if __name__ == '__main__':
  pretrain.main(RECIPE)
