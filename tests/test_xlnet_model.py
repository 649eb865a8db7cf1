"""Model-only properties of `xlnet_jax.model` and the relative-attention kernels in `xlnet_jax.attention`.

The query stream at a target never sees that target's token (the content stream does); output shapes; remat
changes nothing; new memories are the last `mem_len` layer inputs with gradients stopped; the gathered
`rel_shift_rows` equals `rel_shift`; sharded init and a jitted forward on a (data, fsdp, tensor) mesh; dropout in
training mode; config validation; the FLOPs count. Tolerances: float32 with matmul precision 'highest'.
"""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import linen as nn
from flax.core import meta

from common import attention, sharding
from common.config import ConfigError
from xlnet_jax import attention as relative
from xlnet_jax import model as xlnet

CFG = dict(vocab_size=97, d_model=32, n_layer=2, n_head=4, d_head=8, d_inner=64, initializer_range=0.2,
           dropout=0.1, dropatt=0.1, mem_len=4, bi_data=True)
BATCH, LENGTH, NUM_PREDICT, MEM = 4, 10, 3, 3


def _config(**overrides):
  cfg = xlnet.model_config(**{**CFG, **overrides})
  xlnet.validate_model_config(cfg)
  return cfg


def _inputs(seed=0):
  """ids, segments, perm_mask (non-targets first, then the targets in a random order), target_mapping, targets.

  With bi_data the second half of the batch repeats the first (it reads the same sequences backwards).
  """
  rng = np.random.RandomState(seed)
  half = BATCH // 2
  ids = rng.randint(0, CFG['vocab_size'], (half, LENGTH)).astype(np.int32)
  segments = (np.arange(LENGTH)[None] >= 6).astype(np.int32).repeat(half, 0)
  perm_mask = np.zeros((half, LENGTH, LENGTH), np.float32)
  targets = np.zeros((half, NUM_PREDICT), np.int32)
  for b in range(half):
    targets[b] = rng.choice(LENGTH, NUM_PREDICT, replace=False)
    rank = np.full(LENGTH, -1)
    rank[targets[b]] = rng.permutation(NUM_PREDICT)
    perm_mask[b] = (rank[None, :] >= 0) & (rank[None, :] >= rank[:, None])
  mapping = np.asarray(xlnet.target_mapping_from_positions(jnp.asarray(targets), LENGTH))
  return tuple(np.concatenate([x, x]) for x in (ids, segments, perm_mask, mapping, targets))


@pytest.fixture(scope='module')
def model():
  """(cfg, params, encode): `encode(params, ids, segments, perm_mask, mapping, mems)` jitted, eval mode."""
  cfg = _config()
  ids = jnp.zeros((BATCH, LENGTH), jnp.int32)
  params = jax.jit(lambda rng: meta.unbox(xlnet.XLNetLMHeadModel(cfg).init(rng, ids)['params']))(
      jax.random.PRNGKey(0))
  encode = jax.jit(lambda p, ids, seg, perm, mapping, mems: xlnet.XLNetModel(cfg).apply(
      {'params': p['transformer']}, ids, seg, None, perm, mapping, mems))
  return cfg, params, encode


def _mems(cfg, scale=1.0):
  return [jnp.full((BATCH, MEM, cfg.d_model), scale * (i + 1)) for i in range(cfg.n_layer)]


def test_query_stream_does_not_see_its_own_token(model):
  cfg, params, encode = model
  ids, segments, perm_mask, mapping, targets = _inputs(1)
  mems = _mems(cfg)
  h, g, _ = encode(params, ids, segments, perm_mask, mapping, mems)
  rows = np.arange(BATCH)
  later_targets_changed = False
  for m in range(NUM_PREDICT):
    changed = ids.copy()
    changed[rows, targets[:, m]] = (ids[rows, targets[:, m]] + 1) % cfg.vocab_size
    h2, g2, _ = encode(params, changed, segments, perm_mask, mapping, mems)
    np.testing.assert_allclose(np.asarray(g2)[:, m], np.asarray(g)[:, m], atol=1e-6, err_msg=f'target {m}')
    assert np.abs(np.asarray(h2)[rows, targets[:, m]] - np.asarray(h)[rows, targets[:, m]]).max(-1).min() > 1e-3
    later_targets_changed |= not np.allclose(np.asarray(g2), np.asarray(g), atol=1e-6)
  assert later_targets_changed, 'targets later in the order should see the changed token'


