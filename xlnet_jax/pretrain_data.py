"""XLNet pretraining data: one text stream, rows `[reuse | A <sep> B <sep> <cls>]`, whole-word span masks, shards.

Pipeline (run once by `prepare_pretraining_data` with the stages of `common.data.prepare`, every stage reused when
its inputs have not changed):

  corpus (one sentence per line, blank line between documents)
    -> sentencepiece model with XLNet's symbols (`xlnet_jax.tokenizer`; trained on the train split or given)
    -> documents of ids, shuffled (by `seed`) and cut into `num_shards` contiguous groups of about equal size
    -> per group, one stream: the documents concatenated, `<eod>` after each (it belongs to the document's last
       sentence, as in the original where a blank line adds `<eod>` to the sentence before it)
    -> rows cut from the stream in order, masked, written to ArrayRecord shards (`common.data.shards`)
    -> `make_loader`: a `common.data.pipeline.StepLoader` in stream order.

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

`bi_data` (as the original): the backward stream of a group is its forward stream reversed, cut into rows the same
way (word boundaries follow the reversed text). Shards hold all forward rows, then all backward rows (equal
counts); the loader (`stream_groups=2`) puts forward streams in the first half of the global batch and backward
streams in the second half, which is where the model's bi-directional relative positions expect them.

Batches (numpy): `input_ids [B, L] int32`, `segment_ids [B, L] int32`, `input_mask [B, L] int32` (1 = real token;
rows are full, so all ones; the original XLNet's `input_mask` uses the opposite convention), `is_target [B, L] bool`,
`is_special [B, L] bool` (`<sep>`, `<cls>`), `next_sentence_labels [B] int32`. The targets are the input tokens at
the target positions; `xlnet_jax.permutation.sample_permutation` turns `is_target`/`is_special` into the masks on
device.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

import ml_collections
import numpy as np

from common import storage
from common.data import prepare, shards
from common.data.prepare import token_dtype, tokenize_documents  # noqa: F401  (part of this module's API)

if TYPE_CHECKING:
  from common.data.pipeline import StepLoader

FORMAT = 'xlnet_jax.pretrain_data/1'
_ROW_STREAM = 1  # Tag that keeps the random stream of the rows apart from the document shuffle's.


# ----------------------------------------------------------------------------------------------------------------------
# Config.
# ----------------------------------------------------------------------------------------------------------------------

def data_config(**overrides) -> ml_collections.ConfigDict:
  """The `data` section of an XLNet pretraining config (defaults: the original's 512/256/85, embedded corpus)."""
  cfg = ml_collections.ConfigDict(dict(
      **prepare.source_fields(),  # corpus, eval_corpus.
      spiece_model='',            # '' = train a sentencepiece model of `vocab_size` on the train split.
      vocab_size=8000,
      do_lower_case=False,
      seq_len=512,
      reuse_len=256,
      num_predict=85,
      mask_alpha=6,
      mask_beta=1,
      max_ngram=5,
      perm_size=0,                # Factorisation-order block length; 0 = reuse_len.
      bi_data=False,
      **prepare.shard_fields(),   # num_shards, num_workers, seed.
  ))
  cfg.update(overrides)
  return cfg


def effective_perm_size(cfg: ml_collections.ConfigDict) -> int:
  """`perm_size`, with 0 meaning `reuse_len`."""
  return int(cfg.perm_size) or int(cfg.reuse_len)


def validate_data_config(cfg: ml_collections.ConfigDict, prefix: str = 'data') -> None:
  """Raises `ConfigError('config.<prefix>.<field>: ...')`, one line naming the first bad field."""
  check = prepare.ConfigChecker(cfg, prefix)
  is_int = prepare.is_int
  check.sources()
  check.tokenizer('spiece_model', 'a sentencepiece model')
  check(is_int(cfg.seq_len) and 8 <= cfg.seq_len <= 65535, 'seq_len',
        f'must be an integer in [8, 65535], got {cfg.seq_len!r}')
  check(is_int(cfg.reuse_len) and 1 <= cfg.reuse_len <= cfg.seq_len - 5, 'reuse_len',
        f'must be an integer in [1, seq_len - 5 = {cfg.seq_len - 5}] (reuse_len < seq_len, and A <sep> B <sep> <cls> '
        f'needs 5 tokens), got {cfg.reuse_len!r}')
  check(is_int(cfg.num_predict) and 1 <= cfg.num_predict <= cfg.seq_len - cfg.reuse_len, 'num_predict',
        f'must be an integer in [1, seq_len - reuse_len = {cfg.seq_len - cfg.reuse_len}], got {cfg.num_predict!r}')
  check.positive_ints('mask_alpha', 'mask_beta', 'max_ngram', 'num_shards', 'num_workers', 'loader_threads')
  check(is_int(cfg.perm_size) and cfg.perm_size >= 0, 'perm_size',
        f'must be an integer >= 0 (0 = reuse_len), got {cfg.perm_size!r}')
  perm_size = effective_perm_size(cfg)
  rest = cfg.seq_len - cfg.reuse_len
  check(cfg.reuse_len % perm_size == 0 and rest % perm_size == 0, 'perm_size',
        f'{perm_size} must divide reuse_len={cfg.reuse_len} and seq_len - reuse_len={rest} (each part is cut into '
        'blocks of perm_size, as in the original)')
  check.seed()
  check.booleans('do_lower_case', 'bi_data')


# ----------------------------------------------------------------------------------------------------------------------
# Tokenizer facts the data needs.
# ----------------------------------------------------------------------------------------------------------------------

def describe_tokenizer(tokenizer: Any) -> dict[str, Any]:
  """`{vocab_size, sep_id, cls_id, eod_id, space_id, is_word_start [vocab_size] bool}` from a tokenizer or such a
  mapping (`space_id`: the bare '▁' piece, -1 if none)."""
  get = tokenizer.get if isinstance(tokenizer, Mapping) else functools.partial(getattr, tokenizer)
  info = {key: int(get(key)) for key in ('vocab_size', 'sep_id', 'cls_id', 'eod_id')}
  info['space_id'] = int(get('space_id', -1))
  info['is_word_start'] = np.asarray(get('is_word_start'), dtype=bool)
  if info['is_word_start'].shape != (info['vocab_size'],):
    raise ValueError(f'is_word_start has shape {info["is_word_start"].shape}, expected ({info["vocab_size"]},)')
  return info


def tokenizer_digest(tokenizer: Any) -> str:
  """A hash of the vocabulary (every piece) and the word-start table, for fingerprints."""
  pieces = getattr(tokenizer, 'pieces', None)
  if pieces is None:
    pieces = [tokenizer.id_to_piece(i) for i in range(int(tokenizer.vocab_size))]
  digest = hashlib.sha256(json.dumps(list(pieces)).encode())
  digest.update(np.packbits(np.asarray(tokenizer.is_word_start, bool)).tobytes())
  digest.update(json.dumps([bool(getattr(tokenizer, 'do_lower_case', False)),
                            bool(getattr(tokenizer, 'keep_accents', False))]).encode())
  return digest.hexdigest()[:32]


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


# ----------------------------------------------------------------------------------------------------------------------
# Batches.
# ----------------------------------------------------------------------------------------------------------------------

def rows_to_batch(rows: Sequence[Mapping[str, Any]], *, seq_len: int, reuse_len: int, sep_id: int,
                  cls_id: int) -> dict[str, np.ndarray]:
  """Per-row records -> the trainer's batch dict (names and shapes in the module docstring)."""
  b = len(rows)
  batch = {
      'input_ids': np.zeros([b, seq_len], np.int32),
      'segment_ids': np.zeros([b, seq_len], np.int32),
      'input_mask': np.ones([b, seq_len], np.int32),
      'is_target': np.zeros([b, seq_len], bool),
      'is_special': np.zeros([b, seq_len], bool),
      'next_sentence_labels': np.zeros([b], np.int32),
  }
  for r, row in enumerate(rows):
    ids = np.asarray(row['input_ids'])
    if len(ids) != seq_len:
      raise ValueError(f'a record has {len(ids)} tokens, seq_len is {seq_len}')
    batch['input_ids'][r] = ids
    batch['segment_ids'][r, reuse_len + int(row['a_len']) + 1:] = 1
    batch['segment_ids'][r, -1] = 2
    batch['is_target'][r, np.asarray(row['target_positions'], np.int64)] = True
    batch['next_sentence_labels'][r] = int(row['next_sentence_label'])
  batch['is_special'] = (batch['input_ids'] == sep_id) | (batch['input_ids'] == cls_id)
  return batch


def _batch_fn(records, keys, epoch, **kwargs):
  del keys, epoch  # Masks are in the records.
  return rows_to_batch(records, **kwargs)


def make_loader(shard_dir: str | os.PathLike, data_cfg: ml_collections.ConfigDict, global_batch_size: int, *,
                seed: int, process_index: int = 0, process_count: int = 1, prefetch: int = 2) -> 'StepLoader':
  """A `StepLoader` over XLNet shards in stream order: row `b` at step `s + 1` continues row `b` at step `s`.

  With `bi_data` the first half of the global batch holds forward streams and the second half backward streams
  (`global_batch_size` must be even). The rows are a pure function of the step (masks are in the shards; `seed`
  is kept for the common loader interface).
  """
  from common.data.pipeline import StepLoader  # pylint: disable=import-outside-toplevel
  reader = shards.ShardReader(shard_dir)
  written = reader.metadata['info'].get('settings', {})
  for field in ('seq_len', 'reuse_len', 'bi_data'):
    if field in written and written[field] != data_cfg[field]:
      raise ValueError(f'{shard_dir} was written with {field}={written[field]!r}, config says {data_cfg[field]!r}')
  if written.get('num_predict', 0) > data_cfg.num_predict:
    raise ValueError(f'{shard_dir} holds up to {written["num_predict"]} targets per row, config num_predict='
                     f'{data_cfg.num_predict}')
  groups = 2 if written.get('bi_data', data_cfg.bi_data) else 1
  if global_batch_size % groups:
    raise ValueError(f'bi_data needs an even global batch (forward and backward halves), got {global_batch_size}')
  batch_fn = functools.partial(_batch_fn, seq_len=int(data_cfg.seq_len), reuse_len=int(data_cfg.reuse_len),
                               sep_id=int(written['sep_id']), cls_id=int(written['cls_id']))
  return StepLoader(reader, batch_fn, global_batch_size, seed=seed, process_index=process_index,
                    process_count=process_count, prefetch=prefetch, order='stream', stream_groups=groups,
                    num_threads=int(data_cfg.get('loader_threads', 1)))


# ----------------------------------------------------------------------------------------------------------------------
# Writing shards.
# ----------------------------------------------------------------------------------------------------------------------

def split_groups(sizes: Sequence[int], num_groups: int) -> list[tuple[int, int]]:
  """Contiguous `[start, stop)` ranges of items with about equal total size (cut at `k * total / num_groups`)."""
  cumulative = np.cumsum(np.asarray(sizes, np.int64))
  total = int(cumulative[-1]) if len(cumulative) else 0
  cuts = [0] + [int(np.searchsorted(cumulative, total * k / num_groups, side='left')) + 1
                for k in range(1, num_groups)] + [len(sizes)]
  cuts = np.maximum.accumulate(np.minimum(cuts, len(sizes)))
  return [(int(cuts[k]), int(cuts[k + 1])) for k in range(num_groups)]


def _shard_features(settings: 'ShardSettings') -> dict[str, tuple[str, tuple]]:
  return {'input_ids': (token_dtype(settings.vocab_size), (settings.seq_len,)), 'a_len': ('uint16', ()),
          'target_positions': ('uint16', (None,)), 'next_sentence_label': ('uint8', ()), 'offset': ('uint32', ())}


def _shard_tasks(documents: Sequence[tuple[np.ndarray, np.ndarray]], settings: 'ShardSettings',
                 info: Mapping[str, Any]) -> list[dict[str, Any]]:
  """Shuffled documents cut into `num_shards` contiguous groups of about equal token count; one task (a packed
  group) per group and direction, all forward tasks first."""
  groups = split_groups([len(d[0]) + 1 for d in documents], settings.num_shards)
  dtype = token_dtype(info['vocab_size'])
  return [{'group': g, 'backward': backward, 'settings': settings, 'tokenizer': info,
           **prepare.pack_documents(documents[lo:hi], dtype)}
          for backward in ((False, True) if settings.bi_data else (False,)) for g, (lo, hi) in enumerate(groups)]


def _shard_records(task: Mapping[str, Any]):
  """Worker side: the rows of one group's stream (forward or backward), in stream order."""
  s = task['settings']
  info = task['tokenizer']
  tokens, sentence_start = build_stream(prepare.unpack_documents(task), s.eod_id)
  word_start = word_starts(tokens, info)
  if task['backward']:
    tokens = tokens[::-1].copy()
    sentence_start = reverse_boundaries(sentence_start)
    word_start = reverse_boundaries(word_start)
  rng = np.random.default_rng([s.seed, _ROW_STREAM, task['group'], int(task['backward'])])
  counters: dict[str, int] = {}
  yield from create_rows(tokens, sentence_start, word_start, seq_len=s.seq_len, reuse_len=s.reuse_len,
                         num_predict=s.num_predict, max_ngram=s.max_ngram, mask_alpha=s.mask_alpha,
                         mask_beta=s.mask_beta, info=info, rng=rng, counters=counters)
  rows = num_rows(len(tokens), s.seq_len, s.reuse_len)
  tail = len(tokens) - ((rows - 1) * s.reuse_len + s.seq_len) if rows else len(tokens)
  counters.update(stream_tokens=len(tokens), tail_tokens=tail, eod=int(np.count_nonzero(tokens == s.eod_id)))
  return counters


def _summary(metadata: Mapping[str, Any], stats: Mapping[str, Any]) -> dict[str, Any]:
  """Row count, random-next fraction, target, span and segment-A statistics of written shards."""
  features = stats['features']
  rows = max(1, metadata['num_records'])
  return {
      'rows': metadata['num_records'],
      'random_next_fraction': round(features['next_sentence_label']['sum'] / rows, 4),
      'mean_targets': round(features['target_positions']['mean'], 3),
      'min_targets': features['target_positions']['min_len'],
      'fill_fraction': round(stats.get('fill_targets', 0) / max(1, stats.get('targets', 0)), 4),
      'mean_span_words': round(stats.get('span_words', 0) / max(1, stats.get('spans', 0)), 3),
      'mean_a_len': round(features['a_len']['mean'], 2),
  }


@dataclasses.dataclass(frozen=True)
class ShardSettings:
  """Everything the written rows depend on besides the documents and the vocabulary (part of the shards'
  fingerprint and metadata)."""
  seq_len: int
  reuse_len: int
  num_predict: int
  mask_alpha: int
  mask_beta: int
  max_ngram: int
  bi_data: bool
  do_lower_case: bool
  vocab_size: int
  sep_id: int
  cls_id: int
  eod_id: int
  seed: int
  num_shards: int

  @classmethod
  def from_config(cls, cfg: ml_collections.ConfigDict, info: Mapping[str, Any], *, seed: int,
                  num_shards: int) -> 'ShardSettings':
    return cls(seq_len=int(cfg.seq_len), reuse_len=int(cfg.reuse_len), num_predict=int(cfg.num_predict),
               mask_alpha=int(cfg.mask_alpha), mask_beta=int(cfg.mask_beta), max_ngram=int(cfg.max_ngram),
               bi_data=bool(cfg.bi_data), do_lower_case=bool(cfg.do_lower_case), vocab_size=int(info['vocab_size']),
               sep_id=int(info['sep_id']), cls_id=int(info['cls_id']), eod_id=int(info['eod_id']), seed=int(seed),
               num_shards=int(num_shards))

  def to_json(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


# What the shards hold and how documents become them (`common.data.prepare.write_tokenized_shards`).
SHARD_FORMAT = prepare.ShardFormat(FORMAT, make_tasks=_shard_tasks, make_records=_shard_records,
                                   features=_shard_features, summary=_summary, private_info=('is_word_start',))


def write_pretraining_shards(documents: Iterable[Sequence[str]], tokenizer: Any, out_dir: str | os.PathLike,
                             cfg: ml_collections.ConfigDict, *, num_shards: int, num_workers: int, seed: int,
                             input_fingerprint: str | None = None, read_stats: Any = None) -> dict[str, Any]:
  """Tokenises documents, builds the streams, cuts and masks rows and writes them to shards in stream order.

  Documents are shuffled with `seed` and cut into `num_shards` contiguous groups of about equal token count; shard
  `g` holds the rows of group `g`'s stream (and, with `bi_data`, shard `num_shards + g` those of its reversal).
  The output depends on (`seed`, `num_shards`), never on `num_workers`.

  Args:
    documents: documents, each a list of sentence strings.
    tokenizer: has `encode_batch(texts) -> list[list[int]]`, `vocab_size`, `sep_id`, `cls_id`, `eod_id`,
      `is_word_start`, `pieces` (or `id_to_piece`).
    cfg: a `data_config()`; the row and masking fields are used.
    input_fingerprint: identifies the documents; then complete shards with the same fingerprint are reused without
      reading `documents`. Without it the documents are read and hashed first.
    read_stats: the corpus reader's counters, stored in the metadata as `input.reader`.
  Returns:
    stats: record count, per-feature totals, counters, `summary`, `reused`, `fingerprint`.
  """
  info = describe_tokenizer(tokenizer)
  settings = ShardSettings.from_config(cfg, info, seed=seed, num_shards=num_shards)
  return prepare.write_tokenized_shards(documents, tokenizer, out_dir, SHARD_FORMAT, settings=settings, info=info,
                                        tokenizer_digest=tokenizer_digest(tokenizer), num_workers=num_workers,
                                        input_fingerprint=input_fingerprint, read_stats=read_stats)


# ----------------------------------------------------------------------------------------------------------------------
# Corpus -> tokenizer -> shards.
# ----------------------------------------------------------------------------------------------------------------------

def _train_sentencepiece(files: Sequence[str], vocab_size: int, tokenizer_dir: str, do_lower_case: bool) -> str:
  from xlnet_jax import tokenizer as xlnet_tokenizer  # pylint: disable=import-outside-toplevel
  return xlnet_tokenizer.train_sentencepiece(files, vocab_size, storage.join(tokenizer_dir, 'spiece'),
                                             do_lower_case=do_lower_case)


def _load_sentencepiece(path: str, do_lower_case: bool):
  from xlnet_jax import tokenizer as xlnet_tokenizer  # pylint: disable=import-outside-toplevel
  return xlnet_tokenizer.load_tokenizer(path, do_lower_case=do_lower_case)


TOKENIZER = prepare.TokenizerSpec(given_field='spiece_model', trained_file='spiece.model',
                                  train=_train_sentencepiece, load=_load_sentencepiece)


def prepare_pretraining_data(data_cfg: ml_collections.ConfigDict, work_dir: str | os.PathLike):
  """Corpus -> sentencepiece model -> train and eval shards under `work_dir` (`common.data.prepare`); every stage
  is reused when unchanged. The eval split is one stream (one shard, two with `bi_data`). Returns
  `(tokenizer, train_dir, eval_dir)`."""
  validate_data_config(data_cfg)
  return prepare.prepare_pretraining_data(data_cfg, work_dir, TOKENIZER, write_pretraining_shards,
                                          eval_num_shards=1)
