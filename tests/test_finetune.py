"""Fine-tuning: heads, task objectives through the one trainer, prediction post-processing, the entry points.

Tiny models (hidden 64, 2 layers, sequence 32) on one of the 8 fake CPU devices. The learnable task: label =
whether the word 'pineapple' occurs in a 4-12 word corpus sentence (512 training / 256 dev examples, batch 32,
4 epochs = 64 steps, lr 1e-3 with 10 % warmup, no dropout); a randomly initialised encoder must reach >= 95 % dev
accuracy.
The vocabularies are built from the test texts (whole-word WordPiece for BERT, a 600-piece sentencepiece model for
XLNet) and exported with random weights as HF directories, which `--init` then imports.

End to end, every task kind on the hand-made files in `data/tasks` for both models (one-layer encoders with the
same vocabularies), a few steps each: MRPC (through the entry point), STS-B regression (`stsb/`: eight rows a
split; `glue/STS-B` holds a single dev row for the reader tests), CoNLL-2003, SWAG, RACE (no dev split: evaluated
on train), SQuAD v1.1 (no dev split) and v2.0 (`squad/train-v2.0.json` and `dev-v2.0.json`, answerable and
unanswerable questions). XLNet runs SQuAD v2.0 with its default beam head and v1.1 with `squad_head='simple'`;
both heads write predictions, n-best and null odds (`test_xlnet_squad.py` checks that the beam head learns). The
CPU's matmul peak is given in the config (`peak_flops_per_device`) so no run spends seconds measuring it.
"""
from __future__ import annotations

import collections
import json
import os
import re

import jax
import ml_collections
import numpy as np
import pytest
from flax import linen as nn

from bert_jax import export as bert_export
from bert_jax import finetune as bert_finetune
from bert_jax import model as bert_model
from bert_jax import tokenizer as bert_tokenizer
from common import checkpoint, finetune, finetune_eval, squad_predictions, tasks
from xlnet_jax import export as xlnet_export
from xlnet_jax import finetune as xlnet_finetune
from xlnet_jax import model as xlnet_model
from xlnet_jax import tokenizer as xlnet_tokenizer

TASK_DATA = os.path.join(os.path.dirname(__file__), 'data', 'tasks')
SEQ = 32


def _words(texts):
  counts = collections.Counter(w for t in texts for w in re.findall(r"\w+|[^\w\s]", t.lower()))
  return [w for w, _ in counts.most_common(600)]


def _task_texts():
  texts = [e.text_a for e in tasks.make_learnable_task(400, seed=0, max_words=12)]
  for name, sub in (('mrpc', 'glue/MRPC'),):
    texts += [e.text_a + ' ' + (e.text_b or '') for e in tasks.read_task(name, os.path.join(TASK_DATA, sub), 'train')]
  texts += [' '.join(e.words) for e in tasks.read_task('conll2003', os.path.join(TASK_DATA, 'conll2003'), 'train')]
  texts += [' '.join([e.context, e.question, *e.endings]) for e in
            tasks.read_task('swag', os.path.join(TASK_DATA, 'swag'), 'train')]
  for task in ('squad_v1.1', 'squad_v2.0'):
    texts += [e.context + ' ' + e.question for e in tasks.read_task(task, os.path.join(TASK_DATA, 'squad'), 'train')]
  texts += [e.text_a + ' ' + e.text_b for e in tasks.read_task('stsb', os.path.join(TASK_DATA, 'stsb'), 'train')]
  texts += [' '.join([e.context, e.question, *e.endings]) for e in
            tasks.read_task('race', os.path.join(TASK_DATA, 'race'), 'train')]
  return texts


@pytest.fixture(scope='module')
def texts():
  return _task_texts()


