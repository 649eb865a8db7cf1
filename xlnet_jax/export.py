"""XLNet to and from Hugging Face `transformers` (`XLNetLMHeadModel` key names and torch layouts).

Python API:
  params_to_hf(params, cfg)              our params -> `XLNetLMHeadModel.state_dict()` as numpy (torch layout)
  hf_to_params(state_dict, cfg)          the exact inverse
  config_to_hf(cfg) / config_from_hf(d)  our model config <-> `config.json`
  save_hf_dir(out_dir, cfg, params, spiece_model)
                                         a directory `XLNetLMHeadModel.from_pretrained` / `XLNetTokenizer` load
  load_hf_dir(path)                      (cfg, params) from an XLNetLMHeadModel / XLNetModel / task-head
                                         directory, offline; a missing LM bias is freshly initialised and task
                                         heads are ignored, both reported
  lm_logits(cfg, params, ...)            (logits, new_mems) of our model in eval mode
  export_workdir(workdir, out, step)     a training workdir's latest (or given) checkpoint -> Hugging Face dir

Command line (the checkpoint of a training run -> a Hugging Face directory):
  python -m xlnet_jax.export --workdir /tmp/xlnet_run --out /tmp/xlnet_hf [--step 10000]

Layouts: the q/k/v/o/r kernels are `[d_model, n_head, d_head]` in both (HF keeps them as bare parameters), as
are the biases `[n_head, d_head]`, `seg_embed [2, n_head, d_head]` and `mask_emb [1, 1, d_model]`; the FFN
kernels `[in, out]` are transposed to torch's `[out, in]`. `transformers` always has per-layer `r_w_bias`,
`r_r_bias`, `r_s_bias`: with `untie_r` False our shared biases are written into every layer, and read back only
if every layer holds the same values. The LM output layer `lm_loss.weight` is tied to the word embedding; the
files we write omit it, as `save_pretrained` does. `untie_r` and `dropatt` (which `transformers` lacks; it uses
`dropout` on attention probabilities) are kept in `config.json` as extra fields.
"""
from __future__ import annotations

import functools
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax.core import meta

from common import hf, layers
from common import run as run_lib
from xlnet_jax.model import XLNET_CONFIG_FIELDS, XLNetLMHeadModel, model_config

# Keys of `XLNetLMHeadModel.state_dict()` that are tied to another key (tied key -> source key).
TIED_KEYS = {'lm_loss.weight': 'transformer.word_embedding.weight'}
# Our parameters that a checkpoint without the LM head (XLNetModel, task models) may lack.
OPTIONAL_PREFIXES = ('lm_loss/',)
SHARED_BIASES = ('r_w_bias', 'r_r_bias', 'r_s_bias')

# Our activation name -> `transformers` `ff_activation`; and back. 'gelu' is the exact erf form in both.
_ACT_TO_HF = {'gelu': 'gelu', 'gelu_new': 'gelu_new', 'relu': 'relu'}
_ACT_FROM_HF = {'gelu': 'gelu', 'gelu_python': 'gelu', 'gelu_new': 'gelu_new', 'gelu_fast': 'gelu_new',
                'gelu_pytorch_tanh': 'gelu_new', 'relu': 'relu'}

SPECIAL_TOKENS = {'bos_token': '<s>', 'eos_token': '</s>', 'unk_token': '<unk>', 'sep_token': '<sep>',
                  'pad_token': '<pad>', 'cls_token': '<cls>', 'mask_token': '<mask>'}
ADDITIONAL_SPECIAL_TOKENS = ['<eop>', '<eod>']


# ----------------------------------------------------------------------------------------------------------------
# The key table: (our '/' path, HF keys, layout kind), and the layout built on it.
# ----------------------------------------------------------------------------------------------------------------

