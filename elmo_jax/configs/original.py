"""The published original ELMo biLM sizes (char CNN 2048 filters, 2 x LSTM 4096 -> 512, 8192 sampled words).

  python -m elmo_jax.pretrain --config elmo_jax/configs/original.py --workdir DIR --config.data.corpus=FILES \
      --config.data.eval_corpus=FILES
"""
from elmo_jax.configs.common import base_config


def get_config():
  config = base_config()
  config.data.update(vocab_size=793471, max_seq_length=64, softmax='sampled', num_sampled=8192)
  # The reference trained with Adagrad (lr 0.2); the shared optimizers are AdamW and LAMB. Clip norm as its 10.
  config.optim.update(learning_rate=1e-3, warmup_steps=2000, weight_decay=0.0, clip_grad_norm=10.0)
  config.update(num_train_steps=100000, global_batch_size=1024, log_every=100, eval_every=5000, checkpoint_every=2000)
  return config