@pytest.fixture(scope='module')
def bert_init(texts, tmp_path_factory):
  """An HF BERT directory (random tiny weights + a word-level vocabulary) exported by the project."""
  out = str(tmp_path_factory.mktemp('bert_init'))
  vocab = bert_tokenizer.write_vocab(list(bert_tokenizer.SPECIAL_TOKENS) + ['pineapple'] +
                                     [w for w in _words(texts) if w != 'pineapple'], os.path.join(out, 'vocab.txt'))
  size = len(bert_tokenizer.read_vocab(vocab))
  cfg = bert_model.model_config(vocab_size=size, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=128, max_position_embeddings=64)
  params = bert_export.init_params(cfg, jax.random.PRNGKey(0))
  bert_export.save_hf_dir(out, cfg, params, vocab_file=vocab)
  return out, cfg, params


@pytest.fixture(scope='module')
def xlnet_init(texts, tmp_path_factory):
  """An HF XLNet directory (random tiny weights + a small sentencepiece model) exported by the project."""
  out = str(tmp_path_factory.mktemp('xlnet_init'))
  corpus = os.path.join(out, 'text.txt')
  with open(corpus, 'w') as f:
    f.write('\n'.join(texts * 3))
  model = xlnet_tokenizer.train_sentencepiece([corpus], 600, os.path.join(out, 'sp'))
  size = xlnet_tokenizer.load_tokenizer(model).vocab_size
  cfg = xlnet_model.model_config(vocab_size=size, d_model=64, n_layer=2, n_head=4, d_head=16, d_inner=128)
  params = xlnet_export.init_params(cfg, jax.random.PRNGKey(0))
  xlnet_export.save_hf_dir(out, cfg, params, spiece_model=model)
  return out, cfg, params


@pytest.fixture(scope='module')
def one_layer_inits(bert_init, xlnet_init, tmp_path_factory):
  """{model: an HF directory with the same vocabulary and a one-layer encoder (random weights)}: the end-to-end runs
  check the plumbing of every task, and one layer compiles in about half the time of two."""
  bert_dir, xlnet_dir = (str(tmp_path_factory.mktemp(name)) for name in ('bert_one_layer', 'xlnet_one_layer'))
  cfg = bert_model.model_config(**{**bert_init[1].to_dict(), 'num_hidden_layers': 1})
  bert_export.save_hf_dir(bert_dir, cfg, bert_export.init_params(cfg, jax.random.PRNGKey(1)),
                          vocab_file=os.path.join(bert_init[0], 'vocab.txt'))
  cfg = xlnet_model.model_config(**{**xlnet_init[1].to_dict(), 'n_layer': 1})
  xlnet_export.save_hf_dir(xlnet_dir, cfg, xlnet_export.init_params(cfg, jax.random.PRNGKey(1)),
                           spiece_model=os.path.join(xlnet_init[0], 'spiece.model'))
  return {'bert': bert_dir, 'xlnet': xlnet_dir}


def _config(**overrides):
  config = finetune.finetune_config(global_batch_size=32, max_seq_length=SEQ, eval_batch_size=64, log_every=1,
                                    learning_rate=1e-3, warmup_proportion=0.1, epochs=1.0, dropout=0.0,
                                    num_train_examples=64, num_eval_examples=64, learnable_max_words=12,
                                    doc_stride=8, max_query_length=8, async_checkpoint=False,
                                    peak_flops_per_device=1e12, length_buckets=1)
  config.mesh.update(num_devices=1)
  config.update(overrides)
  return config


MODELS = {'bert': bert_finetune, 'xlnet': xlnet_finetune}


