"""Chunked (online-softmax) attention equals the materialised one; the fused route equals it too.

References are the materialised kernels (`common.attention.dot_product_attention`, `xlnet_jax.attention.
relative_attention` with the masks of `two_stream_masks`), themselves checked against `transformers` elsewhere.
Block sizes do not divide the lengths; some query rows are fully masked. Outputs and gradients (of a nonlinear
function of the outputs, with respect to every float input or every model parameter) agree within 1e-5, float32,
matmul precision 'highest' (whole models: 1e-5 of each array's largest entry), deterministic (dropout draws other
bits in the chunked path). Also: whole models (XLNetLMHeadModel, BertForPreTraining, GPTLMHeadModel) with
`attention_impl` 'chunked' (and 'fused') vs 'materialized' on the same parameters, memory that grows linearly
with the length, dropout statistics, config errors.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.core import meta

from bert_jax import model as bert
from gpt_jax import model as gpt
from common import attention, chunked_attention
from common.config import ConfigError
from xlnet_jax import attention as relative
from xlnet_jax import chunked
from xlnet_jax import model as xlnet

TOL = 1e-5
B, L, M, N, D, P = 2, 7, 3, 2, 4, 3


def _close(a, b, scaled=False):
  """Every leaf within TOL (absolute and relative); `scaled`: absolute TOL times the leaf's largest entry when
  that exceeds 1 (whole models: gradients of tens summed over many paths)."""
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    atol = TOL * max(1.0, float(np.abs(np.asarray(y)).max())) if scaled else TOL
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=TOL)


def _value_and_grads(fn, args, jit=True):
  """(fn(*args), gradients of a nonlinear scalar of its outputs with respect to every argument)."""
  def both(*a):
    loss = lambda *a: sum(jnp.sum(jnp.sin(3.0 * x)) for x in jax.tree.leaves(fn(*a)))
    return fn(*a), jax.grad(loss, argnums=tuple(range(len(a))))(*a)
  return (jax.jit(both) if jit else both)(*args)


def _init_params(model, *inputs):
  """The model's parameters, initialised as one compiled program (op by op, the init compiles ~180 small ones)."""
  return meta.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), *inputs)['params'])


def _normal(rng, *shape):
  return jnp.asarray(rng.randn(*shape), jnp.float32)


@pytest.mark.parametrize('mask_kind', ['padding', 'causal', 'padding+causal', 'general', 'none'])
def test_plain_attention_equals_materialized(mask_kind):
  rng = np.random.RandomState(0)
  q, k, v = _normal(rng, B, 7, 3, 4), _normal(rng, B, 9, 3, 4), _normal(rng, B, 9, 3, 4)
  keys = np.ones((B, 9), np.int32)
  keys[0, 6:] = 0
  keys[1] = 0  # every query of row 1 fully masked: the uniform average, as materialised
  mask = {'padding': attention.padding_mask(jnp.asarray(keys)), 'none': None,
          'general': jnp.asarray(rng.rand(B, 1, 7, 9) > 0.5)}.get(mask_kind.split('+')[0])
  causal = 'causal' in mask_kind
  full = mask
  if causal:
    lower = attention.causal_mask(7, 2)[None, None]
    full = lower if mask is None else mask & lower
  ref = lambda q, k, v: attention.dot_product_attention(q, k, v, full)
  new = lambda q, k, v: chunked_attention.chunked_dot_product_attention(q, k, v, mask, causal=causal, block=3)
  out_ref, grads_ref = _value_and_grads(ref, (q, k, v))
  out_new, grads_new = _value_and_grads(new, (q, k, v))
  _close(out_new, out_ref)
  _close(grads_new, grads_ref)
  if mask_kind == 'padding':  # the routing of dot_product_attention, and the fused path (XLA's kernel on a CPU)
    _close(attention.dot_product_attention(q, k, v, mask, implementation='chunked', block=4), out_ref)
    _close(attention.dot_product_attention(q, k, v, mask, implementation='fused'), out_ref)
    _close(attention.fused_attention(q, k, v, mask, backend='xla'), out_ref)
    _close(attention.dot_product_attention(q, k, v, mask, implementation='auto'), out_ref)
  if mask_kind == 'causal':
    _close(attention.fused_attention(q, k, v, causal=True, backend='xla'), out_ref)


