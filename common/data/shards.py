"""ArrayRecord shards of small numeric records: a compact codec, parallel writers, metadata.json, random access.

A record is a dict of numpy arrays and scalars (token ids, positions, labels). Every shard directory holds

  shard-00000-of-00008.array_record ... shard-00007-of-00008.array_record
  metadata.json   written last, so its presence means the shards are complete

and every record in it follows one *schema*: an ordered mapping `name -> (dtype, shape)` where `shape` is a tuple of
ints and `None`s (variable dimensions), e.g. `{'input_ids': ('uint16', (None,)), 'label': ('int32', ())}`.

Record byte format (version 1), everything little-endian, features in schema order:

  byte 0                  format version (1)
  uint32 x (#None dims)   the length of every variable dimension, feature after feature
  raw bytes               each feature's array in C order and the schema dtype, feature after feature

No names, dtypes or fixed dims are repeated per record (they live in `metadata.json`), so a 128-token record of
uint16 ids costs 1 + 4 + 256 bytes (ArrayRecord then adds its chunk framing: with `group_size:1`, the setting for
random access, that was 100-160 bytes per record in our measurements). Decoding is a few `np.frombuffer` calls.

`metadata.json` holds: `format`, `fingerprint` (a hash of every input and setting that produced the shards; a writer
called again with the same fingerprint reuses the shards instead of rewriting them), `num_records`, `shards` (file
name and record count of each, in global-record-id order), `features` (the schema, a list of `{name, dtype, shape}`
in record order), `stats` (per-feature totals plus whatever counters the record generator returned) and `info`
(free-form, from the caller).

Writing: `write_shards(out_dir, tasks, make_records, features, ...)` writes shard `i` from the records that
`make_records(tasks[i])` yields. Shards are split over `num_workers` processes (worker `w` writes shards `w, w + W,
...`), started with the `spawn` method so it is safe from a parent that has already initialised JAX or threads;
`make_records` must be a module-level function and each task picklable (and, as always with `spawn`, the main
script must guard its entry point with `if __name__ == '__main__'`). The records of shard `i` depend only on
`tasks[i]`, so the output is identical whatever `num_workers` is. A tqdm progress bar is shown when stderr is a TTY.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import sys
import time
import traceback
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np

from common import storage

FORMAT = 'common.data.shards/1'
_VERSION = 1
METADATA_FILE = 'metadata.json'
DEFAULT_WRITER_OPTIONS = 'group_size:1'  # group_size 1 = one record per chunk: fast random access.

Features = Mapping[str, tuple[str, tuple]]


# ----------------------------------------------------------------------------------------------------------------------
# Schema and codec.
# ----------------------------------------------------------------------------------------------------------------------

def normalize_features(features: Features) -> dict[str, tuple[np.dtype, tuple]]:
  """Checks a schema and returns it with numpy dtypes and tuple shapes (little-endian dtypes only)."""
  out = {}
  for name, (dtype, shape) in features.items():
    dt = np.dtype(dtype).newbyteorder('<')
    if dt.kind not in 'biuf':
      raise ValueError(f'feature {name!r}: dtype {dtype} is not a bool/int/float type')
    shape = tuple(None if d is None else int(d) for d in shape)
    out[name] = (dt, shape)
  return out


def features_to_json(features: Features) -> list[dict]:
  """The schema as a JSON list (a list, because the order of the features is part of the byte format)."""
  return [{'name': name, 'dtype': np.dtype(dt).name, 'shape': list(shape)}
          for name, (dt, shape) in normalize_features(features).items()]


def features_from_json(spec: Sequence[Mapping]) -> dict[str, tuple[np.dtype, tuple]]:
  return normalize_features({f['name']: (f['dtype'], tuple(f['shape'])) for f in spec})


def encode_record(record: Mapping[str, Any], features: Features) -> bytes:
  """Serialises one record (see the module docstring for the byte layout). Values are cast to the schema dtype."""
  features = features if _is_normalized(features) else normalize_features(features)
  lengths, payload = [], []
  for name, (dt, shape) in features.items():
    value = np.asarray(record[name])
    if value.ndim != len(shape):
      raise ValueError(f'feature {name!r}: expected rank {len(shape)}, got shape {value.shape}')
    for want, got in zip(shape, value.shape):
      if want is None:
        lengths.append(got)
      elif want != got:
        raise ValueError(f'feature {name!r}: expected shape {shape}, got {value.shape}')
    cast = value.astype(dt, copy=False)
    if dt.kind in 'iu' and value.dtype.kind in 'iu' and cast.size and not np.array_equal(cast, value):
      raise ValueError(f'feature {name!r}: values do not fit in {dt.name}')
    payload.append(np.ascontiguousarray(cast).tobytes())
  header = bytes([_VERSION]) + np.asarray(lengths, dtype='<u4').tobytes()
  return header + b''.join(payload)


def decode_record(data: bytes, features: Features) -> dict[str, np.ndarray]:
  """Inverse of `encode_record`: a dict of read-only numpy arrays (0-d arrays for scalars)."""
  features = features if _is_normalized(features) else normalize_features(features)
  if not data or data[0] != _VERSION:
    raise ValueError(f'unknown record format version {data[:1]!r}')
  num_var = sum(d is None for _, shape in features.values() for d in shape)
  lengths = np.frombuffer(data, dtype='<u4', count=num_var, offset=1).tolist()
  offset = 1 + 4 * num_var
  out = {}
  for name, (dt, shape) in features.items():
    full_shape = tuple(lengths.pop(0) if d is None else d for d in shape)
    count = int(np.prod(full_shape, dtype=np.int64))
    out[name] = np.frombuffer(data, dtype=dt, count=count, offset=offset).reshape(full_shape)
    offset += count * dt.itemsize
  if offset != len(data):
    raise ValueError(f'record has {len(data) - offset} trailing bytes; schema mismatch?')
  return out


def _is_normalized(features: Features) -> bool:
  return all(isinstance(dt, np.dtype) for dt, _ in features.values())


def fingerprint(*parts: Any) -> str:
  """A stable hex digest of JSON-serialisable parts (settings, input descriptions, hashes)."""
  blob = json.dumps(parts, sort_keys=True, default=str, separators=(',', ':')).encode()
  return hashlib.sha256(blob).hexdigest()[:32]


# ----------------------------------------------------------------------------------------------------------------------
# Writing.
# ----------------------------------------------------------------------------------------------------------------------

def shard_name(index: int, count: int) -> str:
  return f'shard-{index:05d}-of-{count:05d}.array_record'


def read_metadata(directory: str | os.PathLike) -> dict | None:
  """The parsed `metadata.json` of a shard directory, or None when there is none (shards absent or incomplete)."""
  path = storage.join(directory, METADATA_FILE)
  if not storage.exists(path):
    return None
  return storage.read_json(path)


def is_complete(directory: str | os.PathLike, fingerprint: str) -> dict | None:
  """The metadata of `directory` if it holds complete shards written with `fingerprint`, else None."""
  metadata = read_metadata(directory)
  if metadata is None or metadata.get('fingerprint') != fingerprint:
    return None
  present = set(storage.listdir(directory))
  if not all(s['file'] in present for s in metadata['shards']):
    return None
  return metadata


def _show_progress() -> bool:
  return bool(getattr(sys.stderr, 'isatty', lambda: False)())


def _new_stats(features) -> dict[str, Any]:
  """Per-feature totals: `sum` for scalars; `elements`, `min_len`, `max_len` (first dimension) for arrays."""
  per_feature = {name: ({'sum': 0} if not shape else {'elements': 0, 'min_len': None, 'max_len': None})
                 for name, (_, shape) in features.items()}
  return {'records': 0, 'bytes': 0, 'features': per_feature, 'generator': {}}


def _update_stats(stats, record, features, nbytes) -> None:
  stats['records'] += 1
  stats['bytes'] += nbytes
  for name, (_, shape) in features.items():
    value = np.asarray(record[name])
    fs = stats['features'][name]
    if len(shape) == 0:
      fs['sum'] += value.item()
    else:
      n = int(value.shape[0])
      fs['elements'] += int(value.size)
      fs['min_len'] = n if fs['min_len'] is None else min(fs['min_len'], n)
      fs['max_len'] = n if fs['max_len'] is None else max(fs['max_len'], n)


def _merge_counters(into: dict, more: Mapping) -> None:
  for key, value in more.items():
    if isinstance(value, Mapping):
      _merge_counters(into.setdefault(key, {}), value)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
      into[key] = into.get(key, 0) + value
    else:
      into.setdefault(key, value)


def _merge_stats(total: dict, shard: dict) -> None:
  total['records'] += shard['records']
  total['bytes'] += shard['bytes']
  for name, fs in shard['features'].items():
    ts = total['features'][name]
    if 'sum' in fs:
      ts['sum'] += fs['sum']
      continue
    ts['elements'] += fs['elements']
    for key, pick in (('min_len', min), ('max_len', max)):
      if fs[key] is not None:
        ts[key] = fs[key] if ts[key] is None else pick(ts[key], fs[key])
  _merge_counters(total['generator'], shard['generator'])


def _write_one_shard(path, task, make_records, features, writer_options, progress: Callable[[int], None]) -> dict:
  """Writes the records of one task to `path` (via a temporary file); returns the shard's stats."""
  from array_record.python.array_record_module import ArrayRecordWriter  # pylint: disable=import-outside-toplevel
  stats = _new_stats(features)
  tmp = path + '.tmp'
  writer = ArrayRecordWriter(tmp, writer_options)
  records = iter(make_records(task))
  pending = 0
  try:
    while True:
      try:
        record = next(records)
      except StopIteration as stop:  # A generator may `return` a dict of counters; they are summed over shards.
        if isinstance(stop.value, Mapping):
          _merge_counters(stats['generator'], stop.value)
        break
      data = encode_record(record, features)
      writer.write(data)
      _update_stats(stats, record, features, len(data))
      pending += 1
      if pending >= 256:
        progress(pending)
        pending = 0
  finally:
    writer.close()
  progress(pending)
  os.replace(tmp, path)
  return stats


