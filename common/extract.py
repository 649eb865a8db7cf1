"""Feature extraction: the hidden states of chosen encoder layers for every token of every input line, as BERT's
`extract_features.py` writes them. The one feature extractor: a model plugs in its `common.model_adapter.Encoder`
(`<model>_jax/tasks.py` `load_encoder`), and `python -m bert_jax.extract_features` / `xlnet_jax.extract_features`
are thin entry points over `main`.

Input: a text file, one example a line: a single text, or a pair written `text_a ||| text_b` (the separator with a
space on each side, as the original). A line that is not UTF-8, is empty (blank) or has an empty side of a pair is
counted, logged with its line number (the first `MAX_WARNINGS`) and skipped.

Each example is laid out as the model's fine-tuning converters lay out a sentence (pair) — BERT `[CLS] A [SEP] B
[SEP]`, XLNet `A <sep> B <sep> <cls>` — truncated to `max_seq_length` tokens the same way, and run in batches of
`batch_size` (one compiled shape; the last batch is padded with copies of its first row). `layers` are indices into
the list of encoder layer outputs (the hidden states after layer 1, ..., after layer N): -1 is the last layer, -2
the one before, 0 the first. Padding positions are dropped; the special tokens are kept, as the original does.

Output formats:

* jsonl: one JSON object a line, the original's layout (values rounded to 6 decimals, as the original):
  `{"linex_index": i, "features": [{"token": t, "layers": [{"index": -1, "values": [...]}, ...]}, ...]}`,
  `linex_index` being the 0-based index of the example's line in the input file (skipped lines keep their number).
* npz: one NumPy `.npz` archive (written as it goes, never held in memory whole) with, for every written line i,
  `line_{i}/tokens` (str `[n]`) and `line_{i}/layer_{k}` (float32 `[n, hidden]`) for each requested layer k, plus
  `line_indices` (int64, the written lines in order) and `layers` (int64, the requested indices).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import tempfile
import zipfile
from typing import Callable, Iterable, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from common import storage
from common.config import UserError
from common.model_adapter import Encoder
from common.tasks import PairExample

log = logging.getLogger(__name__)

MAX_WARNINGS = 20
FORMATS = ('jsonl', 'npz')
_PAIR = re.compile(r'^(.*) \|\|\| (.*)$')


def parse_layers(spec: str | Sequence[int], num_layers: int) -> list[int]:
  """'-1,-2,-3,-4' (or a list of ints) -> the indices, checked against `num_layers` (negative: from the end).

  An empty spec means the last four layers, or all of them in a model with fewer (BERT's default, which a 2-layer
  model could not take)."""
  if isinstance(spec, str) and not spec.strip():
    return [-(i + 1) for i in range(min(4, num_layers))]
  if isinstance(spec, str):
    try:
      indices = [int(part) for part in spec.split(',') if part.strip()]
    except ValueError as e:
      raise UserError(f'--layers must be comma-separated integers such as -1,-2,-3,-4, got {spec!r}') from e
  else:
    indices = [int(i) for i in spec]
  if not indices:
    raise UserError('--layers: no layer index given')
  for index in indices:
    if not -num_layers <= index < num_layers:
      raise UserError(f'--layers: layer {index} does not exist: the model has {num_layers} layers (indices '
                      f'{-num_layers}..{num_layers - 1})')
  if len(set(i % num_layers for i in indices)) != len(indices):
    raise UserError(f'--layers: {indices} names a layer twice')
  return indices


# ----------------------------------------------------------------------------------------------------------------
# Input.
# ----------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class ExtractStats:
  """lines: lines read; examples: lines extracted; bad_lines: lines skipped; warnings: the messages logged."""
  lines: int = 0
  examples: int = 0
  bad_lines: int = 0
  warnings: list[str] = dataclasses.field(default_factory=list)

  def bad(self, path: str, number: int, reason: str) -> None:
    self.bad_lines += 1
    if self.bad_lines <= MAX_WARNINGS:
      message = f'{path}:{number}: skipped: {reason}'
      self.warnings.append(message)
      log.warning(message)


def read_examples(path: str, stats: ExtractStats | None = None) -> Iterator[tuple[int, PairExample]]:
  """(0-based line index, example) for every usable line of `path` (see the module docstring); bad lines are
  counted in `stats` and skipped. A UTF-8 byte-order mark at the start is ignored."""
  stats = stats if stats is not None else ExtractStats()
  with storage.open_file(path, 'rb') as f:
    for index, raw in enumerate(f):
      stats.lines += 1
      number = index + 1
      if index == 0 and raw.startswith(b'\xef\xbb\xbf'):
        raw = raw[3:]
      try:
        line = raw.decode('utf-8').rstrip('\r\n')
      except UnicodeDecodeError as e:
        stats.bad(path, number, f'not UTF-8 ({e.reason} at byte {e.start})')
        continue
      if not line.strip():
        stats.bad(path, number, 'empty line')
        continue
      match = _PAIR.match(line)
      text_a, text_b = (match.group(1), match.group(2)) if match else (line, None)
      if not text_a.strip() or (text_b is not None and not text_b.strip()):
        stats.bad(path, number, "a side of the 'A ||| B' pair is empty")
        continue
      yield index, PairExample(guid=str(index), text_a=text_a.strip(),
                                     text_b=None if text_b is None else text_b.strip(), label=None)


def _batches(items: Iterable, size: int) -> Iterator[list]:
  batch = []
  for item in items:
    batch.append(item)
    if len(batch) == size:
      yield batch
      batch = []
  if batch:
    yield batch


# ----------------------------------------------------------------------------------------------------------------
# Extraction.
# ----------------------------------------------------------------------------------------------------------------

def make_forward(encoder: Encoder, layers: Sequence[int]) -> Callable:
  """A jitted `(params, input_ids, segment_ids, input_mask) -> [len(layers), B, L, hidden]` float32."""
  layers = tuple(layers)

  def forward(params, input_ids, segment_ids, input_mask):
    outputs = encoder.layer_outputs(params, input_ids, segment_ids, input_mask)
    return jnp.stack([outputs[i].astype(jnp.float32) for i in layers])

  return jax.jit(forward)


def extract(encoder: Encoder, examples: Iterable[tuple[int, PairExample]], layers: Sequence[int], *,
            max_seq_length: int = 128, batch_size: int = 8
            ) -> Iterator[tuple[int, list[str], dict[int, np.ndarray]]]:
  """(line index, tokens, {layer index: float32 [len(tokens), hidden]}) for every example, in input order."""
  if batch_size <= 0:
    raise ValueError(f'batch_size must be positive, got {batch_size}')
  layers = list(layers)
  forward = make_forward(encoder, layers)
  params = jax.device_put(encoder.params)  # Once, not with every batch.
  for batch in _batches(examples, batch_size):
    features = encoder.convert([example for _, example in batch], encoder.tokenizer, max_seq_length)
    rows = len(batch)
    inputs = [np.asarray(features[name], np.int32) for name in ('input_ids', 'segment_ids', 'input_mask')]
    if rows < batch_size:  # One compiled shape: pad with copies of the first row.
      inputs = [np.concatenate([x, np.repeat(x[:1], batch_size - rows, 0)]) for x in inputs]
    hidden = np.asarray(jax.device_get(forward(params, *inputs)))
    input_ids, _, input_mask = inputs
    for row, (index, _) in enumerate(batch):
      keep = np.flatnonzero(input_mask[row] > 0)
      tokens = list(encoder.tokenizer.convert_ids_to_tokens(input_ids[row, keep].tolist()))
      yield index, tokens, {layer: hidden[k, row, keep] for k, layer in enumerate(layers)}


# ----------------------------------------------------------------------------------------------------------------
# Output.
# ----------------------------------------------------------------------------------------------------------------

class JsonlWriter:
  """The original `extract_features.py` output: one JSON object per line (values rounded to 6 decimals)."""

  def __init__(self, path: str):
    self._file = storage.open_file(path, 'w')

  def write(self, index: int, tokens: Sequence[str], vectors: Mapping[int, np.ndarray]) -> None:
    values = {layer: np.round(v.astype(np.float64), 6).tolist() for layer, v in vectors.items()}
    features = [{'token': token, 'layers': [{'index': layer, 'values': values[layer][t]} for layer in vectors]}
                for t, token in enumerate(tokens)]
    self._file.write(json.dumps({'linex_index': index, 'features': features}, ensure_ascii=False) + '\n')

  def close(self) -> None:
    self._file.close()


class NpzWriter:
  """A `.npz` archive written one array at a time (`np.load` reads it; see the module docstring for the keys)."""

  def __init__(self, path: str, layers: Sequence[int]):
    self._zip = zipfile.ZipFile(path, 'w', compression=zipfile.ZIP_STORED, allowZip64=True)
    self._layers = list(layers)
    self._indices: list[int] = []

  def _add(self, name: str, array: np.ndarray) -> None:
    with self._zip.open(f'{name}.npy', 'w', force_zip64=True) as f:
      np.lib.format.write_array(f, np.asanyarray(array), allow_pickle=False)

  def write(self, index: int, tokens: Sequence[str], vectors: Mapping[int, np.ndarray]) -> None:
    self._indices.append(index)
    self._add(f'line_{index}/tokens', np.array(list(tokens), dtype=str))
    for layer, vector in vectors.items():
      self._add(f'line_{index}/layer_{layer}', np.asarray(vector, np.float32))

  def close(self) -> None:
    self._add('line_indices', np.array(self._indices, dtype=np.int64))
    self._add('layers', np.array(self._layers, dtype=np.int64))
    self._zip.close()


def output_format(output_file: str, fmt: str | None) -> str:
  """`fmt` if given, else from the output file's extension ('.npz' -> npz, anything else jsonl)."""
  if fmt:
    if fmt not in FORMATS:
      raise ValueError(f'format must be one of {FORMATS}, got {fmt!r}')
    return fmt
  return 'npz' if output_file.lower().endswith('.npz') else 'jsonl'


