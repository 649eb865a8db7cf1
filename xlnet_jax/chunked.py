"""XLNet's relative attention without the `[q_len, k_len]` scores: `chunked_relative_attention`.

The same scores as `xlnet_jax.attention.relative_attention` (content + position + segment terms, scaled, masked,
float32 softmax), computed tile by tile on `common.chunked_attention.chunked_scan`:
  * position term: each query block multiplies its `block` rows by the projected encoding once
    (`[batch, heads, block, r_len]`, linear in the length), and each key block gathers from it the distances it
    needs: entry (i, j) is row `j + k_len - position_i` (the `rel_shift` / `rel_shift_rows` alignment);
  * segment term: per tile from the query's and the key's segment ids (memory counts as segment 0);
  * masks: per tile from the inputs, as `two_stream_masks` combines them: padding keys (`input_mask`), the
    permutation mask rows of the block's queries, the causal mask for 'uni' (`same_length` too), memory keys
    never hidden by the input or permutation masks, and the content stream's own position always visible.
Nothing of size `[q_len, k_len]` is built except the `perm_mask` input itself; the backward recomputes each
query block (see `common.chunked_attention`). Attention-probability dropout: same distribution as the
materialised path, not the same bits.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from common.attention import MASK_VALUE
from common.chunked_attention import block_sizes, chunked_scan, pad_to
from xlnet_jax.attention import ATTN_TYPES


def _key_inputs(k: jax.Array, batch: int, mem_len: int, segment_ids: jax.Array | None,
                input_mask: jax.Array | None) -> tuple:
  """(k, key segments `[batch, k_len]` or None, key visible `[batch, k_len]` bool or None), memory first."""
  key_segments = key_visible = None
  if segment_ids is not None:
    key_segments = jnp.concatenate([jnp.zeros((batch, mem_len), segment_ids.dtype), segment_ids], axis=1)
  if input_mask is not None:
    key_visible = jnp.concatenate([jnp.ones((batch, mem_len), bool), input_mask > 0], axis=1)
  return k, key_segments, key_visible


def _tile_allowed(positions, j, key_visible, hidden, *, mem_len, attn_type, same_length, content_stream):
  """`[batch or 1, qb, kb]` bool (True = allowed) of queries at key-axis `positions [batch or 1, qb]` and keys
  `j [kb]`, or None when everything is visible."""
  blocked = None
  if key_visible is not None:
    blocked = ~key_visible[:, None, :]
  if hidden is not None:
    blocked = hidden if blocked is None else blocked | hidden
  if attn_type == 'uni':
    future = j[None, None, :] > positions[:, :, None]
    if same_length:
      future |= j[None, None, :] < positions[:, :, None] - mem_len
    blocked = future if blocked is None else blocked | future
  if blocked is None:
    return None
  allowed = ~blocked
  if content_stream:
    allowed |= j[None, None, :] == positions[:, :, None]
  return allowed


def chunked_relative_attention(q: jax.Array, k: jax.Array, v: jax.Array, k_r: jax.Array, r_w_bias: jax.Array,
                               r_r_bias: jax.Array, *, r_s_bias: jax.Array | None = None,
                               seg_embed: jax.Array | None = None, segment_ids: jax.Array | None = None,
                               input_mask: jax.Array | None = None, perm_mask: jax.Array | None = None,
                               query_positions: jax.Array | None = None, mem_len: int = 0, attn_type: str = 'bi',
                               same_length: bool = False, block: int = 512, dropout_rate: float = 0.0,
                               dropout_rng: jax.Array | None = None, deterministic: bool = True) -> jax.Array:
  """`relative_attention` tile by tile -> `[batch, q_len, heads, head_dim]`.

  q, k, v, k_r, the biases and seg_embed as `xlnet_jax.attention.relative_attention`. The segment of length L
  follows `mem_len` memory positions (k_len = mem_len + L). segment_ids `[batch, L]` (the segment term is skipped
  when it or seg_embed is None); input_mask `[batch, L]` 1 = real token; perm_mask `[batch, L, L]` 1 = query i may NOT see
  key j. query_positions None: the content stream (q holds the L rows of the segment in order, each sees its own
  position); else `[batch, P]` the queries' positions along the key axis (`mem_len + target`), the query stream.
  block: the query and key block size (any positive integer; it need not divide the lengths).
  """
  if attn_type not in ATTN_TYPES:
    raise ValueError(f'attn_type must be one of {ATTN_TYPES}, got {attn_type!r}')
  dtype = q.dtype
  batch, q_len = q.shape[:2]
  k_len, r_len = k.shape[1], k_r.shape[1]
  length = k_len - mem_len
  content_stream = query_positions is None
  if content_stream:
    query_positions = (mem_len + jnp.arange(q_len, dtype=jnp.int32))[None]
  query_positions = query_positions.astype(jnp.int32)
  scale = 1.0 / jnp.sqrt(jnp.asarray(q.shape[-1], jnp.float32))
  f32 = dict(preferred_element_type=jnp.float32)
  use_segment = seg_embed is not None and segment_ids is not None
  key_inputs = _key_inputs(k, batch, mem_len, segment_ids if use_segment else None, input_mask)
  kb = block_sizes(q_len, k_len, block)[1]

  def query_fn(inputs, _):
    q_blk, positions = inputs
    if k_r.shape[0] == 1:
      position = jnp.einsum('bqnd,rnd->bnqr', q_blk + r_r_bias.astype(dtype), k_r[0], **f32)
    else:
      position = jnp.einsum('bqnd,brnd->bnqr', q_blk + r_r_bias.astype(dtype), k_r, **f32)
    segment = query_segments = hidden = None
    if use_segment:
      segment = jnp.einsum('bqnd,snd->bnqs', q_blk + r_s_bias.astype(dtype), seg_embed.astype(dtype), **f32)
      query_segments = jnp.take_along_axis(key_inputs[1], jnp.broadcast_to(positions, (batch, q_blk.shape[1])),
                                           axis=1)
    if perm_mask is not None:
      rows = jnp.clip(positions - mem_len, 0, length - 1)
      rows = jnp.broadcast_to(rows, (batch, q_blk.shape[1]))
      hidden = jnp.take_along_axis(perm_mask, rows[:, :, None], axis=1) > 0  # [batch, qb, L]
      hidden = pad_to(jnp.pad(hidden, ((0, 0), (0, 0), (mem_len, 0))), 2, kb)  # Memory keys: never hidden.
    return q_blk + r_w_bias.astype(dtype), positions, position, segment, query_segments, hidden

  def tile_fn(state, inputs, start):
    q_w, positions, position, segment, query_segments, hidden = state
    k_blk, key_segments, key_visible = inputs
    j = start + jnp.arange(k_blk.shape[1])
    scores = jnp.einsum('bqnd,bknd->bnqk', q_w, k_blk, **f32)
    index = jnp.clip(j[None, None, :] + k_len - positions[:, :, None], 0, r_len - 1)
    scores = scores + jnp.take_along_axis(position, index[:, None], axis=-1)
    if segment is not None:
      differ = query_segments[:, :, None] != key_segments[:, None, :]
      scores = scores + jnp.where(differ[:, None], segment[..., 1:2], segment[..., 0:1])
    if hidden is not None:
      hidden = jax.lax.dynamic_slice_in_dim(hidden, start, k_blk.shape[1], axis=2)
    allowed = _tile_allowed(positions, j, key_visible, hidden, mem_len=mem_len, attn_type=attn_type,
                            same_length=same_length, content_stream=content_stream)
    scores = scores * scale
    return scores if allowed is None else jnp.where(allowed[:, None], scores, MASK_VALUE)

  return chunked_scan(query_fn, tile_fn, (q, query_positions), key_inputs, v, q_len=q_len, block=block,
                      dropout_rate=dropout_rate, dropout_rng=dropout_rng, deterministic=deterministic)
