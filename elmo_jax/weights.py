"""The reference biLM format (allenai/bilm-tf): `options.json` + an HDF5 weight file, read and written.

A directory holds `options.json`, `weights.hdf5` and (when known) the word vocabulary `vocab.txt`. Dataset names
and shapes are the reference's (`P` = projection_dim, `n` = lstm_dim, `d` = the char CNN's total filters):

  char_embed                                          [261, char_dim]   (the training ids; see below)
  CNN/W_cnn_{i}, CNN/b_cnn_{i}                        [1, width, char_dim, channels], [channels]
  CNN_high_{k}/W_carry, b_carry, W_transform, b_transform   [d, d], [d]
  CNN_proj/W_proj, CNN_proj/b_proj                    [d, P], [P]
  RNN_{dir}/RNN/MultiRNNCell/Cell{layer}/LSTMCell/W_0 [input + P, 4 n]  (rows: input then h; gates i, j, f, o)
  RNN_{dir}/RNN/MultiRNNCell/Cell{layer}/LSTMCell/B   [4 n]             (forget bias 1.0 added at run time)
  RNN_{dir}/RNN/MultiRNNCell/Cell{layer}/LSTMCell/W_P_0  [n, P]
  softmax/W, softmax/b                                [vocab, P], [vocab]  (training checkpoints only)

`dir` is 0 for the forward LM and 1 for the backward LM. The published files hold no softmax; a model read from
one gets a zero softmax (features need none). `options.json` says `n_characters: 262`: the reference's inference
code adds 1 to every character id and puts a zero row in front of `char_embed` for masked positions; the file's
`char_embed` itself is the 261 training rows, which is what this package's ids index.
"""
from __future__ import annotations

import json
import os
from typing import Any

import ml_collections
import numpy as np

from common import storage
from common.config import UserError
from elmo_jax import model as elmo_model

OPTIONS_FILE = 'options.json'
WEIGHTS_FILE = 'weights.hdf5'
INFERENCE_N_CHARACTERS = 262

ARCHITECTURE_FIELDS = ('vocab_size', 'max_characters_per_token', 'char_embedding_dim', 'filters', 'activation',
                       'n_highway', 'projection_dim', 'lstm_dim', 'n_lstm_layers', 'cell_clip', 'proj_clip',
                       'use_skip_connections')


def options_from_config(cfg: ml_collections.ConfigDict) -> dict[str, Any]:
  """A model config as the reference's `options.json`."""
  return {
      'bidirectional': True,
      'char_cnn': {'activation': cfg.activation, 'embedding': {'dim': int(cfg.char_embedding_dim)},
                   'filters': [[int(w), int(n)] for w, n in cfg.filters],
                   'max_characters_per_token': int(cfg.max_characters_per_token),
                   'n_characters': INFERENCE_N_CHARACTERS, 'n_highway': int(cfg.n_highway)},
      'dropout': float(cfg.dropout),
      'lstm': {'cell_clip': float(cfg.cell_clip), 'dim': int(cfg.lstm_dim), 'n_layers': int(cfg.n_lstm_layers),
               'proj_clip': float(cfg.proj_clip), 'projection_dim': int(cfg.projection_dim),
               'use_skip_connections': bool(cfg.use_skip_connections)},
      'n_tokens_vocab': int(cfg.vocab_size),
  }


def config_from_options(options: dict[str, Any]) -> ml_collections.ConfigDict:
  """The model config of an `options.json` (missing clips mean none; `n_tokens_vocab` may be absent)."""
  try:
    cnn, lstm = options['char_cnn'], options['lstm']
    return elmo_model.model_config(
        vocab_size=int(options.get('n_tokens_vocab', 0)),
        max_characters_per_token=int(cnn['max_characters_per_token']),
        char_embedding_dim=int(cnn['embedding']['dim']), filters=[list(map(int, f)) for f in cnn['filters']],
        activation=cnn.get('activation', 'relu'), n_highway=int(cnn.get('n_highway') or 0),
        projection_dim=int(lstm['projection_dim']), lstm_dim=int(lstm['dim']),
        n_lstm_layers=int(lstm.get('n_layers', 1)),
        cell_clip=float(lstm.get('cell_clip') or 0.0), proj_clip=float(lstm.get('proj_clip') or 0.0),
        use_skip_connections=bool(lstm.get('use_skip_connections', False)), dropout=float(options.get('dropout', 0.0)))
  except (KeyError, TypeError, ValueError) as e:
    raise UserError(f'options.json: missing or bad field {e}') from e


