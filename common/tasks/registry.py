"""The task registry: one `TaskInfo` per task, registered by its benchmark's module (`glue`, `squad`, `conll`,
`race`, `swag`, `learnable`), and the names `--task` and the readers accept.

A task's `kind` is one of `common.task_kinds.KINDS` (classification, regression, token, multiple_choice, squad):
the head family it trains, its labels, loss and metrics. A task is read by `read` from its original files, by its
TFDS family's converter from `tfds_name` (`common.tasks.tfds`), or made by `generate` (a generated task needs no
files). `convert_options` are the defaults the models' feature converters get for it (RACE's `max_qa_length`, a
tagging task's label list).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

from common.config import UserError


@dataclasses.dataclass(frozen=True)
class TaskInfo:
  """name; kind: 'classification' | 'regression' | 'multiple_choice' | 'squad' | 'token'; labels: the label strings
  in index order (None for regression and span tasks); splits: the split names `read_task` accepts; spelling: the
  task as `--task` writes it; read(info, data_dir, split, stats) -> examples; tfds_name: its TFDS dataset (None:
  none), tfds_parts: the tasks whose TFDS datasets together make it (RACE's levels), tfds_missing: why it has no
  TFDS dataset; generate(split, limit, config) -> examples (a generated task); convert_options: see the module
  docstring."""
  name: str
  kind: str
  labels: tuple[str, ...] | None
  splits: tuple[str, ...]
  spelling: str = ''
  read: Callable[..., list] | None = None
  tfds_name: str | None = None
  tfds_parts: tuple[str, ...] = ()
  tfds_missing: str = ''
  generate: Callable[..., list] | None = None
  convert_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  @property
  def num_labels(self) -> int:
    return 1 if self.kind == 'regression' else len(self.labels or ())


TASKS: dict[str, TaskInfo] = {}
# TFDS family ('glue', 'squad', 'conll2003', 'race') -> converter(tfds name, tfds info, split) -> convert(record,
# index, bad) -> the record's examples.
TFDS_CONVERTERS: dict[str, Callable[..., Callable]] = {}

SPLIT_ALIASES = {'validation': 'dev', 'valid': 'dev', 'val': 'dev', 'eval': 'dev'}
TASK_ALIASES = {
    'sst-2': 'sst2', 'sts-b': 'stsb', 'mnli-m': 'mnli', 'mnli_matched': 'mnli', 'mnli-mm': 'mnli_mismatched',
    'diagnostic': 'ax', 'squad': 'squad_v1.1', 'squad1': 'squad_v1.1', 'squad_v1': 'squad_v1.1',
    'squad/v1.1': 'squad_v1.1', 'squad2': 'squad_v2.0', 'squad_v2': 'squad_v2.0', 'squad/v2.0': 'squad_v2.0',
    'conll': 'conll2003', 'race/high': 'race_high', 'race/middle': 'race_middle', 'race/all': 'race',
}


def register(*infos: TaskInfo) -> None:
  for info in infos:
    TASKS[info.name] = info


def canonical_task(task: str) -> str:
  """The registry name of `task` (case-insensitive; aliases such as 'SST-2', 'squad2', 'race/high' accepted)."""
  name = task.strip().lower()
  name = TASK_ALIASES.get(name, name)
  if name not in TASKS:
    raise ValueError(f'unknown task {task!r}; known tasks: {", ".join(sorted(TASKS))}')
  return name


def task_info(task: str) -> TaskInfo:
  return TASKS[canonical_task(task)]


def label_list(task: str) -> tuple[str, ...] | None:
  """The label strings of a classification / tagging task in index order; None for regression and span tasks."""
  return task_info(task).labels


def canonical_split(info: TaskInfo, split: str) -> str:
  name = split.strip().lower()
  name = SPLIT_ALIASES.get(name, name)
  if name not in info.splits:
    raise ValueError(f'task {info.name!r} has no split {split!r}; splits: {", ".join(info.splits)}')
  return name


# ----------------------------------------------------------------------------------------------------------------
# The names of the command line (`--task glue/mrpc`, `squad/v1.1`, `race/high`, `learnable`, ...).
# ----------------------------------------------------------------------------------------------------------------

def registry_name(task: str) -> str:
  """The registry spelling of a `--task` name (`glue/<name>` -> `<name>`; the others are aliases already)."""
  return task.split('/', 1)[1] if task.startswith('glue/') else task


def task_names() -> list[str]:
  """Every task as `--task` spells it: glue/<name>, squad/v1.1, race/high, conll2003, learnable, ..."""
  return sorted(info.spelling or info.name for info in TASKS.values())


def check_task(task: str) -> str:
  """`task` if it names a task; else a one-line UserError listing the spellings `--task` accepts."""
  try:
    canonical_task(registry_name(task))
  except ValueError:
    import difflib  # pylint: disable=import-outside-toplevel
    close = difflib.get_close_matches(task, task_names(), n=1)
    raise UserError(f'unknown task {task!r}{f" (did you mean {close[0]!r}?)" if close else ""}; known tasks: '
                    f'{", ".join(task_names())}') from None
  return task


def command_line_task(task: str) -> TaskInfo:
  """The registry entry of a `--task` name (checked as `check_task`)."""
  return task_info(registry_name(check_task(task)))
