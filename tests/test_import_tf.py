"""Importing the original google-research/bert and zihangdai/xlnet TensorFlow checkpoints.

Each test writes a tiny checkpoint the way the original training scripts left one: variables under the names
and shapes the original modeling.py / run_pretraining.py create (random values), each with its `adam_m` / `adam_v`
slots, and `global_step`, saved by `tf.compat.v1.train.Saver` in a release-style directory (checkpoint, config
file, vocabulary). The tables below are this test's own statement of the original layout, keyed by the
`transformers` key each variable must land in, so the importer's table is checked against a second spelling.

Asserted: after `import_tf` every parameter of the `transformers` model loaded from the written directory equals
the TF variable it came from (exactly, after the documented transposes / per-layer slices), the directory has no
missing or unexpected keys, and our model's logits on the imported params equal `transformers`' within 1e-5 (fp32,
matmul precision 'highest' from conftest); unknown, missing and wrongly shaped variables are refused naming them;
`--init` directories of this kind load the same params; the command line writes the directory or prints one line.
"""
import os
import subprocess
import sys

import numpy as np
import pytest

tf = pytest.importorskip('tensorflow')
torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

from bert_jax import export as bert_export  # noqa: E402
from bert_jax import import_tf as bert_import  # noqa: E402
from common.config import UserError  # noqa: E402
from xlnet_jax import export as xlnet_export  # noqa: E402
from xlnet_jax import import_tf as xlnet_import  # noqa: E402

ATOL = 1e-5
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BERT_CONFIG = dict(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=4, intermediate_size=32,
                   hidden_act='gelu', hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1,
                   max_position_embeddings=24, type_vocab_size=2, initializer_range=0.02)
BERT_VOCAB = ['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]'] + [f'w{i}' for i in range(35)]
XLNET_CONFIG = dict(n_token=64, d_model=16, n_layer=2, n_head=2, d_head=8, d_inner=32, ff_activation='gelu',
                    untie_r=True)
T = lambda x: x.T  # noqa: E731


# ----------------------------------------------------------------------------------------------------------------
# The original layouts: (TF name, shape, [(transformers key, value of the TF variable -> value of the key)]).
# ----------------------------------------------------------------------------------------------------------------

def _bert_layout(c):
  h, f, v = c['hidden_size'], c['intermediate_size'], c['vocab_size']
  out = []

  def dense(tf_name, hf_name, n_in, n_out):
    out.append((f'{tf_name}/kernel', (n_in, n_out), [(f'{hf_name}.weight', T)]))
    out.append((f'{tf_name}/bias', (n_out,), [(f'{hf_name}.bias', None)]))

  def norm(tf_name, hf_name):
    out.append((f'{tf_name}/gamma', (h,), [(f'{hf_name}.weight', None)]))
    out.append((f'{tf_name}/beta', (h,), [(f'{hf_name}.bias', None)]))

  out.append(('bert/embeddings/word_embeddings', (v, h),
              [('bert.embeddings.word_embeddings.weight', None), ('cls.predictions.decoder.weight', None)]))
  out.append(('bert/embeddings/position_embeddings', (c['max_position_embeddings'], h),
              [('bert.embeddings.position_embeddings.weight', None)]))
  out.append(('bert/embeddings/token_type_embeddings', (c['type_vocab_size'], h),
              [('bert.embeddings.token_type_embeddings.weight', None)]))
  norm('bert/embeddings/LayerNorm', 'bert.embeddings.LayerNorm')
  for i in range(c['num_hidden_layers']):
    tf_layer, hf_layer = f'bert/encoder/layer_{i}', f'bert.encoder.layer.{i}'
    for name in ('query', 'key', 'value'):
      dense(f'{tf_layer}/attention/self/{name}', f'{hf_layer}.attention.self.{name}', h, h)
    dense(f'{tf_layer}/attention/output/dense', f'{hf_layer}.attention.output.dense', h, h)
    norm(f'{tf_layer}/attention/output/LayerNorm', f'{hf_layer}.attention.output.LayerNorm')
    dense(f'{tf_layer}/intermediate/dense', f'{hf_layer}.intermediate.dense', h, f)
    dense(f'{tf_layer}/output/dense', f'{hf_layer}.output.dense', f, h)
    norm(f'{tf_layer}/output/LayerNorm', f'{hf_layer}.output.LayerNorm')
  dense('bert/pooler/dense', 'bert.pooler.dense', h, h)
  dense('cls/predictions/transform/dense', 'cls.predictions.transform.dense', h, h)
  norm('cls/predictions/transform/LayerNorm', 'cls.predictions.transform.LayerNorm')
  out.append(('cls/predictions/output_bias', (v,), [('cls.predictions.bias', None),
                                                     ('cls.predictions.decoder.bias', None)]))
  out.append(('cls/seq_relationship/output_weights', (2, h), [('cls.seq_relationship.weight', None)]))
  out.append(('cls/seq_relationship/output_bias', (2,), [('cls.seq_relationship.bias', None)]))
  return out


