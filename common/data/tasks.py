"""The names `common.data.hf_datasets` (and its tests) import from here; the task readers and the registry are the
package `common.tasks` (one module per benchmark) now."""
from __future__ import annotations

from common.tasks import (GLUE_LAYOUTS, MultipleChoiceExample, PairExample, SquadExample, TaskReadStats,  # noqa: F401
                          TokenExample, label_list, read_task, task_info, tfds_name_and_split)
from common.tasks.examples import BadRows as _BadRows  # noqa: F401
from common.tasks.examples import TFDS_RECORD_ERRORS as _TFDS_RECORD_ERRORS  # noqa: F401
from common.tasks.glue import TFDS_GLUE_TEXT as _TFDS_GLUE_TEXT  # noqa: F401
from common.tasks.glue import tfds_converter as _tfds_glue_converter  # noqa: F401
from common.tasks.registry import canonical_split as _canonical_split  # noqa: F401
