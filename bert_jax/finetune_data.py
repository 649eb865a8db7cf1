"""BERT fine-tuning features: task examples (`common.tasks`) -> fixed-shape numpy arrays.

Layouts follow google-research/bert (`run_classifier.py`, `run_squad.py`); every sequence is `max_seq_length` (L)
long, PADDED ON THE RIGHT with `[PAD]` (segment 0, mask 0):

  single text      [CLS] A [SEP]                  segment ids 0 ... 0
  text pair        [CLS] A [SEP] B [SEP]          segment ids 0 for [CLS] A [SEP], 1 for B [SEP]
  multiple choice  [CLS] context [SEP] question+ending [SEP], one row per ending
  SQuAD window     [CLS] question [SEP] document window [SEP]   (question: segment 0, window: segment 1)
  tagging          [CLS] w1 w2 ... [SEP]          segment ids 0

Truncation: a pair is cut to L - 3 tokens by `truncate_seq_pair` (the longer segment loses its last token first), a
single text to L - 2. Multiple choice uses the same rule, or with `max_qa_length` XLNet's RACE rule (keep the last
`max_qa_length` question+ending tokens, then as much of the context as fits). SQuAD documents longer than the window
are covered by sliding windows (`doc_stride`, `max_query_length`, see `convert_squad_examples`).

Every converter returns a dict of numpy arrays; common names (N = rows):

  input_ids    [N, L] int32   token ids
  segment_ids  [N, L] int32   0 / 1 as above
  input_mask   [N, L] int32   1 = real token, 0 = padding
  label        [N] int32 class index (-1: no label), or float32 score (NaN: no label) for regression

Multiple choice adds a choice axis (`[N, C, L]`); tagging and SQuAD have their own label arrays (documented on
their functions). Tokenizer: `bert_jax.tokenizer.WordPieceTokenizer` (anything with `encode_batch`, `encode`,
`cls_id`, `sep_id`, `pad_id`, `unk_id`).
"""
from __future__ import annotations

import functools
import logging
from typing import Sequence

import numpy as np

from common import task_features, tasks
from common.tasks import MultipleChoiceExample, PairExample, SquadExample, TokenExample

log = logging.getLogger(__name__)

IGNORE_LABEL = -100  # Label of sub-tokens, special tokens and padding in tagging (weight 0).


# ----------------------------------------------------------------------------------------------------------------------
# Sequence layout.
# ----------------------------------------------------------------------------------------------------------------------

def _layout(tokenizer, ids_a: Sequence[int], ids_b: Sequence[int] | None) -> tuple[list[int], list[int]]:
  """([CLS] A [SEP] (B [SEP]), segment ids) without padding."""
  ids = [tokenizer.cls_id, *ids_a, tokenizer.sep_id]
  segments = [0] * len(ids)
  if ids_b is not None:
    ids += [*ids_b, tokenizer.sep_id]
    segments += [1] * (len(ids_b) + 1)
  return ids, segments


def _pad_rows(rows: Sequence[tuple[list[int], list[int]]], max_seq_length: int, pad_id: int) -> dict[str, np.ndarray]:
  """(ids, segments) rows -> input_ids, segment_ids, input_mask `[len(rows), L]` int32, padded on the right."""
  n = len(rows)
  input_ids = np.full((n, max_seq_length), pad_id, dtype=np.int32)
  segment_ids = np.zeros((n, max_seq_length), dtype=np.int32)
  input_mask = np.zeros((n, max_seq_length), dtype=np.int32)
  for i, (ids, segments) in enumerate(rows):
    if len(ids) > max_seq_length:
      raise AssertionError(f'row {i} holds {len(ids)} tokens > max_seq_length={max_seq_length}')
    input_ids[i, :len(ids)] = ids
    segment_ids[i, :len(ids)] = segments
    input_mask[i, :len(ids)] = 1
  return dict(input_ids=input_ids, segment_ids=segment_ids, input_mask=input_mask)


# ----------------------------------------------------------------------------------------------------------------------
# Classification and regression.
# ----------------------------------------------------------------------------------------------------------------------

