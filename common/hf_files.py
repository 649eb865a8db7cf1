"""The files of a Hugging Face model directory, read and written whole: JSON files and the weights (`model.safetensors`,
sharded with `model.safetensors.index.json`, or older `pytorch_model.bin` / `pytorch_model.bin.index.json`) as flat
state dicts `dict[str, np.ndarray]` keyed by dotted torch names. Knows no model; `common.hf` builds on it.

torch is imported lazily, only to read `pytorch_model.bin`; safetensors and ml_dtypes only when weights are read or
written.
"""
from __future__ import annotations

import json
import os
import struct
from typing import Any, Callable, Mapping

import numpy as np

from common import storage

SAFETENSORS_NAME = 'model.safetensors'
SAFETENSORS_INDEX_NAME = 'model.safetensors.index.json'
PYTORCH_NAME = 'pytorch_model.bin'
PYTORCH_INDEX_NAME = 'pytorch_model.bin.index.json'
WEIGHT_NAMES = (SAFETENSORS_NAME, SAFETENSORS_INDEX_NAME, PYTORCH_NAME, PYTORCH_INDEX_NAME)



# ----------------------------------------------------------------------------------------------------------------
# JSON files.
# ----------------------------------------------------------------------------------------------------------------

def write_json(path: str, obj: Any) -> None:
  storage.write_text(path, json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + '\n')


def read_json(path: str) -> Any:
  if not storage.isfile(path):
    raise FileNotFoundError(f'{path}: no such file')
  try:
    return json.loads(storage.read_text(path))
  except json.JSONDecodeError as e:
    raise ValueError(f'{path}: not valid JSON ({e})') from e


# ----------------------------------------------------------------------------------------------------------------
# Weights.
# ----------------------------------------------------------------------------------------------------------------

def write_safetensors(path: str, state_dict: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None
                      ) -> None:
  """Writes a flat state dict of numpy arrays. `metadata['format'] = 'pt'` so `transformers` accepts the file."""
  from safetensors.numpy import save, save_file
  meta = {'format': 'pt', **dict(metadata or {})}
  arrays = {k: np.ascontiguousarray(np.asarray(v)) for k, v in state_dict.items()}
  if storage.is_remote(path):
    storage.write_bytes(path, save(arrays, metadata=meta))
    return
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
  with storage.open_file(path, 'rb') as f:
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
  from safetensors.numpy import load, load_file
  try:
    return load(storage.read_bytes(path)) if storage.is_remote(path) else load_file(path)
  except TypeError:  # numpy has no bfloat16: fall back to reading the file by its header.
    return _read_safetensors_raw(path)


def read_pytorch_bin(path: str) -> dict[str, np.ndarray]:
  """A `pytorch_model.bin` (torch.load, weights only) as numpy; bfloat16 tensors become float32."""
  import torch  # Lazy: only older directories need it.
  with storage.local_file(path) as local:
    state = torch.load(local, map_location='cpu', weights_only=True)
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
  index = read_json(storage.join(model_dir, index_name))
  out = {}
  for shard in sorted(set(index['weight_map'].values())):
    out.update(read(storage.join(model_dir, shard)))
  return out


def read_weights(model_dir: str) -> tuple[dict[str, np.ndarray], str]:
  """The state dict of a Hugging Face directory and the file it came from.

  Looks for, in order: model.safetensors, model.safetensors.index.json (shards), pytorch_model.bin,
  pytorch_model.bin.index.json; raises FileNotFoundError naming the directory and these names if none exists.
  """
  if not storage.isdir(model_dir):
    raise FileNotFoundError(f'{model_dir}: not a directory (expected a Hugging Face model directory)')
  readers = {
      SAFETENSORS_NAME: read_safetensors,
      SAFETENSORS_INDEX_NAME: lambda p: _read_index(model_dir, SAFETENSORS_INDEX_NAME, read_safetensors),
      PYTORCH_NAME: read_pytorch_bin,
      PYTORCH_INDEX_NAME: lambda p: _read_index(model_dir, PYTORCH_INDEX_NAME, read_pytorch_bin),
  }
  for name in WEIGHT_NAMES:
    path = storage.join(model_dir, name)
    if storage.isfile(path):
      return readers[name](path), path
  raise FileNotFoundError(f'{model_dir}: no weights found; looked for {", ".join(WEIGHT_NAMES)}')
