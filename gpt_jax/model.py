"""GPT (Radford et al. 2018) and GPT-2 (2019) in Flax linen, parameters annotated with logical axes for sharding.

A decoder-only Transformer: token embedding + learned absolute position embedding, dropout, a stack of causal
self-attention blocks, and logits against the token embedding (the output projection is tied to it, no bias).
`config.layout` picks the block:

* `gpt1` (GPT-1, HF `OpenAIGPTLMHeadModel`): post-LN blocks `x = LN(x + Attn(x)); x = LN(x + FFN(x))`, no final
  LayerNorm;
* `gpt2` (GPT-2, HF `GPT2LMHeadModel`): pre-LN blocks `x = x + Attn(LN(x)); x = x + FFN(LN(x))` and a final
  LayerNorm.

Dropout (when not `deterministic`): `embedding_dropout_prob` on the summed embeddings, `hidden_dropout_prob` on the
attention and FFN outputs before each residual sum, `attention_probs_dropout_prob` on the attention probabilities.

The query/key/value projections are one fused kernel `[embed, 3, heads, head_dim]` (HF's `c_attn`), so the HF
round trip is a reshape. Decoding keeps a KV cache (`init_cache`): a call with `cache` attends to the cached keys
of the earlier positions plus its own, writes its keys/values at positions `[length, length + q_len)` and returns
the cache with `length` advanced.

`attention_impl` ('materialized', 'chunked', 'fused' or 'auto', see `common.attention`) and `attention_block`: how
attention is computed. Without a cache, the non-materialised implementations get the causal structure as a flag
(built per tile by 'chunked') instead of a `[q_len, k_len]` mask.
"""
from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import linen as nn

from common import attention, layers
from common.config import require

LAYOUTS = ('gpt1', 'gpt2')
ACTIVATIONS = ('gelu', 'gelu_new', 'gelu_tanh', 'gelu_pytorch_tanh', 'relu')
# The model-config fields that define the network (what an `init_from` directory replaces).
ARCHITECTURE_FIELDS = ('vocab_size', 'hidden_size', 'num_hidden_layers', 'num_attention_heads', 'intermediate_size',
                     'max_position_embeddings', 'hidden_act', 'layout', 'layer_norm_eps')

# A cache: {'layers': [{'key', 'value'} per layer, each `[batch, max_len, heads, head_dim]`], 'length': [] int32}.
Cache = dict


def model_config(**overrides) -> ml_collections.ConfigDict:
  """The model section; defaults are GPT-1 (12 layers, 768, 12 heads, FFN 3072, 512 positions, BPE 40478)."""
  cfg = ml_collections.ConfigDict(dict(
      vocab_size=40478, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
      max_position_embeddings=512, hidden_act='gelu_new', layout='gpt1', hidden_dropout_prob=0.1,
      embedding_dropout_prob=0.1, attention_probs_dropout_prob=0.1, initializer_range=0.02, layer_norm_eps=1e-5,
      attention_impl='materialized', attention_block=attention.DEFAULT_BLOCK,
  ))
  cfg.update(overrides)
  return cfg


_POSITIVE_FIELDS = ('vocab_size', 'hidden_size', 'num_hidden_layers', 'num_attention_heads', 'intermediate_size',
                    'max_position_embeddings', 'initializer_range', 'layer_norm_eps')
_DROPOUT_FIELDS = ('hidden_dropout_prob', 'embedding_dropout_prob', 'attention_probs_dropout_prob')


def validate_model_config(cfg: ml_collections.ConfigDict, prefix: str = 'model') -> None:
  """Raises `ConfigError('config.<prefix>.<field>: ...')` for the first bad field."""
  def check(condition: bool, field: str, message: str) -> None:
    require(condition, f'{prefix}.{field}', message)

  is_number = lambda x: isinstance(x, (int, float)) and not isinstance(x, bool)
  for field in _POSITIVE_FIELDS:
    check(is_number(cfg[field]) and cfg[field] > 0, field, f'must be a positive number, got {cfg[field]!r}')
  for field in _DROPOUT_FIELDS:
    check(is_number(cfg[field]) and 0.0 <= cfg[field] < 1.0, field, f'must be in [0, 1), got {cfg[field]!r}')
  check(cfg.hidden_size % cfg.num_attention_heads == 0, 'hidden_size',
        f'{cfg.hidden_size} is not divisible by num_attention_heads={cfg.num_attention_heads}')
  check(cfg.layout in LAYOUTS, 'layout', f'must be one of {LAYOUTS}, got {cfg.layout!r}')
  check(cfg.hidden_act in ACTIVATIONS, 'hidden_act', f'must be one of {ACTIVATIONS}, got {cfg.hidden_act!r}')
  attention.validate_config(cfg, prefix)