def convert_pair_examples(examples: Sequence[PairExample], tokenizer, max_seq_length: int, *,
                          regression: bool | None = None) -> dict[str, np.ndarray]:
  """Single texts / text pairs -> input_ids, segment_ids, input_mask `[N, L]` int32 and label `[N]`.

  label is int32 (class index, -1 when None) or, with `regression` (default: when any label is a float), float32
  (NaN when None).
  """
  return task_features.pair_features(examples, tokenizer, max_seq_length, _layout, _pad_rows, regression=regression)


# ----------------------------------------------------------------------------------------------------------------------
# Multiple choice (SWAG, RACE).
# ----------------------------------------------------------------------------------------------------------------------

def convert_multiple_choice_examples(examples: Sequence[MultipleChoiceExample], tokenizer, max_seq_length: int, *,
                                     max_qa_length: int | None = None) -> dict[str, np.ndarray]:
  """Multiple-choice examples -> input_ids, segment_ids, input_mask `[N, C, L]` int32, label `[N]` int32 (-1: None).

  Choice c of an example is `[CLS] context [SEP] join_question_ending(question, ending_c) [SEP]`. Every example must
  have the same number of endings C. `max_qa_length` selects RACE's truncation (see the module docstring; the
  original uses 128 with L = 512); None truncates the pair with `truncate_seq_pair` (SWAG).
  """
  return task_features.choice_features(examples, tokenizer, max_seq_length, _layout, _pad_rows,
                                  max_qa_length=max_qa_length)


# ----------------------------------------------------------------------------------------------------------------------
# Token classification (CoNLL NER).
# ----------------------------------------------------------------------------------------------------------------------

def convert_token_examples(examples: Sequence[TokenExample], tokenizer, max_seq_length: int,
                           label_list: Sequence[str] = tasks.CONLL2003_LABELS) -> dict[str, np.ndarray]:
  """Tagged sentences -> `[CLS] word pieces [SEP]`, the tag on the FIRST piece of each word.

  Returns input_ids, segment_ids (0), input_mask `[N, L]` int32 and
    label          [N, L] int32    tag index on a word's first piece; IGNORE_LABEL (-100) on its other pieces, on
                                   [CLS]/[SEP] and on padding
    label_weights  [N, L] float32  1.0 where label is a tag, else 0.0
    word_index     [N, L] int32    the word every piece belongs to (-1 for [CLS]/[SEP]/padding)
    num_words      [N] int32       words whose first piece fits in L - 2 tokens (the rest are cut; predict them 'O')
  A word with no pieces (only characters the tokenizer drops) becomes one `[UNK]`, so every kept word is labelled.
  """
  task_features.check_length(max_seq_length, 3)
  n = len(examples)
  rows = []
  labels = np.full((n, max_seq_length), IGNORE_LABEL, dtype=np.int32)
  word_index = np.full((n, max_seq_length), -1, dtype=np.int32)
  num_words = np.zeros(n, dtype=np.int32)
  for i, words in enumerate(task_features.tagged_pieces(examples, tokenizer, label_list, max_seq_length - 2)):
    ids = []
    for w, (tag, kept) in enumerate(words):
      position = 1 + len(ids)  # After [CLS].
      labels[i, position] = tag
      word_index[i, position:position + len(kept)] = w
      ids.extend(kept)
    num_words[i] = len(words)
    rows.append(_layout(tokenizer, ids, None))
  features = _pad_rows(rows, max_seq_length, tokenizer.pad_id)
  features.update(label=labels, label_weights=(labels != IGNORE_LABEL).astype(np.float32), word_index=word_index,
                  num_words=num_words)
  return features


# ----------------------------------------------------------------------------------------------------------------------
# SQuAD.
# ----------------------------------------------------------------------------------------------------------------------

