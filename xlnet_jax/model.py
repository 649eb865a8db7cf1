"""XLNet (Yang et al. 2019) in Flax linen, batch-first, parameters annotated with logical axes for sharding.

Architecture as the original `modeling.py` (Transformer-XL with two-stream attention):
  * word embedding (tied to the LM output layer) and a learned `mask_emb` that starts the query stream;
  * per layer: relative multi-head attention with content, position and segment terms (q/k/v/o/r projections
    without bias, `r_w_bias`, `r_r_bias`, `r_s_bias`, `seg_embed`), post-LN; then a position-wise FFN, post-LN;
    the content stream h and the query stream g share every parameter;
  * sinusoid relative positional encoding (`bi_data`, `clamp_len`), relative segment encoding (same segment or
    not; memory counts as segment 0), Transformer-XL memory (`mem_len`, `reuse_len`), 'bi' or 'uni' attention
    (`same_length`).
The query stream is computed only at the P target positions given by `target_mapping`; without it there is no
query stream (fine-tuning uses h only).

Config fields are those of `xlnet_config.json` (n_token is `vocab_size`) plus the run options of the original
`train.py`: vocab_size, d_model, n_layer, n_head, d_head, d_inner, ff_activation, untie_r, dropout, dropatt,
initializer_range, layer_norm_eps, mem_len, reuse_len, bi_data, clamp_len, same_length, attn_type.
`ff_activation` 'gelu' is the exact erf GELU (as `transformers`), 'gelu_new' the tanh approximation (what the
original TensorFlow code computes for "gelu"), or 'relu'. `attention_impl` 'materialized' (the `[length, k_len]`
scores, `xlnet_jax.attention`) or 'chunked' (`xlnet_jax.chunked`: key blocks of `attention_block` with an online
softmax, memory linear in the length; a call that collects the `intermediates` attention maps stays materialised).

Input conventions (all batch-first):
  input_ids, segment_ids `[batch, length]`; input_mask `[batch, length]` 1 = real token, 0 = padding (the
  opposite of the original's `input_mask`; it is the `attention_mask` of `transformers`);
  perm_mask `[batch, length, length]` 1 = query i may NOT attend to key j; target_mapping `[batch, P, length]`
  one-hot rows (an all-zero row is a padding target); mems: one `[batch, M, d_model]` array per layer.
"""
from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import ml_collections
from flax import linen as nn

from common import attention, layers
from common.config import require
from xlnet_jax import attention as relative
from xlnet_jax import chunked

XLNET_CONFIG_FIELDS = ('vocab_size', 'd_model', 'n_layer', 'n_head', 'd_head', 'd_inner', 'ff_activation',
                       'untie_r', 'dropout', 'dropatt', 'initializer_range', 'layer_norm_eps', 'mem_len',
                       'reuse_len', 'bi_data', 'clamp_len', 'same_length', 'attn_type')
FF_ACTIVATIONS = ('gelu', 'gelu_new', 'relu')
SUMMARY_TYPES = ('last', 'first', 'mean', 'attn')
ATTENTION_IMPLS = ('materialized', 'chunked')  # Relative attention has no fused kernel.


def model_config(**overrides) -> ml_collections.ConfigDict:
  """An `xlnet_config.json`-shaped config plus run options; defaults are XLNet-large."""
  cfg = ml_collections.ConfigDict(dict(
      vocab_size=32000, d_model=1024, n_layer=24, n_head=16, d_head=64, d_inner=4096, ff_activation='gelu',
      untie_r=True, dropout=0.1, dropatt=0.1, initializer_range=0.02, layer_norm_eps=1e-12, mem_len=0,
      reuse_len=0, bi_data=False, clamp_len=-1, same_length=False, attn_type='bi', attention_impl='materialized',
      attention_block=attention.DEFAULT_BLOCK,
  ))
  cfg.update(overrides)
  return cfg


