"""The ELMo biLM (Peters et al. 2018) in Flax linen, parameters annotated with logical axes for sharding.

Architecture as the reference implementation (allenai/bilm-tf):

* token encoder: every token is `max_characters_per_token` character ids (`elmo_jax.tokenizer`: 256 byte values,
  begin/end of sentence, begin/end of word, padding = ids 0..260); a character embedding; one 1-D convolution per
  `(width, channels)` filter over the characters, max-pooled over time, then the activation; `n_highway` highway
  layers `y = g * relu(x W_t + b_t) + (1 - g) * x` with the carry gate `g = sigmoid(x W_c + b_c)`; a linear
  projection to `projection_dim`.
* a forward and a backward LM, each `n_lstm_layers` LSTMs with a projection (`lstm_dim` cells projected to
  `projection_dim`), the cell clipped to `[-cell_clip, cell_clip]` and the projection to `[-proj_clip, proj_clip]`,
  a residual connection around every layer but the first; gates in TensorFlow's `LSTMCell` order (input, new input,
  forget, output) with the constant forget bias 1.0 added at run time, as the reference trained them.
* one softmax (`[vocab, projection_dim]` + bias) shared by both directions; dropout on every LSTM layer's input and
  on the top layer before the softmax.

A row is one sentence `<S> w_1 .. w_n </S>` padded at the end to the batch length, `lengths [batch]` real tokens.
The forward LM reads positions 0..length-1 left to right; the backward LM reads each sentence from ITS OWN last
token to its first (the row is reversed within its length, run through the same causal scan and reversed back),
so padding never reaches a real position in either direction.

Config fields follow the reference `options.json` (`elmo_jax.weights` reads and writes it).
"""
from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import linen as nn

from common import layers
from common.config import require

# 256 byte values + begin/end of sentence + begin/end of word + padding (the reference's training numbering).
CHAR_VOCAB_SIZE = 261
FORGET_BIAS = 1.0  # TensorFlow's LSTMCell default, added to the forget gate at run time (not a parameter).

ORIGINAL_FILTERS = ((1, 32), (2, 32), (3, 64), (4, 128), (5, 256), (6, 512), (7, 1024))


def model_config(**overrides) -> ml_collections.ConfigDict:
  """An `options.json`-shaped config; defaults are the published original biLM (vocab filled by the data)."""
  cfg = ml_collections.ConfigDict(dict(
      vocab_size=0,                    # softmax vocabulary (0: the tokenizer's)
      char_vocab_size=CHAR_VOCAB_SIZE,
      max_characters_per_token=50,
      char_embedding_dim=16,
      filters=[list(f) for f in ORIGINAL_FILTERS],
      activation='relu',
      n_highway=2,
      projection_dim=512,
      lstm_dim=4096,
      n_lstm_layers=2,
      cell_clip=3.0,                   # 0: no clipping
      proj_clip=3.0,                   # 0: no clipping
      use_skip_connections=True,
      dropout=0.1,
  ))
  cfg.update(overrides)
  return cfg


def validate_model_config(cfg: ml_collections.ConfigDict, prefix: str = 'model', *,
                          vocab_may_follow_data: bool = False) -> None:
  """Raises `ConfigError('config.<prefix>.<field>: ...')` naming the first bad field of the model section;
  `vocab_may_follow_data`: `vocab_size` 0 is allowed (the vocabulary's size is filled in later)."""
  require(isinstance(cfg.vocab_size, int) and (cfg.vocab_size > 0 or (vocab_may_follow_data and cfg.vocab_size == 0)),
          f'{prefix}.vocab_size', f'must be a positive integer (or 0: the vocabulary\'s), got {cfg.vocab_size!r}')
  for field in ('char_vocab_size', 'max_characters_per_token', 'char_embedding_dim', 'projection_dim',
                'lstm_dim', 'n_lstm_layers'):
    value = cfg[field]
    require(isinstance(value, int) and value > 0, f'{prefix}.{field}', f'must be a positive integer, got {value!r}')
  require(cfg.char_vocab_size >= CHAR_VOCAB_SIZE, f'{prefix}.char_vocab_size',
          f'must be >= {CHAR_VOCAB_SIZE} (bytes + 5 markers), got {cfg.char_vocab_size}')
  filters = [tuple(f) for f in cfg.filters]
  require(bool(filters) and all(len(f) == 2 and min(f) > 0 for f in filters), f'{prefix}.filters',
          f'must be a non-empty list of [width, channels] with positive entries, got {cfg.filters!r}')
  require(max(w for w, _ in filters) <= cfg.max_characters_per_token, f'{prefix}.filters',
          f'a filter is wider than max_characters_per_token={cfg.max_characters_per_token}')
  require(cfg.n_highway >= 0, f'{prefix}.n_highway', f'must be >= 0, got {cfg.n_highway}')
  for field in ('cell_clip', 'proj_clip'):
    require(cfg[field] >= 0, f'{prefix}.{field}', f'must be >= 0 (0: no clipping), got {cfg[field]}')
  require(0.0 <= cfg.dropout < 1.0, f'{prefix}.dropout', f'must be in [0, 1), got {cfg.dropout}')
  require(cfg.activation in ('relu', 'tanh'), f'{prefix}.activation',
          f"must be one of ('relu', 'tanh'), got {cfg.activation!r}")


