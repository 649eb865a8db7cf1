"""What a model contributes to the shared fine-tuning runner (`ModelAdapter`, for `common.finetune`) and feature
extractor (`Encoder`, for `common.extract`), and the loader of pretrained weights both use (`load_init_dir`). The
models' `tasks.py` build these from their heads and feature converters; nothing here imports a runner, so model
code may import this module.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, Callable, Mapping, Sequence

import jax
import ml_collections
import numpy as np

from common import checkpoint


@dataclasses.dataclass(frozen=True)
class ModelAdapter:
  """What a model contributes to fine-tuning.

  make_head(model_cfg, kind, num_labels, dtype, remat, **head_options) -> flax module: the encoder plus the task
      layer of `kind` (a `common.task_kinds` name; the beam head also gets start_n_top and end_n_top), called as
      `head.apply(variables, input_ids, segment_ids, input_mask, p_mask, deterministic=..., **kind.head_inputs)`
      and returning float32 logits (the beam head: a dict);
  convert(task, examples, tokenizer, max_seq_length, **kwargs) -> features (SQuAD: (features, windows));
  encoder_key: the encoder's top-level parameter name, shared with pretraining ('bert', 'transformer');
  flops_per_example(model_cfg, seq_len) -> training FLOPs of one row; dropout_fields: the model config's dropouts;
  squad_heads: the SQuAD heads it offers (keys of `task_kinds.SQUAD_HEADS`), its default first; packs: its
  pooled heads read packed rows (`common.finetune_packing`: `position_ids`, `example_ids`, `pool_at`);
  output_layer: the top-level parameter name of the classification / regression heads' output layer (its `bias`
  is what `config.regression_bias` sets).

  A head whose `auxiliary_loss` attribute is an `AuxiliaryLoss` (not None) adds that loss to the task's in training
  (see `AuxiliaryLoss`); heads without the attribute train the task loss alone.
  """
  make_head: Callable[..., Any]
  convert: Callable[..., Any]
  encoder_key: str
  flops_per_example: Callable[[ml_collections.ConfigDict, int], float]
  dropout_fields: tuple[str, ...] = ()
  squad_heads: tuple[str, ...] = ('simple',)
  packs: bool = False
  output_layer: str = 'classifier'


@dataclasses.dataclass(frozen=True)
class AuxiliaryLoss:
  """A loss a task head computes beside its task outputs (GPT-1's language-modelling term on the task inputs).

  The head called with `auxiliary=True` returns `(task outputs, the auxiliary loss summed over the batch: a scalar)`;
  the objective (`common.finetune_head.make_objective`) divides that sum by `normalizer(batch)` (a global count,
  e.g. the predicted tokens; at least 1) and adds it, times `weight`, to the task loss, and reports the mean
  as `auxiliary_loss`.
  """
  weight: float
  normalizer: Callable[[Mapping[str, Any]], Any]


@dataclasses.dataclass(frozen=True)
class Encoder:
  """A loaded encoder.

  tokenizer: has `convert_ids_to_tokens` (and whatever `convert` needs);
  params: the encoder's parameters; num_layers: its number of layers;
  convert(examples, tokenizer, max_seq_length) -> {'input_ids', 'segment_ids', 'input_mask': [N, L] int32} for
    `tasks.PairExample`s (the model's fine-tuning pair converter; input_mask 1 = real token);
  layer_outputs(params, input_ids, segment_ids, input_mask) -> the `num_layers` hidden states `[B, L, hidden]` after
    each layer, first to last (deterministic; jittable).
  """
  tokenizer: Any
  params: Any
  num_layers: int
  convert: Callable[..., Mapping[str, np.ndarray]]
  layer_outputs: Callable[..., Sequence[jax.Array]]


def capture_layer_outputs(module, layer_type: type, params, *args, select: Callable[[Any], jax.Array] | None = None,
                          **kwargs) -> list[jax.Array]:
  """The outputs of every `layer_type` submodule of `module` applied to `params` and the inputs, in layer order.

  Uses flax's `capture_intermediates`: the model runs unchanged and the `__call__` outputs of its layers are
  recorded. Layers are ordered by the trailing number of their names (`layer_0`, `layer_1`, ...). `select` picks
  the hidden state out of a layer's output (e.g. the content stream of XLNet's `(h, g)`).
  """
  def is_layer(mdl, method_name):
    return method_name == '__call__' and isinstance(mdl, layer_type)

  _, state = module.apply({'params': params}, *args, capture_intermediates=is_layer, mutable=['intermediates'],
                          **kwargs)
  found = []

  def walk(tree, path):
    for name, value in tree.items():
      if name == '__call__':
        found.append((path, value[0]))
      elif isinstance(value, Mapping):
        walk(value, path + (name,))

  walk(state['intermediates'], ())
  if not found:
    raise ValueError(f'{type(module).__name__} has no {layer_type.__name__} submodule to capture')

  def order(entry):
    number = re.search(r'(\d+)$', entry[0][-1])
    return (entry[0][:-1], int(number.group(1)) if number else -1)

  return [value if select is None else select(value) for _, value in sorted(found, key=order)]



def layer_encoder(model, layer_type: type, params, tokenizer, num_layers: int, convert: Callable[..., Any], *,
                  select: Callable[[Any], jax.Array] | None = None) -> Encoder:
  """The `Encoder` of a flax encoder `model` (called as `model.apply({'params': params}, input_ids, segment_ids,
  input_mask, deterministic=True)`) whose layers are its `layer_type` submodules (`select`: see
  `capture_layer_outputs`)."""

  def layer_outputs(encoder_params, input_ids, segment_ids, input_mask):
    return capture_layer_outputs(model, layer_type, encoder_params, input_ids, segment_ids, input_mask,
                                 deterministic=True, select=select)

  return Encoder(tokenizer=tokenizer, params=params, num_layers=int(num_layers), convert=convert,
                 layer_outputs=layer_outputs)

def load_init_dir(path: str, load_hf_dir: Callable[[str], tuple], vocab_file: str, vocab_what: str,
                  load_tokenizer: Callable[..., Any], default_lower_case: bool,
                  tokenizer_from_json: Callable[[str, bool | None], Any] | None = None) -> tuple:
  """(model config, params, tokenizer) from a pretraining workdir (its latest checkpoint and run config) or else an
  HF directory (`load_hf_dir(path) -> (model config, params)`). The vocabulary is `path/vocab_file`, else (when
  given) `tokenizer_from_json(path/tokenizer.json, do_lower_case)`, lower-cased as `tokenizer_config.json`'s
  `do_lower_case` says (without that file or field: None to `tokenizer_from_json`, which then follows
  tokenizer.json's normaliser, `default_lower_case` for `vocab_file`). Neither file: FileNotFoundError naming
  `vocab_what`, before any weights are read."""
  vocab = os.path.join(path, vocab_file)
  tokenizer_json = os.path.join(path, 'tokenizer.json')
  use_json = not os.path.exists(vocab) and tokenizer_from_json is not None and os.path.exists(tokenizer_json)
  if not os.path.exists(vocab) and not use_json:
    also = ' (or tokenizer.json)' if tokenizer_from_json is not None else ''
    raise FileNotFoundError(f'{vocab}{also} not found: the init directory must hold {vocab_what}')
  do_lower_case = None
  config_file = os.path.join(path, 'tokenizer_config.json')
  if os.path.exists(config_file):
    with open(config_file) as f:
      do_lower_case = json.load(f).get('do_lower_case')
  do_lower_case = None if do_lower_case is None else bool(do_lower_case)
  if use_json:
    tokenizer = tokenizer_from_json(tokenizer_json, do_lower_case)
  else:
    tokenizer = load_tokenizer(vocab, do_lower_case=default_lower_case if do_lower_case is None else do_lower_case)
  if os.path.exists(os.path.join(path, checkpoint.CONFIG_FILE)) and os.path.isdir(checkpoint.checkpoint_dir(path)):
    params, run_config = checkpoint.restore_params(path)
    model_cfg = ml_collections.ConfigDict(run_config.model.to_dict())
  else:
    model_cfg, params = load_hf_dir(path)
  return model_cfg, params, tokenizer
