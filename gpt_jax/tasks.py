"""What GPT contributes to fine-tuning and feature extraction: its `ADAPTER` (the GPT-1 heads with the auxiliary LM
loss, the input transformations, encoder path, FLOPs, dropouts; see `common.model_adapter.ModelAdapter`;
`adapter(lm_coef)` for another λ), `load_init(path)` (model config, encoder params, tokenizer, the task tokens
appended) and `load_encoder(init)` (the feature extractor's `Encoder`). No runner is imported here; the entry points
`gpt_jax.finetune` and `gpt_jax.extract_features` hand these to the shared runners.
"""
from __future__ import annotations

import functools

import jax

from common import model_adapter
from gpt_jax import finetune_data, heads
from gpt_jax import model as gpt_model
from gpt_jax import tokenizer as gpt_tokenizer

LM_COEF = 0.5  # λ of the auxiliary LM loss (the paper's).
TASK_TOKEN_SEED = 0  # The task tokens' embedding rows are drawn from this key (same rows for every seed's run).


def adapter(lm_coef: float = LM_COEF) -> model_adapter.ModelAdapter:
  """GPT's adapter whose heads add `lm_coef` x the auxiliary LM loss (0: the task loss alone)."""
  if lm_coef < 0:
    raise ValueError(f'lm_coef must be >= 0, got {lm_coef}')
  return model_adapter.ModelAdapter(
      make_head=functools.partial(heads.make_head, lm_coef=float(lm_coef)), convert=finetune_data.convert_examples,
      encoder_key='gpt', flops_per_example=gpt_model.flops_per_example,
      dropout_fields=('hidden_dropout_prob', 'embedding_dropout_prob', 'attention_probs_dropout_prob'))


ADAPTER = adapter()


def _load_hf_dir(path: str):
  from gpt_jax import export  # pylint: disable=import-outside-toplevel
  return export.load_hf_dir(path)


def load_init(path: str):
  """(model config, encoder params `gpt/...`, `finetune_data.TaskTokenizer`) from an HF GPT directory
  (`gpt_jax.export`) or a pretraining workdir, its byte-level BPE (`vocab.json` + `merges.txt`). The task tokens
  start / delimiter / extract are appended to the vocabulary (`heads.add_task_tokens`: ids V, V + 1, V + 2 for a
  pretrained vocabulary of V rows; `model_cfg.vocab_size` becomes V + 3)."""
  model_cfg, params, tokenizer = model_adapter.load_init_dir(
      path, _load_hf_dir, gpt_tokenizer.VOCAB_NAME, 'the byte-level BPE (vocab.json and merges.txt)',
      lambda vocab_file, do_lower_case: gpt_tokenizer.load_tokenizer(vocab_file), default_lower_case=False)
  pretrained_vocab = int(model_cfg.vocab_size)
  model_cfg, params = heads.add_task_tokens(model_cfg, params, jax.random.PRNGKey(TASK_TOKEN_SEED))
  return model_cfg, params['gpt'], finetune_data.TaskTokenizer(tokenizer, heads.task_token_ids(pretrained_vocab))


def load_encoder(init: str) -> model_adapter.Encoder:
  """The network of an HF GPT directory or a pretraining workdir with its tokenizer; sentences laid out as
  classification lays them out (`<start> A <delim> B <extract>`); layer outputs are the blocks' hidden states."""
  model_cfg, params, tokenizer = load_init(init)
  model = gpt_model.GPTModel(model_cfg)

  def layer_outputs(encoder_params, input_ids, segment_ids, input_mask):
    del segment_ids, input_mask  # Causal: padding on the right never reaches a real token.
    return model_adapter.capture_layer_outputs(model, gpt_model.GPTBlock, encoder_params, input_ids,
                                               deterministic=True, select=lambda output: output[0])

  return model_adapter.Encoder(tokenizer=tokenizer, params=params, num_layers=int(model_cfg.num_hidden_layers),
                               convert=finetune_data.convert_encoder_examples, layer_outputs=layer_outputs)
