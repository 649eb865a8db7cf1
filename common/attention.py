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

`implementation` of `dot_product_attention` (a model config's `attention_impl`, see `IMPLEMENTATIONS`):
  'materialized' the `[batch, heads, q_len, k_len]` scores and probabilities (the reference; the default);
  'chunked'      `common.chunked_attention`: an online softmax over key blocks of `block` keys, memory linear in
                 the length; equal to 'materialized' up to float32 rounding (dropout: same distribution, other bits);
  'fused'        `jax.nn.dot_product_attention`: cuDNN's fused kernel on a GPU where it takes the call (it needs
                 float16 / bfloat16), XLA's otherwise (on a GPU with a warning naming the reason, once);
  'auto'         'fused' on a GPU, 'materialized' elsewhere.
'chunked' and 'fused' fall back to 'materialized' for a call that sows its probabilities (`sow_probs` given: the
maps need them all); 'fused' also falls back while attention-probability dropout is active (it has none).
"""
from __future__ import annotations

import functools
import warnings
from typing import Callable

import jax
import jax.numpy as jnp

from common import layers
from common.config import require

# Large negative instead of -inf so fully-masked rows (padding queries) stay finite.
MASK_VALUE = -1e9
IMPLEMENTATIONS = ('materialized', 'chunked', 'fused', 'auto')
DEFAULT_BLOCK = 512


def validate_config(cfg, prefix: str = 'model', choices: tuple[str, ...] = IMPLEMENTATIONS) -> None:
  """A model config's `attention_impl` (one of `choices`) and `attention_block` (a positive integer), or
  `common.config.ConfigError` naming the field. Configs without the fields mean 'materialized'."""
  impl, block = cfg.get('attention_impl', 'materialized'), cfg.get('attention_block', DEFAULT_BLOCK)
  require(impl in choices, f'{prefix}.attention_impl', f'must be one of {choices}, got {impl!r}')
  require(isinstance(block, int) and not isinstance(block, bool) and block > 0, f'{prefix}.attention_block',
          f'must be a positive integer (the key / query block of chunked attention), got {block!r}')


def config_options(cfg) -> dict:
  """`implementation` and `block` keyword arguments of `dot_product_attention` from a model config."""
  return dict(implementation=cfg.get('attention_impl', 'materialized'),
              block=cfg.get('attention_block', DEFAULT_BLOCK))


def padding_mask(input_mask: jax.Array) -> jax.Array:
  """`[batch, k_len]` 1/0 key mask -> `[batch, 1, 1, k_len]` boolean (True = may attend)."""
  return (input_mask > 0)[:, None, None, :]


def packed_mask(example_ids: jax.Array) -> jax.Array:
  """`[batch, length]` example ids of packed rows (0 = padding) -> `[batch, 1, length, length]` boolean: a query
  attends to the real keys of its own example only."""
  same = example_ids[:, None, :, None] == example_ids[:, None, None, :]
  return same & (example_ids > 0)[:, None, None, :]


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
    probs = layers.dropout(probs, dropout_rate, dropout_rng)
  return probs


def _with_causal(mask: jax.Array | None, q_len: int, k_len: int) -> jax.Array:
  """`mask` and the causal mask of queries aligned with the last `q_len` of `k_len` keys, `[..., q_len, k_len]`."""
  lower = causal_mask(q_len, k_len - q_len)[None, None]
  return lower if mask is None else mask & lower


def probs_sower(module) -> Callable[[jax.Array], object] | None:
  """The `sow_probs` of a Flax module's attention call: its `sow` into 'intermediates' when the caller collects
  that collection (the attention maps), else None, which leaves the implementation free to never build them."""
  if not module.is_mutable_collection('intermediates'):
    return None
  return functools.partial(module.sow, 'intermediates', 'attention_probs')


def resolve_implementation(implementation: str) -> str:
  """'auto' -> 'fused' on a GPU backend, else 'materialized'; any other value of `IMPLEMENTATIONS` as is."""
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f'attention implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}')
  if implementation == 'auto':
    return 'fused' if jax.default_backend() == 'gpu' else 'materialized'
  return implementation


def fused_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None = None, *,
                    causal: bool = False, backend: str | None = None) -> jax.Array:
  """`jax.nn.dot_product_attention` (no dropout) -> `[batch, q_len, heads, head_dim]` in q's dtype.

  backend None: 'cudnn' on a GPU for float16 / bfloat16 with a head size that is a multiple of 8 up to 128, else
  'xla'; or name one. cuDNN takes the mask as an additive bias of the full `[q_len, k_len]` (a `[batch, 1, 1,
  k_len]` padding mask is broadcast to it: cuDNN refuses a shorter one). Where cuDNN still refuses the call at
  trace time, XLA's kernel runs it and a warning says why, once per reason. A fully masked row averages the values
  uniformly, as here. `causal` aligns the queries with the last keys (query i sees the keys up to
  `k_len - q_len + i`).
  """
  if mask is not None:
    mask = jnp.asarray(mask)
    mask = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)
  if causal:
    mask = _with_causal(mask, q.shape[1], k.shape[1])
  if backend is None and jax.default_backend() == 'gpu':
    refusal = cudnn_refusal(q)
    if refusal is None:
      full = None if mask is None else jnp.broadcast_to(mask, mask.shape[:2] + (q.shape[1], k.shape[1]))
      try:
        return jax.nn.dot_product_attention(q, k, v, mask=full, implementation='cudnn')
      except Exception as e:  # pylint: disable=broad-except  # cuDNN refuses at trace time: XLA's kernel takes it.
        refusal = f'{type(e).__name__}: {e}'
    _warn_fallback(refusal)
    backend = 'xla'
  return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=backend or 'xla')


def cudnn_refusal(q: jax.Array) -> str | None:
  """Why cuDNN's fused kernel cannot take queries like `q` (None: it can)."""
  if q.dtype not in (jnp.bfloat16, jnp.float16):
    return f'compute dtype {q.dtype} (cuDNN\'s kernel takes float16 / bfloat16)'
  if q.shape[-1] % 8 or q.shape[-1] > 128:
    return f'head size {q.shape[-1]} (cuDNN\'s kernel takes multiples of 8 up to 128)'
  return None