def _key_table(cfg: ml_collections.ConfigDict) -> list[tuple[str, tuple[str, ...], str]]:
  """Every parameter as (our path, HF keys, kind). A shared bias (`untie_r` False) maps to one key per layer."""
  table = [('transformer/word_embedding/embedding', ('transformer.word_embedding.weight',), 'same'),
           ('transformer/mask_emb', ('transformer.mask_emb',), 'same')]
  if not cfg.untie_r:
    for name in SHARED_BIASES:
      table.append((f'transformer/{name}',
                    tuple(f'transformer.layer.{i}.rel_attn.{name}' for i in range(cfg.n_layer)), 'same'))
  for i in range(cfg.n_layer):
    ours, theirs = f'transformer/layer_{i}', f'transformer.layer.{i}'
    for name in ('q', 'k', 'v', 'o', 'r'):
      table.append((f'{ours}/rel_attn/{name}/kernel', (f'{theirs}.rel_attn.{name}',), 'same'))
    names = (SHARED_BIASES if cfg.untie_r else ()) + ('seg_embed',)
    for name in names:
      table.append((f'{ours}/rel_attn/{name}', (f'{theirs}.rel_attn.{name}',), 'same'))
    for norm in ('rel_attn/layer_norm', 'ff/layer_norm'):
      dotted = norm.replace('/', '.')
      table.append((f'{ours}/{norm}/scale', (f'{theirs}.{dotted}.weight',), 'same'))
      table.append((f'{ours}/{norm}/bias', (f'{theirs}.{dotted}.bias',), 'same'))
    for dense in ('layer_1', 'layer_2'):
      table.append((f'{ours}/ff/{dense}/kernel', (f'{theirs}.ff.{dense}.weight',), 'dense'))
      table.append((f'{ours}/ff/{dense}/bias', (f'{theirs}.ff.{dense}.bias',), 'same'))
  table.append(('lm_loss/bias', ('lm_loss.bias',), 'same'))
  return table


def _our_shapes(cfg: ml_collections.ConfigDict) -> dict[str, tuple[int, ...]]:
  """Our parameter shapes by path, from the config alone."""
  d, n, dh, f, v = cfg.d_model, cfg.n_head, cfg.d_head, cfg.d_inner, cfg.vocab_size
  shapes = {'transformer/word_embedding/embedding': (v, d), 'transformer/mask_emb': (1, 1, d),
            'lm_loss/bias': (v,)}
  if not cfg.untie_r:
    shapes.update({f'transformer/{name}': (n, dh) for name in SHARED_BIASES})
  for i in range(cfg.n_layer):
    p = f'transformer/layer_{i}'
    shapes.update({f'{p}/rel_attn/{name}/kernel': (d, n, dh) for name in ('q', 'k', 'v', 'o', 'r')})
    if cfg.untie_r:
      shapes.update({f'{p}/rel_attn/{name}': (n, dh) for name in SHARED_BIASES})
    shapes[f'{p}/rel_attn/seg_embed'] = (2, n, dh)
    for norm in ('rel_attn/layer_norm', 'ff/layer_norm'):
      shapes[f'{p}/{norm}/scale'] = shapes[f'{p}/{norm}/bias'] = (d,)
    shapes.update({f'{p}/ff/layer_1/kernel': (d, f), f'{p}/ff/layer_1/bias': (f,),
                   f'{p}/ff/layer_2/kernel': (f, d), f'{p}/ff/layer_2/bias': (d,)})
  return shapes


def _to_torch(x: np.ndarray, kind: str) -> np.ndarray:
  return x.T if kind == 'dense' else x


def _from_torch(x: np.ndarray, kind: str, shape: tuple[int, ...]) -> np.ndarray:
  return (x.T if kind == 'dense' else x).reshape(shape)


def _normalise_keys(state_dict: Mapping[str, Any]) -> dict[str, Any]:
  """Bare `XLNetModel` keys (no `transformer.` prefix) -> `XLNetLMHeadModel` names."""
  bare = not any(k.startswith('transformer.') for k in state_dict) and 'word_embedding.weight' in state_dict
  out = {}
  for key, value in state_dict.items():
    if bare and key.split('.', 1)[0] in ('word_embedding', 'mask_emb', 'layer'):
      key = 'transformer.' + key
    out[key] = value
  return out


def _ignorable(key: str) -> bool:
  """Keys of task heads (sequence_summary, logits_proj, qa_outputs, ...); an unknown key under `transformer.` or
  `lm_loss.` is not ignorable."""
  return not key.startswith(('transformer.', 'lm_loss.'))


# How our params sit in `XLNetLMHeadModel.state_dict()`; the conversions below are its methods.
LAYOUT = hf.Layout(
    key_table=_key_table, our_shapes=_our_shapes, to_torch=_to_torch, from_torch=_from_torch, tied_keys=TIED_KEYS,
    root='transformer', name='XLNet', architecture='XLNetLMHeadModel', optional_prefixes=OPTIONAL_PREFIXES,
    normalise_keys=_normalise_keys, ignorable=_ignorable,
    shared_error=('{key} differs from {first}; with untie_r false our model shares one {name} across layers '
                  '(import with untie_r true instead)'))


