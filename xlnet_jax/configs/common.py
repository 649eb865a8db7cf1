"""The config shared by every XLNet config file: trainer, optimizer, data and model sections."""
from __future__ import annotations

import ml_collections

from common import optim, trainer
from xlnet_jax import model as xlnet_model
from xlnet_jax import pretrain_data


def base_config() -> ml_collections.ConfigDict:
  config = trainer.trainer_config()
  config.model = xlnet_model.model_config(vocab_size=0)
  config.data = pretrain_data.data_config()
  config.optim = optim.optim_config(learning_rate=1e-4, warmup_steps=40_000, weight_decay=0.0, eps=1e-6,
                                    clip_grad_norm=1.0)
  config.dtype = 'float32'          # compute dtype; parameters stay float32
  config.remat = False
  config.export_hf = True           # write an HF XLNetLMHeadModel directory to WORKDIR/hf at the end
  config.init_from = ''             # an HF XLNet directory to start from (its architecture and spiece.model are used)
  config.report_examples = 0        # > 0: at the end, accuracy vs the best constant predictor + this many fill-ins
  return config
