"""The original google-research/bert checkpoints -> our BERT params and a Hugging Face directory.

Command line (a release directory such as `uncased_L-12_H-768_A-12/` -> a `BertForPreTraining` directory):
  python -m bert_jax.import_tf --tf_dir uncased_L-12_H-768_A-12 --out bert_base_uncased_hf

Python API:
  load_tf_dir(tf_dir)                    (cfg, params) from `bert_model.ckpt.*` + `bert_config.json`
  import_tf_dir(tf_dir, out, ...)        that, written by `export.save_hf_dir` with `vocab.txt`

Every variable is mapped by the name `modeling.py` / `run_pretraining.py` give it:
  bert/embeddings/{word,position,token_type}_embeddings  [rows, hidden]       -> .../embedding
  bert/embeddings/LayerNorm/{gamma,beta}                                       -> LayerNorm/{scale,bias}
  bert/encoder/layer_N/attention/self/{query,key,value}/kernel [hidden, hidden] -> [hidden, heads, head_dim]
  bert/encoder/layer_N/attention/self/{query,key,value}/bias   [hidden]         -> [heads, head_dim]
  bert/encoder/layer_N/attention/output/dense/kernel   [hidden, hidden]       -> [heads, head_dim, hidden]
  bert/encoder/layer_N/attention/output/LayerNorm, intermediate/dense, output/dense, output/LayerNorm
  bert/pooler/dense/{kernel,bias}
  cls/predictions/transform/dense/{kernel,bias}, cls/predictions/transform/LayerNorm/{gamma,beta}
  cls/predictions/output_bias [vocab]; the MLM decoder is the word embedding (tied, as in the original)
  cls/seq_relationship/output_weights [2, hidden] -> nsp/kernel [hidden, 2] (transposed), output_bias [2]
Dense kernels are `[in, out]` in both; the head splits are reshapes (TF orders the columns head-major, as we do).
`global_step` and the optimizer slots (`.../adam_m`, `.../adam_v`) are skipped; any other variable, a missing one
or a wrong shape is refused naming it. `hidden_act: gelu` is read as the exact erf GELU (`transformers`' reading
of these configs; the original modeling.py later switched to the tanh approximation: pass `--activation=gelu_new`
for that).
"""
from __future__ import annotations

import functools
from typing import Any, Mapping

import ml_collections
from absl import logging

from bert_jax import export
from common import run as run_lib
from common import tf_checkpoint
from common.config import UserError
from common.tf_checkpoint import Variable, to

CHECKPOINT_NAME = 'bert_model.ckpt'
CONFIG_NAME = 'bert_config.json'
VOCAB_NAME = 'vocab.txt'


def variable_table(cfg: ml_collections.ConfigDict) -> list[Variable]:
  """Every variable of an original BERT pretraining checkpoint for `cfg`, with its shape and our parameter(s)."""
  h, heads, f, v = cfg.hidden_size, cfg.num_attention_heads, cfg.intermediate_size, cfg.vocab_size
  d = h // heads
  table = []

  def dense(theirs, ours, n_in, n_out, kernel_fn=None, bias_fn=None):
    table.append(Variable(f'{theirs}/kernel', (n_in, n_out), to(f'{ours}/kernel', kernel_fn)))
    table.append(Variable(f'{theirs}/bias', (n_out,), to(f'{ours}/bias', bias_fn)))

  def norm(theirs, ours):
    table.append(Variable(f'{theirs}/gamma', (h,), to(f'{ours}/scale')))
    table.append(Variable(f'{theirs}/beta', (h,), to(f'{ours}/bias')))

  for name, rows in (('word_embeddings', v), ('position_embeddings', cfg.max_position_embeddings),
                     ('token_type_embeddings', cfg.type_vocab_size)):
    table.append(Variable(f'bert/embeddings/{name}', (rows, h), to(f'bert/embeddings/{name}/embedding')))
  norm('bert/embeddings/LayerNorm', 'bert/embeddings/LayerNorm')
  split_out = lambda x: x.reshape(h, heads, d)  # noqa: E731  [hidden, heads * head_dim] -> [hidden, heads, head_dim]
  split_bias = lambda x: x.reshape(heads, d)  # noqa: E731
  split_in = lambda x: x.reshape(heads, d, h)  # noqa: E731  [heads * head_dim, hidden] -> [heads, head_dim, hidden]
  for i in range(cfg.num_hidden_layers):
    theirs, ours = f'bert/encoder/layer_{i}', f'bert/layer_{i}'
    for name in ('query', 'key', 'value'):
      dense(f'{theirs}/attention/self/{name}', f'{ours}/{name}', h, h, split_out, split_bias)
    dense(f'{theirs}/attention/output/dense', f'{ours}/attention_output', h, h, split_in)
    norm(f'{theirs}/attention/output/LayerNorm', f'{ours}/attention_LayerNorm')
    dense(f'{theirs}/intermediate/dense', f'{ours}/intermediate', h, f)
    dense(f'{theirs}/output/dense', f'{ours}/output', f, h)
    norm(f'{theirs}/output/LayerNorm', f'{ours}/output_LayerNorm')
  dense('bert/pooler/dense', 'bert/pooler', h, h)
  dense('cls/predictions/transform/dense', 'mlm_transform', h, h)
  norm('cls/predictions/transform/LayerNorm', 'mlm_LayerNorm')
  table.append(Variable('cls/predictions/output_bias', (v,), to('mlm_output_bias')))
  table.append(Variable('cls/seq_relationship/output_weights', (2, h), to('nsp/kernel', lambda x: x.T)))
  table.append(Variable('cls/seq_relationship/output_bias', (2,), to('nsp/bias')))
  return table