def validate_model_config(cfg: ml_collections.ConfigDict, prefix: str = 'model') -> None:
  """Raises `common.config.ConfigError` with a one-line message naming the first bad field."""
  for field in ('vocab_size', 'd_model', 'n_layer', 'n_head', 'd_head', 'd_inner'):
    value = cfg[field]
    require(isinstance(value, int) and not isinstance(value, bool) and value > 0, f'{prefix}.{field}',
            f'must be a positive integer, got {value!r}')
  require(cfg.d_model % 2 == 0, f'{prefix}.d_model', f'must be even (sinusoid encoding), got {cfg.d_model}')
  for field in ('initializer_range', 'layer_norm_eps'):
    value = cfg[field]
    require(isinstance(value, (int, float)) and value > 0, f'{prefix}.{field}',
            f'must be a positive number, got {value!r}')
  for field in ('dropout', 'dropatt'):
    value = cfg[field]
    require(isinstance(value, (int, float)) and 0.0 <= value < 1.0, f'{prefix}.{field}',
            f'must be in [0, 1), got {value!r}')
  for field in ('mem_len', 'reuse_len'):
    value = cfg[field]
    require(isinstance(value, int) and not isinstance(value, bool) and value >= 0, f'{prefix}.{field}',
            f'must be a non-negative integer, got {value!r}')
  require(isinstance(cfg.clamp_len, int) and not isinstance(cfg.clamp_len, bool), f'{prefix}.clamp_len',
          f'must be an integer (-1: no clamping), got {cfg.clamp_len!r}')
  for field in ('untie_r', 'bi_data', 'same_length'):
    require(isinstance(cfg[field], bool), f'{prefix}.{field}', f'must be true or false, got {cfg[field]!r}')
  require(cfg.ff_activation in FF_ACTIVATIONS, f'{prefix}.ff_activation',
          f'must be one of {FF_ACTIVATIONS}, got {cfg.ff_activation!r}')
  require(cfg.attn_type in relative.ATTN_TYPES, f'{prefix}.attn_type',
          f'must be one of {relative.ATTN_TYPES}, got {cfg.attn_type!r}')
  attention.validate_config(cfg, prefix, ATTENTION_IMPLS)


# ----------------------------------------------------------------------------------------------------------------
# Layers.
# ----------------------------------------------------------------------------------------------------------------

def _init(cfg: ml_collections.ConfigDict) -> layers.Initializer:
  """The original's initializer: normal(0, initializer_range) for every weight (biases start at zero)."""
  return nn.initializers.normal(cfg.initializer_range)


def _chunked(cfg: ml_collections.ConfigDict, module: nn.Module) -> bool:
  """Whether attention runs chunked: so configured, and the caller does not collect the attention maps."""
  return cfg.get('attention_impl', 'materialized') == 'chunked' and not module.is_mutable_collection('intermediates')


class StreamInputs(NamedTuple):
  """What every layer needs besides the hidden states (a pytree, so it passes through `nn.remat`).

  pos_emb `[1 or 2, r_len, d_model]` the relative positional encoding (2 rows with bi_data);
  content_mask `[batch or 1, length, k_len]` and query_mask `[batch, P, k_len]` bool, True = allowed (or None);
  seg_mismatch `[batch, length, k_len]` / seg_mismatch_g `[batch, P, k_len]` bool, True = different segments;
  target_positions `[batch, P]` the targets' positions along the key axis (memory included);
  target_weight `[batch, P]` 1 for a real target, 0 for a padding row of target_mapping;
  biases (r_w_bias, r_r_bias, r_s_bias) shared by all layers when `untie_r` is False, else None.
  Chunked attention builds its masks per tile instead: the masks and mismatches above are None and the model's
  inputs ride along: input_mask `[batch, length]`, perm_mask `[batch, length, length]`, segment_ids
  `[batch, length]` (each None when not given).
  """
  pos_emb: jax.Array
  content_mask: jax.Array | None = None
  query_mask: jax.Array | None = None
  seg_mismatch: jax.Array | None = None
  seg_mismatch_g: jax.Array | None = None
  target_positions: jax.Array | None = None
  target_weight: jax.Array | None = None
  biases: tuple[jax.Array, jax.Array, jax.Array] | None = None
  input_mask: jax.Array | None = None
  perm_mask: jax.Array | None = None
  segment_ids: jax.Array | None = None


