"""What BERT contributes to fine-tuning and feature extraction: its `ADAPTER` (heads, feature converters, encoder
path, FLOPs, dropouts; see `common.model_adapter.ModelAdapter`), `load_init(path)` (model config, encoder params,
tokenizer) and `load_encoder(init)` (the feature extractor's `Encoder`). No runner is imported here; the entry points
`bert_jax.finetune` and `bert_jax.extract_features` hand these to the shared runners.
"""
from __future__ import annotations

from bert_jax import finetune_data
from bert_jax import heads
from bert_jax import model as bert_model
from bert_jax import tokenizer as bert_tokenizer
from common import model_adapter

ADAPTER = model_adapter.ModelAdapter(
    make_head=heads.make_head, convert=finetune_data.convert_examples, encoder_key='bert',
    flops_per_example=lambda cfg, seq_len: bert_model.flops_per_example(cfg, seq_len, 0),
    dropout_fields=('hidden_dropout_prob', 'attention_probs_dropout_prob'), packs=True)


def _load_hf_dir(path: str):
  from bert_jax import export  # pylint: disable=import-outside-toplevel
  model_cfg, params, _ = export.load_hf_dir(path, return_info=True, subtree='bert')  # the encoder, no heads
  return model_cfg, params


def load_init(path: str):
  """(model config, encoder params `bert/...`, tokenizer) from an HF BERT directory or a pretraining workdir; the
  vocabulary is the directory's `vocab.txt`, else the WordPiece vocabulary inside its `tokenizer.json`."""
  model_cfg, params, tokenizer = model_adapter.load_init_dir(
      path, _load_hf_dir, bert_tokenizer.VOCAB_FILE, 'the WordPiece vocabulary', bert_tokenizer.load_tokenizer,
      default_lower_case=True, tokenizer_from_json=bert_tokenizer.tokenizer_from_json)
  return model_cfg, params['bert'], tokenizer


def load_encoder(init: str) -> model_adapter.Encoder:
  """The encoder of an HF BERT directory or a pretraining workdir, with its tokenizer; sentences laid out as the
  fine-tuning pair converter lays them out (`[CLS] A [SEP] B [SEP]`)."""
  model_cfg, params, tokenizer = load_init(init)
  return model_adapter.layer_encoder(bert_model.BertModel(model_cfg), bert_model.BertLayer, params, tokenizer,
                                     model_cfg.num_hidden_layers, finetune_data.convert_pair_examples)
