"""GPT-2 small (124M): 12 pre-LN layers + final LayerNorm, 768, 12 heads, FFN 3072, 1024 positions, byte-level
BPE of 50257 (load GPT-2's own `vocab.json` + `merges.txt` with `--config.data.vocab_file`).

  python -m gpt_jax.pretrain --config gpt_jax/configs/gpt2.py --workdir gs://BUCKET/gpt2 \
      --config.data.corpus='/data/web/*.txt' --config.data.eval_corpus='/data/web_valid.txt' \
      --config.data.vocab_file=/data/gpt2/vocab.json
"""
from gpt_jax.configs.common import base_config


def get_config():
  config = base_config()
  config.model.update(vocab_size=50257, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                      intermediate_size=3072, max_position_embeddings=1024, layout='gpt2', hidden_act='gelu_new')
  config.data.update(vocab_size=50257, max_seq_length=1024, num_shards=256, num_workers=16)
  config.optim.update(learning_rate=6e-4, warmup_steps=2000, weight_decay=0.1, schedule='cosine', b2=0.95)
  config.update(num_train_steps=600_000, global_batch_size=512, log_every=100, eval_every=10_000,
                num_eval_batches=100, checkpoint_every=5_000, dtype='bfloat16', remat=True)
  config.mesh.update(data=1, fsdp=-1, tensor=1)
  return config