_FALLBACKS_WARNED: set[str] = set()


def _warn_fallback(reason: str) -> None:
  if reason not in _FALLBACKS_WARNED:
    _FALLBACKS_WARNED.add(reason)
    warnings.warn(f'fused attention runs XLA\'s kernel, not cuDNN\'s: {reason}', RuntimeWarning, stacklevel=3)


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None = None, *,
                          dropout_rate: float = 0.0, dropout_rng: jax.Array | None = None,
                          deterministic: bool = True,
                          sow_probs: Callable[[jax.Array], object] | None = None,
                          implementation: str = 'materialized', block: int = DEFAULT_BLOCK,
                          causal: bool = False) -> jax.Array:
  """softmax(q·k / sqrt(head_dim) + mask) · v -> `[batch, q_len, heads, head_dim]`.

  Softmax runs in float32 whatever the compute dtype. Attention-probability dropout (BERT's
  `attention_probs_dropout_prob`) applies when `deterministic` is False. `implementation` and `block` (the key /
  query block of 'chunked'): module docstring. For 'chunked' keep `mask` small (a padding mask `[batch, 1, 1,
  k_len]`): it is sliced per tile as given. `causal`: query i also sees only the keys up to `k_len - q_len + i`
  (built per tile by 'chunked', passed as a mask to the others).
  """
  implementation = resolve_implementation(implementation)
  dropout_active = not deterministic and dropout_rate > 0.0
  if implementation == 'fused' and sow_probs is None and not dropout_active:
    return fused_attention(q, k, v, mask, causal=causal)
  if implementation == 'chunked' and sow_probs is None:
    from common import chunked_attention  # pylint: disable=import-outside-toplevel  # it imports MASK_VALUE
    return chunked_attention.chunked_dot_product_attention(
        q, k, v, mask, causal=causal, block=block, dropout_rate=dropout_rate, dropout_rng=dropout_rng,
        deterministic=deterministic)
  if causal:
    mask = _with_causal(mask, q.shape[1], k.shape[1])
  dtype = q.dtype
  scale = 1.0 / jnp.sqrt(jnp.asarray(q.shape[-1], jnp.float32))
  scores = jnp.einsum('bqhd,bkhd->bhqk', q, k, preferred_element_type=jnp.float32) * scale
  probs = attention_probs(scores, mask, dropout_rate=dropout_rate, dropout_rng=dropout_rng,
                          deterministic=deterministic, sow_probs=sow_probs)
  return jnp.einsum('bhqk,bkhd->bqhd', probs.astype(dtype), v)
