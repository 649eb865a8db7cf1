"""The drawings: XLNet's factorisation order and stream masks (equal to the training sampler's), and training
curves from a metrics.jsonl."""
import json

import jax
import numpy as np
import pytest
from flax import linen as nn

from common import plots
from common.config import UserError
from xlnet_jax import permutation, visualize

pytest.importorskip('matplotlib')


def test_factorization_masks_are_the_samplers(tmp_path):
  sentence = 'the cat sat on the mat by the door'
  masks = visualize.visualize(sentence, str(tmp_path), targets=[1, 4, 6], seed=3)
  assert (tmp_path / 'factorization.png').stat().st_size > 10_000
  saved = np.load(tmp_path / 'masks.npz')
  is_target = np.zeros([9], bool)
  is_target[[1, 4, 6]] = True
  ref = permutation.sample_permutation(jax.random.key(3), is_target[None], np.zeros([1, 9], bool), num_predict=3,
                                       perm_size=None)
  np.testing.assert_array_equal(saved['query_mask'], np.asarray(ref['perm_mask'][0]))
  np.testing.assert_array_equal(saved['content_mask'], np.asarray(permutation.content_stream_mask(ref['perm_mask'])[0]))
  np.testing.assert_array_equal(saved['rank'], np.asarray(ref['rank'][0]))
  assert saved['tokens'].tolist() == sentence.split()
  # What the figure states: a target's query never sees itself, its content stream does; context sees no target.
  for t in (1, 4, 6):
    assert masks['query_mask'][t, t] == 1 and masks['content_mask'][t, t] == 0
  assert masks['content_mask'][0, [1, 4, 6]].tolist() == [1, 1, 1]


def test_visualize_refuses_bad_targets(tmp_path):
  with pytest.raises(UserError, match='outside the 3 tokens'):
    visualize.visualize('a b c', str(tmp_path), targets=[5])


def test_training_curves_from_metrics_jsonl(tmp_path):
  lines = [{'step': s, 'train/loss': 5.0 - s / 100, 'train/mlm_accuracy': s / 1000, 'train/learning_rate': 1e-3,
            'train/tokens_per_sec': 1000.0} for s in range(10, 110, 10)]
  lines.append({'step': 100, 'eval/loss': 4.2, 'eval/mlm_accuracy': 0.1})
  text = '\n'.join(json.dumps(x) for x in lines) + '\n{"step": 110, "train/lo'  # a line cut by a kill is skipped
  (tmp_path / 'metrics.jsonl').write_text(text)
  written = plots.plot_workdir(str(tmp_path))
  assert sorted(p.rsplit('/', 1)[-1] for p in written) == ['accuracy.png', 'learning_rate.png', 'loss.png',
                                                           'throughput.png']
  series = plots.read_series(str(tmp_path / 'metrics.jsonl'))
  assert series['eval/loss'] == [(100, 4.2)] and len(series['train/loss']) == 10
  with pytest.raises(UserError, match='no such file'):
    plots.plot_workdir(str(tmp_path / 'missing'))


# ----------------------------------------------------------------------------------------------------------------------
# Attention maps: the probabilities the models' own attention computes (sown), on tiny random models.
# ----------------------------------------------------------------------------------------------------------------------

LENGTH, REAL = 10, 7  # Padded length and real tokens of the attention rows.


def _tiny(name):
  """(model config, params, input_ids, input_mask) of a tiny random model; the padding sits where the model's
  layout puts it (right for BERT and GPT, left for XLNet)."""
  ids = np.random.default_rng(0).integers(5, 40, size=[2, LENGTH]).astype(np.int32)
  mask = np.zeros([2, LENGTH], np.int32)
  if name == 'xlnet':
    from xlnet_jax import model as xlnet_model
    cfg = xlnet_model.model_config(vocab_size=40, d_model=16, n_layer=2, n_head=2, d_head=8, d_inner=32)
    module, mask[:, LENGTH - REAL:] = xlnet_model.XLNetModel(cfg), 1
  elif name == 'gpt':
    from gpt_jax import model as gpt_model
    cfg = gpt_model.model_config(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                 intermediate_size=32, max_position_embeddings=LENGTH)
    module, mask[:, :REAL] = gpt_model.GPTModel(cfg), 1
  else:
    from bert_jax import model as bert_model
    cfg = bert_model.model_config(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=LENGTH)
    module, mask[:, :REAL] = bert_model.BertModel(cfg), 1
  args = (ids,) if name == 'gpt' else (ids, np.zeros_like(ids), mask)
  params = nn.meta.unbox(module.init(jax.random.key(1), *args, deterministic=True)['params'])
  return cfg, params, ids, mask


