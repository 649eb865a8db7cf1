"""GPT-1 fine-tuning (Radford et al. 2018, section 3.3): input transformations, task heads, the auxiliary LM loss.

Every task input becomes one or more token sequences `<start> ... <extract>` and the task layer reads the final
hidden state at `<extract>` (the last real token):

  classification   <start> text <extract>, or <start> a <delim> b <extract> for a pair        1 sequence
  similarity       <start> a <delim> b <extract> and <start> b <delim> a <extract>,            2 sequences
                   their states summed before the output layer (no inherent order)
  multiple_choice  <start> context <delim> choice_i <extract>, one sequence per choice,       C sequences
                   one score each, softmax over the choices

The three tokens are appended to the pretrained vocabulary (`add_task_tokens`: ids `V, V + 1, V + 2`, fresh rows of
the tied token embedding). Total loss = task loss + `lm_coef` (λ, 0.5 in the paper; 0 switches it off) x the LM
loss over the real tokens of the input sequences (`auxiliary_lm_sums`; the fine-tuning runner adds it through
`GPTForTask.auxiliary_loss`).

Shapes: B batch, S sequences per example (1, 2 or C), L length, H hidden, K outputs of the task layer.
"""
from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import linen as nn

from common import layers, model_adapter
from gpt_jax import model as gpt_model
from gpt_jax.objective import lm_sums

KINDS = ('classification', 'similarity', 'regression', 'multiple_choice')
TASK_TOKENS = ('<|start|>', '<|delimiter|>', '<|extract|>')


def task_token_ids(pretrained_vocab_size: int) -> dict[str, int]:
  """{'start', 'delimiter', 'extract'} -> their ids, appended after the pretrained vocabulary."""
  return {name: pretrained_vocab_size + i for i, name in enumerate(('start', 'delimiter', 'extract'))}


def add_task_tokens(cfg: ml_collections.ConfigDict, params: dict, rng: jax.Array) -> tuple[Any, dict]:
  """(config, params) with the token embedding grown by the three task tokens (rows drawn from
  normal(0, initializer_range)); everything else unchanged."""
  cfg = ml_collections.ConfigDict(cfg.to_dict())
  table = np.asarray(params['gpt']['token_embeddings']['embedding'])
  rows = cfg.initializer_range * np.asarray(jax.random.normal(rng, (len(TASK_TOKENS), table.shape[1])))
  gpt = dict(params['gpt'], token_embeddings={'embedding': np.concatenate([table, rows.astype(table.dtype)])})
  cfg.vocab_size = table.shape[0] + len(TASK_TOKENS)
  return cfg, dict(params, gpt=gpt)


def transform(segments: Sequence[Sequence[int]], ids: dict[str, int], max_length: int) -> list[int]:
  """`<start> s_0 <delim> s_1 ... <extract>`, the longest segment shortened (from its end) until it fits."""
  segments = [list(s) for s in segments]
  budget = max_length - len(segments) - 1  # start, delimiters, extract
  if budget < len(segments):
    raise ValueError(f'max_length={max_length} cannot hold {len(segments)} segments')
  while sum(map(len, segments)) > budget:
    longest = max(range(len(segments)), key=lambda i: len(segments[i]))
    segments[longest].pop()
  tokens = [ids['start']]
  for i, segment in enumerate(segments):
    tokens += ([ids['delimiter']] if i else []) + segment
  return tokens + [ids['extract']]


def example_sequences(kind: str, segments: Sequence[Sequence[int]], ids: dict[str, int],
                      max_length: int) -> list[list[int]]:
  """The token sequences of one example: `segments` is [text] or [a, b] (classification, regression), [a, b]
  (similarity),
  [context, choice_0, ..., choice_C-1] (multiple_choice)."""
  if kind in ('classification', 'regression'):
    return [transform(segments, ids, max_length)]
  if kind == 'similarity':
    a, b = segments
    return [transform([a, b], ids, max_length), transform([b, a], ids, max_length)]
  if kind == 'multiple_choice':
    context, *choices = segments
    return [transform([context, choice], ids, max_length) for choice in choices]
  raise ValueError(f'kind must be one of {KINDS}, got {kind!r}')


def batch_of_examples(kind: str, examples: Sequence[Sequence[Sequence[int]]], ids: dict[str, int],
                      max_length: int) -> dict[str, np.ndarray]:
  """`input_ids [B, S, L] int32` (0 past the end), `input_mask [B, S, L] int32`, `extract_index [B, S] int32`."""
  sequences = [example_sequences(kind, segments, ids, max_length) for segments in examples]
  count = len(sequences[0]) if sequences else 1
  batch = {'input_ids': np.zeros([len(examples), count, max_length], np.int32),
           'input_mask': np.zeros([len(examples), count, max_length], np.int32),
           'extract_index': np.zeros([len(examples), count], np.int32)}
  for b, rows in enumerate(sequences):
    if len(rows) != count:
      raise ValueError(f'example {b} has {len(rows)} sequences, example 0 has {count}')
    for s, row in enumerate(rows):
      batch['input_ids'][b, s, :len(row)] = row
      batch['input_mask'][b, s, :len(row)] = 1
      batch['extract_index'][b, s] = len(row) - 1
  return batch


