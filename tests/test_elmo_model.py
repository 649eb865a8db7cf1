"""ELMo biLM: LSTM-with-projection against torch.nn.LSTM, clipping and the char CNN against independent numpy
re-implementations, the backward LM on padded rows, the causal leak test of each direction, the scalar mix."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from elmo_jax import model as elmo_model
from elmo_jax.scalar_mix import ScalarMix

TOL = 1e-5


def tiny_config(**overrides):
  cfg = elmo_model.model_config(vocab_size=40, max_characters_per_token=12, char_embedding_dim=6,
                                filters=[[1, 4], [2, 6], [3, 8]], projection_dim=12, lstm_dim=24, dropout=0.0)
  cfg.update(overrides)
  return cfg


def random_chars(rng, batch, length, chars):
  return jnp.asarray(rng.randint(0, elmo_model.CHAR_VOCAB_SIZE, (batch, length, chars)), jnp.int32)


def unbox(tree):
  return jax.tree.map(lambda x: np.asarray(x.unbox() if hasattr(x, 'unbox') else x), tree,
                      is_leaf=lambda x: hasattr(x, 'unbox'))


def init_layer(cfg, x, scale=1.0):
  layer = elmo_model.LSTMLayer(cfg)
  params = unbox(layer.init({'params': jax.random.PRNGKey(1)}, x)['params'])
  return layer, jax.tree.map(lambda p: p * scale, params)


def torch_lstm_from(params, cfg, d_in):
  """A torch.nn.LSTM(proj_size) holding `params` of one LSTMLayer: gates (i, g, f, o) -> torch's (i, f, g, o) and
  the run-time forget bias folded into bias_ih."""
  order = (0, 2, 1, 3)
  kernel, bias = params['input_kernel']['kernel'], params['input_kernel']['bias'].copy()
  bias[2] += elmo_model.FORGET_BIAS
  recurrent = params['cell']['recurrent_kernel']
  lstm = torch.nn.LSTM(d_in, cfg.lstm_dim, batch_first=True, proj_size=cfg.projection_dim).double()
  with torch.no_grad():
    lstm.weight_ih_l0.copy_(torch.from_numpy(np.concatenate([kernel[:, k].T for k in order])))
    lstm.weight_hh_l0.copy_(torch.from_numpy(np.concatenate([recurrent[:, k].T for k in order])))
    lstm.bias_ih_l0.copy_(torch.from_numpy(np.concatenate([bias[k] for k in order])))
    lstm.bias_hh_l0.zero_()
    lstm.weight_hr_l0.copy_(torch.from_numpy(np.array(params['cell']['projection'].T)))
  return lstm


def test_lstm_layer_matches_torch_lstm_with_projection():
  cfg = tiny_config(cell_clip=0.0, proj_clip=0.0)
  x = jnp.asarray(np.random.RandomState(0).randn(3, 7, 10), jnp.float32)
  layer, params = init_layer(cfg, x)
  ours = np.asarray(layer.apply({'params': params}, x))
  theirs, _ = torch_lstm_from(params, cfg, 10)(torch.from_numpy(np.asarray(x, np.float64)))
  np.testing.assert_allclose(ours, theirs.detach().numpy(), atol=TOL, rtol=0)


def test_two_layer_stack_with_residual_matches_torch():
  cfg = tiny_config(cell_clip=0.0, proj_clip=0.0)
  x = jnp.asarray(np.random.RandomState(1).randn(2, 6, cfg.projection_dim), jnp.float32)
  stack = elmo_model.LSTMStack(cfg)
  params = unbox(stack.init({'params': jax.random.PRNGKey(2)}, x, True)['params'])
  ours = stack.apply({'params': params}, x, True)
  h = torch.from_numpy(np.asarray(x, np.float64))
  for i in range(cfg.n_lstm_layers):
    out, _ = torch_lstm_from(params[f'layer_{i}'], cfg, cfg.projection_dim)(h)
    h = out + h if i > 0 else out
    np.testing.assert_allclose(np.asarray(ours[i]), h.detach().numpy(), atol=TOL, rtol=0)


def numpy_clipped_lstm(params, x, cell_clip, proj_clip):
  """An independent LSTM-with-projection step loop with clipping (TensorFlow LSTMCell semantics)."""
  sig = lambda v: 1.0 / (1.0 + np.exp(-v))
  kernel, bias = params['input_kernel']['kernel'], params['input_kernel']['bias']
  recurrent, projection = params['cell']['recurrent_kernel'], params['cell']['projection']
  batch, length, _ = x.shape
  c = np.zeros((batch, kernel.shape[-1]))
  h = np.zeros((batch, projection.shape[-1]))
  outputs, cells = [], []
  for t in range(length):
    z = np.einsum('bi,igc->bgc', x[:, t], kernel) + np.einsum('bp,pgc->bgc', h, recurrent) + bias
    c = sig(z[:, 2] + 1.0) * c + sig(z[:, 0]) * np.tanh(z[:, 1])
    c = np.clip(c, -cell_clip, cell_clip)
    h = np.clip((sig(z[:, 3]) * np.tanh(c)) @ projection, -proj_clip, proj_clip)
    outputs.append(h)
    cells.append(c)
  return np.stack(outputs, 1), np.stack(cells, 1)


def test_cell_and_projection_clipping_match_independent_implementation():
  cfg = tiny_config(cell_clip=0.5, proj_clip=0.3)
  x = jnp.asarray(3.0 * np.random.RandomState(2).randn(2, 8, 10), jnp.float32)
  layer, params = init_layer(cfg, x, scale=4.0)
  ours = np.asarray(layer.apply({'params': params}, x))
  theirs, cells = numpy_clipped_lstm(params, np.asarray(x, np.float64), 0.5, 0.3)
  assert np.mean(np.abs(cells) >= 0.5) > 0.05 and np.mean(np.abs(theirs) >= 0.3) > 0.05  # clipping is active
  np.testing.assert_allclose(ours, theirs, atol=TOL, rtol=0)


def numpy_char_cnn(params, char_ids, cfg):
  """Independent char CNN: embedding, 1-D valid convolutions (torch), max over time, relu, highways, projection."""
  x = params['char_embed'][np.asarray(char_ids)]             # [B, L, C, E]
  b, l, c, e = x.shape
  flat = torch.from_numpy(x.reshape(b * l, c, e).transpose(0, 2, 1).astype(np.float64))
  pooled = []
  for i, (width, channels) in enumerate(cfg.filters):
    weight = torch.from_numpy(params[f'conv_{i}_kernel'].transpose(2, 1, 0).astype(np.float64))  # [out, in, w]
    y = torch.nn.functional.conv1d(flat, weight, torch.from_numpy(params[f'conv_{i}_bias'].astype(np.float64)))
    pooled.append(np.maximum(y.max(dim=2).values.numpy(), 0.0))
  h = np.concatenate(pooled, -1)
  for k in range(cfg.n_highway):
    p = params[f'highway_{k}']
    gate = 1.0 / (1.0 + np.exp(-(h @ p['carry_kernel'] + p['carry_bias'])))
    h = gate * np.maximum(h @ p['transform_kernel'] + p['transform_bias'], 0.0) + (1.0 - gate) * h
  h = h @ params['projection']['kernel'] + params['projection']['bias']
  return h.reshape(b, l, -1)


def test_char_cnn_and_highway_match_independent_implementation():
  cfg = tiny_config()
  chars = random_chars(np.random.RandomState(3), 2, 5, cfg.max_characters_per_token)
  encoder = elmo_model.CharCNNEncoder(cfg)
  params = unbox(encoder.init({'params': jax.random.PRNGKey(3)}, chars)['params'])
  params = jax.tree.map(lambda p: p + 0.1 * np.random.RandomState(4).randn(*p.shape).astype(np.float32), params)
  ours = np.asarray(encoder.apply({'params': params}, chars))
  np.testing.assert_allclose(ours, numpy_char_cnn(params, chars, cfg), atol=TOL, rtol=0)


@pytest.fixture(scope='module')
def bilm():
  cfg = tiny_config()
  model = elmo_model.ElmoBiLM(cfg)
  chars = random_chars(np.random.RandomState(5), 2, 8, cfg.max_characters_per_token)
  lengths = jnp.array([8, 5], jnp.int32)
  params = unbox(model.init({'params': jax.random.PRNGKey(6)}, chars, lengths)['params'])
  return cfg, model, params, chars, lengths


def test_backward_lm_reads_each_sentence_from_its_own_end(bilm):
  cfg, model, params, chars, lengths = bilm
  out = model.apply({'params': params}, chars, lengths)
  short = 5
  tokens = model.apply({'params': params}, chars[1:, :short], method=elmo_model.ElmoBiLM.encode_tokens)
  alone = elmo_model.LSTMStack(cfg).apply({'params': params['backward_lm']}, tokens[:, ::-1], True)
  for layer in range(cfg.n_lstm_layers):
    np.testing.assert_allclose(np.asarray(out['backward'][layer][1, :short]), np.asarray(alone[layer][0, ::-1]),
                               atol=TOL, rtol=0)
  forward_alone = elmo_model.LSTMStack(cfg).apply({'params': params['forward_lm']}, tokens, True)
  np.testing.assert_allclose(np.asarray(out['forward'][-1][1, :short]), np.asarray(forward_alone[-1][0]),
                             atol=TOL, rtol=0)


def test_no_leak_in_either_direction(bilm):
  """d out_t / d token_j is exactly 0 for j > t (forward) and for j < t or j >= length (backward)."""
  cfg, model, params, chars, lengths = bilm
  tokens = model.apply({'params': params}, chars, method=elmo_model.ElmoBiLM.encode_tokens)
  length = tokens.shape[1]
  probe = jnp.asarray(np.random.RandomState(7).randn(cfg.projection_dim), jnp.float32)

  @jax.jit
  def grads(x, t):
    def outputs(x, direction):
      forward, backward = model.apply({'params': params}, x, lengths, method=elmo_model.ElmoBiLM.contextualize)
      top = (forward if direction == 0 else backward)[-1]
      return jnp.sum(jnp.take(top, t, axis=1) @ probe)
    return jax.grad(outputs)(x, 0), jax.grad(outputs)(x, 1)

  positions = np.arange(length)
  for t in range(length):
    g_forward, g_backward = (np.abs(np.asarray(g)).sum(-1) for g in grads(tokens, t))  # [batch, length]
    for b, n in enumerate(np.asarray(lengths)):
      assert np.all(g_forward[b, positions > t] == 0.0)
      assert np.all(g_forward[b, positions <= t] > 0.0)
      if t < n:
        assert np.all(g_backward[b, (positions < t) | (positions >= n)] == 0.0)
        assert np.all(g_backward[b, (positions >= t) & (positions < n)] > 0.0)


def test_features_are_token_layer_twice_then_forward_backward(bilm):
  cfg, model, params, chars, lengths = bilm
  features = model.apply({'params': params}, chars, lengths, method=elmo_model.ElmoBiLM.features)
  out = model.apply({'params': params}, chars, lengths)
  p = cfg.projection_dim
  assert features.shape == (1 + cfg.n_lstm_layers, 2, 8, 2 * p)
  np.testing.assert_array_equal(features[0, ..., :p], features[0, ..., p:])
  np.testing.assert_array_equal(features[2, ..., :p], out['forward'][1])
  np.testing.assert_array_equal(features[2, ..., p:], out['backward'][1])


@pytest.mark.parametrize('layer_norm', [False, True])
def test_scalar_mix_matches_hand_computation(layer_norm):
  rng = np.random.RandomState(8)
  features = rng.randn(3, 2, 4, 5).astype(np.float32)
  mask = np.array([[1, 1, 1, 0], [1, 1, 0, 0]], np.float32)
  mix = ScalarMix(3, layer_norm=layer_norm)
  params = {'scalar_weights': np.array([0.5, -1.0, 2.0], np.float32), 'gamma': np.float32(1.7)}
  ours = np.asarray(mix.apply({'params': params}, jnp.asarray(features), jnp.asarray(mask)))
  weights = np.exp([0.5, -1.0, 2.0]) / np.exp([0.5, -1.0, 2.0]).sum()
  expected = np.zeros((2, 4, 5))
  for j in range(3):
    h = features[j].astype(np.float64)
    if layer_norm:
      for b in range(2):
        real = h[b][mask[b] > 0]
        h[b] = (h[b] - real.mean()) / np.sqrt(real.var() + 1e-12)
    expected += weights[j] * h
  expected *= 1.7
  real = mask > 0
  np.testing.assert_allclose(ours[real], expected[real], atol=TOL, rtol=0)
