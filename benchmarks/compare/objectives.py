"""The pretraining objectives the comparison trains, each one model recipe plus the changes that make the objective
(the source document's four systems and the XLNet paper's ablations), and the pretraining config of an objective at a
preset's size.

Every Transformer objective gets the same width, depth, heads, FFN, sequence length, vocabulary size, batch, optimizer
and data seed; ELMo gets the preset's LSTM sizes (chosen to be near the Transformers' FLOPs per token: the table
prints both). Each model keeps its own tokenizer family (WordPiece, sentencepiece, byte-level BPE, words + characters)
at the same vocabulary size.
"""
from __future__ import annotations

import dataclasses
import importlib
from typing import Callable

import ml_collections

Config = ml_collections.ConfigDict


@dataclasses.dataclass(frozen=True)
class ObjectiveSpec:
  """One row of the comparison: `model` is the recipe (`common.recipe.get`), `adjust` edits the model's pretraining
  config into this objective, `downstream` says how the tasks use it ('fine-tuned', 'feature-based' or 'random-init':
  no pretraining, the fine-tuning baseline of `model`'s architecture)."""
  name: str
  model: str
  description: str
  adjust: Callable[[Config], None] = lambda config: None
  downstream: str = 'fine-tuned'

  @property
  def pretrained(self) -> bool:
    return self.downstream != 'random-init'


def _bert(next_sentence: bool, whole_word: bool = False) -> Callable[[Config], None]:
  def adjust(config: Config) -> None:
    config.data.update(next_sentence=next_sentence, whole_word_mask=whole_word, masking='dynamic')
  return adjust


def _xlnet(memory: bool = True, spans: bool = True, bi_data: bool = False) -> Callable[[Config], None]:
  def adjust(config: Config) -> None:
    config.model.mem_len = config.data.reuse_len if memory else 0
    config.model.bi_data = config.data.bi_data = bi_data
    if not spans:
      config.data.max_ngram = 1
  return adjust


OBJECTIVES = {spec.name: spec for spec in (
    ObjectiveSpec('bert_mlm_nsp', 'bert', 'BERT: masked LM + next-sentence prediction (dynamic masking)',
                  _bert(next_sentence=True)),
    ObjectiveSpec('bert_mlm', 'bert', 'BERT masked LM only, no NSP (dynamic masking, RoBERTa-style)',
                  _bert(next_sentence=False)),
    ObjectiveSpec('bert_wwm', 'bert', 'BERT masked LM with whole-word masking + NSP', _bert(True, whole_word=True)),
    ObjectiveSpec('xlnet', 'xlnet', 'XLNet permutation LM: span prediction, memory', _xlnet()),
    ObjectiveSpec('xlnet_no_memory', 'xlnet', 'XLNet without memory', _xlnet(memory=False)),
    ObjectiveSpec('xlnet_single_token', 'xlnet', 'XLNet predicting single tokens, not spans', _xlnet(spans=False)),
    ObjectiveSpec('xlnet_bi_data', 'xlnet', 'XLNet with bi_data (half the batch in reverse order)',
                  _xlnet(bi_data=True)),
    ObjectiveSpec('gpt', 'gpt', 'GPT: left-to-right LM (GPT-1 layout, post-LN)',
                  lambda config: config.model.update(layout='gpt1')),
    ObjectiveSpec('elmo', 'elmo', 'ELMo: forward + backward LSTM LMs, features frozen downstream',
                  downstream='feature-based'),
    ObjectiveSpec('random_init', 'bert', 'no pretraining: the BERT architecture fine-tuned from random weights',
                  downstream='random-init'),
)}


# The task kinds (`common.tasks.registry`) each model's fine-tuning offers: GPT-1's task inputs are sequences read at
# their last token (no per-token or span outputs, `gpt_jax.finetune_data`); the ELMo task models classify, regress
# and tag (`elmo_jax.finetune.MODEL_KINDS`). A cell a model does not offer is shown as n/a, not run.
OFFERED_KINDS = {
    'bert': ('classification', 'regression', 'token', 'squad', 'multiple_choice'),
    'xlnet': ('classification', 'regression', 'token', 'squad', 'multiple_choice'),
    'gpt': ('classification', 'regression', 'multiple_choice'),
    'elmo': ('classification', 'regression', 'token'),
}


def offers(spec: ObjectiveSpec, task_kind: str) -> bool:
  """Whether `spec`'s model fine-tunes tasks of `task_kind`."""
  return task_kind in OFFERED_KINDS[spec.model]


def get(name: str) -> ObjectiveSpec:
  if name not in OBJECTIVES:
    raise ValueError(f'unknown objective {name!r}; known: {", ".join(OBJECTIVES)}')
  return OBJECTIVES[name]


def _transformer_dims(config: Config, model: str, dims: Config) -> None:
  """The preset's Transformer size in `model`'s field names; the prediction count is the original recipes' share
  (BERT 15 % of the tokens, XLNet 85 of 512)."""
  seq = int(dims.seq_len)
  if model in ('bert', 'gpt'):
    config.model.update(hidden_size=dims.hidden, num_hidden_layers=dims.layers, num_attention_heads=dims.heads,
                        intermediate_size=dims.ffn, max_position_embeddings=max(seq, 128))
    config.data.update(max_seq_length=seq)
    if model == 'bert':
      config.data.update(max_predictions_per_seq=max(1, round(0.15 * seq)))
  elif model == 'xlnet':
    reuse = seq // 2
    config.model.update(d_model=dims.hidden, n_layer=dims.layers, n_head=dims.heads, d_head=dims.hidden // dims.heads,
                        d_inner=dims.ffn, reuse_len=reuse, mem_len=reuse)
    config.data.update(seq_len=seq, reuse_len=reuse, num_predict=max(1, round(seq * 85 / 512)), perm_size=reuse)


def pretrain_config(spec: ObjectiveSpec, preset: Config, corpus: str, eval_corpus: str) -> Config:
  """`spec`'s pretraining config at `preset`'s size on `corpus` (steps are set later, from the FLOP budget)."""
  config = importlib.import_module(f'{spec.model}_jax.configs.tiny').get_config()
  dims = preset.model
  if spec.model == 'elmo':
    config.model.update(**preset.elmo.model.to_dict())
    config.data.update(max_seq_length=preset.elmo.seq_len)
  else:
    _transformer_dims(config, spec.model, dims)
  config.data.update(corpus=corpus, eval_corpus=eval_corpus, vocab_size=dims.vocab_size,
                     num_shards=preset.num_shards)
  config.optim.update(learning_rate=preset.learning_rate, weight_decay=0.01)
  config.update(global_batch_size=preset.batch_size, seed=preset.seed, log_every=preset.log_every, eval_every=0,
                num_eval_batches=preset.eval_batches, progress_bar=False)
  config.mesh.update(**preset.mesh)
  for field, value in (('report_examples', 0), ('export_hf', False)):
    if field in config:
      config[field] = value
  spec.adjust(config)
  return config


def set_steps(config: Config, flops_per_example: float, budget: float, warmup_fraction: float) -> int:
  """Steps that spend `budget` training FLOPs (the objective's own count: `flops_per_example * global_batch_size`
  per step), with the warm-up a fixed fraction of them and a checkpoint every quarter."""
  steps = max(1, int(budget // (flops_per_example * config.global_batch_size)))
  config.num_train_steps = steps
  config.optim.warmup_steps = max(1, int(round(warmup_fraction * steps)))
  config.checkpoint_every = max(1, steps // 4)
  return steps
