"""XLNet as one recipe on the shared runners (`common/recipe.py`): sentencepiece, stream-ordered rows with span
targets, the permutation-LM objective with memory, and the HF `XLNetLMHeadModel` layout."""
from __future__ import annotations

import ml_collections

from common import storage
from common.config import require
from common import recipe as recipe_lib
from common.recipe import Recipe
from xlnet_jax import export, objective, pretrain_data, report, tasks
from xlnet_jax import model as xlnet_model

# What defines the network (taken from an `init_from` directory); memory, reuse and bi_data stay the run's choice.
ARCHITECTURE_FIELDS = ('vocab_size', 'd_model', 'n_layer', 'n_head', 'd_head', 'd_inner', 'ff_activation',
                       'untie_r', 'layer_norm_eps')


def validate(config: ml_collections.ConfigDict) -> None:
  """The data and model sections, their cross constraints and the compute dtype."""
  pretrain_data.validate_data_config(config.data)
  xlnet_model.validate_model_config(recipe_lib.model_to_validate(config.model))
  data = config.data
  require(config.model.reuse_len in (0, data.reuse_len), 'model.reuse_len',
          f'{config.model.reuse_len} differs from data.reuse_len={data.reuse_len} (leave it 0: it follows the data)')
  require(config.model.bi_data in (False, data.bi_data), 'model.bi_data',
          f'{config.model.bi_data} differs from data.bi_data={data.bi_data}')
  require(not data.bi_data or config.global_batch_size % 2 == 0, 'global_batch_size',
          f'{config.global_batch_size} must be even with data.bi_data (forward and backward halves)')
  require(config.model.mem_len == 0 or config.model.mem_len >= data.reuse_len, 'model.mem_len',
          f'{config.model.mem_len} is shorter than data.reuse_len={data.reuse_len}: the reused part would not fit')
  objective.compute_dtype(config.dtype)


def finalize_config(config: ml_collections.ConfigDict) -> None:
  """`model.reuse_len` and `model.bi_data` follow the data section."""
  config.model.reuse_len = config.data.reuse_len
  config.model.bi_data = config.data.bi_data


def make_loader(shard_dir: str, config: ml_collections.ConfigDict, tokenizer, *, train: bool, seed: int,
                process_index: int = 0, process_count: int = 1):
  """Stream order for train and eval alike (row b of step s+1 continues row b of step s: the memory needs it)."""
  del tokenizer, train  # the masks are in the shards
  return pretrain_data.make_loader(shard_dir, config.data, config.global_batch_size, seed=seed,
                                   process_index=process_index, process_count=process_count)


def batch_template(config: ml_collections.ConfigDict) -> dict:
  return pretrain_data.rows_to_batch([], seq_len=config.data.seq_len, reuse_len=config.data.reuse_len, sep_id=0,
                                     cls_id=0)


def read_architecture(path: str) -> dict:
  return storage.read_json(storage.join(path, 'config.json'))


RECIPE = Recipe(
    name='xlnet', validate=validate, prepare_data=pretrain_data.prepare_pretraining_data, make_loader=make_loader,
    make_objective=objective.make_objective, batch_template=batch_template,
    architecture_fields=ARCHITECTURE_FIELDS, tokenizer_file='spiece.model', tokenizer_field='spiece_model',
    load_hf_dir=export.load_hf_dir, read_architecture=read_architecture, export_workdir=export.export_workdir,
    finalize_config=finalize_config, learning_report=report.learning_report, finetune=tasks.ADAPTER,
    load_encoder=tasks.load_encoder)