def test_shapes_and_memory(model):
  cfg, params, encode = model
  ids, segments, perm_mask, mapping, _ = _inputs()
  h, g, mems = encode(params, ids, segments, perm_mask, mapping, _mems(cfg))
  assert h.shape == (BATCH, LENGTH, cfg.d_model) and g.shape == (BATCH, NUM_PREDICT, cfg.d_model)
  assert len(mems) == cfg.n_layer and all(m.shape == (BATCH, cfg.mem_len, cfg.d_model) for m in mems)
  # New memory: the last mem_len of [old memory; layer input]; layer 0's input is the word embedding.
  embedding = params['transformer']['word_embedding']['embedding']
  np.testing.assert_array_equal(mems[0], embedding[ids][:, -cfg.mem_len:])
  previous = jnp.asarray(np.random.RandomState(0).standard_normal((BATCH, MEM, 8)), jnp.float32)
  current = jnp.asarray(np.random.RandomState(1).standard_normal((BATCH, 5, 8)), jnp.float32)
  np.testing.assert_array_equal(xlnet.cache_mem(current, previous, 6, 0),
                                jnp.concatenate([previous, current], 1)[:, -6:])
  np.testing.assert_array_equal(xlnet.cache_mem(current, previous, 4, 2),
                                jnp.concatenate([previous, current[:, :2]], 1)[:, -4:])
  np.testing.assert_array_equal(xlnet.cache_mem(current, None, 8, 0), current)

  lm = xlnet.XLNetLMHeadModel(cfg)
  logits, _ = jax.eval_shape(lambda: lm.apply({'params': params}, ids, segments, None, perm_mask, mapping))
  assert logits.shape == (BATCH, NUM_PREDICT, cfg.vocab_size) and logits.dtype == jnp.float32
  logits, new_mems = jax.eval_shape(lambda: lm.apply({'params': params}, ids))
  assert logits.shape == (BATCH, LENGTH, cfg.vocab_size) and len(new_mems) == cfg.n_layer
  _, g, new_mems = jax.eval_shape(lambda: xlnet.XLNetModel(_config(mem_len=0)).apply(
      {'params': params['transformer']}, ids))
  assert g is None and new_mems == []
  with pytest.raises(ValueError, match='mems: expected 2 arrays'):
    xlnet.XLNetModel(cfg).apply({'params': params['transformer']}, ids, mems=[jnp.zeros((BATCH, 3, cfg.d_model))])
  with pytest.raises(ValueError, match='config.model.bi_data: needs an even batch size'):
    jax.eval_shape(lambda: lm.apply({'params': params}, ids[:3]))


def test_second_layer_memory_is_the_first_layer_output(model):
  cfg, params, encode = model
  ids, segments, perm_mask, mapping, _ = _inputs(2)
  old = _mems(cfg)
  _, _, mems = encode(params, ids, segments, perm_mask, mapping, old)
  one_layer = {'params': {k: v for k, v in params['transformer'].items() if k != 'layer_1'}}
  h0, _, _ = jax.jit(lambda v: xlnet.XLNetModel(_config(n_layer=1)).apply(
      v, ids, segments, None, perm_mask, mapping, old[:1]))(one_layer)
  np.testing.assert_allclose(mems[1], np.asarray(h0)[:, -cfg.mem_len:], atol=1e-6)