@pytest.mark.parametrize('name', ['bert', 'xlnet', 'gpt'])
def test_attention_probs_are_the_models(name, tmp_path):
  cfg, params, ids, mask = _tiny(name)
  probs = visualize.attention_probs(name, cfg, params, ids, input_mask=mask)
  assert probs.shape == (2, 2, 2, LENGTH, LENGTH)  # layers, batch, heads, query, key
  np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)
  if name == 'gpt':  # Causal: nothing above the diagonal, exactly.
    assert np.all(probs[..., np.triu_indices(LENGTH, 1)[0], np.triu_indices(LENGTH, 1)[1]] == 0.0)
  else:  # A real query gives padding keys exactly nothing and every real key something. (XLNet's padding queries
    # keep their own position, as the original's content mask does; they are cropped from the figures.)
    real, keys = probs[:, :, :, np.flatnonzero(mask[0])], mask[0].astype(bool)  # Both rows share the mask.
    assert np.all(real[..., ~keys] == 0.0) and np.all(real[..., keys] > 0.0)
  # The figures: one a layer; the saved probabilities are the ones returned.
  maps = {'probs': probs[:, 0], 'positions': np.flatnonzero(mask[0]), 'tokens': np.asarray([f't{i}' for i in
                                                                                           range(REAL)])}
  written = visualize.draw_attention(maps, str(tmp_path), title=name)
  assert [p.rsplit('/', 1)[-1] for p in written] == ['attention_layer_0.png', 'attention_layer_1.png']
  assert all((tmp_path / p.rsplit('/', 1)[-1]).stat().st_size > 5_000 for p in written)
  np.testing.assert_array_equal(np.load(tmp_path / 'attention.npz')['probs'], probs[:, 0])


def test_bert_layer_0_attention_by_hand():
  """softmax(QK^T / sqrt(head_dim)) from layer 0's own query/key parameters and the embedding output."""
  from bert_jax import model as bert_model
  cfg, params, ids, mask = _tiny('bert')
  probs = visualize.attention_probs('bert', cfg, params, ids, input_mask=mask)[0]
  _, state = bert_model.BertModel(cfg).apply({'params': params}, ids, np.zeros_like(ids), mask, deterministic=True,
                                             capture_intermediates=lambda m, _: m.name == 'embeddings',
                                             mutable=['intermediates'])
  x = np.asarray(state['intermediates']['embeddings']['__call__'][0][0], np.float64)
  layer = params['layer_0']
  q, k = (np.einsum('ble,ehd->blhd', x, np.asarray(layer[n]['kernel'], np.float64)) + np.asarray(layer[n]['bias'])
          for n in ('query', 'key'))
  scores = np.einsum('bqhd,bkhd->bhqk', q, k) / np.sqrt(q.shape[-1])
  scores = np.where(mask[:, None, None, :] > 0, scores, -np.inf)
  expected = np.exp(scores - scores.max(-1, keepdims=True))
  expected /= expected.sum(-1, keepdims=True)
  np.testing.assert_allclose(probs, expected, atol=1e-5)


def test_attention_command_on_an_hf_directory(tmp_path):
  """End to end from a directory: model read from config.json, tokens as labels, padding cropped from the figure."""
  from bert_jax import export as bert_export
  from bert_jax import model as bert_model
  from bert_jax import tokenizer as bert_tokenizer
  words = 'the cat sat on mat'.split()
  vocab = bert_tokenizer.write_vocab(list(bert_tokenizer.SPECIAL_TOKENS) + words, str(tmp_path / 'vocab.txt'))
  cfg = bert_model.model_config(vocab_size=len(bert_tokenizer.read_vocab(vocab)), hidden_size=16, num_hidden_layers=2,
                                num_attention_heads=2, intermediate_size=32, max_position_embeddings=32)
  bert_export.save_hf_dir(str(tmp_path / 'hf'), cfg, bert_export.init_params(cfg, jax.random.key(0)),
                          vocab_file=vocab)
  out = tmp_path / 'out'
  assert visualize.main(['attention', '--workdir', str(tmp_path / 'hf'), '--text', 'the cat sat on the mat',
                         '--out', str(out), '--max_seq_length', '16']) == 0
  assert sorted(p.name for p in out.glob('*.png')) == [f'attention_layer_{i}.png' for i in range(2)]
  saved = np.load(out / 'attention.npz')
  assert saved['tokens'].tolist() == ['[CLS]', 'the', 'cat', 'sat', 'on', 'the', 'mat', '[SEP]']
  assert saved['probs'].shape == (2, 2, 16, 16) and saved['input_mask'].sum() == 8
  with pytest.raises(UserError, match='no config.json'):
    visualize.attention_maps(str(tmp_path), 'the cat')


@pytest.mark.parametrize('name', ['bert', 'xlnet', 'gpt'])
def test_attention_model_read_from_a_workdir_config(name, tmp_path):
  import importlib
  cfg = importlib.import_module(f'{name}_jax.model').model_config()
  (tmp_path / 'config.json').write_text(json.dumps({'model': cfg.to_dict()}))
  assert visualize.detect_model(str(tmp_path)) == name
