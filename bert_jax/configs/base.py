"""BERT-base (110M) pretraining as the original: seq 128 for 900k steps then 512 (run it as a second config).

  python -m bert_jax.pretrain --config bert_jax/configs/base.py --workdir gs://BUCKET/bert_base \
      --config.data.corpus='/data/wiki/*.txt' --config.data.vocab_file=/data/vocab.txt
"""
from bert_jax.configs.common import base_config


def get_config():
  config = base_config()
  config.model.update(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                      intermediate_size=3072,
                      attention_impl='auto')  # cuDNN's fused kernel on a GPU where no probability dropout runs
  config.data.update(vocab_size=30522, max_seq_length=128, max_predictions_per_seq=20, num_shards=256,
                     num_workers=16)
  config.optim.update(learning_rate=1e-4, warmup_steps=10_000, weight_decay=0.01)
  config.update(num_train_steps=1_000_000, global_batch_size=256, log_every=100, eval_every=10_000,
                num_eval_batches=100, checkpoint_every=5_000, dtype='bfloat16')
  return config
