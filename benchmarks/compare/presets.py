"""Sizes, budgets and downstream tasks of the comparison, one preset per machine class.

`micro` is for the test suite (seconds, on one device); `cpu` fits a 2-core machine in well under 90 minutes; `gpu`
and `tpu` are sized for one accelerator and a slice (base-size Transformers, budgets in the 1e17-1e19 FLOP range). A
preset is an `ml_collections.ConfigDict`; the command line can override any field (`--set budget_flops=2e15`).
"""
from __future__ import annotations

import ml_collections

from benchmarks.compare import objectives
from elmo_jax import model as elmo_model

# The document's four systems and the no-pretraining baseline first, then the ablations.
ORDER = ('bert_mlm_nsp', 'xlnet', 'gpt', 'elmo', 'random_init', 'bert_mlm', 'bert_wwm', 'xlnet_no_memory',
         'xlnet_single_token', 'xlnet_bi_data')
GLUE = ('cola', 'mrpc', 'rte', 'stsb')
SPANS_AND_TAGS = ('conll2003', 'squad_halves')


def _preset(**fields) -> ml_collections.ConfigDict:
  base = dict(
      objectives=ORDER, tasks=('learnable',) + GLUE, seeds=(0, 1, 2), seed=1234, num_shards=4, learning_rate=1e-3,
      warmup_fraction=0.1, batch_size=32, log_every=25, eval_batches=4,
      model=dict(hidden=128, layers=2, heads=2, ffn=512, seq_len=64, vocab_size=4000),
      # ELMo's features (forward ‖ backward projections) are as wide as the Transformers' hidden states, and its
      # FLOPs per token (two full softmaxes, two LSTM stacks) are near GPT's; 48 words are about 64 subword tokens.
      elmo=dict(seq_len=48, model=dict(max_characters_per_token=20, char_embedding_dim=8,
                                       filters=[[1, 16], [2, 16], [3, 32], [4, 64]], projection_dim=64,
                                       lstm_dim=256, dropout=0.1)),
      finetune=dict(learning_rate=3e-4, epochs=3.0, batch_size=32, max_seq_length=64, num_train_examples=2000,
                    num_eval_examples=1000, warmup_proportion=0.1),
      # The task model on a frozen biLM trains from scratch: a higher rate and more passes (still cheaper per step
      # than fine-tuning a Transformer, whose backward pass it does not have).
      feature_based=dict(learning_rate=5e-3, epochs=4.0),
      # SQuAD windows at the preset's sequence length (the original's 128 stride and 64-token questions need 384).
      squad=dict(doc_stride=32, max_query_length=24, max_answer_length=30),
      # Every run's mesh (`config.mesh`): all attached devices, data parallel.
      mesh=dict(data=-1, fsdp=1, tensor=1, num_devices=0),
  )
  base.update(fields)
  return ml_collections.ConfigDict(base)


def _accelerator(seq_len: int, elmo_seq_len: int, **fields) -> ml_collections.ConfigDict:
  """BERT-base-size Transformers, the published ELMo sizes, the papers' fine-tuning recipe on every row."""
  elmo = dict(max_characters_per_token=50, char_embedding_dim=16, projection_dim=512, lstm_dim=4096, dropout=0.1,
              filters=[list(f) for f in elmo_model.ORIGINAL_FILTERS])
  return _preset(
      learning_rate=1e-4, log_every=100, eval_batches=50, tasks=('learnable',) + GLUE + SPANS_AND_TAGS,
      squad=dict(doc_stride=min(128, seq_len // 2), max_query_length=min(64, seq_len // 4), max_answer_length=30),
      model=dict(hidden=768, layers=12, heads=12, ffn=3072, seq_len=seq_len, vocab_size=32000),
      elmo=dict(seq_len=elmo_seq_len, model=elmo),
      finetune=dict(learning_rate=2e-5, epochs=3.0, batch_size=32, max_seq_length=seq_len, num_train_examples=0,
                    num_eval_examples=0, warmup_proportion=0.1), **fields)


PRESETS = {
    # Two objectives, one task, one seed: what the tests run.
    'micro': lambda: _preset(
        objectives=('bert_mlm', 'gpt'), tasks=('learnable',), seeds=(0,), budget_flops=6e8, num_shards=1,
        log_every=2, eval_batches=1, batch_size=8, mesh=dict(data=1, fsdp=1, tensor=1, num_devices=1),
        model=dict(hidden=32, layers=1, heads=2, ffn=64, seq_len=32, vocab_size=300),
        elmo=dict(seq_len=16, model=dict(max_characters_per_token=12, char_embedding_dim=4,
                                         filters=[[1, 8], [2, 8]], projection_dim=16, lstm_dim=32, dropout=0.1)),
        finetune=dict(learning_rate=1e-3, epochs=1.0, batch_size=16, max_seq_length=32, num_train_examples=64,
                      num_eval_examples=32, warmup_proportion=0.1)),
    # The 2-core CPU run of benchmarks/results/compare_cpu.md: ~1000 steps of batch 32 per Transformer objective,
    # then 2 seeds x 7 tasks on the first 1000 training / 500 dev rows of each.
    # SQuAD's windows (~5 per question at length 64) make it the dearest task: half the questions.
    'cpu': lambda: _preset(budget_flops=6e12, seeds=(0, 1), tasks=('learnable',) + GLUE + SPANS_AND_TAGS,
                           squad=dict(doc_stride=32, max_query_length=24, max_answer_length=30,
                                      num_train_examples=500, num_eval_examples=250),
                           finetune=dict(
        learning_rate=3e-4, epochs=2.0, batch_size=32, max_seq_length=64, num_train_examples=1000,
        num_eval_examples=500, warmup_proportion=0.1)),
    # One GPU: BERT-base dims, a budget of about a day.
    'gpu': lambda: _accelerator(seq_len=128, elmo_seq_len=64, budget_flops=1e18, batch_size=256, num_shards=64),
    # A TPU slice: the same dims at 10x the budget and seq 512.
    'tpu': lambda: _accelerator(seq_len=512, elmo_seq_len=128, budget_flops=1e19, batch_size=1024, num_shards=256,
                                seeds=(0, 1, 2, 3, 4)),
}


def get(name: str) -> ml_collections.ConfigDict:
  if name not in PRESETS:
    raise ValueError(f'unknown preset {name!r}; known: {", ".join(PRESETS)}')
  return PRESETS[name]()
