"""The names `common.data.hf_datasets` (and its tests) import from here; the task readers and the registry are the
package `common.tasks` (one module per benchmark) now."""
from __future__ import annotations

from common.tasks import (GLUE_LAYOUTS, MultipleChoiceExample, PairExample, SquadExample, TaskReadStats,
                          TokenExample, label_list, read_task, task_info, tfds_name_and_split)
from common.tasks.examples import BadRows as _BadRows
from common.tasks.examples import TFDS_RECORD_ERRORS as _TFDS_RECORD_ERRORS
from common.tasks.glue import TFDS_GLUE_TEXT as _TFDS_GLUE_TEXT
from common.tasks.glue import tfds_converter as _tfds_glue_converter
from common.tasks.registry import canonical_split as _canonical_split

__all__ = ['GLUE_LAYOUTS', 'MultipleChoiceExample', 'PairExample', 'SquadExample', 'TaskReadStats', 'TokenExample',
           'label_list', 'read_task', 'task_info', 'tfds_name_and_split', '_BadRows', '_TFDS_RECORD_ERRORS',
           '_TFDS_GLUE_TEXT', '_tfds_glue_converter', '_canonical_split']
