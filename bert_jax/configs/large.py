"""BERT-large (340M): 24 layers, hidden 1024, 16 heads; LAMB at batch 4096 as in the large-batch recipe.

  python -m bert_jax.pretrain --config bert_jax/configs/large.py --workdir gs://BUCKET/bert_large \
      --config.data.corpus='/data/wiki/*.txt' --config.data.vocab_file=/data/vocab.txt
"""
from bert_jax.configs.common import base_config


def get_config():
  config = base_config()
  config.model.update(vocab_size=30522, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                      intermediate_size=4096,
                      attention_impl='auto')  # cuDNN's fused kernel on a GPU where no probability dropout runs
  config.data.update(vocab_size=30522, max_seq_length=128, max_predictions_per_seq=20, num_shards=1024,
                     num_workers=32)
  config.optim.update(name='lamb', learning_rate=6e-3, warmup_steps=2000, weight_decay=0.01, bias_correction=False)
  config.update(num_train_steps=7038, global_batch_size=4096, log_every=50, eval_every=1000, num_eval_batches=100,
                checkpoint_every=500, dtype='bfloat16', remat=True)
  config.mesh.update(data=1, fsdp=-1, tensor=1)
  return config
