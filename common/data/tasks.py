"""Fine-tuning task data in its original formats, read into plain examples that know nothing about BERT or XLNet.

Example classes (dataclasses, plain python fields):

  PairExample(guid, text_a, text_b | None, label)               GLUE; label: class index (int), float (STS-B), None
  MultipleChoiceExample(guid, context, question, endings, label) RACE, SWAG; label: index into endings, or None
  SquadExample(qas_id, question, context, answers, is_impossible) SQuAD v1.1 / v2.0; answers: [{'text', 'answer_start'}]
  TokenExample(guid, words, tags)                                CoNLL-2003 NER; one tag per word

`read_task(task, data_dir, split)` reads the files the task's authors distribute:

* GLUE (`cola sst2 mrpc qqp stsb mnli mnli_mismatched qnli rte wnli ax`): tab-separated, one row per line, the column
  layouts of the official GLUE files (`GLUE_LAYOUTS`): CoLA's train/dev have no header row, every other file has one;
  MNLI's dev/test are `dev_matched.tsv` / `test_matched.tsv` (`dev_mismatched` / `test_mismatched` as splits, or the
  task `mnli_mismatched`); test files carry no label (label None). `data_dir` is the task's directory (`glue/MNLI`)
  or the GLUE root holding the standard task directories (`CoLA`, `SST-2`, ..., `diagnostic`).
* SQuAD (`squad_v1.1`, `squad_v2.0`): `train-v1.1.json` / `dev-v1.1.json` / `...-v2.0.json` in `data_dir`.
* CoNLL-2003 (`conll2003`): `train.txt`/`eng.train`, `valid.txt`/`dev.txt`/`eng.testa`, `test.txt`/`eng.testb`;
  one token a line as `word POS chunk NER`, blank lines between sentences, `-DOCSTART-` lines between documents.
* RACE (`race`, `race_high`, `race_middle`): `data_dir/{train,dev,test}/{middle,high}/*.txt`, one JSON object a file
  (`article`, `questions`, `options`, `answers` as letters); one example per question.
* SWAG (`swag`): `train.csv`, `val.csv`, `test.csv` with a header (`sent1`, `sent2`, `ending0..3`, `label`; the
  test file has no label); context = sent1, question = sent2 (their concatenation is the `startphrase`).

Bad input never crashes a read: a row with the wrong number of columns, an unknown label, text that is not UTF-8 or
a malformed JSON record is counted in a `TaskReadStats`, logged with its file and line (the first
`MAX_WARNINGS_PER_FILE` per file, then a summary) and skipped. Only a missing file or an unreadable SQuAD file (one
file is the whole split) raises.

`tfds_task(task, split, data_dir=None)` reads the same tasks from TensorFlow Datasets (`glue/NAME`, `squad/v1.1`,
`squad/v2.0`, `conll2003`, `race/high`, `race/middle`; `race` reads both levels) into the same classes, with the same
checks (bad records are counted and skipped); TFDS is imported only when it is called (`pip install -e '.[tfds]'`),
and TensorFlow is kept off the GPUs.

Helpers shared by the BERT and XLNet feature converters live here too: `truncate_seq_pair`, `join_question_ending`,
`whitespace_words`, `doc_windows`, `is_max_context`. `make_learnable_task` generates a small classification set
from the embedded corpus whose label says whether a given word occurs (a task a working fine-tuner must learn).
"""
from __future__ import annotations

import codecs
import csv
import dataclasses
import functools
import glob
import json
import logging
import math
import os
import re
from typing import Any, Iterator, Sequence

import numpy as np

from common.data import tfds_import

log = logging.getLogger(__name__)

MAX_WARNINGS_PER_FILE = 20


# ----------------------------------------------------------------------------------------------------------------------
# Examples and read statistics.
# ----------------------------------------------------------------------------------------------------------------------

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


class _BadRows:
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


# ----------------------------------------------------------------------------------------------------------------------
# Task registry.
# ----------------------------------------------------------------------------------------------------------------------

CONLL2003_LABELS = ('O', 'B-PER', 'I-PER', 'B-ORG', 'I-ORG', 'B-LOC', 'I-LOC', 'B-MISC', 'I-MISC')
RACE_LEVELS = ('middle', 'high')  # The original reads middle school first.
NUM_CHOICES = {'race': 4, 'swag': 4}


@dataclasses.dataclass(frozen=True)
class TsvLayout:
  """Columns of one GLUE file: 0-based (negative: from the end) indices of text_a, text_b (None: single text), the
  label (None: test file) and the row id (None: use the line number); `columns`: the column count every row must have
  (None: that of the header row)."""
  header: bool
  text_a: int
  text_b: int | None
  label: int | None
  guid: int | None
  columns: int | None = None


@dataclasses.dataclass(frozen=True)
class TaskInfo:
  """name; kind: 'classification' | 'regression' | 'multiple_choice' | 'squad' | 'token_classification'; labels: the
  label strings in index order (None for regression and span tasks); splits: the split names `read_task` accepts."""
  name: str
  kind: str
  labels: tuple[str, ...] | None
  splits: tuple[str, ...]

  @property
  def num_labels(self) -> int:
    return 1 if self.kind == 'regression' else len(self.labels or ())


