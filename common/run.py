"""Glue every pretraining entry point shares: data prepared once across hosts, the vocabulary size filled in,
absl logging kept quiet."""
from __future__ import annotations

from typing import Any, Callable

import jax
import ml_collections
from absl import logging

from common.config import ConfigError


def prepare_on_primary(prepare: Callable[[], Any], name: str) -> Any:
  """Runs `prepare()` on process 0 first, then on every other process, which finds the result complete and reuses it.

  `prepare` must be idempotent (the data preparers skip stages whose fingerprint matches).
  """
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    if jax.process_index() == 0:
      prepare()
    multihost_utils.sync_global_devices(f'{name}_prepared')
  return prepare()


def fill_vocab_size(model_cfg: ml_collections.ConfigDict, tokenizer_vocab_size: int, field: str = 'vocab_size') -> None:
  """`model.<field> == 0` follows the tokenizer; a set value must be at least the tokenizer's vocabulary."""
  if model_cfg[field] == 0:
    model_cfg[field] = tokenizer_vocab_size
  elif model_cfg[field] < tokenizer_vocab_size:
    raise ConfigError(f'config.model.{field}: {model_cfg[field]} is smaller than the tokenizer vocabulary '
                      f'({tokenizer_vocab_size}); set it to 0 to follow the tokenizer')


def quiet_logging(flags_values) -> None:
  """Checkpointing libraries log every save at INFO: default to WARNING unless --verbosity was given."""
  if not flags_values['verbosity'].present:
    logging.set_verbosity(logging.WARNING)
