"""Fine-tuning tasks: the registry (`registry.TASKS`, one entry per task, registered by its benchmark's module) and
the readers, into plain examples that know nothing about BERT or XLNet (`examples`).

`read_task(task, data_dir, split)` reads the files the task's authors distribute (`glue`, `squad`, `conll`, `race`,
`swag` describe their formats); `tfds_task(task, split)` reads the same tasks from TensorFlow Datasets (`tfds`);
`learnable` is generated (`learnable`). Bad input never crashes a read: a row with the wrong number of columns, an
unknown label, text that is not UTF-8 or a malformed JSON record is counted in a `TaskReadStats`, logged with its
file and line (the first `MAX_WARNINGS_PER_FILE` per file, then a summary) and skipped. Only a missing file or an
unreadable SQuAD file (one file is the whole split) raises.
"""
from __future__ import annotations

from common.tasks import conll, glue, learnable, race, squad, swag
from common.tasks import examples as ex
from common.tasks.conll import CONLL2003_LABELS, read_conll
from common.tasks.examples import (MAX_WARNINGS_PER_FILE, MultipleChoiceExample, PairExample, SquadExample,
                                   TaskReadStats, TokenExample)
from common.tasks.glue import GLUE_LAYOUTS, TsvLayout, read_glue_tsv
from common.tasks.learnable import make_learnable_task
from common.tasks.race import read_race
from common.tasks.registry import (TASKS, TaskInfo, canonical_split, canonical_task, check_task, command_line_task,
                                   label_list, registry_name, task_info, task_names)
from common.tasks.squad import read_squad_json
from common.tasks.swag import read_swag_csv
from common.tasks.tfds import tfds_name_and_split, tfds_task

__all__ = ['CONLL2003_LABELS', 'GLUE_LAYOUTS', 'MAX_WARNINGS_PER_FILE', 'MultipleChoiceExample', 'PairExample',
           'SquadExample', 'TASKS', 'TaskInfo', 'TaskReadStats', 'TokenExample', 'TsvLayout', 'canonical_split',
           'canonical_task', 'check_task', 'command_line_task', 'label_list', 'make_learnable_task', 'read_conll',
           'read_glue_tsv', 'read_race', 'read_squad_json', 'read_swag_csv', 'read_task', 'registry_name',
           'task_info', 'task_names', 'tfds_name_and_split', 'tfds_task', 'conll', 'glue', 'learnable', 'race',
           'squad', 'swag']


def read_task(task: str, data_dir: str, split: str, stats: TaskReadStats | None = None) -> list:
  """Examples of one split of `task` read from its original files under `data_dir` (see the benchmark modules).

  Returns a list of `PairExample` / `SquadExample` / `TokenExample` / `MultipleChoiceExample`. Bad rows are counted
  in `stats` (pass a `TaskReadStats` to read the counts) and skipped. Raises ValueError for an unknown task or split
  (or a generated task, which has no files), FileNotFoundError naming the expected file(s) when they are missing.
  """
  info = task_info(task)
  split = canonical_split(info, split)
  if info.read is None:
    raise ValueError(f'task {info.name!r} has no files to read: it is generated')
  stats = stats if stats is not None else TaskReadStats()
  return info.read(info, ex.expand(data_dir), split, stats)