_PAIR = TsvLayout(True, 1, 2, 3, 0)              # index, text_a, text_b, label (QNLI, RTE, WNLI)
_PAIR_TEST = TsvLayout(True, 1, 2, None, 0)
# task -> (standard directory, labels, layout of train/dev, layout of test).
GLUE_LAYOUTS = {
    'cola': ('CoLA', ('0', '1'), TsvLayout(False, 3, None, 1, None, 4), TsvLayout(True, 1, None, None, 0)),
    'sst2': ('SST-2', ('0', '1'), TsvLayout(True, 0, None, 1, None), TsvLayout(True, 1, None, None, 0)),
    'mrpc': ('MRPC', ('0', '1'), TsvLayout(True, 3, 4, 0, None), TsvLayout(True, 3, 4, None, 0)),
    'qqp': ('QQP', ('0', '1'), TsvLayout(True, 3, 4, 5, 0), TsvLayout(True, 1, 2, None, 0)),
    'stsb': ('STS-B', None, TsvLayout(True, 7, 8, -1, 0), TsvLayout(True, 7, 8, None, 0)),
    'mnli': ('MNLI', ('contradiction', 'entailment', 'neutral'), TsvLayout(True, 8, 9, -1, 0),
             TsvLayout(True, 8, 9, None, 0)),
    'qnli': ('QNLI', ('entailment', 'not_entailment'), _PAIR, _PAIR_TEST),
    'rte': ('RTE', ('entailment', 'not_entailment'), _PAIR, _PAIR_TEST),
    'wnli': ('WNLI', ('0', '1'), _PAIR, _PAIR_TEST),
    'ax': ('diagnostic', ('contradiction', 'entailment', 'neutral'), _PAIR_TEST, _PAIR_TEST),
}
_MNLI_FILES = {'train': 'train.tsv', 'dev': 'dev_matched.tsv', 'test': 'test_matched.tsv',
               'dev_matched': 'dev_matched.tsv', 'test_matched': 'test_matched.tsv',
               'dev_mismatched': 'dev_mismatched.tsv', 'test_mismatched': 'test_mismatched.tsv'}
_SQUAD_VERSIONS = {'squad_v1.1': 'v1.1', 'squad_v2.0': 'v2.0'}
_CONLL_FILES = {'train': ('train.txt', 'eng.train'), 'dev': ('valid.txt', 'dev.txt', 'eng.testa'),
                'test': ('test.txt', 'eng.testb')}
_SWAG_FILES = {'train': 'train.csv', 'dev': 'val.csv', 'test': 'test.csv'}

_SPLIT_ALIASES = {'validation': 'dev', 'valid': 'dev', 'val': 'dev', 'eval': 'dev'}
_TASK_ALIASES = {
    'sst-2': 'sst2', 'sts-b': 'stsb', 'mnli-m': 'mnli', 'mnli_matched': 'mnli', 'mnli-mm': 'mnli_mismatched',
    'diagnostic': 'ax', 'squad': 'squad_v1.1', 'squad1': 'squad_v1.1', 'squad_v1': 'squad_v1.1',
    'squad/v1.1': 'squad_v1.1', 'squad2': 'squad_v2.0', 'squad_v2': 'squad_v2.0', 'squad/v2.0': 'squad_v2.0',
    'conll': 'conll2003', 'race/high': 'race_high', 'race/middle': 'race_middle', 'race/all': 'race',
}


def _build_registry() -> dict[str, TaskInfo]:
  tasks = {}
  for name, (_, labels, _, _) in GLUE_LAYOUTS.items():
    splits = ('test',) if name == 'ax' else ('train', 'dev', 'test')
    if name == 'mnli':
      splits = tuple(_MNLI_FILES)
    tasks[name] = TaskInfo(name, 'regression' if labels is None else 'classification', labels, splits)
  tasks['mnli_mismatched'] = TaskInfo('mnli_mismatched', 'classification', GLUE_LAYOUTS['mnli'][1],
                                      ('train', 'dev', 'test'))
  for name in _SQUAD_VERSIONS:
    tasks[name] = TaskInfo(name, 'squad', None, ('train', 'dev'))
  tasks['conll2003'] = TaskInfo('conll2003', 'token_classification', CONLL2003_LABELS, ('train', 'dev', 'test'))
  for name in ('race', 'race_high', 'race_middle'):
    tasks[name] = TaskInfo(name, 'multiple_choice', None, ('train', 'dev', 'test'))
  tasks['swag'] = TaskInfo('swag', 'multiple_choice', None, ('train', 'dev', 'test'))
  return tasks


TASKS = _build_registry()


def canonical_task(task: str) -> str:
  """The registry name of `task` (case-insensitive; aliases such as 'SST-2', 'squad2', 'race/high' accepted)."""
  name = task.strip().lower()
  name = _TASK_ALIASES.get(name, name)
  if name not in TASKS:
    raise ValueError(f'unknown task {task!r}; known tasks: {", ".join(sorted(TASKS))}')
  return name


def task_info(task: str) -> TaskInfo:
  return TASKS[canonical_task(task)]


