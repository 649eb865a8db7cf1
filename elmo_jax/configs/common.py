"""The config shared by every ELMo config file: trainer, optimizer, data and model sections."""
from __future__ import annotations

import ml_collections

from common import optim, trainer
from elmo_jax import model as elmo_model


def base_config() -> ml_collections.ConfigDict:
  """Trainer defaults + the original biLM + the embedded corpus with a full softmax + AdamW."""
  from elmo_jax import pretrain_data  # pylint: disable=import-outside-toplevel

  config = trainer.trainer_config(model=elmo_model.model_config(), data=pretrain_data.data_config(),
                                  optim=optim.optim_config())
  config.dtype = 'float32'          # compute dtype; parameters stay float32
  config.export_hf = True           # write the biLM (options.json, weights.hdf5, vocab.txt) to WORKDIR/hf at the end
  config.init_from = ''             # a biLM directory to start from (its architecture and vocabulary are used)
  return config
