"""BERT fine-tuning defaults (the original `run_classifier.py` / `run_squad.py` settings).

  python -m bert_jax.finetune --task glue/mrpc --init HF_DIR --workdir runs/mrpc --data_dir glue/MRPC
  python -m bert_jax.finetune --task squad/v1.1 --init HF_DIR --workdir runs/squad \
      --config.max_seq_length=384 --config.learning_rate=3e-5 --config.epochs=2
"""
from common.finetune_config import finetune_config


def get_config():
  return finetune_config(learning_rate=2e-5, warmup_proportion=0.1, epochs=3.0, global_batch_size=32,
                                  max_seq_length=128, layer_decay=1.0, seeds=())
