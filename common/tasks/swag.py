"""SWAG (`swag`): `train.csv`, `val.csv`, `test.csv` with a header (`sent1`, `sent2`, `ending0..3`, `label`; the
test file has no label); context = sent1, question = sent2 (their concatenation is the `startphrase`). SWAG is not in
the TFDS catalog.
"""
from __future__ import annotations

import csv

from common.tasks import examples as ex
from common.tasks import registry

FILES = {'train': 'train.csv', 'dev': 'val.csv', 'test': 'test.csv'}
ENDINGS = tuple(f'ending{i}' for i in range(4))


def read(info: registry.TaskInfo, data_dir: str, split: str,
         stats: ex.TaskReadStats) -> list[ex.MultipleChoiceExample]:
  del info
  return read_swag_csv(ex.find_file(data_dir, [FILES[split]]), stats, guid_prefix=split)


def read_swag_csv(path: str, stats: ex.TaskReadStats | None = None,
                  guid_prefix: str = '') -> list[ex.MultipleChoiceExample]:
  """`MultipleChoiceExample`s of a SWAG CSV file (the swagaf `train.csv` / `val.csv` / `test.csv`).

  Columns are found by the header names `sent1`, `sent2`, `ending0..3`, `label` (absent in test files) and
  `fold-ind` (the row id; the line number without it). context = sent1, question = sent2. A row whose column count
  differs from the header's or whose label is not 0-3 is bad.
  """
  stats = stats if stats is not None else ex.TaskReadStats()
  stats.files += 1
  bad = ex.BadRows(path, stats)
  current_line = [0]  # The line the csv reader last consumed: a row's number is that of its last line.

  def lines():
    for number, line in ex.decoded_lines(path, bad):
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
      missing = [name for name in ('sent1', 'sent2') + ENDINGS if name not in header]
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
      if raw not in {str(i) for i in range(len(ENDINGS))}:
        bad(number, f'label {raw!r} is not one of 0-{len(ENDINGS) - 1}')
        continue
      label = int(raw)
    row_id = row[header['fold-ind']] if 'fold-ind' in header else str(number)
    examples.append(ex.MultipleChoiceExample(
        guid=f'{guid_prefix}-{row_id}' if guid_prefix else row_id, context=row[header['sent1']],
        question=row[header['sent2']], endings=[row[header[name]] for name in ENDINGS], label=label))
  bad.close()
  stats.examples += len(examples)
  return examples


# ----------------------------------------------------------------------------------------------------------------------
# TensorFlow Datasets adapters.


registry.register(registry.TaskInfo('swag', 'multiple_choice', None, ('train', 'dev', 'test'), spelling='swag',
                                    read=read, tfds_missing='SWAG is not in the TFDS catalog'))
