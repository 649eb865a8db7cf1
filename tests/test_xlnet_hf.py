"""Parity of `xlnet_jax` with `transformers.XLNetLMHeadModel` on small random-weight models.

Import: HF model -> save_pretrained -> load_hf_dir -> our outputs == HF outputs, for a padded two-segment batch
(content stream logits), two-stream attention with a permutation mask and target mapping (query stream logits),
and a second segment attending to the memory of the first (logits and new memory); config variants: gelu / relu,
bi_data, clamp_len, 'uni' attention with same_length, reuse_len.
Export: our random params (untie_r on and off) -> save_hf_dir -> from_pretrained (no missing/unexpected keys)
-> same logits. Also: bitwise round trip, XLNetModel / task directories, errors, the workdir export.
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

from flax.core import meta

from common import hf
from xlnet_jax import export
from xlnet_jax.model import XLNetLMHeadModel, XLNetModel

ATOL = 1e-5
SMALL = dict(vocab_size=300, d_model=64, n_layer=2, n_head=4, d_inner=128, initializer_range=0.1)
BATCH, LENGTH, NUM_PREDICT = 4, 12, 4


def _perturb_torch(model, seed):
  """Random noise on every parameter, so LayerNorm scales / biases are not 1 / 0 (and the test can fail)."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.1 * torch.randn(p.shape, generator=gen))
  return model.eval()


def _hf_model(cls=transformers.XLNetLMHeadModel, seed=0, **overrides):
  torch.manual_seed(seed)
  config = transformers.XLNetConfig(**{**SMALL, 'mem_len': 6, **overrides})
  return _perturb_torch(cls(config).float(), seed)


def _segment(seed, padded=True):
  """ids, segments (0 then 1), attention mask (1 = real; rows 1 and 2 left-padded as XLNet pads) `[4, 12]`."""
  rng = np.random.RandomState(seed)
  ids = rng.randint(0, SMALL['vocab_size'], (BATCH, LENGTH))
  segments = np.zeros((BATCH, LENGTH), np.int64)
  segments[:, 7:] = 1
  mask = np.ones((BATCH, LENGTH), np.int64)
  if padded:
    mask[1, :3] = 0
    mask[2, :5] = 0
  return ids, segments, mask


def _permutation(seed):
  """A valid XLNet perm_mask `[4, 12, 12]` and target_mapping `[4, 4, 12]` (row 3 of example 0 is padding).

  NUM_PREDICT targets per example in a random factorization order; non-targets come first (they see each
  other, no target); a target sees the non-targets and the targets before it, not itself.
  """
  rng = np.random.RandomState(seed)
  perm_mask = np.zeros((BATCH, LENGTH, LENGTH), np.float32)
  target_mapping = np.zeros((BATCH, NUM_PREDICT, LENGTH), np.float32)
  for b in range(BATCH):
    targets = rng.choice(LENGTH, NUM_PREDICT, replace=False)
    rank = np.full(LENGTH, -1)
    rank[targets] = rng.permutation(NUM_PREDICT)
    is_target = rank >= 0
    perm_mask[b] = is_target[None, :] & (rank[None, :] >= rank[:, None])
    target_mapping[b, np.arange(NUM_PREDICT), targets] = 1.0
  target_mapping[0, -1] = 0.0
  return perm_mask, target_mapping


def _torch(x, dtype=None):
  return None if x is None else torch.tensor(x, dtype=dtype)


def _hf_forward(model, ids, segments, mask, perm_mask=None, target_mapping=None, mems=None):
  with torch.no_grad():
    return model(input_ids=_torch(ids), token_type_ids=_torch(segments), attention_mask=_torch(mask, torch.float),
                 perm_mask=_torch(perm_mask), target_mapping=_torch(target_mapping), mems=mems, use_mems=True)