def label_list(task: str) -> tuple[str, ...] | None:
  """The label strings of a classification / tagging task in index order; None for regression and span tasks."""
  return task_info(task).labels


def _canonical_split(info: TaskInfo, split: str) -> str:
  name = split.strip().lower()
  name = _SPLIT_ALIASES.get(name, name)
  if name not in info.splits:
    raise ValueError(f'task {info.name!r} has no split {split!r}; splits: {", ".join(info.splits)}')
  return name


# ----------------------------------------------------------------------------------------------------------------------
# Reading the original files.
# ----------------------------------------------------------------------------------------------------------------------

def read_task(task: str, data_dir: str, split: str, stats: TaskReadStats | None = None) -> list:
  """Examples of one split of `task` read from its original files under `data_dir` (see the module docstring).

  Returns a list of `PairExample` / `SquadExample` / `TokenExample` / `MultipleChoiceExample`. Bad rows are counted
  in `stats` (pass a `TaskReadStats` to read the counts) and skipped. Raises ValueError for an unknown task or split,
  FileNotFoundError naming the expected file(s) when they are missing.
  """
  info = task_info(task)
  split = _canonical_split(info, split)
  stats = stats if stats is not None else TaskReadStats()
  data_dir = os.path.expanduser(os.fspath(data_dir))
  if info.name in GLUE_LAYOUTS or info.name == 'mnli_mismatched':
    examples = _read_glue(info.name, data_dir, split, stats)
  elif info.kind == 'squad':
    examples = read_squad_json(_find_file(data_dir, [f'{split}-{_SQUAD_VERSIONS[info.name]}.json']), stats)
  elif info.name == 'conll2003':
    examples = read_conll(_find_file(data_dir, _CONLL_FILES[split]), stats, label_set=CONLL2003_LABELS,
                          guid_prefix=split)
  elif info.name.startswith('race'):
    levels = RACE_LEVELS if info.name == 'race' else (info.name.split('_')[1],)
    examples = read_race(data_dir, split, levels, stats)
  elif info.name == 'swag':
    examples = read_swag_csv(_find_file(data_dir, [_SWAG_FILES[split]]), stats, guid_prefix=split)
  else:  # pragma: no cover - every registered task is handled above.
    raise AssertionError(info.name)
  return examples


def _find_file(data_dir: str, names: Sequence[str]) -> str:
  for name in names:
    path = os.path.join(data_dir, name)
    if os.path.isfile(path):
      return path
  raise FileNotFoundError(f'none of {list(names)} found in {data_dir!r}')


def _decoded_lines(path: str, bad: _BadRows) -> Iterator[tuple[int, str]]:
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


# -- GLUE --------------------------------------------------------------------------------------------------------------

def _glue_file(task: str, data_dir: str, split: str) -> tuple[str, TsvLayout, tuple[str, ...] | None]:
  base = 'mnli' if task == 'mnli_mismatched' else task
  directory, labels, labelled, test = GLUE_LAYOUTS[base]
  if base == 'mnli':
    if task == 'mnli_mismatched' and split in ('dev', 'test'):
      split += '_mismatched'
    names = [_MNLI_FILES[split]]
  elif base == 'ax':
    names = ['diagnostic.tsv', 'AX.tsv']
  else:
    names = [f'{split}.tsv']
  if not any(os.path.isfile(os.path.join(data_dir, name)) for name in names) \
      and os.path.isdir(os.path.join(data_dir, directory)):
    data_dir = os.path.join(data_dir, directory)  # The GLUE root was given.
  layout = test if split.startswith('test') else labelled
  return _find_file(data_dir, names), layout, labels


def _read_glue(task: str, data_dir: str, split: str, stats: TaskReadStats) -> list[PairExample]:
  path, layout, labels = _glue_file(task, data_dir, split)
  return read_glue_tsv(path, layout, labels, stats, guid_prefix=split)


def read_glue_tsv(path: str, layout: TsvLayout, labels: Sequence[str] | None, stats: TaskReadStats | None = None,
                  guid_prefix: str = '') -> list[PairExample]:
  """`PairExample`s of one GLUE-style TSV file. Fields are split on tabs only (no quoting, as the GLUE files are
  written); labels are mapped to their index in `labels`, or parsed as floats when `labels` is None (STS-B)."""
  stats = stats if stats is not None else TaskReadStats()
  bad = _BadRows(path, stats)
  label_index = {label: i for i, label in enumerate(labels)} if labels is not None else None
  stats.files += 1
  examples, columns, header_seen = [], layout.columns, not layout.header
  for number, line in _decoded_lines(path, bad):
    row = line.split('\t')
    if not header_seen:
      header_seen = True
      columns = columns if columns is not None else len(row)
      continue
    if not line.strip():
      continue  # Blank lines carry nothing (a file's trailing newline, a stray empty line).
    if len(row) != columns:
      bad(number, f'{len(row)} columns, expected {columns}')
      continue
    label = None
    if layout.label is not None:
      raw = row[layout.label].strip()
      if label_index is None:
        try:
          label = float(raw)
        except ValueError:
          label = math.nan
        if not math.isfinite(label):
          bad(number, f'score {raw!r} is not a finite number')
          continue
      elif raw in label_index:
        label = label_index[raw]
      else:
        bad(number, f'unknown label {raw!r} (labels: {", ".join(labels)})')
        continue
    row_id = row[layout.guid] if layout.guid is not None else str(number)
    examples.append(PairExample(guid=f'{guid_prefix}-{row_id}' if guid_prefix else row_id, text_a=row[layout.text_a],
                                text_b=row[layout.text_b] if layout.text_b is not None else None, label=label))
  bad.close()
  stats.examples += len(examples)
  return examples


