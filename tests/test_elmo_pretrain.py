"""ELMo pretraining: character ids as the reference, rows -> batch, LM targets, sampled softmax, the 8-device step
equal to one device, SIGTERM + restart bitwise equal, and a tiny run on a slice of the embedded corpus."""
import json
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from common import checkpoint as ckpt_lib
from common import pretrain, sharding, trainer
from common.config import ConfigError
from common.data.pipeline import StepLoader
from elmo_jax import objective as elmo_objective
from elmo_jax import pretrain_data, tokenizer, weights
from elmo_jax.configs import tiny
from elmo_jax.recipe import RECIPE
from tests.drivers import harness

VOCAB = tokenizer.WordVocabulary(list(tokenizer.SPECIAL_WORDS) + [f'word{i}' for i in range(37)])


def small_config(**overrides):
  config = tiny.get_config()
  config.update(num_train_steps=3, global_batch_size=8, log_every=1, eval_every=0, num_eval_batches=0,
                checkpoint_every=0, progress_bar=False, async_checkpoint=False)
  config.data.update(vocab_size=2000, max_seq_length=10)
  config.model.update(vocab_size=VOCAB.vocab_size, max_characters_per_token=8, char_embedding_dim=4,
                      filters=[[1, 4], [2, 8]], projection_dim=16, lstm_dim=32, dropout=0.1)
  config.optim.update(warmup_steps=1, learning_rate=1e-2)
  config.mesh.update(data=-1, num_devices=1)  # sharded steps: test_sharded_step_equals_single_device
  config.update(overrides)
  return config


def synthetic_loader(config, num_rows=64, seed=0):
  """A StepLoader over random sentences of 1..8 words (the real batch function)."""
  rng = np.random.RandomState(seed)
  rows = [{'ids': rng.randint(3, VOCAB.vocab_size, rng.randint(1, 9)).astype(np.uint16)} for _ in range(num_rows)]
  return pretrain_data.make_loader_from_source(rows, config, VOCAB, seed=config.seed, shuffle=True)


def test_character_ids_follow_the_reference():
  np.testing.assert_array_equal(tokenizer.word_char_ids('ab', 6), [258, 97, 98, 259, 260, 260])
  np.testing.assert_array_equal(tokenizer.word_char_ids('<S>', 5), [258, 256, 259, 260, 260])
  np.testing.assert_array_equal(tokenizer.word_char_ids('</S>', 5), [258, 257, 259, 260, 260])
  np.testing.assert_array_equal(tokenizer.word_char_ids('héllo', 5), [258, 104, 195, 169, 259])
  assert tokenizer.split_words("It's 3.5 km, isn't it?") == ['It', "'", 's', '3', '.', '5', 'km', ',', 'isn',
                                                              "'", 't', 'it', '?']
  assert VOCAB.encode('word3 unknown word0') == [6, VOCAB.unk_id, 3]


def test_rows_to_batch_and_targets():
  rows = [np.array([5, 6, 7]), np.array([9])]
  batch = pretrain_data.rows_to_batch(rows, max_seq_length=6, char_table=VOCAB.char_table(8), bos_id=0, eos_id=1)
  np.testing.assert_array_equal(batch['token_ids'], [[0, 5, 6, 7, 1, 0], [0, 9, 1, 0, 0, 0]])
  np.testing.assert_array_equal(batch['lengths'], [5, 3])
  np.testing.assert_array_equal(batch['char_ids'][1, 1], tokenizer.word_char_ids('word6', 8))
  assert np.all(batch['char_ids'][1, 3:] == tokenizer.PAD_CHAR)
  assert pretrain_data.sentence_rows(np.arange(7), np.array([5, 2]), 3)[1].tolist() == [3, 4]
  targets = elmo_objective.lm_targets(jnp.asarray(batch['token_ids']), jnp.asarray(batch['lengths']))
  fwd, fwd_w = targets['forward']
  bwd, bwd_w = targets['backward']
  np.testing.assert_array_equal(fwd[0, :4], [5, 6, 7, 1])
  np.testing.assert_array_equal(fwd_w, [[1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0]])
  np.testing.assert_array_equal(bwd[0, 1:5], [0, 5, 6, 7])
  np.testing.assert_array_equal(bwd_w, [[0, 1, 1, 1, 1, 0], [0, 1, 1, 0, 0, 0]])


def test_sampled_softmax_removes_accidental_hits_and_corrects_for_the_sampler():
  config = small_config()
  model = elmo_objective.make_model(config)
  objective = elmo_objective.make_objective(config)
  params = jax.tree.map(lambda x: x.unbox() if hasattr(x, 'unbox') else x,
                        jax.jit(objective.init_variables)(jax.random.PRNGKey(0))['params'],
                        is_leaf=lambda x: hasattr(x, 'unbox'))
  h = jax.random.normal(jax.random.PRNGKey(1), (2, 3, config.model.projection_dim))
  targets = jnp.array([[3, 4, 5], [6, 7, 8]])
  nll = elmo_objective.sampled_softmax_nll(model, params, h, targets, jax.random.PRNGKey(2), 16)
  assert nll.shape == (2, 3) and bool(jnp.all(jnp.isfinite(nll))) and bool(jnp.all(nll > 0))
  ids = elmo_objective.sample_log_uniform(jax.random.PRNGKey(3), 20000, 40)
  counts = np.bincount(np.asarray(ids), minlength=40) / 20000
  expected = np.asarray(elmo_objective.log_uniform_probability(jnp.arange(40), 40))
  np.testing.assert_allclose(counts, expected, atol=0.01)
  assert abs(expected.sum() - 1.0) < 1e-5