def _assert_close(ours, theirs, what):
  ours, theirs = np.asarray(ours), np.asarray(theirs)
  assert ours.shape == theirs.shape, f'{what}: shape {ours.shape} != {theirs.shape}'
  err = np.abs(ours - theirs).max()
  assert err < ATOL, f'{what} differ by {err:.3g} > {ATOL}'
  return err


def _assert_parity(model, cfg, params, *, masks=True):
  """Plain forward, two-stream forward, and a second segment over the memory of the first; returns max diffs.

  `masks` False passes neither padding nor permutation masks (`transformers` cannot combine them with its 'uni'
  causal mask for a batch larger than 1); the query stream then runs with the causal mask alone.
  """
  errors = {}
  ids, segments, mask = _segment(1)
  mask = mask if masks else None
  out = _hf_forward(model, ids, segments, mask)
  logits, mems = export.lm_logits(cfg, params, ids, segments, mask)
  assert np.abs(out.logits.numpy()).max() > 0.5, 'logits too small for the comparison to mean anything'
  errors['plain'] = _assert_close(logits, out.logits.numpy(), 'content-stream logits')
  for i, (a, b) in enumerate(zip(mems, out.mems, strict=True)):
    errors['mems'] = _assert_close(a, b.numpy().transpose(1, 0, 2), f'new mems of layer {i}')

  perm_mask, target_mapping = _permutation(2)
  perm_mask = perm_mask if masks else None
  out_g = _hf_forward(model, ids, segments, mask, perm_mask, target_mapping)
  logits_g, _ = export.lm_logits(cfg, params, ids, segments, mask, perm_mask, target_mapping)
  errors['two_stream'] = _assert_close(logits_g, out_g.logits.numpy(), 'query-stream logits')

  # The next segment attends to the memory of this one (time-major in transformers, batch-first here).
  ids2, segments2, _ = _segment(3, padded=False)
  out2 = _hf_forward(model, ids2, segments2, None, perm_mask, target_mapping, mems=out.mems)
  logits2, mems2 = export.lm_logits(cfg, params, ids2, segments2, None, perm_mask, target_mapping, mems)
  errors['with_mems'] = _assert_close(logits2, out2.logits.numpy(), 'query-stream logits over the memory')
  for i, (a, b) in enumerate(zip(mems2, out2.mems, strict=True)):
    _assert_close(a, b.numpy().transpose(1, 0, 2), f'second new mems of layer {i}')
  return errors


@pytest.mark.parametrize('ff_activation', ['gelu', 'relu'])
def test_import_matches_transformers(tmp_path, ff_activation):
  model = _hf_model(ff_activation=ff_activation)
  model.save_pretrained(tmp_path)
  cfg, params, info = export.load_hf_dir(str(tmp_path), return_info=True)
  assert cfg.ff_activation == ff_activation and cfg.d_model == 64 and cfg.n_layer == 2 and cfg.mem_len == 6
  assert cfg.untie_r and cfg.d_head == 16
  assert info['initialised'] == [] and info['ignored'] == [], info
  print(ff_activation, _assert_parity(model, cfg, params))


@pytest.mark.parametrize('overrides', [
    dict(bi_data=True, clamp_len=5),
    dict(attn_type='uni', same_length=True, reuse_len=8, n_layer=3),
], ids=['bi_data_clamp_len', 'uni_same_length_reuse_len'])
def test_config_variants_match_transformers(tmp_path, overrides):
  model = _hf_model(seed=1, **overrides)
  model.save_pretrained(tmp_path)
  cfg, params = export.load_hf_dir(str(tmp_path))
  for key, value in overrides.items():
    assert cfg[key] == value, key
  print(overrides, _assert_parity(model, cfg, params, masks=overrides.get('attn_type', 'bi') == 'bi'))


