"""The config shared by every BERT config file: trainer, optimizer, data and model sections."""
from __future__ import annotations

import ml_collections

from bert_jax import model as bert_model
from common import optim, trainer


def base_config() -> ml_collections.ConfigDict:
  from bert_jax import pretrain_data  # data_config lives with the data code

  config = trainer.trainer_config()
  config.model = bert_model.model_config()
  config.data = pretrain_data.data_config()
  config.optim = optim.optim_config()
  config.dtype = 'float32'          # compute dtype; parameters stay float32
  config.remat = False              # rematerialise each encoder layer in the backward pass
  config.export_hf = True           # write an HF directory to WORKDIR/hf at the end of training
  config.init_from = ''             # an HF BERT directory to start from (its architecture and vocab are used)
  config.report_examples = 0        # > 0: at the end, accuracy vs the best constant predictor + this many fill-ins
  return config
