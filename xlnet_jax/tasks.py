"""What XLNet contributes to fine-tuning and feature extraction: its `ADAPTER` (heads, feature converters, encoder
path, FLOPs, dropouts, SQuAD heads; see `common.model_adapter.ModelAdapter`), `load_init(path)` (model config,
encoder params, tokenizer) and `load_encoder(init)` (the feature extractor's `Encoder`). No runner is imported here;
the entry points `xlnet_jax.finetune` and `xlnet_jax.extract_features` hand these to the shared runners.
"""
from __future__ import annotations

from common import model_adapter
from xlnet_jax import finetune_data
from xlnet_jax import heads
from xlnet_jax import model as xlnet_model
from xlnet_jax import tokenizer as xlnet_tokenizer

ADAPTER = model_adapter.ModelAdapter(
    make_head=heads.make_head, convert=finetune_data.convert_examples, encoder_key='transformer',
    flops_per_example=lambda cfg, seq_len: xlnet_model.flops_per_example(cfg, seq_len, 0),
    dropout_fields=('dropout', 'dropatt'), squad_heads=('beam', 'simple'), output_layer='logits')


def _load_hf_dir(path: str):
  from xlnet_jax import export  # pylint: disable=import-outside-toplevel
  model_cfg, params, _ = export.load_hf_dir(path, return_info=True)
  return model_cfg, params


def load_init(path: str):
  """(model config, encoder params `transformer/...`, tokenizer) from an HF XLNet directory or a pretraining
  workdir (the vocabulary is its `spiece.model`). Fine-tuning runs without memory (mem_len and reuse_len are set
  to 0) and reads every row left to right (`bi_data`, a pretraining batch layout, is off, as in the original's
  fine-tuning scripts)."""
  model_cfg, params, tokenizer = model_adapter.load_init_dir(
      path, _load_hf_dir, xlnet_tokenizer.MODEL_FILE, 'the sentencepiece model', xlnet_tokenizer.load_tokenizer,
      default_lower_case=False)
  model_cfg.mem_len, model_cfg.reuse_len, model_cfg.bi_data = 0, 0, False
  return model_cfg, params['transformer'], tokenizer


def load_encoder(init: str) -> model_adapter.Encoder:
  """The encoder of an HF XLNet directory or a pretraining workdir, with its tokenizer: the content stream of each
  layer, without memory, permutation or query stream; sentences laid out as the fine-tuning pair converter lays
  them out (`A <sep> B <sep> <cls>`, padded on the left)."""
  model_cfg, params, tokenizer = load_init(init)
  return model_adapter.layer_encoder(xlnet_model.XLNetModel(model_cfg), xlnet_model.XLNetLayer, params, tokenizer,
                                     model_cfg.n_layer, finetune_data.convert_pair_examples,
                                     select=lambda out: out[0])
