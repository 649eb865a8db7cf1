"""The parameters a fine-tuning run starts from (`common.finetune`'s plan, head draw and graft), without training."""
from __future__ import annotations

import numpy as np

from common import finetune


def initial_output_bias(adapter, load_init, init: str, task: str, data_dir: str, config, seed: int = 0) -> np.ndarray:
  """The bias of `adapter.output_layer` that a run of `task` under `config` from the HF directory `init` starts
  from: the head drawn for `seed`, the encoder grafted in, `config.regression_bias` applied."""
  # pylint: disable=protected-access
  model_cfg, encoder, tokenizer = load_init(init)
  kind = finetune.training_kind(task, config, adapter)
  plan = finetune._plan(config, adapter, task, kind, seed, tokenizer, model_cfg, data_dir)
  init_head, shapes = finetune._head_initializer(plan, adapter.encoder_key)
  params = finetune._grafted_params(
      init_head, seed, {adapter.encoder_key: shapes[adapter.encoder_key]}, encoder, adapter.encoder_key,
      finetune._output_bias(config, plan, adapter))
  return np.asarray(params[adapter.output_layer]['bias'])
