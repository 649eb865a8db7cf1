"""XLNet-base (12 layers, d_model 768) as the original: seq 512, reuse 256, mem 384, 85 predictions.

  python -m xlnet_jax.pretrain --config xlnet_jax/configs/base.py --workdir gs://BUCKET/xlnet_base \
      --config.data.corpus='/data/text/*.txt' --config.data.spiece_model=/data/spiece.model
"""
from xlnet_jax.configs.common import base_config


def get_config():
  config = base_config()
  config.model.update(vocab_size=32000, d_model=768, n_layer=12, n_head=12, d_head=64, d_inner=3072, mem_len=384,
                      ff_activation='gelu', untie_r=True)
  config.data.update(vocab_size=32000, seq_len=512, reuse_len=256, num_predict=85, num_shards=256, num_workers=16)
  config.optim.update(learning_rate=4e-4, warmup_steps=40_000, weight_decay=0.01)
  config.update(num_train_steps=500_000, global_batch_size=512, log_every=100, eval_every=10_000,
                num_eval_batches=50, checkpoint_every=5_000, dtype='bfloat16')
  return config
