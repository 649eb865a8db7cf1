"""Parity of `gpt_jax.export` with `transformers.OpenAIGPTLMHeadModel` (layout gpt1) and `GPT2LMHeadModel` (gpt2)
on small random-weight models, both directions.

Import: HF model -> save_pretrained -> load_hf_dir -> our logits == HF logits.
Export: our random params -> save_hf_dir -> from_pretrained (no missing/unexpected keys) -> same logits.
Also: the bitwise state-dict round trip, bare Hub-style keys, the tokenizer files, refusals.
Tolerance: 1e-5 absolute on float32 logits of order 1 (matmul precision 'highest', set in conftest).
"""
import os

import jax
import numpy as np
import pytest
import torch
import transformers

from common import hf
from gpt_jax import export, model as gpt_model
from gpt_jax import tokenizer as gpt_tokenizer

ATOL = 1e-5
SMALL = dict(vocab_size=300, n_positions=32, n_embd=64, n_layer=2, n_head=4)


def hf_model(layout, seed=0):
  torch.manual_seed(seed)
  if layout == 'gpt1':
    model = transformers.OpenAIGPTLMHeadModel(transformers.OpenAIGPTConfig(**SMALL))
  else:
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_inner=96, **SMALL))
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():  # noise on every parameter: LayerNorm gains and biases away from 1 / 0
    for p in model.parameters():
      p.add_(0.1 * torch.randn(p.shape, generator=gen))
  return model.float().eval()


def our_config(layout):
  return gpt_model.model_config(vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=256 if layout == 'gpt1' else 96, max_position_embeddings=32,
                                layout=layout, initializer_range=0.2)


def input_ids(vocab=300):
  return np.random.RandomState(1).randint(0, vocab, (3, 20)).astype(np.int64)


def hf_logits(model, ids):
  with torch.no_grad():
    return model(input_ids=torch.from_numpy(ids)).logits.numpy()


@pytest.mark.parametrize('layout', ['gpt1', 'gpt2'])
def test_import_from_hf(layout, tmp_path):
  model = hf_model(layout)
  model.save_pretrained(tmp_path)
  cfg, params, info = export.load_hf_dir(str(tmp_path), return_info=True)
  assert cfg.layout == layout and not info['initialised'] and not info['ignored']
  ids = input_ids()
  ours, theirs = np.asarray(export.lm_logits(cfg, params, ids)), hf_logits(model, ids)
  assert np.abs(theirs).max() > 0.5
  err = np.abs(ours - theirs).max()
  assert err < ATOL, f'{layout}: logits differ by {err:.3g}'


@pytest.mark.parametrize('layout', ['gpt1', 'gpt2'])
def test_export_to_hf(layout, tmp_path):
  cfg = our_config(layout)
  params = export.init_params(cfg, jax.random.PRNGKey(3))
  params = jax.tree.map(lambda x: x + 0.1 * np.random.RandomState(x.size % 97).randn(*x.shape), params)
  export.save_hf_dir(str(tmp_path), cfg, params)
  cls = transformers.OpenAIGPTLMHeadModel if layout == 'gpt1' else transformers.GPT2LMHeadModel
  model, info = cls.from_pretrained(str(tmp_path), output_loading_info=True)
  assert not info['missing_keys'] and not info['unexpected_keys'], info
  model = model.float().eval()
  ids = input_ids()
  ours, theirs = np.asarray(export.lm_logits(cfg, params, ids)), hf_logits(model, ids)
  assert np.abs(theirs).max() > 0.5
  err = np.abs(ours - theirs).max()
  assert err < ATOL, f'{layout}: logits differ by {err:.3g}'
  # Back again, bitwise; the state dict has exactly the HF model's keys and shapes.
  state = export.params_to_hf(params, cfg)
  assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == {k: v.shape for k, v in state.items()}
  _, back = export.load_hf_dir(str(tmp_path))
  for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(back)):
    np.testing.assert_array_equal(np.asarray(x, np.float32), y)


def test_bare_hub_keys_and_mask_buffers_load(tmp_path):
  """Hub files of GPT-2 hold `GPT2Model` keys (no `transformer.` prefix) and the old `attn.bias` buffers."""
  model = hf_model('gpt2')
  state = {k[len('transformer.'):]: v.numpy() for k, v in model.state_dict().items() if k.startswith('transformer.')}
  state['h.0.attn.bias'] = np.tril(np.ones((1, 1, 32, 32), np.float32))
  hf.write_model_dir(str(tmp_path), state, model.config.to_dict())
  cfg, params, info = export.load_hf_dir(str(tmp_path), return_info=True)
  assert info['ignored'] == ['transformer.h.0.attn.bias']
  ids = input_ids()
  assert np.abs(np.asarray(export.lm_logits(cfg, params, ids)) - hf_logits(model, ids)).max() < ATOL


def test_tokenizer_files_load_in_transformers(tmp_path):
  corpus = tmp_path / 'corpus.txt'
  corpus.write_text('Hello world, this is a test.\nAnother line here.\n\nA second document.\n' * 20)
  vocab_file = gpt_tokenizer.train_bpe([str(corpus)], 300, str(tmp_path / 'tok'))
  cfg = our_config('gpt2')
  export.save_hf_dir(str(tmp_path / 'hf'), cfg, export.init_params(cfg, jax.random.PRNGKey(0)), vocab_file)
  theirs = transformers.GPT2Tokenizer.from_pretrained(str(tmp_path / 'hf'))
  ours = gpt_tokenizer.load_tokenizer(vocab_file)
  text = 'Hello world, another test!  Émoji ✓ here.'
  assert theirs.encode(text) == ours.encode(text)
  assert ours.decode(ours.encode(text)) == text
  config = hf.read_config(str(tmp_path / 'hf'))
  assert config['eos_token_id'] == ours.eot_id == 0


def test_refusals():
  cfg = our_config('gpt1')
  cfg.intermediate_size = 96
  with pytest.raises(ValueError, match='intermediate_size'):
    export.config_to_hf(cfg)
  with pytest.raises(ValueError, match='model_type'):
    export.config_from_hf({'model_type': 'bert'})
  with pytest.raises(ValueError, match='scale_attn_by_inverse_layer_idx'):
    export.config_from_hf({'model_type': 'gpt2', 'scale_attn_by_inverse_layer_idx': True})
  params = export.init_params(our_config('gpt2'), jax.random.PRNGKey(0))
  state = export.params_to_hf(params, our_config('gpt2'))
  del state['transformer.ln_f.weight']
  with pytest.raises(hf.StateDictError, match='transformer.ln_f.weight'):
    export.hf_to_params(state, our_config('gpt2'))
