"""BERT's masked-LM masking, as the original `create_pretraining_data.py` does it.

Candidates are all tokens except the special ids (`[CLS]`, `[SEP]`, `[PAD]`, `[MASK]`; `[UNK]` stays a candidate
as in the original); `num_to_predict = min(max_predictions_per_seq, max(1, round(len(tokens) * masked_lm_prob)))`
with `len(tokens)` counting the special tokens; candidates (or whole words: a token plus the `##` continuation
tokens that immediately follow it; a `##` token right after a special token starts a word of its own) are taken in
random order, a word that would overshoot `num_to_predict` being skipped; each chosen token independently becomes
`[MASK]` (80 %), a random id uniform over `[0, vocab_size)` (10 %; the original also draws over the whole
vocabulary, special and unused entries included) or stays (10 %).

Pure functions of (tokens, generator, settings): the shard writer calls them for static masking, the loader's batch
function for dynamic masking (a generator seeded from `(seed, epoch, record id)`).
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np


def special_ids(info: Mapping[str, Any]) -> np.ndarray:
  """Ids that are never masked: `[PAD] [CLS] [SEP] [MASK]`. `[n] int32`."""
  return np.unique(np.asarray([info['pad_id'], info['cls_id'], info['sep_id'], info['mask_id']], dtype=np.int32))


def mask_settings(cfg: Any, info: Mapping[str, Any]) -> dict[str, Any]:
  """The keyword arguments of `mask_tokens` from a data config or `ShardSettings` (attributes `whole_word_mask`,
  `masked_lm_prob`, `max_predictions_per_seq`) and the tokenizer facts."""
  if cfg.whole_word_mask and info['is_continuation'] is None:
    raise ValueError('whole_word_mask needs a tokenizer with is_continuation')
  return dict(vocab_size=int(info['vocab_size']), special_ids=special_ids(info),
              is_continuation=info['is_continuation'] if cfg.whole_word_mask else None,
              masked_lm_prob=float(cfg.masked_lm_prob), max_predictions_per_seq=int(cfg.max_predictions_per_seq),
              whole_word_mask=bool(cfg.whole_word_mask), mask_id=int(info['mask_id']))



def mask_tokens(tokens: np.ndarray, rng: np.random.Generator, *, vocab_size: int, special_ids: Sequence[int],
                is_continuation: np.ndarray | None, masked_lm_prob: float, max_predictions_per_seq: int,
                whole_word_mask: bool, mask_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """Chooses and corrupts the masked-LM predictions of one sequence (rules in the module docstring).

  Args:
    tokens: `[n] int` the unmasked sequence, specials included.
    is_continuation: `[vocab_size] bool`, True for `##` pieces; needed only with `whole_word_mask`.
  Returns:
    input_ids `[n] int32` (corrupted copy), masked_lm_positions `[P] int32` (sorted), masked_lm_ids `[P] int32`
    (the original tokens there), masked_lm_weights `[P] float32` (1 for real predictions, 0 for padding);
    P = max_predictions_per_seq.
  """
  tokens = np.asarray(tokens, dtype=np.int32)
  n = len(tokens)
  candidate = np.ones([n], bool)
  for special in np.asarray(special_ids).ravel().tolist():  # A handful of ids: faster than np.isin.
    candidate &= tokens != special
  num_to_predict = min(max_predictions_per_seq, max(1, int(round(n * masked_lm_prob))))

  if whole_word_mask:
    if is_continuation is None:
      raise ValueError('whole_word_mask needs is_continuation')
    previous_candidate = np.concatenate([[False], candidate[:-1]])
    starts = candidate & ~(np.asarray(is_continuation)[tokens] & previous_candidate)
    word_of_token = np.cumsum(starts) - 1  # Valid at candidate positions.
    num_words = int(starts.sum())
    cand_positions = np.flatnonzero(candidate)
    word_lengths = np.bincount(word_of_token[cand_positions], minlength=num_words)
    order = rng.permutation(num_words)
    chosen = _greedy_fill(word_lengths[order], num_to_predict)
    selected_words = np.zeros([num_words], bool)
    selected_words[order[chosen]] = True
    positions = cand_positions[selected_words[word_of_token[cand_positions]]]
  else:
    cand_positions = np.flatnonzero(candidate)
    positions = np.sort(rng.permutation(cand_positions)[:num_to_predict])

  num = len(positions)
  labels = tokens[positions]
  u, v = rng.random([2, num])
  random_ids = np.minimum((v * vocab_size).astype(np.int32), vocab_size - 1)  # Uniform over [0, vocab_size).
  replacement = np.where(u < 0.8, np.int32(mask_id), np.where(u < 0.9, labels, random_ids))
  input_ids = tokens.copy()
  input_ids[positions] = replacement

  out_positions = np.zeros([max_predictions_per_seq], np.int32)
  out_ids = np.zeros([max_predictions_per_seq], np.int32)
  weights = np.zeros([max_predictions_per_seq], np.float32)
  out_positions[:num] = positions
  out_ids[:num] = labels
  weights[:num] = 1.0
  return input_ids, out_positions, out_ids, weights


def _greedy_fill(lengths: np.ndarray, budget: int) -> np.ndarray:
  """Indices of the items taken in order, skipping any that would overshoot `budget` (the original's rule)."""
  total = np.cumsum(lengths)
  k = int(np.searchsorted(total, budget, side='right'))  # The longest prefix that fits.
  taken = list(range(k))
  gap = budget - (int(total[k - 1]) if k else 0)
  position = k + 1  # Item k overshoots (if it exists); later ones may still fit.
  while gap > 0 and position < len(lengths):
    fits = np.flatnonzero(lengths[position:] <= gap)
    if not len(fits):
      break
    position += int(fits[0])
    taken.append(position)
    gap -= int(lengths[position])
    position += 1
  return np.asarray(taken, dtype=np.int64)