class GPTForTask(nn.Module):
  """GPT + a linear task layer on the `<extract>` states, called as the shared fine-tuning runner calls a head:
  `(input_ids [B, S, L], segment_ids, input_mask [B, S, L], p_mask=None, *, deterministic, auxiliary=False)`, the
  rows padded on the right (input_mask 1 = real token; segment_ids and p_mask are not read). The state of each
  sequence's last real token (`<extract>`) feeds the task layer:

    classification   [B, K]   the S sequences' states summed (S = 1: one sequence; 2: similarity, both orders)
    similarity       [B, K]   the same (the paper's name for the two-order input)
    regression       [B]      the same, one score
    multiple_choice  [B, S]   one score per sequence (choice)

  float32. With `auxiliary` (training with λ = `lm_coef` > 0, see `auxiliary_loss`) also the LM loss of the input
  sequences summed over their real next tokens: `(task logits, lm loss sum)`. The pretrained network sits under
  `gpt/...` as in pretraining."""
  config: ml_collections.ConfigDict
  kind: str
  num_labels: int = 2
  dtype: Any = jnp.float32
  remat: bool = False
  lm_coef: float = 0.0

  @property
  def auxiliary_loss(self) -> model_adapter.AuxiliaryLoss | None:
    """The auxiliary LM term the fine-tuning objective adds (None when `lm_coef` is 0)."""
    if self.lm_coef <= 0:
      return None
    return model_adapter.AuxiliaryLoss(weight=float(self.lm_coef), normalizer=lm_normalizer)

  @nn.compact
  def __call__(self, input_ids, segment_ids=None, input_mask=None, p_mask=None, *, deterministic: bool = True,
               auxiliary: bool = False):
    del segment_ids, p_mask
    if self.kind not in KINDS:
      raise ValueError(f'GPT fine-tuning offers the kinds {KINDS}, got {self.kind!r}')
    cfg = self.config
    b, s, length = input_ids.shape
    input_mask = jnp.ones_like(input_ids) if input_mask is None else input_mask
    hidden, _, tokens = gpt_model.GPTModel(cfg, self.dtype, self.remat, name='gpt')(
        input_ids.reshape(b * s, length), deterministic=deterministic)
    extract_index = jnp.maximum(jnp.sum(input_mask > 0, axis=-1) - 1, 0).reshape(b * s, 1, 1)
    extracted = jnp.take_along_axis(hidden, extract_index, axis=1).reshape(b, s, -1)  # [B, S, H]
    if self.kind != 'multiple_choice':
      extracted = extracted.sum(axis=1)
    extracted = layers.Dropout(cfg.hidden_dropout_prob)(extracted, deterministic=deterministic)
    width = self.num_labels if self.kind in ('classification', 'similarity') else 1
    logits = layers.DenseGeneral((width,), ('embed', 'classes'),
                                 kernel_init=nn.initializers.normal(cfg.initializer_range), dtype=self.dtype,
                                 name='classifier')(extracted).astype(jnp.float32)
    logits = logits if width > 1 else logits[..., 0]
    if not auxiliary:
      return logits
    lm_logits = tokens.attend(hidden).astype(jnp.float32).reshape(b, s, length, -1)
    lm = auxiliary_lm_sums(lm_logits, {'input_ids': input_ids, 'input_mask': input_mask})
    return logits, lm['lm_loss']


def make_head(model_cfg: ml_collections.ConfigDict, kind: str, num_labels: int, dtype=jnp.float32,
              remat: bool = False, *, lm_coef: float = 0.0) -> GPTForTask:
  """The runner's head of `kind` (`common.model_adapter.ModelAdapter.make_head`) with the auxiliary LM weight."""
  return GPTForTask(model_cfg, kind, num_labels, dtype, remat, float(lm_coef))


def lm_normalizer(batch) -> jax.Array:
  """The count the auxiliary LM sum is divided by: the real next tokens of the global batch's sequences."""
  return jnp.sum((batch['input_mask'][..., 1:] > 0).astype(jnp.float32))


def auxiliary_lm_sums(lm_logits: jax.Array, batch: dict) -> dict:
  """`lm_sums` of the input sequences predicting their own next tokens (real positions only); the normaliser of
  the LM term is `batch['input_mask'][..., 1:].sum()`."""
  ids, mask = batch['input_ids'], batch['input_mask']
  targets = {'target_ids': ids[..., 1:], 'target_weights': (mask[..., 1:] > 0).astype(jnp.float32)}
  return lm_sums(lm_logits[..., :-1, :], targets)
