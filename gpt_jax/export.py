"""GPT to and from Hugging Face `transformers`: `OpenAIGPTLMHeadModel` (layout `gpt1`) and `GPT2LMHeadModel`
(layout `gpt2`).

Python API:
  params_to_hf(params, cfg)              our params -> the state dict of the layout's HF class (numpy, torch layout)
  hf_to_params(state_dict, cfg)          the exact inverse
  config_to_hf(cfg) / config_from_hf(d)  our model config <-> `config.json` (the layout follows `model_type`)
  save_hf_dir(out_dir, cfg, params, vocab_file)
                                         a directory `from_pretrained` loads with no missing or unexpected keys
  load_hf_dir(path)                      (cfg, params) from an HF GPT / GPT-2 directory, offline
  lm_logits(cfg, params, input_ids)      `[batch, length, vocab]` logits of our model in eval mode
  export_workdir(workdir, out, step)     a training workdir's latest (or given) checkpoint -> Hugging Face dir

Command line (the checkpoint of a training run -> a Hugging Face directory):
  python -m gpt_jax.export --workdir /tmp/gpt_run --out /tmp/gpt_hf [--step 10000]

Layouts: both HF classes store their projections as `Conv1D`, whose weight is `[in, out]` like our kernels, so
every conversion is a reshape: the fused `qkv` kernel `[hidden, 3, heads, head_dim]` is `c_attn.weight [hidden,
3 * hidden]` (q, k, v blocks, head-major inside each, as HF splits them), the attention output kernel `[heads,
head_dim, hidden]` is `c_proj.weight [hidden, hidden]`. The LM head is tied to the token embedding (`lm_head.weight`
is omitted from the files, as `save_pretrained` does). Checkpoints saved from the bare `GPT2Model` / `OpenAIGPTModel`
(keys without the `transformer.` prefix, as on the Hub) load too; the causal-mask buffers of older files
(`attn.bias`, `attn.masked_bias`) are ignored.
"""
from __future__ import annotations

import functools
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax.core import meta

from common import hf, layers
from common import run as run_lib
from gpt_jax.model import GPTLMHeadModel, model_config

ARCHITECTURES = {'gpt1': 'OpenAIGPTLMHeadModel', 'gpt2': 'GPT2LMHeadModel'}
MODEL_TYPES = {'gpt1': 'openai-gpt', 'gpt2': 'gpt2'}
# HF key names per layout: token / position embeddings, and the final LayerNorm (GPT-2 only).
_EMBED_KEYS = {'gpt1': ('tokens_embed', 'positions_embed'), 'gpt2': ('wte', 'wpe')}

# Our activation -> `afn` of `OpenAIGPTConfig` (whose "gelu" is the tanh approximation) and
# `activation_function` of `GPT2Config`; and back.
_ACT_TO_GPT1 = {'gelu_new': 'gelu', 'gelu_tanh': 'gelu', 'gelu_pytorch_tanh': 'gelu', 'relu': 'relu'}
_ACT_FROM_GPT1 = {'gelu': 'gelu_new', 'relu': 'relu'}
_ACT_TO_GPT2 = {'gelu': 'gelu', 'gelu_new': 'gelu_new', 'gelu_tanh': 'gelu_new',
                'gelu_pytorch_tanh': 'gelu_pytorch_tanh', 'relu': 'relu'}
_ACT_FROM_GPT2 = {'gelu': 'gelu', 'gelu_python': 'gelu', 'gelu_new': 'gelu_new', 'gelu_fast': 'gelu_new',
                  'gelu_pytorch_tanh': 'gelu_pytorch_tanh', 'relu': 'relu'}
_BUFFER_SUFFIXES = ('.attn.bias', '.attn.masked_bias')
END_OF_TEXT = '<|endoftext|>'


# ----------------------------------------------------------------------------------------------------------------
# The key tables and the two layouts built on them.
# ----------------------------------------------------------------------------------------------------------------