def _normal(stddev: float):
  return nn.initializers.normal(stddev=stddev)


def _uniform_symmetric(bound: float):
  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


def _clip(x: jax.Array, bound: float) -> jax.Array:
  return jnp.clip(x, -bound, bound) if bound else x


def num_filters(cfg: ml_collections.ConfigDict) -> int:
  return sum(int(n) for _, n in cfg.filters)


class Highway(nn.Module):
  """`y = g * relu(x W_t + b_t) + (1 - g) * x` with the carry gate `g = sigmoid(x W_c + b_c)`, `b_c` starting at
  -2 (mostly carry) as in the reference."""
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """`x [..., d] -> [..., d]`."""
    d = x.shape[-1]

    def dense(name, bias_value):
      kernel = self.param(f'{name}_kernel', layers.with_axes(_normal(math.sqrt(1.0 / d)), (None, 'mlp')), (d, d),
                          jnp.float32)
      bias = self.param(f'{name}_bias', layers.with_axes(nn.initializers.constant(bias_value), ('mlp',)), (d,),
                        jnp.float32)
      return jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype)) + bias.astype(self.dtype)

    gate = jax.nn.sigmoid(dense('carry', -2.0))
    transform = dense('transform', 0.0)
    return gate * jax.nn.relu(transform) + (1.0 - gate) * x


class CharCNNEncoder(nn.Module):
  """Characters of every token -> one `projection_dim` vector per token."""
  config: ml_collections.ConfigDict
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, char_ids: jax.Array) -> jax.Array:
    """`char_ids [batch, length, chars] int -> [batch, length, projection_dim]`."""
    cfg, batch, length, _ = self.config, *char_ids.shape
    table = self.param('char_embed', layers.with_axes(_uniform_symmetric(1.0), (None, None)),
                       (cfg.char_vocab_size, cfg.char_embedding_dim), jnp.float32)
    x = jnp.take(table, char_ids, axis=0).astype(self.dtype)
    dim = x.shape[-1]
    x = x.reshape(batch * length, -1, dim)
    pooled = []
    for i, (width, channels) in enumerate(cfg.filters):
      # The reference: uniform +-0.05 for relu (Kim et al. 2015), normal(0, sqrt(1 / (width * dim))) for tanh.
      init = _uniform_symmetric(0.05) if cfg.activation == 'relu' else _normal(math.sqrt(1.0 / (width * dim)))
      kernel = self.param(f'conv_{i}_kernel', layers.with_axes(init, (None, None, 'mlp')), (width, dim, channels),
                          jnp.float32)
      bias = self.param(f'conv_{i}_bias', layers.with_axes(nn.initializers.zeros, ('mlp',)), (channels,),
                        jnp.float32)
      y = jax.lax.conv_general_dilated(x, kernel.astype(self.dtype), window_strides=(1,), padding='VALID',
                                       dimension_numbers=('NWC', 'WIO', 'NWC'))
      pooled.append(layers.activation(cfg.activation)(jnp.max(y + bias.astype(self.dtype), axis=1)))
    h = jnp.concatenate(pooled, axis=-1).reshape(batch, length, -1)
    for k in range(cfg.n_highway):
      h = Highway(self.dtype, name=f'highway_{k}')(h)
    h = layers.DenseGeneral((cfg.projection_dim,), ('mlp', 'embed'), dtype=self.dtype, name='projection',
                            kernel_init=_normal(math.sqrt(1.0 / num_filters(cfg))))(h)
    return layers.constrain(h, ('batch', 'length', 'act_embed'))


