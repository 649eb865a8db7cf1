"""Attention kernels shared by the models.

`dot_product_attention`: plain masked multi-head attention (BERT; GPT with `causal_mask`).
`attention_probs`: the masked float32 softmax and attention-probability dropout that every attention variant ends
with (XLNet's relative attention, in `xlnet_jax/attention.py`, uses it too).
Shapes: q `[batch, q_len, heads, head_dim]`, k/v `[batch, k_len, heads, head_dim]`,
mask broadcastable to `[batch, heads, q_len, k_len]` with True where attention is ALLOWED.

`sow_probs`: a Flax module's `sow` bound to its collection (the models pass
`functools.partial(self.sow, 'intermediates', 'attention_probs')`) receives the `[batch, heads, q_len, k_len]`
probabilities before dropout. Flax only stores them when the caller applies with `mutable=['intermediates']`
(`xlnet_jax/visualize.py attention`); otherwise the call is a no-op and costs nothing.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

# Large negative instead of -inf so fully-masked rows (padding queries) stay finite.
MASK_VALUE = -1e9


def padding_mask(input_mask: jax.Array) -> jax.Array:
  """`[batch, k_len]` 1/0 key mask -> `[batch, 1, 1, k_len]` boolean (True = may attend)."""
  return (input_mask > 0)[:, None, None, :]


def causal_mask(q_len: int, mem_len: int = 0, same_length: bool = False) -> jax.Array:
  """`[q_len, mem_len + q_len]` bool, True where allowed: query i sees the memory and keys up to itself.

  With `same_length` every query sees exactly `mem_len + 1` keys (the oldest memory drops out as i grows).
  """
  k_len = mem_len + q_len
  i = jnp.arange(q_len)[:, None]
  j = jnp.arange(k_len)[None, :]
  allowed = j <= mem_len + i
  if same_length:
    allowed &= j >= i
  return allowed


def attention_probs(scores: jax.Array, mask: jax.Array | None, *, dropout_rate: float = 0.0,
                    dropout_rng: jax.Array | None = None, deterministic: bool = True,
                    sow_probs: Callable[[jax.Array], object] | None = None) -> jax.Array:
  """`[batch, heads, q_len, k_len]` float32 scaled scores -> attention probabilities of the same shape.

  Masked keys get `MASK_VALUE` before a float32 softmax over the keys; attention-probability dropout applies when
  `deterministic` is False. `sow_probs` (module docstring) gets the probabilities before dropout.
  """
  if mask is not None:
    scores = jnp.where(mask, scores, MASK_VALUE)
  probs = jax.nn.softmax(scores, axis=-1)
  if sow_probs is not None:
    sow_probs(probs)
  if not deterministic and dropout_rate > 0.0:
    keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, probs.shape)
    probs = jnp.where(keep, probs / (1.0 - dropout_rate), 0.0)
  return probs


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None = None, *,
                          dropout_rate: float = 0.0, dropout_rng: jax.Array | None = None,
                          deterministic: bool = True,
                          sow_probs: Callable[[jax.Array], object] | None = None) -> jax.Array:
  """softmax(q·k / sqrt(head_dim) + mask) · v -> `[batch, q_len, heads, head_dim]`.

  Softmax runs in float32 whatever the compute dtype. Attention-probability dropout (BERT's
  `attention_probs_dropout_prob`) applies when `deterministic` is False.
  """
  dtype = q.dtype
  scale = 1.0 / jnp.sqrt(jnp.asarray(q.shape[-1], jnp.float32))
  scores = jnp.einsum('bqhd,bkhd->bhqk', q, k, preferred_element_type=jnp.float32) * scale
  probs = attention_probs(scores, mask, dropout_rate=dropout_rate, dropout_rng=dropout_rng,
                          deterministic=deterministic, sow_probs=sow_probs)
  return jnp.einsum('bhqk,bkhd->bqhd', probs.astype(dtype), v)