class HeadsToModel(nn.Module):
  """Attention output projection `[batch, length, heads, head_dim] -> [batch, length, d_model]`.

  The kernel is stored `[d_model, heads, head_dim]` like the q/k/v kernels (the original's and HF's layout).
  """
  d_model: int
  kernel_init: layers.Initializer
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param('kernel', layers.with_axes(self.kernel_init, ('embed', 'heads', 'kv')),
                        (self.d_model,) + x.shape[-2:], jnp.float32)
    return jnp.einsum('blnd,hnd->blh', x.astype(self.dtype), kernel.astype(self.dtype))


class RelativeAttention(nn.Module):
  """Two-stream relative multi-head attention + output projection, dropout, residual and LayerNorm.

  h `[batch, length, d_model]`, g `[batch, P, d_model]` or None, mem `[batch, M, d_model]` or None.
  Keys and values come from [mem; h] for both streams; returns (h, g) updated.
  """
  config: ml_collections.ConfigDict
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, h, g, mem, inputs: StreamInputs, deterministic: bool):
    cfg = self.config
    init = _init(cfg)
    heads, head_dim = cfg.n_head, cfg.d_head
    act_heads = ('batch', 'length', 'act_heads', None)

    def projection(name):
      return layers.DenseGeneral((heads, head_dim), ('embed', 'heads', 'kv'), use_bias=False, kernel_init=init,
                                 dtype=self.dtype, name=name)

    def bias(name, shape, axes):
      return self.param(name, layers.with_axes(init, axes), shape, jnp.float32)

    query = projection('q')
    cat = h if mem is None else jnp.concatenate([mem.astype(h.dtype), h], axis=1)
    k = layers.constrain(projection('k')(cat), act_heads)
    v = layers.constrain(projection('v')(cat), act_heads)
    k_r = relative.repeat_halves(projection('r')(inputs.pos_emb), h.shape[0])
    if cfg.untie_r:
      r_w_bias, r_r_bias, r_s_bias = (bias(name, (heads, head_dim), ('heads', 'kv'))
                                      for name in ('r_w_bias', 'r_r_bias', 'r_s_bias'))
    else:
      r_w_bias, r_r_bias, r_s_bias = inputs.biases
    seg_embed = bias('seg_embed', (2, heads, head_dim), (None, 'heads', 'kv'))
    output = HeadsToModel(cfg.d_model, init, self.dtype, name='o')
    layer_norm = layers.LayerNorm(cfg.layer_norm_eps, self.dtype, name='layer_norm')

    def attend(q, mask, seg_mismatch, positions, sow_probs=None):
      dropout_rng = self.make_rng('dropout') if not deterministic and cfg.dropatt > 0 else None
      if _chunked(cfg, self):
        ctx = chunked.chunked_relative_attention(
            q, k, v, k_r, r_w_bias, r_r_bias, r_s_bias=r_s_bias, seg_embed=seg_embed,
            segment_ids=inputs.segment_ids, input_mask=inputs.input_mask, perm_mask=inputs.perm_mask,
            query_positions=positions, mem_len=0 if mem is None else mem.shape[1], attn_type=cfg.attn_type,
            same_length=cfg.same_length, block=attention.config_options(cfg)['block'], dropout_rate=cfg.dropatt,
            dropout_rng=dropout_rng, deterministic=deterministic)
        return layers.constrain(ctx, act_heads)
      ctx = relative.relative_attention(
          q, k, v, k_r, r_w_bias, r_r_bias, r_s_bias=r_s_bias, seg_embed=seg_embed, seg_mismatch=seg_mismatch,
          mask=None if mask is None else mask[:, None], query_positions=positions, dropout_rate=cfg.dropatt,
          dropout_rng=dropout_rng, deterministic=deterministic, sow_probs=sow_probs)
      return layers.constrain(ctx, act_heads)

    def post_attention(x, ctx):
      out = layers.Dropout(cfg.dropout)(output(ctx), deterministic=deterministic)
      return layer_norm(x + out)

    q_h = layers.constrain(query(h), act_heads)
    content_probs = attention.probs_sower(self)  # The content stream's maps only.
    h_out = post_attention(h, attend(q_h, inputs.content_mask, inputs.seg_mismatch, None, content_probs))
    g_out = None
    if g is not None:
      q_g = layers.constrain(query(g), act_heads)
      ctx_g = attend(q_g, inputs.query_mask, inputs.seg_mismatch_g, inputs.target_positions)
      if inputs.target_weight is not None:
        ctx_g = ctx_g * inputs.target_weight[:, :, None, None].astype(ctx_g.dtype)
      g_out = post_attention(g, ctx_g)
    return h_out, g_out