@pytest.mark.slow
@pytest.mark.parametrize('name', ['bert', 'xlnet'])
def test_learnable_task_reaches_95_percent(name, bert_init, xlnet_init, tmp_path):
  """Also: dev evaluated with the task's metric every 16 steps, the best evaluation reported and its parameters
  written (`select_best`)."""
  init = {'bert': bert_init, 'xlnet': xlnet_init}[name][0]
  config = _config(num_train_examples=512, num_eval_examples=256, epochs=4.0, log_every=16, eval_every=16)
  model_cfg, _, tokenizer = MODELS[name].load_init(init)
  result = finetune.run_task(config, MODELS[name].ADAPTER, 'learnable', tokenizer, model_cfg, None,
                             str(tmp_path))
  run = result['runs'][0]
  assert run['steps'] == 64
  assert result['metrics']['accuracy']['mean'] >= 0.95, result['metrics']
  evals = {h['step']: h['eval/accuracy'] for h in run['history'] if 'eval/accuracy' in h}
  assert sorted(evals) == [16, 32, 48, 64], evals
  best = run['best']
  assert best['metric'] == 'accuracy' and best['value'] == max(evals.values()) == evals[best['step']]
  assert result['metrics']['accuracy']['mean'] == best['value']
  import orbax.checkpoint as ocp  # the selected parameters, as written
  with ocp.StandardCheckpointer() as reader:
    saved = reader.restore(str(tmp_path / f'seed_{run["seed"]}' / 'best'))
  assert MODELS[name].ADAPTER.encoder_key in saved and len(jax.tree.leaves(saved)) > 10
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(saved))


def _write_checkpoint_workdir(workdir, cfg, params, tokenizer_file, name):
  config = ml_collections.ConfigDict(dict(model=cfg.to_dict()))
  checkpoint.write_config(workdir, config)
  manager = checkpoint.make_manager(workdir, async_save=False)
  checkpoint.save(manager, 1, {'params': jax.tree.map(np.asarray, params)}, {'step': 1})
  manager.wait_until_finished()
  manager.close()
  import shutil
  shutil.copy(tokenizer_file, os.path.join(workdir, os.path.basename(tokenizer_file)))


@pytest.mark.parametrize('name', ['bert', 'xlnet'])
def test_hf_dir_and_checkpoint_give_the_same_first_loss(name, bert_init, xlnet_init, tmp_path):
  """`--init HF_DIR` and `--init WORKDIR` (a checkpoint of the same params) load the same encoder: the first
  training step's loss (with dropout, same rng) on the first MRPC batch is identical."""
  init, cfg, params = {'bert': bert_init, 'xlnet': xlnet_init}[name]
  tokenizer_file = os.path.join(init, 'vocab.txt' if name == 'bert' else 'spiece.model')
  workdir = str(tmp_path / 'pretrain')
  _write_checkpoint_workdir(workdir, cfg, params, tokenizer_file, name)
  module = MODELS[name]
  losses, compiled = [], {}
  for source in (init, workdir):
    model_cfg, encoder, tokenizer = module.load_init(source)
    examples = tasks.read_task('mrpc', os.path.join(TASK_DATA, 'glue', 'MRPC'), 'train')
    features = finetune.batch_features('classification',
                                       module.ADAPTER.convert('mrpc', examples, tokenizer, SEQ))
    key = json.dumps(model_cfg.to_dict(), sort_keys=True, default=str)
    if key not in compiled:  # Both sources give the same model: compile its init and loss once.
      head = module.ADAPTER.make_head(model_cfg, 'classification', 2)
      objective = finetune.make_objective(head, 'classification', features, 1.0, SEQ)
      compiled[key] = (objective, jax.jit(lambda r, o=objective: nn.meta.unbox(o.init_variables(r))['params']),
                       jax.jit(objective.loss_fn, static_argnums=5))
    objective, init_params, loss_fn = compiled[key]
    fresh = jax.tree.map(np.asarray, init_params(jax.random.PRNGKey(0)))
    start_params = finetune.graft_encoder(fresh, encoder, module.ADAPTER.encoder_key)
    batch = finetune.make_loader(features, 8, seed=0).host_batch(0)
    norms = objective.normalizers(batch)
    loss, _ = loss_fn(start_params, batch, jax.random.PRNGKey(1), {}, norms, True)
    losses.append(float(loss))
  assert np.isfinite(losses[0]) and losses[0] == pytest.approx(losses[1], rel=1e-6)


