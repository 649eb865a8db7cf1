"""CoNLL-2003 NER (`conll2003`): `train.txt`/`eng.train`, `valid.txt`/`dev.txt`/`eng.testa`, `test.txt`/`eng.testb`;
one token a line as `word POS chunk NER`, blank lines between sentences, `-DOCSTART-` lines between documents. Or
TFDS's `conll2003` (a sentence whose NER tags do not match its tokens one to one is bad).
"""
from __future__ import annotations

import codecs
from typing import Sequence

from common.tasks import examples as ex
from common.tasks import registry

CONLL2003_LABELS = ('O', 'B-PER', 'I-PER', 'B-ORG', 'I-ORG', 'B-LOC', 'I-LOC', 'B-MISC', 'I-MISC')
FILES = {'train': ('train.txt', 'eng.train'), 'dev': ('valid.txt', 'dev.txt', 'eng.testa'),
         'test': ('test.txt', 'eng.testb')}


def read(info: registry.TaskInfo, data_dir: str, split: str, stats: ex.TaskReadStats) -> list[ex.TokenExample]:
  del info
  return read_conll(ex.find_file(data_dir, FILES[split]), stats, label_set=CONLL2003_LABELS, guid_prefix=split)


def read_conll(path: str, stats: ex.TaskReadStats | None = None, label_set: Sequence[str] | None = CONLL2003_LABELS,
               guid_prefix: str = '') -> list[ex.TokenExample]:
  """`TokenExample`s of a CoNLL-2003 file: the word is the first column, the tag the last.

  Every token line of a file must have the column count of its first token line (4 in the original files: word, POS,
  chunk, NER); `-DOCSTART-` lines and blank lines end a sentence. A bad line (wrong column count, a tag outside
  `label_set`, not UTF-8) is counted and its whole sentence dropped (`stats.dropped_examples`), since a sentence
  with a hole in it would mislabel its neighbours. `label_set=None` accepts any tag.
  """
  stats = stats if stats is not None else ex.TaskReadStats()
  stats.files += 1
  bad = ex.BadRows(path, stats)
  allowed = set(label_set) if label_set is not None else None
  examples, words, tags, broken, columns = [], [], [], False, None
  start_line = 0

  def finish():
    nonlocal words, tags, broken
    if broken:
      stats.dropped_examples += 1
    elif words:
      examples.append(ex.TokenExample(guid=f'{guid_prefix}-{start_line}' if guid_prefix else str(start_line),
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




def _tfds_converter(name: str, info, split: str):
  del name
  tag_names = list(info.features['ner'].feature.names)
  unknown = sorted(set(tag_names) - set(CONLL2003_LABELS))
  if unknown:
    raise ValueError(f'TFDS conll2003 has NER tags outside CONLL2003_LABELS: {unknown}')
  return lambda record, index, bad: _tfds_record(record, index, split, tag_names)


def _tfds_record(record, index: int, split: str, tag_names: Sequence[str]) -> list[ex.TokenExample]:
  words = [ex.text(w) for w in record['tokens']]
  tags = []
  for value in record['ner']:
    if not 0 <= int(value) < len(tag_names):
      raise ValueError(f'NER tag {int(value)} is not one of 0-{len(tag_names) - 1}')
    tags.append(tag_names[int(value)])
  if len(words) != len(tags):
    raise ValueError(f'{len(words)} tokens but {len(tags)} NER tags')
  return [ex.TokenExample(guid=f'{split}-{index}', words=words, tags=tags)] if words else []


registry.register(registry.TaskInfo('conll2003', 'token', CONLL2003_LABELS, ('train', 'dev', 'test'),
                                    spelling='conll2003', read=read, tfds_name='conll2003',
                                    convert_options={'label_list': CONLL2003_LABELS}))
registry.TFDS_CONVERTERS['conll2003'] = _tfds_converter
