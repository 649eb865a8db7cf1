"""ELMo feature-based fine-tuning defaults: the biLM frozen, only the scalar mix and the small task model trained
(Adam at 1e-3 as the reference's task models; a few epochs more than the full-model fine-tuners, since the task
model starts from scratch).

  python -m elmo_jax.finetune --task glue/rte --init runs/elmo_tiny --workdir runs/rte --data_dir glue/RTE
  python -m elmo_jax.finetune --task glue/cola --init BILM_DIR --workdir runs/cola --data_dir glue/CoLA \
      --config.seeds=0,1,2 --config.epochs=5

Beyond `common.finetune_config.finetune_config`: task_hidden_size (the task model's per-word dense layer),
scalar_mix_layer_norm (layer-normalise each biLM layer before mixing). `dropout` (>= 0) is the task model's dropout
(on the mixed layers and after its dense); the frozen biLM runs without dropout.
"""
from common.finetune_config import finetune_config


def get_config():
  config = finetune_config(learning_rate=1e-3, warmup_proportion=0.1, epochs=10.0, global_batch_size=32,
                           max_seq_length=128, layer_decay=1.0, seeds=(), dropout=0.2, length_buckets=8)
  config.optim.update(weight_decay=0.0)
  config.task_hidden_size = 128
  config.scalar_mix_layer_norm = False
  return config