def test_squad_postprocessing_returns_the_span(bert_init):
  """Hand-set logits on a real converted window: the best valid span maps back to the answer's characters."""
  _, _, tokenizer = bert_finetune.load_init(bert_init[0])
  context = 'the quick fox jumped over the lazy dog near the river bank'
  example = tasks.SquadExample('q1', 'what did the fox jump over ?', context,
                               [{'text': 'the lazy dog', 'answer_start': context.index('the lazy dog')}])
  from bert_jax import finetune_data
  features, windows = finetune_data.convert_squad_examples([example], tokenizer, SEQ, doc_stride=8,
                                                           max_query_length=8)
  logits = np.zeros((len(windows), 2, SEQ), np.float32)
  for row in range(len(windows)):
    if not features['is_impossible'][row]:
      logits[row, 0, features['start_position'][row]] = 5.0
      logits[row, 1, features['end_position'][row]] = 5.0
  logits = np.where(features['p_mask'][:, None, :] > 0, -1e30, logits)
  answers, _ = squad_predictions.squad_predictions([example], windows, logits)
  assert answers == {'q1': 'the lazy dog'}
  metrics, _ = finetune_eval.compute_metrics('squad_v1.1', 'squad', logits, features, [example], windows)
  assert metrics['exact_match'] == 100.0


@pytest.mark.parametrize('task', ['glue/stsb', 'glue/mrpc'])
def test_benchmark_lockstep_is_hf_step_for_step(task, one_layer_inits, tmp_path):
  """`benchmarks/finetune.py --lockstep`: HF `BertForSequenceClassification` with torch AdamW, its linear schedule
  and `clip_grad_norm_`, trained on our loader's batches from our initial head, loses what we lose at every step
  (1e-5 relative) and predicts dev as we do (1e-4): loader, head, loss, clipping, AdamW and its decay mask, the
  schedule and the evaluation are one computation on both sides. A regression and a classification task
  (hand-made rows), lr 1e-3 so that six steps move the weights; both sides in this process."""
  from benchmarks import finetune as bench  # pylint: disable=import-outside-toplevel
  glue = os.path.join(TASK_DATA, 'stsb')
  if task == 'glue/mrpc':  # the STS-B pairs as paraphrase (score >= 3) or not, in MRPC's files
    glue = tmp_path / 'MRPC'
    glue.mkdir()
    for split in ('train', 'dev'):
      rows = [f'{int(e.label >= 3)}\t{i}\t{i}\t{e.text_a}\t{e.text_b}\n'
              for i, e in enumerate(tasks.read_task('stsb', os.path.join(TASK_DATA, 'stsb'), split))]
      (glue / f'{split}.tsv').write_text('Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n' + ''.join(rows))
  args = bench.parse_args(['--glue_dir', str(glue), '--task', task, '--rows', '8', '--steps', '6', '--batch', '4',
                           '--seq', str(SEQ), '--init', one_layer_inits['bert'], '--threads', '1', '--lockstep',
                           '--set', 'learning_rate=1e-3', '--set', 'mesh.num_devices=1',
                           '--set', 'peak_flops_per_device=1e12', '--out', str(tmp_path)])
  assert len(bench.read_rows(args)[0]) == 8
  config = bench.ours_config(args)
  assert (config.dropout, config.pack_examples, config.mesh.num_devices) == (0.0, False, 1)
  with open(tmp_path / 'recipe.json', 'w') as f:
    json.dump(bench.recipe(config), f)
  ours, hf = bench.run_ours(args), bench.run_hf(args)
  # Both sides start a regression head at the mean training label (config.regression_bias), a classifier at 0.
  labels = np.asarray([e.label for e in bench.read_rows(args)[0]], np.float32 if task == 'glue/stsb' else np.int64)
  start = np.load(tmp_path / 'lockstep.npz')['bias']
  hf_start = bench.hf_model(args.init, bench.recipe(config), labels).classifier.bias.detach().numpy()
  np.testing.assert_allclose(start, hf_start, rtol=1e-6)
  np.testing.assert_allclose(start, np.full_like(start, labels.mean() if task == 'glue/stsb' else 0.0), rtol=1e-6)
  assert len(ours['step_losses']) == len(hf['step_losses']) == 6
  np.testing.assert_allclose(ours['step_losses'], hf['step_losses'], rtol=1e-5)
  gap = np.abs(np.subtract(ours['step_losses'], hf['step_losses'])).max()
  assert np.ptp(ours['step_losses']) > 100 * gap, (ours['step_losses'], gap)  # far finer than a step's change
  np.testing.assert_allclose(ours['predictions'], hf['predictions'], rtol=1e-4, atol=1e-4)
  summary = bench.lockstep_summary(ours['step_losses'], hf['step_losses'])
  assert summary['steps'] == 6 and summary['first_step_over_1e_4_relative'] is None


