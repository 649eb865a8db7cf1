"""ELMo fine-tuning through the task registry (`elmo_jax.finetune.run`): the generated task learned to >= 95 % on its
dev split, GLUE-format pair and STS-B-format regression files and a CoNLL-format tagging file run end to end with
their official metrics in metrics.json, and bad input stops with one line. One tiny random biLM, written as a biLM
directory, serves every test: the biLM stays frozen, so a random one is a fixed feature extractor (its token layer
reads every word through its characters)."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from common import finetune as common_finetune
from common import trainer
from common.config import UserError
from elmo_jax import features, finetune, weights
from elmo_jax import model as elmo_model
from elmo_jax.configs import finetune as finetune_configs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = ['apple', 'river', 'stone', 'cloud', 'tiger', 'mango', 'piano', 'lemon', 'grass', 'ocean', 'house', 'train']


@pytest.fixture(scope='module')
def bilm_dir(tmp_path_factory):
  cfg = elmo_model.model_config(vocab_size=10, max_characters_per_token=12, char_embedding_dim=8,
                                filters=[[1, 16], [2, 16], [3, 32]], projection_dim=32, lstm_dim=32, dropout=0.0)
  bilm = finetune._random_bilm(cfg)  # pylint: disable=protected-access
  path = str(tmp_path_factory.mktemp('bilm'))
  weights.write_weights(path, bilm.params, cfg)
  return path


def small_config(**overrides):
  config = finetune_configs.get_config()
  config.update(dict(max_seq_length=16, length_buckets=1, task_hidden_size=32, dropout=0.0, log_every=1000,
                     eval_batch_size=64, global_batch_size=16, epochs=2.0, checkpoint_every=0,
                     peak_flops_per_device=1e12))  # the CPU's matmul peak given: no run spends seconds measuring it
  config.mesh.update(num_devices=1)
  config.update(overrides)
  return config


def sentence(rng, count):
  return ' '.join(WORDS[i] for i in rng.randint(0, len(WORDS), count))


def test_learnable_task_reaches_95_percent(bilm_dir, tmp_path):
  # 320 examples x 10 epochs / 32 = 100 steps; label: does 'pineapple' occur (the registry's generated task).
  config = small_config(max_seq_length=32, num_train_examples=320, num_eval_examples=200, learnable_max_words=10,
                        epochs=10.0, global_batch_size=32, learning_rate=2e-2)
  result = finetune.run(config, 'learnable', bilm_dir, str(tmp_path))
  accuracy = result['metrics']['accuracy']['mean']
  assert accuracy >= 0.95, accuracy
  assert result['runs'][0]['steps'] == 100
  assert len(json.loads((tmp_path / 'seed_0' / 'predictions.json').read_text())) == 200


def write_tsv(path, header, rows):
  lines = ([header] if header else []) + ['\t'.join(map(str, row)) for row in rows]
  path.write_text('\n'.join(lines) + '\n')


def test_glue_pair_task_writes_official_metrics_for_every_seed(bilm_dir, tmp_path):
  rng = np.random.RandomState(0)
  data = tmp_path / 'MRPC'
  data.mkdir()
  for split, count in (('train', 48), ('dev', 20)):  # MRPC: Quality, #1 ID, #2 ID, #1 String, #2 String
    rows = []
    for i in range(count):
      a = sentence(rng, 5)
      b = a if i % 2 else sentence(rng, 5)
      rows.append((i % 2, 2 * i, 2 * i + 1, a + ' .', b + ' .'))
    write_tsv(data / f'{split}.tsv', 'Quality\t#1 ID\t#2 ID\t#1 String\t#2 String', rows)
  result = finetune.run(small_config(seeds=(0, 1)), 'glue/mrpc', bilm_dir, str(tmp_path / 'out'), str(data))
  written = json.loads((tmp_path / 'out' / 'metrics.json').read_text())
  assert set(written['metrics']) == {'accuracy', 'f1'}
  assert [r['seed'] for r in written['runs']] == [0, 1]
  for name, summary in written['metrics'].items():
    assert len(summary['values']) == 2 and all(0.0 <= v <= 1.0 for v in summary['values']), (name, summary)
  assert result['metrics']['accuracy']['values'] == written['metrics']['accuracy']['values']
  predictions = json.loads((tmp_path / 'out' / 'seed_1' / 'predictions.json').read_text())
  assert len(predictions) == 20 and set(predictions) <= {0, 1}


def test_stsb_regression_task_reports_pearson_and_spearman(bilm_dir, tmp_path):
  rng = np.random.RandomState(1)
  data = tmp_path / 'STS-B'
  data.mkdir()
  header = 'index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore'
  for split, count in (('train', 48), ('dev', 24)):
    rows = [(i, 'main', 'f', '2012', i, 's', 's', sentence(rng, 4), sentence(rng, 4), f'{rng.uniform(0, 5):.2f}')
            for i in range(count)]
    write_tsv(data / f'{split}.tsv', header, rows)
  result = finetune.run(small_config(), 'glue/sts-b', bilm_dir, str(tmp_path / 'out'), str(data))
  written = json.loads((tmp_path / 'out' / 'metrics.json').read_text())
  assert set(written['metrics']) == {'pearson', 'spearman', 'pearson_spearman_mean'}
  assert all(-1.0 <= s['mean'] <= 1.0 for s in written['metrics'].values())
  scores = result['runs'][0]['predictions']['predictions.json']
  assert len(scores) == 24 and np.isfinite(scores).all() and np.std(scores) > 0  # scores, not class indices
  # The run started from the trainer's own draw with the output bias at the mean training label (regression_bias).
  config = small_config()
  model_cfg, params, _ = finetune.load_init(bilm_dir)
  plan = finetune._plan(config, 'glue/sts-b', features.BiLM(model_cfg, params), str(data))  # pylint: disable=W0212
  labels = [float(line.split('\t')[-1]) for line in (data / 'train.tsv').read_text().splitlines()[1:]]
  bias = common_finetune.mean_label_bias(config, True, plan.train_rows['labels'], 'output')
  assert bias == {'output': pytest.approx(np.mean(labels))} and abs(np.mean(labels)) > 1.0
  start = common_finetune.fresh_params(plan.objective, 0, bias)
  drawn = trainer.build_setup(_run_config(config, plan.steps), plan.objective).create_state(None).params
  np.testing.assert_allclose(start['output']['bias'], [np.mean(labels)], rtol=1e-6)
  np.testing.assert_array_equal(drawn['output']['bias'], [0.0])
  drawn['output'] = dict(drawn['output'], bias=start['output']['bias'])
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(drawn), start)
  for choice, centre in (('label_mean', np.mean(labels)), ('zero', 0.0)):  # lr 1e-12: the scores of the start
    still = finetune.run(small_config(learning_rate=1e-12, epochs=1.0, regression_bias=choice), 'glue/sts-b', bilm_dir,
                         None, str(data))
    assert abs(np.mean(still['runs'][0]['predictions']['predictions.json']) - centre) < 0.5, choice
  with pytest.raises(UserError, match='config.regression_bias: must be one of'):
    finetune.run(small_config(regression_bias='mean'), 'glue/sts-b', bilm_dir, None, str(tmp_path / 'missing'))


def _run_config(config, steps):
  run_cfg = config.copy_and_resolve_references()
  run_cfg.update(seed=0, num_train_steps=steps)
  return run_cfg


def test_conll_tagging_task_reports_entity_f1(bilm_dir, tmp_path):
  tags = {'apple': 'B-ORG', 'river': 'B-LOC', 'tiger': 'B-PER'}
  rng = np.random.RandomState(2)
  for name, count in (('train.txt', 48), ('valid.txt', 16)):
    lines = ['-DOCSTART- -X- -X- O', '']
    for _ in range(count):
      lines += [f'{w} NN O {tags.get(w, "O")}' for w in sentence(rng, 6).split()] + ['']
    (tmp_path / name).write_text('\n'.join(lines))
  result = finetune.run(small_config(), 'conll2003', bilm_dir, None, str(tmp_path))
  assert {'precision', 'recall', 'f1'} <= set(result['metrics'])
  predicted = result['runs'][0]['predictions']['predictions.json']
  assert [len(p) for p in predicted] == [6] * 16


def test_bad_input_is_one_line(bilm_dir, tmp_path):
  config = small_config()
  with pytest.raises(UserError, match='unknown task'):
    finetune.run(config, 'glue/nope', bilm_dir, None, str(tmp_path))
  with pytest.raises(UserError, match='multiple_choice'):
    finetune.run(config, 'swag', bilm_dir, None, str(tmp_path))
  with pytest.raises(UserError, match='neither options.json'):
    finetune.run(config, 'glue/rte', str(tmp_path), None, str(tmp_path))
  with pytest.raises(FileNotFoundError, match='train.tsv'):
    finetune.run(config, 'glue/rte', bilm_dir, None, str(tmp_path))
  # The command line: one `error:` line naming the missing file, exit 2.
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='')
  out = subprocess.run([sys.executable, '-m', 'elmo_jax.finetune', '--task=glue/cola', f'--init={bilm_dir}',
                        f'--data_dir={tmp_path}', f'--workdir={tmp_path / "out"}'], capture_output=True, text=True,
                       env=env, cwd=REPO, timeout=300)
  assert out.returncode == 2, out.stderr[-2000:]
  errors = [line for line in out.stderr.splitlines() if line.startswith('error:')]
  assert len(errors) == 1 and 'train.tsv' in errors[0], out.stderr[-2000:]