def init_cache(cfg: ml_collections.ConfigDict, batch_size: int, max_length: int, dtype: Any = jnp.float32) -> Cache:
  """An empty KV cache for `max_length` positions (at most `max_position_embeddings`)."""
  if max_length > cfg.max_position_embeddings:
    raise ValueError(f'a cache of {max_length} positions exceeds max_position_embeddings='
                     f'{cfg.max_position_embeddings}')
  heads = cfg.num_attention_heads
  shape = (batch_size, max_length, heads, cfg.hidden_size // heads)
  return {'layers': [{'key': jnp.zeros(shape, dtype), 'value': jnp.zeros(shape, dtype)}
                     for _ in range(cfg.num_hidden_layers)],
          'length': jnp.zeros((), jnp.int32)}


def causal_mask(q_len: int, k_len: int, start: jax.Array | int = 0) -> jax.Array:
  """`[1, 1, q_len, k_len]` bool, True where query i (at position `start + i`) may see key j: j <= start + i."""
  query_positions = start + jnp.arange(q_len)
  return (jnp.arange(k_len)[None, :] <= query_positions[:, None])[None, None]


class GPTBlock(nn.Module):
  """One Transformer block (post-LN for `gpt1`, pre-LN for `gpt2`) over `x [batch, q_len, hidden]`."""
  config: ml_collections.ConfigDict
  dtype: Any = jnp.float32

  def _attention(self, x, mask, layer_cache, start, deterministic):
    """Causal self-attention -> (`[batch, q_len, hidden]` before dropout, the layer's updated cache or None)."""
    cfg = self.config
    init = nn.initializers.normal(cfg.initializer_range)
    heads = cfg.num_attention_heads
    head_dim = cfg.hidden_size // heads
    qkv = layers.DenseGeneral((3, heads, head_dim), ('embed', None, 'heads', 'kv'), kernel_init=init,
                              dtype=self.dtype, name='qkv')(x)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    new_cache = None
    if layer_cache is not None:
      index = (0, start, 0, 0)
      k = jax.lax.dynamic_update_slice(layer_cache['key'], k.astype(layer_cache['key'].dtype), index)
      v = jax.lax.dynamic_update_slice(layer_cache['value'], v.astype(layer_cache['value'].dtype), index)
      new_cache = {'key': k, 'value': v}
      k, v = k.astype(self.dtype), v.astype(self.dtype)
    rate = cfg.attention_probs_dropout_prob
    ctx = attention.dot_product_attention(
        q, k, v, mask, dropout_rate=rate, deterministic=deterministic, sow_probs=attention.probs_sower(self),
        causal=mask is None, **attention.config_options(cfg),  # No mask: causal (GPTModel), built as needed.
        dropout_rng=self.make_rng('dropout') if not deterministic and rate > 0 else None)
    ctx = layers.constrain(ctx, ('batch', 'length', 'act_heads', None))
    out = layers.DenseGeneral((cfg.hidden_size,), ('heads', 'kv', 'embed'), in_dims=2,
                              kernel_init=self._residual_init(), dtype=self.dtype, name='attention_output')(ctx)
    return out, new_cache

  def _residual_init(self):
    """The init of the projections into the residual stream: GPT-2 scales it by 1/sqrt(2 * layers)."""
    cfg = self.config
    scale = math.sqrt(2 * cfg.num_hidden_layers) if cfg.layout == 'gpt2' else 1.0
    return nn.initializers.normal(cfg.initializer_range / scale)

  def _mlp(self, x):
    cfg = self.config
    h = layers.DenseGeneral((cfg.intermediate_size,), ('embed', 'mlp'),
                            kernel_init=nn.initializers.normal(cfg.initializer_range), dtype=self.dtype,
                            name='intermediate')(x)
    h = layers.activation(cfg.hidden_act)(h)
    h = layers.constrain(h, ('batch', 'length', 'act_mlp'))
    return layers.DenseGeneral((cfg.hidden_size,), ('mlp', 'embed'), kernel_init=self._residual_init(),
                               dtype=self.dtype, name='output')(h)

  @nn.compact
  def __call__(self, x, mask, layer_cache, start, deterministic: bool):
    """Returns (`[batch, q_len, hidden]`, the layer's updated cache or None)."""
    cfg = self.config
    dropout = layers.Dropout(cfg.hidden_dropout_prob)
    norm_attention = layers.LayerNorm(cfg.layer_norm_eps, self.dtype, name='attention_LayerNorm')
    norm_mlp = layers.LayerNorm(cfg.layer_norm_eps, self.dtype, name='mlp_LayerNorm')
    if cfg.layout == 'gpt1':
      out, new_cache = self._attention(x, mask, layer_cache, start, deterministic)
      x = norm_attention(x + dropout(out, deterministic=deterministic))
      x = norm_mlp(x + dropout(self._mlp(x), deterministic=deterministic))
    else:
      out, new_cache = self._attention(norm_attention(x), mask, layer_cache, start, deterministic)
      x = x + dropout(out, deterministic=deterministic)
      x = x + dropout(self._mlp(norm_mlp(x)), deterministic=deterministic)
    return layers.constrain(x, ('batch', 'length', 'act_embed')), new_cache


class GPTModel(nn.Module):
  """Embeddings + blocks (+ the final LayerNorm for `gpt2`).

  `__call__(input_ids [batch, q_len], *, cache=None, inputs_embeds=None)` returns (hidden `[batch, q_len,
  hidden]`, the updated cache or None, the token `Embed`). Positions are `cache['length'] + [0, q_len)` (0 without
  a cache) and must stay below `max_position_embeddings`. `inputs_embeds [batch, q_len, hidden]` replaces the token
  lookup (the position embedding is still added).
  """
  config: ml_collections.ConfigDict
  dtype: Any = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, input_ids, *, deterministic: bool = True, cache: Cache | None = None, inputs_embeds=None):
    cfg = self.config
    init = nn.initializers.normal(cfg.initializer_range)
    tokens = layers.Embed(cfg.vocab_size, cfg.hidden_size, ('vocab', 'embed'), init, self.dtype,
                          name='token_embeddings')
    positions = layers.Embed(cfg.max_position_embeddings, cfg.hidden_size, ('position', 'embed'), init, self.dtype,
                             name='position_embeddings')
    q_len = input_ids.shape[1] if inputs_embeds is None else inputs_embeds.shape[1]
    start = jnp.zeros((), jnp.int32) if cache is None else cache['length']
    x = tokens(input_ids) if inputs_embeds is None else inputs_embeds.astype(self.dtype)
    x = x + positions(start + jnp.arange(q_len))[None]
    x = layers.Dropout(cfg.embedding_dropout_prob)(x, deterministic=deterministic)
    x = layers.constrain(x, ('batch', 'length', 'act_embed'))
    k_len = q_len if cache is None else cache['layers'][0]['key'].shape[1]
    structured = cache is None and cfg.get('attention_impl', 'materialized') != 'materialized'
    mask = None if structured else causal_mask(q_len, k_len, start)
    block_cls = nn.remat(GPTBlock, static_argnums=(5,)) if self.remat else GPTBlock
    new_layers = []
    for i in range(cfg.num_hidden_layers):
      layer_cache = None if cache is None else cache['layers'][i]
      x, new_layer_cache = block_cls(cfg, self.dtype, name=f'layer_{i}')(x, mask, layer_cache, start, deterministic)
      new_layers.append(new_layer_cache)
    if cfg.layout == 'gpt2':
      x = layers.LayerNorm(cfg.layer_norm_eps, self.dtype, name='final_LayerNorm')(x)
    new_cache = None if cache is None else {'layers': new_layers, 'length': start + q_len}
    return x, new_cache, tokens


