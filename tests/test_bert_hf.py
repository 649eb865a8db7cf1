"""Parity of `bert_jax.export` with `transformers.BertForPreTraining` on small random-weight models.

Import: HF model -> save_pretrained -> load_hf_dir -> our logits == HF logits (padded batch, two segments).
Export: our random params -> save_hf_dir -> from_pretrained (no missing/unexpected keys) -> same logits.
Also: bitwise round trip, other BERT architectures, pytorch_model.bin, error messages, the workdir export.
Tolerance: 1e-5 absolute on float32 logits of order 1 (matmul precision 'highest', set in conftest).
"""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
import transformers

from bert_jax import export
from bert_jax.model import BertModel
from common import hf, hf_files

ATOL = 1e-5
SMALL = dict(vocab_size=500, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
             max_position_embeddings=64, type_vocab_size=2, initializer_range=0.1)
LENGTHS = (16, 11, 6)  # The padded batch: three rows of these real lengths, padded to 16.
VOCAB = ['[PAD]', '[unused0]', '[UNK]', '[CLS]', '[SEP]', '[MASK]', 'hello', 'world', ',', '!', 'un', '##aff',
         '##able', 'the', 'cat', '.'] + [f'tok{i}' for i in range(100)]


def _batch(vocab_size=SMALL['vocab_size']):
  """Padded batch `[3, 16]`: ids (0 at padding), segments (0 then 1 within the real tokens), mask, positions."""
  rng = np.random.RandomState(0)
  length = max(LENGTHS)
  ids = np.zeros((len(LENGTHS), length), np.int64)
  segments = np.zeros_like(ids)
  mask = np.zeros_like(ids)
  positions = np.zeros((len(LENGTHS), 4), np.int64)
  for row, n in enumerate(LENGTHS):
    ids[row, :n] = rng.randint(1, vocab_size, n)
    segments[row, n // 2:n] = 1
    mask[row, :n] = 1
    positions[row] = rng.choice(n, 4, replace=False)
  return ids, segments, mask, positions


def _perturb_torch(model, seed):
  """Random noise on every parameter, so LayerNorm scales / biases are not 1 / 0 (and the test can fail)."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.1 * torch.randn(p.shape, generator=gen))
  return model.eval()


def _hf_model(cls=transformers.BertForPreTraining, hidden_act='gelu', seed=0):
  torch.manual_seed(seed)
  config = transformers.BertConfig(hidden_act=hidden_act, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1,
                                   **SMALL)
  return _perturb_torch(cls(config).float(), seed)


def _torch_forward(model, batch):
  ids, segments, mask, _ = batch
  with torch.no_grad():
    return model(input_ids=torch.from_numpy(ids), token_type_ids=torch.from_numpy(segments),
                 attention_mask=torch.from_numpy(mask))


def _assert_pretraining_parity(cfg, params, out, batch, check_nsp=True):
  """Our MLM logits (real positions; gathered positions) and NSP logits vs HF's `out`."""
  ids, segments, mask, positions = batch
  mlm, nsp = export.pretraining_logits(cfg, params, ids, segments, mask)
  theirs = out.prediction_logits.numpy() if hasattr(out, 'prediction_logits') else out.logits.numpy()
  real = mask.astype(bool)
  err = np.abs(np.asarray(mlm)[real] - theirs[real]).max()
  assert err < ATOL, f'MLM logits (real positions) differ by {err:.3g} > {ATOL}'
  assert np.abs(theirs).max() > 0.5, 'logits too small for the comparison to mean anything'
  mlm_at, nsp2 = export.pretraining_logits(cfg, params, ids, segments, mask, positions)
  gathered = np.take_along_axis(theirs, positions[..., None], axis=1)
  err = np.abs(np.asarray(mlm_at) - gathered).max()
  assert err < ATOL, f'MLM logits (gathered positions) differ by {err:.3g} > {ATOL}'
  if check_nsp:
    err = np.abs(np.asarray(nsp) - out.seq_relationship_logits.numpy()).max()
    assert err < ATOL, f'NSP logits differ by {err:.3g} > {ATOL}'
    np.testing.assert_array_equal(np.asarray(nsp), np.asarray(nsp2))


def _our_params(cfg, seed=0):
  """Random params of our model with every LayerNorm scale/bias and every bias moved away from 1/0."""
  params = export.init_params(cfg, jax.random.PRNGKey(seed))
  rng = np.random.RandomState(seed)
  flat = {k: np.asarray(v, np.float32) for k, v in hf.flatten(params).items()}
  for k, v in flat.items():
    if k.endswith(('scale', 'bias')):
      flat[k] = (v + 0.1 * rng.standard_normal(v.shape)).astype(np.float32)
  return hf.unflatten(flat)


@pytest.mark.parametrize('hidden_act', ['gelu', 'gelu_new'])
def test_import_matches_transformers(tmp_path, hidden_act):
  model = _hf_model(hidden_act=hidden_act)
  model.save_pretrained(tmp_path)
  cfg, params, info = export.load_hf_dir(str(tmp_path), return_info=True)
  assert cfg.hidden_act == hidden_act and cfg.hidden_size == 64 and cfg.num_hidden_layers == 2
  assert info['initialised'] == [] and info['ignored'] == [], info
  batch = _batch()
  _assert_pretraining_parity(cfg, params, _torch_forward(model, batch), batch)


def test_export_loads_in_transformers(tmp_path):
  cfg = export.config_from_hf(SMALL)
  params = _our_params(cfg)
  vocab_file = tmp_path / 'vocab.txt'
  vocab_file.write_text(''.join(t + '\n' for t in VOCAB), encoding='utf-8')
  out = tmp_path / 'hf'
  export.save_hf_dir(str(out), cfg, params, vocab_file=str(vocab_file), do_lower_case=True)

  model, info = transformers.BertForPreTraining.from_pretrained(str(out), output_loading_info=True)
  assert not any(info.get(k) for k in ('missing_keys', 'unexpected_keys', 'mismatched_keys', 'error_msgs')), info
  assert next(model.parameters()).dtype == torch.float32
  model.eval()
  assert torch.equal(model.cls.predictions.decoder.weight, model.bert.embeddings.word_embeddings.weight)
  batch = _batch()
  _assert_pretraining_parity(cfg, params, _torch_forward(model, batch), batch)

  tokenizer = transformers.BertTokenizer.from_pretrained(str(out))
  expected = [VOCAB.index(t) for t in ['[CLS]', 'hello', 'world', ',', 'un', '##aff', '##able', '!', '[SEP]']]
  assert tokenizer('Hello World, unaffable!')['input_ids'] == expected
  assert tokenizer.pad_token_id == 0 and tokenizer.mask_token_id == VOCAB.index('[MASK]')
  assert hf.read_config(str(out))['pad_token_id'] == 0


def test_round_trip_is_exact(tmp_path):
  cfg = export.config_from_hf(SMALL)
  params = _our_params(cfg, seed=1)
  state_dict = export.params_to_hf(params, cfg)
  reference = _hf_model().state_dict()
  assert set(state_dict) == set(reference)
  for key, value in reference.items():
    assert state_dict[key].shape == tuple(value.shape), key
  np.testing.assert_array_equal(state_dict['cls.predictions.decoder.weight'],
                                state_dict['bert.embeddings.word_embeddings.weight'])
  export.save_hf_dir(str(tmp_path), cfg, params)
  for back in (export.hf_to_params(state_dict, cfg), export.load_hf_dir(str(tmp_path))[1]):
    flat, flat_back = hf.flatten(params), hf.flatten(back)
    assert set(flat) == set(flat_back)
    for key in flat:
      assert flat_back[key].dtype == np.float32, key
      assert np.array_equal(np.asarray(flat[key]), flat_back[key]), f'{key} changed in the round trip'
  assert export.config_from_hf(export.config_to_hf(cfg)) == cfg


def test_other_bert_architectures(tmp_path):
  batch = _batch()
  ids, segments, mask, _ = batch
  # BertModel: keys without the `bert.` prefix, no heads.
  model = _hf_model(transformers.BertModel, seed=2)
  model.save_pretrained(tmp_path / 'base')
  cfg, params, info = export.load_hf_dir(str(tmp_path / 'base'), return_info=True)
  assert set(info['initialised']) == set(k for k in hf.flatten(params) if not k.startswith('bert/')), info
  _, encoder, encoder_info = export.load_hf_dir(str(tmp_path / 'base'), return_info=True, subtree='bert')
  assert set(encoder) == {'bert'} and encoder_info['initialised'] == []  # the encoder alone: no head initialised
  for key, value in hf.flatten(params['bert']).items():
    np.testing.assert_array_equal(hf.flatten(encoder['bert'])[key], value)
  sequence, pooled, _ = BertModel(cfg).apply({'params': params['bert']}, jnp.asarray(ids), jnp.asarray(segments),
                                              jnp.asarray(mask))
  out = _torch_forward(model, batch)
  real = mask.astype(bool)
  err = np.abs(np.asarray(sequence)[real] - out.last_hidden_state.numpy()[real]).max()
  assert err < ATOL, f'BertModel sequence output differs by {err:.3g} > {ATOL}'
  err = np.abs(np.asarray(pooled) - out.pooler_output.numpy()).max()
  assert err < ATOL, f'BertModel pooled output differs by {err:.3g} > {ATOL}'

  # BertForMaskedLM: MLM head, no pooler and no NSP head.
  model = _hf_model(transformers.BertForMaskedLM, seed=3)
  model.save_pretrained(tmp_path / 'mlm')
  cfg, params, info = export.load_hf_dir(str(tmp_path / 'mlm'), return_info=True)
  assert info['initialised'] == ['bert/pooler/bias', 'bert/pooler/kernel', 'nsp/bias', 'nsp/kernel'], info
  _assert_pretraining_parity(cfg, params, _torch_forward(model, batch), batch, check_nsp=False)

  # BertForSequenceClassification: the classifier is ignored and reported.
  model = _hf_model(transformers.BertForSequenceClassification, seed=4)
  model.save_pretrained(tmp_path / 'cls')
  _, _, info = export.load_hf_dir(str(tmp_path / 'cls'), return_info=True)
  assert info['ignored'] == ['classifier.bias', 'classifier.weight'], info
  assert 'nsp/kernel' in info['initialised'] and 'bert/pooler/kernel' not in info['initialised'], info


def test_pytorch_bin_with_tied_keys(tmp_path):
  model = _hf_model(seed=5)
  model.save_pretrained(tmp_path / 'st')
  (tmp_path / 'bin').mkdir()
  torch.save(model.state_dict(), tmp_path / 'bin' / hf_files.PYTORCH_NAME)  # Includes the tied decoder keys.
  os.link(tmp_path / 'st' / hf.CONFIG_NAME, tmp_path / 'bin' / hf.CONFIG_NAME)
  _, from_st = export.load_hf_dir(str(tmp_path / 'st'))
  _, from_bin, info = export.load_hf_dir(str(tmp_path / 'bin'), return_info=True)
  assert info['source'].endswith(hf_files.PYTORCH_NAME) and not info['initialised'] and not info['ignored'], info
  for key, value in hf.flatten(from_st).items():
    assert np.array_equal(value, hf.flatten(from_bin)[key]), key


def test_bfloat16_safetensors(tmp_path):
  model = _hf_model(seed=7)
  expected = export.hf_to_params({k: v.to(torch.bfloat16).float().numpy() for k, v in model.state_dict().items()},
                                 export.config_from_hf(SMALL))
  model.to(torch.bfloat16).save_pretrained(tmp_path)  # numpy has no bfloat16: read through ml_dtypes.
  _, params = export.load_hf_dir(str(tmp_path))
  for key, value in hf.flatten(expected).items():
    assert hf.flatten(params)[key].dtype == np.float32 and np.array_equal(value, hf.flatten(params)[key]), key


def test_errors_name_the_problem(tmp_path):
  cfg = export.config_from_hf(SMALL)
  state_dict = export.params_to_hf(_our_params(cfg), cfg)

  empty = tmp_path / 'empty'
  empty.mkdir()
  with pytest.raises(FileNotFoundError, match=str(empty / 'config.json')):
    export.load_hf_dir(str(empty))
  hf.write_config(str(empty), export.config_to_hf(cfg))
  with pytest.raises(FileNotFoundError, match=f'{empty}: no weights found.*model.safetensors'):
    export.load_hf_dir(str(empty))
  with pytest.raises(FileNotFoundError, match='nowhere'):
    export.load_hf_dir(str(tmp_path / 'nowhere'))

  bad = dict(state_dict)
  bad['bert.encoder.layer.1.attention.self.key.weight'] = np.zeros((64, 63), np.float32)
  with pytest.raises(hf.StateDictError, match=r'bert\.encoder\.layer\.1\.attention\.self\.key\.weight: got \(64, 63\)'):
    export.hf_to_params(bad, cfg)
  bad = {k: v for k, v in state_dict.items() if k != 'bert.encoder.layer.0.output.dense.bias'}
  bad['bert.encoder.layer.0.crossattention.weight'] = np.zeros(3, np.float32)
  with pytest.raises(hf.StateDictError, match=r'missing keys \(1\): bert\.encoder\.layer\.0\.output\.dense\.bias '
                     r'\| unexpected keys \(1\): bert\.encoder\.layer\.0\.crossattention\.weight'):
    export.hf_to_params(bad, cfg)
  bad = dict(state_dict, **{'cls.predictions.decoder.weight': state_dict['cls.predictions.decoder.weight'] + 1})
  with pytest.raises(hf.StateDictError, match='cls.predictions.decoder.weight differs'):
    export.hf_to_params(bad, cfg)
  with pytest.raises(hf.StateDictError, match='our BERT params.*mlm_output_bias: got'):
    export.params_to_hf(dict(_our_params(cfg), mlm_output_bias=np.zeros(3, np.float32)), cfg)
  with pytest.raises(ValueError, match='hidden_act'):
    export.config_from_hf(dict(SMALL, hidden_act='swish'))
  with pytest.raises(ValueError, match='vocab_size is 500'):
    vocab = tmp_path / 'big_vocab.txt'
    vocab.write_text(''.join(f't{i}\n' for i in range(501)))
    export.save_hf_dir(str(tmp_path / 'out'), cfg, _our_params(cfg), vocab_file=str(vocab))


def test_export_workdir_from_a_checkpoint(tmp_path):
  from common import checkpoint
  cfg = export.config_from_hf(SMALL)
  params = _our_params(cfg, seed=6)
  workdir = tmp_path / 'run'
  config = ml_collections.ConfigDict(dict(model=cfg.to_dict(), data=dict(do_lower_case=False)))
  checkpoint.write_config(str(workdir), config)
  (workdir / 'vocab.txt').write_text(''.join(t + '\n' for t in VOCAB), encoding='utf-8')
  manager = checkpoint.make_manager(str(workdir), async_save=False)
  for step, scale in ((10, 0.0), (20, 1.0)):
    state = {'step': np.int32(step), 'params': jax.tree.map(lambda x: jnp.asarray(x) * scale, params)}
    checkpoint.save(manager, step, state, {'step': step}, force=True)
  manager.wait_until_finished()
  manager.close()

  out = tmp_path / 'hf'
  export.export_workdir(str(workdir), str(out))
  _, back = export.load_hf_dir(str(out))
  for key, value in hf.flatten(params).items():
    assert np.array_equal(value, hf.flatten(back)[key]), key
  assert transformers.BertTokenizer.from_pretrained(str(out)).tokenize('Hello') == ['[UNK]']  # Cased: no 'Hello'.
  export.export_workdir(str(workdir), str(tmp_path / 'hf10'), step=10)
  assert not np.any(hf.flatten(export.load_hf_dir(str(tmp_path / 'hf10'))[1])['bert/pooler/kernel'])


def test_command_line_requires_flags():
  result = subprocess.run([sys.executable, '-m', 'bert_jax.export', '--out', '/tmp/unused'], capture_output=True,
                          text=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          env=dict(os.environ, JAX_PLATFORMS='cpu'), timeout=120)
  assert result.returncode != 0 and '--workdir' in result.stderr, result.stderr[-2000:]