def run(config, mesh=None, workdir=None, stop_after=None, loader=None):
  loader = loader or synthetic_loader(config)
  state, history = trainer.train(config, elmo_objective.make_objective(config), loader, workdir=workdir,
                                 mesh=mesh, stop_after=stop_after)
  return jax.device_get(state.params), history


@pytest.mark.parametrize('softmax', ['sampled'])  # the full softmax's vocab sharding is BERT's and GPT's
def test_sharded_step_equals_single_device(softmax):
  """3 steps with dropout on 8 fake devices (data 2 x fsdp 2 x tensor 2) match one device."""
  assert jax.device_count() == 8
  config = small_config()
  config.data.softmax = softmax
  one = sharding.make_mesh(sharding.mesh_config(), devices=jax.devices()[:1])
  ref_params, ref_history = run(config, mesh=one)
  sharded = small_config(mesh=sharding.mesh_config(data=2, fsdp=2, tensor=2))
  sharded.data.softmax = softmax
  params, history = run(sharded)
  diff = max(float(np.max(np.abs(x - y))) for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)))
  assert diff < 2e-5, diff
  for h, r in zip(history, ref_history):
    assert abs(h['loss'] - r['loss']) < 1e-5, (h['loss'], r['loss'])
  setup = trainer.build_setup(sharded, elmo_objective.make_objective(sharded))
  spec = setup.state_shardings.params['forward_lm']['layer_0']['cell']['recurrent_kernel'].spec
  assert tuple(spec) == ('fsdp', None, 'tensor')  # [embed, gates, cells]
  assert tuple(setup.state_shardings.params['softmax_kernel'].spec) == ('tensor', 'fsdp')  # [vocab, embed]


class SigtermLoader:
  """A loader that sends this process SIGTERM after handing out the batch of step `at`."""

  def __init__(self, loader, at):
    self.loader, self.at = loader, at
    self.steps = []

  def __getattr__(self, name):
    return getattr(self.loader, name)

  def iterate(self, start_step=0, num_steps=None):
    for step, batch in self.loader.iterate(start_step, num_steps):
      self.steps.append(step)
      if step == self.at:
        os.kill(os.getpid(), signal.SIGTERM)
      yield step, batch


def test_sigterm_then_restart_is_bitwise_equal(tmp_path):
  config = small_config(num_train_steps=6)
  one = sharding.make_mesh(sharding.mesh_config(), devices=jax.devices()[:1])
  straight, _ = run(config, mesh=one, workdir=str(tmp_path / 'straight'))
  first = SigtermLoader(synthetic_loader(config), at=2)
  run(config, mesh=one, workdir=str(tmp_path / 'b'), loader=first)
  assert ckpt_lib.make_manager(str(tmp_path / 'b')).latest_step() == 3 and first.steps == [0, 1, 2]
  second = SigtermLoader(synthetic_loader(config), at=-1)
  resumed, _ = run(config, mesh=one, workdir=str(tmp_path / 'b'), loader=second)
  assert second.steps == [3, 4, 5]
  for x, y in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed)):
    np.testing.assert_array_equal(x, y)


def test_pretrain_on_embedded_corpus(tmp_path, tmp_path_factory):
  """On a ~300 kB slice of the embedded corpus (its whole validation split for eval): 60 steps of 16 sentences
  train on fewer rows than the slice holds, so the whole corpus would only cost data preparation time."""
  config = small_config(num_train_steps=60, global_batch_size=16, num_eval_batches=2, log_every=5)
  config.model.update(vocab_size=0, max_characters_per_token=12)
  train_corpus, eval_corpus = harness.shared_small_corpus(tmp_path_factory)
  config.data.update(vocab_size=500, max_seq_length=16, corpus=train_corpus, eval_corpus=eval_corpus)
  config.optim.update(warmup_steps=5, learning_rate=3e-3)
  workdir = str(tmp_path / 'run')
  _, history = pretrain.run(RECIPE, config, workdir)
  train = [h for h in history if 'loss' in h]
  vocab = json.load(open(os.path.join(workdir, 'config.json')))['model']['vocab_size']
  assert vocab == 500
  first, last = train[0]['lm_loss'], train[-1]['lm_loss']
  assert abs(first - np.log(vocab)) < 0.5, (first, np.log(vocab))  # chance: ln(vocab) per direction
  assert last < first - 1.0, (first, last)
  evaluation = [h for h in history if 'eval/perplexity' in h][-1]
  assert evaluation['eval/perplexity'] < vocab / 3, evaluation
  exported_cfg, exported = weights.read_weights(os.path.join(workdir, 'hf'))
  restored, run_config = ckpt_lib.restore_params(workdir)
  assert exported_cfg.projection_dim == run_config.model.projection_dim == 16
  for x, y in zip(jax.tree.leaves(restored), jax.tree.leaves(exported)):
    np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize('section, overrides, field', [
    ('data', dict(softmax='hierarchical'), 'data.softmax'),
    ('data', dict(max_seq_length=2), 'data.max_seq_length'),
    ('model', dict(filters=[[60, 4]]), 'model.filters'),
    ('model', dict(activation='gelu'), 'model.activation'),
])
def test_bad_config_refused_before_any_work(tmp_path, section, overrides, field):
  config = small_config()
  config[section].update(overrides)
  with pytest.raises(ConfigError, match=f'config.{field}'):
    pretrain.run(RECIPE, config, str(tmp_path / 'run'))
  assert not os.path.exists(tmp_path / 'run' / 'data')
