"""XLNet fine-tuning heads: the pretrained encoder under `transformer/...` (the pretraining path, so pretrained
parameters load by path) plus a freshly initialised task layer. Fine-tuning uses the content stream only.

Every head is called as `head(input_ids, segment_ids, input_mask, p_mask=None, *, deterministic)` (input_mask 1 =
real token) and returns float32 logits; shapes (B batch, L length, C choices, K labels):
  classification   [B, L] inputs -> [B, K]         SequenceSummary('last': <cls> is last) -> dense (`logits`)
  regression       [B, L] inputs -> [B]            SequenceSummary -> dense to one score
  token            [B, L] inputs -> [B, L, K]      h -> dropout -> dense per token
  multiple_choice  [B, C, L] inputs -> [B, C]      SequenceSummary -> dense to one score per choice
  squad            [B, L] inputs -> [B, 2, L]      h -> dense to (start, end) logits (the simple span head,
                                                   `config.squad_head='simple'`); p_mask 1 -> very negative logit
  squad_beam       [B, L] inputs -> dict           the original `run_squad.py` heads (`xlnet_jax.squad_heads`, the
                                                   default for SQuAD): start_logits, end_logits conditioned on a
                                                   start, answer_class; also reads cls_index [B] and, for the
                                                   training outputs, start_position [B]

The beam head's parameters sit at `start_logits/dense`, `end_logits/{dense_0,layer_norm,dense_1}`,
`answer_class/{dense_0,dense_1}` (next to `transformer`); `beam_head_to_hf` writes them under the names of
`transformers.XLNetForQuestionAnswering`.
"""
from __future__ import annotations

from typing import Any, Mapping

import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import linen as nn

from common import layers, task_kinds
from xlnet_jax import model as xlnet_model
from xlnet_jax import squad_heads

KINDS = task_kinds.HEAD_KINDS + ('squad_beam',)


class XLNetForTask(nn.Module):
  """XLNet + one task layer (`kind` one of KINDS, `num_labels` K for classification and token; `start_n_top` and
  `end_n_top` the beam of 'squad_beam')."""
  config: ml_collections.ConfigDict
  kind: str
  num_labels: int = 2
  dtype: Any = jnp.float32
  remat: bool = False
  start_n_top: int = 5
  end_n_top: int = 5

  @nn.compact
  def __call__(self, input_ids, segment_ids, input_mask, p_mask=None, *, deterministic: bool = True,
               cls_index=None, start_position=None):
    cfg = self.config
    kind = task_kinds.check_head_kind(self.kind, KINDS)
    shape = input_ids.shape
    input_ids, segment_ids, input_mask = kind.flatten_inputs(input_ids, segment_ids, input_mask)
    h, _, _ = xlnet_model.XLNetModel(cfg, self.dtype, self.remat, name='transformer')(
        input_ids, segment_ids, input_mask, deterministic=deterministic)
    init = nn.initializers.normal(cfg.initializer_range)
    if kind.beam:
      return squad_heads.beam_head(h, p_mask, cls_index, start_position, start_n_top=self.start_n_top,
                                  end_n_top=self.end_n_top, kernel_init=init, layer_norm_eps=cfg.layer_norm_eps,
                                  dropout=cfg.dropout, dtype=self.dtype, deterministic=deterministic)
    dense = layers.DenseGeneral((kind.head_width(self.num_labels),), ('embed', 'classes'),
                                kernel_init=init, dtype=self.dtype, name='logits')
    if kind.pooled:  # The summary holds the dropout.
      x = xlnet_model.SequenceSummary(cfg, 'last', cfg.dropout, dtype=self.dtype, name='sequence_summary')(
          h, input_mask, deterministic=deterministic)
    elif kind.dropout:
      x = layers.Dropout(cfg.dropout)(h, deterministic=deterministic)
    else:
      x = h
    return kind.outputs(dense(x), shape, p_mask)


def make_head(model_cfg: ml_collections.ConfigDict, kind: str, num_labels: int, dtype=jnp.float32,
              remat: bool = False, start_n_top: int = 5, end_n_top: int = 5) -> XLNetForTask:
  return XLNetForTask(model_cfg, kind, num_labels, dtype, remat, start_n_top, end_n_top)


# Our beam-head parameter path -> (transformers key, transposed): DenseGeneral kernels are [in, out], torch's
# Linear weights [out, in].
BEAM_HEAD_HF_KEYS = {
    'start_logits/dense/kernel': ('start_logits.dense.weight', True),
    'start_logits/dense/bias': ('start_logits.dense.bias', False),
    'end_logits/dense_0/kernel': ('end_logits.dense_0.weight', True),
    'end_logits/dense_0/bias': ('end_logits.dense_0.bias', False),
    'end_logits/layer_norm/scale': ('end_logits.LayerNorm.weight', False),
    'end_logits/layer_norm/bias': ('end_logits.LayerNorm.bias', False),
    'end_logits/dense_1/kernel': ('end_logits.dense_1.weight', True),
    'end_logits/dense_1/bias': ('end_logits.dense_1.bias', False),
    'answer_class/dense_0/kernel': ('answer_class.dense_0.weight', True),
    'answer_class/dense_0/bias': ('answer_class.dense_0.bias', False),
    'answer_class/dense_1/kernel': ('answer_class.dense_1.weight', True),
}


def beam_head_to_hf(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """The beam head's parameters of a 'squad_beam' `XLNetForTask` (its whole `params` tree, the encoder ignored) ->
  the head keys of `transformers.XLNetForQuestionAnswering.state_dict()` (float32 numpy, torch layout); the
  encoder's keys come from `xlnet_jax.export.params_to_hf`."""
  out = {}
  for path, (key, transpose) in BEAM_HEAD_HF_KEYS.items():
    node = params
    for name in path.split('/'):
      node = node[name]
    value = np.asarray(node, np.float32)
    out[key] = value.T.copy() if transpose else value
  return out