@pytest.mark.parametrize('name', ['bert', 'xlnet'])
def test_a_regression_head_starts_at_the_mean_training_label(name, one_layer_inits):
  """`config.regression_bias` 'label_mean' (the default) starts STS-B's score at the mean training label, in the
  adapter's output layer (XLNet's is `logits`); 'zero' and a classification task keep the drawn bias, 0; any other
  value is refused before the data is read."""
  from bert_jax import tasks as bert_tasks  # pylint: disable=import-outside-toplevel
  from common.config import UserError  # pylint: disable=import-outside-toplevel
  from tests.drivers.initial_params import initial_output_bias  # pylint: disable=import-outside-toplevel
  from xlnet_jax import tasks as xlnet_tasks  # pylint: disable=import-outside-toplevel
  model = {'bert': bert_tasks, 'xlnet': xlnet_tasks}[name]
  stsb = os.path.join(TASK_DATA, 'stsb')
  mean = np.mean([e.label for e in tasks.read_task('stsb', stsb, 'train')])
  assert abs(mean) > 1.0  # far from the drawn bias
  bias = lambda task, data, **kw: initial_output_bias(model.ADAPTER, model.load_init, one_layer_inits[name], task,
                                                      os.path.join(TASK_DATA, data), _config(**kw))
  np.testing.assert_allclose(bias('glue/stsb', 'stsb'), [mean], rtol=1e-6)
  np.testing.assert_array_equal(bias('glue/stsb', 'stsb', regression_bias='zero'), [0.0])
  assert not np.any(bias('glue/mrpc', 'glue/MRPC'))
  with pytest.raises(UserError, match=r"config.regression_bias: must be one of \('label_mean', 'zero'\), got 'mean'"):
    MODELS[name].run(_config(regression_bias='mean'), 'glue/stsb', one_layer_inits[name], None,
                     os.path.join(TASK_DATA, 'no_such_directory'))
  with pytest.raises(ValueError, match="no output layer 'logits' with a bias"):  # an adapter naming the wrong layer
    finetune._with_output_bias({'classifier': {'bias': np.zeros(1)}}, {'logits': 2.5})  # pylint: disable=W0212


# (task, data directory, metrics that must be finite, config overrides by model).
CASES = [('glue/stsb', 'stsb', ('pearson', 'spearman'), {}),
         ('conll2003', 'conll2003', ('f1',), {}),
         ('swag', 'swag', ('accuracy',), {}),
         ('race', 'race', ('accuracy',), {}),
         ('squad/v1.1', 'squad', ('exact_match', 'f1'), {'xlnet': dict(squad_head='simple')}),
         ('squad/v2.0', 'squad', ('exact', 'f1', 'best_exact', 'best_f1', 'HasAns_exact', 'NoAns_exact'), {})]


