"""GPT-1 fine-tuning (Radford et al. 2018, section 3.3): input transformations, task heads, the auxiliary LM loss.

Every task input becomes one or more token sequences `<start> ... <extract>` and the task layer reads the final
hidden state at `<extract>` (the last real token):

  classification   <start> text <extract>, or <start> a <delim> b <extract> for a pair        1 sequence
  similarity       <start> a <delim> b <extract> and <start> b <delim> a <extract>,            2 sequences
                   their states summed before the output layer (no inherent order)
  multiple_choice  <start> context <delim> choice_i <extract>, one sequence per choice,       C sequences
                   one score each, softmax over the choices

The three tokens are appended to the pretrained vocabulary (`add_task_tokens`: ids `V, V + 1, V + 2`, fresh rows of
the tied token embedding). Total loss = task loss + `lm_weight` (λ, 0.5 in the paper; 0 switches it off) x the LM
loss over the real tokens of the input sequences (`lm_sums`).

Shapes: B batch, S sequences per example (1, 2 or C), L length, H hidden, K outputs of the task layer.
"""
from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import linen as nn

from common import layers
from gpt_jax import model as gpt_model
from gpt_jax.objective import lm_sums

KINDS = ('classification', 'similarity', 'multiple_choice')
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
  """The token sequences of one example: `segments` is [text] or [a, b] (classification), [a, b] (similarity),
  [context, choice_0, ..., choice_C-1] (multiple_choice)."""
  if kind == 'classification':
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
  count = len(sequences[0])
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
  """GPT + a linear task layer on the `<extract>` states. `__call__(input_ids [B, S, L], extract_index [B, S])`
  returns (task logits: `[B, K]` for classification and similarity, `[B, S]` for multiple_choice; LM logits
  `[B, S, L, V]`), both float32. The pretrained network sits under `gpt/...` as in pretraining."""
  config: ml_collections.ConfigDict
  kind: str
  num_labels: int = 2
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, input_ids, extract_index, *, deterministic: bool = True):
    cfg = self.config
    b, s, length = input_ids.shape
    hidden, _, tokens = gpt_model.GPTModel(cfg, self.dtype, name='gpt')(input_ids.reshape(b * s, length),
                                                                      deterministic=deterministic)
    lm_logits = tokens.attend(hidden).astype(jnp.float32).reshape(b, s, length, -1)
    index = extract_index.reshape(b * s, 1, 1).astype(jnp.int32)
    extracted = jnp.take_along_axis(hidden, index, axis=1).reshape(b, s, -1)  # [B, S, H]
    if self.kind == 'similarity':
      extracted = extracted.sum(axis=1, keepdims=True)
    extracted = nn.Dropout(cfg.hidden_dropout_prob)(extracted, deterministic=deterministic)
    width = 1 if self.kind == 'multiple_choice' else self.num_labels
    logits = layers.DenseGeneral((width,), ('embed', 'classes'),
                                 kernel_init=nn.initializers.normal(cfg.initializer_range), dtype=self.dtype,
                                 name='classifier')(extracted).astype(jnp.float32)
    return (logits[..., 0] if self.kind == 'multiple_choice' else logits[:, 0]), lm_logits


def auxiliary_lm_sums(lm_logits: jax.Array, batch: dict) -> dict:
  """`lm_sums` of the input sequences predicting their own next tokens (real positions only); the normaliser of
  the LM term is `batch['input_mask'][..., 1:].sum()`."""
  ids, mask = batch['input_ids'], batch['input_mask']
  targets = {'target_ids': ids[..., 1:], 'target_weights': (mask[..., 1:] > 0).astype(jnp.float32)}
  return lm_sums(lm_logits[..., :-1, :], targets)