# -- SQuAD -------------------------------------------------------------------------------------------------------------

def read_squad_json(path: str, stats: TaskReadStats | None = None) -> list[SquadExample]:
  """`SquadExample`s of a SQuAD v1.1 / v2.0 JSON file, one per question, in file order.

  A question is bad (counted, skipped) when a field is missing or of the wrong type, when an answer's `answer_start`
  lies outside the context, or when an answerable question has no answer. `is_impossible` defaults to False (v1.1).
  Raises ValueError naming the file when it is not UTF-8 JSON with a `data` list.
  """
  stats = stats if stats is not None else TaskReadStats()
  try:
    with open(path, 'rb') as f:
      data = json.loads(f.read().decode('utf-8-sig'))['data']
    if not isinstance(data, list):
      raise TypeError('"data" is not a list')
  except (UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
    raise ValueError(f'{path!r} is not a SQuAD JSON file: {type(e).__name__}: {e}') from e
  stats.files += 1
  bad = _BadRows(path, stats)
  examples = []
  for a, article in enumerate(data):
    paragraphs = article.get('paragraphs') if isinstance(article, dict) else None
    if not isinstance(paragraphs, list):
      bad(f'data[{a}]', 'no "paragraphs" list')
      continue
    for p, paragraph in enumerate(paragraphs):
      where = f'data[{a}].paragraphs[{p}]'
      if not isinstance(paragraph, dict) or not isinstance(paragraph.get('context'), str) \
          or not isinstance(paragraph.get('qas'), list):
        bad(where, 'no "context" string or "qas" list')
        continue
      context = paragraph['context']
      for q, qa in enumerate(paragraph['qas']):
        example = _squad_question(qa, context)
        if isinstance(example, str):
          qas_id = qa.get('id') if isinstance(qa, dict) else None
          bad(f'{where}.qas[{q}]' + (f' (id {qas_id})' if qas_id else ''), example)
          continue
        examples.append(example)
  bad.close()
  stats.examples += len(examples)
  return examples


def _squad_question(qa: Any, context: str) -> SquadExample | str:
  """The example of one `qas` entry, or the reason it is bad."""
  if not isinstance(qa, dict):
    return 'not an object'
  for key in ('id', 'question'):
    if not isinstance(qa.get(key), str):
      return f'no "{key}" string'
  is_impossible = qa.get('is_impossible', False)
  if not isinstance(is_impossible, bool):
    return '"is_impossible" is not a boolean'
  raw_answers = qa.get('answers', [])
  if not isinstance(raw_answers, list):
    return '"answers" is not a list'
  answers = []
  for answer in raw_answers:
    if not isinstance(answer, dict) or not isinstance(answer.get('text'), str) \
        or not isinstance(answer.get('answer_start'), int) or isinstance(answer.get('answer_start'), bool):
      return 'an answer lacks a "text" string or an integer "answer_start"'
    if not 0 <= answer['answer_start'] <= len(context) - len(answer['text']):
      return f'answer_start {answer["answer_start"]} of {answer["text"]!r} lies outside the context'
    answers.append({'text': answer['text'], 'answer_start': answer['answer_start']})
  if not answers and not is_impossible:
    return 'an answerable question without answers'
  return SquadExample(qas_id=qa['id'], question=qa['question'], context=context,
                      answers=[] if is_impossible else answers, is_impossible=is_impossible)


# -- CoNLL-2003 --------------------------------------------------------------------------------------------------------

def read_conll(path: str, stats: TaskReadStats | None = None, label_set: Sequence[str] | None = CONLL2003_LABELS,
               guid_prefix: str = '') -> list[TokenExample]:
  """`TokenExample`s of a CoNLL-2003 file: the word is the first column, the tag the last.

  Every token line of a file must have the column count of its first token line (4 in the original files: word, POS,
  chunk, NER); `-DOCSTART-` lines and blank lines end a sentence. A bad line (wrong column count, a tag outside
  `label_set`, not UTF-8) is counted and its whole sentence dropped (`stats.dropped_examples`), since a sentence
  with a hole in it would mislabel its neighbours. `label_set=None` accepts any tag.
  """
  stats = stats if stats is not None else TaskReadStats()
  stats.files += 1
  bad = _BadRows(path, stats)
  allowed = set(label_set) if label_set is not None else None
  examples, words, tags, broken, columns = [], [], [], False, None
  start_line = 0

  def finish():
    nonlocal words, tags, broken
    if broken:
      stats.dropped_examples += 1
    elif words:
      examples.append(TokenExample(guid=f'{guid_prefix}-{start_line}' if guid_prefix else str(start_line),
                                   words=words, tags=tags))
    words, tags, broken = [], [], False

  with open(path, 'rb') as f:
    for number, raw in enumerate(f, 1):
      if number == 1 and raw.startswith(codecs.BOM_UTF8):
        raw = raw[len(codecs.BOM_UTF8):]
      try:
        line = raw.decode('utf-8').strip()
      except UnicodeDecodeError as e:
        bad(number, f'not UTF-8 ({e.reason} at byte {e.start})')
        broken = True
        continue
      if not line or line.startswith('-DOCSTART-'):
        finish()
        continue
      fields = line.split()
      if columns is None:
        columns = len(fields)
      if not words and not broken:
        start_line = number
      if len(fields) != columns or len(fields) < 2:
        bad(number, f'{len(fields)} columns, expected {columns} (word ... tag)')
        broken = True
        continue
      if allowed is not None and fields[-1] not in allowed:
        bad(number, f'unknown tag {fields[-1]!r}')
        broken = True
        continue
      words.append(fields[0])
      tags.append(fields[-1])
  finish()
  bad.close()
  stats.examples += len(examples)
  return examples


# -- RACE --------------------------------------------------------------------------------------------------------------

def read_race(data_dir: str, split: str, levels: Sequence[str] = RACE_LEVELS,
              stats: TaskReadStats | None = None) -> list[MultipleChoiceExample]:
  """`MultipleChoiceExample`s of `data_dir/split/<level>/*` (files sorted by name), one per question.

  context = the article, question = the question (a '_' marks a blank the option fills), endings = its 4 options,
  label = the answer letter's index. A file that is not UTF-8 JSON with these fields counts as one bad row (its
  questions are dropped); a question whose options are not 4 strings or whose answer letter is not one of them is a
  bad row on its own.
  """
  stats = stats if stats is not None else TaskReadStats()
  examples = []
  for level in levels:
    directory = os.path.join(data_dir, split, level)
    if not os.path.isdir(directory):
      raise FileNotFoundError(f'RACE directory {directory!r} does not exist')
    for path in sorted(glob.glob(os.path.join(directory, '*'))):
      if os.path.isfile(path):
        examples.extend(_race_file(path, level, stats))
  stats.examples += len(examples)
  return examples


def _race_file(path: str, level: str, stats: TaskReadStats) -> list[MultipleChoiceExample]:
  stats.files += 1
  bad = _BadRows(path, stats)
  try:
    with open(path, 'rb') as f:
      record = json.loads(f.read().decode('utf-8-sig'))
    article, questions = record['article'], record['questions']
    options, answers = record['options'], record['answers']
    if not (isinstance(article, str) and isinstance(questions, list) and isinstance(options, list)
            and isinstance(answers, list) and len(questions) == len(options) == len(answers)):
      raise TypeError('"article" must be a string and "questions", "options", "answers" lists of one length')
  except (UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as e:
    bad(1, f'not a RACE record: {type(e).__name__}: {e}')
    bad.close()
    return []
  file_id = str(record.get('id') or os.path.basename(path))
  examples = []
  for i, (question, choices, answer) in enumerate(zip(questions, options, answers)):
    if not isinstance(question, str) or not isinstance(choices, list) or len(choices) != NUM_CHOICES['race'] \
        or not all(isinstance(c, str) for c in choices):
      bad(f'question {i}', 'the question is not a string or its options are not 4 strings')
      continue
    label = ord(answer) - ord('A') if isinstance(answer, str) and len(answer) == 1 else -1
    if not 0 <= label < len(choices):
      bad(f'question {i}', f'answer {answer!r} is not one of the letters A-{chr(ord("A") + len(choices) - 1)}')
      continue
    examples.append(MultipleChoiceExample(guid=f'{level}/{file_id}-{i}', context=article, question=question,
                                          endings=list(choices), label=label))
  bad.close()
  return examples


# -- SWAG --------------------------------------------------------------------------------------------------------------

_SWAG_ENDINGS = tuple(f'ending{i}' for i in range(NUM_CHOICES['swag']))


def read_swag_csv(path: str, stats: TaskReadStats | None = None, guid_prefix: str = '') -> list[MultipleChoiceExample]:
  """`MultipleChoiceExample`s of a SWAG CSV file (the swagaf `train.csv` / `val.csv` / `test.csv`).

  Columns are found by the header names `sent1`, `sent2`, `ending0..3`, `label` (absent in test files) and
  `fold-ind` (the row id; the line number without it). context = sent1, question = sent2. A row whose column count
  differs from the header's or whose label is not 0-3 is bad.
  """
  stats = stats if stats is not None else TaskReadStats()
  stats.files += 1
  bad = _BadRows(path, stats)
  current_line = [0]  # The line the csv reader last consumed: a row's number is that of its last line.

  def lines():
    for number, line in _decoded_lines(path, bad):
      current_line[0] = number
      yield line + '\n'

  examples, header, reader = [], None, csv.reader(lines())
  while True:
    try:
      row = next(reader)
    except StopIteration:
      break
    except csv.Error as e:
      bad(current_line[0], f'not CSV: {e}')
      continue
    number = current_line[0]
    if header is None:
      header = {name.strip(): i for i, name in enumerate(row)}
      missing = [name for name in ('sent1', 'sent2') + _SWAG_ENDINGS if name not in header]
      if missing:
        bad(number, f'the header lacks the columns {missing}; nothing read')
        break
      continue
    if not row or (len(row) == 1 and not row[0].strip()):
      continue
    if len(row) != len(header):
      bad(number, f'{len(row)} columns, expected {len(header)}')
      continue
    label = None
    if 'label' in header:
      raw = row[header['label']].strip()
      if raw not in {str(i) for i in range(len(_SWAG_ENDINGS))}:
        bad(number, f'label {raw!r} is not one of 0-{len(_SWAG_ENDINGS) - 1}')
        continue
      label = int(raw)
    row_id = row[header['fold-ind']] if 'fold-ind' in header else str(number)
    examples.append(MultipleChoiceExample(
        guid=f'{guid_prefix}-{row_id}' if guid_prefix else row_id, context=row[header['sent1']],
        question=row[header['sent2']], endings=[row[header[name]] for name in _SWAG_ENDINGS], label=label))
  bad.close()
  stats.examples += len(examples)
  return examples


# ----------------------------------------------------------------------------------------------------------------------
# TensorFlow Datasets adapters.
# ----------------------------------------------------------------------------------------------------------------------

# GLUE config -> TFDS feature names of text_a, text_b.
_TFDS_GLUE_TEXT = {
    'cola': ('sentence', None), 'sst2': ('sentence', None), 'mrpc': ('sentence1', 'sentence2'),
    'qqp': ('question1', 'question2'), 'stsb': ('sentence1', 'sentence2'), 'mnli': ('premise', 'hypothesis'),
    'qnli': ('question', 'sentence'), 'rte': ('sentence1', 'sentence2'), 'wnli': ('sentence1', 'sentence2'),
    'ax': ('premise', 'hypothesis'),
}
_TFDS_NAMES = {'squad_v1.1': 'squad/v1.1', 'squad_v2.0': 'squad/v2.0', 'conll2003': 'conll2003',
               'race_high': 'race/high', 'race_middle': 'race/middle'}
_TFDS_RECORD_ERRORS = (UnicodeDecodeError, ValueError, KeyError, TypeError, IndexError)


def _import_tfds():
  return tfds_import.import_tfds('Reading a task from TFDS')


def _text(value) -> str:
  """A TFDS text value (bytes, numpy bytes or str) as str; bytes that are not UTF-8 raise UnicodeDecodeError."""
  if isinstance(value, np.ndarray) and value.ndim == 0:
    value = value.item()
  if isinstance(value, str):
    return value
  if isinstance(value, (bytes, np.bytes_)):
    return bytes(value).decode('utf-8')
  raise TypeError(f'expected text, got {type(value).__name__}')


def tfds_name_and_split(task: str, split: str) -> tuple[str, str]:
  """(TFDS dataset name, TFDS split) for one of our tasks (or a TFDS name) and split.

  'dev' becomes 'validation' for GLUE and SQuAD (CoNLL-2003 and RACE call it 'dev' in TFDS too); MNLI is always read
  from the `glue/mnli` config, whose 'dev' / 'test' are the matched sets for the task 'mnli' (and the TFDS name
  'glue/mnli_matched') and the mismatched sets for 'mnli_mismatched' ('glue/mnli_mismatched'). The task 'race' has
  two TFDS datasets, `race/middle` and `race/high` (`tfds_task` reads both); SWAG is not in the TFDS catalog.
  """
  name = task.strip().lower()
  split = split.strip().lower()
  split = _SPLIT_ALIASES.get(split, split)
  if not name.startswith('glue/'):
    canonical = canonical_task(name)
    if canonical in GLUE_LAYOUTS or canonical == 'mnli_mismatched':
      name = f'glue/{canonical}'
    elif canonical in _TFDS_NAMES:
      name = _TFDS_NAMES[canonical]
    elif canonical == 'race':
      raise ValueError("TFDS holds RACE as two datasets, race/middle and race/high: name one, or read both with "
                       "tfds_task('race', split)")
    else:
      raise ValueError(f'{task!r} has no TFDS dataset (SWAG is not in the TFDS catalog): read its original files '
                       'with read_task()')
  if name in ('glue/mnli', 'glue/mnli_matched', 'glue/mnli_mismatched'):
    kind = 'mismatched' if name.endswith('mismatched') else 'matched'
    name = 'glue/mnli'
    split = {'dev': f'validation_{kind}', 'test': f'test_{kind}', 'dev_matched': 'validation_matched',
             'dev_mismatched': 'validation_mismatched'}.get(split, split)
  elif name.startswith('glue/') or name.startswith('squad/'):
    split = {'dev': 'validation'}.get(split, split)
  return name, split


def _tfds_sources(task: str, split: str) -> list[tuple[str, str]]:
  name = task.strip().lower()
  if _TASK_ALIASES.get(name, name) == 'race':  # Both levels, middle school first (as read_task).
    return [tfds_name_and_split(level, split) for level in ('race_middle', 'race_high')]
  return [tfds_name_and_split(task, split)]


def tfds_task(task: str, split: str, data_dir: str | None = None, stats: TaskReadStats | None = None) -> list:
  """The examples of a TFDS dataset, in the classes `read_task` returns.

  task: one of our task names (`mnli`, `squad_v2.0`, `race`, ...) or a TFDS name (`glue/NAME`, `squad/v1.1`,
  `squad/v2.0`, `conll2003`, `race/high`, `race/middle`); split: a TFDS split or one of ours (see
  `tfds_name_and_split`); data_dir: TFDS's data directory (None: its default, `~/tensorflow_datasets`); the dataset
  is downloaded and prepared there on first use, as `tfds.load` does.

  The records are checked as `read_task` checks the original files, and a bad one is counted in `stats`, logged
  (the first `MAX_WARNINGS_PER_FILE` of each dataset) and skipped: text that is not UTF-8; a GLUE label outside the
  label list; a SQuAD answer whose `answer_start` lies outside the context, or an answerable question without an
  answer; a CoNLL-2003 sentence whose NER tags do not match its tokens one to one; a RACE record whose questions,
  option lists and answers differ in number, or (counted per question) a question without exactly 4 options or whose
  answer is not one of their letters. GLUE labels are mapped to `label_list(task)` by name where TFDS names them
  differently (MNLI orders its classes entailment, neutral, contradiction); TFDS marks test rows with the label -1,
  which becomes None (STS-B too). SWAG is not in the TFDS catalog: read its CSV files with `read_task('swag', ...)`.
  """
  stats = stats if stats is not None else TaskReadStats()
  sources = _tfds_sources(task, split)
  for name, _ in sources:
    if not name.startswith(('glue/', 'squad/', 'race/')) and name != 'conll2003':
      raise ValueError(f'unsupported TFDS task {task!r}: glue/*, squad/v1.1, squad/v2.0, conll2003, race/high, '
                       'race/middle')
  tfds = _import_tfds()
  examples = []
  for name, tfds_split in sources:
    dataset, info = tfds.load(name, split=tfds_split, data_dir=data_dir, with_info=True, shuffle_files=False)
    stats.files += 1
    convert = _tfds_converter(name, info, split.strip().lower())
    bad = _BadRows(f'tfds:{name}[{tfds_split}]', stats)
    count = 0
    for index, record in enumerate(tfds.as_numpy(dataset)):
      try:
        converted = convert(record, index, bad)
      except _TFDS_RECORD_ERRORS as e:
        bad(index, f'{type(e).__name__}: {e}')
        continue
      examples.extend(converted)
      count += len(converted)
    bad.close()
    stats.examples += count
  return examples


def _tfds_converter(name: str, info, split: str):
  """convert(record, index, bad) -> the record's examples (raises for a bad record; `bad` counts a bad part)."""
  split = _SPLIT_ALIASES.get(split, split)
  if name.startswith('glue/'):
    return _tfds_glue_converter(name.split('/', 1)[1], info, split)
  if name.startswith('squad/'):
    return _tfds_squad
  if name == 'conll2003':
    tag_names = list(info.features['ner'].feature.names)
    unknown = sorted(set(tag_names) - set(CONLL2003_LABELS))
    if unknown:
      raise ValueError(f'TFDS conll2003 has NER tags outside CONLL2003_LABELS: {unknown}')
    return lambda record, index, bad: _tfds_conll(record, index, split, tag_names)
  level = name.split('/', 1)[1]
  return lambda record, index, bad: _tfds_race(record, index, level, bad)


def _tfds_glue_converter(config: str, info, split: str):
  config = 'mnli' if config.startswith('mnli') else config
  if config not in _TFDS_GLUE_TEXT:
    raise ValueError(f'unsupported TFDS GLUE config {config!r}; known: {", ".join(_TFDS_GLUE_TEXT)}')
  labels = GLUE_LAYOUTS[config][1]
  key_a, key_b = _TFDS_GLUE_TEXT[config]
  names = list(getattr(info.features['label'], 'names', None) or []) if labels is not None else []
  by_name = bool(labels is not None and names and set(names) <= set(labels))  # e.g. MNLI: map names, not indices.
  classes = len(names) if names else len(labels or ())

  def convert(record, index, bad):
    del bad
    raw = record['label']
    if labels is None:
      score = float(raw)
      if not math.isfinite(score):
        raise ValueError(f'score {score} is not a finite number')
      label = None if score < 0 else score  # STS-B scores lie in [0, 5]; TFDS marks test rows -1.
    else:
      value = int(raw)
      if value >= classes:
        raise ValueError(f'label {value} is not one of 0-{classes - 1}')
      label = None if value < 0 else labels.index(names[value]) if by_name else value
    row_id = int(record['idx']) if 'idx' in record else index
    return [PairExample(guid=f'{split}-{row_id}', text_a=_text(record[key_a]),
                        text_b=_text(record[key_b]) if key_b else None, label=label)]

  return convert


def _tfds_squad(record, index: int, bad) -> list[SquadExample]:
  del index, bad
  answers = record.get('answers', {})
  texts, starts = list(answers.get('text', [])), list(answers.get('answer_start', []))
  if len(texts) != len(starts):
    raise ValueError(f'{len(texts)} answer texts but {len(starts)} answer starts')
  qa = {'id': _text(record['id']), 'question': _text(record['question']),
        'is_impossible': bool(record['is_impossible']) if 'is_impossible' in record else False,
        'answers': [{'text': _text(t), 'answer_start': int(s)} for t, s in zip(texts, starts)]}
  example = _squad_question(qa, _text(record['context']))  # The checks of the SQuAD JSON reader.
  if isinstance(example, str):
    raise ValueError(f'question {qa["id"]}: {example}')
  return [example]


def _tfds_conll(record, index: int, split: str, tag_names: Sequence[str]) -> list[TokenExample]:
  words = [_text(w) for w in record['tokens']]
  tags = []
  for value in record['ner']:
    if not 0 <= int(value) < len(tag_names):
      raise ValueError(f'NER tag {int(value)} is not one of 0-{len(tag_names) - 1}')
    tags.append(tag_names[int(value)])
  if len(words) != len(tags):
    raise ValueError(f'{len(words)} tokens but {len(tags)} NER tags')
  return [TokenExample(guid=f'{split}-{index}', words=words, tags=tags)] if words else []


def _tfds_race(record, index: int, level: str, bad) -> list[MultipleChoiceExample]:
  article = _text(record['article'])
  example_id = _text(record['example_id']) if 'example_id' in record else str(index)
  questions, options, answers = record['questions'], record['options'], record['answers']
  if not len(questions) == len(options) == len(answers):
    raise ValueError(f'{len(questions)} questions, {len(options)} option lists and {len(answers)} answers')
  examples = []
  for i, (question, choices, answer) in enumerate(zip(questions, options, answers)):
    where = f'{index} ({example_id}) question {i}'
    endings = [_text(o) for o in choices]
    if len(endings) != NUM_CHOICES['race']:
      bad(where, f'{len(endings)} options, expected {NUM_CHOICES["race"]}')
      continue
    letter = _text(answer).strip()
    label = ord(letter) - ord('A') if len(letter) == 1 else -1
    if not 0 <= label < len(endings):
      bad(where, f'answer {letter!r} is not one of the letters A-{chr(ord("A") + len(endings) - 1)}')
      continue
    examples.append(MultipleChoiceExample(guid=f'{level}/{example_id}-{i}', context=article,
                                          question=_text(question), endings=endings, label=label))
  return examples


# ----------------------------------------------------------------------------------------------------------------------
# Helpers shared by the feature converters (pure python on token lists).
# ----------------------------------------------------------------------------------------------------------------------

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


# ----------------------------------------------------------------------------------------------------------------------
# A generated task that a working fine-tuner must learn.
# ----------------------------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=4)
def _learnable_sentences(cache_dir: str, word: str, min_words: int, max_words: int) -> tuple[str, ...]:
  from common.data import corpus  # pylint: disable=import-outside-toplevel
  corpus.build_embedded_corpus(cache_dir)
  seen, sentences = set(), []
  for document in corpus.iter_documents(os.path.join(cache_dir, 'train.txt')):
    for sentence in document:
      if min_words <= len(sentence.split()) <= max_words and word.lower() not in sentence.lower() \
          and sentence not in seen:
        seen.add(sentence)
        sentences.append(sentence)
  if not sentences:
    raise ValueError(f'the embedded corpus has no sentence of {min_words}-{max_words} words without {word!r}')
  return tuple(sentences)


def make_learnable_task(num_examples: int, seed: int, word: str = 'pineapple', *, cache_dir: str | None = None,
                        min_words: int = 4, max_words: int = 24) -> list[PairExample]:
  """A binary classification set: label 1 when `word` occurs in `text_a`, else 0.

  Sentences of `min_words`-`max_words` words come from the embedded corpus (built once under `cache_dir`, default
  `corpus.default_cache_dir()/embedded_corpus`); none contains `word`. Exactly `num_examples // 2` examples are
  positive (`word` inserted at a random word position), the rest negative (the sentence unchanged), in random order.
  Deterministic in (`num_examples`, `seed`, `word`); sentences repeat only when `num_examples` exceeds the pool.
  Short sentences keep `word` inside any `max_seq_length` >= 64.
  """
  if num_examples <= 0:
    raise ValueError(f'num_examples must be positive, got {num_examples}')
  if not word or word.split() != [word]:
    raise ValueError(f'word must be one word without spaces, got {word!r}')
  from common.data import corpus  # pylint: disable=import-outside-toplevel
  cache_dir = cache_dir or os.path.join(corpus.default_cache_dir(), 'embedded_corpus')
  sentences = _learnable_sentences(os.path.abspath(cache_dir), word, min_words, max_words)
  rng = np.random.default_rng(seed)
  labels = np.zeros(num_examples, dtype=np.int64)
  labels[:num_examples // 2] = 1
  rng.shuffle(labels)
  picks = rng.choice(len(sentences), size=num_examples, replace=num_examples > len(sentences))
  examples = []
  for i, (label, pick) in enumerate(zip(labels, picks)):
    words = sentences[pick].split()
    if label:
      words.insert(int(rng.integers(0, len(words) + 1)), word)
    examples.append(PairExample(guid=f'learnable-{seed}-{i}', text_a=' '.join(words), text_b=None, label=int(label)))
  return examples