def _improve_answer_span(doc_ids: Sequence[int], start: int, end: int, answer_ids: Sequence[int]) -> tuple[int, int]:
  """The tightest sub-span of doc_ids[start:end + 1] whose pieces equal the answer's own pieces (e.g. '1895' inside
  the word '(1895-1943).'), else (start, end) unchanged; as the original `_improve_answer_span`."""
  answer_ids = list(answer_ids)
  for new_start in range(start, end + 1):
    for new_end in range(end, new_start - 1, -1):
      if list(doc_ids[new_start:new_end + 1]) == answer_ids:
        return new_start, new_end
  return start, end


def _answer_word_span(example: SquadExample, words: list[str], char_to_word: list[int]) -> tuple[int, int] | None:
  """(first word, last word) of the example's first answer, or None when it cannot be found in the words."""
  answer = example.answers[0]
  text, start = answer['text'], answer['answer_start']
  end = start + len(text) - 1
  if not text or not 0 <= start <= end < len(char_to_word):
    return None
  first, last = max(char_to_word[start], 0), char_to_word[end]
  if last < first:
    return None
  found = ' '.join(words[first:last + 1])
  if ' '.join(text.split()) not in found:
    return None
  return first, last


def _split_documents(tokenizer, contexts: Sequence[str]) -> dict[str, tuple]:
  """context -> (words, char_to_word, word_char_spans, doc piece ids, piece -> word, word -> first piece) for every
  distinct context (SQuAD asks several questions per paragraph); all words are encoded in one batch."""
  unique = list(dict.fromkeys(contexts))
  splits = [task_features.whitespace_words(context) for context in unique]
  word_ids = iter(tokenizer.encode_batch([word for words, _, _ in splits for word in words]))
  documents = {}
  for context, (words, char_to_word, spans) in zip(unique, splits):
    tok_to_word, word_to_tok, doc_ids = [], [], []
    for w in range(len(words)):
      ids = next(word_ids)
      word_to_tok.append(len(doc_ids))
      tok_to_word.extend([w] * len(ids))
      doc_ids.extend(ids)
    documents[context] = (words, char_to_word, spans, doc_ids, tok_to_word, word_to_tok)
  return documents


def _answer_piece_span(example: SquadExample, document: tuple, tokenizer) -> tuple[int, int] | None | bool:
  """(first piece, last piece) in the document (`_split_documents`' entry) of the example's first answer; None when
  the question has none (or its pieces are empty); False when the answer cannot be found in the context words."""
  words, char_to_word, _, doc_ids, _, word_to_tok = document
  if example.is_impossible or not example.answers:
    return None
  word_span = _answer_word_span(example, words, char_to_word)
  if word_span is None:
    return False
  first, last = word_span
  start = word_to_tok[first]
  end = word_to_tok[last + 1] - 1 if last + 1 < len(words) else len(doc_ids) - 1
  if start > end:
    return None
  return _improve_answer_span(doc_ids, start, end, tokenizer.encode(example.answers[0]['text']))


