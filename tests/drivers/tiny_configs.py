"""Tiny BERT and XLNet configs for the subprocess tests: a few seconds per run on one CPU core.

  python -m bert_jax.pretrain --config tests/drivers/tiny_configs.py:bert --workdir DIR --config.data_dir=DATA
  python -m xlnet_jax.pretrain --config tests/drivers/tiny_configs.py:xlnet --workdir DIR --config.data_dir=DATA

`data_dir` (read by both entry points) points every run of a test session at the same prepared data; metrics are
logged every step; no HF export and no eval, so a run is data loading, compile and steps only. The data is
prepared by one process (the parallel shard writer's output equals the serial one's: test_bert_data.py).
"""
from __future__ import annotations

import ml_collections


def _runtime(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  config.update(num_train_steps=16, global_batch_size=8, log_every=1, eval_every=0, num_eval_batches=0,
                checkpoint_every=0, keep_checkpoints=2, progress_bar=False, export_hf=False,
                peak_flops_per_device=1e12)  # a fixed peak: no matmul measurement at start-up
  config.optim.update(warmup_steps=2)
  config.data.num_workers = 1  # shards written in-process: spawning writers costs seconds on a 300 kB slice
  config.data_dir = ''
  return config


def bert_config() -> ml_collections.ConfigDict:
  from bert_jax.configs import tiny  # pylint: disable=import-outside-toplevel
  config = tiny.get_config()
  config.model.update(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                      max_position_embeddings=32)
  config.data.update(vocab_size=1000, max_seq_length=32, max_predictions_per_seq=5, num_shards=2)
  return _runtime(config)


def xlnet_config() -> ml_collections.ConfigDict:
  from xlnet_jax.configs import tiny  # pylint: disable=import-outside-toplevel
  config = tiny.get_config()
  config.model.update(d_model=32, n_head=2, d_head=16, d_inner=64, mem_len=16)
  config.data.update(vocab_size=1000, seq_len=32, reuse_len=16, num_predict=5, num_shards=2)
  return _runtime(config)


def get_config(model: str = 'bert') -> ml_collections.ConfigDict:
  builders = {'bert': bert_config, 'xlnet': xlnet_config}
  if model not in builders:
    raise ValueError(f'unknown model {model!r}: one of {sorted(builders)}')
  return builders[model]()
