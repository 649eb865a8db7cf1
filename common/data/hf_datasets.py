"""Hugging Face `datasets` held on disk as pretraining corpora and as GLUE fine-tuning tasks, read offline.

Sources are named `hf:PATH[:SPLIT][#COLUMN]`:

* PATH is a directory written by `Dataset.save_to_disk` or `DatasetDict.save_to_disk` (SPLIT picks one split of a
  DatasetDict, default 'train'; a single Dataset takes no SPLIT), or a `.parquet` / `.arrow` file or a glob of them
  (read with pyarrow, no SPLIT; a glob is one source, its files in sorted order).
* COLUMN is the text column of a corpus, default 'text'.

Nothing here contacts the Hub: directories are opened with `datasets.load_from_disk` (memory-mapped, no cache
copy), files with pyarrow, so `HF_DATASETS_OFFLINE=1` changes nothing. `datasets` is imported only when a
`save_to_disk` directory is opened (`pip install -e '.[hf_datasets]'`). Local paths only.

Corpora: `iter_texts(source)` yields each row's text (str, bytes for a binary column, None for a missing value);
`common.data.corpus` makes one document of each row, its lines being the sentences exactly as in a text file, and
checks and counts the source like a file (`corpus.scan_files`). `identity(source)` stands in for a file's identity in
caches and fingerprints. A bad source (missing path, split or column, a column that does not hold text) is a
one-line `common.config.UserError` naming what exists.

Tasks: `read_task(task, path, split)` reads a GLUE task from a saved DatasetDict with the columns and split names
of the Hub's `glue` dataset (`sentence`, `sentence1`/`sentence2`, `question1`/`question2`, `premise`/`hypothesis`,
`question`/`sentence`, `label`, `idx`; `train`, `validation`, `test`, MNLI's `validation_matched`, ...) into the
`PairExample`s `common.tasks.read_task` returns, with the checks and label mapping of the TFDS reader
(class names mapped by name where they are ours, e.g. MNLI; label -1 = a test row = None). Labels stored as the
TSV files' strings (class names, scores) are accepted too. `common.finetune.load_examples` calls it for a
`--data_dir hf:PATH`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import glob as glob_lib
import os
import re
from typing import Iterator

from common.config import UserError

PREFIX = 'hf:'
DEFAULT_COLUMN = 'text'
DEFAULT_SPLIT = 'train'
FILE_SUFFIXES = ('.parquet', '.arrow')
_SPLIT_NAME = re.compile(r'[A-Za-z0-9_.-]+')
_GLOB_MAGIC = re.compile(r'[*?[]')
_BATCH_ROWS = 1024


def is_source(source) -> bool:
  """True for an `hf:...` source string."""
  return isinstance(source, str) and source.startswith(PREFIX)


@dataclasses.dataclass(frozen=True)
class Source:
  """A parsed `hf:PATH[:SPLIT][#COLUMN]`; `split` None when not given."""
  spec: str
  path: str
  split: str | None
  column: str

  @property
  def is_files(self) -> bool:
    """A parquet / arrow file or glob rather than a `save_to_disk` directory."""
    return self.path.endswith(FILE_SUFFIXES)


def parse_source(spec: str, default_column: str = DEFAULT_COLUMN) -> Source:
  """Parses `hf:PATH[:SPLIT][#COLUMN]`. The last `:NAME` is a split when NAME is a plain name (letters, digits,
  `_.-`) and PATH without it is not an existing path; `~` is expanded."""
  if not is_source(spec):
    raise ValueError(f'not an hf: source: {spec!r}')
  rest = spec[len(PREFIX):]
  rest, hash_sign, column = rest.rpartition('#') if '#' in rest else (rest, '', default_column)
  if hash_sign and not column:
    raise UserError(f'{spec}: empty column name after "#" (hf:PATH[:SPLIT][#COLUMN])')
  split = None
  head, colon, tail = rest.rpartition(':')
  if colon and head and _SPLIT_NAME.fullmatch(tail) and not os.path.exists(os.path.expanduser(rest)):
    rest, split = head, tail
  if not rest:
    raise UserError(f'{spec}: no path (hf:PATH[:SPLIT][#COLUMN])')
  if re.match(r'^[A-Za-z][A-Za-z0-9+.-]*://', rest):
    raise UserError(f'{spec}: hf: sources are read from local paths; copy the dataset to a local disk')
  return Source(spec=spec, path=os.path.expanduser(rest), split=split, column=column)


def _files(source: Source) -> list[str]:
  if _GLOB_MAGIC.search(source.path):
    files = sorted(p for p in glob_lib.glob(source.path) if os.path.isfile(p))
    if not files:
      raise FileNotFoundError(f'{source.spec}: no file matches the pattern {source.path!r}')
    return files
  if not os.path.isfile(source.path):
    raise FileNotFoundError(f'{source.spec}: no such file: {source.path!r}')
  return [source.path]


def check_exists(spec: str) -> None:
  """Raises FileNotFoundError naming `spec` when its path (or glob) names nothing; cheap, opens nothing."""
  source = parse_source(spec)
  if source.is_files:
    _files(source)
  elif not os.path.isdir(source.path):
    what = 'not a directory' if os.path.exists(source.path) else 'no such directory'
    raise FileNotFoundError(f'{spec}: {what}: {source.path!r} (expected a save_to_disk directory, or '
                            f'{"/".join(FILE_SUFFIXES)} files)')


def identity(spec: str) -> list:
  """A cheap identity of a source for caches and fingerprints: the parsed source plus (path, size, mtime) of every
  file of the dataset (of the chosen split's directory when it has one)."""
  source = parse_source(spec)
  if source.is_files:
    files = _files(source)
  else:
    root = source.path
    if source.split and os.path.isdir(os.path.join(root, source.split)):
      root = os.path.join(root, source.split)
    files = sorted(os.path.join(d, name) for d, _, names in os.walk(root) for name in names)
  stats = []
  for path in files:
    st = os.stat(path)
    stats.append([os.path.abspath(path), st.st_size, st.st_mtime_ns])
  return ['hf', os.path.abspath(source.path), source.split, source.column, stats]


# ----------------------------------------------------------------------------------------------------------------------
# Opening datasets.
# ----------------------------------------------------------------------------------------------------------------------

def _import_datasets():
  try:
    import datasets  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise UserError("reading an hf: source needs the Hugging Face datasets package: pip install -e '.[hf_datasets]'"
                    ) from e
  return datasets


def _import_pyarrow():
  try:
    import pyarrow  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise UserError("reading parquet or arrow files needs pyarrow: pip install -e '.[hf_datasets]'") from e
  return pyarrow


def load_saved(path: str, spec: str | None = None):
  """`datasets.load_from_disk(path)` (a Dataset or a DatasetDict), refusing a directory that is not one."""
  datasets = _import_datasets()
  name = spec or f'{PREFIX}{path}'
  if not os.path.isdir(path):
    raise FileNotFoundError(f'{name}: no such directory: {path!r}')
  try:
    return datasets.load_from_disk(path)
  except FileNotFoundError as e:  # Neither dataset_info.json/state.json nor dataset_dict.json.
    hint = ''
    for suffix in FILE_SUFFIXES:
      if glob_lib.glob(os.path.join(glob_lib.escape(path), '**', f'*{suffix}'), recursive=True):
        hint = f'; for the {suffix} files in it, name them: hf:{os.path.join(path, "...", "*" + suffix)}'
        break
    raise UserError(f'{name}: {path!r} is not a directory written by Dataset.save_to_disk or '
                    f'DatasetDict.save_to_disk{hint}') from e


def select_split(data, split: str | None, name: str, default: str | None = DEFAULT_SPLIT):
  """The Dataset of `split` in a DatasetDict (`default` when `split` is None), or `data` itself when it is a single
  Dataset and no split is asked for; `UserError` naming the splits there are otherwise."""
  splits = list(data.keys()) if isinstance(data, dict) else None  # A DatasetDict is a dict.
  if splits is None:
    if split is not None:
      raise UserError(f'{name}: holds a single Dataset, not a DatasetDict with splits; drop ":{split}"')
    return data
  wanted = split if split is not None else default
  if wanted not in splits:
    raise UserError(f'{name}: no split {wanted!r}; splits: {", ".join(splits) or "none"}')
  return data[wanted]


def _require_column(columns, column: str, name: str) -> None:
  if column not in columns:
    raise UserError(f'{name}: no column {column!r}; columns: {", ".join(columns) or "none"} '
                    '(name the text column with #COLUMN)')


def _check_text_type(arrow_type, column: str, name: str) -> None:
  pa = _import_pyarrow()
  if not (pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type)
          or pa.types.is_binary(arrow_type) or pa.types.is_large_binary(arrow_type)
          or getattr(pa.types, 'is_string_view', lambda t: False)(arrow_type)):
    raise UserError(f'{name}: column {column!r} holds {arrow_type}, not text; name the text column with #COLUMN')