def test_fused_route_on_a_gpu_hands_cudnn_a_full_length_mask_and_says_why_it_falls_back(monkeypatch):
  """On a GPU backend (patched) the fused route calls cuDNN's kernel with the mask broadcast to `[q_len, k_len]`:
  the fake below refuses as `jax.nn.dot_product_attention(implementation='cudnn')` does (float16 / bfloat16 only,
  a mask-bias of the full query and key lengths) and otherwise runs XLA's kernel. A padding mask passed as
  `[batch, 1, 1, k_len]` was refused, silently, so no step used cuDNN. Where cuDNN refuses, XLA's kernel runs the
  call and a warning names the reason, once."""
  import warnings  # pylint: disable=import-outside-toplevel
  real, calls = jax.nn.dot_product_attention, []

  def fake_cudnn(q, k, v, mask=None, implementation=None):
    if implementation == 'cudnn':
      calls.append(None if mask is None else tuple(mask.shape))
      if q.dtype not in (jnp.bfloat16, jnp.float16):
        raise NotImplementedError(f'Q must be fp16/bf16, got {q.dtype}')
      if mask is not None and mask.shape[-2:] != (q.shape[1], k.shape[1]):
        raise ValueError(f'Bias must have same seq length as QKV, got {mask.shape[-2]} and {mask.shape[-1]}')
      implementation = 'xla'
    return real(q, k, v, mask=mask, implementation=implementation)

  monkeypatch.setattr(attention.jax, 'default_backend', lambda: 'gpu')
  monkeypatch.setattr(attention.jax.nn, 'dot_product_attention', fake_cudnn)
  monkeypatch.setattr(attention, '_FALLBACKS_WARNED', set())
  rng = np.random.RandomState(3)
  q, k, v = _normal(rng, B, 7, 3, 8), _normal(rng, B, 9, 3, 8), _normal(rng, B, 9, 3, 8)
  keys = np.ones((B, 9), np.int32)
  keys[0, 6:] = 0
  mask = attention.padding_mask(jnp.asarray(keys))
  bf = [x.astype(jnp.bfloat16) for x in (q, k, v)]
  ref = attention.dot_product_attention(*[x.astype(jnp.float32) for x in bf], mask)
  with warnings.catch_warnings():
    warnings.simplefilter('error')  # cuDNN takes it: no fallback
    out = attention.dot_product_attention(*bf, mask, implementation='auto')
    causal = attention.fused_attention(*bf, mask, causal=True)
  assert calls == [(B, 1, 7, 9), (B, 1, 7, 9)]
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref), atol=2e-2)
  causal_ref = attention.dot_product_attention(*[x.astype(jnp.float32) for x in bf],
                                               mask & attention.causal_mask(7, 2)[None, None])
  np.testing.assert_allclose(np.asarray(causal, np.float32), np.asarray(causal_ref), atol=2e-2)

  with pytest.warns(RuntimeWarning, match='compute dtype float32'):  # refused before any call
    _close(attention.fused_attention(q, k, v, mask), attention.dot_product_attention(q, k, v, mask))
  assert len(calls) == 2
  with pytest.warns(RuntimeWarning, match='head size 12'):
    attention.fused_attention(*[jnp.zeros((B, 7, 3, 12), jnp.bfloat16)] * 3)
  monkeypatch.setattr(attention.jax.nn, 'dot_product_attention',
                      lambda *a, implementation=None, **kw: real(*a, **kw, implementation='xla')
                      if implementation == 'xla' else (_ for _ in ()).throw(RuntimeError('cuDNN is not detected.')))
  with pytest.warns(RuntimeWarning, match='RuntimeError: cuDNN is not detected'):
    out = attention.fused_attention(*bf, mask)
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref), atol=2e-2)
  with warnings.catch_warnings():
    warnings.simplefilter('error')  # once per reason
    attention.fused_attention(*bf, mask)


def _relative_case(rng, attn_type, bi_data, mem):
  k_len = mem + L
  r_len = relative.relative_distances(L, k_len, attn_type).shape[0]
  floats = dict(q=_normal(rng, B, L, N, D), q_g=_normal(rng, B, P, N, D), k=_normal(rng, B, k_len, N, D),
                v=_normal(rng, B, k_len, N, D), k_r=_normal(rng, 2 if bi_data else 1, r_len, N, D),
                r_w_bias=_normal(rng, N, D), r_r_bias=_normal(rng, N, D), r_s_bias=_normal(rng, N, D),
                seg_embed=_normal(rng, 2, N, D))
  input_mask = np.ones((B, L), np.int32)
  input_mask[0, 5:] = 0
  perm_mask = (rng.rand(B, L, L) > 0.5).astype(np.float32)
  perm_mask[1, 2] = 1.0  # the query stream at target 2 of row 1 sees no key of the segment
  targets = np.stack([rng.choice(L, P, replace=False) for _ in range(B)]).astype(np.int32)
  targets[1, 0] = 2
  ints = dict(segment_ids=jnp.asarray(rng.randint(0, 3, (B, L))), input_mask=jnp.asarray(input_mask),
              perm_mask=jnp.asarray(perm_mask), targets=jnp.asarray(targets))
  return floats, ints