def test_remat_same_outputs_and_gradients_and_mems_stop_gradient(model):
  cfg, params, _ = model
  cfg = _config(n_layer=1)  # One layer is enough to compare remat (per layer) with the plain model.
  params = {'lm_loss': params['lm_loss'],
            'transformer': {k: v for k, v in params['transformer'].items() if k != 'layer_1'}}
  ids, segments, perm_mask, mapping, _ = _inputs(3)
  mems = _mems(cfg, 0.5)

  def grads(remat):
    def forward(p, rng):
      return xlnet.XLNetLMHeadModel(cfg, remat=remat).apply(
          {'params': p}, ids, segments, None, perm_mask, mapping, mems, deterministic=False, rngs={'dropout': rng})

    def loss(p, rng):
      logits, _ = forward(p, rng)
      return jnp.mean(jax.nn.logsumexp(logits, -1)), logits

    def memory_sum(p, rng):
      return sum(jnp.sum(m) for m in forward(p, rng)[1])

    @jax.jit
    def run(p, rng):
      return jax.value_and_grad(loss, has_aux=True)(p, rng), jax.grad(memory_sum)(p, rng)
    return run

  plain, remat = grads(False), grads(True)
  rng = jax.random.PRNGKey(7)
  ((value, logits), g), g_mems = plain(params, rng)
  ((value_r, logits_r), g_r), _ = remat(params, rng)
  np.testing.assert_allclose(logits_r, logits, atol=1e-5)
  np.testing.assert_allclose(value_r, value, atol=1e-6)
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(g)[0], jax.tree.leaves(g_r)):
    np.testing.assert_allclose(b, a, atol=1e-5, err_msg=jax.tree_util.keystr(path))
  assert all(not np.any(np.asarray(x)) for x in jax.tree.leaves(g_mems)), 'new mems must stop gradients'
  # Dropout is active in training mode (another rng, other logits).
  ((_, logits2), _), _ = plain(params, jax.random.PRNGKey(8))
  assert np.isfinite(np.asarray(logits)).all() and not np.allclose(logits, logits2, atol=1e-3)


def test_shared_biases_without_untie_r():
  cfg = _config(untie_r=False)
  shapes = jax.eval_shape(lambda: xlnet.XLNetLMHeadModel(cfg).init(jax.random.PRNGKey(0),
                                                                    jnp.zeros((2, 3), jnp.int32)))
  transformer = meta.unbox(shapes)['params']['transformer']
  assert all(transformer[name].shape == (cfg.n_head, cfg.d_head) for name in ('r_w_bias', 'r_r_bias', 'r_s_bias'))
  assert set(transformer['layer_0']['rel_attn']) == {'q', 'k', 'v', 'o', 'r', 'seg_embed', 'layer_norm'}


def test_rel_shift_rows_equals_rel_shift():
  rng = np.random.RandomState(0)
  for attn_type, q_len, mem_len in (('bi', 5, 3), ('uni', 5, 2)):
    k_len = mem_len + q_len
    r_len = k_len + (q_len if attn_type == 'bi' else 1)
    assert relative.relative_distances(q_len, k_len, attn_type).shape == (r_len,)
    x = rng.standard_normal((2, 3, q_len, r_len)).astype(np.float32)
    shifted = np.asarray(relative.rel_shift(jnp.asarray(x), k_len))
    # Entry (i, j) is the score at relative distance (mem_len + i) - j.
    distances = np.asarray(relative.relative_distances(q_len, k_len, attn_type))
    for i in range(q_len):
      for j in range(k_len if attn_type == 'bi' else mem_len + i + 1):
        row = int(np.nonzero(distances == mem_len + i - j)[0][0])
        assert shifted[0, 0, i, j] == x[0, 0, i, row]
    positions = jnp.asarray(rng.permutation(q_len)[None].repeat(2, 0))
    gathered = relative.rel_shift_rows(jnp.take_along_axis(x, positions[:, None, :, None], 2), positions + mem_len,
                                       k_len)
    expected = jnp.take_along_axis(shifted, positions[:, None, :, None], 2)
    visible = attention.causal_mask(q_len, mem_len)[positions][:, None] if attn_type == 'uni' else True
    np.testing.assert_array_equal(jnp.where(visible, gathered, 0), jnp.where(visible, expected, 0))


def test_two_stream_masks():
  perm = np.zeros((1, 3, 3), np.float32)
  perm[0, :, 2] = 1  # Nobody sees token 2, the target.
  content, query = relative.two_stream_masks(3, 2, input_mask=np.array([[0, 1, 1]]), perm_mask=perm)
  expected_query = np.array([[1, 1, 0, 1, 0]] * 3, bool)
  np.testing.assert_array_equal(query[0], expected_query)
  np.testing.assert_array_equal(content[0], expected_query | np.eye(3, 5, 2, dtype=bool))
  assert relative.two_stream_masks(3, 2) == (None, None)
  content, query = relative.two_stream_masks(3, 1, attn_type='uni', same_length=True)
  np.testing.assert_array_equal(content[0], [[1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1]])
  np.testing.assert_array_equal(query, content)