def config_from_tf(config: Mapping[str, Any], activation: str | None = None) -> ml_collections.ConfigDict:
  """A `bert_config.json` dict -> our model config (`activation` replaces `hidden_act`)."""
  config = dict(config, model_type='bert')
  if activation:
    config['hidden_act'] = activation
  try:
    return export.config_from_hf(config)
  except ValueError as e:
    raise UserError(str(e).replace('config.json', CONFIG_NAME)) from e


def load_tf_dir(tf_dir: str, *, activation: str | None = None) -> tuple[ml_collections.ConfigDict, dict[str, Any]]:
  """(cfg, params) from an original BERT release directory (or a checkpoint prefix `DIR/model.ckpt-N`): params
  are float32 numpy, the tree `bert_jax.model.BertForPreTraining` uses."""
  def build(config):
    cfg = config_from_tf(config, activation)
    return cfg, variable_table(cfg), {}
  cfg, params, _ = tf_checkpoint.load(tf_dir, checkpoint_name=CHECKPOINT_NAME, config_name=CONFIG_NAME,
                                      what='BERT', build=build, our_shapes=export.LAYOUT.our_shapes)
  return cfg, params


def load_for_init(tf_dir: str) -> tuple[ml_collections.ConfigDict, dict[str, Any]]:
  """`load_tf_dir` for `export.load_hf_dir` (fine-tuning `--init`, `config.init_from`), which reads no
  `tokenizer_config.json` here and so lower-cases: a cased release is reported."""
  if not tf_checkpoint.guess_lower_case(tf_dir, True):
    logging.warning('%s looks cased, but without a tokenizer_config.json its vocabulary is used lower-casing; '
                    'import it with python -m bert_jax.import_tf --tf_dir %s --out DIR and use DIR instead',
                    tf_dir, tf_dir)
  return load_tf_dir(tf_dir)


def import_tf_dir(tf_dir: str, out: str, *, do_lower_case: bool | None = None,
                  activation: str | None = None) -> list[str]:
  """Writes the release at `tf_dir` as a `BertForPreTraining` directory at `out` (weights, config, `vocab.txt`
  and tokenizer config); returns the paths written. `do_lower_case` None: from the directory name (`cased_...`
  is cased, anything else lower-cases, as the original `uncased_...` and `chinese_...` releases)."""
  return tf_checkpoint.write_hf_dir(
      tf_dir, out, load=functools.partial(load_tf_dir, activation=activation), save=export.save_hf_dir,
      checkpoint_name=CHECKPOINT_NAME, tokenizer_name=VOCAB_NAME, do_lower_case=do_lower_case,
      default_lower_case=True, origin='google-research/bert')


define_flags = functools.partial(tf_checkpoint.define_flags, CHECKPOINT_NAME, CONFIG_NAME, VOCAB_NAME,
                                 'false when the directory name says "cased" but not "uncased", else true')
main = functools.partial(tf_checkpoint.main, import_dir=import_tf_dir)


if __name__ == '__main__':
  define_flags()
  run_lib.app_run(main)