CASES = {  # attn_type, bi_data, same_length, mem, which of (perm_mask, input_mask, segment_ids)
    'bi two streams, perm + padding + segments, memory': ('bi', False, False, M, 'pis'),
    'bi_data, no memory': ('bi', True, False, 0, 'pis'),
    'bi_data, padding only, memory': ('bi', True, False, M, 'i'),
    'uni, same_length, memory': ('uni', False, True, M, 'pis'),
    'uni, no masks': ('uni', False, False, M, ''),
    'bi, no masks, segments': ('bi', False, False, M, 's'),
}


@pytest.mark.parametrize('case', CASES)
def test_relative_attention_equals_materialized(case):
  attn_type, bi_data, same_length, mem, use = CASES[case]
  floats, ints = _relative_case(np.random.RandomState(1), attn_type, bi_data, mem)
  perm = ints['perm_mask'] if 'p' in use else None
  pad = ints['input_mask'] if 'i' in use else None
  segments = ints['segment_ids'] if 's' in use else None
  targets = ints['targets']
  content_mask, query_mask = relative.two_stream_masks(L, mem, input_mask=pad, perm_mask=perm, attn_type=attn_type,
                                                       same_length=same_length)
  mismatch = None if segments is None else relative.segment_mismatch(segments, mem)

  def ref(q, q_g, k, v, k_r, r_w_bias, r_r_bias, r_s_bias, seg_embed):
    common = dict(r_s_bias=r_s_bias, seg_embed=seg_embed)
    k_r = relative.repeat_halves(k_r, B)
    h = relative.relative_attention(q, k, v, k_r, r_w_bias, r_r_bias, seg_mismatch=mismatch,
                                    mask=None if content_mask is None else content_mask[:, None], **common)
    g_mask = relative.gather_rows(query_mask, targets)
    g = relative.relative_attention(q_g, k, v, k_r, r_w_bias, r_r_bias,
                                    seg_mismatch=relative.gather_rows(mismatch, targets),
                                    mask=None if g_mask is None else g_mask[:, None],
                                    query_positions=targets + mem, **common)
    return h, g

  def new(q, q_g, k, v, k_r, r_w_bias, r_r_bias, r_s_bias, seg_embed):
    common = dict(r_s_bias=r_s_bias, seg_embed=seg_embed, segment_ids=segments, input_mask=pad, perm_mask=perm,
                  mem_len=mem, attn_type=attn_type, same_length=same_length, block=3)
    k_r = relative.repeat_halves(k_r, B)
    h = chunked.chunked_relative_attention(q, k, v, k_r, r_w_bias, r_r_bias, **common)
    g = chunked.chunked_relative_attention(q_g, k, v, k_r, r_w_bias, r_r_bias, query_positions=targets + mem,
                                           **common)
    return h, g

  args = tuple(floats.values())
  out_ref, grads_ref = _value_and_grads(ref, args)
  out_new, grads_new = _value_and_grads(new, args)
  _close(out_new, out_ref)
  _close(grads_new, grads_ref)
  reached = grads_ref if segments is not None else grads_ref[:-2]  # every input reaches the outputs
  assert all(float(jnp.abs(g).max()) > 0 for g in reached)


def _xlnet(impl, **overrides):
  cfg = xlnet.model_config(vocab_size=53, d_model=16, n_layer=1, n_head=2, d_head=8, d_inner=32,
                           initializer_range=0.3, dropout=0.0, dropatt=0.0, attention_impl=impl,
                           attention_block=4, **overrides)
  xlnet.validate_model_config(cfg)
  return xlnet.XLNetLMHeadModel(cfg)


@pytest.mark.parametrize('overrides', [dict(bi_data=True), dict(attn_type='uni', same_length=True)])
def test_xlnet_lm_head_model_equals_materialized(overrides):
  rng = np.random.RandomState(2)
  floats, ints = _relative_case(rng, 'bi', False, M)
  ids = jnp.asarray(rng.randint(0, 53, (B, L)))
  mapping = xlnet.target_mapping_from_positions(ints['targets'], L).at[1, 2].set(0.0)  # a padding target row
  mems = [_normal(rng, B, M, 16)]
  inputs = (ids, ints['segment_ids'], ints['input_mask'], ints['perm_mask'], mapping, mems)
  materialized, chunked_model = _xlnet('materialized', **overrides), _xlnet('chunked', **overrides)
  params = _init_params(materialized, *inputs)

  def run(model, params):
    logits, new_mems = model.apply({'params': params}, *inputs)
    h_only, _ = model.apply({'params': params}, ids, ints['segment_ids'], ints['input_mask'], None, None, mems)
    return logits, new_mems, h_only

  out_ref, grads_ref = _value_and_grads(functools.partial(run, materialized), (params,))
  out_new, grads_new = _value_and_grads(functools.partial(run, chunked_model), (params,))
  _close(out_new, out_ref, scaled=True)
  _close(grads_new, grads_ref, scaled=True)


