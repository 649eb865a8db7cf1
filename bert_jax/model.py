"""BERT (Devlin et al. 2018) in Flax linen, parameters annotated with logical axes for sharding.

Architecture as the original `modeling.py`: embeddings = word + segment + learned position, LayerNorm, dropout;
post-LN Transformer encoder; pooler = tanh(dense(h[CLS])); pretraining heads: MLM transform (dense, act, LayerNorm)
then logits tied to the word embedding plus an output bias, computed only at the gathered predicted positions;
NSP = dense(pooled) -> 2.

Config fields are those of `bert_config.json`: vocab_size, hidden_size, num_hidden_layers, num_attention_heads,
intermediate_size, hidden_act, hidden_dropout_prob, attention_probs_dropout_prob, max_position_embeddings,
type_vocab_size, initializer_range (plus layer_norm_eps, default 1e-12), and how attention is computed:
attention_impl ('materialized', 'chunked', 'fused' or 'auto', see `common.attention`) with attention_block (the
block of 'chunked').
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import linen as nn

from common import attention, layers
from common.config import require, require_choice, require_fraction, require_positive

BERT_CONFIG_FIELDS = ('vocab_size', 'hidden_size', 'num_hidden_layers', 'num_attention_heads', 'intermediate_size',
                      'hidden_act', 'hidden_dropout_prob', 'attention_probs_dropout_prob', 'max_position_embeddings',
                      'type_vocab_size', 'initializer_range')


def model_config(**overrides) -> ml_collections.ConfigDict:
  """A `bert_config.json`-shaped config; defaults are BERT-base."""
  cfg = ml_collections.ConfigDict(dict(
      vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
      hidden_act='gelu', hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1, max_position_embeddings=512,
      type_vocab_size=2, initializer_range=0.02, layer_norm_eps=1e-12, attention_impl='materialized',
      attention_block=attention.DEFAULT_BLOCK,
  ))
  cfg.update(overrides)
  return cfg


def validate_model_config(cfg: ml_collections.ConfigDict, prefix: str = 'model') -> None:
  require_positive(cfg, ['vocab_size', 'hidden_size', 'num_hidden_layers', 'num_attention_heads',
                         'intermediate_size', 'max_position_embeddings', 'type_vocab_size', 'initializer_range'])
  require(cfg.hidden_size % cfg.num_attention_heads == 0, f'{prefix}.hidden_size',
          f'{cfg.hidden_size} is not divisible by num_attention_heads={cfg.num_attention_heads}')
  require_fraction(cfg, ['hidden_dropout_prob', 'attention_probs_dropout_prob'])
  require_choice(cfg, 'hidden_act', ['gelu', 'gelu_new', 'gelu_tanh', 'gelu_pytorch_tanh', 'relu', 'tanh'])
  attention.validate_config(cfg, prefix)


class BertEmbeddings(nn.Module):
  config: ml_collections.ConfigDict
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, input_ids, segment_ids, deterministic: bool, position_ids=None):
    cfg = self.config
    init = layers.truncated_normal(cfg.initializer_range)
    word = layers.Embed(cfg.vocab_size, cfg.hidden_size, ('vocab', 'embed'), init, self.dtype, name='word_embeddings')
    position = layers.Embed(cfg.max_position_embeddings, cfg.hidden_size, ('position', 'embed'), init, self.dtype,
                            name='position_embeddings')
    segment = layers.Embed(cfg.type_vocab_size, cfg.hidden_size, ('type_vocab', 'embed'), init, self.dtype,
                           name='token_type_embeddings')
    length = input_ids.shape[1]
    positions = position(jnp.arange(length))[None] if position_ids is None else position(position_ids)
    x = word(input_ids) + segment(segment_ids) + positions
    x = layers.LayerNorm(cfg.layer_norm_eps, self.dtype, name='LayerNorm')(x)
    x = layers.Dropout(cfg.hidden_dropout_prob)(x, deterministic=deterministic)
    return layers.constrain(x, ('batch', 'length', 'act_embed')), word


class BertLayer(nn.Module):
  """One post-LN Transformer block: x = LN(x + Attn(x)); x = LN(x + FFN(x))."""
  config: ml_collections.ConfigDict
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, mask, deterministic: bool):
    cfg = self.config
    init = layers.truncated_normal(cfg.initializer_range)
    heads = cfg.num_attention_heads
    head_dim = cfg.hidden_size // heads

    def proj(name):
      return layers.DenseGeneral((heads, head_dim), ('embed', 'heads', 'kv'), kernel_init=init, dtype=self.dtype,
                                 name=name)(x)

    q, k, v = proj('query'), proj('key'), proj('value')
    dropout_rng = None
    if not deterministic and cfg.attention_probs_dropout_prob > 0:
      dropout_rng = self.make_rng('dropout')
    ctx = attention.dot_product_attention(q, k, v, mask, dropout_rate=cfg.attention_probs_dropout_prob,
                                          dropout_rng=dropout_rng, deterministic=deterministic,
                                          sow_probs=attention.probs_sower(self), **attention.config_options(cfg))
    ctx = layers.constrain(ctx, ('batch', 'length', 'act_heads', None))
    out = layers.DenseGeneral((cfg.hidden_size,), ('heads', 'kv', 'embed'), in_dims=2, kernel_init=init,
                              dtype=self.dtype, name='attention_output')(ctx)
    out = layers.Dropout(cfg.hidden_dropout_prob)(out, deterministic=deterministic)
    x = layers.LayerNorm(cfg.layer_norm_eps, self.dtype, name='attention_LayerNorm')(x + out)

    h = layers.DenseGeneral((cfg.intermediate_size,), ('embed', 'mlp'), kernel_init=init, dtype=self.dtype,
                            name='intermediate')(x)
    h = layers.activation(cfg.hidden_act)(h)
    h = layers.constrain(h, ('batch', 'length', 'act_mlp'))
    h = layers.DenseGeneral((cfg.hidden_size,), ('mlp', 'embed'), kernel_init=init, dtype=self.dtype,
                            name='output')(h)
    h = layers.Dropout(cfg.hidden_dropout_prob)(h, deterministic=deterministic)
    x = layers.LayerNorm(cfg.layer_norm_eps, self.dtype, name='output_LayerNorm')(x + h)
    return layers.constrain(x, ('batch', 'length', 'act_embed'))


class BertModel(nn.Module):
  """Encoder + pooler. Returns (sequence_output `[batch, length, hidden]`, pooled `[batch, hidden]`, word Embed).

  Packed rows (several examples laid end to end, `common.finetune_packing`): `position_ids` `[batch, length]`
  (each example's own positions), `example_ids` `[batch, length]` (1 + the example's slot in its row, 0 for
  padding: attention stays inside an example) and `pool_at` `[E]` (the flat index row * length + column of each
  of the E examples' first token): pooled is then `[E, hidden]`, one per example."""
  config: ml_collections.ConfigDict
  dtype: Any = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, input_ids, segment_ids=None, input_mask=None, *, deterministic: bool = True,
               position_ids=None, example_ids=None, pool_at=None):
    cfg = self.config
    if segment_ids is None:
      segment_ids = jnp.zeros_like(input_ids)
    if input_mask is None:
      input_mask = jnp.ones_like(input_ids)
    x, word = BertEmbeddings(cfg, self.dtype, name='embeddings')(input_ids, segment_ids, deterministic,
                                                                  position_ids)
    mask = attention.padding_mask(input_mask) if example_ids is None else attention.packed_mask(example_ids)
    layer_cls = nn.remat(BertLayer, static_argnums=(3,)) if self.remat else BertLayer
    for i in range(cfg.num_hidden_layers):
      x = layer_cls(cfg, self.dtype, name=f'layer_{i}')(x, mask, deterministic)
    first = x[:, 0] if pool_at is None else x.reshape(-1, x.shape[-1])[pool_at]
    pooled = layers.DenseGeneral((cfg.hidden_size,), ('embed', 'act_embed'),
                                 kernel_init=layers.truncated_normal(cfg.initializer_range), dtype=self.dtype,
                                 name='pooler')(first)
    return x, jnp.tanh(pooled), word


