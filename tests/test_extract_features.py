"""Feature extraction (`common.extract`, `bert_jax.extract_features`, `xlnet_jax.extract_features`).

Tiny random models (hidden 32, 3 layers, every parameter perturbed so that no bias or LayerNorm stays at its
initial value) are exported by the project as HF directories, loaded back through `--init` and compared with
`transformers`' BertModel / XLNetModel `output_hidden_states` on the same padded batch (singles and pairs of
different lengths, one cut at max_seq_length): every extracted vector of the chosen layers must match within
RELATIVE x the layer's largest magnitude (fp32; the README's statement). Both output formats are read back; bad
input lines are counted and skipped.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
import transformers

from bert_jax import export as bert_export
from bert_jax import extract_features as bert_extract
from bert_jax import model as bert_model
from bert_jax import tokenizer as bert_tokenizer
from common import extract
from xlnet_jax import export as xlnet_export
from xlnet_jax import extract_features as xlnet_extract
from xlnet_jax import model as xlnet_model
from xlnet_jax import tokenizer as xlnet_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEQ = 24
RELATIVE = 2e-6  # max |ours - transformers| <= RELATIVE * max |value| of the layer
LAYERS = '-1,-3,1'  # Last, first (of 3) and the middle one, out of order.

GOOD_LINES = [
    'the quick brown fox jumps over the lazy dog',
    'a dog sleeps ||| the fox runs away from the river',
    'rivers flow',
    'the lazy dog jumps over the quick brown fox near the old river bank and the fox sleeps all day long ||| '
    'the dog runs',  # Cut to SEQ tokens.
    'brown fox ||| lazy dog',
]
# (raw line, why it is skipped); they sit between the good lines in the input file.
BAD_LINES = [(b'', 'empty line'), (b'   \t', 'empty line'), (b'caf\xe9 au lait', 'not UTF-8'),
             (b'the dog ||| ', 'is empty')]


def _perturbed(params, seed):
  leaves, treedef = jax.tree_util.tree_flatten(params)
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_unflatten(
      treedef, [np.asarray(x, np.float32) + 0.05 * rng.standard_normal(np.shape(x)).astype(np.float32)
                for x in leaves])


@pytest.fixture(scope='module')
def texts():
  return ' '.join(GOOD_LINES).replace('|||', ' ').split() + ['dog', 'sleeps', 'cafe', 'au', 'lait']


@pytest.fixture(scope='module')
def bert_dir(tmp_path_factory, texts):
  out = str(tmp_path_factory.mktemp('extract_bert'))
  vocab = bert_tokenizer.write_vocab(list(bert_tokenizer.SPECIAL_TOKENS) + sorted(set(texts)),
                                     os.path.join(out, 'vocab.txt'))
  cfg = bert_model.model_config(vocab_size=len(bert_tokenizer.read_vocab(vocab)), hidden_size=32,
                                num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
                                max_position_embeddings=64)
  params = _perturbed(jax.jit(lambda rng: bert_export.init_params(cfg, rng))(jax.random.PRNGKey(0)), seed=1)
  bert_export.save_hf_dir(out, cfg, params, vocab_file=vocab)
  return out


@pytest.fixture(scope='module')
def xlnet_dir(tmp_path_factory, texts):
  out = tmp_path_factory.mktemp('extract_xlnet')
  (out / 'text.txt').write_text('\n'.join([' '.join(texts)] * 20 + GOOD_LINES) + '\n')
  model = xlnet_tokenizer.train_sentencepiece([str(out / 'text.txt')], 80, str(out / 'sp'))
  cfg = xlnet_model.model_config(vocab_size=xlnet_tokenizer.load_tokenizer(model).vocab_size, d_model=32,
                                 n_layer=3, n_head=4, d_head=8, d_inner=64)
  params = _perturbed(xlnet_export.init_params(cfg, jax.random.PRNGKey(0)), seed=2)
  xlnet_export.save_hf_dir(str(out), cfg, params, spiece_model=model)
  return str(out)


@pytest.fixture(scope='module')
def input_file(tmp_path_factory):
  """The good lines with a bad line after each of the first four: good lines sit at even line indices."""
  path = tmp_path_factory.mktemp('extract_input') / 'lines.txt'
  raw = []
  for i, line in enumerate(GOOD_LINES):
    raw.append(line.encode())
    if i < len(BAD_LINES):
      raw.append(BAD_LINES[i][0])
  path.write_bytes(b'\n'.join(raw) + b'\n')
  return str(path)


GOOD_INDICES = [0, 2, 4, 6, 8]


def _hf_hidden_states(name, init, encoder, examples):
  """transformers' hidden states (embeddings, after layer 1, ...) on our converter's padded batch."""
  features = encoder.convert(examples, encoder.tokenizer, SEQ)
  cls = transformers.BertModel if name == 'bert' else transformers.XLNetModel
  model = cls.from_pretrained(init).eval()
  with torch.no_grad():
    out = model(input_ids=torch.from_numpy(features['input_ids'].astype(np.int64)),
                token_type_ids=torch.from_numpy(features['segment_ids'].astype(np.int64)),
                attention_mask=torch.from_numpy(features['input_mask'].astype(np.float32)),
                output_hidden_states=True)
  return features, [h.numpy() for h in out.hidden_states]


@pytest.mark.parametrize('name', ['bert', 'xlnet'])
def test_features_match_transformers(name, request, input_file, tmp_path):
  init = request.getfixturevalue(f'{name}_dir')
  module = {'bert': bert_extract, 'xlnet': xlnet_extract}[name]
  encoder = module.load_encoder(init)
  assert encoder.num_layers == 3
  jsonl, npz = str(tmp_path / 'features.jsonl'), str(tmp_path / 'features.npz')
  stats = extract.extract_file(encoder, input_file, jsonl, layers=LAYERS, max_seq_length=SEQ, batch_size=2)
  npz_stats = extract.extract_file(encoder, input_file, npz, layers=LAYERS, max_seq_length=SEQ, batch_size=3)

  # Bad lines: counted, skipped, named with their line numbers.
  for s in (stats, npz_stats):
    assert (s.lines, s.examples, s.bad_lines) == (len(GOOD_LINES) + len(BAD_LINES), len(GOOD_LINES), len(BAD_LINES))
  for (line, reason), message, number in zip(BAD_LINES, stats.warnings, (2, 4, 6, 8)):
    assert f'lines.txt:{number}: skipped: ' in message and reason in message, message

  examples = [e for _, e in extract.read_examples(input_file)]
  assert [e.text_b is not None for e in examples] == [False, True, False, True, True]
  features, hidden = _hf_hidden_states(name, init, encoder, examples)
  assert len(hidden) == 4
  layers = [-1, -3, 1]

  with open(jsonl) as f:
    records = [json.loads(line) for line in f]
  archive = np.load(npz)
  assert archive['line_indices'].tolist() == GOOD_INDICES and archive['layers'].tolist() == layers
  assert [r['linex_index'] for r in records] == GOOD_INDICES
  assert features['input_mask'][3].sum() == SEQ  # The long pair was cut to fill the whole window.
  assert features['input_mask'].sum(1).min() < SEQ  # Others are padded (BERT on the right, XLNet on the left).
  for row, (record, index) in enumerate(zip(records, GOOD_INDICES)):
    keep = np.flatnonzero(features['input_mask'][row])
    tokens = encoder.tokenizer.convert_ids_to_tokens(features['input_ids'][row, keep].tolist())
    assert [f['token'] for f in record['features']] == tokens
    assert archive[f'line_{index}/tokens'].tolist() == tokens
    for layer in layers:
      expected = hidden[1:][layer][row, keep]  # hidden[0] is the embedding output.
      from_npz = archive[f'line_{index}/layer_{layer}']
      assert from_npz.dtype == np.float32 and from_npz.shape == (len(tokens), 32)
      tolerance = RELATIVE * np.abs(expected).max()
      np.testing.assert_allclose(from_npz, expected, atol=tolerance, rtol=0)
      from_jsonl = np.array([[entry['values'] for entry in f['layers'] if entry['index'] == layer][0]
                             for f in record['features']])
      assert [entry['index'] for entry in record['features'][0]['layers']] == layers
      np.testing.assert_allclose(from_jsonl, expected, atol=tolerance + 5e-7, rtol=0)
      # Rounded to 6 decimals (5e-7), from a second run of the encoder, whose float32 results may differ in the
      # last bits (a few 1e-8 here; 1e-6 allowed).
      np.testing.assert_allclose(from_jsonl, from_npz, atol=1.5e-6, rtol=0)
  special = ('[CLS]', '[SEP]') if name == 'bert' else ('<sep>', '<cls>')
  assert all(token in [f['token'] for f in records[1]['features']] for token in special)


def test_layers_and_formats_are_checked():
  assert extract.parse_layers('-1,-2,-3,-4', 4) == [-1, -2, -3, -4]
  assert extract.parse_layers([0, 2], 3) == [0, 2]
  assert extract.parse_layers('', 2) == [-1, -2] and extract.parse_layers('', 12) == [-1, -2, -3, -4]  # the default
  with pytest.raises(ValueError, match=r'layer -4 does not exist: the model has 3 layers \(indices -3\.\.2\)'):
    extract.parse_layers('-1,-4', 3)
  with pytest.raises(ValueError, match='names a layer twice'):
    extract.parse_layers('-1,2', 3)
  with pytest.raises(ValueError, match='comma-separated integers'):
    extract.parse_layers('last', 3)
  assert extract.output_format('out.NPZ', None) == 'npz' and extract.output_format('out.json', None) == 'jsonl'
  with pytest.raises(ValueError, match='format must be one of'):
    extract.output_format('out.txt', 'csv')


def test_command_line(bert_dir, input_file, tmp_path):
  """`python -m bert_jax.extract_features` with the original's flags writes the npz and says what it skipped."""
  out = tmp_path / 'cli.npz'
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=ROOT)
  result = subprocess.run(
      [sys.executable, '-m', 'bert_jax.extract_features', f'--init={bert_dir}', f'--input_file={input_file}',
       f'--output_file={out}', '--layers=-1,-2', f'--max_seq_length={SEQ}', '--batch_size=4'],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert f'5 of 9 lines extracted to {out} (npz); 4 bad lines skipped' in result.stdout
  assert 'lines.txt:6: skipped: not UTF-8' in result.stderr
  archive = np.load(out)
  assert archive['layers'].tolist() == [-1, -2] and archive['line_indices'].tolist() == GOOD_INDICES
  assert archive['line_0/layer_-2'].shape == (len(archive['line_0/tokens']), 32)
