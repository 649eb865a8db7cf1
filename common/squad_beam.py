"""SQuAD with the beam-search span heads of XLNet's `run_squad.py` (`transformers`' `XLNetForQuestionAnswering`):
the modules, their training loss and the n-best post-processing. Model-agnostic: the heads read the encoder's last
hidden states `h [B, L, D]`; `xlnet_jax.heads` puts them on XLNet (task kind 'squad_beam').

Heads (parameter names as the original's variable scopes, `transformers`' module names in brackets):
  start_logits  [start_logits]  dense(h) -> [B, L]; positions with p_mask 1 get NEG_INF
  end_logits    [end_logits]    dense_0([h, h_start]) -> tanh -> layer_norm [LayerNorm] -> dense_1 -> [.., L],
                                masked as the start; h_start is the hidden state of one start position
  answer_class  [answer_class]  dense_0([h_start_feature, h_cls]) -> tanh -> dropout -> dense_1 (no bias) -> [B]:
                                the answerability logit (> 0: unanswerable)

Training (`start_position` given): h_start is the gold start's hidden state for both the end logits and the
answer class (as `transformers`; the original TF code weights h by the start probabilities for the answer class
in training too). Outputs {start_logits [B, L], end_logits [B, L], cls_logits [B]}; loss per row (`loss_sums`)
  (CE(start_logits, start_position) + CE(end_logits, end_position)) / 2 + 0.5 * BCE(cls_logits, is_impossible),
the original's total loss (a mean over rows once divided by the row count).

Inference (no `start_position`): the `start_n_top` most likely starts, for each the `end_n_top` most likely ends
given that start, and the answer class on h weighted by softmax(start_logits). Outputs
  start_top_log_probs, start_top_index  [B, start_n_top]             log-softmax over L, best first
  end_top_log_probs, end_top_index      [B, start_n_top * end_n_top]  flat index i * end_n_top + j: the j-th best end
                                                                      for the i-th start (the original's layout;
                                                                      `transformers` flattens end-major instead)
  cls_logits                            [B]
`transformers` names its outputs log-probs but returns softmax probabilities; these are log-probabilities, as the
original.

Post-processing (`beam_predictions`, the original `write_predictions`): per example, over the windows of its
question, every (start i, end j) pair of the beam whose start and end lie in the window's context, the start at its
max context, end >= start, at most `max_answer_length` tokens; ranked by start_log_prob + end_log_prob, mapped to
context characters, deduplicated by text, the first `n_best_size` kept. The answer is always the best span (never
empty); the null odds are the lowest cls_logits over the windows, left to the metric's threshold search (`v2`).
(The original also drops spans that start or end on a window's last context token, `>= paragraph_len - 1`; here
every context token can be part of an answer.)
"""
from __future__ import annotations

import collections
import math
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn

from common import layers

NEG_INF = -1e30
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
    x = nn.Dropout(self.dropout)(x, deterministic=deterministic)
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


def loss_sums(outputs: Mapping[str, jax.Array], batch: Mapping[str, jax.Array]) -> dict:
  """{'loss': the per-row loss summed over the batch, 'cls_loss': its answerability part} from training outputs
  and start_position, end_position, is_impossible `[B]`."""
  start = optax.softmax_cross_entropy_with_integer_labels(outputs['start_logits'], batch['start_position'])
  end = optax.softmax_cross_entropy_with_integer_labels(outputs['end_logits'], batch['end_position'])
  cls = optax.sigmoid_binary_cross_entropy(outputs['cls_logits'], batch['is_impossible'].astype(jnp.float32))
  return dict(loss=jnp.sum((start + end) / 2.0 + 0.5 * cls), cls_loss=jnp.sum(cls))


# ----------------------------------------------------------------------------------------------------------------
# Post-processing.
# ----------------------------------------------------------------------------------------------------------------

def softmax(scores: Sequence[float]) -> list[float]:
  """Probabilities of `scores` (the original `_compute_softmax`); [] for no scores."""
  if not scores:
    return []
  top = max(scores)
  exps = [math.exp(s - top) for s in scores]
  total = sum(exps)
  return [e / total for e in exps]


