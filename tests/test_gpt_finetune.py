"""GPT-1 fine-tuning (`gpt_jax.heads`, `gpt_jax.finetune_data`, `gpt_jax.tasks`) through the shared runner.

Pieces: the input transformations, the similarity and multiple-choice heads' symmetries, the task tokens appended
to a pretrained vocabulary. Through `common.finetune` (the entry point `gpt_jax.finetune.run`), from a tiny exported
HF GPT directory (random weights, 2 layers, hidden 64; a byte-level BPE trained on the test texts): the generated
learnable task reaches >= 95 % dev accuracy with the auxiliary LM loss (λ = 0.5); MRPC (pairs in both orders),
STS-B (regression) and SWAG (multiple choice) from the hand-made files in `data/tasks` run end to end and write
metrics.json; λ = 0.5 adds exactly 0.5 x the LM term to the λ = 0 loss; feature extraction reads the blocks.
"""
import json
import os

import jax
import numpy as np
import pytest
from flax import linen as nn

from common import extract, finetune, finetune_head, tasks
from gpt_jax import export, finetune_data, heads
from gpt_jax import finetune as gpt_finetune
from gpt_jax import model as gpt_model
from gpt_jax import tasks as gpt_tasks
from gpt_jax import tokenizer as gpt_tokenizer

VOCAB = 50
IDS = heads.task_token_ids(VOCAB)  # start 50, delimiter 51, extract 52