def _xlnet_layout(c):
  d, n, dh, f, v, layers = c['d_model'], c['n_head'], c['d_head'], c['d_inner'], c['n_token'], c['n_layer']
  t = 'model/transformer'
  out = [(f'{t}/word_embedding/lookup_table', (v, d), [('transformer.word_embedding.weight', None),
                                                        ('lm_loss.weight', None)]),
         (f'{t}/mask_emb/mask_emb', (1, 1, d), [('transformer.mask_emb', None)]),
         (f'{t}/seg_embed', (layers, 2, n, dh),
          [(f'transformer.layer.{i}.rel_attn.seg_embed', lambda x, i=i: x[i]) for i in range(layers)]),
         ('model/lm_loss/bias', (v,), [('lm_loss.bias', None)])]
  for name in ('r_w_bias', 'r_r_bias', 'r_s_bias'):
    if c['untie_r']:
      out.append((f'{t}/{name}', (layers, n, dh),
                  [(f'transformer.layer.{i}.rel_attn.{name}', lambda x, i=i: x[i]) for i in range(layers)]))
    else:
      out.append((f'{t}/{name}', (n, dh), [(f'transformer.layer.{i}.rel_attn.{name}', None) for i in range(layers)]))
  for i in range(layers):
    tf_layer, hf_layer = f'{t}/layer_{i}', f'transformer.layer.{i}'
    for name in ('q', 'k', 'v', 'o', 'r'):
      out.append((f'{tf_layer}/rel_attn/{name}/kernel', (d, n, dh), [(f'{hf_layer}.rel_attn.{name}', None)]))
    for block in ('rel_attn', 'ff'):
      out.append((f'{tf_layer}/{block}/LayerNorm/gamma', (d,), [(f'{hf_layer}.{block}.layer_norm.weight', None)]))
      out.append((f'{tf_layer}/{block}/LayerNorm/beta', (d,), [(f'{hf_layer}.{block}.layer_norm.bias', None)]))
    for dense, n_in, n_out in (('layer_1', d, f), ('layer_2', f, d)):
      out.append((f'{tf_layer}/ff/{dense}/kernel', (n_in, n_out), [(f'{hf_layer}.ff.{dense}.weight', T)]))
      out.append((f'{tf_layer}/ff/{dense}/bias', (n_out,), [(f'{hf_layer}.ff.{dense}.bias', None)]))
  return out


# ----------------------------------------------------------------------------------------------------------------
# Writing release directories.
# ----------------------------------------------------------------------------------------------------------------

def _random_values(layout, seed):
  """{TF name: value}: LayerNorm gammas near 1, everything else normal(0, 0.3), so no value is a default."""
  rng = np.random.RandomState(seed)
  values = {}
  for name, shape, _ in layout:
    value = 0.3 * rng.standard_normal(shape)
    values[name] = (value + 1.0 if name.endswith('/gamma') else value).astype(np.float32)
  return values


