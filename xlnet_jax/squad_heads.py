"""The beam-search span heads of XLNet's `run_squad.py` (`transformers`' `XLNetForQuestionAnswering`) on the
encoder's last hidden states `h [B, L, D]`; `xlnet_jax.heads` puts them on XLNet (task kind 'squad_beam', whose
loss and post-processing are model-agnostic: `common.task_kinds.SquadBeam`, `common.squad_predictions`).

Heads (parameter names as the original's variable scopes, `transformers`' module names in brackets):
  start_logits  [start_logits]  dense(h) -> [B, L]; positions with p_mask 1 get NEG_INF
  end_logits    [end_logits]    dense_0([h, h_start]) -> tanh -> layer_norm [LayerNorm] -> dense_1 -> [.., L],
                                masked as the start; h_start is the hidden state of one start position
  answer_class  [answer_class]  dense_0([h_start_feature, h_cls]) -> tanh -> dropout -> dense_1 (no bias) -> [B]:
                                the answerability logit (> 0: unanswerable)

Training (`start_position` given): h_start is the gold start's hidden state for both the end logits and the
answer class (as `transformers`; the original TF code weights h by the start probabilities for the answer class
in training too). Outputs {start_logits [B, L], end_logits [B, L], cls_logits [B]}; the loss per row
  (CE(start_logits, start_position) + CE(end_logits, end_position)) / 2 + 0.5 * BCE(cls_logits, is_impossible)
is the original's total loss (a mean over rows once divided by the row count).

Inference (no `start_position`): the `start_n_top` most likely starts, for each the `end_n_top` most likely ends
given that start, and the answer class on h weighted by softmax(start_logits). Outputs
  start_top_log_probs, start_top_index  [B, start_n_top]             log-softmax over L, best first
  end_top_log_probs, end_top_index      [B, start_n_top * end_n_top]  flat index i * end_n_top + j: the j-th best end
                                                                      for the i-th start (the original's layout;
                                                                      `transformers` flattens end-major instead)
  cls_logits                            [B]
`transformers` names its outputs log-probs but returns softmax probabilities; these are log-probabilities, as the
original.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from common import layers, task_kinds

NEG_INF = task_kinds.NEG_INF
TRAIN_OUTPUTS = ('start_logits', 'end_logits', 'cls_logits')
INFERENCE_OUTPUTS = ('start_top_log_probs', 'start_top_index', 'end_top_log_probs', 'end_top_index', 'cls_logits')


def _masked(logits: jax.Array, p_mask: jax.Array | None) -> jax.Array:
  return logits if p_mask is None else jnp.where(p_mask > 0, NEG_INF, logits)


def _gather(hidden: jax.Array, index: jax.Array) -> jax.Array:
  """hidden `[B, L, D]`, index `[B]` or `[B, K]` -> `[B, D]` or `[B, K, D]`."""
  squeeze = index.ndim == 1
  index = index[:, None] if squeeze else index
  out = jnp.take_along_axis(hidden, index[..., None].astype(jnp.int32), axis=1)
  return out[:, 0] if squeeze else out


class StartLogits(nn.Module):
  """`[..., L, D] -> [..., L]` float32 start logits (p_mask 1 -> NEG_INF)."""
  kernel_init: layers.Initializer = nn.initializers.normal(0.02)
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, hidden, p_mask=None):
    logits = layers.DenseGeneral((1,), ('embed', 'classes'), kernel_init=self.kernel_init, dtype=self.dtype,
                                 name='dense')(hidden)
    return _masked(logits[..., 0].astype(jnp.float32), p_mask)


class EndLogits(nn.Module):
  """hidden `[..., L, D]` and the start's states, broadcast against each other -> `[..., L]` float32 end logits."""
  kernel_init: layers.Initializer = nn.initializers.normal(0.02)
  layer_norm_eps: float = 1e-12
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, hidden, start_states, p_mask=None):
    d_model = hidden.shape[-1]
    shape = jnp.broadcast_shapes(hidden.shape, start_states.shape)
    x = jnp.concatenate([jnp.broadcast_to(hidden, shape), jnp.broadcast_to(start_states, shape).astype(hidden.dtype)],
                        axis=-1)
    x = layers.DenseGeneral((d_model,), (None, 'embed'), kernel_init=self.kernel_init, dtype=self.dtype,
                            name='dense_0')(x)
    x = layers.LayerNorm(self.layer_norm_eps, self.dtype, name='layer_norm')(jnp.tanh(x))
    logits = layers.DenseGeneral((1,), ('embed', 'classes'), kernel_init=self.kernel_init, dtype=self.dtype,
                                 name='dense_1')(x)
    return _masked(logits[..., 0].astype(jnp.float32), p_mask)