def test_bert_for_pretraining_equals_materialized():
  rng = np.random.RandomState(3)
  cfg = dict(vocab_size=41, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
             max_position_embeddings=16, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
             initializer_range=0.3, attention_block=3)
  ids = jnp.asarray(rng.randint(0, 41, (B, 11)))
  mask = np.ones((B, 11), np.int32)
  mask[1, 6:] = 0
  inputs = (ids, jnp.asarray(rng.randint(0, 2, (B, 11))), jnp.asarray(mask), jnp.asarray([[1, 4], [2, 9]]))
  models = {impl: bert.BertForPreTraining(bert.model_config(**cfg, attention_impl=impl))
            for impl in ('materialized', 'chunked', 'fused')}
  params = _init_params(models['materialized'], *inputs)
  run = lambda model, params: model.apply({'params': params}, *inputs)
  out_ref, grads_ref = _value_and_grads(functools.partial(run, models['materialized']), (params,))
  for impl in ('chunked', 'fused'):
    out_new, grads_new = _value_and_grads(functools.partial(run, models[impl]), (params,))
    _close(out_new, out_ref, scaled=True)
    _close(grads_new, grads_ref, scaled=True)


def test_gpt_lm_head_model_equals_materialized():
  """The causal structure as a flag (chunked: per tile; fused: XLA's kernel on a CPU) vs the materialised mask."""
  cfg = dict(vocab_size=37, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
             max_position_embeddings=16, hidden_dropout_prob=0.0, embedding_dropout_prob=0.0,
             attention_probs_dropout_prob=0.0, initializer_range=0.3, layout='gpt2', attention_block=4)
  ids = jnp.asarray(np.random.RandomState(5).randint(0, 37, (B, 10)))
  models = {impl: gpt.GPTLMHeadModel(gpt.model_config(**cfg, attention_impl=impl))
            for impl in ('materialized', 'chunked', 'fused')}
  params = _init_params(models['materialized'], ids)
  run = lambda model, params: model.apply({'params': params}, ids)[0]
  out_ref, grads_ref = _value_and_grads(functools.partial(run, models['materialized']), (params,))
  for impl in ('chunked', 'fused'):
    out_new, grads_new = _value_and_grads(functools.partial(run, models[impl]), (params,))
    _close(out_new, out_ref, scaled=True)
    _close(grads_new, grads_ref, scaled=True)


def _temp_bytes(fn, *args):
  return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes


def test_chunked_memory_grows_linearly():
  """Forward + backward temporaries: doubling the length about doubles them chunked (x4 materialised)."""
  def grad_fn(impl):
    def loss(q, k, v):
      return jnp.sum(attention.dot_product_attention(q, k, v, implementation=impl, block=64) ** 2)
    return jax.grad(loss, argnums=(0, 1, 2))

  sizes = {}
  for length in (512, 1024):
    x = jnp.zeros((1, length, 2, 8))
    sizes[length] = {impl: _temp_bytes(grad_fn(impl), x, x, x) for impl in ('materialized', 'chunked')}
  assert sizes[1024]['materialized'] > 3.5 * sizes[512]['materialized']
  assert sizes[1024]['chunked'] < 2.5 * sizes[512]['chunked']
  assert sizes[1024]['chunked'] * 8 < sizes[1024]['materialized']


