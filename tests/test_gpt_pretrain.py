"""GPT pretraining: packing, the sharded step, a run on a slice of the embedded corpus, and exact resume.

* `pack_rows` / `rows_to_batch`: every token of the `<|endoftext|>`-separated stream but the first is a target
  exactly once, rows are full except the last, the batch weights count the real targets.
* 3 steps with dropout on 8 fake devices (data x fsdp x tensor = 2 x 2 x 2) equal 1 device within 2e-5.
* `common.pretrain.run` with the GPT recipe on ~300 kB of the embedded corpus: loss falls from ln(vocab), an eval
  perplexity is logged, the learning report is printed, the HF export loads in `GPT2LMHeadModel` / `GPT2Tokenizer`, the workdir generates, and a
  run started from the export (`init_from`) takes its architecture, BPE and weights.
* `python -m gpt_jax.pretrain` SIGTERMed mid-run checkpoints the step it reached and exits 0; the restart ends
  bitwise equal to an uninterrupted run, having trained on exactly its batches (tests/drivers/recorded_run.py).
"""
import os
import signal
import sys

import jax
import numpy as np
import pytest

from common import checkpoint, optim, pretrain, sharding, trainer
from common.data.pipeline import StepLoader
from gpt_jax import export, generate, objective, pretrain_data
from gpt_jax import model as gpt_model
from gpt_jax.configs import tiny
from gpt_jax.recipe import RECIPE
from tests.drivers import harness

STEPS = 12


def test_pack_rows_and_batches():
  documents = [np.arange(10, 17), np.arange(20, 23), np.arange(30, 41)]
  rows = pretrain_data.pack_rows(documents, seq_len=6, eot_id=0)
  stream = np.concatenate([[0, *d] for d in documents])
  assert all(len(r) == 7 for r in rows[:-1]) and 2 <= len(rows[-1]) <= 7
  targets = np.concatenate([r[1:] for r in rows])
  np.testing.assert_array_equal(targets, stream[1:])  # every token but the first, once, in order
  batch = pretrain_data.rows_to_batch(rows, 6)
  np.testing.assert_array_equal(batch['input_ids'][0], stream[:6])
  np.testing.assert_array_equal(batch['target_ids'][0], stream[1:7])
  assert batch['target_weights'].sum() == len(stream) - 1
  assert pretrain_data.pack_rows([], 6, 0) == []


# ---------------------------------------------------------------------------------------------------------------
# The sharded step.

def synthetic_config(**overrides):
  config = trainer.trainer_config(num_train_steps=3, global_batch_size=16, log_every=1, eval_every=0,
                                  num_eval_batches=0, checkpoint_every=0, progress_bar=False, seed=3)
  config.model = gpt_model.model_config(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                        intermediate_size=64, max_position_embeddings=16, layout='gpt2')
  config.data = pretrain_data.data_config(max_seq_length=16)
  config.optim = optim.optim_config(learning_rate=1e-3, warmup_steps=2, weight_decay=0.01)
  config.update(dtype='float32', remat=False, **overrides)
  return config


def synthetic_loader(config):
  """The real StepLoader and batch function over 64 random rows (a few shorter than full)."""
  rng = np.random.default_rng(0)
  records = [{'tokens': rng.integers(0, 97, size=17 if i % 5 else 9)} for i in range(64)]
  batch_fn = lambda rows, keys, epoch: pretrain_data.rows_to_batch([r['tokens'] for r in rows], 16)
  return StepLoader(records, batch_fn, config.global_batch_size, seed=1)


def train_params(config, mesh=None):
  state, history = trainer.train(config, objective.make_objective(config), synthetic_loader(config), mesh=mesh)
  return jax.device_get(state.params), history