def _save_original(prefix, values, seed=0):
  """Saves `values` as the original scripts' `tf.train.Saver` did (graph-mode variables under their names), with
  AdamWeightDecayOptimizer's `<name>/adam_m`, `<name>/adam_v` slots and `global_step`."""
  v1 = tf.compat.v1
  rng = np.random.RandomState(seed + 1000)
  with tf.Graph().as_default():
    for name, value in values.items():
      v1.get_variable(name, initializer=tf.constant(value))
      for slot in ('adam_m', 'adam_v'):
        v1.get_variable(f'{name}/{slot}', initializer=tf.constant(rng.standard_normal(value.shape), tf.float32))
    v1.train.get_or_create_global_step()
    with v1.Session() as sess:
      sess.run(v1.global_variables_initializer())
      v1.train.Saver().save(sess, str(prefix), write_meta_graph=False, write_state=False)


def _bert_release(directory, values=None, seed=0):
  """An `uncased_...`-style BERT release directory; returns {TF name: value}."""
  import json
  directory.mkdir(parents=True, exist_ok=True)
  values = _random_values(_bert_layout(BERT_CONFIG), seed) if values is None else values
  _save_original(directory / 'bert_model.ckpt', values, seed)
  (directory / 'bert_config.json').write_text(json.dumps(BERT_CONFIG))
  (directory / 'vocab.txt').write_text(''.join(t + '\n' for t in BERT_VOCAB))
  return values


def _spiece(directory):
  import sentencepiece as spm
  corpus = directory / 'corpus.txt'
  words = ['hello', 'world', 'xlnet', 'permutation', 'language', 'model', 'stream', 'attention', 'memory']
  rng = np.random.RandomState(0)
  corpus.write_text(''.join(' '.join(rng.choice(words, 8)) + '\n' for _ in range(200)), encoding='utf-8')
  spm.SentencePieceTrainer.train(
      input=str(corpus), model_prefix=str(directory / 'spiece'), vocab_size=48, model_type='unigram',
      control_symbols=['<cls>', '<sep>', '<pad>', '<mask>', '<eod>', '<eop>'], unk_id=0, bos_id=1, eos_id=2,
      pad_id=-1, hard_vocab_limit=False, minloglevel=2)
  corpus.unlink()
  (directory / 'spiece.vocab').unlink()


def _xlnet_release(directory, config=XLNET_CONFIG, values=None, seed=0):
  """An `xlnet_cased_...`-style XLNet release directory; returns {TF name: value}."""
  import json
  directory.mkdir(parents=True, exist_ok=True)
  values = _random_values(_xlnet_layout(config), seed) if values is None else values
  _save_original(directory / 'xlnet_model.ckpt', values, seed)
  (directory / 'xlnet_config.json').write_text(json.dumps(config))
  _spiece(directory)
  return values


def _assert_every_parameter(model, layout, values):
  """Every key of the `transformers` model's state dict equals the TF variable it came from, and every TF variable
  is used."""
  state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
  covered = set()
  for name, _, targets in layout:
    for key, fn in targets:
      expected = values[name] if fn is None else fn(values[name])
      np.testing.assert_array_equal(state[key], expected, err_msg=f'{key} != {name}')
      covered.add(key)
  assert set(state) - covered <= {'bert.embeddings.position_ids', 'bert.embeddings.token_type_ids'}, \
      sorted(set(state) - covered)


# ----------------------------------------------------------------------------------------------------------------
# BERT.
# ----------------------------------------------------------------------------------------------------------------