def _worker_main(worker_id, jobs, make_records, features, writer_options, out_queue) -> None:
  """Entry point of a writer process: writes its shards, reporting progress and results on `out_queue`."""
  try:
    features = normalize_features(features)
    for index, path, task in jobs:
      stats = _write_one_shard(path, task, make_records, features, writer_options,
                               lambda n: n and out_queue.put(('progress', worker_id, n)))
      out_queue.put(('done', worker_id, (index, stats)))
  except BaseException:  # pylint: disable=broad-except
    out_queue.put(('error', worker_id, traceback.format_exc()))


def write_shards(out_dir: str | os.PathLike, tasks: Sequence[Any], make_records: Callable[[Any], Iterable[Mapping]],
                 features: Features, *, num_workers: int = 1, fingerprint: str, info: Mapping | None = None,
                 writer_options: str = DEFAULT_WRITER_OPTIONS, desc: str = 'writing shards') -> dict:
  """Writes one ArrayRecord shard per task and `metadata.json`; returns the metadata.

  Args:
    out_dir: the shard directory (created). Shards of an earlier run with another fingerprint are replaced.
    tasks: one picklable task per shard; `make_records(tasks[i])` yields the records of shard `i` (dicts matching
      `features`) and may `return` a dict of numeric counters, summed over shards into `stats['generator']`.
    make_records: a module-level function (it is sent to `spawn`ed worker processes by reference).
    features: the schema, `{name: (dtype, shape)}`, shape entries int or None (variable).
    num_workers: processes writing in parallel; `<= 1` writes in this process. The output does not depend on it.
    fingerprint: identifies inputs + settings; if `out_dir` already holds complete shards with this fingerprint,
      nothing is written and the existing metadata is returned (with `reused: True`).
    info: free-form JSON-serialisable metadata stored under `info`.
  """
  out_dir = storage.fspath(out_dir)
  existing = is_complete(out_dir, fingerprint)
  if existing is not None:
    existing['reused'] = True
    return existing
  if storage.is_remote(out_dir):
    return _write_remote(out_dir, tasks, make_records, features, num_workers=num_workers, fingerprint=fingerprint,
                         info=info, writer_options=writer_options, desc=desc)
  os.makedirs(out_dir, exist_ok=True)
  meta_path = os.path.join(out_dir, METADATA_FILE)
  if os.path.exists(meta_path):
    os.remove(meta_path)  # From here until the end the directory is "incomplete".
  for name in os.listdir(out_dir):
    if name.startswith('shard-') and (name.endswith('.array_record') or name.endswith('.array_record.tmp')):
      os.remove(os.path.join(out_dir, name))

  normalized = normalize_features(features)
  num_shards = len(tasks)
  if num_shards == 0:
    raise ValueError('write_shards needs at least one task')
  paths = [os.path.join(out_dir, shard_name(i, num_shards)) for i in range(num_shards)]
  shard_stats: list[dict | None] = [None] * num_shards
  from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel
  bar = tqdm(desc=desc, unit=' records', disable=not _show_progress(), dynamic_ncols=True)
  start = time.time()
  try:
    num_workers = max(1, min(int(num_workers), num_shards))
    main_file = getattr(sys.modules.get('__main__'), '__file__', None)
    if num_workers > 1 and main_file is not None and not os.path.exists(main_file):
      # `spawn` re-imports the main module by path; a main read from stdin (`python -`) has none: write here.
      logging.getLogger(__name__).warning('main module %r is not a file: writing shards in this process', main_file)
      num_workers = 1
    if num_workers == 1:
      for i, task in enumerate(tasks):
        shard_stats[i] = _write_one_shard(paths[i], task, make_records, normalized, writer_options, bar.update)
        bar.set_postfix(shards=f'{i + 1}/{num_shards}')
    else:
      _write_parallel(tasks, paths, make_records, features, writer_options, num_workers, shard_stats, bar)
  finally:
    bar.close()

  total = _new_stats(normalized)
  for stats in shard_stats:
    _merge_stats(total, stats)
  for fs in total['features'].values():
    fs['mean'] = fs.get('sum', fs.get('elements', 0)) / max(1, total['records'])  # Mean value / mean length.
  metadata = {
      'format': FORMAT,
      'fingerprint': fingerprint,
      'num_records': total['records'],
      'shards': [{'file': os.path.basename(p), 'num_records': s['records']} for p, s in zip(paths, shard_stats)],
      'features': features_to_json(normalized),
      'stats': {'records': total['records'], 'bytes': total['bytes'], 'features': total['features'],
                'seconds': round(time.time() - start, 3), **total['generator']},
      'info': dict(info or {}),
  }
  with open(meta_path + '.tmp', 'w') as f:
    json.dump(metadata, f, indent=1, sort_keys=True, default=_json_default)
  os.replace(meta_path + '.tmp', meta_path)
  metadata['reused'] = False
  return metadata


