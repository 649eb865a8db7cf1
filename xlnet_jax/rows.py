"""XLNet rows from a token stream: pure functions of (stream, boundaries, settings, generator).

Rows (the original `create_tfrecords` / `_split_a_and_b`; L = seq_len, R = reuse_len, T = stream length): row `k`
starts at stream offset `i = k * R` and exists while `i + L <= T`.
  * reuse part: the stream tokens `[i, i + R)`. The next row's reuse part is `[i + R, i + 2R)`: consecutive rows of
    a stream are consecutive text, which is what XLNet's memory needs.
  * A starts at `begin = i + R`. With `tot = L - R - 3`, the cut points are the sentence starts in
    `(begin, begin + tot)` and `end` is the first sentence start at or after `begin + tot` (T if none).
  * With probability 1/2, or always when there is no cut point, B is random: A ends at a random cut point (at `end`
    when there is none), B has `max(1, tot - len(A))` tokens starting at a uniform position of the stream (drawn
    outside the row's own window `[i, i + L)` when the stream is long enough; the original draws anywhere), then
    extended back to the start of its sentence and forward to the end of its last sentence. Otherwise A ends at a
    random cut point and B is the rest up to `end` (the true continuation).
  * The pair is cut to exactly `tot` tokens by removing tokens from the right end of the longer segment (B on ties),
    so every row is full: `R + len(A) + 1 + len(B) + 2 = L`.
  * segment ids: 0 for the reuse part, A and the first `<sep>`; 1 for B and the second `<sep>`; 2 for `<cls>`.
  * `next_sentence_labels`: 1 when B is random, 0 when it continues A (BERT's convention in this project; the
    original's `label` is the opposite). Stored, unused by the loss.

Span masking (`sample_span_mask`), over WHOLE WORDS (the original counts sentencepiece pieces): the reuse part and the
rest are masked separately, as in the original, with goals `num_predict - num_predict * (L - R) // L` and
`num_predict * (L - R) // L` tokens (43 + 42 for the defaults, the original's split). A word starts at a piece for
which `tokenizer.is_word_start` holds unless it follows a bare '▁' piece, at the first token of a part or segment,
at and after every `<sep>`, `<cls>` and `<eod>`; a word containing `<sep>`, `<cls>` or `<eod>` is never a target.
In each part, over its words:
  1. `cur = 0`. Until the goal is reached or the words run out: draw `n` in `1..max_ngram` with `p(n) ∝ 1/n`, cap it
     at the tokens still missing, draw a context of `ctx = n * mask_alpha // mask_beta` words split into a left
     part `l` uniform in `[0, ctx)` and a right part `ctx - l`; the span starts at the first eligible word at or
     after `cur + l` and takes up to `n` consecutive eligible words, as many as fit in the goal (a first word that
     does not fit is skipped); then `cur = span end + (ctx - l)`.
  2. Fill up (the original adds random single tokens): eligible words not yet masked, in random order, are added
     while they fit in the goal.
So about `mask_beta` of every `mask_alpha + mask_beta` words is predicted, no word is ever split, and a row has at
most `num_predict` targets (exactly that many unless too few eligible words fit). Masks are static: written with
the rows, drawn from `(seed, shard, direction)`.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np


# ----------------------------------------------------------------------------------------------------------------------
# Streams.
# ----------------------------------------------------------------------------------------------------------------------

def build_stream(documents: Sequence[tuple[np.ndarray, np.ndarray]], eod_id: int) -> tuple[np.ndarray, np.ndarray]:
  """Concatenates documents into one stream with `<eod>` after each.

  Args:
    documents: `(tokens [t], sentence_lengths [s])` per document (no empty sentence).
  Returns:
    tokens `[T] int32`, sentence_start `[T] bool` (True at the first token of every sentence; `<eod>` belongs to the
    last sentence of its document).
  """
  pieces, starts = [], []
  for tokens, lengths in documents:
    flags = np.zeros([len(tokens) + 1], bool)
    flags[np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)] = True
    pieces.append(np.asarray(tokens, np.int32))
    pieces.append(np.asarray([eod_id], np.int32))
    starts.append(flags)
  if not pieces:
    return np.zeros([0], np.int32), np.zeros([0], bool)
  return np.concatenate(pieces), np.concatenate(starts)


def reverse_boundaries(starts: np.ndarray) -> np.ndarray:
  """Boundary flags of a reversed sequence: `starts[t]` (a unit begins at t, i.e. a boundary before t) becomes a
  boundary before position `T - t` of the reversed sequence. `[T] bool -> [T] bool`, position 0 always True."""
  if len(starts) == 0:
    return starts.copy()
  return np.concatenate([[True], starts[::-1][:-1]])


def word_starts(tokens: np.ndarray, info: Mapping[str, Any]) -> np.ndarray:
  """`[T] bool` word boundaries of a natural-order stream: `is_word_start`, except right after a bare '▁' piece
  (it belongs to the word it precedes), and always at and after `<sep>`, `<cls>`, `<eod>`."""
  tokens = np.asarray(tokens)
  special = _is_special(tokens, info) | (tokens == info['eod_id'])
  starts = info['is_word_start'][tokens].copy()
  starts[1:] &= tokens[:-1] != info['space_id']
  starts |= special
  starts[1:] |= special[:-1]
  if len(starts):
    starts[0] = True
  return starts


def _is_special(tokens: np.ndarray, info: Mapping[str, Any]) -> np.ndarray:
  return (tokens == info['sep_id']) | (tokens == info['cls_id'])


def num_rows(stream_length: int, seq_len: int, reuse_len: int) -> int:
  """Rows cut from a stream of `stream_length` tokens: offsets `0, R, 2R, ...` with `offset + L <= T`."""
  return 0 if stream_length < seq_len else (stream_length - seq_len) // reuse_len + 1


def truncate_pair(len_a: int, len_b: int, total: int) -> tuple[int, int]:
  """Lengths after removing one token at a time from the longer segment (B on ties) until `len_a + len_b <= total`."""
  excess = len_a + len_b - total
  if excess <= 0:
    return len_a, len_b
  gap = min(excess, abs(len_a - len_b))
  if len_a > len_b:
    len_a -= gap
  else:
    len_b -= gap
  excess -= gap
  return len_a - excess // 2, len_b - (excess + 1) // 2


def split_a_b(sentence_starts: np.ndarray, stream_length: int, offset: int, *, seq_len: int, reuse_len: int,
              rng: np.random.Generator) -> dict[str, int]:
  """Chooses A and B of the row at stream `offset` (rules in the module docstring).

  Args:
    sentence_starts: sorted `[S] int` positions where a sentence starts.
  Returns:
    `{a_begin, a_len, b_begin, b_len, random_b}` with `a_len + b_len == seq_len - reuse_len - 3`, both >= 1.
  """
  total = seq_len - reuse_len - 3
  begin = offset + reuse_len
  lo = int(np.searchsorted(sentence_starts, begin, side='right'))
  hi = int(np.searchsorted(sentence_starts, begin + total, side='left'))
  cuts = sentence_starts[lo:hi]
  end = int(sentence_starts[hi]) if hi < len(sentence_starts) else stream_length
  if len(cuts) == 0 or rng.random() < 0.5:
    random_b = 1
    a_end = int(cuts[rng.integers(len(cuts))]) if len(cuts) else end
    b_len = max(1, total - (a_end - begin))
    last = stream_length - 1 - b_len  # Starts in [0, last], as the original.
    ex_lo, ex_hi = max(0, offset - b_len + 1), min(last, offset + seq_len - 1)
    excluded = max(0, ex_hi - ex_lo + 1)
    if last + 1 - excluded > 0:
      b_begin = int(rng.integers(last + 1 - excluded))
      b_begin += excluded if b_begin >= ex_lo else 0
    else:
      b_begin = int(rng.integers(last + 1))
    b_end = b_begin + b_len
    k = int(np.searchsorted(sentence_starts, b_begin, side='right')) - 1
    b_begin = int(sentence_starts[k]) if k >= 0 else 0
    k = int(np.searchsorted(sentence_starts, b_end, side='left'))
    if b_end < stream_length - 1:
      b_end = min(int(sentence_starts[k]) if k < len(sentence_starts) else stream_length, stream_length - 1)
  else:
    random_b = 0
    a_end = int(cuts[rng.integers(len(cuts))])
    b_begin, b_end = a_end, end
  a_len, b_len = truncate_pair(a_end - begin, b_end - b_begin, total)
  return {'a_begin': begin, 'a_len': a_len, 'b_begin': b_begin, 'b_len': b_len, 'random_b': random_b}


# ----------------------------------------------------------------------------------------------------------------------
# Span masking.
# ----------------------------------------------------------------------------------------------------------------------

def ngram_probabilities(max_ngram: int) -> np.ndarray:
  """`[max_ngram] float64`: p(n) ∝ 1/n for n = 1..max_ngram."""
  p = 1.0 / np.arange(1, max_ngram + 1)
  return p / p.sum()


def sample_span_mask(word_lengths: np.ndarray, word_eligible: np.ndarray, goal: int, rng: np.random.Generator, *,
                     max_ngram: int, mask_alpha: int, mask_beta: int) -> tuple[np.ndarray, list[int], int]:
  """Chooses whole words to predict in one part (algorithm in the module docstring).

  Args:
    word_lengths: `[W] int` tokens per word, in order.
    word_eligible: `[W] bool` words that may be predicted.
    goal: the number of tokens to predict.
  Returns:
    word_mask `[W] bool`; the span lengths in words of step 1 (in order); the tokens added by the fill-up step.
  """
  num_words = len(word_lengths)
  mask = np.zeros([num_words], bool)
  spans: list[int] = []
  if goal <= 0 or num_words == 0:
    return mask, spans, 0
  cdf = np.cumsum(ngram_probabilities(max_ngram))
  draws = rng.random([num_words + 1, 2])  # `cur` grows every round, so there are at most W + 1 rounds.
  lengths = word_lengths.tolist()
  eligible = word_eligible.tolist()
  count, cur, round_ = 0, 0, 0
  while cur < num_words and count < goal:
    u_n, u_ctx = draws[round_]
    round_ += 1
    n = min(int(np.searchsorted(cdf, u_n, side='right')) + 1, max_ngram, goal - count)
    ctx = n * mask_alpha // mask_beta
    left = min(int(u_ctx * ctx), ctx - 1) if ctx > 0 else 0
    beg = cur + left
    while beg < num_words and not eligible[beg]:
      beg += 1
    if beg >= num_words:
      break
    end, tokens = beg, 0
    while end < num_words and end - beg < n and eligible[end] and tokens + lengths[end] <= goal - count:
      tokens += lengths[end]
      end += 1
    if end == beg:  # The first word alone overshoots the goal: skip it.
      cur = beg + 1
      continue
    mask[beg:end] = True
    count += tokens
    spans.append(end - beg)
    cur = end + (ctx - left)
  filled = 0
  if count < goal:
    for w in rng.permutation(np.flatnonzero(word_eligible & ~mask)).tolist():
      if lengths[w] <= goal - count:
        mask[w] = True
        count += lengths[w]
        filled += lengths[w]
        if count == goal:
          break
  return mask, spans, filled


def prediction_goals(seq_len: int, reuse_len: int, num_predict: int) -> tuple[int, int]:
  """Tokens to predict in the reuse part and in the rest (the original's 43 + 42 for 512/256/85)."""
  rest = num_predict * (seq_len - reuse_len) // seq_len
  return num_predict - rest, rest


def mask_row(starts: np.ndarray, ineligible: np.ndarray, *, reuse_len: int, goals: tuple[int, int],
             rng: np.random.Generator, max_ngram: int, mask_alpha: int, mask_beta: int
             ) -> tuple[np.ndarray, list[int], int]:
  """Span masks of one row, the reuse part and the rest separately.

  Args:
    starts: `[L] bool` word boundaries of the row (True at position 0 and `reuse_len`).
    ineligible: `[L] bool` tokens that must never be predicted (`<sep>`, `<cls>`, `<eod>`).
  Returns:
    is_target `[L] bool`, the span lengths (words), the tokens added by the fill-up step.
  """
  is_target = np.zeros([len(starts)], bool)
  spans, filled = [], 0
  for lo, hi, goal in ((0, reuse_len, goals[0]), (reuse_len, len(starts), goals[1])):
    first = np.flatnonzero(starts[lo:hi])
    lengths = np.diff(np.append(first, hi - lo))
    eligible = np.minimum.reduceat(~ineligible[lo:hi], first)
    word_mask, part_spans, part_filled = sample_span_mask(lengths, eligible, goal, rng, max_ngram=max_ngram,
                                                          mask_alpha=mask_alpha, mask_beta=mask_beta)
    is_target[lo:hi] = np.repeat(word_mask, lengths)
    spans.extend(part_spans)
    filled += part_filled
  return is_target, spans, filled


# ----------------------------------------------------------------------------------------------------------------------
# Rows.
# ----------------------------------------------------------------------------------------------------------------------

def create_rows(tokens: np.ndarray, sentence_start: np.ndarray, word_start: np.ndarray, *, seq_len: int,
                reuse_len: int, num_predict: int, max_ngram: int, mask_alpha: int, mask_beta: int,
                info: Mapping[str, Any], rng: np.random.Generator, counters: dict | None = None):
  """Yields the rows of one stream in order, masked (layout and masking in the module docstring).

  Args:
    tokens: `[T] int` the stream; sentence_start / word_start: `[T] bool` boundaries in the stream's own order.
  Yields:
    `{'input_ids': [L] int32, 'a_len': int, 'target_positions': [p] int (sorted, p <= num_predict),
    'next_sentence_label': 0/1, 'offset': int (stream position of the row)}`.
  """
  tokens = np.asarray(tokens, np.int32)
  length = len(tokens)
  sentence_starts = np.flatnonzero(sentence_start)
  sep, cls, eod = info['sep_id'], info['cls_id'], info['eod_id']
  goals = prediction_goals(seq_len, reuse_len, num_predict)
  counters = counters if counters is not None else {}
  for k in range(num_rows(length, seq_len, reuse_len)):
    offset = k * reuse_len
    pair = split_a_b(sentence_starts, length, offset, seq_len=seq_len, reuse_len=reuse_len, rng=rng)
    a = slice(pair['a_begin'], pair['a_begin'] + pair['a_len'])
    b = slice(pair['b_begin'], pair['b_begin'] + pair['b_len'])
    row = np.concatenate([tokens[offset:offset + reuse_len], tokens[a], [sep], tokens[b], [sep, cls]])
    starts = np.concatenate([word_start[offset:offset + reuse_len], word_start[a], [True], word_start[b],
                             [True, True]])
    starts[[0, reuse_len, reuse_len + pair['a_len'] + 1]] = True  # Part and segment edges cut words.
    assert len(row) == seq_len, (len(row), seq_len)
    ineligible = (row == sep) | (row == cls) | (row == eod)
    is_target, spans, filled = mask_row(starts, ineligible, reuse_len=reuse_len, goals=goals, rng=rng,
                                        max_ngram=max_ngram, mask_alpha=mask_alpha, mask_beta=mask_beta)
    targets = np.flatnonzero(is_target)
    counters['targets'] = counters.get('targets', 0) + len(targets)
    counters['fill_targets'] = counters.get('fill_targets', 0) + filled
    counters['spans'] = counters.get('spans', 0) + len(spans)
    counters['span_words'] = counters.get('span_words', 0) + sum(spans)
    yield {'input_ids': row, 'a_len': pair['a_len'], 'target_positions': targets,
           'next_sentence_label': pair['random_b'], 'offset': offset}