class FeedForward(nn.Module):
  """x = LN(x + dropout(layer_2(dropout(act(layer_1(x)))))) over `[batch, length, d_model]`."""
  config: ml_collections.ConfigDict
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, deterministic: bool):
    cfg = self.config
    init = _init(cfg)
    y = layers.DenseGeneral((cfg.d_inner,), ('embed', 'mlp'), kernel_init=init, dtype=self.dtype,
                            name='layer_1')(x)
    y = layers.activation(cfg.ff_activation)(y)
    y = layers.constrain(y, ('batch', 'length', 'act_mlp'))
    y = layers.Dropout(cfg.dropout)(y, deterministic=deterministic)
    y = layers.DenseGeneral((cfg.d_model,), ('mlp', 'embed'), kernel_init=init, dtype=self.dtype,
                            name='layer_2')(y)
    y = layers.Dropout(cfg.dropout)(y, deterministic=deterministic)
    return layers.LayerNorm(cfg.layer_norm_eps, self.dtype, name='layer_norm')(x + y)


class XLNetLayer(nn.Module):
  """One XLNet block: two-stream relative attention, then the FFN on each stream (shared parameters)."""
  config: ml_collections.ConfigDict
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, h, g, mem, inputs: StreamInputs, deterministic: bool):
    act = ('batch', 'length', 'act_embed')
    h, g = RelativeAttention(self.config, self.dtype, name='rel_attn')(h, g, mem, inputs, deterministic)
    ff = FeedForward(self.config, self.dtype, name='ff')
    h = layers.constrain(ff(h, deterministic), act)
    if g is not None:
      g = layers.constrain(ff(g, deterministic), act)
    return h, g


# ----------------------------------------------------------------------------------------------------------------
# The model.
# ----------------------------------------------------------------------------------------------------------------

def cache_mem(current: jax.Array, previous: jax.Array | None, mem_len: int, reuse_len: int = 0) -> jax.Array:
  """The next memory of one layer: the last `mem_len` states of [previous; current[:, :reuse_len] or current].

  current `[batch, length, d_model]` (the layer's input), previous `[batch, M, d_model]` or None ->
  `[batch, min(mem_len, M + used), d_model]`, with gradients stopped.
  """
  if reuse_len > 0:
    current = current[:, :reuse_len]
  if previous is not None:
    current = jnp.concatenate([previous.astype(current.dtype), current], axis=1)
  return jax.lax.stop_gradient(current[:, -mem_len:])


def target_mapping_from_positions(positions: jax.Array, length: int, valid: jax.Array | None = None) -> jax.Array:
  """`positions [batch, P]` -> one-hot `target_mapping [batch, P, length]` float32 (rows with `valid` 0 are zero)."""
  mapping = jax.nn.one_hot(positions, length, dtype=jnp.float32)
  if valid is not None:
    mapping = mapping * valid[..., None].astype(jnp.float32)
  return mapping