def _cell_name(direction: int, layer: int) -> str:
  return f'RNN_{direction}/RNN/MultiRNNCell/Cell{layer}/LSTMCell'


def params_to_arrays(params: dict, cfg: ml_collections.ConfigDict) -> dict[str, np.ndarray]:
  """Model params -> `{dataset name: array}` in the reference layout (module docstring)."""
  encoder = params['token_encoder']
  arrays = {'char_embed': encoder['char_embed']}
  for i in range(len(cfg.filters)):
    arrays[f'CNN/W_cnn_{i}'] = np.asarray(encoder[f'conv_{i}_kernel'])[None]
    arrays[f'CNN/b_cnn_{i}'] = encoder[f'conv_{i}_bias']
  for k in range(cfg.n_highway):
    for ours, theirs in (('carry', 'carry'), ('transform', 'transform')):
      arrays[f'CNN_high_{k}/W_{theirs}'] = encoder[f'highway_{k}'][f'{ours}_kernel']
      arrays[f'CNN_high_{k}/b_{theirs}'] = encoder[f'highway_{k}'][f'{ours}_bias']
  arrays['CNN_proj/W_proj'] = encoder['projection']['kernel']
  arrays['CNN_proj/b_proj'] = encoder['projection']['bias']
  for direction, name in enumerate(('forward_lm', 'backward_lm')):
    for layer in range(cfg.n_lstm_layers):
      p = params[name][f'layer_{layer}']
      kernel = np.asarray(p['input_kernel']['kernel'])
      recurrent = np.asarray(p['cell']['recurrent_kernel'])
      cell = _cell_name(direction, layer)
      arrays[f'{cell}/W_0'] = np.concatenate([kernel.reshape(kernel.shape[0], -1),
                                              recurrent.reshape(recurrent.shape[0], -1)])
      arrays[f'{cell}/B'] = np.asarray(p['input_kernel']['bias']).reshape(-1)
      arrays[f'{cell}/W_P_0'] = p['cell']['projection']
  arrays['softmax/W'] = params['softmax_kernel']
  arrays['softmax/b'] = params['softmax_bias']
  return {k: np.asarray(v, np.float32) for k, v in arrays.items()}


def _take(arrays: dict[str, np.ndarray], name: str, shape: tuple) -> np.ndarray:
  if name not in arrays:
    raise UserError(f'weight file: no dataset {name!r}')
  value = np.asarray(arrays[name], np.float32)
  if value.size != int(np.prod(shape)):
    raise UserError(f'weight file: {name!r} has shape {value.shape}, options.json implies {shape}')
  return value.reshape(shape)


def arrays_to_params(arrays: dict[str, np.ndarray], cfg: ml_collections.ConfigDict) -> dict:
  """Inverse of `params_to_arrays`; a missing softmax becomes zeros of `cfg.vocab_size` rows."""
  e, d, p, n = cfg.char_embedding_dim, elmo_model.num_filters(cfg), cfg.projection_dim, cfg.lstm_dim
  encoder = {'char_embed': _take(arrays, 'char_embed', (cfg.char_vocab_size, e))}
  for i, (width, channels) in enumerate(cfg.filters):
    encoder[f'conv_{i}_kernel'] = _take(arrays, f'CNN/W_cnn_{i}', (width, e, channels))
    encoder[f'conv_{i}_bias'] = _take(arrays, f'CNN/b_cnn_{i}', (channels,))
  for k in range(cfg.n_highway):
    encoder[f'highway_{k}'] = {f'{g}_{part}': _take(arrays, f'CNN_high_{k}/{"W" if part == "kernel" else "b"}_{g}',
                                                    (d, d) if part == 'kernel' else (d,))
                               for g in ('carry', 'transform') for part in ('kernel', 'bias')}
  encoder['projection'] = {'kernel': _take(arrays, 'CNN_proj/W_proj', (d, p)),
                           'bias': _take(arrays, 'CNN_proj/b_proj', (p,))}
  params: dict[str, Any] = {'token_encoder': encoder}
  for direction, name in enumerate(('forward_lm', 'backward_lm')):
    params[name] = {}
    for layer in range(cfg.n_lstm_layers):
      cell = _cell_name(direction, layer)
      w = _take(arrays, f'{cell}/W_0', (p + p, 4 * n))
      params[name][f'layer_{layer}'] = {
          'input_kernel': {'kernel': w[:p].reshape(p, 4, n), 'bias': _take(arrays, f'{cell}/B', (4, n))},
          'cell': {'recurrent_kernel': w[p:].reshape(p, 4, n), 'projection': _take(arrays, f'{cell}/W_P_0', (n, p))}}
  vocab = cfg.vocab_size
  params['softmax_kernel'] = (_take(arrays, 'softmax/W', (vocab, p)) if 'softmax/W' in arrays
                              else np.zeros((vocab, p), np.float32))
  params['softmax_bias'] = (_take(arrays, 'softmax/b', (vocab,)) if 'softmax/b' in arrays
                            else np.zeros((vocab,), np.float32))
  return params


