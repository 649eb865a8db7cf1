"""What the models' feature converters share: the pieces that do not depend on a model's sequence layout.

A layout is `layout(tokenizer, ids_a, ids_b | None) -> (ids, segment ids)` without padding; a padder
`pad(rows, max_seq_length, pad_id) -> {input_ids, segment_ids, input_mask}`. `pair_features`, `choice_features` and
`tagged_pieces` build on them; `convert_by_kind` dispatches a task's examples to the model's converter of its kind
(`common.task_kinds`). The token-list helpers (`truncate_seq_pair`, `join_question_ending`, `whitespace_words`,
`doc_windows`, `is_max_context`) follow the original BERT / XLNet code.
"""
from __future__ import annotations

import re
from typing import Callable, Sequence

import numpy as np

from common import task_kinds, tasks


def truncate_seq_pair(tokens_a: list, tokens_b: list, max_length: int) -> None:
  """Truncates two token lists in place until together they hold at most `max_length` tokens, always cutting the
  end of the longer one (the second on a tie), as the original BERT and XLNet do."""
  while len(tokens_a) + len(tokens_b) > max_length:
    if len(tokens_a) > len(tokens_b):
      tokens_a.pop()
    else:
      tokens_b.pop()


def join_question_ending(question: str, ending: str) -> str:
  """The second segment of a multiple-choice input, as XLNet's `run_race.py`: the ending fills the question's '_'
  blank when it has one, else follows the question after a space (just the ending when the question is empty)."""
  if '_' in question:
    return question.replace('_', ending)
  return f'{question} {ending}' if question else ending


_SQUAD_WORD = re.compile('[^ \t\r\n\u202f]+')  # BERT run_squad.py's whitespace: space, tab, CR, LF, U+202F.


def whitespace_words(text: str) -> tuple[list[str], list[int], list[tuple[int, int]]]:
  """Splits `text` on whitespace as the original BERT `run_squad.py` does.

  Returns (words, char_to_word [len(text)]: the word each character belongs to, a whitespace character counting for
  the word before it (-1 before the first word), word_char_spans: (first char, last char) of each word, inclusive).
  """
  matches = list(_SQUAD_WORD.finditer(text))
  starts = np.array([m.start() for m in matches], dtype=np.int64)
  char_to_word = (np.searchsorted(starts, np.arange(len(text)), side='right') - 1).tolist()
  return [m.group() for m in matches], char_to_word, [(m.start(), m.end() - 1) for m in matches]


def doc_windows(num_tokens: int, max_tokens: int, doc_stride: int) -> list[tuple[int, int]]:
  """Sliding windows `(start, length)` over `num_tokens` document tokens, at most `max_tokens` each, the next starting
  `min(length, doc_stride)` after the previous, the last ending at the document's end. An empty document gets one
  empty window (so every example has a window to predict from)."""
  if max_tokens <= 0:
    raise ValueError(f'no room for document tokens: max_tokens={max_tokens} (raise max_seq_length or lower '
                     'max_query_length)')
  if doc_stride <= 0:
    raise ValueError(f'doc_stride must be positive, got {doc_stride}')
  windows, start = [], 0
  while True:
    length = min(num_tokens - start, max_tokens)
    windows.append((start, length))
    if start + length >= num_tokens:
      return windows
    start += min(length, doc_stride)


def is_max_context(windows: Sequence[tuple[int, int]], window_index: int, position: int) -> bool:
  """Whether window `window_index` gives document token `position` its best context among the windows that hold it:
  the largest min(left context, right context) + 0.01 * window length, the earliest window on a tie."""
  best_score, best_index = None, None
  for index, (start, length) in enumerate(windows):
    end = start + length - 1
    if start <= position <= end:
      score = min(position - start, end - position) + 0.01 * length
      if best_score is None or score > best_score:
        best_score, best_index = score, index
  return best_index == window_index


def check_length(max_seq_length: int, minimum: int) -> None:
  if max_seq_length < minimum:
    raise ValueError(f'max_seq_length={max_seq_length} is too short (at least {minimum})')


def label_array(labels: Sequence, regression: bool | None) -> np.ndarray:
  """label `[N]`: int32 class indices (None -> -1), or float32 scores (None -> NaN) when regressing (default: when
  any label is a float)."""
  if regression is None:
    regression = any(isinstance(label, float) for label in labels)
  if regression:
    return np.array([np.nan if label is None else float(label) for label in labels], dtype=np.float32)
  return np.array([-1 if label is None else int(label) for label in labels], dtype=np.int32)