def test_sharded_init_and_jitted_forward_on_a_mesh(model):
  cfg, params, encode = model
  mesh = sharding.make_mesh(sharding.mesh_config(data=2, fsdp=2, tensor=2))
  rules = sharding.rules_from_config(None)
  ids, segments, perm_mask, mapping, _ = _inputs(4)
  abstract = jax.eval_shape(lambda: xlnet.XLNetLMHeadModel(cfg).init(jax.random.PRNGKey(0),
                                                                     jnp.zeros((BATCH, LENGTH), jnp.int32)))
  shardings = sharding.logical_shardings(abstract, mesh, rules)['params']
  kernel = shardings['transformer']['layer_0']['rel_attn']['q']['kernel']
  assert kernel.spec == jax.sharding.PartitionSpec('fsdp', 'tensor', None)
  sharded_params = jax.device_put(params, shardings)

  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    sharded = encode(sharded_params, ids, segments, perm_mask, mapping, _mems(cfg))
  expected = encode(params, ids, segments, perm_mask, mapping, _mems(cfg))
  for a, b in zip(jax.tree.leaves(sharded), jax.tree.leaves(expected)):
    np.testing.assert_allclose(a, b, atol=1e-5)
  # bi_data: the two halves of the batch hold the same sequences but see reversed relative positions.
  h = np.asarray(expected[0])
  assert not np.allclose(h[:2], h[2:], atol=1e-3)


def test_sequence_summary():
  cfg = _config()
  hidden = jax.random.normal(jax.random.PRNGKey(0), (BATCH, LENGTH, cfg.d_model))
  mask = np.ones((BATCH, LENGTH), np.int32)
  mask[0, :4] = 0
  for summary_type in xlnet.SUMMARY_TYPES:
    summary = xlnet.SequenceSummary(cfg, summary_type)
    variables = summary.init(jax.random.PRNGKey(1), hidden, mask)
    out = summary.apply(variables, hidden, mask)
    assert out.shape == (BATCH, cfg.d_model) and np.abs(np.asarray(out)).max() <= 1.0, summary_type
    if summary_type in ('attn', 'mean'):  # Padding positions are ignored.
      changed = hidden.at[0, :4].set(5.0)
      np.testing.assert_allclose(summary.apply(variables, changed, mask)[0], out[0], atol=1e-6)
  with pytest.raises(ValueError, match='summary_type'):
    xlnet.SequenceSummary(cfg, 'cls_index').init(jax.random.PRNGKey(1), hidden)


@pytest.mark.parametrize('field, value, message', [
    ('d_model', 0, 'config.model.d_model: must be a positive integer'),
    ('dropatt', 1.0, r'config.model.dropatt: must be in \[0, 1\)'),
    ('ff_activation', 'swish', 'config.model.ff_activation: must be one of'),
    ('attn_type', 'tri', 'config.model.attn_type: must be one of'),
    ('mem_len', -1, 'config.model.mem_len: must be a non-negative integer'),
    ('untie_r', 1, 'config.model.untie_r: must be true or false'),
])
def test_validate_model_config(field, value, message):
  cfg = ml_collections.ConfigDict({**xlnet.model_config().to_dict(), field: value})
  with pytest.raises(ConfigError, match=message):
    xlnet.validate_model_config(cfg)


def test_flops_per_example():
  cfg = _config()
  flops = [xlnet.flops_per_example(_config(n_layer=n), 512, 85, 384) for n in (2, 3, 4)]
  assert all(f > 0 for f in flops)
  assert flops[2] - flops[1] == pytest.approx(flops[1] - flops[0])  # Linear in the number of layers.
  base = xlnet.flops_per_example(cfg, 512, 85, 384)
  assert xlnet.flops_per_example(cfg, 512, 60, 384) < base < xlnet.flops_per_example(cfg, 512, 85, 512)
  # Without a query stream (fine-tuning) the last layer's content stream is read; in pretraining it is dead code.
  assert xlnet.flops_per_example(cfg, 512, 0, 384) > xlnet.flops_per_example(cfg, 512, 1, 384)
  # The position projection is shared by the rows of a forward pass.
  assert xlnet.flops_per_example(cfg, 512, 85, 384, batch_size=8) < base
  # The content stream alone: 6 * (params-ish matmuls + attention); same order as 6 * N * tokens.
  large = xlnet.model_config()
  per_token = xlnet.flops_per_example(large, 512, 85, 384) / 512
  matmul_params = large.n_layer * (5 * large.d_model * large.n_head * large.d_head + 2 * large.d_model * large.d_inner)
  assert 6 * matmul_params < per_token < 12 * matmul_params