def extract_file(encoder: Encoder, input_file: str, output_file: str, *, layers: str | Sequence[int] = '',
                 fmt: str | None = None, max_seq_length: int = 128, batch_size: int = 8) -> ExtractStats:
  """Reads `input_file`, extracts the `layers` of every usable line and writes them to `output_file`; returns the
  counts (and logs a summary)."""
  indices = parse_layers(layers, encoder.num_layers)
  fmt = output_format(output_file, fmt)
  if storage.is_remote(output_file):  # npz needs a seekable file: write a local one, then upload it.
    with tempfile.TemporaryDirectory(prefix='xbj-extract-') as tmp:
      local = os.path.join(tmp, storage.basename(output_file))
      stats = extract_file(encoder, input_file, local, layers=indices, fmt=fmt, max_seq_length=max_seq_length,
                           batch_size=batch_size)
      storage.copy_file(local, output_file)
    return stats
  stats = ExtractStats()
  directory = os.path.dirname(os.path.abspath(output_file))
  os.makedirs(directory, exist_ok=True)
  writer = JsonlWriter(output_file) if fmt == 'jsonl' else NpzWriter(output_file, indices)
  try:
    for index, tokens, vectors in extract(encoder, read_examples(input_file, stats), indices,
                                          max_seq_length=max_seq_length, batch_size=batch_size):
      writer.write(index, tokens, vectors)
      stats.examples += 1
  finally:
    writer.close()
  summary = f'{input_file}: {stats.examples} of {stats.lines} lines extracted to {output_file} ({fmt})'
  if stats.bad_lines:
    summary += f'; {stats.bad_lines} bad lines skipped'
    if stats.bad_lines > MAX_WARNINGS:
      summary += f' ({stats.bad_lines - MAX_WARNINGS} not shown)'
  log.info(summary)
  print(summary, flush=True)
  return stats


