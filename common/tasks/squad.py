"""SQuAD v1.1 / v2.0 (`squad_v1.1`, `squad_v2.0`): `train-v1.1.json` / `dev-v1.1.json` / `...-v2.0.json` in
`data_dir`, or TFDS's `squad/v1.1`, `squad/v2.0` (checked as the JSON files are).
"""
from __future__ import annotations

import json
from typing import Any

from common.tasks import examples as ex
from common.tasks import registry

VERSIONS = {'squad_v1.1': 'v1.1', 'squad_v2.0': 'v2.0'}


def read(info: registry.TaskInfo, data_dir: str, split: str, stats: ex.TaskReadStats) -> list[ex.SquadExample]:
  return read_squad_json(ex.find_file(data_dir, [f'{split}-{VERSIONS[info.name]}.json']), stats)


def read_squad_json(path: str, stats: ex.TaskReadStats | None = None) -> list[ex.SquadExample]:
  """`SquadExample`s of a SQuAD v1.1 / v2.0 JSON file, one per question, in file order.

  A question is bad (counted, skipped) when a field is missing or of the wrong type, when an answer's `answer_start`
  lies outside the context, or when an answerable question has no answer. `is_impossible` defaults to False (v1.1).
  Raises ValueError naming the file when it is not UTF-8 JSON with a `data` list.
  """
  stats = stats if stats is not None else ex.TaskReadStats()
  try:
    with open(path, 'rb') as f:
      data = json.loads(f.read().decode('utf-8-sig'))['data']
    if not isinstance(data, list):
      raise TypeError('"data" is not a list')
  except (UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
    raise ValueError(f'{path!r} is not a SQuAD JSON file: {type(e).__name__}: {e}') from e
  stats.files += 1
  bad = ex.BadRows(path, stats)
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


def _squad_question(qa: Any, context: str) -> ex.SquadExample | str:
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
  return ex.SquadExample(qas_id=qa['id'], question=qa['question'], context=context,
                      answers=[] if is_impossible else answers, is_impossible=is_impossible)




def _tfds_record(record, index: int, bad) -> list[ex.SquadExample]:
  del index, bad
  answers = record.get('answers', {})
  texts, starts = list(answers.get('text', [])), list(answers.get('answer_start', []))
  if len(texts) != len(starts):
    raise ValueError(f'{len(texts)} answer texts but {len(starts)} answer starts')
  qa = {'id': ex.text(record['id']), 'question': ex.text(record['question']),
        'is_impossible': bool(record['is_impossible']) if 'is_impossible' in record else False,
        'answers': [{'text': ex.text(t), 'answer_start': int(s)} for t, s in zip(texts, starts)]}
  example = _squad_question(qa, ex.text(record['context']))  # The checks of the SQuAD JSON reader.
  if isinstance(example, str):
    raise ValueError(f'question {qa["id"]}: {example}')
  return [example]


registry.register(*(registry.TaskInfo(name, 'squad', None, ('train', 'dev'), spelling=f'squad/{version}', read=read,
                                      tfds_name=f'squad/{version}') for name, version in VERSIONS.items()))
registry.TFDS_CONVERTERS['squad'] = lambda name, info, split: _tfds_record
