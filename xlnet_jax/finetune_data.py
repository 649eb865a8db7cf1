"""XLNet fine-tuning features: task examples (`common.tasks`) -> fixed-shape numpy arrays.

Layouts follow zihangdai/xlnet (`classifier_utils.py`, `run_race.py`, `run_squad.py`); every sequence is
`max_seq_length` (L) long and `<cls>` comes LAST (the summary of 'last'):

  single text      A <sep> <cls>                          segment ids  0 .. 0 2
  text pair        A <sep> B <sep> <cls>                  segment ids  0 .. 0 (A, its <sep>) 1 .. 1 (B, its <sep>) 2
  multiple choice  context <sep> question+ending <sep> <cls>, one row per ending (as a pair)
  tagging          w1 w2 ... <sep> <cls>                  segment ids  0 .. 0 2
  SQuAD window     window <sep> question <sep> <cls>      segment ids  0 (window, its <sep>) 1 (question, <sep>) 2

Classification, multiple choice and tagging rows are PADDED ON THE LEFT (`<pad>` ids, segment id SEG_ID_PAD = 4,
mask 0), as the original `convert_single_example`, so `<cls>` is always the last position. SQuAD rows are padded
on the right (segment id SQUAD_SEG_ID_PAD = 3), as the original `run_squad.py`; `cls_index` gives `<cls>`'s position.
(The original pads with id 0, `<unk>`; we pad with `<pad>`. Padding is masked, so the model sees no difference.)

Truncation is the original's: a pair to L - 3 tokens with `truncate_seq_pair` (the longer segment loses its last
token first), a single text to L - 2; RACE keeps the last `max_qa_length` question+option tokens and the first
L - 3 - len(qa) context tokens.

Every converter returns a dict of numpy arrays; common names (N = rows):

  input_ids    [N, L] int32   token ids
  segment_ids  [N, L] int32   SEG_ID_* as above
  input_mask   [N, L] int32   1 = real token, 0 = padding (the OPPOSITE of the original XLNet `input_mask`, the
                              convention of `xlnet_jax.model` and of `transformers`' attention_mask)
  label        [N] int32 class index (-1: no label), or float32 score (NaN: no label) for regression

Multiple choice adds a choice axis (`[N, C, L]`); tagging and SQuAD have their own label arrays (documented on
their functions). Tokenizer: `xlnet_jax.tokenizer.SentencePieceTokenizer`.
"""
from __future__ import annotations

import difflib
import functools
import logging
from typing import Sequence

import numpy as np

from common import task_features, tasks
from common.tasks import MultipleChoiceExample, PairExample, SquadExample, TokenExample
from xlnet_jax import tokenizer as xlnet_tokenizer

log = logging.getLogger(__name__)

# Segment ids of the original classifier_utils.py / run_race.py.
SEG_ID_A, SEG_ID_B, SEG_ID_CLS, SEG_ID_SEP, SEG_ID_PAD = 0, 1, 2, 3, 4
# Segment ids of the original run_squad.py (paragraph first, question second).
SQUAD_SEG_ID_P, SQUAD_SEG_ID_Q, SQUAD_SEG_ID_CLS, SQUAD_SEG_ID_PAD = 0, 1, 2, 3
IGNORE_LABEL = -100  # Label of sub-tokens, special tokens and padding in tagging (weight 0).
MIN_ALIGNED_FRACTION = 0.8  # SQuAD: share of context characters the pieces must align with (the original's check).
ALIGN_ANCHOR = 3  # SQuAD alignment: characters that must agree to resynchronise after a difference.
ALIGN_MAX_SKIP = 32  # SQuAD alignment: characters skipped at most to resynchronise before falling back to difflib.


# ----------------------------------------------------------------------------------------------------------------------
# Sequence layout.
# ----------------------------------------------------------------------------------------------------------------------

def _layout(tokenizer, ids_a: Sequence[int], ids_b: Sequence[int] | None) -> tuple[list[int], list[int]]:
  """(A <sep> (B <sep>) <cls>, segment ids) without padding."""
  ids = [*ids_a, tokenizer.sep_id]
  segments = [SEG_ID_A] * len(ids)
  if ids_b is not None:
    ids += [*ids_b, tokenizer.sep_id]
    segments += [SEG_ID_B] * (len(ids_b) + 1)
  return ids + [tokenizer.cls_id], segments + [SEG_ID_CLS]


