"""Plumbing for Hugging Face model directories, shared by every exporter and importer; knows no model.

A Hugging Face directory holds `config.json`, the weights as `model.safetensors` (or sharded with
`model.safetensors.index.json`; older directories: `pytorch_model.bin` / `pytorch_model.bin.index.json`) and the
tokenizer files. A *state dict* here is a flat `dict[str, np.ndarray]` keyed by dotted torch names, in torch
layout (a `Linear` weight is `[out, in]`). Our parameter trees are nested dicts; `flatten` / `unflatten` turn them
into `{'a/b/c': array}` and back.

torch is imported lazily, only to read `pytorch_model.bin`; everything else needs numpy and `safetensors`.
"""
from __future__ import annotations

import json
import os
import shutil
import struct
from typing import Any, Callable, Iterable, Mapping

import numpy as np

CONFIG_NAME = 'config.json'
SAFETENSORS_NAME = 'model.safetensors'
SAFETENSORS_INDEX_NAME = 'model.safetensors.index.json'
PYTORCH_NAME = 'pytorch_model.bin'
PYTORCH_INDEX_NAME = 'pytorch_model.bin.index.json'
WEIGHT_NAMES = (SAFETENSORS_NAME, SAFETENSORS_INDEX_NAME, PYTORCH_NAME, PYTORCH_INDEX_NAME)


class StateDictError(ValueError):
  """A state dict does not match what a model expects; the message names every offending key."""


# ----------------------------------------------------------------------------------------------------------------
# Nested <-> flat parameter trees.
# ----------------------------------------------------------------------------------------------------------------

def flatten(tree: Mapping[str, Any], sep: str = '/') -> dict[str, Any]:
  """`{'a': {'b': x}}` -> `{'a/b': x}`. Leaves are whatever is not a Mapping (arrays, boxed params)."""
  flat = {}

  def visit(node, prefix):
    for key, value in node.items():
      if sep in str(key):
        raise ValueError(f'parameter name {key!r} under {prefix!r} contains the separator {sep!r}')
      path = f'{prefix}{sep}{key}' if prefix else str(key)
      if isinstance(value, Mapping):
        visit(value, path)
      else:
        flat[path] = value

  visit(tree, '')
  return flat


def unflatten(flat: Mapping[str, Any], sep: str = '/') -> dict[str, Any]:
  """`{'a/b': x}` -> `{'a': {'b': x}}` (plain dicts). Refuses a path that is both a leaf and a prefix."""
  tree: dict[str, Any] = {}
  for path, value in flat.items():
    *parents, leaf = path.split(sep)
    node = tree
    for i, part in enumerate(parents):
      node = node.setdefault(part, {})
      if not isinstance(node, dict):
        raise ValueError(f'{sep.join(parents[:i + 1])!r} is both a leaf and a prefix of {path!r}')
    if leaf in node:
      raise ValueError(f'{path!r} is both a leaf and a prefix of other paths')
    node[leaf] = value
  return tree


# ----------------------------------------------------------------------------------------------------------------
# Checking a state dict against what a model expects.
# ----------------------------------------------------------------------------------------------------------------