@pytest.mark.slow
@pytest.mark.parametrize('name', ['bert', 'xlnet'])
def test_tasks_end_to_end(name, one_layer_inits, tmp_path):
  """Every task kind on the hand-made files, a few steps each (one-layer encoders); through the entry point, MRPC
  with a workdir (BERT with two seeds, the summary over seeds being model-agnostic) and SQuAD v2.0 with its files in
  a workdir."""
  init = one_layer_inits[name]
  module = MODELS[name]
  seeds = [0, 1] if name == 'bert' else [0]
  config = _config(global_batch_size=8, eval_batch_size=8, epochs=2.0, seeds=seeds, log_every=100)
  result = module.run(config, 'glue/mrpc', init, str(tmp_path / 'mrpc'), os.path.join(TASK_DATA, 'glue', 'MRPC'))
  assert set(result['metrics']) == {'accuracy', 'f1'}
  assert len(result['metrics']['accuracy']['values']) == len(seeds)
  assert os.path.exists(tmp_path / 'mrpc' / 'metrics.json')
  assert os.path.exists(tmp_path / 'mrpc' / f'seed_{seeds[-1]}' / 'predictions.json')
  with pytest.raises(ValueError, match='squad_head'):
    module.run(_config(squad_head='beam' if name == 'bert' else 'other'), 'squad/v2.0', init, None,
               os.path.join(TASK_DATA, 'squad'))
  for task, sub, expected, overrides in CASES:
    config = _config(global_batch_size=8, eval_batch_size=8, epochs=1.0, seeds=[0], log_every=100,
                     **overrides.get(name, {}))
    workdir = str(tmp_path / 'squad2') if task == 'squad/v2.0' else None
    result = module.run(config, task, init, workdir, os.path.join(TASK_DATA, sub))
    for metric in expected:
      assert np.isfinite(result['metrics'][metric]['mean']), (task, result['metrics'])
    run = result['runs'][0]
    trained = [h for h in run['history'] if 'loss' in h]
    assert np.isfinite(trained[-1]['loss'])
    # Without periodic evals the trainer runs the final evaluation itself (while the final checkpoint is written).
    assert run['history'][-1]['step'] == trained[-1]['step'] == run['steps']
    assert any(k.startswith('eval/') for k in run['history'][-1]), run['history'][-1]
    if task.startswith('squad'):
      answers, null_odds = run['predictions']['predictions.json'], run['predictions']['null_odds.json']
      assert set(answers) == set(null_odds) == set(run['predictions']['nbest_predictions.json'])
      assert all(np.isfinite(v) for v in null_odds.values())
  for file_name in ('predictions.json', 'nbest_predictions.json', 'null_odds.json'):
    with open(tmp_path / 'squad2' / 'seed_0' / file_name) as f:
      assert set(json.load(f)) == {'n1', 'n2'}


def test_xlnet_fine_tuning_reads_rows_left_to_right_after_a_bi_data_pretraining(monkeypatch):
  """`bi_data` (half of each pretraining batch reversed) is a pretraining layout: fine-tuning turns it off, with the
  memory, whatever the pretraining workdir's model config says (else an odd eval batch is refused)."""
  import ml_collections  # pylint: disable=import-outside-toplevel
  from common import model_adapter  # pylint: disable=import-outside-toplevel
  from xlnet_jax import tasks as xlnet_tasks  # pylint: disable=import-outside-toplevel
  pretrained = ml_collections.ConfigDict(dict(bi_data=True, mem_len=32, reuse_len=16))
  monkeypatch.setattr(model_adapter, 'load_init_dir',
                      lambda *args, **kwargs: (pretrained, {'transformer': {'w': 1}}, 'tokenizer'))
  model_cfg, params, tokenizer = xlnet_tasks.load_init('workdir')
  assert (model_cfg.bi_data, model_cfg.mem_len, model_cfg.reuse_len) == (False, 0, 0)
  assert params == {'w': 1} and tokenizer == 'tokenizer'