def _our_params(cfg, seed=0):
  """Random params in our layout, drawn directly from the shapes (no model init, so no compile): weights
  normal(0, initializer_range), LayerNorm scales near 1, biases near 0."""
  rng = np.random.RandomState(seed)
  flat = {}
  for path, shape in sorted(export._our_shapes(cfg).items()):
    value = cfg.initializer_range * rng.standard_normal(shape)
    if path.endswith('scale'):
      value = 1.0 + 0.1 * rng.standard_normal(shape)
    elif path.endswith('bias') and not path.endswith(('r_w_bias', 'r_r_bias', 'r_s_bias')):
      value = 0.1 * rng.standard_normal(shape)
    flat[path] = value.astype(np.float32)
  return hf.unflatten(flat)


def _our_config(**overrides):
  return export.config_from_hf(dict(SMALL, mem_len=6, dropout=0.0, **overrides))


@pytest.mark.parametrize('untie_r', [True, False])
def test_export_loads_in_transformers(tmp_path, untie_r):
  cfg = _our_config(untie_r=untie_r)
  params = _our_params(cfg, seed=2)
  assert ('r_w_bias' in params['transformer']) != untie_r
  out = tmp_path / 'hf'
  export.save_hf_dir(str(out), cfg, params)
  model, info = transformers.XLNetLMHeadModel.from_pretrained(str(out), output_loading_info=True)
  assert not any(info.get(k) for k in ('missing_keys', 'unexpected_keys', 'mismatched_keys', 'error_msgs')), info
  assert next(model.parameters()).dtype == torch.float32
  model.eval()
  assert torch.equal(model.lm_loss.weight, model.transformer.word_embedding.weight)
  assert model.config.untie_r == untie_r and model.config.dropatt == 0.0
  print('untie_r', untie_r, _assert_parity(model, cfg, params))
  _, back = export.load_hf_dir(str(out))
  assert set(hf.flatten(back)) == set(hf.flatten(params))


def test_round_trip_is_exact(tmp_path):
  for untie_r in (True, False):
    cfg = _our_config(untie_r=untie_r)
    params = _our_params(cfg, seed=3)
    abstract = jax.eval_shape(lambda: XLNetLMHeadModel(cfg).init(jax.random.PRNGKey(0), jnp.zeros((2, 2), jnp.int32)))
    assert {k: v.shape for k, v in hf.flatten(meta.unbox(abstract)['params']).items()} == export._our_shapes(cfg)
    state_dict = export.params_to_hf(params, cfg)
    reference = _hf_model().state_dict()
    assert set(state_dict) == set(reference)
    for key, value in reference.items():
      assert state_dict[key].shape == tuple(value.shape), key
    np.testing.assert_array_equal(state_dict['lm_loss.weight'], state_dict['transformer.word_embedding.weight'])
    export.save_hf_dir(str(tmp_path / str(untie_r)), cfg, params)
    for back in (export.hf_to_params(state_dict, cfg), export.load_hf_dir(str(tmp_path / str(untie_r)))[1]):
      flat, flat_back = hf.flatten(params), hf.flatten(back)
      assert set(flat) == set(flat_back)
      for key in flat:
        assert flat_back[key].dtype == np.float32, key
        assert np.array_equal(np.asarray(flat[key]), flat_back[key]), f'{key} changed in the round trip'
    assert export.config_from_hf(export.config_to_hf(cfg)) == cfg