def test_chunked_relative_attention_memory_grows_linearly():
  """XLNet's two-stream kernel with memory, perm mask and segments, forward + backward: doubling the length (and
  the memory) about doubles the temporaries chunked, and they stay far below the materialised ones."""
  def grad_fn(length, impl):
    mem = length
    perm = jnp.zeros((1, length, length), jnp.float32)
    segments = jnp.zeros((1, length), jnp.int32)
    targets = jnp.arange(0, length, 8)[None]

    def loss(q, k, v, k_r):
      if impl == 'chunked':
        kw = dict(segment_ids=segments, perm_mask=perm, mem_len=mem, seg_embed=k_r[0, :2], r_s_bias=q[0, 0],
                  block=64)
        h = chunked.chunked_relative_attention(q, k, v, k_r, q[0, 0], q[0, 1], **kw)
        g = chunked.chunked_relative_attention(q[:, ::8], k, v, k_r, q[0, 0], q[0, 1], query_positions=targets + mem,
                                               **kw)
      else:
        content, query = relative.two_stream_masks(length, mem, perm_mask=perm)
        mismatch = relative.segment_mismatch(segments, mem)
        kw = dict(seg_embed=k_r[0, :2], r_s_bias=q[0, 0])
        h = relative.relative_attention(q, k, v, k_r, q[0, 0], q[0, 1], seg_mismatch=mismatch,
                                        mask=content[:, None], **kw)
        g = relative.relative_attention(q[:, ::8], k, v, k_r, q[0, 0], q[0, 1],
                                        seg_mismatch=relative.gather_rows(mismatch, targets),
                                        mask=relative.gather_rows(query, targets)[:, None],
                                        query_positions=targets + mem, **kw)
      return jnp.sum(h ** 2) + jnp.sum(g ** 2)
    return jax.grad(loss, argnums=(0, 1, 2, 3))

  sizes = {}
  for length in (256, 512):
    q, kv, k_r = jnp.zeros((1, length, 2, 8)), jnp.zeros((1, 2 * length, 2, 8)), jnp.zeros((1, 3 * length, 2, 8))
    sizes[length] = {impl: _temp_bytes(grad_fn(length, impl), q, kv, kv, k_r) for impl in ('materialized', 'chunked')}
  assert sizes[512]['materialized'] > 3.5 * sizes[256]['materialized']
  assert sizes[512]['chunked'] < 2.5 * sizes[256]['chunked']
  assert sizes[512]['chunked'] * 4 < sizes[512]['materialized']


def test_chunked_dropout_keeps_the_expectation():
  """Dropout in the chunked path: each probability kept with 1 - rate and scaled; the mean over draws is the
  deterministic output, and different keys give different outputs."""
  rng = np.random.RandomState(4)
  q, k, v = _normal(rng, 1, 5, 1, 4), _normal(rng, 1, 7, 1, 4), _normal(rng, 1, 7, 1, 4)
  run = jax.jit(jax.vmap(lambda key: chunked_attention.chunked_dot_product_attention(
      q, k, v, block=3, dropout_rate=0.3, dropout_rng=key, deterministic=False)))
  draws = run(jax.random.split(jax.random.PRNGKey(0), 4000))
  exact = chunked_attention.chunked_dot_product_attention(q, k, v, block=3)
  assert float(jnp.abs(draws[0] - draws[1]).max()) > 1e-3
  np.testing.assert_allclose(np.asarray(draws.mean(0)), np.asarray(exact), atol=0.05)


def test_attention_maps_fall_back_to_materialized():
  """Collecting `intermediates` (the attention maps) with 'chunked' runs the materialised path and sows them."""
  ids = jnp.ones((1, 6), jnp.int32)
  model = _xlnet('chunked')
  params = jax.jit(model.init)(jax.random.PRNGKey(0), ids)['params']
  _, state = jax.jit(functools.partial(model.apply, mutable=['intermediates']))({'params': params}, ids)
  probs = jax.tree.leaves(state['intermediates'])
  assert len(probs) == 1 and probs[0].shape == (1, 2, 6, 6)


@pytest.mark.parametrize('module, field, value, message', [
    (xlnet, 'attention_impl', 'fused', "attention_impl: must be one of ('materialized', 'chunked')"),
    (xlnet, 'attention_block', 0, 'attention_block: must be a positive integer'),
    (bert, 'attention_impl', 'flash', 'attention_impl: must be one of'),
    (bert, 'attention_block', -3, 'attention_block: must be a positive integer'),
    (gpt, 'attention_impl', 'cudnn', 'attention_impl: must be one of'),
])
def test_bad_attention_config_is_one_line_error(module, field, value, message):
  cfg = module.model_config(**{field: value})
  with pytest.raises(ConfigError, match=message.replace('(', r'\(').replace(')', r'\)')) as err:
    module.validate_model_config(cfg)
  assert '\n' not in str(err.value)


def test_gather_rows_of_a_padding_only_mask():
  """With input_mask alone the query mask has one row for every query: each target gets that row (reading row
  `target` of a one-row array used to return all True, so the query stream saw padding keys)."""
  _, query = relative.two_stream_masks(5, 2, input_mask=jnp.asarray([[1, 1, 1, 0, 0]]))
  rows = np.asarray(relative.gather_rows(query, jnp.asarray([[0, 3]])))
  np.testing.assert_array_equal(rows, [[[True] * 5 + [False] * 2] * 2])
