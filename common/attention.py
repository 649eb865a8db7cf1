"""Attention kernels.

`dot_product_attention`: plain masked multi-head attention (BERT; GPT with a causal mask).
Shapes: q `[batch, q_len, heads, head_dim]`, k/v `[batch, k_len, heads, head_dim]`,
mask broadcastable to `[batch, heads, q_len, k_len]` with True where attention is ALLOWED.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

# Large negative instead of -inf so fully-masked rows (padding queries) stay finite.
MASK_VALUE = -1e9


def padding_mask(input_mask: jax.Array) -> jax.Array:
  """`[batch, k_len]` 1/0 key mask -> `[batch, 1, 1, k_len]` boolean (True = may attend)."""
  return (input_mask > 0)[:, None, None, :]


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None = None, *,
                          dropout_rate: float = 0.0, dropout_rng: jax.Array | None = None,
                          deterministic: bool = True) -> jax.Array:
  """softmax(q·k / sqrt(head_dim) + mask) · v -> `[batch, q_len, heads, head_dim]`.

  Softmax runs in float32 whatever the compute dtype. Attention-probability dropout (BERT's
  `attention_probs_dropout_prob`) applies when `deterministic` is False.
  """
  dtype = q.dtype
  scale = 1.0 / jnp.sqrt(jnp.asarray(q.shape[-1], jnp.float32))
  scores = jnp.einsum('bqhd,bkhd->bhqk', q, k, preferred_element_type=jnp.float32) * scale
  if mask is not None:
    scores = jnp.where(mask, scores, MASK_VALUE)
  probs = jax.nn.softmax(scores, axis=-1)
  if not deterministic and dropout_rate > 0.0:
    keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, probs.shape)
    probs = jnp.where(keep, probs / (1.0 - dropout_rate), 0.0)
  return jnp.einsum('bhqk,bkhd->bqhd', probs.astype(dtype), v)
