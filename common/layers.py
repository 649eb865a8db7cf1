"""Dense / Embed / LayerNorm / activation building blocks annotated with logical axis names.

Parameters are kept in float32 (master weights); `dtype` is the compute dtype (e.g. bfloat16 on TPU/GPU).
"""
from __future__ import annotations

import functools
import json
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
from flax import linen as nn
from flax import traverse_util

from common.config import require

Dtype = Any
Initializer = Callable[..., jax.Array]


# The compute dtypes a config may name (`config.dtype`); parameters stay float32 either way.
COMPUTE_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float16': jnp.float16}


def compute_dtype(name: str, allowed: Sequence[str] = tuple(COMPUTE_DTYPES)) -> Any:
  """The jnp dtype named by `config.dtype`; a `ConfigError` naming the field if `name` is not one of `allowed`."""
  require(name in allowed and name in COMPUTE_DTYPES, 'dtype', f'must be one of {sorted(allowed)}, got {name!r}')
  return COMPUTE_DTYPES[name]


def truncated_normal(stddev: float) -> Initializer:
  """The original BERT/XLNet initializer: normal(0, stddev) truncated at two standard deviations."""
  return nn.initializers.truncated_normal(stddev=stddev)


def with_axes(init: Initializer, axes: Sequence[str | None]) -> Initializer:
  return nn.with_logical_partitioning(init, tuple(axes))


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
  """`gelu` is the exact erf form (BERT, HF "gelu"); `gelu_new`/`gelu_tanh` the tanh approximation; `relu`."""
  table = {
      'gelu': functools.partial(jax.nn.gelu, approximate=False),
      'gelu_new': functools.partial(jax.nn.gelu, approximate=True),
      'gelu_tanh': functools.partial(jax.nn.gelu, approximate=True),
      'gelu_pytorch_tanh': functools.partial(jax.nn.gelu, approximate=True),
      'relu': jax.nn.relu,
      'tanh': jnp.tanh,
  }
  if name not in table:
    raise ValueError(f'unknown activation {name!r}; choose one of {sorted(table)}')
  return table[name]


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
  """Sharding constraint on an activation by logical names (a no-op outside a mesh/rules context)."""
  return nn.with_logical_constraint(x, tuple(axes))


class DenseGeneral(nn.Module):
  """`x @ kernel + bias` over the trailing `len(in_axes)` input dims, kernel shaped `[*in_shape, *features]`."""
  features: Sequence[int]
  kernel_axes: Sequence[str | None]
  in_dims: int = 1
  use_bias: bool = True
  kernel_init: Initializer = nn.initializers.lecun_normal()
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    features = tuple(self.features)
    in_shape = x.shape[x.ndim - self.in_dims:]
    kernel = self.param('kernel', with_axes(self.kernel_init, self.kernel_axes), in_shape + features, jnp.float32)
    contract_x = tuple(range(x.ndim - self.in_dims, x.ndim))
    contract_k = tuple(range(self.in_dims))
    y = jax.lax.dot_general(x.astype(self.dtype), kernel.astype(self.dtype), ((contract_x, contract_k), ((), ())))
    if self.use_bias:
      bias_axes = tuple(self.kernel_axes[self.in_dims:])
      bias = self.param('bias', with_axes(nn.initializers.zeros, bias_axes), features, jnp.float32)
      y = y + bias.astype(self.dtype)
    return y


class LayerNorm(nn.Module):
  """LayerNorm over the last axis computed in float32; parameters `scale` and `bias` over `embed`."""
  epsilon: float = 1e-12
  dtype: Dtype = jnp.float32
  axis_name: str = 'embed'

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    features = x.shape[-1]
    scale = self.param('scale', with_axes(nn.initializers.ones, (self.axis_name,)), (features,), jnp.float32)
    bias = self.param('bias', with_axes(nn.initializers.zeros, (self.axis_name,)), (features,), jnp.float32)
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.epsilon) * scale + bias
    return y.astype(self.dtype)


class Embed(nn.Module):
  """Lookup table `[num_embeddings, features]`; `attend` computes logits against the table (tied output layer)."""
  num_embeddings: int
  features: int
  axes: Sequence[str | None] = ('vocab', 'embed')
  embedding_init: Initializer = nn.initializers.normal(0.02)
  dtype: Dtype = jnp.float32

  def setup(self):
    self.embedding = self.param('embedding', with_axes(self.embedding_init, self.axes),
                                (self.num_embeddings, self.features), jnp.float32)

  def __call__(self, ids: jax.Array) -> jax.Array:
    return jnp.take(self.embedding, ids, axis=0).astype(self.dtype)

  def attend(self, x: jax.Array) -> jax.Array:
    """`x [..., features] -> [..., num_embeddings]` logits against the table."""
    return jnp.einsum('...d,vd->...v', x.astype(self.dtype), self.embedding.astype(self.dtype))


