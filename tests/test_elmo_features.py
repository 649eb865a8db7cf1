"""ELMo features of raw sentences and feature-based fine-tuning: the biLM stays frozen, the task model learns
generated tasks (word tagging, sentence classification) to >= 95 % on held-out sentences."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from common import optim, sharding, trainer
from common.data.pipeline import StepLoader, stack_rows
from elmo_jax import features as elmo_features
from elmo_jax import model as elmo_model
from elmo_jax import task_model, weights

MAX_LEN = 10
CHARS = 8
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = ['apple', 'river', 'stone', 'cloud', 'tiger', 'mango', 'piano', 'lemon', 'grass', 'ocean', 'house', 'train',
         'chair', 'bread', 'light', 'music', 'sugar', 'paper', 'glass', 'horse']


@pytest.fixture(scope='module')
def bilm():
  cfg = elmo_model.model_config(vocab_size=10, max_characters_per_token=CHARS, char_embedding_dim=8,
                                filters=[[1, 8], [2, 16], [3, 16]], projection_dim=16, lstm_dim=32, dropout=0.0)
  variables = jax.jit(elmo_model.ElmoBiLM(cfg).init)(
      {'params': jax.random.PRNGKey(0)}, jnp.zeros((1, 3, CHARS), jnp.int32), jnp.array([3]))
  params = jax.tree.map(lambda x: np.asarray(x.unbox() if hasattr(x, 'unbox') else x), variables['params'],
                        is_leaf=lambda x: hasattr(x, 'unbox'))
  return elmo_features.BiLM(cfg, params)


def test_sentence_features_drop_boundaries_and_read_unknown_words_by_characters(bilm, tmp_path):
  sentences = [['apple', 'river', 'never-seen'], ['stone']]
  out = elmo_features.sentence_features(bilm, sentences, max_seq_length=MAX_LEN, batch_size=4)
  assert [f.shape for f in out] == [(3, 3, 32), (3, 1, 32)]
  np.testing.assert_array_equal(out[0][0, :, :16], out[0][0, :, 16:])  # layer 0 is the token vector twice
  assert not np.allclose(out[0][0, 2], out[0][0, 1])  # the unknown word has its own character vector
  # A biLM directory gives the same features.
  weights.write_weights(str(tmp_path / 'bilm'), bilm.params, bilm.config)
  again = elmo_features.sentence_features(elmo_features.load_bilm(str(tmp_path / 'bilm')), sentences,
                                          max_seq_length=MAX_LEN, batch_size=4)
  np.testing.assert_array_equal(out[1], again[1])


def generated_rows(kind, count, seed):
  rng = np.random.RandomState(seed)
  rows = []
  for _ in range(count):
    sentence = [WORDS[i] for i in rng.randint(0, len(WORDS), rng.randint(2, MAX_LEN - 1))]
    batch = elmo_features.sentences_to_batch([sentence], max_seq_length=MAX_LEN, max_characters=CHARS)
    row = {k: v[0] for k, v in batch.items()}
    if kind == 'tagging':  # tag 1 for the first ten words
      tags = np.zeros([MAX_LEN], np.int32)
      tags[1:1 + len(sentence)] = [int(WORDS.index(w) < 10) for w in sentence]
      row['labels'] = tags
    else:  # 1 if the sentence holds 'apple' or 'river'
      row['labels'] = np.int32(any(w in WORDS[:2] for w in sentence))
    rows.append(row)
  return rows


@pytest.mark.parametrize('kind', ['tagging', 'classification'])
def test_feature_based_task_learns_generated_task(bilm, kind):
  config = trainer.trainer_config(num_train_steps=200, global_batch_size=32, log_every=50, num_eval_batches=8,
                                  checkpoint_every=0, progress_bar=False, peak_flops_per_device=1e12,
                                  optim=optim.optim_config(learning_rate=3e-2, warmup_steps=10, weight_decay=0.0))
  config.mesh.update(data=-1)
  batch_fn = lambda records, keys, epoch: stack_rows(records)
  train_loader = StepLoader(generated_rows(kind, 512, 1), batch_fn, 32, seed=0)
  eval_loader = StepLoader(generated_rows(kind, 256, 2), batch_fn, 32, seed=0, shuffle=False)
  objective = task_model.make_task_objective(bilm, kind, 2, max_seq_length=MAX_LEN, hidden_size=32, dropout=0.0)
  mesh = sharding.make_mesh(config.mesh, devices=jax.devices()[:1])
  state, history = trainer.train(config, objective, train_loader, eval_loader, mesh=mesh)
  accuracy = [h for h in history if 'eval/accuracy' in h][-1]['eval/accuracy']
  assert accuracy >= 0.95, (kind, accuracy)
  assert set(state.params) == {'scalar_mix', 'hidden', 'output'}  # the biLM is not among the trained params


def test_extract_features_command_writes_every_layer_of_every_word(bilm, tmp_path):
  import json
  import subprocess
  import sys
  weights.write_weights(str(tmp_path / 'bilm'), bilm.params, bilm.config)
  (tmp_path / 'in.txt').write_text('apple river, stone\n\nhorse ||| light music\n')
  out = tmp_path / 'out.jsonl'
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='')
  result = subprocess.run([sys.executable, '-m', 'elmo_jax.extract_features', f'--init={tmp_path / "bilm"}',
                           f'--input_file={tmp_path / "in.txt"}', f'--output_file={out}', '--max_seq_length=10',
                           '--batch_size=2'], capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  lines = [json.loads(line) for line in out.read_text().splitlines()]
  assert [line['linex_index'] for line in lines] == [0, 2]
  assert [f['token'] for f in lines[0]['features']] == ['apple', 'river', ',', 'stone']
  assert [f['token'] for f in lines[1]['features']] == ['horse', 'light', 'music']
  assert [layer['index'] for layer in lines[0]['features'][0]['layers']] == [0, 1, 2]
  expected = elmo_features.sentence_features(bilm, [['horse', 'light', 'music']], max_seq_length=10, batch_size=2)
  np.testing.assert_allclose(lines[1]['features'][2]['layers'][2]['values'], expected[0][2, 2], atol=2e-6)
