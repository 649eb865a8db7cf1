"""Chunked attention: an online (flash-style) softmax over key blocks, so no `[q_len, k_len]` tensor is ever built.

The queries are split into blocks of `block` rows (a `lax.scan` whose body is `jax.checkpoint`ed, so the backward
recomputes a block's scores instead of storing them for every block), and for each query block a second
`lax.scan` runs over blocks of `block` keys carrying the running row maximum, the softmax denominator and the
weighted sum of the values. Temporaries are `[batch, heads, block, block]` per tile plus what the caller's
`query_fn` builds per query block (linear in the key length), so memory grows linearly with the sequence.

Semantics are those of `common.attention.attention_probs`: masked keys get `MASK_VALUE`, so a fully masked query
row (a padding query) averages the values uniformly, exactly as the materialised softmax does. Keys that only pad
the last block (block sizes need not divide the lengths) are dropped with -inf and never count. The result equals
the materialised one up to float32 rounding (the sum is taken in a different order).

Attention-probability dropout draws its keep mask per (query block, key block) from `fold_in`s of `dropout_rng`:
the same distribution as the materialised path (each probability kept with `1 - rate` and scaled by
`1 / (1 - rate)`, the denominator taken before dropout), but not the same bits, so the two paths agree only in
deterministic mode.

`chunked_scan` is the generic engine (XLNet's relative attention builds on it, `xlnet_jax/attention.py`);
`chunked_dot_product_attention` is plain masked attention on it.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax import lax

from common import layers
from common.attention import MASK_VALUE


def pad_to(x: jax.Array, axis: int, block: int) -> jax.Array:
  """Pads `axis` of `x` at its end (with 0 / False) to a multiple of `block` (so a last block, or a
  `dynamic_slice` of one, stays in range)."""
  size = x.shape[axis]
  padded = -(-size // block) * block
  if padded == size:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, padded - size)
  return jnp.pad(x, widths)


def _split_blocks(x: jax.Array, axis: int, block: int) -> jax.Array:
  """`pad_to`, then the block index moved to the front: `[..., n, ...] -> [ceil(n / block), ..., block, ...]`."""
  x = pad_to(x, axis, block)
  x = x.reshape(x.shape[:axis] + (x.shape[axis] // block, block) + x.shape[axis + 1:])
  return jnp.moveaxis(x, axis, 0)


def split_blocks(tree: Any, axis: int, block: int) -> Any:
  """`_split_blocks` over every array of a pytree (None leaves stay None)."""
  return jax.tree.map(lambda x: _split_blocks(x, axis, block), tree)


def block_sizes(q_len: int, k_len: int, block: int) -> tuple[int, int]:
  """(query block, key block): `block`, or the whole length when it is shorter."""
  if not isinstance(block, int) or isinstance(block, bool) or block <= 0:
    raise ValueError(f'attention block must be a positive integer, got {block!r}')
  return min(block, q_len), min(block, k_len)


def _online_softmax(tile_fn: Callable, key_blocks: Any, v_blocks: jax.Array, k_len: int, rows: int,
                    dropout: tuple[float, jax.Array] | None) -> jax.Array:
  """One query block against every key block -> `[batch, rows, heads, head_dim]` float32.

  tile_fn(key_block_inputs, start) -> `[batch, heads, rows, kb]` float32 scaled scores, masked entries already
  `MASK_VALUE`. v_blocks `[num_blocks, batch, kb, heads, head_dim]`.
  """
  _, batch, kb, heads, head_dim = v_blocks.shape

  def body(carry, xs):
    m, denom, acc = carry
    inputs, v_blk, index = xs
    start = index * kb
    scores = tile_fn(inputs, start)
    real = (start + jnp.arange(kb)) < k_len
    scores = jnp.where(real, scores, -jnp.inf)
    # Any constant works as the shift (the result does not depend on it), so it carries no gradient.
    m_new = lax.stop_gradient(jnp.maximum(m, jnp.max(scores, axis=-1)))
    alpha = jnp.exp(m - m_new)
    p = jnp.exp(scores - m_new[..., None])
    denom = denom * alpha + jnp.sum(p, axis=-1)
    if dropout is not None:
      rate, rng = dropout
      p = layers.dropout(p, rate, jax.random.fold_in(rng, index))
    ctx = jnp.einsum('bnqk,bknd->bqnd', p.astype(v_blk.dtype), v_blk, preferred_element_type=jnp.float32)
    acc = acc * jnp.swapaxes(alpha, 1, 2)[..., None] + ctx
    return (m_new, denom, acc), None

  init = (jnp.full((batch, heads, rows), -jnp.inf, jnp.float32), jnp.zeros((batch, heads, rows), jnp.float32),
          jnp.zeros((batch, rows, heads, head_dim), jnp.float32))
  num = v_blocks.shape[0]
  (_, denom, acc), _ = lax.scan(body, init, (key_blocks, v_blocks, jnp.arange(num)))
  return acc / jnp.swapaxes(denom, 1, 2)[..., None]


def chunked_scan(query_fn: Callable, tile_fn: Callable, query_inputs: Any, key_inputs: Any, v: jax.Array, *,
                 q_len: int, block: int, dropout_rate: float = 0.0, dropout_rng: jax.Array | None = None,
                 deterministic: bool = True) -> jax.Array:
  """The engine: softmax(scores) · v over query blocks x key blocks -> `[batch, q_len, heads, head_dim]`.

  query_inputs: a pytree of arrays `[batch or 1, q_len, ...]` split into query blocks; key_inputs: a pytree of
  arrays `[batch or 1, k_len, ...]` split into key blocks (axis 1 both); v `[batch, k_len, heads, head_dim]`.
  query_fn(query_block_inputs, q_start) -> per-query-block state (anything, e.g. position scores against every
  relative distance); tile_fn(state, key_block_inputs, k_start) -> `[batch, heads, qb, kb]` float32 scaled,
  masked scores. Lengths need not be multiples of `block`: the padding rows are cut, padding keys never count.
  """
  k_len = v.shape[1]
  qb, kb = block_sizes(q_len, k_len, block)
  key_blocks = split_blocks(key_inputs, 1, kb)
  v_blocks = _split_blocks(v, 1, kb)
  query_blocks = split_blocks(query_inputs, 1, qb)
  use_dropout = not deterministic and dropout_rate > 0.0

  @jax.checkpoint
  def body(inputs, index):
    state = query_fn(inputs, index * qb)
    dropout = (dropout_rate, jax.random.fold_in(dropout_rng, index)) if use_dropout else None
    out = _online_softmax(lambda k_in, start: tile_fn(state, k_in, start), key_blocks, v_blocks, k_len, qb,
                          dropout)
    return out

  num = -(-q_len // qb)
  _, out = lax.scan(lambda c, xs: (c, body(*xs)), None, (query_blocks, jnp.arange(num)))
  out = jnp.moveaxis(out, 0, 1)  # [batch, num, qb, heads, head_dim]
  out = out.reshape((out.shape[0], num * qb) + out.shape[3:])[:, :q_len]
  return out.astype(v.dtype)


def chunked_dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None = None, *,
                                  causal: bool = False, block: int = 512, dropout_rate: float = 0.0,
                                  dropout_rng: jax.Array | None = None, deterministic: bool = True) -> jax.Array:
  """`common.attention.dot_product_attention` without the `[q_len, k_len]` scores -> `[batch, q_len, heads, dim]`.

  mask: broadcastable to `[batch, heads, q_len, k_len]`, True = allowed, sliced per tile (keep it small: a padding
  mask `[batch, 1, 1, k_len]` is linear in the length). causal: query i (at key position `k_len - q_len + i`)
  sees keys up to itself, computed per tile.
  """
  q_len, k_len = q.shape[1], k.shape[1]
  scale = 1.0 / jnp.sqrt(jnp.asarray(q.shape[-1], jnp.float32))
  q_mask = k_mask = None
  if mask is not None:
    mask = jnp.asarray(mask)
    mask = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)
    if mask.shape[2] == 1:  # [b, h, 1, k] -> key inputs [b, k, h]
      k_mask = jnp.moveaxis(mask[:, :, 0], 2, 1)
    else:  # [b, h, q, k] -> query inputs [b, q, h, k] (each query block slices its keys)
      q_mask = jnp.broadcast_to(mask, mask.shape[:3] + (k_len,)).transpose(0, 2, 1, 3)
  offset = k_len - q_len

  kb = block_sizes(q_len, k_len, block)[1]

  def query_fn(inputs, q_start):
    q_blk, rows_mask = inputs
    return q_blk, None if rows_mask is None else pad_to(rows_mask, 3, kb), q_start

  def tile_fn(state, inputs, k_start):
    q_blk, rows_mask, q_start = state
    k_blk, keys_mask = inputs
    scores = jnp.einsum('bqhd,bkhd->bhqk', q_blk, k_blk, preferred_element_type=jnp.float32) * scale
    allowed = None
    if keys_mask is not None:
      allowed = jnp.moveaxis(keys_mask, 1, 2)[:, :, None]  # [b, h, 1, kb]
    if rows_mask is not None:
      cols = lax.dynamic_slice_in_dim(rows_mask, k_start, kb, axis=3)
      rows = jnp.moveaxis(cols, 1, 2)
      allowed = rows if allowed is None else allowed & rows
    if causal:
      i = q_start + offset + jnp.arange(q_blk.shape[1])
      future = (k_start + jnp.arange(kb))[None, :] > i[:, None]
      allowed = ~future if allowed is None else allowed & ~future
    return scores if allowed is None else jnp.where(allowed, scores, MASK_VALUE)

  return chunked_scan(query_fn, tile_fn, (q, q_mask), (k, k_mask), v, q_len=q_len, block=block,
                      dropout_rate=dropout_rate, dropout_rng=dropout_rng, deterministic=deterministic)