class AnswerClass(nn.Module):
  """(start feature `[B, D]`, `<cls>` state `[B, D]`) -> `[B]` float32 answerability logit."""
  kernel_init: layers.Initializer = nn.initializers.normal(0.02)
  dropout: float = 0.1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, start_states, cls_states, *, deterministic: bool = True):
    d_model = cls_states.shape[-1]
    x = jnp.concatenate([start_states.astype(cls_states.dtype), cls_states], axis=-1)
    x = jnp.tanh(layers.DenseGeneral((d_model,), (None, 'embed'), kernel_init=self.kernel_init, dtype=self.dtype,
                                     name='dense_0')(x))
    x = layers.Dropout(self.dropout)(x, deterministic=deterministic)
    logits = layers.DenseGeneral((1,), ('embed', 'classes'), use_bias=False, kernel_init=self.kernel_init,
                                 dtype=self.dtype, name='dense_1')(x)
    return logits[..., 0].astype(jnp.float32)


def beam_head(hidden: jax.Array, p_mask: jax.Array | None, cls_index: jax.Array | None,
              start_position: jax.Array | None = None, *, start_n_top: int = 5, end_n_top: int = 5,
              kernel_init: layers.Initializer = nn.initializers.normal(0.02), layer_norm_eps: float = 1e-12,
              dropout: float = 0.1, dtype: Any = jnp.float32, deterministic: bool = True) -> dict[str, jax.Array]:
  """The three heads on `hidden [B, L, D]`; call inside a compact method (they become its `start_logits`,
  `end_logits` and `answer_class` submodules). cls_index None: `<cls>` is the last position. With
  `start_position [B]`: the training outputs, else the beam-search outputs (see the module docstring)."""
  start = StartLogits(kernel_init, dtype, name='start_logits')
  end = EndLogits(kernel_init, layer_norm_eps, dtype, name='end_logits')
  answer = AnswerClass(kernel_init, dropout, dtype, name='answer_class')
  length = hidden.shape[1]
  cls_states = hidden[:, -1] if cls_index is None else _gather(hidden, cls_index)
  start_logits = start(hidden, p_mask)
  if start_position is not None:
    start_states = _gather(hidden, start_position)
    end_logits = end(hidden, start_states[:, None], p_mask)
    cls_logits = answer(start_states, cls_states, deterministic=deterministic)
    return dict(start_logits=start_logits, end_logits=end_logits, cls_logits=cls_logits)
  if not 0 < start_n_top <= length or not 0 < end_n_top <= length:
    raise ValueError(f'start_n_top={start_n_top} and end_n_top={end_n_top} must lie in [1, {length}]')
  start_log_probs = jax.nn.log_softmax(start_logits, axis=-1)
  start_top_log_probs, start_top_index = jax.lax.top_k(start_log_probs, start_n_top)
  start_states = _gather(hidden, start_top_index)  # [B, k, D]
  end_logits = end(hidden[:, None], start_states[:, :, None], None if p_mask is None else p_mask[:, None])  # [B, k, L]
  end_top_log_probs, end_top_index = jax.lax.top_k(jax.nn.log_softmax(end_logits, axis=-1), end_n_top)
  batch = hidden.shape[0]
  weighted = jnp.einsum('bld,bl->bd', hidden.astype(jnp.float32), jax.nn.softmax(start_logits, axis=-1))
  cls_logits = answer(weighted, cls_states, deterministic=deterministic)
  return dict(start_top_log_probs=start_top_log_probs, start_top_index=start_top_index.astype(jnp.int32),
              end_top_log_probs=end_top_log_probs.reshape(batch, -1),
              end_top_index=end_top_index.reshape(batch, -1).astype(jnp.int32), cls_logits=cls_logits)