def config():
  return gpt_model.model_config(vocab_size=VOCAB + 3, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=64, max_position_embeddings=16, layout='gpt1',
                                hidden_dropout_prob=0.0, embedding_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def test_transformations():
  assert heads.transform([[1, 2, 3]], IDS, 8) == [50, 1, 2, 3, 52]
  assert heads.transform([[1, 2, 3, 4, 5], [6, 7]], IDS, 8) == [50, 1, 2, 3, 51, 6, 7, 52]  # longest shortened
  assert heads.example_sequences('similarity', [[1], [2]], IDS, 8) == [[50, 1, 51, 2, 52], [50, 2, 51, 1, 52]]
  assert heads.example_sequences('multiple_choice', [[1], [2], [3]], IDS, 8) == [[50, 1, 51, 2, 52],
                                                                               [50, 1, 51, 3, 52]]
  batch = heads.batch_of_examples('classification', [[[1, 2]], [[3]]], IDS, 6)
  np.testing.assert_array_equal(batch['extract_index'], [[3], [2]])
  assert batch['input_ids'][1, 0, 2] == 52 and batch['input_mask'].sum() == 7


def apply_head(kind, examples, num_labels=2):
  cfg = config()
  head = heads.GPTForTask(cfg, kind, num_labels)
  batch = heads.batch_of_examples(kind, examples, IDS, 12)
  inputs = batch['input_ids'], np.zeros_like(batch['input_ids']), batch['input_mask']
  variables = jax.jit(head.init)(jax.random.PRNGKey(0), *inputs)
  return jax.jit(head.apply)(variables, *inputs)


def test_similarity_ignores_order_and_choices_are_scored_one_by_one():
  a, b = [1, 2, 3], [4, 5]
  ab, ba = apply_head('similarity', [[a, b]], 1), apply_head('similarity', [[b, a]], 1)
  np.testing.assert_array_equal(ab, ba)
  forward = apply_head('multiple_choice', [[[9, 8], [1], [2, 3], [4]]])
  backward = apply_head('multiple_choice', [[[9, 8], [4], [2, 3], [1]]])
  assert forward.shape == (1, 3)
  np.testing.assert_allclose(forward[0, ::-1], backward[0], atol=1e-6)


def test_task_tokens_extend_a_pretrained_vocabulary():
  cfg = config()
  cfg.vocab_size = VOCAB
  params = export.init_params(cfg, jax.random.PRNGKey(0))
  new_cfg, new_params = heads.add_task_tokens(cfg, params, jax.random.PRNGKey(1))
  assert new_cfg.vocab_size == VOCAB + 3 and cfg.vocab_size == VOCAB
  ids = np.arange(12)[None]
  old, new = export.lm_logits(cfg, params, ids), export.lm_logits(new_cfg, new_params, ids)
  np.testing.assert_array_equal(np.asarray(old), np.asarray(new)[..., :VOCAB])


TASK_DATA = os.path.join(os.path.dirname(__file__), 'data', 'tasks')
SEQ = 32


def _texts():
  texts = [e.text_a for e in tasks.make_learnable_task(400, seed=0, max_words=12)]
  texts += [e.text_a + ' ' + e.text_b for e in tasks.read_task('mrpc', os.path.join(TASK_DATA, 'glue', 'MRPC'),
                                                               'train')]
  texts += [' '.join([e.context, e.question, *e.endings]) for e in
            tasks.read_task('swag', os.path.join(TASK_DATA, 'swag'), 'train')]
  return texts + ['pineapple'] * 50


@pytest.fixture(scope='module')
def gpt_init(tmp_path_factory):
  """An HF GPT directory (random tiny weights + a byte-level BPE of the test texts) exported by the project."""
  out = tmp_path_factory.mktemp('gpt_init')
  corpus = out / 'text.txt'
  corpus.write_text('\n'.join(_texts()))
  vocab_file = gpt_tokenizer.train_bpe([str(corpus)], 400, str(out / 'tok'))
  cfg = gpt_model.model_config(vocab_size=gpt_tokenizer.load_tokenizer(vocab_file).vocab_size, hidden_size=64,
                               num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
                               max_position_embeddings=64)
  export.save_hf_dir(str(out / 'hf'), cfg, export.init_params(cfg, jax.random.PRNGKey(0)), vocab_file)
  return str(out / 'hf')


def _config(**overrides):
  config = finetune.finetune_config(global_batch_size=32, max_seq_length=SEQ, eval_batch_size=64, log_every=50,
                                    learning_rate=1e-3, warmup_proportion=0.1, epochs=1.0, dropout=0.0,
                                    num_train_examples=64, num_eval_examples=64, learnable_max_words=12,
                                    async_checkpoint=False, peak_flops_per_device=1e12, length_buckets=1,
                                    lm_coef=0.5)
  config.mesh.update(num_devices=1)
  config.update(overrides)
  return config


def test_load_init_appends_the_task_tokens(gpt_init):
  model_cfg, encoder, tokenizer = gpt_finetune.load_init(gpt_init)
  vocab = model_cfg.vocab_size - 3
  assert tokenizer.task_ids == heads.task_token_ids(vocab)
  assert encoder['token_embeddings']['embedding'].shape[0] == vocab + 3
  features = finetune_data.convert_pair_examples([tasks.PairExample('a', 'one two', 'three', 1)], tokenizer, 16)
  row = features['input_ids'][0, 0, :int(features['input_mask'].sum())].tolist()
  assert row[0] == vocab and row[-1] == vocab + 2 and row.count(vocab + 1) == 1
  assert tokenizer.convert_ids_to_tokens([vocab, vocab + 2]) == ['<|start|>', '<|extract|>']


@pytest.mark.slow
def test_learnable_task_reaches_95_percent_through_the_runner(gpt_init):
  """1024 training / 256 dev examples, batch 32, 4 epochs = 128 steps, lr 2e-3 (the LM term competes with the task
  for a random network: λ = 0 learns it at 1e-3 in 128 steps)."""
  config = _config(num_train_examples=1024, num_eval_examples=256, epochs=4.0, learning_rate=2e-3)
  result = gpt_finetune.run(config, 'learnable', gpt_init, None)
  run = result['runs'][0]
  assert run['steps'] == 128
  assert result['metrics']['accuracy']['mean'] >= 0.95, result['metrics']
  last = [h for h in run['history'] if 'auxiliary_loss' in h][-1]
  assert last['auxiliary_loss'] < np.log(400) - 0.5, last  # the LM term learnt the inputs


@pytest.mark.parametrize('task, sub, metrics', [('glue/mrpc', 'glue/MRPC', {'accuracy', 'f1'}),
                                                ('glue/stsb', 'stsb', {'pearson', 'spearman'}),
                                                ('swag', 'swag', {'accuracy'})])
def test_pair_and_multiple_choice_tasks_end_to_end(task, sub, metrics, gpt_init, tmp_path):
  config = _config(global_batch_size=8, eval_batch_size=8, epochs=1.0, seeds=[0])
  result = gpt_finetune.run(config, task, gpt_init, str(tmp_path), os.path.join(TASK_DATA, sub))
  assert set(result['metrics']) >= metrics, result['metrics']
  assert all(np.isfinite(result['metrics'][m]['mean']) for m in metrics)
  assert np.isfinite([h for h in result['runs'][0]['history'] if 'auxiliary_loss' in h][-1]['auxiliary_loss'])
  with open(tmp_path / 'metrics.json') as f:
    assert set(json.load(f)['metrics']) == set(result['metrics'])
  assert os.path.exists(tmp_path / 'seed_0' / 'predictions.json')


def test_a_regression_head_starts_at_the_mean_training_label(gpt_init):
  """STS-B's score starts at the mean training label (`config.regression_bias`, default 'label_mean'), at 0 with
  'zero' (as BERT's and XLNet's heads, `test_finetune.py`)."""
  from tests.drivers.initial_params import initial_output_bias  # pylint: disable=import-outside-toplevel
  stsb = os.path.join(TASK_DATA, 'stsb')
  mean = np.mean([e.label for e in tasks.read_task('stsb', stsb, 'train')])
  bias = lambda **kw: initial_output_bias(gpt_tasks.ADAPTER, gpt_finetune.load_init, gpt_init, 'glue/stsb', stsb,
                                          _config(**kw))
  np.testing.assert_allclose(bias(), [mean], rtol=1e-6)
  np.testing.assert_array_equal(bias(regression_bias='zero'), [0.0])


def test_similarity_tasks_read_both_orders_and_squad_is_refused(gpt_init):
  _, _, tokenizer = gpt_finetune.load_init(gpt_init)
  examples = [tasks.PairExample('a', 'one two', 'three', 1)]
  both = finetune_data.convert_examples('mrpc', examples, tokenizer, 16)
  assert both['input_ids'].shape == (1, 2, 16)
  one = finetune_data.convert_examples('rte', examples, tokenizer, 16)
  np.testing.assert_array_equal(one['input_ids'][0, 0], both['input_ids'][0, 0])
  with pytest.raises(ValueError, match='SQuAD'):
    finetune_data.convert_examples('squad_v1.1', [], tokenizer, 16)


def test_lm_coef_adds_the_lm_term_to_the_task_loss(gpt_init):
  model_cfg, encoder, tokenizer = gpt_finetune.load_init(gpt_init)
  examples = tasks.make_learnable_task(8, seed=0, max_words=12)
  features = finetune_data.convert_examples('learnable', examples, tokenizer, SEQ)
  batch = finetune.batch_features('classification', features)
  losses = {}
  for lm_coef in (0.0, 0.5):
    head = gpt_tasks.adapter(lm_coef).make_head(model_cfg, 'classification', 2)
    objective = finetune_head.make_objective(head, 'classification', batch, 1.0, SEQ)
    init = lambda rng, o=objective: nn.meta.unbox(o.init_variables(rng))['params']  # noqa: E731
    # The task layer's fresh values, jitted without the encoder's initialisers (the pretrained encoder replaces
    # them, as in `common.finetune.run_task`): executing the whole random init op by op took most of the test.
    task_layer = jax.jit(lambda rng, init=init: {k: v for k, v in init(rng).items() if k != 'gpt'})
    fresh = dict(task_layer(jax.random.PRNGKey(0)), gpt=jax.eval_shape(init, jax.random.PRNGKey(0))['gpt'])
    params = finetune_head.graft_encoder(fresh, encoder, 'gpt')
    loss_fn = jax.jit(objective.loss_fn, static_argnums=5)  # one program, not the forward op by op
    loss, (sums, _) = loss_fn(params, batch, jax.random.PRNGKey(1), {}, objective.normalizers(batch), False)
    losses[lm_coef] = float(loss), objective.finalize(sums, objective.normalizers(batch))
  (without, metrics0), (with_lm, metrics) = losses[0.0], losses[0.5]
  assert 'auxiliary_loss' not in metrics0
  np.testing.assert_allclose(with_lm - without, 0.5 * float(metrics['auxiliary_loss']), rtol=1e-5)
  assert float(metrics['auxiliary_loss']) > 1.0


def test_feature_extraction_reads_every_block(gpt_init):
  encoder = gpt_tasks.load_encoder(gpt_init)
  [(index, tokens, hidden)] = list(extract.extract(encoder, [(0, tasks.PairExample('0', 'one two', None, None))],
                                                   [-1, 0], max_seq_length=16, batch_size=2))
  assert index == 0 and tokens[0] == '<|start|>' and tokens[-1] == '<|extract|>'
  assert hidden[-1].shape == (len(tokens), 64) and not np.allclose(hidden[-1], hidden[0])

