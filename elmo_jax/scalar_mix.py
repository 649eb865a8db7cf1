"""The task-specific scalar mix of ELMo layers: `gamma * sum_j softmax(s)_j * h_j` (Peters et al. 2018, eq. 1)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from common import layers


def masked_layer_norm(x: jax.Array, mask: jax.Array | None, epsilon: float = 1e-12) -> jax.Array:
  """Normalises every sentence of one layer by the mean and variance over its real tokens and all features.

  `x [batch, length, d]`, `mask [batch, length]` (1 for real tokens; None: all real) -> `[batch, length, d]`.
  Statistics are per sentence, so no sentence depends on the others of its batch or on its padding.
  """
  x = x.astype(jnp.float32)
  if mask is None:
    mask = jnp.ones(x.shape[:2], jnp.float32)
  weights = mask.astype(jnp.float32)[..., None]
  count = jnp.maximum(jnp.sum(weights, axis=(1, 2)) * x.shape[-1], 1.0)[:, None, None]
  mean = jnp.sum(x * weights, axis=(1, 2), keepdims=True) / count
  variance = jnp.sum(jnp.square(x - mean) * weights, axis=(1, 2), keepdims=True) / count
  return (x - mean) * jax.lax.rsqrt(variance + epsilon)


class ScalarMix(nn.Module):
  """`gamma * sum_j softmax(s)_j * h_j` over `num_layers` layers, optionally layer-normalising each `h_j` first.

  `s` starts at zeros (equal weights) and `gamma` at 1.
  """
  num_layers: int
  layer_norm: bool = False

  @nn.compact
  def __call__(self, features: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """`features [num_layers, batch, length, d]`, `mask [batch, length]` -> `[batch, length, d]` float32."""
    if features.shape[0] != self.num_layers:
      raise ValueError(f'ScalarMix expects {self.num_layers} layers, got {features.shape[0]}')
    scalars = self.param('scalar_weights', layers.with_axes(nn.initializers.zeros, (None,)), (self.num_layers,),
                         jnp.float32)
    gamma = self.param('gamma', layers.with_axes(nn.initializers.ones, ()), (), jnp.float32)
    weights = jax.nn.softmax(scalars)
    features = features.astype(jnp.float32)
    if self.layer_norm:
      features = jnp.stack([masked_layer_norm(h, mask) for h in features])
    return gamma * jnp.einsum('j,jbld->bld', weights, features)
