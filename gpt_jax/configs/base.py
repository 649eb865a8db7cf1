"""GPT-1 (117M) as in "Improving Language Understanding by Generative Pre-Training": 12 post-LN layers, 768, 12
heads, FFN 3072, 512 positions, GELU, dropout 0.1; Adam at 2.5e-4 with 2000 warmup steps, batch 64 x 512 tokens,
100 epochs of BooksCorpus (about 1M steps here), cosine decay.

  python -m gpt_jax.pretrain --config gpt_jax/configs/base.py --workdir gs://BUCKET/gpt1 \
      --config.data.corpus='/data/books/*.txt' --config.data.eval_corpus='/data/books_valid.txt'
"""
from gpt_jax.configs.common import base_config


def get_config():
  config = base_config()
  config.model.update(vocab_size=0, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                      intermediate_size=3072, max_position_embeddings=512, layout='gpt1', hidden_act='gelu_new')
  config.data.update(vocab_size=40478, max_seq_length=512, num_shards=256, num_workers=16)
  config.optim.update(learning_rate=2.5e-4, warmup_steps=2000, weight_decay=0.01, schedule='cosine')
  config.update(num_train_steps=1_000_000, global_batch_size=64, log_every=100, eval_every=10_000,
                num_eval_batches=100, checkpoint_every=5_000, dtype='bfloat16')
  return config