class XLNetModel(nn.Module):
  """The XLNet encoder. `__call__` returns (output_h `[batch, length, d_model]`, output_g `[batch, P, d_model]`
  or None, new_mems: a list of `n_layer` arrays `[batch, <= mem_len, d_model]`, empty when `mem_len` is 0).

  Parameters: `word_embedding/embedding [vocab, d_model]`, `mask_emb [1, 1, d_model]`, `layer_{i}/...`, and
  with `untie_r` False the shared `r_w_bias`, `r_r_bias`, `r_s_bias` `[n_head, d_head]`.
  """
  config: ml_collections.ConfigDict
  dtype: Any = jnp.float32
  remat: bool = False

  def setup(self):
    cfg = self.config
    init = _init(cfg)
    self.word_embedding = layers.Embed(cfg.vocab_size, cfg.d_model, ('vocab', 'embed'), init, self.dtype)
    self.mask_emb = self.param('mask_emb', layers.with_axes(init, (None, None, 'embed')), (1, 1, cfg.d_model),
                               jnp.float32)
    if not cfg.untie_r:
      shape, axes = (cfg.n_head, cfg.d_head), ('heads', 'kv')
      self.r_w_bias = self.param('r_w_bias', layers.with_axes(init, axes), shape, jnp.float32)
      self.r_r_bias = self.param('r_r_bias', layers.with_axes(init, axes), shape, jnp.float32)
      self.r_s_bias = self.param('r_s_bias', layers.with_axes(init, axes), shape, jnp.float32)
    layer_cls = nn.remat(XLNetLayer, static_argnums=(5,)) if self.remat else XLNetLayer
    self.layer = [layer_cls(cfg, self.dtype) for _ in range(cfg.n_layer)]  # Named layer_0, layer_1, ...
    self.dropout = layers.Dropout(cfg.dropout)

  def attend(self, x: jax.Array) -> jax.Array:
    """`[..., d_model] -> [..., vocab]` logits against the word embedding (the tied output layer)."""
    return self.word_embedding.attend(x)

  def __call__(self, input_ids, segment_ids=None, input_mask=None, perm_mask=None, target_mapping=None,
               mems: Sequence[jax.Array] | None = None, *, deterministic: bool = True):
    """See the module docstring for the input conventions.

    segment_ids None: no segment term (as `transformers` without token_type_ids). input_mask None: no padding.
    perm_mask None: no permutation (full attention for 'bi'). target_mapping None: no query stream.
    mems None or empty: no memory.
    """
    cfg = self.config
    batch, length = input_ids.shape
    mems = list(mems) if mems else None
    if mems is not None and len(mems) != cfg.n_layer:
      raise ValueError(f'mems: expected {cfg.n_layer} arrays (one per layer), got {len(mems)}')
    mem_len = mems[0].shape[1] if mems else 0
    k_len = mem_len + length
    if cfg.bi_data and batch % 2:
      raise ValueError(f'config.model.bi_data: needs an even batch size (forward and backward halves), got {batch}')

    h = self.dropout(self.word_embedding(input_ids), deterministic=deterministic)
    h = layers.constrain(h, ('batch', 'length', 'act_embed'))
    content_mask = query_mask = seg_mismatch = None
    chunked_inputs = dict(input_mask=input_mask, perm_mask=perm_mask, segment_ids=segment_ids)
    if not _chunked(cfg, self):
      chunked_inputs = {}
      content_mask, query_mask = relative.two_stream_masks(
          length, mem_len, input_mask=input_mask, perm_mask=perm_mask, attn_type=cfg.attn_type,
          same_length=cfg.same_length)
      seg_mismatch = None if segment_ids is None else relative.segment_mismatch(segment_ids, mem_len)
    pos_emb = relative.relative_positional_encoding(length, k_len, cfg.d_model, attn_type=cfg.attn_type,
                                                     bi_data=cfg.bi_data, clamp_len=cfg.clamp_len, dtype=self.dtype)
    pos_emb = self.dropout(pos_emb, deterministic=deterministic)
    inputs = StreamInputs(pos_emb, content_mask,
                          biases=None if cfg.untie_r else (self.r_w_bias, self.r_r_bias, self.r_s_bias),
                          seg_mismatch=seg_mismatch, **chunked_inputs)
    g = None
    if target_mapping is not None:
      targets = jnp.argmax(target_mapping, axis=-1).astype(jnp.int32)
      g = jnp.broadcast_to(self.mask_emb.astype(self.dtype), (batch, targets.shape[1], cfg.d_model))
      g = layers.constrain(self.dropout(g, deterministic=deterministic), ('batch', 'length', 'act_embed'))
      inputs = inputs._replace(query_mask=relative.gather_rows(query_mask, targets),
                               seg_mismatch_g=relative.gather_rows(seg_mismatch, targets),
                               target_positions=targets + mem_len,
                               target_weight=jnp.sum(target_mapping, axis=-1).astype(self.dtype))

    new_mems = []
    for i, layer in enumerate(self.layer):
      mem = mems[i] if mems else None
      if cfg.mem_len > 0:
        new_mems.append(cache_mem(h, mem, cfg.mem_len, cfg.reuse_len))
      h, g = layer(h, g, mem, inputs, deterministic)
    h = self.dropout(h, deterministic=deterministic)
    if g is not None:
      g = self.dropout(g, deterministic=deterministic)
    return h, g, new_mems