def test_other_xlnet_architectures(tmp_path):
  ids, segments, mask = _segment(4)
  # XLNetModel: keys without the `transformer.` prefix, no LM bias (freshly initialised to zeros).
  model = _hf_model(transformers.XLNetModel, seed=4)
  model.save_pretrained(tmp_path / 'base')
  cfg, params, info = export.load_hf_dir(str(tmp_path / 'base'), return_info=True)
  assert info['initialised'] == ['lm_loss/bias'] and info['ignored'] == [], info
  assert not np.any(params['lm_loss']['bias'])
  h, g, _ = XLNetModel(cfg).apply({'params': params['transformer']}, jnp.asarray(ids), jnp.asarray(segments),
                                  jnp.asarray(mask))
  assert g is None
  out = _hf_forward(model, ids, segments, mask)
  _assert_close(h, out.last_hidden_state.numpy(), 'XLNetModel hidden states')

  # XLNetForSequenceClassification: the summary and classifier are ignored and reported.
  model = _hf_model(transformers.XLNetForSequenceClassification, seed=5)
  model.save_pretrained(tmp_path / 'cls')
  _, _, info = export.load_hf_dir(str(tmp_path / 'cls'), return_info=True)
  assert info['ignored'] == ['logits_proj.bias', 'logits_proj.weight', 'sequence_summary.summary.bias',
                             'sequence_summary.summary.weight'], info
  assert info['initialised'] == ['lm_loss/bias'], info


def test_errors_name_the_problem(tmp_path):
  cfg = _our_config()
  state_dict = export.params_to_hf(_our_params(cfg), cfg)

  empty = tmp_path / 'empty'
  empty.mkdir()
  with pytest.raises(FileNotFoundError, match=str(empty / 'config.json')):
    export.load_hf_dir(str(empty))
  hf.write_config(str(empty), export.config_to_hf(cfg))
  with pytest.raises(FileNotFoundError, match=f'{empty}: no weights found.*model.safetensors'):
    export.load_hf_dir(str(empty))

  bad = dict(state_dict)
  bad['transformer.layer.1.rel_attn.k'] = np.zeros((64, 4, 15), np.float32)
  with pytest.raises(hf.StateDictError, match=r'transformer\.layer\.1\.rel_attn\.k: got \(64, 4, 15\)'):
    export.hf_to_params(bad, cfg)
  bad = {k: v for k, v in state_dict.items() if k != 'transformer.layer.0.ff.layer_2.bias'}
  bad['transformer.layer.0.rel_attn.extra'] = np.zeros(3, np.float32)
  with pytest.raises(hf.StateDictError, match=r'missing keys \(1\): transformer\.layer\.0\.ff\.layer_2\.bias '
                     r'\| unexpected keys \(1\): transformer\.layer\.0\.rel_attn\.extra'):
    export.hf_to_params(bad, cfg)
  bad = dict(state_dict, **{'lm_loss.weight': state_dict['lm_loss.weight'] + 1})
  with pytest.raises(hf.StateDictError, match='lm_loss.weight differs'):
    export.hf_to_params(bad, cfg)
  # Shared biases (untie_r false) can only be read from a checkpoint whose layers agree.
  with pytest.raises(hf.StateDictError, match=r'transformer\.layer\.1\.rel_attn\.r_w_bias differs from '
                     r'transformer\.layer\.0\.rel_attn\.r_w_bias'):
    export.hf_to_params(state_dict, _our_config(untie_r=False))
  with pytest.raises(hf.StateDictError, match='our XLNet params.*lm_loss/bias: got'):
    export.params_to_hf(dict(_our_params(cfg), lm_loss={'bias': np.zeros(3, np.float32)}), cfg)
  with pytest.raises(ValueError, match='ff_activation'):
    export.config_from_hf(dict(SMALL, ff_activation='swish'))
  with pytest.raises(ValueError, match='model.d_head'):
    export.config_to_hf(_our_config(d_head=8))
  with pytest.raises(ValueError, match='config.model.bi_data: needs an even batch size'):
    bi = _our_config(bi_data=True)
    export.lm_logits(bi, _our_params(bi), np.zeros((3, 4), np.int32))