def _key_table(cfg: ml_collections.ConfigDict, layout: str) -> list[tuple[str, tuple[str], str]]:
  """Every parameter as (our path, (HF key,), kind); kind says how to reshape it (see `_to_torch`)."""
  tokens, positions = _EMBED_KEYS[layout]
  table = [('gpt/token_embeddings/embedding', (f'transformer.{tokens}.weight',), 'same'),
           ('gpt/position_embeddings/embedding', (f'transformer.{positions}.weight',), 'same')]

  def add(ours, theirs, kernel_kind):
    table.append((f'{ours}/{"scale" if kernel_kind == "norm" else "kernel"}', (f'{theirs}.weight',),
                  'same' if kernel_kind == 'norm' else kernel_kind))
    table.append((f'{ours}/bias', (f'{theirs}.bias',), 'same' if kernel_kind == 'norm' else 'flat'))

  for i in range(cfg.num_hidden_layers):
    ours, theirs = f'gpt/layer_{i}', f'transformer.h.{i}'
    add(f'{ours}/qkv', f'{theirs}.attn.c_attn', 'in_first')
    add(f'{ours}/attention_output', f'{theirs}.attn.c_proj', 'out_last')
    add(f'{ours}/attention_LayerNorm', f'{theirs}.ln_1', 'norm')
    add(f'{ours}/intermediate', f'{theirs}.mlp.c_fc', 'same')
    add(f'{ours}/output', f'{theirs}.mlp.c_proj', 'same')
    add(f'{ours}/mlp_LayerNorm', f'{theirs}.ln_2', 'norm')
  if layout == 'gpt2':
    add('gpt/final_LayerNorm', 'transformer.ln_f', 'norm')
  return table


def _our_shapes(cfg: ml_collections.ConfigDict) -> dict[str, tuple[int, ...]]:
  """Our parameter shapes by path, from the config alone."""
  h, heads, f = cfg.hidden_size, cfg.num_attention_heads, cfg.intermediate_size
  d = h // heads
  shapes = {'gpt/token_embeddings/embedding': (cfg.vocab_size, h),
            'gpt/position_embeddings/embedding': (cfg.max_position_embeddings, h)}
  for i in range(cfg.num_hidden_layers):
    p = f'gpt/layer_{i}'
    shapes.update({
        f'{p}/qkv/kernel': (h, 3, heads, d), f'{p}/qkv/bias': (3, heads, d),
        f'{p}/attention_output/kernel': (heads, d, h), f'{p}/attention_output/bias': (h,),
        f'{p}/intermediate/kernel': (h, f), f'{p}/intermediate/bias': (f,),
        f'{p}/output/kernel': (f, h), f'{p}/output/bias': (h,),
    })
    for norm in ('attention_LayerNorm', 'mlp_LayerNorm'):
      shapes.update({f'{p}/{norm}/scale': (h,), f'{p}/{norm}/bias': (h,)})
  if cfg.layout == 'gpt2':
    shapes.update({'gpt/final_LayerNorm/scale': (h,), 'gpt/final_LayerNorm/bias': (h,)})
  return shapes


def _to_torch(x: np.ndarray, kind: str) -> np.ndarray:
  """Our array -> HF `Conv1D` layout (`[in, out]`, only reshaped)."""
  if kind == 'same':
    return x
  if kind == 'in_first':  # [hidden, 3, heads, head_dim] -> [hidden, 3 * hidden]
    return x.reshape(x.shape[0], -1)
  if kind == 'out_last':  # [heads, head_dim, hidden] -> [hidden, hidden]
    return x.reshape(-1, x.shape[-1])
  if kind == 'flat':  # [3, heads, head_dim] -> [3 * hidden]
    return x.reshape(-1)
  raise ValueError(kind)


def _from_torch(x: np.ndarray, kind: str, shape: tuple[int, ...]) -> np.ndarray:
  del kind
  return x.reshape(shape)


def _normalise_keys(state_dict: Mapping[str, Any]) -> dict[str, Any]:
  """Bare `GPT2Model` / `OpenAIGPTModel` keys (no `transformer.` prefix, as on the Hub) -> the LM-head model's."""
  if any(k.startswith('transformer.') for k in state_dict):
    return dict(state_dict)
  return {k if k.startswith('lm_head.') else f'transformer.{k}': v for k, v in state_dict.items()}


def _ignorable(key: str) -> bool:
  """The causal-mask buffers of older files and the heads of other classes (double heads, classifiers)."""
  return key.endswith(_BUFFER_SUFFIXES) or not key.startswith(('transformer.', 'lm_head.'))


def _layout(layout: str) -> hf.Layout:
  tokens = _EMBED_KEYS[layout][0]
  return hf.Layout(
      key_table=functools.partial(_key_table, layout=layout), our_shapes=_our_shapes, to_torch=_to_torch,
      from_torch=_from_torch, tied_keys={'lm_head.weight': f'transformer.{tokens}.weight'}, root='gpt',
      name='GPT' if layout == 'gpt1' else 'GPT-2', architecture=ARCHITECTURES[layout],
      normalise_keys=_normalise_keys, ignorable=_ignorable)


LAYOUTS = {name: _layout(name) for name in ARCHITECTURES}


def params_to_hf(params: Mapping[str, Any], cfg: ml_collections.ConfigDict, *,
                 include_tied: bool = True) -> dict[str, np.ndarray]:
  """Our params (the inner tree of `GPTLMHeadModel`, checked against `cfg`) -> the `state_dict()` of the layout's
  HF class as float32 numpy; with `include_tied` also `lm_head.weight` (a copy of the token embedding)."""
  return LAYOUTS[cfg.layout].params_to_hf(params, cfg, include_tied=include_tied)


