"""Tiny ELMo biLM on the embedded corpus, for a CPU demo in a few minutes.

  python -m elmo_jax.pretrain --config elmo_jax/configs/tiny.py --workdir runs/elmo_tiny
"""
from elmo_jax.configs.common import base_config


def get_config():
  config = base_config()
  config.model.update(vocab_size=0, max_characters_per_token=20, char_embedding_dim=8,
                      filters=[[1, 16], [2, 16], [3, 32]], projection_dim=64, lstm_dim=256, dropout=0.1)
  config.data.update(corpus='embedded', vocab_size=4000, max_seq_length=32, num_shards=4)
  config.optim.update(learning_rate=2e-3, warmup_steps=50, weight_decay=0.0)
  config.update(num_train_steps=600, global_batch_size=32, log_every=25, eval_every=200, num_eval_batches=4,
                checkpoint_every=200)
  return config