def write_weights(out_dir: str, params: dict, cfg: ml_collections.ConfigDict, vocabulary: Any = None) -> str:
  """Writes `options.json`, `weights.hdf5` (and `vocab.txt` when a vocabulary is given) to `out_dir`."""
  import h5py  # pylint: disable=import-outside-toplevel
  storage.makedirs(out_dir)
  storage.write_text(storage.join(out_dir, OPTIONS_FILE), json.dumps(options_from_config(cfg), indent=2) + '\n')
  local = storage.join(out_dir, WEIGHTS_FILE)
  if storage.is_remote(local):
    raise UserError(f'{out_dir}: HDF5 weights are written to a local directory only')
  with h5py.File(local, 'w') as f:
    for name, value in params_to_arrays(params, cfg).items():
      f.create_dataset(name, data=value)
  if vocabulary is not None:
    vocabulary.save(out_dir)
  return out_dir


def read_options(path: str) -> ml_collections.ConfigDict:
  """The model config of a directory's `options.json` (or of the file itself)."""
  options_file = path if path.endswith('.json') else storage.join(path, OPTIONS_FILE)
  if not storage.isfile(options_file):
    raise UserError(f'{path}: no {OPTIONS_FILE}')
  return config_from_options(storage.read_json(options_file))


def read_weights(path: str, weight_file: str | None = None) -> tuple[ml_collections.ConfigDict, dict]:
  """(model config, params) of a biLM directory (`options.json` + `weights.hdf5`), or of `options.json` and an
  explicitly named weight file (the published files are named e.g. `elmo_..._weights.hdf5`)."""
  import h5py  # pylint: disable=import-outside-toplevel
  cfg = read_options(path)
  weight_file = weight_file or storage.join(path, WEIGHTS_FILE)
  if not os.path.isfile(weight_file):
    raise UserError(f'{path}: no weight file {weight_file}')
  with h5py.File(weight_file, 'r') as f:
    arrays = {}
    f.visititems(lambda name, item: arrays.__setitem__(name, item[...]) if isinstance(item, h5py.Dataset) else None)
  if not cfg.vocab_size:
    cfg.vocab_size = int(arrays['softmax/b'].shape[0]) if 'softmax/b' in arrays else 1
  return cfg, arrays_to_params(arrays, cfg)


def load_dir(path: str, return_info: bool = False):
  """`Recipe.load_hf_dir`: (model config, params[, info]) of a biLM directory."""
  cfg, params = read_weights(path)
  return (cfg, params, {}) if return_info else (cfg, params)


def read_architecture(path: str) -> dict:
  return read_options(path).to_dict()


def export_workdir(workdir: str, out_dir: str) -> None:
  """The newest checkpoint of a training workdir as a biLM directory (with the run's vocabulary)."""
  from common import checkpoint  # pylint: disable=import-outside-toplevel
  from elmo_jax import tokenizer  # pylint: disable=import-outside-toplevel
  params, config = checkpoint.restore_params(workdir)
  vocab_file = storage.join(workdir, tokenizer.VOCAB_FILE)
  vocabulary = tokenizer.load_vocabulary(vocab_file) if storage.exists(vocab_file) else None
  write_weights(out_dir, params, config.model, vocabulary)