def test_bert_import_matches_tf_variables_and_transformers_logits(tmp_path):
  release = tmp_path / 'uncased_L-2_H-16_A-4'
  values = _bert_release(release)
  out = tmp_path / 'hf'
  written = bert_import.import_tf_dir(str(release), str(out))
  assert {os.path.basename(p) for p in written} == {'model.safetensors', 'config.json', 'vocab.txt', 'README.md',
                                                    'tokenizer_config.json', 'special_tokens_map.json'}
  card = (out / 'README.md').read_text()
  assert 'google-research/bert checkpoint `bert_model.ckpt`' in card and 'training run' not in card
  model, info = transformers.BertForPreTraining.from_pretrained(str(out), output_loading_info=True)
  assert not any(info.values()), info
  model.eval()
  _assert_every_parameter(model, _bert_layout(BERT_CONFIG), values)
  assert transformers.BertTokenizer.from_pretrained(str(out)).do_lower_case

  cfg, params = bert_import.load_tf_dir(str(release))
  rng = np.random.RandomState(1)
  ids = rng.randint(1, BERT_CONFIG['vocab_size'], (3, 12))
  segments = np.zeros_like(ids)
  segments[:, 6:] = 1
  mask = np.ones_like(ids)
  mask[1, 8:] = 0
  mask[2, 4:] = 0
  mlm, nsp = bert_export.pretraining_logits(cfg, params, ids, segments, mask)
  with torch.no_grad():
    theirs = model(input_ids=torch.tensor(ids), token_type_ids=torch.tensor(segments),
                   attention_mask=torch.tensor(mask))
  assert np.abs(theirs.prediction_logits.numpy()).max() > 0.5, 'logits too small to mean anything'
  mlm_err = np.abs(np.asarray(mlm) - theirs.prediction_logits.numpy()).max()
  nsp_err = np.abs(np.asarray(nsp) - theirs.seq_relationship_logits.numpy()).max()
  print(f'BERT max |ours - HF|: mlm {mlm_err:.2e}, nsp {nsp_err:.2e}')
  assert mlm_err < ATOL and nsp_err < ATOL


def test_bert_init_accepts_the_release_directory(tmp_path):
  from bert_jax import finetune
  release = tmp_path / 'uncased_L-2_H-16_A-4'
  _bert_release(release, seed=2)
  cfg, params = bert_import.load_tf_dir(str(release))
  cfg2, params2, info = bert_export.load_hf_dir(str(release), return_info=True)
  assert cfg2 == cfg and info['initialised'] == [] and info['ignored'] == []
  import jax
  jax.tree_util.tree_map(np.testing.assert_array_equal, params, params2)
  model_cfg, encoder, tokenizer = finetune.load_init(str(release))
  assert model_cfg.hidden_size == 16 and 'layer_1' in encoder and tokenizer.vocab_size == len(BERT_VOCAB)
  # A checkpoint prefix works as the directory does; so does continued pretraining's config.init_from.
  jax.tree_util.tree_map(np.testing.assert_array_equal, params,
                         bert_import.load_tf_dir(str(release / 'bert_model.ckpt'))[1])
  from bert_jax import pretrain
  from bert_jax.configs import tiny
  config = tiny.get_config()
  config.init_from = str(release)
  jax.tree_util.tree_map(np.testing.assert_array_equal, params, pretrain.import_init(config))
  assert config.model.hidden_size == 16 and config.data.vocab_file == str(release / 'vocab.txt')