def check_state_dict(state_dict: Mapping[str, Any], expected: Mapping[str, tuple[int, ...]] | Iterable[str], *,
                     allow_missing: Iterable[str] = (), ignore_unexpected: Callable[[str], bool] | None = None,
                     what: str = 'state dict') -> tuple[list[str], list[str]]:
  """Compares the keys (and shapes, when `expected` maps keys to shapes) of `state_dict` with `expected`.

  Raises `StateDictError` listing every missing key (not in `allow_missing`), every unexpected key (for which
  `ignore_unexpected(key)` is not true) and every shape mismatch as `key: got (..) expected (..)`.
  Returns (missing keys that were allowed, unexpected keys that were ignored), both sorted.
  """
  shapes = dict(expected) if isinstance(expected, Mapping) else None
  expected_keys = set(shapes if shapes is not None else expected)
  allow_missing = set(allow_missing)
  present = set(state_dict)
  missing = sorted(expected_keys - present)
  unexpected = sorted(present - expected_keys)
  bad_missing = [k for k in missing if k not in allow_missing]
  ignored = [k for k in unexpected if ignore_unexpected is not None and ignore_unexpected(k)]
  bad_unexpected = [k for k in unexpected if k not in ignored]
  bad_shapes = []
  if shapes is not None:
    for key in sorted(expected_keys & present):
      got = tuple(np.shape(state_dict[key]))
      if got != tuple(shapes[key]):
        bad_shapes.append(f'{key}: got {got}, expected {tuple(shapes[key])}')
  problems = []
  if bad_missing:
    problems.append(f'missing keys ({len(bad_missing)}): {", ".join(bad_missing)}')
  if bad_unexpected:
    problems.append(f'unexpected keys ({len(bad_unexpected)}): {", ".join(bad_unexpected)}')
  if bad_shapes:
    problems.append(f'wrong shapes ({len(bad_shapes)}): {"; ".join(bad_shapes)}')
  if problems:
    raise StateDictError(f'{what} does not match the model: ' + ' | '.join(problems))
  return [k for k in missing if k in allow_missing], ignored


# ----------------------------------------------------------------------------------------------------------------
# JSON files.
# ----------------------------------------------------------------------------------------------------------------

def write_json(path: str, obj: Any) -> None:
  with open(path, 'w', encoding='utf-8') as f:
    json.dump(obj, f, indent=2, sort_keys=True, ensure_ascii=False)
    f.write('\n')


def read_json(path: str) -> Any:
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path}: no such file')
  with open(path, encoding='utf-8') as f:
    try:
      return json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f'{path}: not valid JSON ({e})') from e


def write_config(out_dir: str, config: Mapping[str, Any]) -> str:
  """Writes `out_dir/config.json`; returns its path."""
  os.makedirs(out_dir, exist_ok=True)
  path = os.path.join(out_dir, CONFIG_NAME)
  write_json(path, dict(config))
  return path


def read_config(model_dir: str) -> dict[str, Any]:
  """Reads `model_dir/config.json`; a missing directory or file raises FileNotFoundError naming the path."""
  if not os.path.isdir(model_dir):
    raise FileNotFoundError(f'{model_dir}: not a directory (expected a Hugging Face model directory)')
  path = os.path.join(model_dir, CONFIG_NAME)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path}: no such file; a Hugging Face model directory needs a {CONFIG_NAME}')
  return read_json(path)


# ----------------------------------------------------------------------------------------------------------------
# Weights.
# ----------------------------------------------------------------------------------------------------------------

def write_safetensors(path: str, state_dict: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None
                      ) -> None:
  """Writes a flat state dict of numpy arrays. `metadata['format'] = 'pt'` so `transformers` accepts the file."""
  from safetensors.numpy import save_file
  meta = {'format': 'pt', **dict(metadata or {})}
  arrays = {k: np.ascontiguousarray(np.asarray(v)) for k, v in state_dict.items()}
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  save_file(arrays, path, metadata=meta)


# safetensors dtype tag -> numpy dtype, for the tags numpy itself lacks (read through ml_dtypes).
def _extended_dtypes() -> dict[str, Any]:
  import ml_dtypes
  return {'BF16': ml_dtypes.bfloat16, 'F8_E4M3': ml_dtypes.float8_e4m3fn, 'F8_E5M2': ml_dtypes.float8_e5m2}


_PLAIN_DTYPES = {'F64': np.float64, 'F32': np.float32, 'F16': np.float16, 'I64': np.int64, 'I32': np.int32,
                 'I16': np.int16, 'I8': np.int8, 'U8': np.uint8, 'BOOL': np.bool_}


