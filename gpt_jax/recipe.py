"""GPT as one `common.recipe.Recipe`: what the shared runners need to pretrain, export and import it."""
from __future__ import annotations

import copy

import ml_collections

from common import layers
from common.config import require
from common.recipe import Recipe
from gpt_jax import export, objective, pretrain_data, report
from gpt_jax import model as gpt_model



def validate(config: ml_collections.ConfigDict) -> None:
  """The model and data sections and their cross constraints; `model.vocab_size == 0` follows the tokenizer."""
  pretrain_data.validate_data_config(config.data)
  model_cfg = copy.deepcopy(config.model)
  if model_cfg.vocab_size == 0:
    model_cfg.vocab_size = 1
  gpt_model.validate_model_config(model_cfg)
  require(config.data.max_seq_length <= config.model.max_position_embeddings, 'data.max_seq_length',
          f'{config.data.max_seq_length} exceeds model.max_position_embeddings={config.model.max_position_embeddings}')
  layers.compute_dtype(config.dtype)


RECIPE = Recipe(
    name='gpt',
    validate=validate,
    prepare_data=pretrain_data.prepare_pretraining_data,
    make_loader=pretrain_data.make_loader,
    make_objective=objective.make_objective,
    batch_template=objective.batch_template,
    architecture_fields=gpt_model.ARCHITECTURE_FIELDS,
    tokenizer_file='vocab.json',
    tokenizer_field='vocab_file',
    load_hf_dir=export.load_hf_dir,
    read_architecture=export.read_architecture,
    export_workdir=export.export_workdir,
    learning_report=report.learning_report,
)
