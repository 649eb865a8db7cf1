"""XLNet fine-tuning heads: the pretrained encoder under `transformer/...` (the pretraining path, so pretrained
parameters load by path) plus a freshly initialised task layer. Fine-tuning uses the content stream only.

Every head is called as `head(input_ids, segment_ids, input_mask, p_mask=None, *, deterministic)` (input_mask 1 =
real token) and returns float32 logits; shapes (B batch, L length, C choices, K labels):
  classification   [B, L] inputs -> [B, K]         SequenceSummary('last': <cls> is last) -> dense (`logits`)
  regression       [B, L] inputs -> [B]            SequenceSummary -> dense to one score
  token            [B, L] inputs -> [B, L, K]      h -> dropout -> dense per token
  multiple_choice  [B, C, L] inputs -> [B, C]      SequenceSummary -> dense to one score per choice
  squad            [B, L] inputs -> [B, 2, L]      h -> dense to (start, end) logits (a simple span head, not the
                                                   original's beam-search heads); p_mask 1 -> very negative logit
"""
from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import ml_collections
from flax import linen as nn

from common import layers
from xlnet_jax import model as xlnet_model

KINDS = ('classification', 'regression', 'token', 'multiple_choice', 'squad')
NEG_INF = -1e30


class XLNetForTask(nn.Module):
  """XLNet + one task layer (`kind` one of KINDS, `num_labels` K for classification and token)."""
  config: ml_collections.ConfigDict
  kind: str
  num_labels: int = 2
  dtype: Any = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, input_ids, segment_ids, input_mask, p_mask=None, *, deterministic: bool = True):
    cfg = self.config
    if self.kind not in KINDS:
      raise ValueError(f'kind must be one of {KINDS}, got {self.kind!r}')
    shape = input_ids.shape
    if self.kind == 'multiple_choice':  # [B, C, L] -> [B * C, L]
      input_ids, segment_ids, input_mask = (x.reshape(-1, shape[-1]) for x in (input_ids, segment_ids, input_mask))
    h, _, _ = xlnet_model.XLNetModel(cfg, self.dtype, self.remat, name='transformer')(
        input_ids, segment_ids, input_mask, deterministic=deterministic)
    init = nn.initializers.normal(cfg.initializer_range)
    outputs = {'classification': self.num_labels, 'regression': 1, 'token': self.num_labels,
               'multiple_choice': 1, 'squad': 2}[self.kind]
    dense = layers.DenseGeneral((outputs,), ('embed', 'classes'), kernel_init=init, dtype=self.dtype, name='logits')
    if self.kind in ('classification', 'regression', 'multiple_choice'):
      summary = xlnet_model.SequenceSummary(cfg, 'last', cfg.dropout, dtype=self.dtype, name='sequence_summary')(
          h, input_mask, deterministic=deterministic)
      logits = dense(summary).astype(jnp.float32)
      if self.kind == 'regression':
        return logits[:, 0]
      if self.kind == 'multiple_choice':
        return logits.reshape(shape[0], shape[1])
      return logits
    if self.kind == 'token':
      return dense(nn.Dropout(cfg.dropout)(h, deterministic=deterministic)).astype(jnp.float32)
    logits = jnp.swapaxes(dense(h).astype(jnp.float32), 1, 2)  # [B, 2, L]
    if p_mask is not None:
      logits = jnp.where(p_mask[:, None, :] > 0, NEG_INF, logits)
    return logits


def make_head(model_cfg: ml_collections.ConfigDict, kind: str, num_labels: int, dtype=jnp.float32,
              remat: bool = False) -> XLNetForTask:
  return XLNetForTask(model_cfg, kind, num_labels, dtype, remat)
