"""XLNet fine-tuning defaults (the original `run_classifier.py` settings, AdamW with epsilon 1e-6).

  python -m xlnet_jax.finetune --task glue/mrpc --init HF_DIR --workdir runs/mrpc --data_dir glue/MRPC
  python -m xlnet_jax.finetune --task race --init HF_DIR --workdir runs/race --data_dir RACE \
      --config.max_seq_length=512 --config.layer_decay=0.75
"""
from common.finetune_config import finetune_config


def get_config():
  return finetune_config(learning_rate=2e-5, warmup_proportion=0.1, epochs=3.0, global_batch_size=32,
                                  max_seq_length=128, layer_decay=1.0, seeds=())