class OutputBias(nn.Module):
  """Adds a learned `bias [vocab]` (the LM head's output bias) to `[..., vocab]` logits."""
  vocab_size: int

  @nn.compact
  def __call__(self, logits: jax.Array) -> jax.Array:
    bias = self.param('bias', layers.with_axes(nn.initializers.zeros, ('vocab',)), (self.vocab_size,), jnp.float32)
    return layers.add_bias(logits, bias)


class XLNetLMHeadModel(nn.Module):
  """XLNet with the LM head: logits tied to the word embedding plus `lm_loss/bias`.

  `__call__` (same inputs as `XLNetModel`) returns (logits float32, new_mems): logits `[batch, P, vocab]` from the
  query stream when `target_mapping` is given, else `[batch, length, vocab]` from the content stream.
  """
  config: ml_collections.ConfigDict
  dtype: Any = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, input_ids, segment_ids=None, input_mask=None, perm_mask=None, target_mapping=None,
               mems=None, *, deterministic: bool = True):
    transformer = XLNetModel(self.config, self.dtype, self.remat, name='transformer')
    h, g, new_mems = transformer(input_ids, segment_ids, input_mask, perm_mask, target_mapping, mems,
                                 deterministic=deterministic)
    logits = transformer.attend(h if g is None else g).astype(jnp.float32)
    logits = OutputBias(self.config.vocab_size, name='lm_loss')(logits)
    return layers.constrain(logits, ('batch', None, 'act_vocab')), new_mems


class SequenceSummary(nn.Module):
  """One vector per sequence for classification heads: `[batch, length, d_model] -> [batch, d_model]`.

  summary_type 'last' (XLNet puts <cls> last), 'first', 'mean' (over real tokens when `input_mask` is given),
  or 'attn' (a learned query `summary_bias` attending over the sequence with multi-head attention, the
  original's `summarize_sequence`); then, as `transformers`' `sequence_summary`, a dense projection `summary`,
  tanh and dropout.
  """
  config: ml_collections.ConfigDict
  summary_type: str = 'last'
  dropout: float = 0.1
  use_proj: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, hidden, input_mask=None, *, deterministic: bool = True):
    """hidden `[batch, length, d_model]`, input_mask `[batch, length]` (1 = real token) -> `[batch, d_model]`."""
    cfg = self.config
    init = _init(cfg)
    if self.summary_type not in SUMMARY_TYPES:
      raise ValueError(f'summary_type must be one of {SUMMARY_TYPES}, got {self.summary_type!r}')
    if self.summary_type == 'last':
      summary = hidden[:, -1]
    elif self.summary_type == 'first':
      summary = hidden[:, 0]
    elif self.summary_type == 'mean':
      if input_mask is None:
        summary = jnp.mean(hidden, axis=1)
      else:
        weights = input_mask.astype(hidden.dtype)[..., None]
        summary = jnp.sum(hidden * weights, axis=1) / jnp.maximum(jnp.sum(weights, axis=1), 1)
    else:
      query = self.param('summary_bias', layers.with_axes(init, ('embed',)), (cfg.d_model,), jnp.float32)
      query = jnp.broadcast_to(query.astype(self.dtype), (hidden.shape[0], 1, cfg.d_model))

      def projection(name, x):
        return layers.DenseGeneral((cfg.n_head, cfg.d_head), ('embed', 'heads', 'kv'), use_bias=False,
                                   kernel_init=init, dtype=self.dtype, name=name)(x)

      mask = None if input_mask is None else attention.padding_mask(input_mask)
      dropout_rng = self.make_rng('dropout') if not deterministic and cfg.dropatt > 0 else None
      ctx = attention.dot_product_attention(projection('q', query), projection('k', hidden),
                                            projection('v', hidden), mask, dropout_rate=cfg.dropatt,
                                            dropout_rng=dropout_rng, deterministic=deterministic)
      out = HeadsToModel(cfg.d_model, init, self.dtype, name='o')(ctx)
      out = layers.Dropout(cfg.dropout)(out, deterministic=deterministic)
      summary = layers.LayerNorm(cfg.layer_norm_eps, self.dtype, name='layer_norm')(out)[:, 0]
    if self.use_proj:
      summary = layers.DenseGeneral((cfg.d_model,), ('embed', 'act_embed'), kernel_init=init, dtype=self.dtype,
                                    name='summary')(summary)
      summary = jnp.tanh(summary)
    return layers.Dropout(self.dropout)(summary, deterministic=deterministic)