def hf_to_params(state_dict: Mapping[str, Any], cfg: ml_collections.ConfigDict) -> dict[str, Any]:
  """The exact inverse of `params_to_hf`; a missing or unexpected key or a wrong shape raises
  `common.hf.StateDictError` naming the keys."""
  return LAYOUTS[cfg.layout].hf_to_params(state_dict, cfg)


# ----------------------------------------------------------------------------------------------------------------
# Config.
# ----------------------------------------------------------------------------------------------------------------

def _map_activation(act: str, table: Mapping[str, str], where: str) -> str:
  if act not in table:
    raise ValueError(f'{where}: {act!r} has no equivalent; choose one of {sorted(table)}')
  return table[act]


def config_to_hf(cfg: ml_collections.ConfigDict, *, eos_token_id: int | None = None) -> dict[str, Any]:
  """Our model config -> the `config.json` dict of the layout's HF class."""
  common = dict(vocab_size=cfg.vocab_size, n_positions=cfg.max_position_embeddings, n_embd=cfg.hidden_size,
                n_layer=cfg.num_hidden_layers, n_head=cfg.num_attention_heads, resid_pdrop=cfg.hidden_dropout_prob,
                embd_pdrop=cfg.embedding_dropout_prob, attn_pdrop=cfg.attention_probs_dropout_prob,
                layer_norm_epsilon=float(cfg.layer_norm_eps), initializer_range=cfg.initializer_range,
                model_type=MODEL_TYPES[cfg.layout], architectures=[ARCHITECTURES[cfg.layout]],
                tie_word_embeddings=True, dtype='float32')
  if cfg.layout == 'gpt1':
    if cfg.intermediate_size != 4 * cfg.hidden_size:
      raise ValueError(f'model.intermediate_size: OpenAIGPT has 4 * hidden_size = {4 * cfg.hidden_size}, got '
                       f'{cfg.intermediate_size}')
    common['afn'] = _map_activation(cfg.hidden_act, _ACT_TO_GPT1, 'model.hidden_act (OpenAIGPT afn)')
  else:
    common.update(n_inner=cfg.intermediate_size, n_ctx=cfg.max_position_embeddings,
                  activation_function=_map_activation(cfg.hidden_act, _ACT_TO_GPT2, 'model.hidden_act'),
                  scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False, reorder_and_upcast_attn=False)
  if eos_token_id is not None:
    common.update(bos_token_id=int(eos_token_id), eos_token_id=int(eos_token_id))
  return common