class ProjectedLSTMCell(nn.RNNCellBase):
  """The recurrent half of one LSTM-with-projection step; the input half `x W_x + b` comes precomputed.

  carry = (c `[batch, lstm_dim]`, h `[batch, projection_dim]`); input = gate pre-activations from the input
  `[batch, 4, lstm_dim]` in the order (input, new input, forget, output).
  """
  lstm_dim: int
  projection_dim: int
  cell_clip: float = 0.0
  proj_clip: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, carry, input_gates):
    c, h = carry
    recurrent = self.param('recurrent_kernel', layers.with_axes(nn.initializers.glorot_uniform(in_axis=0,
                                                                                               out_axis=(1, 2)),
                                                                ('embed', None, 'mlp')),
                           (self.projection_dim, 4, self.lstm_dim), jnp.float32)
    projection = self.param('projection', layers.with_axes(nn.initializers.glorot_uniform(), ('mlp', 'embed')),
                            (self.lstm_dim, self.projection_dim), jnp.float32)
    gates = input_gates + jnp.einsum('bp,pgc->bgc', h.astype(self.dtype), recurrent.astype(self.dtype))
    gates = gates.astype(jnp.float32)
    i, g, f, o = gates[:, 0], gates[:, 1], gates[:, 2], gates[:, 3]
    c = jax.nn.sigmoid(f + FORGET_BIAS) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
    c = _clip(c, self.cell_clip)
    m = jax.nn.sigmoid(o) * jnp.tanh(c)
    h = _clip(jnp.dot(m.astype(self.dtype), projection.astype(self.dtype)).astype(jnp.float32), self.proj_clip)
    return (c, h), h

  def initialize_carry(self, rng, input_shape):
    del rng
    batch = input_shape[0]
    return (jnp.zeros((batch, self.lstm_dim), jnp.float32), jnp.zeros((batch, self.projection_dim), jnp.float32))

  @property
  def num_feature_axes(self) -> int:
    return 2


class LSTMLayer(nn.Module):
  """One LSTM-with-projection layer over a whole sequence, left to right (`jax.lax.scan` through `nn.scan`)."""
  config: ml_collections.ConfigDict
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """`x [batch, length, d_in] -> h [batch, length, projection_dim]` (float32)."""
    cfg = self.config
    input_gates = layers.DenseGeneral((4, cfg.lstm_dim), ('embed', None, 'mlp'), dtype=self.dtype,
                                      kernel_init=nn.initializers.glorot_uniform(in_axis=0, out_axis=(1, 2)),
                                      name='input_kernel')(x)
    cell = ProjectedLSTMCell(cfg.lstm_dim, cfg.projection_dim, float(cfg.cell_clip), float(cfg.proj_clip),
                             self.dtype, name='cell')
    scan = nn.scan(lambda module, carry, xs: module(carry, xs), variable_broadcast='params',
                   split_rngs={'params': False}, in_axes=1, out_axes=1)
    carry = cell.initialize_carry(None, x.shape)
    _, h = scan(cell, carry, input_gates)
    return layers.constrain(h, ('batch', 'length', 'act_embed'))


class LSTMStack(nn.Module):
  """One direction's LM: `n_lstm_layers` layers, residual around every layer but the first."""
  config: ml_collections.ConfigDict
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool) -> list[jax.Array]:
    """`x [batch, length, projection_dim]` (already in reading order) -> every layer's output, same shape."""
    cfg = self.config
    outputs = []
    for i in range(cfg.n_lstm_layers):
      inputs = nn.Dropout(cfg.dropout)(x, deterministic=deterministic)
      h = LSTMLayer(cfg, self.dtype, name=f'layer_{i}')(inputs)
      if cfg.use_skip_connections and i > 0:
        h = h + inputs
      outputs.append(h)
      x = h
    return outputs


def reverse_within_length(x: jax.Array, lengths: jax.Array) -> jax.Array:
  """Reverses every row's first `lengths[b]` positions and leaves its padding in place (its own inverse).

  `x [batch, length, ...]`, `lengths [batch]` -> same shape.
  """
  t = jnp.arange(x.shape[1])[None, :]
  index = jnp.where(t < lengths[:, None], lengths[:, None] - 1 - t, t)
  index = index.reshape(index.shape + (1,) * (x.ndim - 2))
  return jnp.take_along_axis(x, index, axis=1)