# ----------------------------------------------------------------------------------------------------------------
# Command line (shared by the two entry points).
# ----------------------------------------------------------------------------------------------------------------

def define_flags(model_name: str) -> None:
  from absl import flags  # pylint: disable=import-outside-toplevel
  flags.DEFINE_string('init', None, f'An HF {model_name} directory or a pretraining workdir.')
  flags.DEFINE_string('input_file', None, "One example a line: a text, or 'text_a ||| text_b'.")
  flags.DEFINE_string('output_file', None, 'Where the features go (.jsonl or .npz).')
  flags.DEFINE_string('layers', '', 'Comma-separated layer indices (-1: the last layer); default: the last four '
                      '(all, for a model with fewer).')
  flags.DEFINE_enum('format', None, list(FORMATS), 'Output format (default: from the output file\'s extension).')
  flags.DEFINE_integer('max_seq_length', 128, 'Tokens per example, special tokens included (longer ones are cut).')
  flags.DEFINE_integer('batch_size', 8, 'Examples per forward pass.')
  flags.mark_flags_as_required(['init', 'input_file', 'output_file'])


def main(load_encoder: Callable[[str], Encoder]) -> None:
  from absl import flags  # pylint: disable=import-outside-toplevel
  values = flags.FLAGS
  encoder = load_encoder(values.init)
  extract_file(encoder, values.input_file, values.output_file, layers=values.layers, fmt=values.format,
               max_seq_length=values.max_seq_length, batch_size=values.batch_size)


def run_main(model_name: str, load_encoder: Callable[[str], Encoder]) -> None:
  """`python -m <model>_jax.extract_features`: the flags of `define_flags`, then `main` (user errors as one line)."""
  from common import run as run_lib  # pylint: disable=import-outside-toplevel
  define_flags(model_name)
  run_lib.app_run(lambda argv: main(load_encoder))
