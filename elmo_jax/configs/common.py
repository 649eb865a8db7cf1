"""The config shared by every ELMo config file: trainer, optimizer, data and model sections."""
from __future__ import annotations

import ml_collections

from common import optim, trainer
from elmo_jax import model as elmo_model


def base_config() -> ml_collections.ConfigDict:
  from elmo_jax import pretrain_data  # data_config lives with the data code

  config = trainer.trainer_config()
  config.model = elmo_model.model_config()
  config.data = pretrain_data.data_config()
  config.optim = optim.optim_config()
  config.dtype = 'float32'          # compute dtype; parameters stay float32
  config.export_hf = True           # write the biLM (options.json, weights.hdf5, vocab.txt) to WORKDIR/hf at the end
  config.init_from = ''             # a biLM directory to start from (its architecture and vocabulary are used)
  return config