def test_sharded_step_equals_single_device():
  """data, fsdp and tensor parallel at once (the trainer's own tests cover the other layouts)."""
  assert jax.device_count() == 8
  layout = dict(data=2, fsdp=2, tensor=2)
  config = synthetic_config()
  mesh = sharding.make_mesh(config.mesh, devices=jax.devices()[:1])
  ref_params, ref_history = train_params(config, mesh)
  config.mesh.update(**layout)
  params, history = train_params(config)
  diff = max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
             for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)))
  assert diff < 2e-5, f'{layout}: params differ from one device by {diff}'
  for h, r in zip(history, ref_history):
    assert abs(h['loss'] - r['loss']) < 1e-5
  setup = trainer.build_setup(config, objective.make_objective(config))
  spec = setup.state_shardings.params['gpt']['layer_0']['qkv']['kernel'].spec
  assert tuple(spec) == ('fsdp', None, 'tensor', None)


# ---------------------------------------------------------------------------------------------------------------
# Runs on a slice of the embedded corpus.

def small_config(data, **overrides):
  config = tiny.get_config()
  config.model.update(hidden_size=32, num_attention_heads=2, intermediate_size=64, max_position_embeddings=32)
  config.data.update(vocab_size=500, max_seq_length=32, num_shards=2, num_workers=1)  # shards written in-process
  config.update(num_train_steps=STEPS, global_batch_size=8, log_every=1, eval_every=0, num_eval_batches=0,
                checkpoint_every=0, keep_checkpoints=2, progress_bar=False, export_hf=False,
                peak_flops_per_device=1e12)
  config.mesh.update(num_devices=1)  # sharded steps: test_sharded_step_equals_single_device
  config.optim.update(warmup_steps=2)
  data.apply(config)
  config.update(overrides)
  return config


@pytest.fixture(scope='module')
def data(tmp_path_factory):
  root = str(tmp_path_factory.mktemp('gpt_data'))
  train, valid = harness.shared_small_corpus(tmp_path_factory)  # built once per session, not once per module
  prepared = harness.Data(os.path.join(root, 'prepared'), train, valid)
  config = small_config(prepared)
  pretrain_data.prepare_pretraining_data(config.data, prepared.data_dir)
  return prepared


def test_pretrain_end_to_end(tmp_path, data, capsys):
  workdir = str(tmp_path / 'run')
  config = small_config(data, num_train_steps=100, num_eval_batches=2, export_hf=True, report_examples=2)
  config.model.update(hidden_size=64, intermediate_size=128)
  config.optim.update(warmup_steps=10, learning_rate=3e-3)
  _, history = pretrain.run(RECIPE, config, workdir)
  train = [h for h in history if 'loss' in h]
  first, last = np.mean([h['loss'] for h in train[:3]]), np.mean([h['loss'] for h in train[-10:]])
  assert abs(first - np.log(500)) < 0.3, first
  assert last < first - 0.7, f'loss did not fall: {first:.3f} -> {last:.3f}'
  final = [h for h in history if 'eval/perplexity' in h][-1]  # chance is 500
  assert final['eval/perplexity'] == pytest.approx(np.exp(final['eval/lm_loss'])) and final['eval/perplexity'] < 250
  assert os.path.exists(os.path.join(workdir, 'vocab.json')) and os.path.exists(os.path.join(workdir, 'merges.txt'))
  printed = capsys.readouterr().out
  assert 'next-token accuracy' in printed and printed.count('top 5:') == 2, printed[-2000:]

  transformers = pytest.importorskip('transformers')
  model, info = transformers.GPT2LMHeadModel.from_pretrained(os.path.join(workdir, 'hf'), output_loading_info=True)
  assert not info['missing_keys'] and not info['unexpected_keys']
  hf_tokenizer = transformers.GPT2Tokenizer.from_pretrained(os.path.join(workdir, 'hf'))
  cfg, params, tokenizer = generate.load_for_generation(workdir)
  assert hf_tokenizer.encode(' The value is returned.') == tokenizer.encode(' The value is returned.')
  prompt = np.asarray([tokenizer.encode(' The')])
  out = generate.generate(cfg, params, prompt, max_new_tokens=8, sampling=generate.Sampling(greedy=True))
  assert out.shape == (1, prompt.shape[1] + 8)

  # Continue from the exported directory (its architecture and BPE): one step at learning rate 0 (warmup starts
  # at 0) leaves the imported parameters as they were.
  continued_dir = str(tmp_path / 'continued')
  config = small_config(data, num_train_steps=1, init_from=os.path.join(workdir, 'hf'), data_dir='')
  config.model.update(vocab_size=0, hidden_size=32)  # replaced by the HF directory's
  config.optim.update(warmup_steps=1)
  pretrain.run(RECIPE, config, continued_dir)
  continued, continued_config = checkpoint.restore_params(continued_dir)
  assert continued_config.model.hidden_size == 64
  harness.assert_trees_equal(continued, export.load_hf_dir(os.path.join(workdir, 'hf'))[1], 'continued params')