@contextlib.contextmanager
def _open_arrow(path: str):
  """(schema, record batches) of one parquet or arrow (IPC stream, as datasets writes, or IPC file) file."""
  pa = _import_pyarrow()
  if path.endswith('.parquet'):
    import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
    with pq.ParquetFile(path) as reader:
      yield reader.schema_arrow, lambda column: reader.iter_batches(batch_size=_BATCH_ROWS, columns=[column])
    return
  with pa.memory_map(path) as raw:
    try:
      stream = pa.ipc.open_stream(raw)
    except pa.ArrowInvalid:
      stream = None
    if stream is not None:
      yield stream.schema, lambda column: (batch.select([column]) for batch in stream)
      return
    raw.seek(0)
    reader = pa.ipc.open_file(raw)
    yield reader.schema, lambda column: (reader.get_batch(i).select([column]) for i in range(reader.num_record_batches))


def _check_file_column(path: str, column: str, name: str) -> None:
  with _open_arrow(path) as (schema, _):
    _require_column(schema.names, column, f'{name} ({path})')
    _check_text_type(schema.field(column).type, column, name)


def iter_texts(spec: str) -> Iterator[str | bytes | None]:
  """Each row's value in the text column of a source, in order: str (a string column), bytes (a binary column) or
  None (a missing value). The dataset is opened and its split and column checked when this is called (before the
  first row), so a bad source fails early."""
  source = parse_source(spec)
  if source.is_files:
    if source.split is not None:
      raise UserError(f'{spec}: a file source has no splits; drop ":{source.split}"')
    files = _files(source)
    for path in files:
      _check_file_column(path, source.column, spec)
    return _file_texts(files, source.column)
  data = select_split(load_saved(source.path, spec), source.split, spec)
  _require_column(data.column_names, source.column, spec)
  _check_text_type(data.data.schema.field(source.column).type, source.column, spec)
  return _dataset_texts(data, source.column)


