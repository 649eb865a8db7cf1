"""Deterministic synthetic BERT batches and a tiny config, for trainer tests that need no corpus."""
from __future__ import annotations

import ml_collections
import numpy as np

from bert_jax import model as bert_model
from common import optim, trainer


def tiny_config(**overrides) -> ml_collections.ConfigDict:
  config = trainer.trainer_config(num_train_steps=6, global_batch_size=16, log_every=1, eval_every=0,
                                  num_eval_batches=0, checkpoint_every=0, progress_bar=False, seed=3)
  config.model = bert_model.model_config(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                         intermediate_size=64, max_position_embeddings=32,
                                         hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
  config.data = ml_collections.ConfigDict(dict(max_seq_length=16, max_predictions_per_seq=4, next_sentence=True))
  config.optim = optim.optim_config(learning_rate=1e-3, warmup_steps=2, weight_decay=0.01)
  config.dtype = 'float32'
  config.remat = False
  config.mesh.update(num_devices=1)  # one device, unless a test lays out a mesh (num_devices=0: all 8)
  config.update(overrides)
  return config


def synthetic_batch(step: int, batch_size: int, seq_len: int, num_pred: int, vocab: int, seed: int = 0) -> dict:
  rng = np.random.default_rng([seed, step])
  lengths = rng.integers(seq_len // 2, seq_len + 1, size=batch_size)
  input_mask = (np.arange(seq_len)[None] < lengths[:, None]).astype(np.int32)
  input_ids = rng.integers(5, vocab, size=(batch_size, seq_len)).astype(np.int32) * input_mask
  segment_ids = ((np.arange(seq_len)[None] >= lengths[:, None] // 2) & (input_mask > 0)).astype(np.int32)
  positions = np.sort(rng.permuted(np.tile(np.arange(1, seq_len // 2), (batch_size, 1)), axis=1)[:, :num_pred], 1)
  weights = (rng.random((batch_size, num_pred)) < 0.9).astype(np.float32)
  labels = np.take_along_axis(input_ids, positions, 1)
  return dict(input_ids=input_ids, input_mask=input_mask, segment_ids=segment_ids,
              masked_lm_positions=positions.astype(np.int32), masked_lm_ids=labels.astype(np.int32),
              masked_lm_weights=weights, next_sentence_labels=rng.integers(0, 2, size=batch_size).astype(np.int32))


class SyntheticLoader:
  """Step-indexed loader with the trainer's loader contract: `host_batch(step)`, `iterate(start_step)`."""

  def __init__(self, config, seed: int = 0, process_index: int = 0, process_count: int = 1):
    self.config = config
    self.global_batch_size = config.global_batch_size
    self.seed = seed
    self.process_index, self.process_count = process_index, process_count
    self.steps_seen: list[int] = []

  def host_batch(self, step: int) -> dict:
    c = self.config
    full = synthetic_batch(step, c.global_batch_size, c.data.max_seq_length, c.data.max_predictions_per_seq,
                           c.model.vocab_size, self.seed)
    rows = c.global_batch_size // self.process_count
    return {k: v[self.process_index * rows:(self.process_index + 1) * rows] for k, v in full.items()}

  def iterate(self, start_step: int):
    step = start_step
    while True:
      self.steps_seen.append(step)
      yield step, self.host_batch(step)
      step += 1
