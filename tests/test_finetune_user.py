"""Fine-tuning as a user meets it: the command line, a preemption notice, model directories, subsets, random
init, per-batch length buckets and the reporting around a run.

* `--config.seeds` in every documented form ('[0,1,2]', '0,1,2', '(1,2)', one int) and `--config.seed` alone.
* The entry point under SIGTERM (`python -m bert_jax.finetune` under `tests/drivers/recorded_run.py`, two seeds
  given as `--config.seeds='[0,1]'`, `--init=none --model_from=` a directory with only `tokenizer.json`): it stops
  during seed 0 with the step reached checkpointed, exits 0, prints that the run is partial and writes no
  metrics.json; the same command resumes, trains seed 1 too, and both seeds' train states are bitwise equal to an
  uninterrupted run's, having trained on the same batches; the weights are random (not the directory's) and the
  metrics.json of two seeds is strict JSON.
* A `tokenizer.json`-only BERT directory gives the same tokenizer as its `vocab.txt`.
* `num_train_examples` cuts a GLUE task read from files (and is refused when negative).
* Length buckets: a batch cut to its bucket gives the full-padding loss within float32 rounding (BERT pads right,
  XLNet left); a run with buckets logs the full-padding run's losses within 1e-5 and compiles at most one train
  step per bucket; tagging, multiple choice and both SQuAD heads keep their loss on a cut batch too;
  `group_by_length` batches rows of similar length yet takes every row once an epoch.
* One seed prints no spread and writes `"std": null` (strict JSON); an MFU above 1 is never written.

Tiny one-layer models (hidden 64, sequence 32) built here; CPU: one or two of the 8 fake devices of `conftest.py`
in this process, 2 in the subprocesses.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import signal

import jax
import numpy as np
import pytest
from absl import flags
from flax import linen as nn
from ml_collections import config_flags

from bert_jax import export as bert_export
from bert_jax import finetune as bert_finetune
from bert_jax import model as bert_model
from bert_jax import tokenizer as bert_tokenizer
from common import finetune, finetune_loader, metrics, tasks, trainer
from common.config import UserError
from tests.drivers import harness
from xlnet_jax import export as xlnet_export
from xlnet_jax import finetune as xlnet_finetune
from xlnet_jax import model as xlnet_model
from xlnet_jax import tokenizer as xlnet_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASK_DATA = os.path.join(REPO, 'tests', 'data', 'tasks')
SST2 = os.path.join(TASK_DATA, 'glue', 'SST-2')
MRPC = os.path.join(TASK_DATA, 'glue', 'MRPC')
BERT_CONFIG = os.path.join(REPO, 'bert_jax', 'configs', 'finetune.py')
SEQ = 32


def _texts():
  texts = [e.text_a for e in tasks.read_task('sst2', SST2, 'train')]
  texts += [e.text_a + ' ' + e.text_b for e in tasks.read_task('mrpc', MRPC, 'train')]
  texts += [e.text_a + ' ' + e.text_b for e in tasks.read_task('mrpc', MRPC, 'dev')]
  texts += [e.text_a for e in tasks.read_task('sst2', SST2, 'dev')]
  return texts


@pytest.fixture(scope='module')
def bert_dirs(tmp_path_factory):
  """(an HF BERT directory with vocab.txt, the same directory with only tokenizer.json, model config, params)."""
  out = str(tmp_path_factory.mktemp('bert_vocab'))
  words = sorted({w for t in _texts() for w in bert_tokenizer.basic_tokenize(t)})
  vocab = bert_tokenizer.write_vocab(list(bert_tokenizer.SPECIAL_TOKENS) + words, os.path.join(out, 'vocab.txt'))
  cfg = bert_model.model_config(vocab_size=len(bert_tokenizer.read_vocab(vocab)), hidden_size=64,
                                num_hidden_layers=1, num_attention_heads=4, intermediate_size=128,
                                max_position_embeddings=64)
  params = bert_export.init_params(cfg, jax.random.PRNGKey(0))
  bert_export.save_hf_dir(out, cfg, params, vocab_file=vocab)
  json_only = str(tmp_path_factory.mktemp('bert_tokenizer_json'))
  for name in os.listdir(out):
    if name not in ('vocab.txt', 'tokenizer_config.json'):
      shutil.copy(os.path.join(out, name), json_only)
  tokens = bert_tokenizer.read_vocab(vocab)
  rust = bert_tokenizer._bert_pipeline({t: i for i, t in enumerate(tokens)}, True)  # pylint: disable=protected-access
  rust.save(os.path.join(json_only, 'tokenizer.json'))  # What `transformers` writes for a fast BERT tokenizer.
  return out, json_only, cfg, params


def _config(**overrides):
  config = finetune.finetune_config(global_batch_size=8, max_seq_length=SEQ, eval_batch_size=8, log_every=1,
                                    learning_rate=1e-3, warmup_proportion=0.1, epochs=1.0, dropout=0.0,
                                    async_checkpoint=False, peak_flops_per_device=1e12)
  config.mesh.update(num_devices=1)
  config.update(overrides)
  return config


# ---------------------------------------------------------------------------------------------------------------
# The command line.

@pytest.mark.parametrize('argv, seeds', [
    (["--config.seeds=[0,1,2]"], [0, 1, 2]),
    (['--config.seeds=0,1,2'], [0, 1, 2]),
    (['--config.seeds=(1,2)'], [1, 2]),
    (['--config.seeds=3'], [3]),
    (['--config.seed=5'], [5]),
    ([], [0]),
])
def test_seeds_from_the_command_line(argv, seeds):
  values = flags.FlagValues()
  argv = ['finetune', *argv]
  config_flags.DEFINE_config_file('config', BERT_CONFIG, flag_values=values, lock_config=False, sys_argv=argv)
  values(argv)
  assert finetune.run_seeds(values.config) == seeds


def test_repeated_seed_refused():
  with pytest.raises(ValueError, match='config.seeds'):
    finetune.run_seeds(_config(seeds=(1, 1)))


def test_tokenizer_json_only_directory_loads(bert_dirs):
  with_vocab, json_only, cfg, params = bert_dirs
  model_cfg, encoder, tokenizer = bert_finetune.load_init(json_only)
  _, _, reference = bert_finetune.load_init(with_vocab)
  assert tokenizer.id_to_token == reference.id_to_token and tokenizer.do_lower_case
  texts = _texts() + ['Unseen WORDS, accents: café!']
  assert tokenizer.encode_batch(texts) == reference.encode_batch(texts)
  assert model_cfg.hidden_size == cfg.hidden_size
  np.testing.assert_array_equal(encoder['embeddings']['word_embeddings']['embedding'],
                                params['bert']['embeddings']['word_embeddings']['embedding'])


def test_missing_vocabulary_refused_before_weights(tmp_path):
  with pytest.raises(FileNotFoundError, match='vocab.txt .or tokenizer.json. not found'):
    bert_finetune.load_init(str(tmp_path))  # No config.json either: the tokenizer is checked first.


def test_num_train_examples_cuts_a_glue_task_from_files():
  every = finetune.load_examples('glue/sst2', 'train', SST2, _config())
  assert len(every) == 3  # The fourth row is not UTF-8: skipped.
  two = finetune.load_examples('glue/sst2', 'train', SST2, _config(num_train_examples=2))
  assert [e.guid for e in two] == [e.guid for e in every[:2]]
  one = finetune.load_examples('glue/sst2', 'dev', SST2, _config(num_eval_examples=1))
  assert len(one) == 1
  with pytest.raises(ValueError, match='config.num_train_examples'):
    finetune.load_examples('glue/sst2', 'train', SST2, _config(num_train_examples=-1))


# ---------------------------------------------------------------------------------------------------------------
# SIGTERM through the entry point, resume, random init, two seeds from the command line.

def _argv(workdir, model_from, record, step_delay=0.0):
  argv = [os.path.join(REPO, 'tests', 'drivers', 'recorded_run.py'), '--record', record]
  if step_delay:
    argv += ['--step_delay', str(step_delay)]
  import sys  # pylint: disable=import-outside-toplevel
  return [sys.executable, *argv, '--', 'bert_jax.finetune', '--task=glue/sst2', '--init=none',
          f'--model_from={model_from}', f'--workdir={workdir}', f'--data_dir={SST2}', "--config.seeds=[0,1]",
          f'--config.max_seq_length={SEQ}', '--config.global_batch_size=2', '--config.eval_batch_size=2',
          '--config.epochs=8', '--config.learning_rate=1e-3', '--config.log_every=1',
          '--config.async_checkpoint=False', '--config.peak_flops_per_device=1e12', '--config.mesh.data=2']


def _seed_steps(record):
  """[(seed run index, step)] of the recorded batches: a new seed starts where the step goes back to 0."""
  out, run = [], -1
  for r in harness.read_records(record):
    run += r['step'] == 0
    out.append((run, r['step']))
  return out


def test_sigterm_mid_finetuning_checkpoints_exits_0_and_resumes_exactly(bert_dirs, tmp_path_factory):
  _, json_only, _, params = bert_dirs
  root = tmp_path_factory.mktemp('sigterm')
  env = harness.child_env(str(root / 'jax_cache'), devices=2)
  steps = 12  # 3 usable rows, batch 2, 8 epochs

  straight, straight_record = str(root / 'straight'), str(root / 'straight.jsonl')
  returncode, output = harness.run_to_end(_argv(straight, json_only, straight_record), env, str(root / 's.log'))
  assert returncode == 0, output[-3000:]
  assert 'accuracy: ' in output and '(2 seeds)' in output, output[-2000:]
  with open(os.path.join(straight, 'metrics.json')) as f:
    summary = json.loads(f.read(), parse_constant=lambda c: pytest.fail(f'metrics.json holds {c}'))
  assert [r['seed'] for r in summary['runs']] == [0, 1]
  assert _seed_steps(straight_record) == [(s, i) for s in (0, 1) for i in range(steps)]

  workdir, record = str(root / 'run'), str(root / 'run.jsonl')
  run = harness.Run(_argv(workdir, json_only, record, step_delay=0.3), env, str(root / 'preempted.log'))
  try:
    harness.wait_for_step(run, os.path.join(workdir, 'seed_0'), 3, timeout=150)
    run.signal(signal.SIGTERM)
    returncode = run.wait(60)
  finally:
    run.cleanup()
  output = run.output()
  assert returncode == 0, output[-3000:]
  reached = len(harness.read_records(record))
  assert 3 <= reached < steps - 2, reached  # At most two steps after the notice (it came at step >= 3).
  assert f'partial run: seed 0 stopped at step {reached} of {steps}' in output, output[-2000:]
  assert not os.path.exists(os.path.join(workdir, 'metrics.json'))
  assert not os.path.exists(os.path.join(workdir, 'seed_0', 'predictions.json'))
  assert harness.checkpoint_steps(os.path.join(workdir, 'seed_0')) == [reached]

  returncode, output = harness.run_to_end(_argv(workdir, json_only, record), env, str(root / 'resumed.log'))
  assert returncode == 0, output[-3000:]
  assert f'resumed from step {reached}' in output
  assert harness.read_records(record) == harness.read_records(straight_record)
  for seed in (0, 1):
    state = harness.restore_state(os.path.join(workdir, f'seed_{seed}'))
    harness.assert_trees_equal(state, harness.restore_state(os.path.join(straight, f'seed_{seed}')), f'seed {seed}')
    assert int(state['step']) == steps
  assert os.path.exists(os.path.join(workdir, 'metrics.json'))
  # --init=none: the encoder started from random weights, not the directory's (12 small steps move them little).
  trained = harness.restore_state(os.path.join(workdir, 'seed_0'))['params']['bert']
  given = params['bert']['embeddings']['word_embeddings']['embedding']
  assert harness.max_abs_diff(trained['embeddings']['word_embeddings']['embedding'], given) > 0.01


def test_init_none_needs_model_from():
  with pytest.raises(UserError, match='--model_from'):
    finetune.resolve_init('none', None, bert_finetune.load_init)


# ---------------------------------------------------------------------------------------------------------------
# Length buckets.

def test_bucket_lengths():
  assert finetune.bucket_lengths(128, 4) == [32, 64, 96, 128]
  assert finetune.bucket_lengths(30, 4) == [8, 16, 24, 30]
  assert finetune.bucket_lengths(64, 1) == [64]


@pytest.fixture(scope='module')
def xlnet_dir(tmp_path_factory):
  out = str(tmp_path_factory.mktemp('xlnet_small'))
  corpus = os.path.join(out, 'text.txt')
  with open(corpus, 'w') as f:
    f.write('\n'.join(_texts() * 20))
  model = xlnet_tokenizer.train_sentencepiece([corpus], 120, os.path.join(out, 'sp'))
  cfg = xlnet_model.model_config(vocab_size=xlnet_tokenizer.load_tokenizer(model).vocab_size, d_model=64, n_layer=1,
                                 n_head=4, d_head=16, d_inner=128)
  xlnet_export.save_hf_dir(out, cfg, xlnet_export.init_params(cfg, jax.random.PRNGKey(0)), spiece_model=model)
  return out


@pytest.mark.parametrize('name', ['bert', 'xlnet'])
def test_bucketed_batch_gives_the_full_padding_loss(name, bert_dirs, xlnet_dir):
  module = {'bert': bert_finetune, 'xlnet': xlnet_finetune}[name]
  model_cfg, encoder, tokenizer = module.load_init(bert_dirs[0] if name == 'bert' else xlnet_dir)
  examples = [tasks.PairExample(f'g{i}', ' '.join(text.split()[:2 + i]), None, i % 2)
              for i, text in enumerate(_texts()[:4])]  # Short rows: 2-5 words.
  features = finetune.batch_features('classification', module.ADAPTER.convert('sst2', examples, tokenizer, SEQ))
  full = finetune.make_loader(features, 4, seed=0)
  bucketed = finetune.make_loader(features, 4, seed=0, buckets=[8, 16, 24])
  assert bucketed.side == ('right' if name == 'bert' else 'left')
  batch, cut = full.host_batch(0), bucketed.host_batch(0)
  length = cut['input_ids'].shape[1]
  assert length < SEQ and int(np.asarray(cut['input_mask']).sum()) == int(np.asarray(batch['input_mask']).sum())
  head = module.ADAPTER.make_head(model_cfg, 'classification', 2)
  objective = finetune.make_objective(head, 'classification', features, 1.0, SEQ)
  params = finetune.graft_encoder(
      jax.tree.map(np.asarray, jax.jit(lambda r: nn.meta.unbox(objective.init_variables(r))['params'])(
          jax.random.PRNGKey(0))), encoder, module.ADAPTER.encoder_key)
  losses = []
  for b in (batch, cut):
    loss, (sums, _) = jax.jit(objective.loss_fn, static_argnums=5)(params, b, jax.random.PRNGKey(1), {},
                                                                      objective.normalizers(b), False)
    losses.append(float(loss))
  assert np.isfinite(losses[0]) and abs(losses[0] - losses[1]) <= 1e-6 * abs(losses[0]), losses
  logits = [finetune.predict(head, params, features, 2, buckets=buckets) for buckets in (None, [8, 16, 24])]
  np.testing.assert_allclose(logits[1], logits[0], rtol=1e-5, atol=1e-6)
  folded = finetune.predict(head, params, features, 1, buckets=[8, 16, 24], min_bucket_batches=2)
  np.testing.assert_allclose(folded, logits[0], rtol=1e-5, atol=1e-6)


def test_fold_lengths_computes_a_rare_length_at_the_next_longer_one_in_use():
  lengths = [32] * 10 + [16] * 2 + [48] * 3
  assert finetune.fold_lengths(lengths, 8) == {16: 32, 32: 32, 48: 48}  # the longest in use stays
  assert finetune.fold_lengths(lengths, 0) == finetune.fold_lengths(lengths, 1) == {16: 16, 32: 32, 48: 48}
  # Rare lengths add up: 8 (once) and 16 (twice) reach 3 together and stay at 16.
  assert finetune.fold_lengths([8, 16, 16, 24] + [32] * 9, 3) == {8: 16, 16: 16, 24: 32, 32: 32}
  assert finetune.fold_lengths([8, 16], 100) == {8: 16, 16: 16}


def test_folded_loader_computes_each_step_at_its_folded_length(bert_dirs, varied_sst2):
  _, _, tokenizer = bert_finetune.load_init(bert_dirs[0])
  examples = finetune.load_examples('glue/sst2', 'train', varied_sst2, _config())
  features = finetune.batch_features('classification', bert_finetune.ADAPTER.convert('sst2', examples, tokenizer,
                                                                                     SEQ))
  steps = 16
  plain = finetune.make_loader(features, 2, seed=0, buckets=[8, 16, 24])
  before = [plain.length(s) for s in range(steps)]
  assert len(set(before)) > 1, before
  rare = before.count(min(before)) + 1  # the shortest length in use folds
  folded = finetune.make_loader(features, 2, seed=0, buckets=[8, 16, 24], steps=steps, min_bucket_batches=rare)
  mapping = finetune.fold_lengths(before, rare)
  assert [folded.length(s) for s in range(steps)] == [mapping[n] for n in before]
  assert len(set(mapping.values())) < len(set(before))  # a program fewer
  for s in range(steps):  # the same rows, only longer padding
    a, b = plain.host_batch(s), folded.host_batch(s)
    width = a['input_ids'].shape[1]
    np.testing.assert_array_equal(b['input_ids'][:, :width], a['input_ids'])
    assert not b['input_mask'][:, width:].any()
  with pytest.raises(UserError, match='min_bucket_batches'):
    finetune_loader.min_bucket_batches(_config(min_bucket_batches=-1))


# (model, task, data directory under tests/data/tasks, max_seq_length): every kind cut on its padding side.
KIND_CASES = [('bert', 'conll2003', 'conll2003', 32), ('bert', 'swag', 'swag', 64), ('bert', 'squad/v2.0', 'squad', 64),
              ('xlnet', 'conll2003', 'conll2003', 32), ('xlnet', 'squad/v2.0', 'squad', 96)]


@pytest.mark.parametrize('name, task, sub, seq', KIND_CASES)
def test_bucketed_batch_of_every_kind_gives_the_full_padding_loss(name, task, sub, seq, bert_dirs, xlnet_dir):
  """Token tagging (labels cut with the rows), multiple choice ([B, C, L] cut on L) and SQuAD (always cut on the
  right, so positions and cls_index stay valid; XLNet's beam head) give the full-padding loss on a cut batch."""
  module = {'bert': bert_finetune, 'xlnet': xlnet_finetune}[name]
  model_cfg, encoder, tokenizer = module.load_init(bert_dirs[0] if name == 'bert' else xlnet_dir)
  config = _config(max_seq_length=seq, doc_stride=16, max_query_length=16)
  kind = finetune.training_kind(task, config, module.ADAPTER)
  examples = finetune.load_examples(task, 'train', os.path.join(TASK_DATA, sub), config)
  features = finetune.batch_features(kind, finetune_loader.convert(
      module.ADAPTER, task, kind, examples, tokenizer, config, True)[0])
  full = finetune.make_loader(features, 1, seed=0)
  bucketed = finetune.make_loader(features, 1, seed=0, buckets=finetune.bucket_lengths(seq, 4))
  step = min(range(bucketed.steps_per_epoch), key=bucketed.length)
  batch, cut = full.host_batch(step), bucketed.host_batch(step)
  assert cut['input_ids'].shape[-1] < seq, bucketed.length(step)
  if kind.windows:  # SQuAD
    assert bucketed.side == 'right'
  head = module.ADAPTER.make_head(model_cfg, kind.name, finetune.num_labels(task), **kind.head_options(config))
  objective = finetune.make_objective(head, kind, features, 1.0, seq)
  params = finetune.graft_encoder(
      jax.tree.map(np.asarray, jax.jit(lambda r: nn.meta.unbox(objective.init_variables(r))['params'])(
          jax.random.PRNGKey(0))), encoder, module.ADAPTER.encoder_key)
  loss_fn = jax.jit(objective.loss_fn, static_argnums=5)
  losses = [float(loss_fn(params, b, jax.random.PRNGKey(1), {}, objective.normalizers(b), False)[0])
            for b in (batch, cut)]
  assert np.isfinite(losses[0]) and abs(losses[0] - losses[1]) <= 1e-5 * abs(losses[0]), losses


@pytest.fixture(scope='module')
def varied_sst2(tmp_path_factory):
  """An SST-2 directory of 32 rows, most of 2-5 words and every eighth of 20, so batches of 8 differ in length."""
  out = tmp_path_factory.mktemp('SST-2')
  words = ' '.join(_texts()).split()
  rows = [' '.join(words[i:i + (20 if i % 8 == 7 else 2 + i % 4)]) for i in range(32)]
  for split in ('train', 'dev'):
    with open(out / f'{split}.tsv', 'w') as f:
      f.write('sentence\tlabel\n' + ''.join(f'{row}\t{i % 2}\n' for i, row in enumerate(rows)))
  return str(out)


def test_bucketed_and_packed_runs_match_full_padding_and_compile_one_step_per_shape(bert_dirs, varied_sst2,
                                                                                   monkeypatch, tmp_path):
  """The same run at full padding, length-bucketed, and packed (`pack_examples`, `common.finetune_packing`): the
  same losses within float rounding, one compiled step per bucket in use, one when packed, and less padding
  computed each time. Also: the one-seed run (seed 3, with a workdir) writes strict JSON with `"std": null`."""
  model_cfg, encoder, tokenizer = bert_finetune.load_init(bert_dirs[0])
  compiled = []
  original = trainer.compile_train_step

  def recording(*args, **kwargs):
    run, jitted = original(*args, **kwargs)
    compiled.append(jitted)
    return run, jitted
  monkeypatch.setattr(trainer, 'compile_train_step', recording)
  results = {}
  for buckets, pack in ((1, False), (4, False), (1, True)):
    config = _config(length_buckets=buckets, epochs=3.0, seeds=(3,), min_bucket_batches=0, pack_examples=pack)
    config.mesh.update(data=2, num_devices=2)  # rows split 2 ways (8 ways would leave a packed batch 8 rows too)
    results[buckets, pack] = finetune.run_task(config, bert_finetune.ADAPTER, 'glue/sst2', tokenizer, model_cfg,
                                               encoder, str(tmp_path) if buckets == 4 else None, varied_sst2)
  full, cut, packed = (results[key]['runs'][0] for key in ((1, False), (4, False), (1, True)))
  def losses(run):  # the logged training steps (the history ends with the final evaluation)
    return [h['loss'] for h in run['history'] if 'loss' in h]
  for run in (cut, packed):
    np.testing.assert_allclose(losses(run), losses(full), rtol=1e-5, atol=0)
  assert compiled[0]._cache_size() == 1  # pylint: disable=protected-access
  assert 1 < compiled[1]._cache_size() <= len(cut['throughput']['buckets'])  # pylint: disable=protected-access
  assert compiled[1]._cache_size() == len(cut['throughput']['lengths'])  # pylint: disable=protected-access
  assert compiled[2]._cache_size() == 1  # pylint: disable=protected-access
  assert packed['throughput']['padding_computed'] < cut['throughput']['padding_computed']
  assert cut['throughput']['padding_computed'] < full['throughput']['padding_computed']
  assert all(h['real_tokens_per_sec'] > 0 for h in cut['history'] if 'loss' in h)
  with open(tmp_path / 'metrics.json') as f:
    summary = json.loads(f.read(), parse_constant=lambda c: pytest.fail(f'metrics.json holds {c}'))
  assert summary['metrics']['accuracy']['std'] is None and summary['runs'][0]['seed'] == 3
  assert summary['runs'][0]['throughput']['lengths'] == cut['throughput']['lengths']
  assert os.path.exists(tmp_path / 'seed_3' / 'predictions.json')


def test_group_by_length_keeps_every_row_once_an_epoch_and_pads_less(bert_dirs, varied_sst2):
  _, _, tokenizer = bert_finetune.load_init(bert_dirs[0])
  examples = tasks.read_task('sst2', varied_sst2, 'train')
  features = finetune.batch_features('classification', bert_finetune.ADAPTER.convert('sst2', examples, tokenizer, SEQ))
  plain = finetune.make_loader(features, 4, seed=3, buckets=[8, 16, 24])
  grouped = finetune.make_loader(features, 4, seed=3, buckets=[8, 16, 24], group=4)
  spe = plain.steps_per_epoch
  for epoch in (0, 1):
    steps = range(epoch * spe, (epoch + 1) * spe)
    rows = [np.sort(np.concatenate([loader.record_ids(s, slice(None)) for s in steps])) for loader in (plain, grouped)]
    np.testing.assert_array_equal(rows[0], rows[1])
    np.testing.assert_array_equal(rows[1], np.arange(len(examples)))
  padded = [sum(loader.length(s) for s in range(2 * spe)) for loader in (plain, grouped)]
  assert padded[1] <= 0.8 * padded[0], padded  # 192 vs 240 positions a row
  again = finetune.make_loader(features, 4, seed=3, buckets=[8, 16, 24], group=4)
  assert all(np.array_equal(again.host_batch(s)['input_ids'], grouped.host_batch(s)['input_ids']) for s in range(spe))


# ---------------------------------------------------------------------------------------------------------------
# Reporting.

def test_one_seed_prints_no_spread():
  one = {'mean': 0.5, 'std': float('nan'), 'values': [0.5]}  # As `task_metrics.summarize_seeds` gives it.
  assert finetune.format_metric('accuracy', one) == 'accuracy: 0.5000'
  assert finetune.format_metric('accuracy', {'mean': 0.5, 'std': None, 'values': [0.5]}) == 'accuracy: 0.5000'
  two = {'mean': 0.5, 'std': 0.1, 'values': [0.4, 0.6]}
  assert finetune.format_metric('f1', two) == 'f1: 0.5000 ± 0.1000 (2 seeds)'


def test_mfu_above_one_is_never_written(tmp_path):
  assert metrics.mfu(5e11, 1e12) == 0.5
  assert math.isnan(metrics.mfu(1.49e12, 1e12)) and math.isnan(metrics.mfu(1.0, 0.0))
  writer = metrics.MetricWriter(str(tmp_path), enabled=True)
  writer.write(1, {'loss': 1.0, 'mfu': 1.49}, prefix='train/')
  writer.write(2, {'loss': 1.0, 'mfu': 0.25}, prefix='train/')
  writer.write(3, {'loss': 1.0, 'mfu': float('nan')}, prefix='train/')
  writer.close()
  lines = metrics.read_jsonl(str(tmp_path / 'metrics.jsonl'))
  assert [line.get('train/mfu') for line in lines] == [None, 0.25, None]
  assert all(line['train/loss'] == 1.0 for line in lines)


def test_task_names_are_the_ones_the_command_line_takes(tmp_path):
  """A misspelt task is refused before any model is loaded, naming the closest spelling `--task` accepts; --help
  exits 0."""
  with pytest.raises(UserError, match="unknown task 'glue/mrcp' \\(did you mean 'glue/mrpc'\\?\\); known tasks: "):
    finetune.check_task('glue/mrcp')
  for name in finetune.task_names():
    assert finetune.check_task(name) == name
  assert {'glue/mrpc', 'squad/v1.1', 'squad/v2.0', 'race/high', 'conll2003', 'swag', 'learnable'} <= set(
      finetune.task_names())
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  env = harness.child_env(None, devices=1)
  base = [sys.executable, '-m', 'bert_jax.finetune', '--init', str(tmp_path / 'missing'), '--workdir',
          str(tmp_path / 'run')]
  result = subprocess.run(base + ['--task', 'glue/mrcp'], env=env, cwd=harness.REPO, capture_output=True,
                          text=True, timeout=120, check=False)
  lines = [line for line in result.stderr.splitlines() if line.strip()]
  assert result.returncode == 2 and len(lines) == 1 and "did you mean 'glue/mrpc'" in lines[0], result.stderr
  result = subprocess.run([sys.executable, '-m', 'bert_jax.finetune', '--help'], env=env, cwd=harness.REPO,
                          capture_output=True, text=True, timeout=120, check=False)
  assert result.returncode == 0 and '--task' in result.stdout, result.stderr[-2000:]
