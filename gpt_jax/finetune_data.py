"""GPT fine-tuning features: task examples (`common.tasks`) -> the GPT-1 input transformations as fixed-shape numpy
arrays (`gpt_jax.heads.transform`; Radford et al. 2018, section 3.3).

Every example becomes S sequences `<start> ... <extract>` of `max_seq_length` (L) tokens, PADDED ON THE RIGHT with
id 0 (mask 0); the head reads the state of each sequence's last real token:

  single text      <start> A <extract>                                              S = 1
  text pair        <start> A <delim> B <extract>                                    S = 1
  similarity pair  <start> A <delim> B <extract>, <start> B <delim> A <extract>     S = 2 (SIMILARITY_TASKS)
  multiple choice  <start> context <delim> question+ending_c <extract>, one per ending   S = C

Truncation: the longest segment loses its last token until the sequence fits (RACE first keeps only the last
`max_qa_length` question+ending tokens, as XLNet's `run_race.py`). Arrays (N rows):

  input_ids    [N, S, L] int32   token ids (0 past the end)
  segment_ids  [N, S, L] int32   zeros (GPT has no segment embedding)
  input_mask   [N, S, L] int32   1 = real token, 0 = padding
  label        [N] int32 class index (-1: none), or float32 score (NaN: none) for regression

The task tokens' ids follow the model's pretrained vocabulary (`heads.task_token_ids`); a `TaskTokenizer` carries
them with the byte-level BPE. Tagging and SQuAD have no GPT-1 transformation and are refused.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from common import task_features, tasks
from common.tasks import MultipleChoiceExample, PairExample
from gpt_jax import heads

SIMILARITY_TASKS = ('mrpc', 'qqp', 'stsb')  # Pairs without an inherent order: both orders, states summed.


class TaskTokenizer:
  """A byte-level BPE (`gpt_jax.tokenizer.ByteLevelBPETokenizer`) plus the three task tokens, whose ids
  (`task_ids`: start, delimiter, extract) follow the model's pretrained vocabulary."""

  def __init__(self, tokenizer, task_ids: dict[str, int]):
    self.tokenizer = tokenizer
    self.task_ids = dict(task_ids)
    self._task_names = {self.task_ids[name]: token for name, token in
                        zip(('start', 'delimiter', 'extract'), heads.TASK_TOKENS)}

  def encode(self, text: str) -> list[int]:
    return self.tokenizer.encode(text)

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    return self.tokenizer.encode_batch(texts)

  def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str]:
    """Token strings (byte-level characters; the task tokens by their names)."""
    table = self.tokenizer.id_to_token
    return [self._task_names.get(int(i)) or (table[i] if 0 <= i < len(table) else f'<|id_{i}|>') for i in ids]


def _features(kind: str, segments: Sequence[Sequence[Sequence[int]]], tokenizer: TaskTokenizer,
              max_seq_length: int) -> dict[str, np.ndarray]:
  """input_ids, segment_ids, input_mask `[N, S, L]` int32 of the examples' segments (see `heads.example_sequences`)."""
  batch = heads.batch_of_examples(kind, segments, tokenizer.task_ids, max_seq_length)
  return dict(input_ids=batch['input_ids'], segment_ids=np.zeros_like(batch['input_ids']),
              input_mask=batch['input_mask'])


def convert_pair_examples(examples: Sequence[PairExample], tokenizer: TaskTokenizer, max_seq_length: int, *,
                          regression: bool | None = None, similarity: bool = False) -> dict[str, np.ndarray]:
  """Single texts / text pairs -> `[N, S, L]` rows and label `[N]` (see `task_features.label_array`); with
  `similarity` a pair becomes both of its orders (S = 2; every example must then be a pair), else S = 1."""
  task_features.check_length(max_seq_length, 4)
  ids_a = tokenizer.encode_batch([e.text_a for e in examples])
  ids_b = tokenizer.encode_batch([e.text_b or '' for e in examples])
  if similarity and any(e.text_b is None for e in examples):
    raise ValueError('a similarity task needs text pairs; an example has no text_b')
  segments = [[a] if e.text_b is None else [a, b] for e, a, b in zip(examples, ids_a, ids_b)]
  features = _features('similarity' if similarity else 'classification', segments, tokenizer, max_seq_length)
  features['label'] = task_features.label_array([e.label for e in examples], regression)
  return features


def convert_multiple_choice_examples(examples: Sequence[MultipleChoiceExample], tokenizer: TaskTokenizer,
                                     max_seq_length: int, *, max_qa_length: int | None = None
                                     ) -> dict[str, np.ndarray]:
  """Multiple-choice examples -> `[N, C, L]` rows (choice c: context, then `join_question_ending(question,
  ending_c)`) and label `[N]` int32 (-1: none). Every example must have the same number of endings C."""
  task_features.check_length(max_seq_length, 4)
  if len({len(e.endings) for e in examples}) > 1:
    raise ValueError(f'examples have different numbers of endings: {sorted({len(e.endings) for e in examples})}')
  contexts = tokenizer.encode_batch([e.context for e in examples])
  qas = tokenizer.encode_batch([task_features.join_question_ending(e.question, ending) for e in examples
                                for ending in e.endings])
  segments, position = [], 0
  for example, context in zip(examples, contexts):
    choices = qas[position:position + len(example.endings)]
    position += len(example.endings)
    segments.append([context] + [qa[-max_qa_length:] if max_qa_length else qa for qa in choices])
  features = _features('multiple_choice', segments, tokenizer, max_seq_length)
  features['label'] = task_features.label_array([e.label for e in examples], regression=False)
  return features


def convert_encoder_examples(examples: Sequence[PairExample], tokenizer: TaskTokenizer,
                             max_seq_length: int) -> dict[str, np.ndarray]:
  """input_ids, segment_ids, input_mask `[N, L]` of sentences (pairs) laid out as classification lays them out
  (`<start> A (<delim> B) <extract>`), for feature extraction."""
  features = convert_pair_examples(examples, tokenizer, max_seq_length)
  return {name: features[name][:, 0] for name in ('input_ids', 'segment_ids', 'input_mask')}


def _unsupported(kind: str):
  def refuse(*args, **kwargs):
    raise ValueError(f'GPT fine-tuning has no {kind} input transformation (GLUE, SWAG and RACE are offered)')
  return refuse


def convert_examples(task: str, examples: Sequence, tokenizer: TaskTokenizer, max_seq_length: int, **kwargs):
  """`task`'s examples -> features by the converter of its kind (`task_features.convert_by_kind`); the pairs of a
  similarity task (`SIMILARITY_TASKS`) in both orders."""
  pair = convert_pair_examples
  if tasks.registry_name(task) in SIMILARITY_TASKS:
    pair = lambda *args, **options: convert_pair_examples(*args, similarity=True, **options)
  return task_features.convert_by_kind(task, examples, tokenizer, max_seq_length, pair=pair,
                                       multiple_choice=convert_multiple_choice_examples,
                                       token=_unsupported('tagging'), squad=_unsupported('SQuAD'))