class GPTLMHeadModel(nn.Module):
  """GPT with the tied LM head: `__call__(input_ids [batch, q_len], ...)` (arguments as `GPTModel`) returns
  (logits `[batch, q_len, vocab]` float32, the updated cache or None)."""
  config: ml_collections.ConfigDict
  dtype: Any = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, input_ids, *, deterministic: bool = True, cache: Cache | None = None, inputs_embeds=None):
    hidden, new_cache, tokens = GPTModel(self.config, self.dtype, self.remat, name='gpt')(
        input_ids, deterministic=deterministic, cache=cache, inputs_embeds=inputs_embeds)
    logits = tokens.attend(hidden).astype(jnp.float32)
    return layers.constrain(logits, ('batch', 'length', 'act_vocab')), new_cache


def flops_per_example(cfg: ml_collections.ConfigDict, seq_len: int) -> float:
  """Training matmul FLOPs of one sequence of `seq_len` tokens as the jitted step executes them (forward + backward).

  Convention as `bert_jax.model.flops_per_example`: 2 FLOPs per multiply-add, backward = 2x forward (input and
  weight gradients; layer 0's input is the trained embeddings), so 3x forward. Counted: the fused Q/K/V and the
  output projections, the full `seq_len x seq_len` attention scores and context (the causal mask hides half of them
  but they are computed), the FFN, and the tied vocabulary projection at every position (every position is
  predicted). Embedding lookups, softmax, LayerNorm, dropout, the loss and the optimizer are excluded.
  """
  h, f, n, v = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.vocab_size
  per_layer = 2 * seq_len * (4 * h * h + 2 * h * f) + 2 * 2 * seq_len * seq_len * h
  return 3.0 * (n * per_layer + 2 * seq_len * h * v)


def num_params(params) -> int:
  return sum(x.size for x in jax.tree.leaves(params))