def _file_texts(files: list[str], column: str) -> Iterator[str | bytes | None]:
  for path in files:
    with _open_arrow(path) as (_, batches):
      for batch in batches(column):
        yield from batch.column(0).to_pylist()


def _dataset_texts(data, column: str) -> Iterator[str | bytes | None]:
  for batch in data.select_columns([column]).with_format('arrow').iter(batch_size=_BATCH_ROWS):
    yield from batch.column(0).to_pylist()


# ----------------------------------------------------------------------------------------------------------------------
# GLUE tasks.
# ----------------------------------------------------------------------------------------------------------------------

def read_task(task: str, path: str, split: str, stats=None) -> list:
  """`PairExample`s of one split of a GLUE task from a DatasetDict saved at `path` (`hf:` prefix optional).

  `split` is one of ours (`train`, `dev`, `test`, MNLI's `dev_mismatched`, ...; see `tasks.read_task`), mapped to
  the Hub's glue split names (`dev` -> `validation`, `validation_matched` / `validation_mismatched` for MNLI). Rows
  are checked as the TFDS reader checks records: a bad one (a label outside the label list, a non-finite score) is
  counted in `stats` (a `tasks.TaskReadStats`), logged and skipped. `UserError` for a task that is not GLUE, a path
  that is not a saved DatasetDict, a missing split (naming the splits there are) or missing text/label columns.
  """
  from common import tasks  # pylint: disable=import-outside-toplevel
  from common.tasks import examples as task_examples  # pylint: disable=import-outside-toplevel
  from common.tasks import glue as glue_tasks  # pylint: disable=import-outside-toplevel
  from common.tasks import registry as task_registry  # pylint: disable=import-outside-toplevel
  info = tasks.task_info(task)
  if info.kind not in ('classification', 'regression') or info.name not in (*tasks.GLUE_LAYOUTS, 'mnli_mismatched'):
    glue = ', '.join(f'glue/{name}' for name in (*tasks.GLUE_LAYOUTS, 'mnli_mismatched'))
    raise UserError(f'{info.name}: hf: datasets are read for the GLUE tasks ({glue}); read {info.name} from its '
                    'original files (--data_dir DIR) or from TFDS')
  split = task_registry.canonical_split(info, split)
  stats = stats if stats is not None else tasks.TaskReadStats()
  path = path[len(PREFIX):] if is_source(path) else path
  path = os.path.expanduser(path)
  name = f'{PREFIX}{path}'
  glue_name, hf_split = tasks.tfds_name_and_split(info.name, split)  # The Hub's glue uses TFDS's split names.
  config = glue_name.split('/', 1)[1]
  data = load_saved(path, name)
  if not isinstance(data, dict):
    raise UserError(f'{name}: holds a single Dataset; a task needs a DatasetDict with the splits train, validation, '
                    'test')
  dataset = select_split(data, hf_split, f'{name} ({info.name} {split})')
  key_a, key_b = glue_tasks.TFDS_GLUE_TEXT[config]
  for column in (key_a, key_b, 'label'):
    if column is not None:
      _require_column_for_task(dataset.column_names, column, f'{name} ({info.name} {split} = {hf_split})',
                               [c for c in (key_a, key_b, 'label') if c])
  convert = glue_tasks.tfds_converter(config, dataset, split)
  label_strings = getattr(dataset.features.get('label'), 'dtype', None) in ('string', 'large_string')
  if label_strings:  # Labels written as the TSV files write them ('entailment', '1', '3.800').
    convert = _with_string_labels(convert, tasks.label_list(info.name))
  bad = task_examples.BadRows(f'{name}[{hf_split}]', stats)
  stats.files += 1
  examples = []
  columns = [c for c in (key_a, key_b, 'label', 'idx') if c and c in dataset.column_names]
  for index, record in enumerate(dataset.select_columns(columns)):
    try:
      examples.extend(convert(record, index, bad))
    except task_examples.TFDS_RECORD_ERRORS as e:
      bad(index, f'{type(e).__name__}: {e}')
  bad.close()
  stats.examples += len(examples)
  return examples


def _require_column_for_task(columns, column: str, name: str, needed: list[str]) -> None:
  if column not in columns:
    raise UserError(f'{name}: no column {column!r}; columns: {", ".join(columns) or "none"} (GLUE columns as the '
                    f'Hub\'s glue dataset names them: {", ".join(needed)})')


def _with_string_labels(convert, labels):
  """`convert` for rows whose label is the string the GLUE TSV files hold: a class name of `labels`, a score for
  regression (`labels` None); '' or '-1' is an unlabelled test row. An unknown class name raises ValueError."""
  def converted(record, index, bad):
    raw = record['label']
    record = dict(record)
    if raw is None or raw.strip() in ('', '-1'):
      record['label'] = -1
    elif labels is None:
      record['label'] = float(raw)
    elif raw.strip() in labels:
      record['label'] = labels.index(raw.strip())
    else:
      raise ValueError(f'unknown label {raw!r} (labels: {", ".join(labels)})')
    return convert(record, index, bad)
  return converted
