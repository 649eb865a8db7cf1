"""The main job end to end on a slice of the embedded corpus: data, training with falling loss, checkpoint, HF
export."""
import json
import os
import re

import jax
import numpy as np
import pytest

from bert_jax import export, pretrain
from common import checkpoint
from bert_jax.configs import tiny
from common.config import ConfigError
from tests.drivers import harness


def small_config(**overrides):
  config = tiny.get_config()
  config.update(num_train_steps=150, global_batch_size=16, log_every=1, eval_every=0, num_eval_batches=2,
                checkpoint_every=100, progress_bar=False, report_examples=0)
  # One shard writer, in this process: spawning writers costs seconds on a 300 kB slice (the parallel writer's
  # output equals the serial one's: test_bert_data.py).
  config.data.update(vocab_size=2000, max_seq_length=32, max_predictions_per_seq=5, num_workers=1)
  config.model.update(hidden_size=64, intermediate_size=128)
  config.optim.update(warmup_steps=10, learning_rate=2e-3)
  config.mesh.update(data=-1, num_devices=1)  # sharded steps: test_trainer.py
  config.update(overrides)
  return config


def test_pretrain_end_to_end(tmp_path, tmp_path_factory, capsys):
  """On a ~300 kB slice of the embedded corpus (its whole validation split for eval): 150 steps of 16 rows train on
  fewer rows than the slice holds, so the whole corpus would only cost data preparation time."""
  workdir = str(tmp_path / 'run')
  train_corpus, eval_corpus = harness.shared_small_corpus(tmp_path_factory)
  config = small_config(report_examples=2)
  # One layer: the losses fall as with two (1.409 vs 1.405 train, eval 1.435 under chance either way) and each of
  # the two runs compiles in less time; the HF export of several layers is test_bert_hf.py's.
  config.model.num_hidden_layers = 1
  config.data.update(corpus=train_corpus, eval_corpus=eval_corpus)
  _, history = pretrain.run(config, workdir)
  train = [h for h in history if 'loss' in h]
  # At init the model guesses uniformly: ln(vocab) nats of MLM loss plus ln 2 = 0.69 of NSP (8.3 for 2000).
  vocab = json.load(open(os.path.join(workdir, 'config.json')))['model']['vocab_size']
  chance = np.log(vocab) + np.log(2)
  first, last = np.mean([h['loss'] for h in train[:3]]), np.mean([h['loss'] for h in train[-20:]])
  assert abs(first - chance) < 0.3, (first, chance)
  assert last < first - 1.0, f'loss did not fall: {first:.3f} -> {last:.3f}'
  evals = [h for h in history if 'eval/loss' in h]
  assert evals and evals[-1]['eval/loss'] < chance - 1.0, (chance, evals[-1])
  # The end-of-run report: the same eval rows, so the same accuracy as the final eval, next to a real baseline.
  printed = capsys.readouterr().out
  found = re.search(r'MLM accuracy: ([0-9.]+) vs ([0-9.]+) for always', printed)
  assert found, printed
  assert abs(float(found[1]) - evals[-1]['eval/mlm_accuracy']) < 2e-3 and 0 < float(found[2]) < 1
  assert re.search(r"NSP accuracy: [0-9.]+ vs 0\.[5-9][0-9]* for always '(random next|is next)' \(the majority rate\)", printed), printed
  assert printed.count('top 5: ') == 2
  lines = [json.loads(l) for l in open(os.path.join(workdir, 'metrics.jsonl'))]
  assert {'train/loss', 'train/mlm_accuracy', 'train/nsp_accuracy', 'train/learning_rate', 'train/grad_norm',
          'train/tokens_per_sec', 'train/model_flops_per_sec', 'train/mfu'} <= set(lines[0])
  assert os.listdir(os.path.join(workdir, 'tensorboard'))
  assert os.path.exists(os.path.join(workdir, 'vocab.txt'))

  transformers = pytest.importorskip('transformers')
  model, info = transformers.BertForPreTraining.from_pretrained(os.path.join(workdir, 'hf'),
                                                                output_loading_info=True)
  assert not info['missing_keys'] and not info['unexpected_keys']
  tokenizer = transformers.BertTokenizer.from_pretrained(os.path.join(workdir, 'hf'))
  assert tokenizer.tokenize('Return the value.') == ['return', 'the', 'value', '.']

  # Continue from the exported directory: one step at learning rate 0 (warmup starts at 0) leaves the imported
  # parameters exactly as they were, so the new run's checkpoint equals the HF weights.
  config = small_config(num_train_steps=1, num_eval_batches=0, init_from=os.path.join(workdir, 'hf'),
                        export_hf=False)
  config.data.update(corpus=train_corpus, eval_corpus=eval_corpus)
  config.model.update(vocab_size=0, hidden_size=32)  # replaced by the HF directory's architecture
  config.optim.update(warmup_steps=1)
  pretrain.run(config, str(tmp_path / 'continued'))
  _, hf_params = export.load_hf_dir(os.path.join(workdir, 'hf'))
  continued, continued_config = checkpoint.restore_params(str(tmp_path / 'continued'))
  assert continued_config.model.hidden_size == 64
  for x, y in zip(jax.tree.leaves(hf_params), jax.tree.leaves(continued)):
    np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize('overrides, field', [
    (dict(max_seq_length=256), 'data.max_seq_length'),
    (dict(max_predictions_per_seq=0), 'data.max_predictions_per_seq'),
    (dict(masking='sometimes'), 'data.masking'),
])
def test_bad_data_config_refused_before_any_work(tmp_path, overrides, field):
  config = small_config()
  config.data.update(overrides)
  with pytest.raises(ConfigError, match=f'config.{field}'):
    pretrain.run(config, str(tmp_path / 'run'))
  assert not os.path.exists(tmp_path / 'run' / 'data')


def test_model_vocab_smaller_than_tokenizer_refused(tmp_path, tmp_path_factory):
  """The tokenizer (2000 words) is trained on the ~300 kB slice: the refusal comes after data preparation."""
  config = small_config()
  train_corpus, eval_corpus = harness.shared_small_corpus(tmp_path_factory)
  config.data.update(corpus=train_corpus, eval_corpus=eval_corpus)
  config.model.vocab_size = 500
  with pytest.raises(ConfigError, match='config.model.vocab_size'):
    pretrain.run(config, str(tmp_path / 'run'))
