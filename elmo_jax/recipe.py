"""ELMo as one recipe on the shared runners (`common/recipe.py`): a word vocabulary with character ids, sentence
shards, the forward + backward LM objective, and the reference's `options.json` + HDF5 weight layout."""
from __future__ import annotations

import ml_collections

from common.recipe import Recipe
from elmo_jax import model as elmo_model
from elmo_jax import objective, pretrain_data, weights


def validate(config: ml_collections.ConfigDict) -> None:
  """The data and model sections and the compute dtype (`model.vocab_size` 0 follows the vocabulary)."""
  pretrain_data.validate_data_config(config.data)
  elmo_model.validate_model_config(config.model, vocab_may_follow_data=True)
  objective.compute_dtype(config.dtype)


def make_loader(shard_dir: str, config: ml_collections.ConfigDict, tokenizer, *, train: bool, seed: int,
                process_index: int = 0, process_count: int = 1):
  """Train: shuffled sentences; eval: in order."""
  return pretrain_data.make_loader(shard_dir, config, tokenizer, shuffle=train, seed=seed,
                                   process_index=process_index, process_count=process_count)


def batch_template(config: ml_collections.ConfigDict) -> dict:
  return pretrain_data.batch_template(config.data.max_seq_length, config.model.max_characters_per_token)


RECIPE = Recipe(
    name='elmo', validate=validate, prepare_data=pretrain_data.prepare_pretraining_data, make_loader=make_loader,
    make_objective=objective.make_objective, batch_template=batch_template,
    architecture_fields=weights.ARCHITECTURE_FIELDS, tokenizer_file='vocab.txt', tokenizer_field='vocab_file',
    load_hf_dir=weights.load_dir, read_architecture=weights.read_architecture, export_workdir=weights.export_workdir)