def _pad_rows_left(rows: Sequence[tuple[list[int], list[int]]], max_seq_length: int, pad_id: int
                   ) -> dict[str, np.ndarray]:
  """(ids, segments) rows -> input_ids, segment_ids, input_mask `[len(rows), L]` int32, padded on the LEFT."""
  n = len(rows)
  input_ids = np.full((n, max_seq_length), pad_id, dtype=np.int32)
  segment_ids = np.full((n, max_seq_length), SEG_ID_PAD, dtype=np.int32)
  input_mask = np.zeros((n, max_seq_length), dtype=np.int32)
  for i, (ids, segments) in enumerate(rows):
    if len(ids) > max_seq_length:
      raise AssertionError(f'row {i} holds {len(ids)} tokens > max_seq_length={max_seq_length}')
    offset = max_seq_length - len(ids)
    input_ids[i, offset:] = ids
    segment_ids[i, offset:] = segments
    input_mask[i, offset:] = 1
  return dict(input_ids=input_ids, segment_ids=segment_ids, input_mask=input_mask)


# ----------------------------------------------------------------------------------------------------------------------
# Classification and regression.
# ----------------------------------------------------------------------------------------------------------------------

def convert_pair_examples(examples: Sequence[PairExample], tokenizer, max_seq_length: int, *,
                          regression: bool | None = None) -> dict[str, np.ndarray]:
  """Single texts / text pairs -> input_ids, segment_ids, input_mask `[N, L]` int32 (left-padded, `<cls>` last)
  and label `[N]`: int32 (class index, -1 when None) or, with `regression` (default: when any label is a float),
  float32 (NaN when None)."""
  return task_features.pair_features(examples, tokenizer, max_seq_length, _layout, _pad_rows_left,
                                     regression=regression)


# ----------------------------------------------------------------------------------------------------------------------
# Multiple choice (RACE, SWAG).
# ----------------------------------------------------------------------------------------------------------------------

def convert_multiple_choice_examples(examples: Sequence[MultipleChoiceExample], tokenizer, max_seq_length: int, *,
                                     max_qa_length: int | None = None) -> dict[str, np.ndarray]:
  """Multiple-choice examples -> input_ids, segment_ids, input_mask `[N, C, L]` int32, label `[N]` int32 (-1: None).

  Choice c of an example is `context <sep> join_question_ending(question, ending_c) <sep> <cls>`, left-padded, as
  `run_race.py`. Every example must have the same number of endings C. `max_qa_length` selects RACE's truncation
  (the original uses 128 with L = 512); None truncates the pair with `truncate_seq_pair` (SWAG). Unlike the
  original, truncating one choice never shortens the context of the next (the original reused one list).
  """
  return task_features.choice_features(examples, tokenizer, max_seq_length, _layout, _pad_rows_left,
                                  max_qa_length=max_qa_length)


# ----------------------------------------------------------------------------------------------------------------------
# Token classification (CoNLL NER).
# ----------------------------------------------------------------------------------------------------------------------

def convert_token_examples(examples: Sequence[TokenExample], tokenizer, max_seq_length: int,
                           label_list: Sequence[str] = tasks.CONLL2003_LABELS) -> dict[str, np.ndarray]:
  """Tagged sentences -> `word pieces <sep> <cls>`, left-padded, the tag on the FIRST piece of each word.

  Each word is encoded on its own (so it starts with '▁' as in running text; a word that is a user-defined symbol,
  such as '.', comes out as '▁' '.' and its tag sits on the bare '▁').
  Returns input_ids, segment_ids (SEG_ID_A, `<cls>` SEG_ID_CLS, padding SEG_ID_PAD), input_mask `[N, L]` int32 and
    label          [N, L] int32    tag index on a word's first piece; IGNORE_LABEL (-100) on its other pieces, on
                                   <sep>/<cls> and on padding
    label_weights  [N, L] float32  1.0 where label is a tag, else 0.0
    word_index     [N, L] int32    the word every piece belongs to (-1 for <sep>/<cls>/padding)
    num_words      [N] int32       words whose first piece fits in L - 2 tokens (the rest are cut; predict them 'O')
  A word with no pieces becomes one `<unk>`, so every kept word is labelled.
  """
  task_features.check_length(max_seq_length, 3)
  n = len(examples)
  labels = np.full((n, max_seq_length), IGNORE_LABEL, dtype=np.int32)
  word_index = np.full((n, max_seq_length), -1, dtype=np.int32)
  num_words = np.zeros(n, dtype=np.int32)
  rows = []
  for i, words in enumerate(task_features.tagged_pieces(examples, tokenizer, label_list, max_seq_length - 2)):
    ids, first_pieces, piece_words = [], [], []
    for w, (tag, kept) in enumerate(words):
      first_pieces.append((len(ids), tag))
      piece_words.extend([w] * len(kept))
      ids.extend(kept)
    num_words[i] = len(words)
    rows.append(_layout(tokenizer, ids, None))
    offset = max_seq_length - len(ids) - 2  # Left padding before the first piece.
    for position, label in first_pieces:
      labels[i, offset + position] = label
    word_index[i, offset:offset + len(ids)] = piece_words
  features = _pad_rows_left(rows, max_seq_length, tokenizer.pad_id)
  features.update(label=labels, label_weights=(labels != IGNORE_LABEL).astype(np.float32), word_index=word_index,
                  num_words=num_words)
  return features