# ----------------------------------------------------------------------------------------------------------------
# Parameters.
# ----------------------------------------------------------------------------------------------------------------

# `params_to_hf(params, cfg, *, include_tied=True)`: the inner `params` tree of `xlnet_jax.model.XLNetLMHeadModel`
# (shapes checked against `cfg`) -> `transformers.XLNetLMHeadModel` state dict (float32 numpy, torch layout). With
# `include_tied` the keys are exactly those of `XLNetLMHeadModel.state_dict()`, including the tied `lm_loss.weight`
# (= the word embedding).
# `hf_to_params(state_dict, cfg)`: the exact inverse (numpy or torch-layout arrays in, float32 numpy out). The tied
# `lm_loss.weight` may be present (it must equal the word embedding) or absent. Any missing or unexpected key, or a
# wrong shape, raises `common.hf.StateDictError` naming the keys; so does a per-layer bias that differs between
# layers when `cfg.untie_r` is False.
# `hf_shapes(cfg, *, include_tied=True)`: the `XLNetLMHeadModel.state_dict()` shapes by key for this config.
hf_shapes = LAYOUT.hf_shapes
params_to_hf = LAYOUT.params_to_hf
hf_to_params = LAYOUT.hf_to_params


# ----------------------------------------------------------------------------------------------------------------
# Config.
# ----------------------------------------------------------------------------------------------------------------

def config_to_hf(cfg: ml_collections.ConfigDict, *, pad_token_id: int | None = None,
                 special_token_ids: Mapping[str, int] | None = None) -> dict[str, Any]:
  """Our model config -> an `XLNetConfig` `config.json` dict for `XLNetLMHeadModel`.

  `transformers` requires `d_head == d_model // n_head`; other shapes raise ValueError naming `model.d_head`.
  """
  if cfg.ff_activation not in _ACT_TO_HF:
    raise ValueError(f'model.ff_activation: {cfg.ff_activation!r} has no transformers equivalent; '
                     f'choose one of {sorted(_ACT_TO_HF)}')
  if cfg.d_head * cfg.n_head != cfg.d_model:
    raise ValueError(f'model.d_head: transformers needs d_head * n_head == d_model, got {cfg.d_head} * '
                     f'{cfg.n_head} != {cfg.d_model}')
  out = {name: cfg[name] for name in XLNET_CONFIG_FIELDS}  # untie_r and dropatt ride along as extra fields.
  out.update(model_type='xlnet', architectures=['XLNetLMHeadModel'], ff_activation=_ACT_TO_HF[cfg.ff_activation],
             layer_norm_eps=float(cfg.layer_norm_eps), tie_word_embeddings=True, dtype='float32',
             use_mems_eval=True, use_mems_train=False)
  if pad_token_id is not None:
    out['pad_token_id'] = int(pad_token_id)
  for name, value in (special_token_ids or {}).items():
    out[name] = int(value)
  return out


