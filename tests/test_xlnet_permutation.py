"""Tests for XLNet's on-device factorisation order: mask invariants, agreement with the original mask rule, the
target mapping, jit and batch sharding on 8 fake devices, and the order's statistics (fixed seeds, stated bounds).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from xlnet_jax import permutation

L, R = 64, 32


def random_inputs(batch, seed, *, length=L, reuse_len=R, target_rate=0.2, num_specials=3):
  """Random `is_target` and `is_special` (specials in the second part, never targets). `[B, L] bool` each."""
  rng = np.random.default_rng(seed)
  is_special = np.zeros([batch, length], bool)
  for b in range(batch):
    is_special[b, rng.choice(np.arange(reuse_len, length), num_specials, replace=False)] = True
  is_target = (rng.random([batch, length]) < target_rate) & ~is_special
  return is_target, is_special


def sample(is_target, is_special, *, seed=0, num_predict=24, perm_size=None, reuse_len=R):
  fn = jax.jit(lambda key, t, s: permutation.sample_permutation(key, t, s, num_predict=num_predict,
                                                                perm_size=perm_size, reuse_len=reuse_len))
  out = fn(jax.random.key(seed), jnp.asarray(is_target), jnp.asarray(is_special))
  return {k: np.asarray(v) for k, v in out.items()}


def original_perm_mask(rank, is_target, is_special, reuse_len):
  """The original `_local_perm` rule for one row, per part, then the reuse block: 1 = may not attend.

  rev = -1 for ordinary tokens, else the position in the order; targets compare with their own rev, the others
  with rev + 1; a key that is a target or special is hidden when the query's value <= the key's rev.
  """
  length = len(rank)
  mask = np.zeros([length, length], np.float32)
  for lo, hi in ((0, reuse_len), (reuse_len, length)):
    ordinary = ~(is_target[lo:hi] | is_special[lo:hi])
    rev = np.where(ordinary, -1, rank[lo:hi])
    self_rev = np.where(is_target[lo:hi], rev, rev + 1)
    mask[lo:hi, lo:hi] = (self_rev[:, None] <= rev[None, :]) & ~ordinary[None, :]
  mask[:reuse_len, reuse_len:] = 1.0
  return mask


@pytest.mark.parametrize('perm_size', [None, 8])
def test_mask_invariants(perm_size):
  is_target, is_special = random_inputs(16, seed=1)
  out = sample(is_target, is_special, perm_size=perm_size, num_predict=L)
  perm_mask, rank = out['perm_mask'], out['rank']
  allowed = perm_mask == 0                                      # Query stream: i may attend to j.
  content_allowed = np.asarray(permutation.content_stream_mask(jnp.asarray(perm_mask))) == 0
  eye = np.eye(L, dtype=bool)
  part = np.arange(L) >= R
  block = np.where(part, np.arange(L) - R, np.arange(L)) // (perm_size or R)
  np.testing.assert_array_equal(out['is_target'], is_target)
  for b in range(len(is_target)):
    t, s = is_target[b], is_special[b]
    ordinary = ~(t | s)
    a, c = allowed[b], content_allowed[b]
    assert c[eye].all()                                         # The content stream sees itself.
    assert not a[eye][t].any() and a[eye][~t].all()             # The query stream of a target does not.
    # A valid factorisation order: every allowed key that is a target or special comes strictly earlier.
    qi, kj = np.nonzero(a & ~eye & (t | s)[None, :])
    assert np.all(rank[b][kj] < rank[b][qi])
    # Acyclic without trusting `rank`: ordering targets by how many targets each sees makes "sees" strictly
    # lower-triangular (a chain inside each part).
    for in_part in (~part, part):
      idx = np.flatnonzero(t & in_part)
      sub = a[np.ix_(idx, idx)]
      order = np.argsort(sub.sum(1), kind='stable')
      assert not np.triu(sub[np.ix_(order, order)]).any()
      assert len(set(sub.sum(1).tolist())) == len(idx)          # One total order, no ties.
    # Ordinary tokens see no target or special of their own (or a later) part.
    hidden = (t | s)[None, :] & (part[None, :] >= part[:, None])
    assert not (a & hidden)[ordinary].any()
    # Every target sees every ordinary token of its part and of earlier parts.
    visible = ordinary[None, :] & (part[None, :] <= part[:, None])
    assert a[visible & t[:, None]].all()
    # The reuse part never sees the rest, in either stream.
    assert not a[:R, R:].any() and not c[:R, R:].any()
    # Targets of an earlier block of the same part are seen by every target of a later block.
    later = (block[None, :] < block[:, None]) & (part[None, :] == part[:, None]) & t[None, :] & t[:, None]
    assert a[later].all()
    # Exactly the original's rule, given the same order.
    np.testing.assert_array_equal(perm_mask[b], original_perm_mask(rank[b], t, s, R))
  np.testing.assert_array_equal(perm_mask.max(0)[:R, R:], 1.0)
  np.testing.assert_array_equal(np.asarray(permutation.reuse_block_mask(L, R))[:R, R:], 1.0)
  assert np.asarray(permutation.reuse_block_mask(L, R)).sum() == R * (L - R)


def test_target_mapping_and_cap():
  is_target, is_special = random_inputs(8, seed=2, target_rate=0.5)
  num_predict = 20
  out = sample(is_target, is_special, num_predict=num_predict)
  for b in range(len(is_target)):
    positions = np.flatnonzero(is_target[b])[:num_predict]      # The first P targets, in position order.
    n = len(positions)
    np.testing.assert_array_equal(out['target_index'][b, :n], positions)
    np.testing.assert_array_equal(out['target_index'][b, n:], 0)
    np.testing.assert_array_equal(out['target_weights'][b], np.arange(num_predict) < n)
    mapping = out['target_mapping'][b]
    assert mapping.shape == (num_predict, L)
    np.testing.assert_array_equal(mapping[:n], np.eye(L, dtype=np.float32)[positions])
    assert not mapping[n:].any()
    # Targets beyond the cap are ordinary tokens: visible to the targets of their part, their own query sees itself.
    dropped = np.flatnonzero(is_target[b])[num_predict:]
    kept = out['is_target'][b]
    assert kept.sum() == n and not kept[dropped].any()
    if len(dropped):
      assert out['perm_mask'][b][np.ix_(positions[positions >= R], dropped[dropped >= R])].sum() == 0
  # P larger than L pads.
  big = sample(is_target[:2], is_special[:2], num_predict=L + 5)
  assert big['target_mapping'].shape == (2, L + 5, L) and big['target_index'].shape == (2, L + 5)


def test_no_reuse_part_and_specials():
  is_target, is_special = random_inputs(4, seed=3, reuse_len=0)
  out = sample(is_target, is_special, reuse_len=0, perm_size=None)
  allowed = out['perm_mask'] == 0
  for b in range(4):
    s = is_special[b]
    assert allowed[b][s, s].all()                                # A special's query sees itself.
    ordinary = ~(is_target[b] | s)
    assert allowed[b][np.ix_(is_target[b], ordinary)].all()
    assert not allowed[b][np.ix_(ordinary, is_target[b] | s)].any()


def test_jit_on_device_and_batch_sharding_equals_unsharded():
  devices = np.asarray(jax.devices())
  assert len(devices) == 8, 'conftest sets 8 fake CPU devices'
  is_target, is_special = random_inputs(16, seed=4)
  mesh = Mesh(devices, ('data',))
  batch_sharding = NamedSharding(mesh, PartitionSpec('data'))
  fn = jax.jit(lambda key, t, s: permutation.sample_permutation(key, t, s, num_predict=16, perm_size=16,
                                                                reuse_len=R))
  key = jax.random.key(7)
  plain = fn(key, jnp.asarray(is_target), jnp.asarray(is_special))
  sharded_inputs = [jax.device_put(x, batch_sharding) for x in (is_target, is_special)]
  sharded_fn = jax.jit(fn, in_shardings=(NamedSharding(mesh, PartitionSpec()), batch_sharding, batch_sharding),
                       out_shardings=batch_sharding)
  sharded = sharded_fn(key, *sharded_inputs)
  for name, value in plain.items():
    assert isinstance(sharded[name], jax.Array) and sharded[name].sharding.is_equivalent_to(batch_sharding,
                                                                                           value.ndim)
    np.testing.assert_array_equal(np.asarray(sharded[name]), np.asarray(value))
  # A different key gives a different order; the same key the same one.
  again = fn(key, jnp.asarray(is_target), jnp.asarray(is_special))
  np.testing.assert_array_equal(np.asarray(again['rank']), np.asarray(plain['rank']))
  other = fn(jax.random.key(8), jnp.asarray(is_target), jnp.asarray(is_special))
  assert not np.array_equal(np.asarray(other['rank']), np.asarray(plain['rank']))


def test_order_statistics():
  """Over many rows with the same targets, each target precedes each other target of its block half of the time.

  4096 rows: the standard error of a fraction is 0.0078; the bound 0.05 is > 6 standard errors.
  """
  batch = 4096
  pattern = np.zeros([L], bool)
  pattern[[1, 5, 9, 20, 30, 33, 40, 41, 50, 63]] = True
  is_target = np.broadcast_to(pattern, (batch, L))
  is_special = np.zeros([batch, L], bool)
  out = sample(is_target, is_special, seed=11, num_predict=16, perm_size=16)
  rank = out['rank']
  positions = np.flatnonzero(pattern)
  block = np.where(positions >= R, 2 + (positions - R) // 16, positions // 16)
  for x in range(len(positions)):
    for y in range(x + 1, len(positions)):
      before = np.mean(rank[:, positions[x]] < rank[:, positions[y]])
      if block[x] == block[y]:
        assert abs(before - 0.5) < 0.05, (positions[x], positions[y], before)
      else:
        assert before == 1.0                                      # Earlier blocks and parts come first.
  # Every order of the three targets of one block appears about equally often (1/6 each, bound 0.03).
  triple = rank[:, [40, 41, 33]]
  codes = np.argsort(triple, axis=1) @ np.asarray([9, 3, 1])
  frequencies = np.bincount(codes, minlength=27)[np.unique(codes)] / batch
  assert len(frequencies) == 6 and np.all(np.abs(frequencies - 1 / 6) < 0.03)
