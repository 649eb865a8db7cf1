"""Plumbing for Hugging Face model directories, shared by every exporter and importer; knows no model.

A Hugging Face directory holds `config.json`, the weights as `model.safetensors` (or sharded with
`model.safetensors.index.json`; older directories: `pytorch_model.bin` / `pytorch_model.bin.index.json`) and the
tokenizer files. A *state dict* here is a flat `dict[str, np.ndarray]` keyed by dotted torch names, in torch
layout (a `Linear` weight is `[out, in]`). Our parameter trees are nested dicts; `flatten` / `unflatten` turn them
into `{'a/b/c': array}` and back.

A model's exporter describes how its parameters sit in its state dict with a `Layout` (key table, layout
conversions, tied keys, which heads may be missing), whose methods convert parameters both ways; this module
writes and reads whole directories (`write_model_dir`, `load_model_dir`) and turns a training workdir's checkpoint
into one (`export_workdir`, with the `--workdir/--out/--step` command line of `define_export_flags` /
`export_main`). The exporter keeps what is model-specific: the key table, `config.json` translation, tokenizer
files.

The files themselves (JSON, weights in every format) are read and written by `common.hf_files`. jax and flax are
imported only to convert parameter trees, orbax only to export a training run.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
from absl import app, flags, logging

from common import storage
from common.config import UserError
from common.hf_files import SAFETENSORS_NAME, read_json, read_weights, write_json, write_safetensors

CONFIG_NAME = 'config.json'


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


def flat_numpy_params(params: Mapping[str, Any], root: str) -> dict[str, np.ndarray]:
  """Our params (or `{'params': ...}` variables; `root` is the params' own top-level key), boxed or not, on device
  or host -> flat `{'a/b/c': float32 numpy}`."""
  import jax  # Lazy: only converting parameter trees needs jax and flax.
  from flax.core import meta
  params = meta.unbox(params)
  if 'params' in params and root not in params:
    params = params['params']
  return {k: np.asarray(jax.device_get(v), dtype=np.float32) for k, v in flatten(params).items()}


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


def untie(state_dict: dict[str, Any], tied_keys: Mapping[str, str]) -> None:
  """Removes the tied keys (`tied_keys`: tied key -> source key) in place, after checking that they equal their
  sources; a tied key whose source is absent takes its place."""
  for tied, src in tied_keys.items():
    if tied not in state_dict:
      continue
    value = state_dict.pop(tied)
    if src not in state_dict:
      state_dict[src] = value
    elif not np.array_equal(np.asarray(state_dict[src]), np.asarray(value)):
      raise StateDictError(f'{tied} differs from {src}; our model ties them, so an untied checkpoint cannot be '
                           'imported exactly')


# ----------------------------------------------------------------------------------------------------------------
# A model's layout: our flat parameters <-> its state dict.
# ----------------------------------------------------------------------------------------------------------------

# A key table lists every parameter as (our '/' path, HF keys, layout kind): one HF key, or one per layer where
# `transformers` stores in every layer what our model holds once.
KeyTable = Sequence[tuple[str, tuple[str, ...], str]]


@dataclasses.dataclass(frozen=True)
class Layout:
  """How one model's parameters sit in its `transformers` state dict; the methods convert between the two.

  Attributes:
    key_table: `cfg -> KeyTable`, every parameter of the model built from `cfg`.
    our_shapes: `cfg -> {our path: shape}`.
    to_torch: `(x, kind) -> x` in torch layout; from_torch: `(x, kind, our shape) -> x` in ours.
    tied_keys: tied HF key -> its source HF key (the files we write omit tied keys, as `save_pretrained` does).
    root: the top-level key of our params tree (tells it from `{'params': ...}` variables).
    name: the model in messages ('our {name} params', 'Hugging Face {name} state dict').
    architecture: the `transformers` class the state dict belongs to, in messages.
    optional_prefixes: our paths that a checkpoint without some heads may lack (`load_model_dir` initialises them).
    normalise_keys: `state_dict -> state_dict` with other spellings of the keys (legacy names, a bare encoder's
      keys) renamed to ours, for `load_model_dir`.
    ignorable: `key -> bool`, keys of heads our model lacks, which `load_model_dir` ignores.
    shared_error: the message when the HF keys of one parameter differ (fields `key`, `first`, `name`: the last
      component of our path).
  """
  key_table: Callable[[Any], KeyTable]
  our_shapes: Callable[[Any], Mapping[str, tuple[int, ...]]]
  to_torch: Callable[[np.ndarray, str], np.ndarray]
  from_torch: Callable[[np.ndarray, str, tuple[int, ...]], np.ndarray]
  tied_keys: Mapping[str, str]
  root: str
  name: str
  architecture: str
  optional_prefixes: tuple[str, ...] = ()
  normalise_keys: Callable[[Mapping[str, Any]], dict[str, Any]] = dict
  ignorable: Callable[[str], bool] | None = None
  shared_error: str = '{key} differs from {first}; our model holds one {name} for all of them'

  def hf_shapes(self, cfg: Any, *, include_tied: bool = True) -> dict[str, tuple[int, ...]]:
    """The state-dict shapes by HF key for this config (with `include_tied`, the tied keys too)."""
    ours = self.our_shapes(cfg)
    shapes = {key: self.to_torch(np.empty(ours[path], np.float32), kind).shape
              for path, keys, kind in self.key_table(cfg) for key in keys}
    if include_tied:
      shapes.update({tied: shapes[src] for tied, src in self.tied_keys.items()})
    return shapes

  def params_to_hf(self, params: Mapping[str, Any], cfg: Any, *, include_tied: bool = True) -> dict[str, np.ndarray]:
    """Our params (checked against `cfg`) -> the state dict (float32 numpy, torch layout, every key its own copy);
    with `include_tied` the tied keys too, as copies of their sources."""
    flat = flat_numpy_params(params, self.root)
    check_state_dict(flat, self.our_shapes(cfg), what=f'our {self.name} params')
    out = {}
    for path, keys, kind in self.key_table(cfg):
      value = np.ascontiguousarray(self.to_torch(flat[path], kind))
      out.update({key: value.copy() for key in keys})
    if include_tied:
      out.update({tied: out[src].copy() for tied, src in self.tied_keys.items()})
    return out

  def hf_to_flat(self, state_dict: Mapping[str, Any], cfg: Any, *, allow_missing: Iterable[str] = (),
                 ignore_unexpected: Callable[[str], bool] | None = None
                 ) -> tuple[dict[str, np.ndarray], list[str], list[str]]:
    """(our flat float32 params present in the state dict, HF keys missing but allowed, HF keys ignored).

    Tied keys may be present (they must equal their sources, see `untie`) or absent; otherwise the keys and shapes
    must match (`check_state_dict`), and the HF keys of one parameter must hold the same values (`shared_error`).
    """
    sd = {k: np.asarray(v) for k, v in state_dict.items()}
    untie(sd, self.tied_keys)
    missing, ignored = check_state_dict(sd, self.hf_shapes(cfg, include_tied=False), allow_missing=allow_missing,
                                        ignore_unexpected=ignore_unexpected,
                                        what=f'Hugging Face {self.name} state dict')
    shapes = self.our_shapes(cfg)
    flat = {}
    for path, (first, *rest), kind in self.key_table(cfg):
      if first not in sd:
        continue
      for key in rest:
        if not np.array_equal(sd[key], sd[first]):
          raise StateDictError(self.shared_error.format(key=key, first=first, name=path.rsplit('/', 1)[-1]))
      flat[path] = self.from_torch(sd[first], kind, shapes[path]).astype(np.float32)
    return flat, missing, ignored

  def hf_to_params(self, state_dict: Mapping[str, Any], cfg: Any) -> dict[str, Any]:
    """The exact inverse of `params_to_hf`: a state dict (numpy or torch-layout arrays) -> our params (float32
    numpy); any missing or unexpected key or wrong shape raises `StateDictError` naming the keys."""
    flat, _, _ = self.hf_to_flat(state_dict, cfg)
    return unflatten(flat)

  def optional_keys(self, cfg: Any) -> list[str]:
    """The HF keys of our parameters under `optional_prefixes`."""
    return [key for ours, keys, _ in self.key_table(cfg) if ours.startswith(self.optional_prefixes) for key in keys]


def write_config(out_dir: str, config: Mapping[str, Any]) -> str:
  """Writes `out_dir/config.json`; returns its path."""
  storage.makedirs(out_dir)
  path = storage.join(out_dir, CONFIG_NAME)
  write_json(path, dict(config))
  return path


def read_config(model_dir: str) -> dict[str, Any]:
  """Reads `model_dir/config.json`; a missing directory or file raises FileNotFoundError naming the path."""
  if not storage.isdir(model_dir):
    raise FileNotFoundError(f'{model_dir}: not a directory (expected a Hugging Face model directory)')
  path = storage.join(model_dir, CONFIG_NAME)
  if not storage.isfile(path):
    raise FileNotFoundError(f'{path}: no such file; a Hugging Face model directory needs a {CONFIG_NAME}')
  return read_json(path)


def require_model_type(hf_config: Mapping[str, Any], model_type: str) -> None:
  """Raises ValueError unless the `model_type` of a `config.json` dict (absent: fine) is `model_type`."""
  found = hf_config.get('model_type', model_type)
  if found != model_type:
    raise ValueError(f'config.json model_type: expected "{model_type}", got {found!r}')


# ----------------------------------------------------------------------------------------------------------------
# Tokenizer files.
# ----------------------------------------------------------------------------------------------------------------

def copy_files(out_dir: str, files: Mapping[str, str]) -> list[str]:
  """Copies `{name in out_dir: source path}`; a missing source raises FileNotFoundError naming it."""
  storage.makedirs(out_dir)
  written = []
  for name, src in files.items():
    if not storage.isfile(src):
      raise FileNotFoundError(f'{src}: no such file (to be copied to {storage.join(out_dir, name)})')
    dst = storage.join(out_dir, name)
    if not storage.same_file(src, dst):
      storage.copy_file(src, dst)
    written.append(dst)
  return written


def read_vocab(path: str) -> list[str]:
  """One token a line (WordPiece `vocab.txt`); the id of a token is its line number from 0."""
  lines = storage.read_text(path).split('\n')
  if lines and lines[-1] == '':
    lines.pop()  # The newline that ends the last line.
  return [line.rstrip('\r') for line in lines]


# ----------------------------------------------------------------------------------------------------------------
# Model directories.
# ----------------------------------------------------------------------------------------------------------------

def write_model_dir(out_dir: str, state_dict: Mapping[str, np.ndarray], config: Mapping[str, Any],
                    files: Mapping[str, str] | None = None,
                    json_files: Mapping[str, Any] | None = None) -> list[str]:
  """Writes `model.safetensors`, `config.json`, copies of `files` (`{name: source path}`, e.g. the tokenizer's
  vocabulary) and `json_files` (`{name: content}`, e.g. `tokenizer_config.json`) into `out_dir`; returns the paths
  written, in that order."""
  storage.makedirs(out_dir)
  weights = storage.join(out_dir, SAFETENSORS_NAME)
  write_safetensors(weights, state_dict)
  written = [weights, write_config(out_dir, config)]
  written += copy_files(out_dir, files or {})
  json_files = dict(json_files or {})
  if 'README.md' not in (files or {}):
    card = storage.join(out_dir, 'README.md')
    storage.write_text(card, model_card(config, sorted([SAFETENSORS_NAME, CONFIG_NAME, *(files or {}), *json_files])))
    written.append(card)
  for name, content in (json_files or {}).items():
    path = storage.join(out_dir, name)
    write_json(path, content)
    written.append(path)
  logging.info('wrote %s', ', '.join(written))
  return written


CARD_FIELDS = ('vocab_size', 'hidden_size', 'num_hidden_layers', 'num_attention_heads', 'intermediate_size',
               'max_position_embeddings', 'd_model', 'n_layer', 'n_head', 'd_inner', 'mem_len', 'untie_r')


def model_card(config: Mapping[str, Any], files: list[str], origin: tuple[str, str] | None = None) -> str:
  """A model card (README.md) for an exported directory: what the model is, its sizes, its files, how to load it.
  `origin`: (title, paragraph) saying where the weights come from, when not from a training run."""
  architecture = (config.get('architectures') or ['AutoModel'])[0]
  title, where = origin or (
      f"{config.get('model_type', 'model').upper()} exported from an xlnet-bert-jax training run",
      'Weights trained with the JAX/Flax trainer of xlnet-bert-jax and written in the Hugging Face layout\n'
      f"(`{architecture}`), float32 safetensors. The training run's own config (data, optimizer, steps) is the\n"
      "`config.json` of its workdir; this directory's `config.json` is the model's.")
  sizes = '\n'.join(f'| `{k}` | {config[k]} |' for k in CARD_FIELDS if k in config)
  return f"""---
library_name: transformers
tags:
- {config.get('model_type', 'transformer')}
- jax
- flax
---

# {title}

{where}

| field | value |
| --- | --- |
{sizes}

Files: {', '.join(f'`{f}`' for f in files)}.

```python
import transformers
model = transformers.{architecture}.from_pretrained('PATH')
```
"""


def load_model_dir(path: str, layout: Layout, *, config_from_hf: Callable[[Mapping[str, Any]], Any],
                   init_params: Callable[[Any, Any], Mapping[str, Any]], rng: Any = None,
                   return_info: bool = False, from_tf: Callable[[str], tuple[Any, Any]] | None = None,
                   subtree: str | None = None):
  """(cfg, params) from a Hugging Face directory, offline; params are float32 numpy in our layout.

  `cfg = config_from_hf(config.json)`; the weights (`read_weights`, keys renamed by `layout.normalise_keys`) may
  lack the keys of `layout.optional_keys(cfg)`, and keys for which `layout.ignorable` holds are ignored. Our
  parameters still missing are taken from `init_params(cfg, rng, only=paths)` (a params tree holding at least
  those paths; `rng` defaults to `PRNGKey(0)`). What was initialised and what was ignored is logged, and returned
  as a third element `{'source', 'initialised', 'ignored'}` when `return_info`.

  A directory without `config.json` that holds an original TensorFlow checkpoint is read by `from_tf(path) ->
  (cfg, params)` when given (every parameter comes from the checkpoint: nothing initialised or ignored).

  `subtree` (a top-level key, e.g. 'bert'): only the parameters under it are returned, and only those are
  initialised when missing (fine-tuning takes the encoder; a directory without pretraining heads then costs no
  compilation of their initialisers).
  """
  from common import tf_checkpoint  # pylint: disable=import-outside-toplevel  # it builds on this module
  if from_tf is not None and not storage.isfile(storage.join(path, CONFIG_NAME)) \
      and tf_checkpoint.holds_checkpoint(path):
    cfg, params = from_tf(path)
    return (cfg, params, dict(source=path, initialised=[], ignored=[])) if return_info else (cfg, params)
  cfg = config_from_hf(read_config(path))
  state_dict, source = read_weights(path)
  state_dict = layout.normalise_keys(state_dict)
  flat, missing, ignored = layout.hf_to_flat(state_dict, cfg, allow_missing=layout.optional_keys(cfg),
                                             ignore_unexpected=layout.ignorable)
  if subtree is not None:
    flat = {k: v for k, v in flat.items() if k.startswith(subtree + '/')}
  initialised = sorted(k for k in set(layout.our_shapes(cfg)) - set(flat)
                       if subtree is None or k.startswith(subtree + '/'))
  if initialised:
    import jax  # Lazy: only initialising missing parameters needs jax.
    rng = jax.random.PRNGKey(0) if rng is None else rng
    fresh = flat_numpy_params(init_params(cfg, rng, only=initialised), layout.root)
    flat.update({k: fresh[k] for k in initialised})
    logging.warning('%s has no %s: freshly initialised %s', source, ', '.join(missing), ', '.join(initialised))
  if ignored:
    logging.warning('%s: ignored keys our %s has no use for: %s', source, layout.architecture, ', '.join(ignored))
  params = unflatten(flat)
  if return_info:
    return cfg, params, dict(source=source, initialised=initialised, ignored=ignored)
  return cfg, params


# ----------------------------------------------------------------------------------------------------------------
# Exporting a training run.
# ----------------------------------------------------------------------------------------------------------------

def export_workdir(workdir: str, out: str, step: int | None, *, save: Callable[..., list[str]], tokenizer_file: str,
                   default_lower_case: bool, model: tuple[str, str] | None = None) -> list[str]:
  """The params of a training workdir's latest (or `step`) checkpoint -> a Hugging Face directory at `out`.

  Calls `save(out, config.model, params, tokenizer_path, do_lower_case)` with the run's model config, lower-casing
  `config.data.do_lower_case` (default `default_lower_case`) and `WORKDIR/<tokenizer_file>`, or None (with a
  warning: the tokenizer files are skipped) when that does not exist.
  """
  from common.checkpoint import read_config, restore_params  # Pulls in orbax only when exporting a run.
  if model is not None:  # (name, a field only that model's config has): refuse another model's workdir in one line
    fields = sorted(read_config(workdir).get('model', {}).keys())
    if model[1] not in fields:
      raise UserError(f'{workdir} is not a {model[0]} run (its config.model has no {model[1]}; fields: '
                      f'{", ".join(fields[:8])}...): use the export command of the model it trained')
  params, config = restore_params(workdir, step=step)
  cfg = config.model
  data = config.get('data', None)
  do_lower_case = bool(data.get('do_lower_case', default_lower_case)) if data is not None else default_lower_case
  tokenizer_path = storage.join(workdir, tokenizer_file)
  if not storage.isfile(tokenizer_path):
    logging.warning('%s not found: writing the model without tokenizer files', tokenizer_path)
    tokenizer_path = None
  return save(out, cfg, params, tokenizer_path, do_lower_case)


def define_export_flags(tokenizer_file: str) -> None:
  """The flags of an export command line (`--workdir`, `--out`, `--step`); `tokenizer_file` is named in the help."""
  flags.DEFINE_string('workdir', None, f'Training workdir holding checkpoints/, config.json and {tokenizer_file}.')
  flags.DEFINE_string('out', None, 'Hugging Face directory to write.')
  flags.DEFINE_integer('step', None, 'Checkpoint step to export (default: the latest).')
  flags.mark_flags_as_required(['workdir', 'out'])


def export_main(argv: list[str], export: Callable[[str, str, int | None], list[str]]) -> None:
  """Runs `export(workdir, out, step)` from the flags of `define_export_flags` and prints the paths written."""
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  for path in export(flags.FLAGS.workdir, flags.FLAGS.out, flags.FLAGS.step):
    print(path)