def pair_features(examples: Sequence, tokenizer, max_seq_length: int, layout: Callable, pad: Callable, *,
                  regression: bool | None = None) -> dict[str, np.ndarray]:
  """Single texts / text pairs (`tasks.PairExample`) -> the padded rows and `label` (see `label_array`). A pair is
  cut to L - 3 tokens with `truncate_seq_pair` (the longer side loses its last token first), a single text to
  L - 2."""
  check_length(max_seq_length, 3)
  ids_a = tokenizer.encode_batch([e.text_a for e in examples])
  pairs = [i for i, e in enumerate(examples) if e.text_b is not None]
  ids_b: list = [None] * len(examples)
  for i, ids in zip(pairs, tokenizer.encode_batch([examples[i].text_b for i in pairs])):
    ids_b[i] = ids
  rows = []
  for a, b in zip(ids_a, ids_b):
    a = list(a)
    if b is None:
      rows.append(layout(tokenizer, a[:max_seq_length - 2], None))
    else:
      b = list(b)
      truncate_seq_pair(a, b, max_seq_length - 3)
      rows.append(layout(tokenizer, a, b))
  features = pad(rows, max_seq_length, tokenizer.pad_id)
  features['label'] = label_array([e.label for e in examples], regression)
  return features


def _choice_row(tokenizer, layout, context: list[int], qa: list[int], max_seq_length: int,
                max_qa_length: int | None):
  context, qa = list(context), list(qa)
  if max_qa_length is None:
    truncate_seq_pair(context, qa, max_seq_length - 3)
  else:  # XLNet's run_race.py: keep the end of question+option, then as much context as fits.
    qa = qa[-max_qa_length:] if len(qa) > max_qa_length else qa
    qa = qa[-(max_seq_length - 3):] if len(qa) > max_seq_length - 3 else qa
    context = context[:max_seq_length - 3 - len(qa)]
  return layout(tokenizer, context, qa)


def choice_features(examples: Sequence, tokenizer, max_seq_length: int, layout: Callable, pad: Callable, *,
                    max_qa_length: int | None = None) -> dict[str, np.ndarray]:
  """Multiple-choice examples -> the padded rows `[N, C, L]` and label `[N]` int32 (-1: None).

  Choice c of an example is the pair (context, `join_question_ending(question, ending_c)`); every example must have
  the same number of endings C. `max_qa_length` selects RACE's truncation (keep the last `max_qa_length`
  question+ending tokens, then as much context as fits); None truncates the pair with `truncate_seq_pair` (SWAG).
  Truncating one choice never shortens the context of the next.
  """
  check_length(max_seq_length, 4)
  num_choices = {len(e.endings) for e in examples}
  if len(num_choices) > 1:
    raise ValueError(f'examples have different numbers of endings: {sorted(num_choices)}')
  c = num_choices.pop() if num_choices else 0
  contexts = tokenizer.encode_batch([e.context for e in examples])
  qas = tokenizer.encode_batch([join_question_ending(e.question, ending) for e in examples
                                for ending in e.endings])
  rows = [_choice_row(tokenizer, layout, contexts[i], qas[i * c + j], max_seq_length, max_qa_length)
          for i in range(len(examples)) for j in range(c)]
  features = {name: array.reshape(len(examples), c, max_seq_length)
              for name, array in pad(rows, max_seq_length, tokenizer.pad_id).items()}
  features['label'] = label_array([e.label for e in examples], regression=False)
  return features


def tagged_pieces(examples: Sequence, tokenizer, label_list: Sequence[str], budget: int
                  ) -> list[list[tuple[int, list[int]]]]:
  """Per tagged sentence (`tasks.TokenExample`), `(tag index, piece ids)` of each word whose first piece fits in
  `budget` tokens, in order; the last kept word may lose its final pieces. Each word is encoded on its own; one
  with no pieces becomes `tokenizer.unk_id`. A sentence whose words and tags differ in number, or a tag not in
  `label_list`, raises ValueError."""
  tag_index = {tag: i for i, tag in enumerate(label_list)}
  pieces = iter(tokenizer.encode_batch([word for e in examples for word in e.words]))
  out = []
  for example in examples:
    if len(example.words) != len(example.tags):
      raise ValueError(f'example {example.guid}: {len(example.words)} words but {len(example.tags)} tags')
    words, used = [], 0
    for tag in example.tags:
      word_ids = next(pieces) or [tokenizer.unk_id]
      if tag not in tag_index:
        raise ValueError(f'example {example.guid}: tag {tag!r} is not in label_list {list(label_list)}')
      if used >= budget:
        continue  # Consume the remaining words' pieces.
      kept = list(word_ids[:budget - used])
      words.append((tag_index[tag], kept))
      used += len(kept)
    out.append(words)
  return out


def convert_by_kind(task: str, examples: Sequence, tokenizer, max_seq_length: int, *, pair: Callable,
                    multiple_choice: Callable, token: Callable, squad: Callable, **kwargs):
  """A model's converter of `task`'s kind applied to `examples`; keyword arguments go to it, over the defaults of
  the kind (regression or not) and of the task (RACE's `max_qa_length=128`, a tagging task's label list). SQuAD
  returns `(features, windows)`, every other kind a features dict."""
  info = tasks.task_info(task)
  kind = task_kinds.get(info.kind)
  converter = {'pair': pair, 'multiple_choice': multiple_choice, 'token': token, 'squad': squad}[kind.converter]
  return converter(examples, tokenizer, max_seq_length, **{**kind.convert_options, **info.convert_options, **kwargs})