def keep_mask(rng: jax.Array, rate: float, shape: Sequence[int]) -> jax.Array:
  """bool `shape`, True with probability 1 - `rate`: dropout's keep mask from 16 random bits per element (one
  32-bit threefry word makes two), half the random-number work of `jax.random.bernoulli`, which spends a 32-bit
  word per element. An element is dropped when its 16 bits are below round(rate * 2^16), so the drop probability
  is `rate` within 2^-17. Deterministic in `rng` (resume stays bitwise); a different stream from `bernoulli`."""
  shape = tuple(int(n) for n in shape)
  last = shape[-1] if shape else 1
  words = jax.random.bits(rng, shape[:-1] + (-(-last // 2),), jnp.uint32)
  halves = jax.lax.bitcast_convert_type(words, jnp.uint16)                  # [..., ceil(last/2), 2]
  halves = halves.reshape(shape[:-1] + (2 * words.shape[-1],))[..., :last].reshape(shape)
  threshold = min(int(round(float(rate) * 65536)), 65535)
  return halves >= jnp.uint16(threshold)


def dropout(x: jax.Array, rate: float, rng: jax.Array) -> jax.Array:
  """Inverted dropout of `x` with `keep_mask`."""
  return jnp.where(keep_mask(rng, rate, x.shape), x / (1.0 - rate), jnp.zeros_like(x))


class Dropout(nn.Module):
  """`nn.Dropout(rate)(x, deterministic)` with `keep_mask` bits (the 'dropout' rng collection, as flax's)."""
  rate: float

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
    if deterministic or self.rate == 0.0:
      return x
    if self.rate >= 1.0:
      return jnp.zeros_like(x)
    return dropout(x, self.rate, self.make_rng('dropout'))


@jax.custom_vjp
def add_bias(x: jax.Array, bias: jax.Array) -> jax.Array:
  """`x [..., V] + bias [V]`, whose bias gradient is one matmul `ones[1, N] @ g[N, V]` instead of a column-sum
  reduction: on CPU XLA emits the reduction of a wide `[N, V]` cotangent (the vocab logits) as a slow pass (57 ms
  against 3.8 ms as a matmul for `[320, 32000]`). Same value; the gradient differs by summation order only."""
  return x + bias.astype(x.dtype)


def _add_bias_fwd(x, bias):
  return add_bias(x, bias), bias   # only its shape and dtype are used


def _add_bias_bwd(bias, g):
  dtype, shape = bias.dtype, bias.shape
  rows = g.reshape(-1, g.shape[-1])
  ones = jnp.ones((1, rows.shape[0]), rows.dtype)
  dbias = jnp.dot(ones, rows, preferred_element_type=jnp.float32).reshape(shape).astype(dtype)
  return g, dbias


add_bias.defvjp(_add_bias_fwd, _add_bias_bwd)


def argmax_hits(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """`argmax(logits, -1) == labels` as float32, ties going to the first maximum as in `jnp.argmax`, in one plain
  reduction: a label hits when no logit beats its own, none before it equals it, and its row holds no NaN (a miss;
  `jnp.argmax` would pick the NaN). XLA:CPU emits `argmax` as a (value, index) reduction it does not vectorise:
  with the loss over `[16, 20, 32000]` logits, argmax added 22 ms (as long as a vocab matmul), this adds 2.4 ms."""
  own = jnp.take_along_axis(logits, labels[..., None], axis=-1)
  index = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
  beaten = (logits > own) | (logits != logits) | ((logits == own) & (index < labels[..., None]))
  return jnp.logical_not(jnp.any(beaten, axis=-1)).astype(jnp.float32)


# ----------------------------------------------------------------------------------------------------------------
# Initialising a whole model once (filling the parameters a checkpoint lacks).
# ----------------------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=8)
def _init_program(module_cls, config_json: str, num_inputs: int, shape: tuple[int, ...], only: tuple[str, ...] | None):
  cfg = ml_collections.ConfigDict(json.loads(config_json))
  ids = jnp.zeros(shape, jnp.int32)

  def init(rng):
    params = nn.meta.unbox(module_cls(cfg).init(rng, *([ids] * num_inputs))['params'])
    if only is None:
      return params
    flat = traverse_util.flatten_dict(params, sep='/')
    return traverse_util.unflatten_dict({k: flat[k] for k in only}, sep='/')
  return jax.jit(init)


def init_model_params(module_cls, cfg, rng: jax.Array, num_inputs: int = 1, shape: tuple[int, ...] = (1, 2),
                      only=None):
  """Freshly initialised (unboxed) params of `module_cls(cfg)`, called on `num_inputs` int32 zero arrays of
  `shape`, as ONE compiled program per (model, config, `only`) instead of op by op. `only` (paths 'a/b/c'): return
  just those parameters; the initialisers of the others are dead code the compiler removes (filling a
  checkpoint's missing heads then costs no compilation of the embedding and encoder initialisers). The values
  are those of the full init: every parameter's random bits come from its own key."""
  only = None if only is None else tuple(sorted(only))
  return _init_program(module_cls, json.dumps(cfg.to_dict(), sort_keys=True), num_inputs, tuple(shape), only)(rng)