def gather_positions(x: jax.Array, positions: jax.Array) -> jax.Array:
  """`x [batch, length, d]`, `positions [batch, P]` -> `[batch, P, d]`."""
  return jnp.take_along_axis(x, positions[..., None].astype(jnp.int32), axis=1)


class BertForPreTraining(nn.Module):
  """BERT with MLM and NSP heads.

  `__call__(input_ids, segment_ids, input_mask, masked_lm_positions)` returns
  (mlm_logits `[batch, P, vocab]` float32 at the given positions — all positions if None —, nsp_logits `[batch, 2]`).
  """
  config: ml_collections.ConfigDict
  dtype: Any = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, input_ids, segment_ids=None, input_mask=None, masked_lm_positions=None, *,
               deterministic: bool = True):
    cfg = self.config
    sequence, pooled, word = BertModel(cfg, self.dtype, self.remat, name='bert')(
        input_ids, segment_ids, input_mask, deterministic=deterministic)
    init = layers.truncated_normal(cfg.initializer_range)
    h = sequence if masked_lm_positions is None else gather_positions(sequence, masked_lm_positions)
    h = layers.DenseGeneral((cfg.hidden_size,), ('embed', 'act_embed'), kernel_init=init, dtype=self.dtype,
                            name='mlm_transform')(h)
    h = layers.activation(cfg.hidden_act)(h)
    h = layers.LayerNorm(cfg.layer_norm_eps, self.dtype, name='mlm_LayerNorm')(h)
    mlm_bias = self.param('mlm_output_bias', layers.with_axes(nn.initializers.zeros, ('vocab',)),
                          (cfg.vocab_size,), jnp.float32)
    mlm_logits = layers.add_bias(word.attend(h).astype(jnp.float32), mlm_bias)
    mlm_logits = layers.constrain(mlm_logits, ('batch', None, 'act_vocab'))
    nsp_logits = layers.DenseGeneral((2,), ('embed', 'classes'), kernel_init=init, dtype=self.dtype,
                                     name='nsp')(pooled).astype(jnp.float32)
    return mlm_logits, nsp_logits


