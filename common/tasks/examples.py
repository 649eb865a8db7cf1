"""The examples every task reader returns (dataclasses, plain python fields) and the helpers the readers share.

  PairExample(guid, text_a, text_b | None, label)               GLUE; label: class index (int), float (STS-B), None
  MultipleChoiceExample(guid, context, question, endings, label) RACE, SWAG; label: index into endings, or None
  SquadExample(qas_id, question, context, answers, is_impossible) SQuAD v1.1 / v2.0; answers: [{'text', 'answer_start'}]
  TokenExample(guid, words, tags)                                CoNLL-2003 NER; one tag per word

Bad input never crashes a read: a bad row is counted in a `TaskReadStats`, logged with its file and line by
`BadRows` (the first `MAX_WARNINGS_PER_FILE` per file, then a summary) and skipped.
"""
from __future__ import annotations

import codecs
import dataclasses
import logging
import os
from typing import Any, Iterator, Sequence

import numpy as np

log = logging.getLogger(__name__)

MAX_WARNINGS_PER_FILE = 20
# What a malformed TFDS (or Hub) record raises while it is converted: counted as a bad row and skipped.
TFDS_RECORD_ERRORS = (UnicodeDecodeError, ValueError, KeyError, TypeError, IndexError)


@dataclasses.dataclass
class PairExample:
  """A single text or a text pair with a label: a class index (int), a score (float, regression) or None (test)."""
  guid: str
  text_a: str
  text_b: str | None
  label: int | float | None


@dataclasses.dataclass
class MultipleChoiceExample:
  """A context, a question (may be '' or hold a '_' blank) and candidate endings; label = index of the right one."""
  guid: str
  context: str
  question: str
  endings: list[str]
  label: int | None


@dataclasses.dataclass
class SquadExample:
  """A SQuAD question. answers: `[{'text': str, 'answer_start': int}]` with character offsets into `context` (empty
  for an unanswerable v2.0 question; several for dev files)."""
  qas_id: str
  question: str
  context: str
  answers: list[dict]
  is_impossible: bool = False


@dataclasses.dataclass
class TokenExample:
  """A sentence as words with one tag each (CoNLL NER tags such as 'B-PER', 'I-LOC', 'O')."""
  guid: str
  words: list[str]
  tags: list[str]


@dataclasses.dataclass
class TaskReadStats:
  """Counters filled by `read_task` / `tfds_task`. `bad_rows`: rows (lines, JSON records, RACE files, CoNLL lines)
  skipped as malformed; `dropped_examples`: examples lost with them when a bad row is part of a larger example (a
  CoNLL sentence); `warnings`: the messages logged for the first bad rows."""
  files: int = 0
  examples: int = 0
  bad_rows: int = 0
  dropped_examples: int = 0
  warnings: list[str] = dataclasses.field(default_factory=list)


class BadRows:
  """Counts bad rows of one file and logs the first `MAX_WARNINGS_PER_FILE` with file and line."""

  def __init__(self, path: str, stats: TaskReadStats):
    self.path, self.stats, self.count = path, stats, 0

  def __call__(self, where: Any, reason: str) -> None:
    self.count += 1
    self.stats.bad_rows += 1
    if self.count <= MAX_WARNINGS_PER_FILE:
      message = f'{self.path}:{where}: skipped: {reason}'
      self.stats.warnings.append(message)
      log.warning(message)

  def close(self) -> None:
    if self.count > MAX_WARNINGS_PER_FILE:
      message = f'{self.path}: {self.count} bad rows skipped in all ({self.count - MAX_WARNINGS_PER_FILE} not shown)'
      self.stats.warnings.append(message)
      log.warning(message)



def find_file(data_dir: str, names: Sequence[str]) -> str:
  for name in names:
    path = os.path.join(data_dir, name)
    if os.path.isfile(path):
      return path
  raise FileNotFoundError(f'none of {list(names)} found in {data_dir!r}')



def decoded_lines(path: str, bad: BadRows) -> Iterator[tuple[int, str]]:
  """(1-based line number, text without the line break) of every line that decodes as UTF-8 (BOM ignored)."""
  with open(path, 'rb') as f:
    for number, raw in enumerate(f, 1):
      if number == 1 and raw.startswith(codecs.BOM_UTF8):
        raw = raw[len(codecs.BOM_UTF8):]
      try:
        text = raw.decode('utf-8')
      except UnicodeDecodeError as e:
        bad(number, f'not UTF-8 ({e.reason} at byte {e.start})')
        continue
      yield number, text.rstrip('\r\n')



def text(value) -> str:
  """A TFDS text value (bytes, numpy bytes or str) as str; bytes that are not UTF-8 raise UnicodeDecodeError."""
  if isinstance(value, np.ndarray) and value.ndim == 0:
    value = value.item()
  if isinstance(value, str):
    return value
  if isinstance(value, (bytes, np.bytes_)):
    return bytes(value).decode('utf-8')
  raise TypeError(f'expected text, got {type(value).__name__}')


def expand(path: str) -> str:
  return os.path.expanduser(os.fspath(path))