# ----------------------------------------------------------------------------------------------------------------
# Counting.
# ----------------------------------------------------------------------------------------------------------------

def num_params(params) -> int:
  return sum(x.size for x in jax.tree.leaves(params))


def flops_per_example(cfg: ml_collections.ConfigDict, seq_len: int, num_predict: int, mem_len: int = 0,
                      batch_size: int = 1) -> float:
  """Training matmul FLOPs of one sequence as the jitted step executes them (forward + backward).

  Convention: 2 FLOPs per multiply-add (a `[m, k] x [k, n]` matmul is 2*m*n*k); backward counted explicitly per
  matmul: one more forward's worth for the weight (or second operand) gradient and one for the input gradient, so
  3x forward where both operands need gradients, 2x where one operand is a constant or stop-gradient. Embedding
  lookups, softmax, LayerNorm, dropout, the other elementwise ops and the optimizer are excluded.

  Counted, per layer:
  * k / v projections over the `mem_len + seq_len` keys (3x: the memory is stop-gradient, but its rows' input
    gradient is computed with the segment's, as one matmul over the concatenated keys, and then dropped);
  * the position projection r of the relative encoding, `r_len` rows (`mem_len + 2 * seq_len` for 'bi',
    `mem_len + seq_len + 1` for 'uni'; two encodings with `bi_data`), computed ONCE per forward pass and shared by
    its `batch_size` rows (the encoding does not depend on the example), 2x (the encoding is a constant);
  * per query row: q projection, scores (content over `k_len`, position over `r_len` before the shift, segment),
    context, output projection and FFN (3x). The query stream has `num_predict` rows. The content stream has
    `seq_len` rows in every layer except the last when `num_predict > 0`: pretraining reads only the query stream
    after the last layer (the memory is cut from each layer's input), so the last layer's content stream is dead
    code that XLA removes. With `num_predict == 0` (no query stream, e.g. fine-tuning) all layers count.
  And the tied LM head at the `num_predict` targets (3x).

  batch_size: the rows of one forward pass (the global batch divided by the gradient-accumulation steps), over
  which the position projection is shared; 1 counts it whole for every example.
  """
  d, f, n, v = cfg.d_model, cfg.d_inner, cfg.n_layer, cfg.vocab_size
  inner = cfg.n_head * cfg.d_head
  k_len = mem_len + seq_len
  r_len = k_len + (seq_len if cfg.attn_type == 'bi' else 1)
  encodings = 2 if cfg.bi_data else 1
  fwd_bwd, fwd_wgrad = 3.0, 2.0

  def stream(rows):  # q projection, scores (content + position + segment), context, output projection, FFN.
    return rows * (d * inner + k_len * inner + r_len * inner + 2 * inner + k_len * inner + inner * d + 2 * d * f)

  content_layers = n - 1 if num_predict > 0 else n
  kv = fwd_bwd * 2 * k_len * d * inner
  position = fwd_wgrad * encodings * r_len * d * inner / batch_size
  macs = (n * (kv + position + fwd_bwd * stream(num_predict)) + content_layers * fwd_bwd * stream(seq_len)
          + fwd_bwd * num_predict * d * v)
  return 2.0 * macs