# ----------------------------------------------------------------------------------------------------------------
# XLNet.
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('untie_r', [True, False])
def test_xlnet_import_matches_tf_variables_and_transformers_logits(tmp_path, untie_r):
  config = dict(XLNET_CONFIG, untie_r=untie_r)
  release = tmp_path / 'xlnet_cased_L-2_H-16_A-2'
  values = _xlnet_release(release, config, seed=3)
  out = tmp_path / 'hf'
  written = xlnet_import.import_tf_dir(str(release), str(out))
  assert {os.path.basename(p) for p in written} == {'model.safetensors', 'config.json', 'spiece.model', 'README.md',
                                                    'tokenizer_config.json', 'special_tokens_map.json',
                                                    'generation_config.json'}
  assert 'zihangdai/xlnet checkpoint `xlnet_model.ckpt`' in (out / 'README.md').read_text()
  model, info = transformers.XLNetLMHeadModel.from_pretrained(str(out), output_loading_info=True)
  assert not any(info.values()), info
  model.eval()
  assert model.config.ff_activation == 'gelu_new'  # modeling.py's gelu is the tanh form
  _assert_every_parameter(model, _xlnet_layout(config), values)
  assert not transformers.XLNetTokenizer.from_pretrained(str(out)).do_lower_case

  cfg, params = xlnet_import.load_tf_dir(str(release))
  assert cfg.untie_r == untie_r and cfg.vocab_size == 64
  rng = np.random.RandomState(4)
  ids = rng.randint(0, config['n_token'], (2, 10))
  segments = np.zeros_like(ids)
  segments[:, 5:] = 1
  mask = np.ones_like(ids)
  mask[1, :3] = 0  # left padding, as XLNet pads
  perm_mask = np.zeros((2, 10, 10), np.float32)
  perm_mask[:, :, 7:] = 1.0  # the last three tokens are targets, predicted left to right
  perm_mask[:, 8, 7] = perm_mask[:, 9, 7] = perm_mask[:, 9, 8] = 0.0
  target_mapping = np.zeros((2, 3, 10), np.float32)
  target_mapping[:, np.arange(3), np.arange(7, 10)] = 1.0
  errors = {}
  for name, extra in (('content', {}), ('query', dict(perm_mask=perm_mask, target_mapping=target_mapping))):
    ours, _ = xlnet_export.lm_logits(cfg, params, ids, segments, mask, **extra)
    with torch.no_grad():
      theirs = model(input_ids=torch.tensor(ids), token_type_ids=torch.tensor(segments),
                     attention_mask=torch.tensor(mask, dtype=torch.float),
                     **{k: torch.tensor(v) for k, v in extra.items()}).logits.numpy()
    assert np.abs(theirs).max() > 0.5, 'logits too small to mean anything'
    errors[name] = np.abs(np.asarray(ours) - theirs).max()
  print(f'XLNet untie_r={untie_r} max |ours - HF|: ' + ', '.join(f'{k} {v:.2e}' for k, v in errors.items()))
  assert max(errors.values()) < ATOL, errors


def test_xlnet_init_accepts_the_release_directory(tmp_path):
  release = tmp_path / 'xlnet_cased_L-2_H-16_A-2'
  _xlnet_release(release, seed=5)
  cfg, params = xlnet_import.load_tf_dir(str(release))
  cfg2, params2 = xlnet_export.load_hf_dir(str(release))
  assert cfg2 == cfg
  import jax
  jax.tree_util.tree_map(np.testing.assert_array_equal, params, params2)
  from xlnet_jax import finetune, pretrain
  from xlnet_jax.configs import tiny
  model_cfg, encoder, _ = finetune.load_init(str(release))
  assert model_cfg.d_model == 16 and 'layer_1' in encoder
  config = tiny.get_config()
  config.init_from = str(release)
  jax.tree_util.tree_map(np.testing.assert_array_equal, params, pretrain.import_init(config))
  assert config.model.d_model == 16 and config.data.spiece_model == str(release / 'spiece.model')


def test_xlnet_untied_output_layer_must_equal_the_embedding(tmp_path):
  layout = _xlnet_layout(XLNET_CONFIG)
  values = _random_values(layout, 6)
  values['model/lm_loss/weight'] = values['model/transformer/word_embedding/lookup_table'].copy()
  release = tmp_path / 'equal'
  _xlnet_release(release, values=values)
  xlnet_import.load_tf_dir(str(release))  # tied in fact: accepted
  values['model/lm_loss/weight'] += 1.0
  _xlnet_release(tmp_path / 'differs', values=values)
  with pytest.raises(UserError, match='model/lm_loss/weight differs from model/transformer/word_embedding'):
    xlnet_import.load_tf_dir(str(tmp_path / 'differs'))


# ----------------------------------------------------------------------------------------------------------------
# Refusals.
# ----------------------------------------------------------------------------------------------------------------

RELEASES = {'bert': (_bert_release, _bert_layout, BERT_CONFIG, bert_import, 'output_weights'),
            'xlnet': (_xlnet_release, _xlnet_layout, XLNET_CONFIG, xlnet_import,
                      'model/sequnece_summary/summary/kernel')}  # run_classifier.py's head (sic)