def window_span_ok(window: Mapping[str, Any], start: int, end: int, max_answer_length: int) -> bool:
  """(start, end) row positions form a valid answer of `window`: both in its context, start at its max context,
  start <= end, at most `max_answer_length` tokens."""
  offset, length = window['doc_offset'], window['paragraph_len']
  if not (offset <= start < offset + length and offset <= end < offset + length) or end < start:
    return False
  return end - start + 1 <= max_answer_length and window['token_is_max_context'].get(int(start), True)


def span_text(example, window: Mapping[str, Any], start: int, end: int) -> str:
  """The context characters of row positions start..end of `window` (stripped)."""
  offset = window['doc_offset']
  first = window['tok_start_to_orig'][start - offset]
  last = window['tok_end_to_orig'][end - offset]
  return example.context[first:last + 1].strip()


def rows_by_example(windows: Sequence[Mapping[str, Any]]) -> dict[int, list[int]]:
  """{example index: the rows of its windows}, in row order."""
  rows = collections.defaultdict(list)
  for row, window in enumerate(windows):
    rows[window['example_index']].append(row)
  return rows


def nbest_spans(example, windows: Sequence[Mapping[str, Any]], candidates: Sequence[tuple], n_best_size: int
                ) -> list[tuple[str, float, float]]:
  """(text, score part a, score part b) of the best `candidates` `(score, a, b, row, start, end)`: ranked by score
  (stable: ties keep their order), each text once (the first), at most `n_best_size`."""
  seen, entries = set(), []
  for _, a, b, row, start, end in sorted(candidates, key=lambda c: c[0], reverse=True):
    if len(entries) >= n_best_size:
      break
    text = span_text(example, windows[row], start, end)
    if text not in seen:
      seen.add(text)
      entries.append((text, a, b))
  return entries


def beam_predictions(examples: Sequence, windows: Sequence[dict], outputs: Mapping[str, np.ndarray], *,
                     max_answer_length: int = 30, n_best_size: int = 20) -> tuple[dict, dict, dict]:
  """({qas_id: answer}, {qas_id: n-best list}, {qas_id: null odds}) from the beam outputs of every window row.

  An n-best entry is {text, probability (softmax of the kept entries' summed log-probs), start_log_prob,
  end_log_prob}; an example without a valid span gets the single entry {'text': '', ...} with log-probs -1e6, as
  the original. The windows are the converter's (`doc_offset`, `paragraph_len`, `token_is_max_context`,
  `tok_start_to_orig`, `tok_end_to_orig`, `example_index`).
  """
  start_lp = np.asarray(outputs['start_top_log_probs'])
  start_ix = np.asarray(outputs['start_top_index'])
  end_lp = np.asarray(outputs['end_top_log_probs'])
  end_ix = np.asarray(outputs['end_top_index'])
  cls_logits = np.asarray(outputs['cls_logits'])
  start_n_top = start_ix.shape[1]
  end_n_top = end_ix.shape[1] // start_n_top
  answers, nbest, null_odds = {}, {}, {}
  for example_index, rows in rows_by_example(windows).items():
    example = examples[example_index]
    candidates = []  # (score, start_log_prob, end_log_prob, row, start, end) in row, beam order
    for row in rows:
      window = windows[row]
      for i in range(start_n_top):
        s = int(start_ix[row, i])
        for j in range(end_n_top):
          e = int(end_ix[row, i * end_n_top + j])
          if window_span_ok(window, s, e, max_answer_length):
            a, b = float(start_lp[row, i]), float(end_lp[row, i * end_n_top + j])
            candidates.append((a + b, a, b, row, s, e))
    entries = [dict(text=text, start_log_prob=a, end_log_prob=b)
               for text, a, b in nbest_spans(example, windows, candidates, n_best_size)]
    if not entries:
      entries.append(dict(text='', start_log_prob=-1e6, end_log_prob=-1e6))
    probs = softmax([e['start_log_prob'] + e['end_log_prob'] for e in entries])
    nbest[example.qas_id] = [dict(text=e['text'], probability=p, start_log_prob=e['start_log_prob'],
                                  end_log_prob=e['end_log_prob']) for e, p in zip(entries, probs)]
    answers[example.qas_id] = entries[0]['text']
    null_odds[example.qas_id] = float(min(cls_logits[row] for row in rows))
  return answers, nbest, null_odds
