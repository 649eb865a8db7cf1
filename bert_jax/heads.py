"""BERT fine-tuning heads: the pretrained encoder under `bert/...` (the pretraining path, so pretrained parameters
load by path) plus a freshly initialised task layer.

Every head is called as `head(input_ids, segment_ids, input_mask, p_mask=None, *, deterministic)` and returns float32
logits; shapes (B batch, L length, C choices, K labels):
  classification   [B, L] inputs -> [B, K]         pooled -> dropout -> dense (as `run_classifier.py`)
                   (also from packed rows: `position_ids`, `example_ids`, `pool_at`, see `common.finetune_packing`)
  regression       [B, L] inputs -> [B]            pooled -> dropout -> dense to one score
  token            [B, L] inputs -> [B, L, K]      sequence -> dropout -> dense per token
  multiple_choice  [B, C, L] inputs -> [B, C]      pooled -> dropout -> dense to one score per choice
  squad            [B, L] inputs -> [B, 2, L]      sequence -> dense to (start, end) logits (as `run_squad.py`);
                                                   positions with p_mask 1 get a very negative logit
"""
from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import ml_collections
from flax import linen as nn

from bert_jax import model as bert_model
from common import layers, task_kinds

KINDS = task_kinds.HEAD_KINDS


class BertForTask(nn.Module):
  """BERT + one task layer (`kind` one of KINDS, a `common.task_kinds` name; `num_labels` K for classification and
  token)."""
  config: ml_collections.ConfigDict
  kind: str
  num_labels: int = 2
  dtype: Any = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, input_ids, segment_ids, input_mask, p_mask=None, *, deterministic: bool = True,
               position_ids=None, example_ids=None, pool_at=None):
    cfg = self.config
    kind = task_kinds.check_head_kind(self.kind, KINDS)
    shape = input_ids.shape
    input_ids, segment_ids, input_mask = kind.flatten_inputs(input_ids, segment_ids, input_mask)
    sequence, pooled, _ = bert_model.BertModel(cfg, self.dtype, self.remat, name='bert')(
        input_ids, segment_ids, input_mask, deterministic=deterministic, position_ids=position_ids,
        example_ids=example_ids, pool_at=pool_at)
    x = pooled if kind.pooled else sequence
    if kind.dropout:
      x = layers.Dropout(cfg.hidden_dropout_prob)(x, deterministic=deterministic)
    dense = layers.DenseGeneral((kind.head_width(self.num_labels),), ('embed', 'classes'),
                                kernel_init=layers.truncated_normal(cfg.initializer_range), dtype=self.dtype,
                                name='classifier')
    return kind.outputs(dense(x), shape, p_mask)


def make_head(model_cfg: ml_collections.ConfigDict, kind: str, num_labels: int, dtype=jnp.float32,
              remat: bool = False) -> BertForTask:
  return BertForTask(model_cfg, kind, num_labels, dtype, remat)