# ----------------------------------------------------------------------------------------------------------------------
# SQuAD: aligning the pieces with the context's characters.
# ----------------------------------------------------------------------------------------------------------------------

def _fill_index(index: Sequence[int | None], pos: int, size: int, is_start: bool) -> int:
  """index[pos], or for an unaligned position the nearest sensible value in [0, size): a span start moves just past
  the last aligned position before it (not past the next aligned one), an end just before the next aligned position
  (not before the last one). This is what the original `_convert_index` computes."""
  if index[pos] is not None:
    return index[pos]
  left = next((index[i] for i in range(pos - 1, -1, -1) if index[i] is not None), None)
  right = next((index[i] for i in range(pos + 1, len(index)) if index[i] is not None), None)
  if is_start:
    value = 0 if left is None else left + 1
    if right is not None:
      value = min(value, right)
  else:
    value = size - 1 if right is None else right - 1
    if left is not None:
      value = max(value, left)
  return min(max(value, 0), size - 1)


@functools.lru_cache(maxsize=65536)
def _normalize_char(ch: str, lower: bool, keep_accents: bool) -> str | None:
  """`ch` as the tokenizer's text normalisation leaves it, or None when that is not exactly one character. Every
  whitespace character becomes ' ' (the tokenizer collapses whitespace runs into one space)."""
  if ch.isspace():
    return ' '
  out = xlnet_tokenizer.preprocess_text(ch, lower=lower, remove_space=False, keep_accents=keep_accents)
  return out if len(out) == 1 else None


def _anchored(a: Sequence[str | None], b: str, i: int, j: int) -> bool:
  """a[i:] and b[j:] agree on their next ALIGN_ANCHOR characters (or up to the end of either)."""
  for k in range(ALIGN_ANCHOR):
    if i + k >= len(a) or j + k >= len(b):
      return k > 0
    if a[i + k] != b[j + k]:
      return False
  return True


def _align_chars(a: Sequence[str | None], b: str) -> list[int | None]:
  """For each a[i], its matched position in b (or None): a monotone matching of equal characters.

  Walks both strings while they agree; at a disagreement, resynchronises at the nearest (fewest characters skipped
  in a and b together, at most ALIGN_MAX_SKIP) pair of positions where the next ALIGN_ANCHOR characters agree. The
  differences between a context and its pieces are local (collapsed whitespace, dropped accents, '``' -> '"',
  NFKC expansions), so this is linear in practice; when no resynchronisation is found nearby, the rest is matched by
  `difflib`'s longest matching blocks.
  """
  a_to_b: list[int | None] = [None] * len(a)
  i = j = 0
  while i < len(a) and j < len(b):
    if a[i] == b[j]:
      a_to_b[i] = j
      i, j = i + 1, j + 1
      continue
    step = next(((di, d - di) for d in range(1, ALIGN_MAX_SKIP + 1) for di in range(d + 1)
                 if _anchored(a, b, i + di, j + d - di)), None)
    if step is None:
      matcher = difflib.SequenceMatcher(None, list(a[i:]), list(b[j:]), autojunk=False)
      for block_a, block_b, size in matcher.get_matching_blocks():
        for k in range(size):
          a_to_b[i + block_a + k] = j + block_b + k
      break
    i, j = i + step[0], j + step[1]
  return a_to_b


