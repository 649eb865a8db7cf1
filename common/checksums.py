"""Checksums of a checkpoint's arrays: two position-weighted sums of every array's bits, mod 2^32, computed where the
array lives (on device for sharded arrays, so a save never gathers the state to check it).

A save stores `state_checksums(state)` with the step; a restore recomputes them from the values read back and
compares (`checksum_mismatches`): a step whose values differ from what was saved is damaged.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

_W1 = np.uint32(0x9E3779B1)
_W2 = np.uint32(0x85EBCA77)
_SALT = np.uint32(0x5BD1E995)


def _as_words(x: jax.Array) -> jax.Array:
  """The array's bits as uint32 words (16- and 8-bit values widened, 64-bit values split in two)."""
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  size = jnp.dtype(x.dtype).itemsize
  if size == 4:
    return jax.lax.bitcast_convert_type(x, jnp.uint32)
  if size in (1, 2):
    return jax.lax.bitcast_convert_type(x, {1: jnp.uint8, 2: jnp.uint16}[size]).astype(jnp.uint32)
  return jax.lax.bitcast_convert_type(x, jnp.uint32)  # 8 bytes: a trailing axis of 2 words


def _leaf_checksum(x: jax.Array) -> jax.Array:
  """[2] uint32. Each word is multiplied by an odd weight that depends on its position, so changing any one word
  changes both sums (an odd weight times a non-zero difference is non-zero mod 2^32); the second sum mixes the
  word first (x ^ x >> 16 is a bijection) so that the two are independent. Sums mod 2^32 do not depend on the
  reduction order, hence not on the sharding."""
  words = _as_words(x)
  if words.ndim == 0:
    words = words[None]
  index = jnp.zeros(words.shape, jnp.uint32)
  for axis, size in enumerate(words.shape):
    index = index * jnp.uint32(size) + jax.lax.broadcasted_iota(jnp.uint32, words.shape, axis)
  w1 = (index * _W1) | jnp.uint32(1)
  w2 = ((index ^ _SALT) * _W2) | jnp.uint32(1)
  mixed = words ^ (words >> jnp.uint32(16))
  return jnp.stack([jnp.sum(words * w1, dtype=jnp.uint32), jnp.sum(mixed * w2, dtype=jnp.uint32)])


def leaf_name(path) -> str:
  """'params/encoder/layer_0/kernel' for any pytree key path (dict keys, attributes, sequence indices)."""
  parts = []
  for key in path:
    for attr in ('key', 'name', 'idx'):
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
    else:
      parts.append(str(key))
  return '/'.join(parts)


@jax.jit
def _checksums(leaves: list) -> jax.Array:
  return jnp.stack([_leaf_checksum(x) for x in leaves]) if leaves else jnp.zeros((0, 2), jnp.uint32)


_leaf_checksum_jit = jax.jit(_leaf_checksum)


def _on_one_device(x) -> bool:
  return not isinstance(x, jax.Array) or len(x.sharding.device_set) == 1


def state_checksums(tree: Any) -> dict[str, list[int]]:
  """{leaf name: [sum1, sum2]} of every array in `tree` (sharded device arrays or host numpy arrays).

  Leaves on one device each: one small program per leaf shape (a BERT's ~300 leaves have ~15 distinct shapes, and
  XLA compiles those in a fraction of the seconds one program over every leaf takes). Sharded leaves: that one
  program (many sharded programs in flight at once can deadlock the CPU backend's cross-device sums, and one
  program per leaf run in turn waits on every device ~300 times). The sums are the same either way: each leaf's is
  computed alone."""
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  names = [leaf_name(path) for path, _ in flat]
  leaves = [x for _, x in flat]
  if all(_on_one_device(x) for x in leaves):
    sums = [np.asarray(s) for s in jax.device_get([_leaf_checksum_jit(x) for x in leaves])]
  else:
    sums = np.asarray(jax.device_get(_checksums(leaves)))
  return {name: [int(a), int(b)] for name, (a, b) in zip(names, sums)}


def compile_for(tree: Any) -> None:
  """Compiles the programs `state_checksums` will run on arrays shaped and placed like `tree`'s leaves (arrays or
  `jax.ShapeDtypeStruct`s with a sharding), without computing anything: see `common.compile_ahead`."""
  leaves = jax.tree.leaves(tree)
  # An array not committed to its device (`jnp.asarray(host_value)`) calls the program compiled without one.
  abstract = [jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding if getattr(x, 'committed', True) else None)
              for x in leaves]
  if all(a.sharding is None or len(a.sharding.device_set) == 1 for a in abstract):
    seen = set()
    for a in abstract:
      key = (a.shape, a.dtype, a.sharding)
      if key not in seen:
        seen.add(key)
        _leaf_checksum_jit.lower(a).compile()
  else:
    _checksums.lower(abstract).compile()


def checksum_mismatches(tree: Any, expected: dict[str, list[int]]) -> list[str]:
  """Names of the leaves of `tree` whose checksum differs from `expected` (or that `expected` lacks)."""
  got = state_checksums(tree)
  return [name for name, sums in got.items() if expected.get(name) != sums]