def test_bad_config_refused_before_any_work(tmp_path, data):
  from common.config import ConfigError
  config = small_config(data)
  config.data.max_seq_length = 64
  with pytest.raises(ConfigError, match='config.data.max_seq_length'):
    pretrain.run(RECIPE, config, str(tmp_path / 'run'))
  config = small_config(data)
  config.model.layout = 'gpt3'
  with pytest.raises(ConfigError, match='config.model.layout'):
    pretrain.run(RECIPE, config, str(tmp_path / 'run'))
  assert not os.path.exists(tmp_path / 'run' / 'checkpoints')


def entry_point_argv(workdir, data, record, step_delay=0.0):
  """The real `python -m gpt_jax.pretrain` under the batch-recording driver, the tiny shapes of `small_config` with
  one layer (each of the test's three processes compiles its train step; the resume checks do not need depth)."""
  overrides = ['--config.model.hidden_size=32', '--config.model.num_hidden_layers=1',
               '--config.model.num_attention_heads=2',
               '--config.model.intermediate_size=64', '--config.model.max_position_embeddings=32',
               '--config.data.vocab_size=500', '--config.data.max_seq_length=32', '--config.data.num_shards=2',
               f'--config.num_train_steps={STEPS}', '--config.global_batch_size=8', '--config.log_every=1',
               '--config.eval_every=0', '--config.num_eval_batches=0', '--config.checkpoint_every=0',
               '--config.progress_bar=False', '--config.export_hf=False', '--config.peak_flops_per_device=1e12',
               '--config.optim.warmup_steps=2', '--config.mesh.data=1', '--config.mesh.fsdp=2']
  argv = [sys.executable, harness.DRIVER, '--record', record]
  if step_delay:
    argv += ['--step_delay', str(step_delay)]
  return argv + ['--', 'gpt_jax.pretrain', '--config=gpt_jax/configs/tiny.py', f'--workdir={workdir}',
                 *data.flags(), *overrides]


def test_sigterm_checkpoints_and_resume_is_exact(tmp_path, data):
  env = harness.child_env(str(tmp_path / 'jax_cache'), devices=2)
  straight_dir, straight_record = str(tmp_path / 'straight'), str(tmp_path / 'straight.jsonl')
  returncode, output = harness.run_to_end(entry_point_argv(straight_dir, data, straight_record), env,
                                          str(tmp_path / 'straight.log'))
  assert returncode == 0, output[-3000:]

  workdir, record = str(tmp_path / 'run'), str(tmp_path / 'batches.jsonl')
  run = harness.Run(entry_point_argv(workdir, data, record, step_delay=0.25), env, str(tmp_path / 'preempted.log'))
  try:
    harness.wait_for_step(run, workdir, 3, timeout=150)
    run.signal(signal.SIGTERM)
    returncode = run.wait(60)
  finally:
    run.cleanup()
  assert returncode == 0 and 'preemption notice' in run.output(), run.output()[-3000:]
  k = len(harness.read_records(record))
  assert 3 <= k < STEPS and harness.checkpoint_steps(workdir) == [k]

  returncode, output = harness.run_to_end(entry_point_argv(workdir, data, record), env, str(tmp_path / 'resumed.log'))
  assert returncode == 0 and f'resumed from step {k}' in output, output[-3000:]
  assert harness.read_records(record) == harness.read_records(straight_record)
  harness.assert_trees_equal(harness.restore_state(workdir), harness.restore_state(straight_dir), 'GPT state')