def align_pieces(context: str, pieces: Sequence[str], tokenizer) -> tuple[list[int], list[int], list[int | None],
                                                                          float]:
  """Character alignment between `context` and its sentencepiece `pieces` (the text they spell, '▁' read as ' ').

  Each context character is normalised as the tokenizer normalises text (accents, case: `preprocess_text` without
  whitespace collapsing; whitespace as ' ') and matched to the piece text (`_align_chars`), the stand-in for the original's banded
  longest common subsequence. Returns
    tok_start_to_orig, tok_end_to_orig  [len(pieces)] first / last context character of each piece (inclusive;
                                        a piece's leading '▁' maps to the space before its word)
    orig_to_chartok   [len(context)] position in the piece text of each context character, None if unmatched
    aligned_fraction  matched characters / len(context)
  """
  piece_text = ''.join(pieces).replace(xlnet_tokenizer.SPIECE_UNDERLINE, ' ')
  normalized = [_normalize_char(ch, tokenizer.do_lower_case, tokenizer.keep_accents) for ch in context]
  orig_to_chartok = _align_chars(normalized, piece_text)
  chartok_to_orig: list[int | None] = [None] * len(piece_text)
  matched = 0
  for i, j in enumerate(orig_to_chartok):
    if j is not None:
      chartok_to_orig[j] = i
      matched += 1
  starts, ends, position = [], [], 0
  for piece in pieces:
    first, last = position, position + len(piece) - 1
    position += len(piece)
    if not matched:
      starts.append(0)
      ends.append(0)
      continue
    starts.append(_fill_index(chartok_to_orig, first, len(context), is_start=True))
    ends.append(_fill_index(chartok_to_orig, last, len(context), is_start=False))
  return starts, ends, orig_to_chartok, matched / max(len(context), 1)


def _answer_piece_span(example: SquadExample, pieces: Sequence[str], orig_to_chartok: list[int | None]
                       ) -> tuple[int, int] | None:
  """(first piece, last piece) covering the first answer's characters, or None when it cannot be placed."""
  answer = example.answers[0]
  start = answer['answer_start']
  end = start + len(answer['text']) - 1
  piece_text_len = sum(len(p) for p in pieces)
  if not answer['text'] or not 0 <= start <= end < len(orig_to_chartok) or piece_text_len == 0:
    return None
  chartok_to_piece = [i for i, piece in enumerate(pieces) for _ in piece]
  first = chartok_to_piece[_fill_index(orig_to_chartok, start, piece_text_len, is_start=True)]
  last = chartok_to_piece[_fill_index(orig_to_chartok, end, piece_text_len, is_start=False)]
  return (first, last) if first <= last else None


# ----------------------------------------------------------------------------------------------------------------------
# SQuAD: windows.
# ----------------------------------------------------------------------------------------------------------------------

def _skip(skipped: list | None, qas_id: str, message: str, *args) -> None:
  """Logs why a training question is skipped and appends its id to `skipped` (when given)."""
  log.warning(message, *args)
  if skipped is not None:
    skipped.append(qas_id)


def _pad_squad_rows(rows: Sequence[tuple[list[int], list[int]]], windows: Sequence[dict], max_seq_length: int,
                    pad_id: int) -> dict[str, np.ndarray]:
  """SQuAD rows `window <sep> question <sep> <cls>` -> input_ids, segment_ids, input_mask and p_mask `[N, L]` int32,
  padded on the right (p_mask 0 on the window's tokens and on <cls>)."""
  n = len(rows)
  features = dict(input_ids=np.full((n, max_seq_length), pad_id, dtype=np.int32),
                  segment_ids=np.full((n, max_seq_length), SQUAD_SEG_ID_PAD, dtype=np.int32),
                  input_mask=np.zeros((n, max_seq_length), dtype=np.int32),
                  p_mask=np.ones((n, max_seq_length), dtype=np.int32))
  for i, ((ids, segments), window) in enumerate(zip(rows, windows)):
    features['input_ids'][i, :len(ids)] = ids
    features['segment_ids'][i, :len(ids)] = segments
    features['input_mask'][i, :len(ids)] = 1
    features['p_mask'][i, :window['paragraph_len']] = 0
    features['p_mask'][i, len(ids) - 1] = 0
  return features


