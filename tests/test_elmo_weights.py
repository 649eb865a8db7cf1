"""The reference biLM format: options.json + HDF5 in bilm-tf's variable layout, written and read back exactly."""
import json
import os

import h5py
import jax
import jax.numpy as jnp
import numpy as np

from elmo_jax import model as elmo_model
from elmo_jax import tokenizer, weights


def tiny_config():
  return elmo_model.model_config(vocab_size=30, max_characters_per_token=10, char_embedding_dim=4,
                                 filters=[[1, 4], [2, 6]], projection_dim=8, lstm_dim=12, dropout=0.0)


def random_params(cfg):
  model = elmo_model.ElmoBiLM(cfg)
  chars = jnp.zeros((1, 3, cfg.max_characters_per_token), jnp.int32)
  params = model.init({'params': jax.random.PRNGKey(0)}, chars, jnp.array([3]))['params']
  params = jax.tree.map(lambda x: np.asarray(x.unbox() if hasattr(x, 'unbox') else x), params,
                        is_leaf=lambda x: hasattr(x, 'unbox'))
  rng = np.random.RandomState(1)
  return jax.tree.map(lambda p: (p + 0.1 * rng.randn(*p.shape)).astype(np.float32), params)


def test_write_read_round_trip_in_reference_layout(tmp_path):
  cfg = tiny_config()
  params = random_params(cfg)
  vocabulary = tokenizer.WordVocabulary(list(tokenizer.SPECIAL_WORDS) + [f'w{i}' for i in range(27)])
  out = weights.write_weights(str(tmp_path / 'bilm'), params, cfg, vocabulary)

  options = json.load(open(os.path.join(out, 'options.json')))
  assert options['char_cnn']['n_characters'] == 262 and options['char_cnn']['filters'] == [[1, 4], [2, 6]]
  assert options['lstm'] == dict(cell_clip=3.0, dim=12, n_layers=2, proj_clip=3.0, projection_dim=8,
                                 use_skip_connections=True)
  with h5py.File(os.path.join(out, 'weights.hdf5'), 'r') as f:
    shapes = {}
    f.visititems(lambda name, item: shapes.__setitem__(name, item.shape) if isinstance(item, h5py.Dataset) else None)
  assert shapes['char_embed'] == (261, 4)
  assert shapes['CNN/W_cnn_1'] == (1, 2, 4, 6) and shapes['CNN/b_cnn_1'] == (6,)
  assert shapes['CNN_high_1/W_carry'] == (10, 10) and shapes['CNN_high_0/b_transform'] == (10,)
  assert shapes['CNN_proj/W_proj'] == (10, 8)
  assert shapes['RNN_1/RNN/MultiRNNCell/Cell1/LSTMCell/W_0'] == (16, 48)
  assert shapes['RNN_0/RNN/MultiRNNCell/Cell0/LSTMCell/B'] == (48,)
  assert shapes['RNN_0/RNN/MultiRNNCell/Cell1/LSTMCell/W_P_0'] == (12, 8)
  assert shapes['softmax/W'] == (30, 8)

  read_cfg, read_params = weights.read_weights(out)
  for field in weights.ARCHITECTURE_FIELDS:
    assert read_cfg[field] == cfg[field], field
  assert jax.tree_util.tree_structure(read_params) == jax.tree_util.tree_structure(params)
  for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(read_params)):
    np.testing.assert_array_equal(x, y)
  assert tokenizer.load_vocabulary(out).id_to_token == vocabulary.id_to_token

  chars = jnp.asarray(np.random.RandomState(2).randint(0, 261, (2, 5, 10)), jnp.int32)
  lengths = jnp.array([5, 3])
  features = lambda c, p: elmo_model.ElmoBiLM(c).apply({'params': p}, chars, lengths,
                                                      method=elmo_model.ElmoBiLM.features)
  np.testing.assert_array_equal(features(cfg, params), features(read_cfg, read_params))


def test_published_style_file_without_softmax_reads_with_zero_softmax(tmp_path):
  cfg = tiny_config()
  out = weights.write_weights(str(tmp_path / 'bilm'), random_params(cfg), cfg)
  with h5py.File(os.path.join(out, 'weights.hdf5'), 'a') as f:
    del f['softmax']
  options_path = os.path.join(out, 'options.json')
  options = json.load(open(options_path))
  del options['n_tokens_vocab']
  json.dump(options, open(options_path, 'w'))
  read_cfg, read_params = weights.read_weights(out)
  assert read_cfg.vocab_size == 1 and not np.any(read_params['softmax_kernel'])


def test_original_options_give_the_published_sizes():
  from elmo_jax.configs import original
  config = original.get_config()
  config.model.vocab_size = 793471
  options = weights.options_from_config(config.model)
  assert options['char_cnn']['filters'] == [[1, 32], [2, 32], [3, 64], [4, 128], [5, 256], [6, 512], [7, 1024]]
  assert options['char_cnn']['max_characters_per_token'] == 50 and options['char_cnn']['n_highway'] == 2
  assert options['lstm']['dim'] == 4096 and options['lstm']['projection_dim'] == 512
  assert weights.config_from_options(options).to_dict() == config.model.to_dict()
