"""GPT fine-tuning defaults (the GPT-1 paper, section 4.1: lr 6.25e-5, batch 32, 3 epochs, linear warmup over 0.2 %
of training, λ = 0.5, dropout 0.1 on the task layer as in the model).

  python -m gpt_jax.finetune --task glue/rte --init HF_DIR --workdir runs/rte --data_dir glue/RTE
  python -m gpt_jax.finetune --task glue/cola --init HF_DIR --workdir runs/cola --data_dir glue/CoLA \
      --config.lm_coef=0
"""
from common.finetune_config import finetune_config


def get_config():
  config = finetune_config(learning_rate=6.25e-5, warmup_proportion=0.002, epochs=3.0, global_batch_size=32,
                           max_seq_length=128, layer_decay=1.0, seeds=())
  config.lm_coef = 0.5  # λ of the auxiliary LM loss; 0 switches it off.
  return config