def _read_safetensors_raw(path: str) -> dict[str, np.ndarray]:
  """Reads a safetensors file by its header (8-byte length + JSON), for dtypes such as bfloat16."""
  dtypes = {**_PLAIN_DTYPES, **_extended_dtypes()}
  with open(path, 'rb') as f:
    (header_len,) = struct.unpack('<Q', f.read(8))
    header = json.loads(f.read(header_len))
    data = f.read()
  out = {}
  for key, info in header.items():
    if key == '__metadata__':
      continue
    if info['dtype'] not in dtypes:
      raise ValueError(f'{path}: tensor {key!r} has unsupported dtype {info["dtype"]}')
    start, end = info['data_offsets']
    out[key] = np.frombuffer(data[start:end], dtype=dtypes[info['dtype']]).reshape(info['shape']).copy()
  return out


def read_safetensors(path: str) -> dict[str, np.ndarray]:
  """A safetensors file as `dict[str, np.ndarray]` (bfloat16 / float8 tensors come as ml_dtypes arrays)."""
  from safetensors.numpy import load_file
  try:
    return load_file(path)
  except TypeError:  # numpy has no bfloat16: fall back to reading the file by its header.
    return _read_safetensors_raw(path)


def read_pytorch_bin(path: str) -> dict[str, np.ndarray]:
  """A `pytorch_model.bin` (torch.load, weights only) as numpy; bfloat16 tensors become float32."""
  import torch  # Lazy: only older directories need it.
  state = torch.load(path, map_location='cpu', weights_only=True)
  if not isinstance(state, Mapping):
    raise ValueError(f'{path}: expected a state dict, got {type(state).__name__}')
  out = {}
  for key, tensor in state.items():
    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.bfloat16:
      tensor = tensor.float()
    out[key] = tensor.numpy().copy()
  return out


def _read_index(model_dir: str, index_name: str, read: Callable[[str], dict[str, np.ndarray]]
                ) -> dict[str, np.ndarray]:
  index = read_json(os.path.join(model_dir, index_name))
  out = {}
  for shard in sorted(set(index['weight_map'].values())):
    out.update(read(os.path.join(model_dir, shard)))
  return out


def read_weights(model_dir: str) -> tuple[dict[str, np.ndarray], str]:
  """The state dict of a Hugging Face directory and the file it came from.

  Looks for, in order: model.safetensors, model.safetensors.index.json (shards), pytorch_model.bin,
  pytorch_model.bin.index.json; raises FileNotFoundError naming the directory and these names if none exists.
  """
  if not os.path.isdir(model_dir):
    raise FileNotFoundError(f'{model_dir}: not a directory (expected a Hugging Face model directory)')
  readers = {
      SAFETENSORS_NAME: read_safetensors,
      SAFETENSORS_INDEX_NAME: lambda p: _read_index(model_dir, SAFETENSORS_INDEX_NAME, read_safetensors),
      PYTORCH_NAME: read_pytorch_bin,
      PYTORCH_INDEX_NAME: lambda p: _read_index(model_dir, PYTORCH_INDEX_NAME, read_pytorch_bin),
  }
  for name in WEIGHT_NAMES:
    path = os.path.join(model_dir, name)
    if os.path.isfile(path):
      return readers[name](path), path
  raise FileNotFoundError(f'{model_dir}: no weights found; looked for {", ".join(WEIGHT_NAMES)}')


# ----------------------------------------------------------------------------------------------------------------
# Tokenizer files.
# ----------------------------------------------------------------------------------------------------------------

def copy_files(out_dir: str, files: Mapping[str, str]) -> list[str]:
  """Copies `{name in out_dir: source path}`; a missing source raises FileNotFoundError naming it."""
  os.makedirs(out_dir, exist_ok=True)
  written = []
  for name, src in files.items():
    if not os.path.isfile(src):
      raise FileNotFoundError(f'{src}: no such file (to be copied to {os.path.join(out_dir, name)})')
    dst = os.path.join(out_dir, name)
    if os.path.abspath(src) != os.path.abspath(dst):
      shutil.copyfile(src, dst)
    written.append(dst)
  return written


def read_vocab(path: str) -> list[str]:
  """One token a line (WordPiece `vocab.txt`); the id of a token is its line number from 0."""
  with open(path, encoding='utf-8') as f:
    return [line.rstrip('\n').rstrip('\r') for line in f]
