"""Tiny BERT on the embedded corpus, for a CPU demo in a few minutes.

  python -m bert_jax.pretrain --config bert_jax/configs/tiny.py --workdir runs/bert_tiny
"""
from bert_jax.configs.common import base_config


def get_config():
  config = base_config()
  config.model.update(vocab_size=0, hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=512, max_position_embeddings=128)
  config.data.update(corpus='embedded', vocab_size=4000, max_seq_length=64, max_predictions_per_seq=10,
                     num_shards=4)
  config.optim.update(learning_rate=2e-3, warmup_steps=100, weight_decay=0.01)
  # NSP needs the steps: on this corpus it leaves chance only after ~1500 of them (MLM features first), then ends
  # ~0.59 against a 0.525 majority on the 24 x 32 eval rows, while MLM reaches ~2.7x its best constant predictor.
  config.update(num_train_steps=3000, global_batch_size=32, log_every=100, eval_every=1000, num_eval_batches=24,
                checkpoint_every=1000, report_examples=4)
  return config