def num_params(params) -> int:
  return sum(x.size for x in jax.tree.leaves(params))


def flops_per_example(cfg: ml_collections.ConfigDict, seq_len: int, num_predictions: int,
                      next_sentence: bool = True) -> float:
  """Training matmul FLOPs of one sequence as the jitted step executes them (forward + backward).

  Convention: 2 FLOPs per multiply-add (a `[m, k] x [k, n]` matmul is 2*m*n*k), and backward = 2x forward (the
  input gradient and the weight gradient), so 3x forward in all: every matmul here has both operands on the
  gradient path (layer 0's input is the embeddings, which are trained).

  Counted: Q/K/V/O projections, attention scores and context, and the FFN over all `seq_len` rows of every layer;
  the MLM transform + tied vocab projection at the `num_predictions` gathered positions; the pooler and the NSP
  classifier on the [CLS] row when `next_sentence` (without NSP nothing reads the pooler and XLA removes it).
  Embedding lookups, softmax, LayerNorm, dropout, the other elementwise ops and the optimizer are excluded.
  """
  h, f, n, v = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.vocab_size
  per_layer = 2 * seq_len * (4 * h * h + 2 * h * f) + 2 * 2 * seq_len * seq_len * h
  heads = 2 * num_predictions * (h * h + h * v)
  if next_sentence:
    heads += 2 * h * h + 2 * h * 2
  return 3.0 * (n * per_layer + heads)