def convert_squad_examples(examples: Sequence[SquadExample], tokenizer, max_seq_length: int = 512,
                           doc_stride: int = 128, max_query_length: int = 64, *, is_training: bool = False,
                           skipped: list | None = None) -> tuple[dict[str, np.ndarray], list[dict]]:
  """SQuAD examples -> one row per document window `window <sep> question <sep> <cls>`, as XLNet's `run_squad.py`.

  The whole context is encoded into pieces and aligned with its characters (`align_pieces`); an example whose
  alignment covers under MIN_ALIGNED_FRACTION of the context is skipped with a warning (its qas_id appended to
  `skipped`), as the original does. The question is cut to `max_query_length` pieces; windows of at most
  `L - len(question) - 3` pieces start `doc_stride` apart. The answer (the first of `answers`) spans the pieces that
  cover its characters. In a window that holds the whole answer, start/end_position point at its first/last piece
  (the window starts the row, so the offset is 0); otherwise (answer outside the window, unanswerable question, no
  answer given) both point at `<cls>` and is_impossible is 1. Rows are padded on the RIGHT (the original's choice).

  Returns (features, windows). features:
    input_ids, segment_ids, input_mask  [N, L] int32   (segments SQUAD_SEG_ID_*)
    p_mask          [N, L] int32   1 = cannot be part of an answer (<sep>, question, padding); 0 on window tokens
                                   and on <cls> (the no-answer position), as the original
    cls_index       [N] int32      position of <cls> (len(window) + len(question) + 2)
    start_position, end_position  [N] int32
    is_impossible   [N] int32
    example_index   [N] int32      index into `examples` of the row's example
  windows: one dict per row (plain python, for mapping predictions back to text):
    example_index, qas_id, window_index
    doc_start       index of the window's first token among the document's tokens
    doc_offset      position of the window's first token in the row (0)
    paragraph_len   number of window tokens
    tok_start_to_orig, tok_end_to_orig   [paragraph_len] first / last context character (inclusive) of each window
                    token: `context[tok_start_to_orig[s]:tok_end_to_orig[e] + 1].strip()` is a predicted span's text
    token_is_max_context {row position: bool}: this window gives the token its best context
  """
  task_features.check_length(max_seq_length, 4)
  queries = tokenizer.encode_batch([e.question for e in examples])
  rows, windows = [], []
  arrays = {name: [] for name in ('cls_index', 'start_position', 'end_position', 'is_impossible', 'example_index')}
  documents = {}  # context -> (pieces, ids, piece start chars, piece end chars, orig_to_chartok, aligned fraction)
  for context in dict.fromkeys(e.context for e in examples):
    pieces = tokenizer.encode_pieces(context)
    starts, ends, orig_to_chartok, fraction = align_pieces(context, pieces, tokenizer)
    documents[context] = (pieces, [tokenizer.piece_to_id(p) for p in pieces], starts, ends, orig_to_chartok,
                          fraction)
  for example_index, example in enumerate(examples):
    pieces, doc_ids, starts, ends, orig_to_chartok, fraction = documents[example.context]
    if example.context and fraction < MIN_ALIGNED_FRACTION:
      _skip(skipped, example.qas_id, 'SQuAD example %s: only %.0f%% of the context aligns with its pieces; skipped',
            example.qas_id, 100 * fraction)
      continue

    answer_span = None
    if not example.is_impossible and example.answers:
      answer_span = _answer_piece_span(example, pieces, orig_to_chartok)
      if answer_span is None:
        message = f'SQuAD example {example.qas_id}: answer {example.answers[0]["text"]!r} cannot be placed'
        if is_training:
          _skip(skipped, example.qas_id, '%s; skipped', message)
          continue
        log.debug(message)

    query = queries[example_index][:max_query_length]
    doc_spans = task_features.doc_windows(len(doc_ids), max_seq_length - len(query) - 3, doc_stride)
    for window_index, (start, length) in enumerate(doc_spans):
      ids = [*doc_ids[start:start + length], tokenizer.sep_id, *query, tokenizer.sep_id, tokenizer.cls_id]
      segments = ([SQUAD_SEG_ID_P] * (length + 1) + [SQUAD_SEG_ID_Q] * (len(query) + 1) + [SQUAD_SEG_ID_CLS])
      rows.append((ids, segments))
      cls_index = len(ids) - 1
      in_window = answer_span is not None and start <= answer_span[0] and answer_span[1] <= start + length - 1
      arrays['cls_index'].append(cls_index)
      arrays['start_position'].append(answer_span[0] - start if in_window else cls_index)
      arrays['end_position'].append(answer_span[1] - start if in_window else cls_index)
      arrays['is_impossible'].append(0 if in_window else 1)
      arrays['example_index'].append(example_index)
      windows.append(dict(
          example_index=example_index, qas_id=example.qas_id, window_index=window_index, doc_start=start,
          doc_offset=0,
          paragraph_len=length, tok_start_to_orig=starts[start:start + length],
          tok_end_to_orig=ends[start:start + length],
          token_is_max_context={i: task_features.is_max_context(doc_spans, window_index, start + i)
                                for i in range(length)}))
  features = _pad_squad_rows(rows, windows, max_seq_length, tokenizer.pad_id)
  features.update({name: np.array(values, dtype=np.int32) for name, values in arrays.items()})
  return features, windows


# convert_examples(task, examples, tokenizer, max_seq_length, **kwargs): `task_features.convert_by_kind` with
# XLNet's converters above (SQuAD returns `(features, windows)`, every other kind a features dict).
convert_examples = functools.partial(task_features.convert_by_kind, pair=convert_pair_examples,
                                     multiple_choice=convert_multiple_choice_examples, token=convert_token_examples,
                                     squad=convert_squad_examples)