@pytest.mark.parametrize('model', sorted(RELEASES))
def test_unknown_missing_and_misshapen_variables_are_refused_by_name(tmp_path, model):
  release, layout, config, module, head = RELEASES[model]
  names = [name for name, _, _ in layout(config)]
  values = _random_values(layout(config), 7)

  extra = dict(values, **{head: np.zeros((config.get('hidden_size', 16), 2), np.float32)})
  release(tmp_path / 'unknown', values=extra)
  with pytest.raises(UserError, match=rf'unknown variables \(1\): {head}$'):
    module.load_tf_dir(str(tmp_path / 'unknown'))

  dropped = names[-1]
  release(tmp_path / 'missing', values={k: v for k, v in values.items() if k != dropped})
  with pytest.raises(UserError, match=rf'missing variables \(1\): {dropped}$'):
    module.load_tf_dir(str(tmp_path / 'missing'))

  bad = names[0]
  release(tmp_path / 'shape', values=dict(values, **{bad: values[bad][:-1]}))
  with pytest.raises(UserError, match=rf'wrong shapes \(1\): {bad} '):
    module.load_tf_dir(str(tmp_path / 'shape'))


def test_directory_problems_are_user_errors(tmp_path, monkeypatch):
  with pytest.raises(UserError, match='no such directory or checkpoint'):
    bert_import.load_tf_dir(str(tmp_path / 'nowhere'))
  (tmp_path / 'empty').mkdir()
  with pytest.raises(UserError, match=r'no TensorFlow checkpoint \(no bert_model.ckpt.index'):
    bert_import.load_tf_dir(str(tmp_path / 'empty'))
  release = tmp_path / 'uncased_L-2_H-16_A-4'
  _bert_release(release)
  os.remove(release / 'bert_config.json')
  with pytest.raises(UserError, match='bert_config.json: no such file'):
    bert_import.load_tf_dir(str(release))
  monkeypatch.setitem(sys.modules, 'tensorflow', None)  # `import tensorflow` now raises ImportError
  with pytest.raises(UserError, match='pip install tensorflow-cpu'):
    bert_import.load_tf_dir(str(release))


def test_command_line(tmp_path):
  release = tmp_path / 'cased_L-2_H-16_A-4'
  values = _bert_release(release, seed=8)
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=REPO)

  def run(*args):
    return subprocess.run([sys.executable, '-m', 'bert_jax.import_tf', *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)

  done = run('--tf_dir', str(release), '--out', str(tmp_path / 'hf'))
  assert done.returncode == 0, done.stderr
  assert str(tmp_path / 'hf' / 'model.safetensors') in done.stdout
  model = transformers.BertForPreTraining.from_pretrained(str(tmp_path / 'hf'))
  np.testing.assert_array_equal(model.cls.seq_relationship.weight.detach().numpy(),
                                values['cls/seq_relationship/output_weights'])
  assert not transformers.BertTokenizer.from_pretrained(str(tmp_path / 'hf')).do_lower_case  # 'cased_...'

  _bert_release(tmp_path / 'bad', values=dict(values, output_bias=np.zeros(2, np.float32)))
  failed = run('--tf_dir', str(tmp_path / 'bad'), '--out', str(tmp_path / 'hf2'))
  assert failed.returncode == 2
  lines = [line for line in failed.stderr.splitlines() if line.startswith('error:')]
  assert len(lines) == 1 and lines[0].endswith('unknown variables (1): output_bias'), failed.stderr
  assert 'Traceback' not in failed.stderr


@pytest.mark.slow  # compiles the train step (~20 s on 2 cores)
def test_bert_dry_run_takes_the_architecture_from_the_release(tmp_path):
  """`--dry_run` with `config.init_from` an original release reads its bert_config.json (max_position 24 is
  checked against the data's sequence length) and compiles."""
  from bert_jax import pretrain
  from common import fit
  from tests.drivers import tiny_configs
  release = tmp_path / 'uncased_L-2_H-16_A-4'
  _bert_release(release, seed=9)
  config = tiny_configs.get_config('bert')
  config.init_from = str(release)
  config.data_dir = str(tmp_path / 'data')
  config.data.update(max_seq_length=16, max_predictions_per_seq=3)  # the release has 24 positions
  report = pretrain.dry_run(config, fit.parse_target('tpu:v5litepod-8'))
  assert report.fits and not os.path.exists(tmp_path / 'data')