class ElmoBiLM(nn.Module):
  """Token encoder + forward LM + backward LM + the shared softmax.

  `__call__(char_ids [batch, length, chars], lengths [batch])` returns a dict with `token [batch, length, P]`,
  `forward` and `backward`: lists of `n_lstm_layers` arrays `[batch, length, P]` (P = projection_dim), position t
  of `forward` having read tokens 0..t and of `backward` tokens t..length-1.
  """
  config: ml_collections.ConfigDict
  dtype: Any = jnp.float32

  def setup(self):
    cfg = self.config
    self.token_encoder = CharCNNEncoder(cfg, self.dtype)
    self.forward_lm = LSTMStack(cfg, self.dtype)
    self.backward_lm = LSTMStack(cfg, self.dtype)
    self.softmax_kernel = self.param('softmax_kernel', layers.with_axes(
        _normal(1.0 / math.sqrt(cfg.projection_dim)), ('vocab', 'embed')),
        (cfg.vocab_size, cfg.projection_dim), jnp.float32)
    self.softmax_bias = self.param('softmax_bias', layers.with_axes(nn.initializers.zeros, ('vocab',)),
                                   (cfg.vocab_size,), jnp.float32)
    self.output_dropout = nn.Dropout(cfg.dropout)

  def encode_tokens(self, char_ids: jax.Array) -> jax.Array:
    """`[batch, length, chars] -> [batch, length, P]`."""
    return self.token_encoder(char_ids)

  def contextualize(self, tokens: jax.Array, lengths: jax.Array, deterministic: bool = True):
    """Token vectors `[batch, length, P]` -> (forward layers, backward layers), lists of `[batch, length, P]`."""
    forward = self.forward_lm(tokens, deterministic)
    backward = self.backward_lm(reverse_within_length(tokens, lengths), deterministic)
    return forward, [reverse_within_length(h, lengths) for h in backward]

  def __call__(self, char_ids: jax.Array, lengths: jax.Array, deterministic: bool = True) -> dict:
    tokens = self.encode_tokens(char_ids)
    forward, backward = self.contextualize(tokens, lengths, deterministic)
    return dict(token=tokens, forward=forward, backward=backward)

  def language_model(self, char_ids: jax.Array, lengths: jax.Array, deterministic: bool = True):
    """The softmax inputs: (forward top layer, backward top layer) after dropout, each `[batch, length, P]`."""
    out = self(char_ids, lengths, deterministic)
    return tuple(self.output_dropout(out[d][-1], deterministic=deterministic) for d in ('forward', 'backward'))

  def logits(self, h: jax.Array) -> jax.Array:
    """Full softmax logits: `h [..., P] -> [..., vocab]` float32."""
    out = jnp.einsum('...p,vp->...v', h.astype(self.dtype), self.softmax_kernel.astype(self.dtype))
    return layers.constrain(out.astype(jnp.float32) + self.softmax_bias, ('batch', 'length', 'act_vocab'))

  def candidate_logits(self, h: jax.Array, candidates: jax.Array) -> jax.Array:
    """Logits of the candidate words only: `h [..., P]`, `candidates [S]` -> `[..., S]` float32."""
    kernel = jnp.take(self.softmax_kernel, candidates, axis=0).astype(self.dtype)
    out = jnp.einsum('...p,sp->...s', h.astype(self.dtype), kernel).astype(jnp.float32)
    return out + jnp.take(self.softmax_bias, candidates)

  def target_logits(self, h: jax.Array, targets: jax.Array) -> jax.Array:
    """The logit of each position's own target: `h [batch, length, P]`, `targets [batch, length]` -> same."""
    kernel = jnp.take(self.softmax_kernel, targets, axis=0).astype(self.dtype)
    out = jnp.sum(h.astype(self.dtype) * kernel, axis=-1).astype(jnp.float32)
    return out + jnp.take(self.softmax_bias, targets)

  def features(self, char_ids: jax.Array, lengths: jax.Array) -> jax.Array:
    """The task features: layer 0 (the token vector twice) and every LSTM layer (forward ‖ backward).

    `[batch, length, chars]`, `[batch]` -> `[1 + n_lstm_layers, batch, length, 2 P]`.
    """
    out = self(char_ids, lengths, deterministic=True)
    rows = [jnp.concatenate([out['token'], out['token']], axis=-1)]
    rows += [jnp.concatenate([f, b], axis=-1) for f, b in zip(out['forward'], out['backward'])]
    return jnp.stack([r.astype(jnp.float32) for r in rows])


def num_params(params) -> int:
  return sum(x.size for x in jax.tree.leaves(params))


def flops_per_token(cfg: ml_collections.ConfigDict, softmax_columns: int) -> float:
  """Training matmul FLOPs of one token position (forward + backward = 3x forward, 2 FLOPs per multiply-add).

  Counted: every convolution (chars - width + 1 windows), the highways, the token projection, both directions'
  LSTM layers (input and recurrent gate matmuls, the projection) and the softmax over `softmax_columns` words, for
  each direction. Embedding lookups, elementwise ops and the optimizer are excluded.
  """
  c, e, p, n = cfg.max_characters_per_token, cfg.char_embedding_dim, cfg.projection_dim, cfg.lstm_dim
  f = num_filters(cfg)
  conv = sum(2 * (c - w + 1) * w * e * ch for w, ch in cfg.filters)
  token = conv + cfg.n_highway * 2 * 2 * f * f + 2 * f * p
  lstm_layer = 2 * p * 4 * n + 2 * p * 4 * n + 2 * n * p
  per_direction = cfg.n_lstm_layers * lstm_layer + 2 * p * softmax_columns
  return 3.0 * (token + 2 * per_direction)
