"""BERT to and from Hugging Face `transformers` (`BertForPreTraining` key names and torch layouts).

Python API:
  params_to_hf(params, cfg)              our params -> `BertForPreTraining.state_dict()` as numpy (torch layout)
  hf_to_params(state_dict, cfg)          the exact inverse
  config_to_hf(cfg) / config_from_hf(d)  our model config <-> `config.json`
  save_hf_dir(out_dir, cfg, params, vocab_file, do_lower_case)
                                         a directory `BertForPreTraining.from_pretrained` / `BertTokenizer` load
  load_hf_dir(path)                      (cfg, params) from a BertForPreTraining / BertForMaskedLM / BertModel /
                                         BertForSequenceClassification directory, offline; missing heads are
                                         freshly initialised, classifier heads ignored, both reported
  pretraining_logits(cfg, params, ...)   (mlm_logits, nsp_logits) of our model in eval mode
  export_workdir(workdir, out, step)     a training workdir's latest (or given) checkpoint -> Hugging Face dir

Command line (the checkpoint of a training run -> a Hugging Face directory):
  python -m bert_jax.export --workdir /tmp/bert_run --out /tmp/bert_hf [--step 10000]

Layouts: our attention kernels are `[hidden, heads, head_dim]` (query/key/value, bias `[heads, head_dim]`) and
`[heads, head_dim, hidden]` (attention output); torch `Linear.weight` is `[out, in]`, so a query kernel becomes
`kernel.reshape(hidden, heads * head_dim).T` (head-major, as `transformers` splits heads). Every other dense
kernel `[in, out]` is transposed. The MLM decoder is tied to the word embedding and its bias is
`cls.predictions.bias`; the files we write omit the two tied keys, as `save_pretrained` does.
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

from bert_jax.model import BERT_CONFIG_FIELDS, BertForPreTraining, model_config
from common import hf, layers
from common import run as run_lib

# Keys of `BertForPreTraining.state_dict()` that are tied to another key (tied key -> source key).
TIED_KEYS = {
    'cls.predictions.decoder.weight': 'bert.embeddings.word_embeddings.weight',
    'cls.predictions.decoder.bias': 'cls.predictions.bias',
}
# Our parameters that a checkpoint without pretraining heads (BertModel, BertForMaskedLM, ...) may lack.
OPTIONAL_PREFIXES = ('bert/pooler/', 'mlm_transform/', 'mlm_LayerNorm/', 'mlm_output_bias', 'nsp/')
# Old key spellings found in some `pytorch_model.bin` files.
_LEGACY_SUFFIXES = (('.gamma', '.weight'), ('.beta', '.bias'))
# Keys that carry no parameter (buffers written by older `transformers` versions).
_BUFFER_KEYS = ('bert.embeddings.position_ids',)

# Our activation name -> `transformers` `hidden_act`; and back. 'gelu' is the exact erf form in both.
_ACT_TO_HF = {'gelu': 'gelu', 'gelu_new': 'gelu_new', 'gelu_tanh': 'gelu_new',
              'gelu_pytorch_tanh': 'gelu_pytorch_tanh', 'relu': 'relu', 'tanh': 'tanh'}
_ACT_FROM_HF = {'gelu': 'gelu', 'gelu_python': 'gelu', 'gelu_new': 'gelu_new', 'gelu_fast': 'gelu_new',
                'gelu_pytorch_tanh': 'gelu_pytorch_tanh', 'relu': 'relu', 'tanh': 'tanh'}

SPECIAL_TOKENS = {'unk_token': '[UNK]', 'sep_token': '[SEP]', 'pad_token': '[PAD]', 'cls_token': '[CLS]',
                  'mask_token': '[MASK]'}


# ----------------------------------------------------------------------------------------------------------------
# The key table: (our '/' path, (HF key,), layout kind), and the layout built on it.
# ----------------------------------------------------------------------------------------------------------------

def _key_table(cfg: ml_collections.ConfigDict) -> list[tuple[str, tuple[str], str]]:
  """Every parameter as (our path, (HF key,), kind); kind says how the layouts differ (see `_to_torch`)."""
  table = []

  def dense(ours, theirs, kind='dense'):
    table.append((f'{ours}/kernel', (f'{theirs}.weight',), kind))
    table.append((f'{ours}/bias', (f'{theirs}.bias',), 'heads_bias' if kind == 'heads_in' else 'same'))

  def norm(ours, theirs):
    table.append((f'{ours}/scale', (f'{theirs}.weight',), 'same'))
    table.append((f'{ours}/bias', (f'{theirs}.bias',), 'same'))

  for name in ('word_embeddings', 'position_embeddings', 'token_type_embeddings'):
    table.append((f'bert/embeddings/{name}/embedding', (f'bert.embeddings.{name}.weight',), 'same'))
  norm('bert/embeddings/LayerNorm', 'bert.embeddings.LayerNorm')
  for i in range(cfg.num_hidden_layers):
    ours, theirs = f'bert/layer_{i}', f'bert.encoder.layer.{i}'
    for name in ('query', 'key', 'value'):
      dense(f'{ours}/{name}', f'{theirs}.attention.self.{name}', 'heads_in')
    dense(f'{ours}/attention_output', f'{theirs}.attention.output.dense', 'heads_out')
    norm(f'{ours}/attention_LayerNorm', f'{theirs}.attention.output.LayerNorm')
    dense(f'{ours}/intermediate', f'{theirs}.intermediate.dense')
    dense(f'{ours}/output', f'{theirs}.output.dense')
    norm(f'{ours}/output_LayerNorm', f'{theirs}.output.LayerNorm')
  dense('bert/pooler', 'bert.pooler.dense')
  dense('mlm_transform', 'cls.predictions.transform.dense')
  norm('mlm_LayerNorm', 'cls.predictions.transform.LayerNorm')
  table.append(('mlm_output_bias', ('cls.predictions.bias',), 'same'))
  dense('nsp', 'cls.seq_relationship')
  return table


def _our_shapes(cfg: ml_collections.ConfigDict) -> dict[str, tuple[int, ...]]:
  """Our parameter shapes by path, from the config alone."""
  h, heads, f, v = cfg.hidden_size, cfg.num_attention_heads, cfg.intermediate_size, cfg.vocab_size
  d = h // heads
  shapes = {
      'bert/embeddings/word_embeddings/embedding': (v, h),
      'bert/embeddings/position_embeddings/embedding': (cfg.max_position_embeddings, h),
      'bert/embeddings/token_type_embeddings/embedding': (cfg.type_vocab_size, h),
      'bert/embeddings/LayerNorm/scale': (h,), 'bert/embeddings/LayerNorm/bias': (h,),
      'bert/pooler/kernel': (h, h), 'bert/pooler/bias': (h,),
      'mlm_transform/kernel': (h, h), 'mlm_transform/bias': (h,),
      'mlm_LayerNorm/scale': (h,), 'mlm_LayerNorm/bias': (h,), 'mlm_output_bias': (v,),
      'nsp/kernel': (h, 2), 'nsp/bias': (2,),
  }
  for i in range(cfg.num_hidden_layers):
    p = f'bert/layer_{i}'
    for name in ('query', 'key', 'value'):
      shapes[f'{p}/{name}/kernel'] = (h, heads, d)
      shapes[f'{p}/{name}/bias'] = (heads, d)
    shapes.update({
        f'{p}/attention_output/kernel': (heads, d, h), f'{p}/attention_output/bias': (h,),
        f'{p}/attention_LayerNorm/scale': (h,), f'{p}/attention_LayerNorm/bias': (h,),
        f'{p}/intermediate/kernel': (h, f), f'{p}/intermediate/bias': (f,),
        f'{p}/output/kernel': (f, h), f'{p}/output/bias': (h,),
        f'{p}/output_LayerNorm/scale': (h,), f'{p}/output_LayerNorm/bias': (h,),
    })
  return shapes


def _to_torch(x: np.ndarray, kind: str) -> np.ndarray:
  if kind == 'same':
    return x
  if kind == 'dense':  # [in, out] -> [out, in]
    return x.T
  if kind == 'heads_in':  # [hidden, heads, head_dim] -> [heads * head_dim, hidden]
    return x.reshape(x.shape[0], -1).T
  if kind == 'heads_bias':  # [heads, head_dim] -> [heads * head_dim]
    return x.reshape(-1)
  if kind == 'heads_out':  # [heads, head_dim, hidden] -> [hidden, heads * head_dim]
    return x.reshape(-1, x.shape[-1]).T
  raise ValueError(kind)


def _from_torch(x: np.ndarray, kind: str, shape: tuple[int, ...]) -> np.ndarray:
  """Inverse of `_to_torch`; `shape` is our shape."""
  if kind in ('dense', 'heads_in', 'heads_out'):
    x = x.T
  return x.reshape(shape)


def _normalise_keys(state_dict: Mapping[str, Any]) -> dict[str, Any]:
  """Legacy spellings (`LayerNorm.gamma/beta`) and bare `BertModel` keys (no `bert.` prefix) -> our HF names."""
  out = {}
  bare = not any(k.startswith('bert.') for k in state_dict) and any(k.startswith('embeddings.') for k in state_dict)
  for key, value in state_dict.items():
    for old, new in _LEGACY_SUFFIXES:
      if key.endswith(old):
        key = key[:-len(old)] + new
    if bare and key.split('.', 1)[0] in ('embeddings', 'encoder', 'pooler'):
      key = 'bert.' + key
    out[key] = value
  return out


def _ignorable(key: str) -> bool:
  """Keys of other heads (classifier, qa_outputs, ...) and buffers; an unknown key under `bert.`/`cls.` is not."""
  return key in _BUFFER_KEYS or not key.startswith(('bert.', 'cls.'))


# How our params sit in `BertForPreTraining.state_dict()`; the conversions below are its methods.
LAYOUT = hf.Layout(
    key_table=_key_table, our_shapes=_our_shapes, to_torch=_to_torch, from_torch=_from_torch, tied_keys=TIED_KEYS,
    root='bert', name='BERT', architecture='BertForPreTraining', optional_prefixes=OPTIONAL_PREFIXES,
    normalise_keys=_normalise_keys, ignorable=_ignorable)


# ----------------------------------------------------------------------------------------------------------------
# Parameters.
# ----------------------------------------------------------------------------------------------------------------

# `params_to_hf(params, cfg, *, include_tied=True)`: the inner `params` tree of `bert_jax.model.BertForPreTraining`
# (shapes checked against `cfg`) -> `transformers.BertForPreTraining` state dict (float32 numpy, torch layout). With
# `include_tied` the keys are exactly those of `BertForPreTraining.state_dict()`, including the tied
# `cls.predictions.decoder.weight` (= word embedding) and `cls.predictions.decoder.bias` (= cls.predictions.bias).
# `hf_to_params(state_dict, cfg)`: the exact inverse (numpy or torch layout arrays in, float32 numpy out). The tied
# decoder keys may be present (they must equal their sources) or absent. Any missing or unexpected key, or a wrong
# shape, raises `common.hf.StateDictError` naming the keys.
# `hf_shapes(cfg, *, include_tied=True)`: the `BertForPreTraining.state_dict()` shapes by key for this config.
hf_shapes = LAYOUT.hf_shapes
params_to_hf = LAYOUT.params_to_hf
hf_to_params = LAYOUT.hf_to_params


# ----------------------------------------------------------------------------------------------------------------
# Config.
# ----------------------------------------------------------------------------------------------------------------

def config_to_hf(cfg: ml_collections.ConfigDict, *, pad_token_id: int | None = None) -> dict[str, Any]:
  """Our model config -> a `BertConfig` `config.json` dict for `BertForPreTraining`."""
  if cfg.hidden_act not in _ACT_TO_HF:
    raise ValueError(f'model.hidden_act: {cfg.hidden_act!r} has no transformers equivalent; '
                     f'choose one of {sorted(_ACT_TO_HF)}')
  out = {name: cfg[name] for name in BERT_CONFIG_FIELDS}
  out.update(
      model_type='bert', architectures=['BertForPreTraining'], hidden_act=_ACT_TO_HF[cfg.hidden_act],
      layer_norm_eps=float(cfg.get('layer_norm_eps', 1e-12)), position_embedding_type='absolute',
      tie_word_embeddings=True, is_decoder=False, add_cross_attention=False, dtype='float32')
  if pad_token_id is not None:
    out['pad_token_id'] = int(pad_token_id)
  return out


def config_from_hf(hf_config: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """A `config.json` dict of a BERT model -> our model config (`bert_jax.model.model_config`).

  Fields absent from the dict take the `BertConfig` defaults (which are BERT-base, as `model_config`'s).
  Raises ValueError naming the field for what our model cannot represent.
  """
  hf.require_model_type(hf_config, 'bert')
  position_type = hf_config.get('position_embedding_type', 'absolute')
  if position_type != 'absolute':
    raise ValueError(f'config.json position_embedding_type: only "absolute" is supported, got {position_type!r}')
  for field in ('is_decoder', 'add_cross_attention'):
    if hf_config.get(field, False):
      raise ValueError(f'config.json {field}: our BERT is an encoder only, got {hf_config[field]!r}')
  act = hf_config.get('hidden_act', 'gelu')
  if act not in _ACT_FROM_HF:
    raise ValueError(f'config.json hidden_act: {act!r} is not supported; choose one of {sorted(_ACT_FROM_HF)}')
  defaults = model_config()
  fields = {name: hf_config.get(name, defaults[name]) for name in BERT_CONFIG_FIELDS + ('layer_norm_eps',)}
  fields['hidden_act'] = _ACT_FROM_HF[act]
  return model_config(**fields)


# ----------------------------------------------------------------------------------------------------------------
# Directories.
# ----------------------------------------------------------------------------------------------------------------

def _tokenizer_config(cfg: ml_collections.ConfigDict, do_lower_case: bool) -> dict[str, Any]:
  return dict(tokenizer_class='BertTokenizer', do_lower_case=bool(do_lower_case), do_basic_tokenize=True,
              tokenize_chinese_chars=True, strip_accents=None, model_max_length=int(cfg.max_position_embeddings),
              clean_up_tokenization_spaces=True, **SPECIAL_TOKENS)


def save_hf_dir(out_dir: str, cfg: ml_collections.ConfigDict, params: Mapping[str, Any],
                vocab_file: str | None = None, do_lower_case: bool = True) -> list[str]:
  """Writes a Hugging Face directory; returns the paths written.

  `model.safetensors` (float32, without the tied decoder keys, like `save_pretrained`) and `config.json` load
  with `transformers.BertForPreTraining.from_pretrained(out_dir)` with no missing or unexpected keys. With a
  WordPiece `vocab_file` (one token a line, at most `cfg.vocab_size` lines) also `vocab.txt`,
  `tokenizer_config.json` and `special_tokens_map.json`, for `transformers.BertTokenizer.from_pretrained`.
  """
  state_dict = params_to_hf(params, cfg, include_tied=False)
  pad_token_id, files, json_files = None, {}, {}
  if vocab_file is not None:
    vocab = hf.read_vocab(vocab_file)
    if len(vocab) > cfg.vocab_size:
      raise ValueError(f'{vocab_file}: {len(vocab)} tokens but model.vocab_size is {cfg.vocab_size}')
    if SPECIAL_TOKENS['pad_token'] in vocab:
      pad_token_id = vocab.index(SPECIAL_TOKENS['pad_token'])
    missing = [t for t in SPECIAL_TOKENS.values() if t not in vocab]
    if missing:
      logging.warning('%s lacks the special tokens %s', vocab_file, missing)
    files = {'vocab.txt': vocab_file}
    json_files = {'tokenizer_config.json': _tokenizer_config(cfg, do_lower_case),
                  'special_tokens_map.json': dict(SPECIAL_TOKENS)}
  return hf.write_model_dir(out_dir, state_dict, config_to_hf(cfg, pad_token_id=pad_token_id), files, json_files)


def _from_tf(path: str):
  from bert_jax import import_tf  # pylint: disable=import-outside-toplevel  # it builds on this module
  return import_tf.load_for_init(path)


def load_hf_dir(path: str, *, rng: jax.Array | None = None, return_info: bool = False, subtree: str | None = None):
  """(cfg, params) from a Hugging Face BERT directory, offline; params are float32 numpy in our layout.

  Reads `config.json` and `model.safetensors` (or sharded safetensors, or `pytorch_model.bin`). Accepts
  `BertForPreTraining`, `BertForMaskedLM` (no NSP head, no pooler), `BertModel` (keys without the `bert.`
  prefix, no heads) and task directories such as `BertForSequenceClassification` (their head is ignored).
  Parameters the checkpoint lacks among the pooler and the pretraining heads are freshly initialised from `rng`
  (default `PRNGKey(0)`); any other missing key is an error. What was initialised and what was ignored is
  logged, and returned as a third element `{'source', 'initialised', 'ignored'}` when `return_info`. With
  `subtree='bert'` only the encoder is returned (and nothing outside it initialised).
  A directory of an original google-research/bert release (`bert_model.ckpt.*`, `bert_config.json`, no
  `config.json`) is read by `bert_jax.import_tf`.
  """
  return hf.load_model_dir(path, LAYOUT, config_from_hf=config_from_hf, init_params=init_params, rng=rng,
                           return_info=return_info, from_tf=_from_tf, subtree=subtree)


# ----------------------------------------------------------------------------------------------------------------
# Running the model.
# ----------------------------------------------------------------------------------------------------------------

def init_params(cfg: ml_collections.ConfigDict, rng: jax.Array, only=None) -> dict[str, Any]:
  """Freshly initialised (unboxed) params of `BertForPreTraining(cfg)`; just the paths `only` when given."""
  return layers.init_model_params(BertForPreTraining, cfg, rng, num_inputs=3, only=only)


def pretraining_logits(cfg: ml_collections.ConfigDict, params: Mapping[str, Any], input_ids, segment_ids,
                       input_mask, masked_lm_positions=None) -> tuple[jax.Array, jax.Array]:
  """Eval-mode forward of `BertForPreTraining`: ids/segments/mask `[batch, length]` (mask 1 = real token).

  Returns (mlm_logits `[batch, P, vocab]` at `masked_lm_positions [batch, P]`, or `[batch, length, vocab]` when
  None; nsp_logits `[batch, 2]`), both float32.
  """
  as_int = lambda x: None if x is None else jnp.asarray(x, jnp.int32)
  return BertForPreTraining(cfg).apply({'params': meta.unbox(params)}, as_int(input_ids), as_int(segment_ids),
                                       as_int(input_mask), as_int(masked_lm_positions), deterministic=True)


# ----------------------------------------------------------------------------------------------------------------
# Command line.
# ----------------------------------------------------------------------------------------------------------------

def export_workdir(workdir: str, out: str, step: int | None = None) -> list[str]:
  """The params of a training workdir's latest (or `step`) checkpoint -> a Hugging Face directory at `out`.

  The model config is the run's `config.model`, lower-casing `config.data.do_lower_case` (default True), and
  the vocabulary `WORKDIR/vocab.txt` (tokenizer files are skipped, with a warning, when it does not exist).
  """
  return hf.export_workdir(workdir, out, step, save=save_hf_dir, tokenizer_file='vocab.txt', default_lower_case=True,
                           model=('BERT', 'hidden_size'))


# The command-line flags, defined on demand so importing this module defines none; and the entry point.
define_flags = functools.partial(hf.define_export_flags, 'vocab.txt')
main = functools.partial(hf.export_main, export=export_workdir)


if __name__ == '__main__':
  define_flags()
  run_lib.app_run(main)