def _write_remote(out_dir: str, tasks, make_records, features, **kwargs) -> dict:
  """`write_shards` to remote storage: ArrayRecord writes local files only, so the shards are written into a local
  staging directory, then uploaded: the old `metadata.json` removed first, the shards, the new `metadata.json`
  last (its presence still means complete)."""
  import tempfile  # pylint: disable=import-outside-toplevel
  with tempfile.TemporaryDirectory(prefix='xbj-shards-') as local:
    metadata = write_shards(local, tasks, make_records, features, **kwargs)
    storage.makedirs(out_dir)
    storage.remove(storage.join(out_dir, METADATA_FILE))
    names = [s['file'] for s in metadata['shards']]
    for name in storage.listdir(out_dir):
      if name.startswith('shard-') and name not in names:
        storage.remove(storage.join(out_dir, name))
    for name in names:
      storage.copy_file(os.path.join(local, name), storage.join(out_dir, name))
    storage.copy_file(os.path.join(local, METADATA_FILE), storage.join(out_dir, METADATA_FILE))
  return metadata


def _json_default(value):
  if isinstance(value, np.generic):
    return value.item()
  if isinstance(value, np.ndarray):
    return value.tolist()
  return str(value)


def _write_parallel(tasks, paths, make_records, features, writer_options, num_workers, shard_stats, bar) -> None:
  import multiprocessing  # pylint: disable=import-outside-toplevel
  ctx = multiprocessing.get_context('spawn')
  out_queue = ctx.Queue()
  procs = []
  for w in range(num_workers):
    jobs = [(i, paths[i], tasks[i]) for i in range(w, len(tasks), num_workers)]
    proc = ctx.Process(target=_worker_main, args=(w, jobs, make_records, dict(features), writer_options, out_queue),
                       daemon=True, name=f'shard-writer-{w}')
    proc.start()
    procs.append(proc)
  remaining = len(tasks)
  try:
    while remaining:
      try:
        kind, worker_id, payload = out_queue.get(timeout=1.0)
      except queue.Empty:
        dead = [p for p in procs if p.exitcode not in (None, 0)]
        if dead:
          raise RuntimeError(f'shard writer {dead[0].name} died with exit code {dead[0].exitcode}') from None
        if all(p.exitcode == 0 for p in procs):  # All exited cleanly; drain what is left, then check.
          try:
            kind, worker_id, payload = out_queue.get(timeout=5.0)
          except queue.Empty:
            raise RuntimeError(f'shard writers exited with {remaining} shards unreported') from None
        else:
          continue
      if kind == 'progress':
        bar.update(payload)
      elif kind == 'done':
        index, stats = payload
        shard_stats[index] = stats
        remaining -= 1
        bar.set_postfix(shards=f'{len(tasks) - remaining}/{len(tasks)}')
      else:
        raise RuntimeError(f'shard writer {worker_id} failed:\n{payload}')
  finally:
    for proc in procs:
      if remaining:
        proc.terminate()
      proc.join()