def config_from_hf(hf_config: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """A `config.json` dict of an XLNet model -> our model config (`xlnet_jax.model.model_config`).

  Fields absent from the dict take the `XLNetConfig` defaults (XLNet-large, mem_len 512); a `mem_len` or
  `reuse_len` of None (no limit / no reuse in `transformers`) is 0 here (no memory / no reuse). `untie_r`
  defaults to true (`transformers` keeps per-layer biases) and `dropatt` to `dropout` (what `transformers`
  applies to attention probabilities). `n_token` is accepted for `vocab_size`.
  Raises ValueError naming the field for what our model cannot represent.
  """
  hf.require_model_type(hf_config, 'xlnet')
  act = hf_config.get('ff_activation', 'gelu')
  if act not in _ACT_FROM_HF:
    raise ValueError(f'config.json ff_activation: {act!r} is not supported; choose one of {sorted(_ACT_FROM_HF)}')
  attn_type = hf_config.get('attn_type', 'bi')
  if attn_type not in ('bi', 'uni'):
    raise ValueError(f'config.json attn_type: must be "bi" or "uni", got {attn_type!r}')
  defaults = model_config(mem_len=512)
  fields = {name: hf_config[name] for name in XLNET_CONFIG_FIELDS if name in hf_config}
  if 'vocab_size' not in fields and 'n_token' in hf_config:
    fields['vocab_size'] = hf_config['n_token']
  d_model = fields.get('d_model', defaults.d_model)
  n_head = fields.get('n_head', defaults.n_head)
  if fields.get('d_head') is None:
    fields['d_head'] = d_model // n_head
  fields['ff_activation'] = _ACT_FROM_HF[act]
  fields['mem_len'] = int(hf_config.get('mem_len', defaults.mem_len) or 0)
  fields['reuse_len'] = int(fields.get('reuse_len') or 0)
  fields['untie_r'] = bool(hf_config.get('untie_r', True))
  fields['dropatt'] = hf_config.get('dropatt', hf_config.get('dropout', defaults.dropout))
  for name in ('bi_data', 'same_length'):
    if name in fields:
      fields[name] = bool(fields[name])
  return model_config(**{**{k: defaults[k] for k in XLNET_CONFIG_FIELDS}, **fields})


# ----------------------------------------------------------------------------------------------------------------
# Directories.
# ----------------------------------------------------------------------------------------------------------------

def _spiece_token_ids(spiece_model: str, vocab_size: int) -> dict[str, int]:
  """`{pad_token_id, bos_token_id, eos_token_id}` from a sentencepiece model (only the pieces it has)."""
  import sentencepiece as spm  # Lazy: only needed with a tokenizer.
  sp = spm.SentencePieceProcessor(model_file=spiece_model)
  if sp.get_piece_size() > vocab_size:
    raise ValueError(f'{spiece_model}: {sp.get_piece_size()} pieces but model.vocab_size is {vocab_size}')
  ids = {}
  for field, token in (('pad_token_id', 'pad_token'), ('bos_token_id', 'bos_token'), ('eos_token_id', 'eos_token')):
    piece = SPECIAL_TOKENS[token]
    if sp.piece_to_id(piece) != sp.unk_id() or piece == sp.id_to_piece(sp.unk_id()):
      ids[field] = sp.piece_to_id(piece)
  missing = [t for t in list(SPECIAL_TOKENS.values()) + ADDITIONAL_SPECIAL_TOKENS
             if sp.piece_to_id(t) == sp.unk_id() and t != sp.id_to_piece(sp.unk_id())]
  if missing:
    logging.warning('%s lacks the special pieces %s', spiece_model, missing)
  return ids


def _tokenizer_config(do_lower_case: bool) -> dict[str, Any]:
  return dict(tokenizer_class='XLNetTokenizer', do_lower_case=bool(do_lower_case), remove_space=True,
              keep_accents=False, padding_side='left', clean_up_tokenization_spaces=False,
              additional_special_tokens=list(ADDITIONAL_SPECIAL_TOKENS), **SPECIAL_TOKENS)


def save_hf_dir(out_dir: str, cfg: ml_collections.ConfigDict, params: Mapping[str, Any],
                spiece_model: str | None = None, do_lower_case: bool = False) -> list[str]:
  """Writes a Hugging Face directory; returns the paths written.

  `model.safetensors` (float32, without the tied `lm_loss.weight`, like `save_pretrained`) and `config.json`
  load with `transformers.XLNetLMHeadModel.from_pretrained(out_dir)` with no missing or unexpected keys. With a
  sentencepiece `spiece_model` (at most `cfg.vocab_size` pieces) also `spiece.model`, `tokenizer_config.json`
  and `special_tokens_map.json`, for `transformers.XLNetTokenizer.from_pretrained`; the ids of <pad>, <s>, </s>
  go into `config.json`.
  """
  state_dict = params_to_hf(params, cfg, include_tied=False)
  token_ids, files, json_files = {}, {}, {}
  if spiece_model is not None:
    token_ids = _spiece_token_ids(spiece_model, cfg.vocab_size)
    files = {'spiece.model': spiece_model}
    json_files = {'tokenizer_config.json': _tokenizer_config(do_lower_case),
                  'special_tokens_map.json': dict(SPECIAL_TOKENS,
                                                  additional_special_tokens=list(ADDITIONAL_SPECIAL_TOKENS)),
                  # `generate` reads its special ids from here (transformers itself still warns that XLNet has no
                  # maximum length: its config reports -1 for every XLNet).
                  'generation_config.json': dict(token_ids, _from_model_config=True)}
  return hf.write_model_dir(out_dir, state_dict, config_to_hf(cfg, special_token_ids=token_ids), files, json_files)


def _from_tf(path: str):
  from xlnet_jax import import_tf  # pylint: disable=import-outside-toplevel  # it builds on this module
  return import_tf.load_tf_dir(path)


def load_hf_dir(path: str, *, rng: jax.Array | None = None, return_info: bool = False):
  """(cfg, params) from a Hugging Face XLNet directory, offline; params are float32 numpy in our layout.

  Reads `config.json` and `model.safetensors` (or sharded safetensors, or `pytorch_model.bin`). Accepts
  `XLNetLMHeadModel`, `XLNetModel` (keys without the `transformer.` prefix, no LM bias) and task directories such
  as `XLNetForSequenceClassification` (their heads are ignored). A missing `lm_loss.bias` is freshly initialised
  (zeros) from `rng` (default `PRNGKey(0)`); any other missing key is an error. What was initialised and what was
  ignored is logged, and returned as a third element `{'source', 'initialised', 'ignored'}` when `return_info`.
  A directory of an original zihangdai/xlnet release (`xlnet_model.ckpt.*`, `xlnet_config.json`, no
  `config.json`) is read by `xlnet_jax.import_tf`.
  """
  return hf.load_model_dir(path, LAYOUT, config_from_hf=config_from_hf, init_params=init_params, rng=rng,
                           return_info=return_info, from_tf=_from_tf)


# ----------------------------------------------------------------------------------------------------------------
# Running the model.
# ----------------------------------------------------------------------------------------------------------------

def init_params(cfg: ml_collections.ConfigDict, rng: jax.Array, only=None) -> dict[str, Any]:
  """Freshly initialised (unboxed) params of `XLNetLMHeadModel(cfg)` (one compiled init per config); just the
  paths `only` when given (a checkpoint without `lm_loss/bias`: the encoder's initialisers are never compiled)."""
  return layers.init_model_params(XLNetLMHeadModel, cfg, rng, shape=(2, 2), only=only)


def lm_logits(cfg: ml_collections.ConfigDict, params: Mapping[str, Any], input_ids, segment_ids=None,
              input_mask=None, perm_mask=None, target_mapping=None, mems=None):
  """Eval-mode forward of `XLNetLMHeadModel` (inputs as `xlnet_jax.model`; input_mask 1 = real token).

  Returns (logits float32 `[batch, P, vocab]` at `target_mapping [batch, P, length]` from the query stream, or
  `[batch, length, vocab]` from the content stream when it is None; new_mems, one `[batch, <= mem_len, d_model]`
  array per layer, empty when `cfg.mem_len` is 0).
  """
  as_int = lambda x: None if x is None else jnp.asarray(x, jnp.int32)  # noqa: E731
  as_float = lambda x: None if x is None else jnp.asarray(x, jnp.float32)  # noqa: E731
  mems = None if mems is None else [as_float(m) for m in mems]
  return XLNetLMHeadModel(cfg).apply({'params': meta.unbox(params)}, as_int(input_ids), as_int(segment_ids),
                                     as_int(input_mask), as_float(perm_mask), as_float(target_mapping), mems,
                                     deterministic=True)


# ----------------------------------------------------------------------------------------------------------------
# Command line.
# ----------------------------------------------------------------------------------------------------------------

def export_workdir(workdir: str, out: str, step: int | None = None) -> list[str]:
  """The params of a training workdir's latest (or `step`) checkpoint -> a Hugging Face directory at `out`.

  The model config is the run's `config.model`, lower-casing `config.data.do_lower_case` (default False), and
  the tokenizer `WORKDIR/spiece.model` (tokenizer files are skipped, with a warning, when it does not exist).
  """
  return hf.export_workdir(workdir, out, step, save=save_hf_dir, tokenizer_file='spiece.model',
                          default_lower_case=False, model=('XLNet', 'd_model'))


# The command-line flags, defined on demand so importing this module defines none; and the entry point.
define_flags = functools.partial(hf.define_export_flags, 'spiece.model')
main = functools.partial(hf.export_main, export=export_workdir)


if __name__ == '__main__':
  define_flags()
  run_lib.app_run(main)
