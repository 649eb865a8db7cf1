"""GLUE (`cola sst2 mrpc qqp stsb mnli mnli_mismatched qnli rte wnli ax`): the TSV files and TFDS's `glue/*`.

Files: tab-separated, one row per line, the column layouts of the official GLUE files (`GLUE_LAYOUTS`): CoLA's
train/dev have no header row, every other file has one; MNLI's dev/test are `dev_matched.tsv` / `test_matched.tsv`
(`dev_mismatched` / `test_mismatched` as splits, or the task `mnli_mismatched`); test files carry no label (label
None). `data_dir` is the task's directory (`glue/MNLI`) or the GLUE root holding the standard task directories
(`CoLA`, `SST-2`, ..., `diagnostic`). TFDS: labels are mapped by name where TFDS names them differently (MNLI orders
its classes entailment, neutral, contradiction); TFDS marks test rows with the label -1, which becomes None.
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Sequence

from common.tasks import examples as ex
from common.tasks import registry


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
MNLI_FILES = {'train': 'train.tsv', 'dev': 'dev_matched.tsv', 'test': 'test_matched.tsv',
              'dev_matched': 'dev_matched.tsv', 'test_matched': 'test_matched.tsv',
              'dev_mismatched': 'dev_mismatched.tsv', 'test_mismatched': 'test_mismatched.tsv'}


def read(info: registry.TaskInfo, data_dir: str, split: str,
         stats: ex.TaskReadStats) -> list[ex.PairExample]:
  path, layout, labels = _glue_file(info.name, data_dir, split)
  return read_glue_tsv(path, layout, labels, stats, guid_prefix=split)


def _glue_file(task: str, data_dir: str, split: str) -> tuple[str, TsvLayout, tuple[str, ...] | None]:
  base = 'mnli' if task == 'mnli_mismatched' else task
  directory, labels, labelled, test = GLUE_LAYOUTS[base]
  if base == 'mnli':
    if task == 'mnli_mismatched' and split in ('dev', 'test'):
      split += '_mismatched'
    names = [MNLI_FILES[split]]
  elif base == 'ax':
    names = ['diagnostic.tsv', 'AX.tsv']
  else:
    names = [f'{split}.tsv']
  if not any(os.path.isfile(os.path.join(data_dir, name)) for name in names) \
      and os.path.isdir(os.path.join(data_dir, directory)):
    data_dir = os.path.join(data_dir, directory)  # The GLUE root was given.
  layout = test if split.startswith('test') else labelled
  return ex.find_file(data_dir, names), layout, labels


def read_glue_tsv(path: str, layout: TsvLayout, labels: Sequence[str] | None, stats: ex.TaskReadStats | None = None,
                  guid_prefix: str = '') -> list[ex.PairExample]:
  """`PairExample`s of one GLUE-style TSV file. Fields are split on tabs only (no quoting, as the GLUE files are
  written); labels are mapped to their index in `labels`, or parsed as floats when `labels` is None (STS-B)."""
  stats = stats if stats is not None else ex.TaskReadStats()
  bad = ex.BadRows(path, stats)
  label_index = {label: i for i, label in enumerate(labels)} if labels is not None else None
  stats.files += 1
  examples, columns, header_seen = [], layout.columns, not layout.header
  for number, line in ex.decoded_lines(path, bad):
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
    examples.append(ex.PairExample(guid=f'{guid_prefix}-{row_id}' if guid_prefix else row_id, text_a=row[layout.text_a],
                                text_b=row[layout.text_b] if layout.text_b is not None else None, label=label))
  bad.close()
  stats.examples += len(examples)
  return examples


# GLUE config -> TFDS feature names of text_a, text_b.
TFDS_GLUE_TEXT = {
    'cola': ('sentence', None), 'sst2': ('sentence', None), 'mrpc': ('sentence1', 'sentence2'),
    'qqp': ('question1', 'question2'), 'stsb': ('sentence1', 'sentence2'), 'mnli': ('premise', 'hypothesis'),
    'qnli': ('question', 'sentence'), 'rte': ('sentence1', 'sentence2'), 'wnli': ('sentence1', 'sentence2'),
    'ax': ('premise', 'hypothesis'),
}


def tfds_converter(config: str, info, split: str):
  config = 'mnli' if config.startswith('mnli') else config
  if config not in TFDS_GLUE_TEXT:
    raise ValueError(f'unsupported TFDS GLUE config {config!r}; known: {", ".join(TFDS_GLUE_TEXT)}')
  labels = GLUE_LAYOUTS[config][1]
  key_a, key_b = TFDS_GLUE_TEXT[config]
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
    return [ex.PairExample(guid=f'{split}-{row_id}', text_a=ex.text(record[key_a]),
                           text_b=ex.text(record[key_b]) if key_b else None, label=label)]

  return convert


def _tfds_family_converter(name: str, info, split: str):
  return tfds_converter(name.split('/', 1)[1], info, split)


def _entries() -> list[registry.TaskInfo]:
  entries = []
  for name, (_, labels, _, _) in GLUE_LAYOUTS.items():
    splits = ('test',) if name == 'ax' else ('train', 'dev', 'test')
    if name == 'mnli':
      splits = tuple(MNLI_FILES)
    entries.append(registry.TaskInfo(name, 'regression' if labels is None else 'classification', labels, splits,
                                     spelling=f'glue/{name}', read=read, tfds_name=f'glue/{name}'))
  entries.append(registry.TaskInfo('mnli_mismatched', 'classification', GLUE_LAYOUTS['mnli'][1],
                                   ('train', 'dev', 'test'), spelling='glue/mnli_mismatched', read=read,
                                   tfds_name='glue/mnli_mismatched'))
  return entries


registry.register(*_entries())
registry.TFDS_CONVERTERS['glue'] = _tfds_family_converter
