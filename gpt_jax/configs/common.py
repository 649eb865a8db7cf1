"""The config shared by every GPT config file: trainer, optimizer, data and model sections."""
from __future__ import annotations

import ml_collections

from common import optim, trainer
from gpt_jax import model as gpt_model
from gpt_jax import pretrain_data


def base_config() -> ml_collections.ConfigDict:
  return trainer.trainer_config(
      model=gpt_model.model_config(),
      data=pretrain_data.data_config(),
      optim=optim.optim_config(),
      dtype='float32',      # compute dtype; parameters stay float32
      remat=False,          # rematerialise each block in the backward pass
      export_hf=True,       # write an HF directory to WORKDIR/hf at the end of training
      data_dir='',          # where the prepared data goes ('' = WORKDIR/data); runs may share one
      init_from='',         # an HF GPT / GPT-2 directory to start from (its architecture and BPE are used)
      report_examples=0,    # > 0: at the end, next-token accuracy vs the best constant + this many examples
  )