def config_from_hf(hf_config: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """A `config.json` dict of an OpenAIGPT or GPT-2 model -> our model config; absent fields take the HF defaults.
  Raises ValueError naming the field for what our model cannot represent."""
  model_type = hf_config.get('model_type')
  if model_type not in MODEL_TYPES.values():
    raise ValueError(f'config.json model_type: expected one of {sorted(MODEL_TYPES.values())}, got {model_type!r}')
  layout = 'gpt1' if model_type == 'openai-gpt' else 'gpt2'
  defaults = dict(vocab_size=40478 if layout == 'gpt1' else 50257, n_positions=512 if layout == 'gpt1' else 1024,
                  n_embd=768, n_layer=12, n_head=12, resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1,
                  layer_norm_epsilon=1e-5, initializer_range=0.02)
  get = lambda name: hf_config.get(name, defaults[name])
  hidden = get('n_embd')
  if layout == 'gpt1':
    act = _map_activation(hf_config.get('afn', 'gelu'), _ACT_FROM_GPT1, 'config.json afn')
    inner = 4 * hidden
  else:
    for field, supported in (('scale_attn_weights', True), ('scale_attn_by_inverse_layer_idx', False),
                             ('reorder_and_upcast_attn', False), ('add_cross_attention', False)):
      if bool(hf_config.get(field, supported)) != supported:
        raise ValueError(f'config.json {field}: only {supported} is supported, got {hf_config[field]!r}')
    act = _map_activation(hf_config.get('activation_function', 'gelu_new'), _ACT_FROM_GPT2,
                          'config.json activation_function')
    inner = hf_config.get('n_inner') or 4 * hidden
  return model_config(
      vocab_size=get('vocab_size'), hidden_size=hidden, num_hidden_layers=get('n_layer'),
      num_attention_heads=get('n_head'), intermediate_size=inner, max_position_embeddings=get('n_positions'),
      hidden_act=act, layout=layout, hidden_dropout_prob=get('resid_pdrop'), embedding_dropout_prob=get('embd_pdrop'),
      attention_probs_dropout_prob=get('attn_pdrop'), initializer_range=get('initializer_range'),
      layer_norm_eps=float(get('layer_norm_epsilon')))


def read_architecture(path: str) -> dict[str, Any]:
  """Our model-config fields of an HF directory's `config.json` (no weights read)."""
  return dict(config_from_hf(hf.read_config(path)))


# ----------------------------------------------------------------------------------------------------------------
# Directories.
# ----------------------------------------------------------------------------------------------------------------

def save_hf_dir(out_dir: str, cfg: ml_collections.ConfigDict, params: Mapping[str, Any],
                vocab_file: str | None = None, do_lower_case: bool = False) -> list[str]:
  """Writes a Hugging Face directory; returns the paths written.

  `model.safetensors` (float32, without the tied `lm_head.weight`) and `config.json` load with the layout's class
  (`ARCHITECTURES`) with no missing or unexpected keys. With a byte-level BPE `vocab_file` (`vocab.json`, with
  `merges.txt` beside it) also those two files and `tokenizer_config.json` for `GPT2Tokenizer`; `<|endoftext|>`
  becomes the model's bos/eos token. `do_lower_case` is accepted for the shared exporter and must be False.
  """
  from gpt_jax import tokenizer as gpt_tokenizer  # pylint: disable=import-outside-toplevel
  if do_lower_case:
    raise ValueError('a byte-level BPE is not lower-cased: do_lower_case must be False')
  state_dict = params_to_hf(params, cfg, include_tied=False)
  eos_token_id, files, json_files = None, {}, {}
  if vocab_file is not None:
    tok = gpt_tokenizer.load_tokenizer(vocab_file)
    if tok.vocab_size > cfg.vocab_size:
      raise ValueError(f'{vocab_file}: {tok.vocab_size} tokens but model.vocab_size is {cfg.vocab_size}')
    eos_token_id = tok.eot_id
    files = {gpt_tokenizer.VOCAB_NAME: vocab_file, gpt_tokenizer.MERGES_NAME: gpt_tokenizer.merges_path(vocab_file)}
    json_files = {'tokenizer_config.json': dict(
        tokenizer_class='GPT2Tokenizer', model_max_length=int(cfg.max_position_embeddings), add_prefix_space=False,
        bos_token=END_OF_TEXT, eos_token=END_OF_TEXT, unk_token=END_OF_TEXT)}
  return hf.write_model_dir(out_dir, state_dict, config_to_hf(cfg, eos_token_id=eos_token_id), files, json_files)


def load_hf_dir(path: str, *, rng: jax.Array | None = None, return_info: bool = False):
  """(cfg, params) from a Hugging Face `OpenAIGPTLMHeadModel` / `OpenAIGPTModel` / `GPT2LMHeadModel` / `GPT2Model`
  directory, offline; params are float32 numpy in our layout. Every parameter must be present (the LM head is the
  token embedding); keys of other heads and mask buffers are ignored (and logged; returned in the third element
  `{'source', 'initialised', 'ignored'}` when `return_info`)."""
  layout = config_from_hf(hf.read_config(path)).layout
  return hf.load_model_dir(path, LAYOUTS[layout], config_from_hf=config_from_hf, init_params=init_params, rng=rng,
                           return_info=return_info)


# ----------------------------------------------------------------------------------------------------------------
# Running the model.
# ----------------------------------------------------------------------------------------------------------------

def init_params(cfg: ml_collections.ConfigDict, rng: jax.Array, only=None) -> dict[str, Any]:
  """Freshly initialised (unboxed) params of `GPTLMHeadModel(cfg)`; just the paths `only` when given."""
  return layers.init_model_params(GPTLMHeadModel, cfg, rng, only=only)


def lm_logits(cfg: ml_collections.ConfigDict, params: Mapping[str, Any], input_ids) -> jax.Array:
  """Eval-mode logits `[batch, length, vocab]` float32 of `input_ids [batch, length]`."""
  logits, _ = GPTLMHeadModel(cfg).apply({'params': meta.unbox(params)}, jnp.asarray(input_ids, jnp.int32))
  return logits


# ----------------------------------------------------------------------------------------------------------------
# Command line.
# ----------------------------------------------------------------------------------------------------------------

def export_workdir(workdir: str, out: str, step: int | None = None) -> list[str]:
  """The params of a training workdir's latest (or `step`) checkpoint -> a Hugging Face directory at `out`, with
  the run's `WORKDIR/vocab.json` + `merges.txt` when they exist."""
  return hf.export_workdir(workdir, out, step, save=save_hf_dir, tokenizer_file='vocab.json',
                           default_lower_case=False, model=('GPT', 'layout'))


if __name__ == '__main__':  # flags defined only here, so importing this module defines none
  hf.define_export_flags('vocab.json')
  run_lib.app_run(functools.partial(hf.export_main, export=export_workdir))