def _train_spiece(tmp_path, vocab_size=60):
  import sentencepiece as spm
  corpus = tmp_path / 'corpus.txt'
  words = ['hello', 'world', 'xlnet', 'permutation', 'language', 'model', 'two', 'stream', 'attention', 'memory']
  rng = np.random.RandomState(0)
  corpus.write_text(''.join(' '.join(rng.choice(words, 8)) + '\n' for _ in range(200)), encoding='utf-8')
  prefix = tmp_path / 'spiece'
  spm.SentencePieceTrainer.train(
      input=str(corpus), model_prefix=str(prefix), vocab_size=vocab_size, model_type='unigram',
      control_symbols=['<cls>', '<sep>', '<pad>', '<mask>', '<eod>', '<eop>'], unk_id=0, bos_id=1, eos_id=2,
      pad_id=-1, hard_vocab_limit=False, minloglevel=2)
  return str(prefix) + '.model'


def test_export_workdir_from_a_checkpoint(tmp_path):
  from common import checkpoint
  cfg = _our_config()
  params = _our_params(cfg, seed=6)
  workdir = tmp_path / 'run'
  config = ml_collections.ConfigDict(dict(model=cfg.to_dict(), data=dict(do_lower_case=False)))
  checkpoint.write_config(str(workdir), config)
  os.replace(_train_spiece(tmp_path), workdir / 'spiece.model')
  manager = checkpoint.make_manager(str(workdir), async_save=False)
  for step, scale in ((10, 0.0), (20, 1.0)):
    state = {'step': np.int32(step), 'params': jax.tree.map(lambda x: jnp.asarray(x) * scale, params)}
    checkpoint.save(manager, step, state, {'step': step}, force=True)
  manager.wait_until_finished()
  manager.close()

  out = tmp_path / 'hf'
  written = export.export_workdir(str(workdir), str(out))
  assert {os.path.basename(p) for p in written} == {'model.safetensors', 'config.json', 'spiece.model',
                                                    'tokenizer_config.json', 'special_tokens_map.json',
                                                    'generation_config.json', 'README.md'}
  card = (out / 'README.md').read_text()
  assert 'transformers.XLNetLMHeadModel.from_pretrained' in card and f"| `d_model` | {cfg.d_model} |" in card
  generation = transformers.GenerationConfig.from_pretrained(str(out))
  assert (generation.eos_token_id, generation.pad_token_id) == (2, hf.read_config(str(out))['pad_token_id'])
  from bert_jax import export as bert_export  # the other model's export names the mismatch in one line
  from common.config import UserError
  with pytest.raises(UserError, match='is not a BERT run .*no hidden_size'):
    bert_export.export_workdir(str(workdir), str(tmp_path / 'wrong'))
  _, back = export.load_hf_dir(str(out))
  for key, value in hf.flatten(params).items():
    assert np.array_equal(value, hf.flatten(back)[key]), key
  import sentencepiece as spm
  sp = spm.SentencePieceProcessor(model_file=str(workdir / 'spiece.model'))
  config_json = hf.read_config(str(out))
  assert config_json['pad_token_id'] == sp.piece_to_id('<pad>') and config_json['eos_token_id'] == 2
  tokenizer = transformers.XLNetTokenizer.from_pretrained(str(out))
  encoded = tokenizer('hello world')['input_ids']
  assert encoded[-2:] == [sp.piece_to_id('<sep>'), sp.piece_to_id('<cls>')], encoded
  assert encoded[:-2] == sp.encode('hello world'), encoded
  assert tokenizer.pad_token_id == sp.piece_to_id('<pad>') and tokenizer.padding_side == 'left'
  export.export_workdir(str(workdir), str(tmp_path / 'hf10'), step=10)
  assert not np.any(hf.flatten(export.load_hf_dir(str(tmp_path / 'hf10'))[1])['transformer/layer_0/rel_attn/q/kernel'])


def test_command_line_requires_flags():
  result = subprocess.run([sys.executable, '-m', 'xlnet_jax.export', '--out', '/tmp/unused'], capture_output=True,
                          text=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          env=dict(os.environ, JAX_PLATFORMS='cpu'), timeout=120)
  assert result.returncode != 0 and '--workdir' in result.stderr, result.stderr[-2000:]
