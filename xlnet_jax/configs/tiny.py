"""Tiny XLNet on the embedded corpus, for a CPU demo in a few minutes.

  python -m xlnet_jax.pretrain --config xlnet_jax/configs/tiny.py --workdir runs/xlnet_tiny
"""
from xlnet_jax.configs.common import base_config


def get_config():
  config = base_config()
  config.model.update(d_model=128, n_layer=2, n_head=2, d_head=64, d_inner=512, mem_len=32, ff_activation='gelu')
  config.data.update(corpus='embedded', vocab_size=4000, seq_len=64, reuse_len=32, num_predict=10, num_shards=4)
  config.optim.update(learning_rate=1e-3, warmup_steps=50, weight_decay=0.01)
  config.update(num_train_steps=600, global_batch_size=16, log_every=25, eval_every=200, num_eval_batches=2,
                checkpoint_every=200, report_examples=4)
  return config
