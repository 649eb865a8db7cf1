"""Tasks from TensorFlow Datasets, read into the classes the file readers return, with the same checks.

`tfds_task(task, split, data_dir=None)` reads `glue/NAME`, `squad/v1.1`, `squad/v2.0`, `conll2003`, `race/high`,
`race/middle` (`race` reads both levels); each benchmark module registers the converter of its TFDS family in
`registry.TFDS_CONVERTERS`. TFDS is imported only when it is called (`pip install -e '.[tfds]'`), and TensorFlow is
kept off the GPUs (`common.data.tfds_import`).
"""
from __future__ import annotations

from common.data import tfds_import
from common.tasks import examples as ex
from common.tasks import registry


def _import_tfds():
  return tfds_import.import_tfds('Reading a task from TFDS')


def _tfds_dataset(info: registry.TaskInfo, task: str) -> str:
  """The TFDS dataset of a registered task; ValueError when it has none or several."""
  if info.tfds_name:
    return info.tfds_name
  if info.tfds_parts:
    parts = [registry.TASKS[part].tfds_name for part in info.tfds_parts]
    raise ValueError(f'TFDS holds {info.name} as {len(parts)} datasets, {" and ".join(parts)}: name one, or read '
                     f'all of them with tfds_task({task!r}, split)')
  raise ValueError(f'{task!r} has no TFDS dataset ({info.tfds_missing}): read its original files with read_task()')


def tfds_name_and_split(task: str, split: str) -> tuple[str, str]:
  """(TFDS dataset name, TFDS split) for one of our tasks (or a TFDS name) and split.

  'dev' becomes 'validation' for GLUE and SQuAD (CoNLL-2003 and RACE call it 'dev' in TFDS too); MNLI is always read
  from the `glue/mnli` config, whose 'dev' / 'test' are the matched sets for the task 'mnli' (and the TFDS name
  'glue/mnli_matched') and the mismatched sets for 'mnli_mismatched' ('glue/mnli_mismatched'). The task 'race' has
  two TFDS datasets, `race/middle` and `race/high` (`tfds_task` reads both); SWAG is not in the TFDS catalog.
  """
  name = task.strip().lower()
  split = split.strip().lower()
  split = registry.SPLIT_ALIASES.get(split, split)
  if not name.startswith('glue/'):
    name = _tfds_dataset(registry.task_info(name), task)
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
  info = registry.TASKS.get(registry.TASK_ALIASES.get(name, name))
  if info is not None and info.tfds_parts:  # Every part, in order (RACE: middle school first, as read_task).
    return [tfds_name_and_split(part, split) for part in info.tfds_parts]
  return [tfds_name_and_split(task, split)]


def tfds_task(task: str, split: str, data_dir: str | None = None, stats: ex.TaskReadStats | None = None) -> list:
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
  stats = stats if stats is not None else ex.TaskReadStats()
  sources = _tfds_sources(task, split)
  for name, _ in sources:
    if name.split('/', 1)[0] not in registry.TFDS_CONVERTERS:
      raise ValueError(f'unsupported TFDS task {task!r}: glue/*, squad/v1.1, squad/v2.0, conll2003, race/high, '
                       'race/middle')
  tfds = _import_tfds()
  examples = []
  for name, tfds_split in sources:
    dataset, info = tfds.load(name, split=tfds_split, data_dir=data_dir, with_info=True, shuffle_files=False)
    stats.files += 1
    convert = _tfds_converter(name, info, split.strip().lower())
    bad = ex.BadRows(f'tfds:{name}[{tfds_split}]', stats)
    count = 0
    for index, record in enumerate(tfds.as_numpy(dataset)):
      try:
        converted = convert(record, index, bad)
      except ex.TFDS_RECORD_ERRORS as e:
        bad(index, f'{type(e).__name__}: {e}')
        continue
      examples.extend(converted)
      count += len(converted)
    bad.close()
    stats.examples += count
  return examples


def _tfds_converter(name: str, info, split: str):
  """convert(record, index, bad) -> the record's examples (raises for a bad record; `bad` counts a bad part)."""
  split = registry.SPLIT_ALIASES.get(split, split)
  return registry.TFDS_CONVERTERS[name.split('/', 1)[0]](name, info, split)
