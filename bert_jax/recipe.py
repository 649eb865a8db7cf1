"""BERT as one recipe on the shared runners (`common/recipe.py`): WordPiece, MLM (+ NSP) over instance shards, the
`BertForPreTraining` objective, and the HF `BertForPreTraining` layout."""
from __future__ import annotations

import ml_collections

from bert_jax import export, objective, pretrain_data, report, tasks
from bert_jax import model as bert_model
from common import storage
from common.config import require
from common import recipe as recipe_lib
from common.recipe import Recipe

ARCHITECTURE_FIELDS = ('vocab_size', 'hidden_size', 'num_hidden_layers', 'num_attention_heads', 'intermediate_size',
                       'hidden_act', 'max_position_embeddings', 'type_vocab_size', 'layer_norm_eps')


def validate(config: ml_collections.ConfigDict) -> None:
  """The data and model sections, their cross constraints and the compute dtype."""
  pretrain_data.validate_data_config(config.data)
  bert_model.validate_model_config(recipe_lib.model_to_validate(config.model))
  require(config.data.max_seq_length <= config.model.max_position_embeddings, 'data.max_seq_length',
          f'{config.data.max_seq_length} exceeds model.max_position_embeddings={config.model.max_position_embeddings}')
  require(config.model.type_vocab_size >= 2 or not config.data.next_sentence, 'model.type_vocab_size',
          'must be >= 2 for sentence pairs (data.next_sentence=True)')
  objective.compute_dtype(config.dtype)


def make_loader(shard_dir: str, config: ml_collections.ConfigDict, tokenizer, *, train: bool, seed: int,
                process_index: int = 0, process_count: int = 1):
  """Train: shuffled, fresh dynamic masks every epoch; eval: in order, masks fixed."""
  return pretrain_data.make_loader(shard_dir, config.data, tokenizer, config.global_batch_size, shuffle=train,
                                   seed=seed, process_index=process_index, process_count=process_count)


def batch_template(config: ml_collections.ConfigDict) -> dict:
  return pretrain_data.pad_batch([], max_seq_length=config.data.max_seq_length,
                                 max_predictions_per_seq=config.data.max_predictions_per_seq)


def read_architecture(path: str) -> dict:
  """config.json of an HF directory, else bert_config.json of an original TF release (same field names)."""
  config_file = storage.join(path, 'config.json')
  if not storage.isfile(config_file):
    config_file = storage.join(path, 'bert_config.json')
  return storage.read_json(config_file)


RECIPE = Recipe(
    name='bert', validate=validate, prepare_data=pretrain_data.prepare_pretraining_data, make_loader=make_loader,
    make_objective=objective.make_objective, batch_template=batch_template,
    architecture_fields=ARCHITECTURE_FIELDS, tokenizer_file='vocab.txt', tokenizer_field='vocab_file',
    load_hf_dir=export.load_hf_dir, read_architecture=read_architecture, export_workdir=export.export_workdir,
    learning_report=report.learning_report, finetune=tasks.ADAPTER, load_encoder=tasks.load_encoder)