# ----------------------------------------------------------------------------------------------------------------------
# Reading.
# ----------------------------------------------------------------------------------------------------------------------

class ShardReader:
  """Random access to all records of a shard directory, decoded to dicts of numpy arrays.

  Global record id `k` is the `k`-th record of the shards concatenated in order (`metadata['shards']`). Implements
  the random-access data source protocol (`__len__`, `__getitem__`, `__getitems__`), so it also plugs into
  `grain.MapDataset.source`. A class because it holds open file readers.

  ArrayRecord reads local files only: the shards of a remote directory (`gs://...`) are copied on first access into
  a local cache keyed by their fingerprint (`common.storage.mirror_dir`; `$XLNET_BERT_JAX_CACHE`), reused after.
  """

  def __init__(self, directory: str | os.PathLike):
    self.directory = storage.fspath(directory)
    self.metadata = read_metadata(self.directory)
    if self.metadata is None:
      raise FileNotFoundError(f'{self.directory} has no {METADATA_FILE}: shards missing or incomplete')
    if self.metadata.get('format') != FORMAT:
      raise ValueError(f'{self.directory}: unknown shard format {self.metadata.get("format")!r}')
    self.features = features_from_json(self.metadata['features'])
    self._names = [s['file'] for s in self.metadata['shards'] if s['num_records']]
    self._source = None

  def _data_source(self):
    if self._source is None:
      import grain  # pylint: disable=import-outside-toplevel
      local = storage.mirror_dir(self.directory, self._names, key=str(self.metadata.get('fingerprint')))
      self._paths = [os.path.join(local, name) for name in self._names]
      self._source = grain.sources.ArrayRecordDataSource(self._paths) if self._paths else []
      if len(self._source) != self.metadata['num_records']:
        raise ValueError(f'{self.directory}: shards hold {len(self._source)} records, metadata says '
                         f'{self.metadata["num_records"]}')
    return self._source

  def __len__(self) -> int:
    return int(self.metadata['num_records'])

  def __getitem__(self, key: int) -> dict[str, np.ndarray]:
    key = int(key)
    if not 0 <= key < len(self):
      raise IndexError(f'record {key} out of range [0, {len(self)})')
    return decode_record(self._data_source()[key], self.features)

  def __getitems__(self, keys: Sequence[int]) -> list[dict[str, np.ndarray]]:
    keys = [int(k) for k in keys]
    if not keys:
      return []
    if min(keys) < 0 or max(keys) >= len(self):
      raise IndexError(f'record ids out of range [0, {len(self)})')
    return [decode_record(data, self.features) for data in self._data_source().__getitems__(keys)]

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    for start in range(0, len(self), 1024):
      yield from self.__getitems__(range(start, min(len(self), start + 1024)))

  def __getstate__(self):
    return {'directory': self.directory}

  def __setstate__(self, state):
    self.__init__(state['directory'])
