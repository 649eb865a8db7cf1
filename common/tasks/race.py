"""RACE (`race`, `race_high`, `race_middle`): `data_dir/{train,dev,test}/{middle,high}/*.txt`, one JSON object a
file (`article`, `questions`, `options`, `answers` as letters); one example per question. Or TFDS's `race/high` and
`race/middle` (`race` reads both levels, middle school first, as the files).
"""
from __future__ import annotations

import glob
import json
import os
from typing import Any, Sequence

from common.tasks import examples as ex
from common.tasks import registry

LEVELS = ('middle', 'high')  # The original reads middle school first.
NUM_CHOICES = 4


def read(info: registry.TaskInfo, data_dir: str, split: str,
         stats: ex.TaskReadStats) -> list[ex.MultipleChoiceExample]:
  levels = LEVELS if info.name == 'race' else (info.name.split('_')[1],)
  return read_race(data_dir, split, levels, stats)


def read_race(data_dir: str, split: str, levels: Sequence[str] = LEVELS,
              stats: ex.TaskReadStats | None = None) -> list[ex.MultipleChoiceExample]:
  """`MultipleChoiceExample`s of `data_dir/split/<level>/*` (files sorted by name), one per question.

  context = the article, question = the question (a '_' marks a blank the option fills), endings = its 4 options,
  label = the answer letter's index. A file that is not UTF-8 JSON with these fields counts as one bad row (its
  questions are dropped); a question whose options are not 4 strings or whose answer letter is not one of them is a
  bad row on its own.
  """
  stats = stats if stats is not None else ex.TaskReadStats()
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


def _question(guid: str, article: str, question: Any, endings: Any, answer: Any, bad, where: Any
              ) -> ex.MultipleChoiceExample | None:
  """The example of one question, or None (counted in `bad`) when its options are not 4 strings or its answer is not
  one of their letters."""
  if not isinstance(question, str) or not isinstance(endings, list) or len(endings) != NUM_CHOICES \
      or not all(isinstance(c, str) for c in endings):
    bad(where, f'the question is not a string or its options are not {NUM_CHOICES} strings')
    return None
  label = ord(answer) - ord('A') if isinstance(answer, str) and len(answer) == 1 else -1
  if not 0 <= label < len(endings):
    bad(where, f'answer {answer!r} is not one of the letters A-{chr(ord("A") + len(endings) - 1)}')
    return None
  return ex.MultipleChoiceExample(guid=guid, context=article, question=question, endings=list(endings), label=label)


def _race_file(path: str, level: str, stats: ex.TaskReadStats) -> list[ex.MultipleChoiceExample]:
  stats.files += 1
  bad = ex.BadRows(path, stats)
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
  found = [_question(f'{level}/{file_id}-{i}', article, question, choices, answer, bad, f'question {i}')
           for i, (question, choices, answer) in enumerate(zip(questions, options, answers))]
  bad.close()
  return [example for example in found if example is not None]


def _tfds_record(record, index: int, level: str, bad) -> list[ex.MultipleChoiceExample]:
  article = ex.text(record['article'])
  example_id = ex.text(record['example_id']) if 'example_id' in record else str(index)
  questions, options, answers = record['questions'], record['options'], record['answers']
  if not len(questions) == len(options) == len(answers):
    raise ValueError(f'{len(questions)} questions, {len(options)} option lists and {len(answers)} answers')
  found = []
  for i, (question, choices, answer) in enumerate(zip(questions, options, answers)):
    where = f'{index} ({example_id}) question {i}'
    endings = [ex.text(o) for o in choices]
    if len(endings) != NUM_CHOICES:
      bad(where, f'{len(endings)} options, expected {NUM_CHOICES}')
      continue
    found.append(_question(f'{level}/{example_id}-{i}', article, ex.text(question), endings,
                           ex.text(answer).strip(), bad, where))
  return [example for example in found if example is not None]


def _tfds_converter(name: str, info, split: str):
  del info, split
  level = name.split('/', 1)[1]
  return lambda record, index, bad: _tfds_record(record, index, level, bad)


registry.register(
    registry.TaskInfo('race', 'multiple_choice', None, ('train', 'dev', 'test'), spelling='race', read=read,
                      tfds_parts=('race_middle', 'race_high'), convert_options={'max_qa_length': 128}),
    *(registry.TaskInfo(f'race_{level}', 'multiple_choice', None, ('train', 'dev', 'test'), spelling=f'race/{level}',
                        read=read, tfds_name=f'race/{level}', convert_options={'max_qa_length': 128})
      for level in LEVELS))
registry.TFDS_CONVERTERS['race'] = _tfds_converter