def convert_squad_examples(examples: Sequence[SquadExample], tokenizer, max_seq_length: int = 384,
                           doc_stride: int = 128, max_query_length: int = 64, *, is_training: bool = False,
                           skipped: list | None = None) -> tuple[dict[str, np.ndarray], list[dict]]:
  """SQuAD examples -> one row per document window `[CLS] question [SEP] window [SEP]`, as BERT's `run_squad.py`.

  The context is split on whitespace into words (`task_features.whitespace_words`), each word into pieces; the
  question is cut to `max_query_length` pieces; windows of at most `L - len(question) - 3` pieces start `doc_stride`
  apart. The answer (the first of `answers`) is located by words, then narrowed to the pieces of its own text
  (`_improve_answer_span`). In a window that holds the whole answer, start/end_position point at its first/last
  piece; otherwise (answer outside the window, unanswerable question, no answer given) both point at [CLS] (0) and
  is_impossible is 1. An answer that cannot be found in the words is skipped with a warning in training (its qas_id
  appended to `skipped`); outside training the example keeps its windows, marked impossible.

  Returns (features, windows). features:
    input_ids, segment_ids, input_mask  [N, L] int32
    p_mask          [N, L] int32   1 = cannot be part of an answer (question, [SEP], padding); 0 on window tokens
                                   and on [CLS] (the no-answer position)
    cls_index       [N] int32      position of [CLS] (0)
    start_position, end_position  [N] int32
    is_impossible   [N] int32
    example_index   [N] int32      index into `examples` of the row's example
  windows: one dict per row (plain python, for mapping predictions back to text):
    example_index, qas_id, window_index
    doc_start       index of the window's first token among the document's tokens
    doc_offset      position of the window's first token in the row (len(question) + 2)
    paragraph_len   number of window tokens
    token_to_orig_map    {row position: word index} for window tokens (as the original)
    token_is_max_context {row position: bool}: this window gives the token its best context
    tok_start_to_orig, tok_end_to_orig   [paragraph_len] first / last character (inclusive) in the context of the
                    word each window token belongs to, so `context[tok_start_to_orig[s - doc_offset]:
                    tok_end_to_orig[e - doc_offset] + 1]` is the text of a predicted span (whole words)
    doc_words       the context's whitespace words (shared by the windows of an example)
  """
  task_features.check_length(max_seq_length, 4)
  queries = tokenizer.encode_batch([e.question for e in examples])
  rows, windows = [], []
  arrays = {name: [] for name in ('cls_index', 'start_position', 'end_position', 'is_impossible', 'example_index')}
  documents = _split_documents(tokenizer, [e.context for e in examples])
  for example_index, example in enumerate(examples):
    words, _, spans, doc_ids, tok_to_word, _ = documents[example.context]
    answer_span = _answer_piece_span(example, documents[example.context], tokenizer)
    if answer_span is False:
      message = (f'SQuAD example {example.qas_id}: answer {example.answers[0]["text"]!r} not found in the '
                 'context words')
      if is_training:
        log.warning('%s; skipped', message)
        if skipped is not None:
          skipped.append(example.qas_id)
        continue
      log.debug(message)
      answer_span = None

    query = queries[example_index][:max_query_length]
    doc_offset = len(query) + 2
    doc_spans = task_features.doc_windows(len(doc_ids), max_seq_length - len(query) - 3, doc_stride)
    for window_index, (start, length) in enumerate(doc_spans):
      ids, segments = _layout(tokenizer, query, doc_ids[start:start + length])
      rows.append((ids, segments))
      in_window = answer_span is not None and start <= answer_span[0] and answer_span[1] <= start + length - 1
      arrays['cls_index'].append(0)
      arrays['start_position'].append(answer_span[0] - start + doc_offset if in_window else 0)
      arrays['end_position'].append(answer_span[1] - start + doc_offset if in_window else 0)
      arrays['is_impossible'].append(0 if in_window else 1)
      arrays['example_index'].append(example_index)
      window_words = tok_to_word[start:start + length]
      windows.append(dict(
          example_index=example_index, qas_id=example.qas_id, window_index=window_index, doc_start=start,
          doc_offset=doc_offset,
          paragraph_len=length,
          token_to_orig_map={doc_offset + i: w for i, w in enumerate(window_words)},
          token_is_max_context={doc_offset + i: task_features.is_max_context(doc_spans, window_index, start + i)
                                for i in range(length)},
          tok_start_to_orig=[spans[w][0] for w in window_words], tok_end_to_orig=[spans[w][1] for w in window_words],
          doc_words=words))
  features = _pad_rows(rows, max_seq_length, tokenizer.pad_id)
  features['p_mask'] = np.ones_like(features['input_ids'])
  for row, window in enumerate(windows):  # 0 on [CLS] and on the window's tokens.
    features['p_mask'][row, [0, *range(window['doc_offset'], window['doc_offset'] + window['paragraph_len'])]] = 0
  features.update({name: np.array(values, dtype=np.int32) for name, values in arrays.items()})
  return features, windows


# convert_examples(task, examples, tokenizer, max_seq_length, **kwargs): `task_features.convert_by_kind` with
# BERT's converters above (SQuAD returns `(features, windows)`, every other kind a features dict).
convert_examples = functools.partial(task_features.convert_by_kind, pair=convert_pair_examples,
                                     multiple_choice=convert_multiple_choice_examples, token=convert_token_examples,
                                     squad=convert_squad_examples)
