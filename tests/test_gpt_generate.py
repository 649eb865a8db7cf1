"""Generation: decoding with the KV cache equals decoding without it token for token (greedy and sampled), our
greedy decoding equals `transformers`' `generate(do_sample=False)` on the exported model, the top-k / top-p cuts
keep what they should, and the command line continues a prompt from an HF directory."""
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
import transformers

from gpt_jax import export, generate, model as gpt_model
from gpt_jax import tokenizer as gpt_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def config(layout):
  return gpt_model.model_config(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=128, max_position_embeddings=32, layout=layout,
                                initializer_range=0.3)


def params_of(cfg, seed=0):
  return export.init_params(cfg, jax.random.PRNGKey(seed))


PROMPT = np.random.RandomState(0).randint(0, 97, (3, 5))


@pytest.mark.parametrize('layout, sampling', [('gpt1', generate.Sampling(greedy=True)),
                                              ('gpt2', generate.Sampling(temperature=0.8, top_k=10, top_p=0.9))])
def test_cached_equals_uncached(layout, sampling):
  cfg = config(layout)
  params = params_of(cfg)
  kwargs = dict(max_new_tokens=12, sampling=sampling, rng=jax.random.PRNGKey(4))
  cached = generate.generate(cfg, params, PROMPT, **kwargs)
  uncached = generate.generate(cfg, params, PROMPT, use_cache=False, **kwargs)
  np.testing.assert_array_equal(cached, uncached)
  np.testing.assert_array_equal(cached[:, :5], PROMPT)
  assert len(set(map(tuple, cached[:, 5:].tolist()))) == 3, 'rows should differ'


@pytest.mark.parametrize('layout', ['gpt1', 'gpt2'])
def test_greedy_equals_transformers_generate(layout, tmp_path):
  cfg = config(layout)
  params = params_of(cfg, seed=1)
  export.save_hf_dir(str(tmp_path), cfg, params)
  cls = transformers.OpenAIGPTLMHeadModel if layout == 'gpt1' else transformers.GPT2LMHeadModel
  model = cls.from_pretrained(str(tmp_path)).float().eval()
  with torch.no_grad():
    theirs = model.generate(torch.from_numpy(PROMPT), attention_mask=torch.ones(PROMPT.shape, dtype=torch.long),
                            do_sample=False, max_new_tokens=15, min_new_tokens=15, pad_token_id=0).numpy()
  ours = generate.generate(cfg, params, PROMPT, max_new_tokens=15, sampling=generate.Sampling(greedy=True))
  np.testing.assert_array_equal(ours, theirs)


def test_eos_ends_a_row():
  cfg = config('gpt2')
  params = params_of(cfg)
  free = generate.generate(cfg, params, PROMPT, max_new_tokens=10, sampling=generate.Sampling(greedy=True))
  eos = int(free[0, 7])  # the third generated token of row 0 becomes the end of text
  out = generate.generate(cfg, params, PROMPT, max_new_tokens=10, sampling=generate.Sampling(greedy=True),
                          eos_id=eos)
  first = 5 + int(np.argmax(free[0, 5:] == eos))
  assert (out[0, first:] == eos).all() and (out[0, :first] == free[0, :first]).all()


def test_top_k_and_top_p_cuts():
  logits = np.log(np.array([[0.5, 0.2, 0.15, 0.1, 0.05]], np.float32))
  kept = lambda s: np.isfinite(np.asarray(generate.filter_logits(logits, s)))[0].tolist()
  assert kept(generate.Sampling(top_k=2)) == [True, True, False, False, False]
  assert kept(generate.Sampling(top_p=0.5)) == [True, False, False, False, False]
  assert kept(generate.Sampling(top_p=0.8)) == [True, True, True, False, False]  # 0.5 + 0.2 < 0.8
  assert kept(generate.Sampling(top_p=1.0)) == [True] * 5
  draws = [int(generate.choose_next(logits, jax.random.PRNGKey(i), generate.Sampling(top_k=2))[0])
           for i in range(50)]
  assert set(draws) == {0, 1}


def test_command_line_from_hf_directory(tmp_path):
  corpus = tmp_path / 'corpus.txt'
  corpus.write_text('the cat sat on the mat.\nthe dog sat on the log.\n\n' * 30)
  vocab_file = gpt_tokenizer.train_bpe([str(corpus)], 280, str(tmp_path / 'tok'))
  cfg = config('gpt2')
  cfg.vocab_size = 280
  export.save_hf_dir(str(tmp_path / 'hf'), cfg, params_of(cfg), vocab_file)
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=ROOT)
  result = subprocess.run([sys.executable, '-m', 'gpt_jax.generate', '--init', str(tmp_path / 'hf'),
                           '--prompt', 'the cat', '--max_new_tokens', '8', '--greedy'],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.startswith('the cat') and len(result.stdout.strip()) > len('the cat')
  result = subprocess.run([sys.executable, '-m', 'gpt_jax.generate', '--init', str(tmp_path / 'nowhere'),
                           '--prompt', 'x'], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
  assert result.returncode == 2 and result.stderr.strip().splitlines()[-1].startswith('error: --init')
