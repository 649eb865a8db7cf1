"""XLNet's relative attention (Transformer-XL with two streams), batch-first.

`relative_attention` and its helpers: `relative_positional_encoding` (sinusoid encoding of relative distances),
`rel_shift` / `rel_shift_rows` (align position scores to the keys), `segment_mismatch` (relative segment encoding),
`two_stream_masks` (content and query stream masks from the padding and permutation masks), `gather_rows`.

Shapes: queries `[batch, q_len, heads, head_dim]`; keys/values over `k_len = mem_len + q_len` positions (the
memory first, then the current segment); the relative positional encoding has `r_len` rows, one per relative
distance from `k_len` down to `-q_len` (exclusive) for 'bi' attention, to `-1` (exclusive) for 'uni'.
Masks use the convention of `common.attention`: True where attention is ALLOWED.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from common.attention import attention_probs, causal_mask

ATTN_TYPES = ('bi', 'uni')


def relative_distances(q_len: int, k_len: int, attn_type: str = 'bi', clamp_len: int = -1) -> jax.Array:
  """`[r_len]` float32 relative distances `k_len, k_len - 1, ...` down to `-q_len` ('bi') or `-1` ('uni'), exclusive.

  Row p of the encoding stands for "the query is `k_len - p` positions after the key". With `clamp_len > 0`
  distances are clipped to `[-clamp_len, clamp_len]`.
  """
  if attn_type not in ATTN_TYPES:
    raise ValueError(f'attn_type must be one of {ATTN_TYPES}, got {attn_type!r}')
  end = -q_len if attn_type == 'bi' else -1
  distances = jnp.arange(k_len, end, -1, dtype=jnp.float32)
  if clamp_len > 0:
    distances = jnp.clip(distances, -clamp_len, clamp_len)
  return distances


def sinusoid_encoding(distances: jax.Array, d_model: int) -> jax.Array:
  """`[..., r_len]` distances -> `[..., r_len, d_model]`: `[sin(d * f), cos(d * f)]`, f = 1 / 10000^(2i / d_model)."""
  inv_freq = 1.0 / (10000.0 ** (jnp.arange(0, d_model, 2, dtype=jnp.float32) / d_model))
  angles = distances[..., None].astype(jnp.float32) * inv_freq
  return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)


def relative_positional_encoding(q_len: int, k_len: int, d_model: int, *, attn_type: str = 'bi',
                                 bi_data: bool = False, clamp_len: int = -1, dtype=jnp.float32) -> jax.Array:
  """The sinusoid relative positional encoding, `[1, r_len, d_model]` or, with `bi_data`, `[2, r_len, d_model]`.

  The leading axis broadcasts over the batch: one encoding shared by every sequence, or with `bi_data` a forward
  encoding for the first half of the batch and the reversed one (distances negated, i.e. the sequence read
  backwards) for the second half; `repeat_halves` expands it to the batch.
  """
  forward = relative_distances(q_len, k_len, attn_type, clamp_len)
  if not bi_data:
    return sinusoid_encoding(forward, d_model)[None].astype(dtype)
  return sinusoid_encoding(jnp.stack([forward, -forward]), d_model).astype(dtype)  # Clipping is symmetric.


def repeat_halves(x: jax.Array, batch: int) -> jax.Array:
  """`[1 or 2, ...]` -> `[1 or batch, ...]`: a two-row (bi_data) array becomes first half / second half of `batch`."""
  if x.shape[0] == 1:
    return x
  if x.shape[0] != 2 or batch % 2:
    raise ValueError(f'bi_data needs an even batch size and a [2, ...] encoding, got batch {batch} and '
                     f'shape {x.shape}')
  return jnp.repeat(x, batch // 2, axis=0)


def rel_shift(x: jax.Array, k_len: int) -> jax.Array:
  """`[batch, heads, q_len, r_len]` position scores -> `[batch, heads, q_len, k_len]` aligned to the keys.

  Entry (i, j) of the result is entry (i, j + q_len - i) of the input: query i (at position `mem_len + i`) and key
  j are `mem_len + i - j` apart, which is row `k_len - (mem_len + i - j)` of the encoding. Implemented with the
  reshape trick (view as `[r_len, q_len]`, drop the first row, view as `[q_len, r_len - 1]`, keep `k_len` columns).
  For 'uni' encodings the entries for future keys (j > mem_len + i) wrap around; they are masked anyway.
  """
  b, n, q, r = x.shape
  x = x.reshape(b, n, r, q)[:, :, 1:]
  return x.reshape(b, n, q, r - 1)[..., :k_len]


def rel_shift_rows(x: jax.Array, key_positions: jax.Array, k_len: int) -> jax.Array:
  """`rel_shift` for queries at arbitrary positions (the query stream at its target positions).

  `x [batch, heads, P, r_len]` position scores of P queries whose positions along the key axis (memory included,
  i.e. `mem_len + position in the segment`) are `key_positions [batch, P]` -> `[batch, heads, P, k_len]` with
  entry (m, j) = x[m, j + k_len - key_positions[m]] (row `k_len - d` of the encoding is distance d). Indices past
  the end of the encoding (future keys of 'uni' attention, which are masked) are clipped.
  """
  r = x.shape[-1]
  index = jnp.arange(k_len)[None, None, :] + k_len - key_positions[:, :, None].astype(jnp.int32)
  index = jnp.clip(index, 0, r - 1)
  return jnp.take_along_axis(x, index[:, None], axis=-1)


def segment_mismatch(segment_ids: jax.Array, mem_len: int = 0) -> jax.Array:
  """`[batch, q_len]` segment ids -> `[batch, q_len, mem_len + q_len]` bool, True where query and key segments differ.

  Memory positions count as segment 0 (the relative segment encoding only asks "same segment or not").
  """
  keys = segment_ids
  if mem_len:
    keys = jnp.concatenate([jnp.zeros((segment_ids.shape[0], mem_len), segment_ids.dtype), segment_ids], axis=1)
  return segment_ids[:, :, None] != keys[:, None, :]


def two_stream_masks(q_len: int, mem_len: int = 0, *, input_mask: jax.Array | None = None,
                     perm_mask: jax.Array | None = None, attn_type: str = 'bi', same_length: bool = False
                     ) -> tuple[jax.Array | None, jax.Array | None]:
  """(content mask, query mask), each `[batch or 1, q_len, mem_len + q_len]` bool (True = allowed), or both None.

  `input_mask [batch, q_len]`: 1 = real token, 0 = padding (padding keys are hidden from every query).
  `perm_mask [batch, q_len, q_len]`: 1 = query i may NOT attend to key j (the factorization order).
  With 'uni' attention the causal mask (`common.attention.causal_mask`) applies as well. Memory keys are never
  hidden by the input or permutation masks. The query stream uses the combined mask as is; the content stream
  additionally always sees its own position (the diagonal of the current segment). With 'bi' attention and
  neither mask, everything is visible and both masks are None.
  """
  if attn_type not in ATTN_TYPES:
    raise ValueError(f'attn_type must be one of {ATTN_TYPES}, got {attn_type!r}')
  blocked = None
  if input_mask is not None:
    blocked = (input_mask <= 0)[:, None, :]
  if perm_mask is not None:
    hidden = perm_mask > 0
    blocked = hidden if blocked is None else blocked | hidden
  if blocked is not None and mem_len:
    blocked = jnp.concatenate([jnp.zeros(blocked.shape[:2] + (mem_len,), bool), blocked], axis=-1)
  if attn_type == 'uni':
    future = ~causal_mask(q_len, mem_len, same_length)[None]
    blocked = future if blocked is None else blocked | future
  if blocked is None:
    return None, None
  query_allowed = ~blocked
  diagonal = jnp.arange(mem_len + q_len)[None, :] == mem_len + jnp.arange(q_len)[:, None]
  content_allowed = query_allowed | diagonal[None]
  return content_allowed, query_allowed


def gather_rows(x: jax.Array | None, positions: jax.Array) -> jax.Array | None:
  """`x [batch or 1, q_len or 1, ...]`, `positions [batch, P]` -> `[batch, P, ...]` (rows at the given positions;
  a row axis of 1, e.g. the padding-only mask of `two_stream_masks`, is the same row for every position)."""
  if x is None:
    return None
  if x.shape[1] == 1:
    return jnp.broadcast_to(x, positions.shape + x.shape[2:])
  x = jnp.broadcast_to(x, (positions.shape[0],) + x.shape[1:])
  index = positions.astype(jnp.int32).reshape(positions.shape + (1,) * (x.ndim - 2))
  return jnp.take_along_axis(x, index, axis=1)


def relative_attention(q: jax.Array, k: jax.Array, v: jax.Array, k_r: jax.Array, r_w_bias: jax.Array,
                       r_r_bias: jax.Array, *, r_s_bias: jax.Array | None = None,
                       seg_embed: jax.Array | None = None, seg_mismatch: jax.Array | None = None,
                       mask: jax.Array | None = None, query_positions: jax.Array | None = None,
                       dropout_rate: float = 0.0, dropout_rng: jax.Array | None = None,
                       deterministic: bool = True,
                       sow_probs: Callable[[jax.Array], object] | None = None) -> jax.Array:
  """XLNet's relative attention core -> `[batch, q_len, heads, head_dim]`.

  score(i, j) = [(q_i + r_w_bias)·k_j                      content
               + (q_i + r_r_bias)·k_r[distance(i, j)]      position (`rel_shift`)
               + (q_i + r_s_bias)·seg_embed[s_ij]] / sqrt(head_dim)   segment, s_ij = 1 if segments differ
  `common.attention.attention_probs` (masked float32 softmax over j, attention-probability dropout), then probs · v.

  q `[batch, q_len, heads, head_dim]`: the q_len rows of the segment in order, or any P query rows whose positions
  along the key axis (`mem_len + position in the segment`) are given by `query_positions [batch, P]`;
  k, v `[batch, k_len, heads, head_dim]`; k_r `[batch or 1, r_len, heads, head_dim]` the projected positional
  encoding; biases `[heads, head_dim]`; seg_embed `[2, heads, head_dim]` and seg_mismatch `[batch, q_len, k_len]`
  bool (the segment term is skipped when either is None); mask broadcastable to `[batch, heads, q_len, k_len]`,
  True = allowed. `sow_probs`: see `common.attention`.
  """
  dtype = q.dtype
  k_len = k.shape[1]
  scale = 1.0 / jnp.sqrt(jnp.asarray(q.shape[-1], jnp.float32))
  f32 = dict(preferred_element_type=jnp.float32)
  content = jnp.einsum('bqnd,bknd->bnqk', q + r_w_bias.astype(dtype), k, **f32)
  q_r = q + r_r_bias.astype(dtype)
  if k_r.shape[0] == 1:
    position = jnp.einsum('bqnd,rnd->bnqr', q_r, k_r[0], **f32)
  else:
    position = jnp.einsum('bqnd,brnd->bnqr', q_r, k_r, **f32)
  if query_positions is None:
    position = rel_shift(position, k_len)
  else:
    position = rel_shift_rows(position, query_positions, k_len)
  scores = content + position
  if seg_embed is not None and seg_mismatch is not None:
    segment = jnp.einsum('bqnd,snd->bnqs', q + r_s_bias.astype(dtype), seg_embed.astype(dtype), **f32)
    scores = scores + jnp.where(seg_mismatch[:, None], segment[..., 1:2], segment[..., 0:1])
  probs = attention_probs(scores * scale, mask, dropout_rate=dropout_rate, dropout_rng=dropout_rng,
                          deterministic=deterministic, sow_probs=sow_probs)
  return jnp.einsum('bnqk,bknd->bqnd', probs.astype(dtype), v)
