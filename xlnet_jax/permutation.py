"""XLNet's factorisation order, attention masks and target mapping, sampled on device inside the jitted step.

Inputs keep their natural order and positions; the factorisation order only shapes the masks. From `is_target`
(the positions to predict, written by the data pipeline) and `is_special` (`<sep>`, `<cls>`: the original's
"functional" tokens) `sample_permutation` draws, for every row independently:

* **Parts.** Positions `[0, reuse_len)` (the reuse part, whose hidden states the next step keeps as memory) form part
  0 and the rest part 1 (`reuse_len=0`: one part). Every position of part 0 comes before every position of part 1
  in the order, so the reuse part never depends on the second half; `reuse_block_mask` states it explicitly and is
  OR-ed into the mask (it changes nothing, it guards the invariant).
* **Inside a part.** Ordinary tokens (neither target nor special) come first and see each other in both directions:
  they are context, not predicted. Targets and specials follow in a random order, sampled in blocks of `perm_size`
  consecutive positions: block `k` of a part precedes block `k + 1`, and inside a block the order is a uniformly
  random permutation, drawn independently for every block and row. (The original draws one permutation of the
  offsets `0..perm_size-1` and applies it to every block; independent blocks are at least as diverse and equal to it
  when a part is one block, the default `perm_size = reuse_len = seq_len / 2`.)
* **Masks** (`perm_mask[b, i, j] = 1`: query `i` may NOT attend to key `j`; batch-first, as HF's `perm_mask`). This
  is the query-stream mask: `i` may attend to `j` iff `j` is an ordinary token of `i`'s part or an earlier part, or
  `j` is a target/special strictly earlier in the order, or `j == i` and `i` is not a target. So a target never
  sees itself nor any later target; ordinary tokens see no target or special of their own part (as in the original,
  they see those of earlier parts); specials see themselves. The content stream may always see itself:
  `content_stream_mask(perm_mask)` clears the diagonal, which is what the model does (HF convention).
* **Targets.** `target_index [B, P]` lists the target positions in increasing position order (at most
  `P = num_predict`; extra targets beyond the first P are treated as ordinary tokens), `target_weights [B, P]` is 1
  for real entries and 0 for padding, `target_mapping [B, P, L]` one-hot rows (zero rows for padding). The labels
  are the input tokens at `target_index`.

Everything is `jax.numpy` on `[B, L]` inputs, row-wise, so it jits, runs on device arrays and shards over the batch;
the random bits come from one key (`jax.random.bits` is sharding-invariant), so a sharded call equals an unsharded
one. Never build these masks on the host.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def reuse_block_mask(seq_len: int, reuse_len: int) -> jax.Array:
  """`[L, L] float32`, 1 where a query of the reuse part (`i < reuse_len`) would look at the rest (`j >= reuse_len`)."""
  pos = jnp.arange(seq_len)
  if not reuse_len:
    return jnp.zeros([seq_len, seq_len], jnp.float32)
  return ((pos[:, None] < reuse_len) & (pos[None, :] >= reuse_len)).astype(jnp.float32)


def content_stream_mask(perm_mask: jax.Array) -> jax.Array:
  """The content-stream mask `[..., L, L]`: `perm_mask` with the diagonal cleared (every position sees itself)."""
  length = perm_mask.shape[-1]
  return perm_mask * (1.0 - jnp.eye(length, dtype=perm_mask.dtype))


def sample_permutation(rng: jax.Array, is_target: jax.Array, is_special: jax.Array, *, num_predict: int,
                       perm_size: int | None, reuse_len: int = 0) -> dict[str, jax.Array]:
  """Samples a factorisation order per row and returns XLNet's masks (rules in the module docstring).

  Args:
    rng: a PRNG key.
    is_target: `[B, L] bool` positions to predict (specials are never targets; only the first `num_predict` count).
    is_special: `[B, L] bool` functional tokens (`<sep>`, `<cls>`).
    num_predict: P, the number of target slots.
    perm_size: block length of the order inside a part; None or 0: the whole part.
    reuse_len: length of the reuse part (0: none).
  Returns:
    `perm_mask [B, L, L] float32`, `target_mapping [B, P, L] float32`, `target_index [B, P] int32`,
    `target_weights [B, P] float32`, `rank [B, L] int32` (each position's place in the order; ordinary tokens
    first), `is_target [B, L] bool` (the targets used, after the cap).
  """
  is_special = jnp.asarray(is_special, bool)
  is_target = jnp.asarray(is_target, bool) & ~is_special
  batch, length = is_target.shape
  is_target = is_target & (jnp.cumsum(is_target, axis=1) <= num_predict)
  pos = jnp.arange(length, dtype=jnp.int32)
  if reuse_len and not 0 < reuse_len < length:
    raise ValueError(f'reuse_len={reuse_len} must be in (0, seq_len={length})')
  part = (pos >= reuse_len).astype(jnp.int32) if reuse_len else jnp.zeros([length], jnp.int32)
  block_size = int(perm_size) if perm_size else length
  block = (pos - part * reuse_len) // block_size
  num_blocks = length // block_size + 1

  # Order: part, then ordinary tokens before targets/specials, then block, then random bits.
  in_order = is_target | is_special
  primary = ((part[None, :] * 2 + in_order.astype(jnp.int32)) * num_blocks + block[None, :]).astype(jnp.int32)
  noise = jax.random.bits(rng, (batch, length), jnp.uint32)
  iota = jnp.broadcast_to(pos, (batch, length))
  _, _, order = jax.lax.sort((primary, noise, iota), dimension=1, num_keys=2)
  rank = jnp.argsort(order, axis=1).astype(jnp.int32)

  ordinary = ~in_order
  earlier_part = part[None, None, :] <= part[None, :, None]                       # [1, Lq, Lk]
  allowed = ((ordinary[:, None, :] & earlier_part)
             | (in_order[:, None, :] & (rank[:, None, :] < rank[:, :, None]))
             | (jnp.eye(length, dtype=bool)[None] & ~is_target[:, :, None]))
  perm_mask = jnp.maximum((~allowed).astype(jnp.float32), reuse_block_mask(length, reuse_len)[None])

  # Target slots: positions in increasing order, padded with L (weight 0, index 0).
  key = jnp.where(is_target, pos[None, :], length)
  if num_predict > length:
    key = jnp.pad(key, ((0, 0), (0, num_predict - length)), constant_values=length)
  slots = jnp.sort(key, axis=1)[:, :num_predict]
  valid = slots < length
  target_index = jnp.where(valid, slots, 0).astype(jnp.int32)
  target_weights = valid.astype(jnp.float32)
  target_mapping = jax.nn.one_hot(target_index, length, dtype=jnp.float32) * target_weights[:, :, None]
  return {'perm_mask': perm_mask, 'target_mapping': target_mapping, 'target_index': target_index,
          'target_weights': target_weights, 'rank': rank, 'is_target': is_target}
