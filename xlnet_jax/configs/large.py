"""XLNet-large (24 layers, d_model 1024, 16 heads): seq 512, reuse 256, mem 384, 85 predictions, batch 8192 in the
original (here 2048 with remat and FSDP; raise it with --config.global_batch_size).

  python -m xlnet_jax.pretrain --config xlnet_jax/configs/large.py --workdir gs://BUCKET/xlnet_large \
      --config.data.corpus='/data/text/*.txt' --config.data.spiece_model=/data/spiece.model
"""
from xlnet_jax.configs.common import base_config


def get_config():
  config = base_config()
  config.model.update(vocab_size=32000, d_model=1024, n_layer=24, n_head=16, d_head=64, d_inner=4096, mem_len=384,
                      ff_activation='gelu', untie_r=True)
  config.data.update(vocab_size=32000, seq_len=512, reuse_len=256, num_predict=85, num_shards=1024, num_workers=32,
                     bi_data=True)
  config.optim.update(learning_rate=1e-4, warmup_steps=40_000, weight_decay=0.01)
  config.update(num_train_steps=500_000, global_batch_size=2048, log_every=100, eval_every=10_000,
                num_eval_batches=50, checkpoint_every=2_000, dtype='bfloat16', remat=True)
  config.mesh.update(data=1, fsdp=-1, tensor=1)
  return config
