"""Reading the original TensorFlow checkpoints (google-research/bert, zihangdai/xlnet); knows no model.

A release directory holds a checkpoint (`bert_model.ckpt.index` + `bert_model.ckpt.data-*`, or `xlnet_model.ckpt.*`),
its config file (`bert_config.json` / `xlnet_config.json`) and the tokenizer file (`vocab.txt` / `spiece.model`).
The checkpoint is read with TensorFlow's checkpoint reader (`tf.train.load_checkpoint`); TensorFlow is imported
only here, lazily, and only to read the checkpoint.

A model's importer describes the original layout as a *variable table*: one `Variable` per original variable name,
with the shape the config file implies and a function turning its value into our parameters (`{our path: array}`).
`map_variables` checks a checkpoint against the table and refuses, in one line naming them, every unknown variable,
every missing one and every wrong shape; what belongs to training rather than to the model (`global_step`, Adam
slots) is skipped. `define_flags` / `main` are the shared command line of `python -m <model>.import_tf`.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Iterable, Mapping, NamedTuple, Sequence

import numpy as np
from absl import flags, logging

from common import hf, storage
from common.config import UserError

INDEX_SUFFIX = '.index'
# Variables of the training loop, not of the model: the step counter, the slots of the original optimizers
# (BERT's and XLNet's AdamWeightDecayOptimizer: `<var>/adam_m`, `<var>/adam_v`; tf.train.AdamOptimizer: `<var>/Adam`,
# `<var>/Adam_1`, `beta1_power`, `beta2_power`).
TRAINING_STATE_NAMES = ('global_step', 'beta1_power', 'beta2_power')
TRAINING_STATE_SUFFIXES = ('/adam_m', '/adam_v', '/Adam', '/Adam_1')
# Not a variable: the object graph TF2's object-based saving adds to a checkpoint.
OBJECT_GRAPH_KEY = '_CHECKPOINTABLE_OBJECT_GRAPH'


# A variable's value -> {our path: value}.
Converter = Callable[[np.ndarray], dict[str, np.ndarray]]


class Variable(NamedTuple):
  """One variable of the original layout: its name, its shape for the config, and `convert(value) -> {our path:
  array}` (one variable may become several of our parameters, e.g. per-layer slices)."""
  name: str
  shape: tuple[int, ...]
  convert: Converter


def to(path: str, fn: Callable[[np.ndarray], np.ndarray] | None = None) -> Converter:
  """A converter to one parameter of ours at `path`, through `fn` (default: as it is)."""
  return lambda x: {path: x if fn is None else fn(x)}


def per_layer(path_format: str) -> Converter:
  """A converter splitting a `[n_layer, ...]` variable into `path_format.format(i)` for every layer i."""
  return lambda x: {path_format.format(i): x[i] for i in range(x.shape[0])}


def is_training_state(name: str) -> bool:
  return name in TRAINING_STATE_NAMES or name.endswith(TRAINING_STATE_SUFFIXES)


def _names(names: Sequence[str], limit: int = 12) -> str:
  shown = ', '.join(names[:limit])
  return shown + (f' and {len(names) - limit} more' if len(names) > limit else '')


def import_tensorflow():
  """The `tensorflow` module, or a UserError saying how to install it."""
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  try:
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise UserError('reading an original TensorFlow checkpoint needs TensorFlow: pip install tensorflow-cpu') from e
  return tf


# ----------------------------------------------------------------------------------------------------------------
# Finding and reading a checkpoint.
# ----------------------------------------------------------------------------------------------------------------

def holds_checkpoint(path: str) -> bool:
  """Whether `path` is a checkpoint prefix or a directory holding a checkpoint (a `*.index` file)."""
  if storage.isfile(path + INDEX_SUFFIX):
    return True
  return storage.isdir(path) and bool(storage.glob(storage.join(path, '*' + INDEX_SUFFIX)))


def find_checkpoint(tf_dir: str, default_name: str) -> tuple[str, str]:
  """(the directory, the checkpoint prefix) for `tf_dir`: a checkpoint prefix (`DIR/model.ckpt-1000`), or a
  directory holding `default_name` (e.g. `bert_model.ckpt`), the checkpoint its `checkpoint` file names, or its
  only checkpoint. Anything else is a UserError naming what was found."""
  if storage.isfile(tf_dir + INDEX_SUFFIX):
    return storage.dirname(tf_dir), tf_dir
  if not storage.isdir(tf_dir):
    raise UserError(f'{tf_dir}: no such directory or checkpoint (expected a directory holding {default_name}.*)')
  if storage.isfile(storage.join(tf_dir, default_name + INDEX_SUFFIX)):
    return tf_dir, storage.join(tf_dir, default_name)
  if storage.isfile(storage.join(tf_dir, 'checkpoint')):
    latest = import_tensorflow().train.latest_checkpoint(tf_dir)
    if latest:
      return tf_dir, latest
  prefixes = sorted(p[:-len(INDEX_SUFFIX)] for p in storage.glob(storage.join(tf_dir, '*' + INDEX_SUFFIX)))
  if len(prefixes) == 1:
    return tf_dir, prefixes[0]
  if not prefixes:
    raise UserError(f'{tf_dir}: no TensorFlow checkpoint (no {default_name}{INDEX_SUFFIX} or other *{INDEX_SUFFIX} '
                    'file)')
  raise UserError(f'{tf_dir}: {len(prefixes)} checkpoints ({_names([storage.basename(p) for p in prefixes])}); '
                  'pass the one to import as --tf_dir DIR/NAME')


def read_checkpoint(prefix: str) -> tuple[dict[str, np.ndarray], list[str]]:
  """({name: float32 value} of the model's variables, names skipped as training state), read with
  `tf.train.load_checkpoint`. The training state (Adam slots: twice the model's size) is never loaded."""
  tf = import_tensorflow()
  try:
    reader = tf.train.load_checkpoint(prefix)
  except Exception as e:  # pylint: disable=broad-except  # TF raises several kinds for an unreadable checkpoint
    raise UserError(f'{prefix}: not a readable TensorFlow checkpoint ({" ".join(str(e).split())[:200]})') from e
  dtypes = reader.get_variable_to_dtype_map()
  names = sorted(n for n in dtypes if n != OBJECT_GRAPH_KEY)
  skipped = [n for n in names if is_training_state(n)]
  values = {}
  for name in names:
    if not is_training_state(name):  # float32, bfloat16 (TPU runs), float16 -> float32; anything else is refused
      value = reader.get_tensor(name)
      values[name] = np.asarray(value, np.float32) if dtypes[name].is_floating else np.asarray(value)
  return values, skipped


def read_config(directory: str, name: str) -> dict[str, Any]:
  """The JSON config file `directory/name` (e.g. `bert_config.json`), or a UserError naming it."""
  path = storage.join(directory, name)
  if not storage.isfile(path):
    raise UserError(f'{path}: no such file; the original checkpoint directory needs its {name}')
  try:
    return dict(storage.read_json(path))
  except ValueError as e:
    raise UserError(f'{path}: not valid JSON ({e})') from e


# ----------------------------------------------------------------------------------------------------------------
# Mapping variables to our parameters.
# ----------------------------------------------------------------------------------------------------------------

def map_variables(variables: Mapping[str, np.ndarray], table: Iterable[Variable], *, source: str, what: str,
                  tied: Mapping[str, str] | None = None) -> dict[str, np.ndarray]:
  """Our flat parameters (`{'a/b/c': float32 array}`) from the checkpoint's `variables` and the model's `table`.

  `tied`: optional variable -> the variable our model ties it to; when present it must equal its source. Any
  unknown variable, missing variable or wrong shape is a UserError naming them all (`source`: the checkpoint in
  the message; `what`: the layout, e.g. 'BERT (bert_config.json)').
  """
  table = list(table)
  variables = dict(variables)
  for name, src in (tied or {}).items():
    if name in variables and src in variables:
      value = variables.pop(name)
      if not np.array_equal(value, variables[src]):
        raise UserError(f'{source}: {name} differs from {src}; our model ties them, so this checkpoint cannot be '
                        'imported exactly')
  expected = {v.name: tuple(v.shape) for v in table}
  unknown = sorted(set(variables) - set(expected))
  missing = sorted(set(expected) - set(variables))
  bad_shapes = [f'{n} {tuple(variables[n].shape)} (expected {expected[n]})' for n in sorted(expected)
                if n in variables and tuple(variables[n].shape) != expected[n]]
  problems = []
  if unknown:
    problems.append(f'unknown variables ({len(unknown)}): {_names(unknown)}')
  if missing:
    problems.append(f'missing variables ({len(missing)}): {_names(missing)}')
  if bad_shapes:
    problems.append(f'wrong shapes ({len(bad_shapes)}): {_names(bad_shapes)}')
  if problems:
    raise UserError(f'{source} is not an original {what} checkpoint: ' + '; '.join(problems))
  flat: dict[str, np.ndarray] = {}
  for variable in table:
    for path, value in variable.convert(variables[variable.name]).items():
      if path in flat:
        raise ValueError(f'two variables map to {path}')  # a bug in the table
      flat[path] = np.ascontiguousarray(value, dtype=np.float32)
  return flat


def load(tf_dir: str, *, checkpoint_name: str, config_name: str, what: str,
         build: Callable[[dict[str, Any]], tuple[Any, list[Variable], dict[str, str]]],
         our_shapes: Callable[[Any], Mapping[str, tuple[int, ...]]]) -> tuple[Any, dict[str, Any], str]:
  """(our model config, our params tree, the directory) from an original checkpoint directory (or prefix).

  `build(config file dict) -> (our model config, variable table, tied variables)`; the parameters are checked
  against `our_shapes(cfg)` (a mismatch is a bug in the table, not in the checkpoint).
  """
  import_tensorflow()  # first: a missing TensorFlow is the first thing to fix
  directory, prefix = find_checkpoint(tf_dir, checkpoint_name)
  cfg, table, tied = build(read_config(directory, config_name))
  variables, skipped = read_checkpoint(prefix)
  if skipped:
    logging.info('%s: skipped %d training-state variables (%s)', prefix, len(skipped), _names(skipped, 4))
  flat = map_variables(variables, table, source=prefix, what=f'{what} ({config_name})', tied=tied)
  hf.check_state_dict(flat, our_shapes(cfg), what=f'{what} parameters imported from {prefix}')
  return cfg, hf.unflatten(flat), directory


def write_hf_dir(tf_dir: str, out: str, *, load: Callable[[str], tuple[Any, Any]],
                 save: Callable[[str, Any, Any, str | None, bool], list[str]], checkpoint_name: str,
                 tokenizer_name: str, do_lower_case: bool | None, default_lower_case: bool, origin: str) -> list[str]:
  """The release at `tf_dir` as a Hugging Face directory at `out`; returns the paths written.

  `load(tf_dir) -> (cfg, params)`; `save(out, cfg, params, tokenizer file or None, do_lower_case)` is the model's
  `save_hf_dir`, given `tokenizer_name` from the release directory (skipped with a warning when absent).
  `do_lower_case` None: `guess_lower_case(directory, default_lower_case)`. The model card names the checkpoint
  and `origin` (e.g. 'google-research/bert') instead of a training run.
  """
  cfg, params = load(tf_dir)
  directory, prefix = find_checkpoint(tf_dir, checkpoint_name)
  tokenizer = storage.join(directory, tokenizer_name)
  if not storage.isfile(tokenizer):
    logging.warning('%s not found: writing the model without tokenizer files', tokenizer)
    tokenizer = None
  if do_lower_case is None:
    do_lower_case = guess_lower_case(directory, default_lower_case)
  written = save(out, cfg, params, tokenizer, do_lower_case)
  card = storage.join(out, 'README.md')
  if card in written:
    config = storage.read_json(storage.join(out, hf.CONFIG_NAME))
    architecture = (config.get('architectures') or ['AutoModel'])[0]
    title = f"{config.get('model_type', 'model').upper()} converted from an original TensorFlow checkpoint"
    where = (f'Weights of the {origin} checkpoint `{storage.basename(prefix)}`, every variable mapped by its original '
             'name by\nxlnet-bert-jax and written in the Hugging Face layout '
             f'(`{architecture}`), float32 safetensors.')
    files = sorted(storage.basename(p) for p in written if p != card)
    storage.write_text(card, hf.model_card(config, files, origin=(title, where)))
  return written


def guess_lower_case(directory: str, default: bool) -> bool:
  """Whether a release lower-cases, from its directory name as Google named them (`uncased_L-12_H-768_A-12`,
  `cased_...`, `multi_cased_...`, `xlnet_cased_...`); `default` when the name says neither."""
  name = storage.basename(storage.absolute(directory)).lower()
  if 'uncased' in name:
    return True
  return False if 'cased' in name else default


# ----------------------------------------------------------------------------------------------------------------
# The command line of `python -m bert_jax.import_tf` / `python -m xlnet_jax.import_tf`.
# ----------------------------------------------------------------------------------------------------------------

def define_flags(checkpoint_name: str, config_name: str, tokenizer_name: str, lower_case_help: str) -> None:
  """`--tf_dir`, `--out`, `--do_lower_case` (default: `lower_case_help` says), `--activation`."""
  flags.DEFINE_string('tf_dir', None, f'Directory of the original release ({checkpoint_name}.index/.data-*, '
                      f'{config_name}, {tokenizer_name}), or a checkpoint prefix DIR/NAME.')
  flags.DEFINE_string('out', None, 'Hugging Face directory to write.')
  flags.DEFINE_bool('do_lower_case', None, f'Whether the tokenizer lower-cases (default: {lower_case_help}).')
  flags.DEFINE_string('activation', None, f'Replace the activation named in {config_name} (gelu: exact erf, '
                      'gelu_new: tanh approximation, relu).')
  flags.mark_flags_as_required(['tf_dir', 'out'])


def main(argv: list[str], import_dir: Callable[..., list[str]]) -> None:
  """Runs `import_dir(tf_dir, out, do_lower_case=..., activation=...)` from the flags and prints the paths written."""
  if len(argv) > 1:
    raise UserError(f'unexpected arguments: {" ".join(argv[1:])}')
  values = flags.FLAGS
  for path in import_dir(values.tf_dir, values.out, do_lower_case=values.do_lower_case,
                         activation=values.activation):
    print(path)
