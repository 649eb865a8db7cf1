"""The original zihangdai/xlnet checkpoints -> our XLNet params and a Hugging Face directory.

Command line (a release directory such as `xlnet_cased_L-24_H-1024_A-16/` -> an `XLNetLMHeadModel` directory):
  python -m xlnet_jax.import_tf --tf_dir xlnet_cased_L-24_H-1024_A-16 --out xlnet_large_cased_hf

Python API:
  load_tf_dir(tf_dir)                    (cfg, params) from `xlnet_model.ckpt.*` + `xlnet_config.json`
  import_tf_dir(tf_dir, out, ...)        that, written by `export.save_hf_dir` with `spiece.model`

Every variable is mapped by the name `modeling.py` (`transformer_xl`, `lm_loss`, under `model/`) gives it:
  model/transformer/word_embedding/lookup_table [n_token, d_model]   -> transformer/word_embedding/embedding
  model/transformer/mask_emb/mask_emb [1, 1, d_model]                -> transformer/mask_emb
  model/transformer/r_{w,r,s}_bias  untie_r: [n_layer, n_head, d_head] -> layer_N/rel_attn/r_{w,r,s}_bias
                                    else:    [n_head, d_head]          -> transformer/r_{w,r,s}_bias (shared)
  model/transformer/seg_embed [n_layer, 2, n_head, d_head]           -> layer_N/rel_attn/seg_embed
  model/transformer/layer_N/rel_attn/{q,k,v,o,r}/kernel [d_model, n_head, d_head] (same layout)
  model/transformer/layer_N/rel_attn/LayerNorm/{gamma,beta}          -> rel_attn/layer_norm/{scale,bias}
  model/transformer/layer_N/ff/layer_{1,2}/{kernel,bias} ([in, out]), ff/LayerNorm/{gamma,beta}
  model/lm_loss/bias [n_token]; the output layer is the word embedding (`tie_weight`); an untied
  model/lm_loss/weight is accepted only if it equals it.
`global_step` and the optimizer slots (`.../adam_m`, `.../adam_v`) are skipped; any other variable (a fine-tuning
head, say), a missing one or a wrong shape is refused naming it. `ff_activation: gelu` is read as the tanh
approximation (`gelu_new`), the only GELU the original modeling.py has (`transformers`' own conversions used the
exact form: pass `--activation=gelu` for that). The run options absent from `xlnet_config.json` (mem_len, ...) take
`transformers`' defaults.
"""
from __future__ import annotations

import functools
from typing import Any, Mapping

import ml_collections

from common import run as run_lib
from common import tf_checkpoint
from common.config import UserError
from common.tf_checkpoint import Variable, per_layer, to
from xlnet_jax import export

CHECKPOINT_NAME = 'xlnet_model.ckpt'
CONFIG_NAME = 'xlnet_config.json'
SPIECE_NAME = 'spiece.model'
# The original activation names -> ours: modeling.py's `gelu` is the tanh approximation.
_ORIGINAL_ACTIVATIONS = {'gelu': 'gelu_new', 'relu': 'relu'}
_T = 'model/transformer'


def variable_table(cfg: ml_collections.ConfigDict) -> tuple[list[Variable], dict[str, str]]:
  """(every variable of an original XLNet pretraining checkpoint for `cfg`, with its shape and our parameter(s);
  the tied variables: `model/lm_loss/weight` -> the word embedding)."""
  d, n, dh, f, v, layers = cfg.d_model, cfg.n_head, cfg.d_head, cfg.d_inner, cfg.vocab_size, cfg.n_layer
  table = [Variable(f'{_T}/word_embedding/lookup_table', (v, d), to('transformer/word_embedding/embedding')),
           Variable(f'{_T}/mask_emb/mask_emb', (1, 1, d), to('transformer/mask_emb')),
           Variable(f'{_T}/seg_embed', (layers, 2, n, dh), per_layer('transformer/layer_{}/rel_attn/seg_embed')),
           Variable('model/lm_loss/bias', (v,), to('lm_loss/bias'))]
  for name in export.SHARED_BIASES:
    if cfg.untie_r:
      table.append(Variable(f'{_T}/{name}', (layers, n, dh), per_layer(f'transformer/layer_{{}}/rel_attn/{name}')))
    else:
      table.append(Variable(f'{_T}/{name}', (n, dh), to(f'transformer/{name}')))
  for i in range(layers):
    theirs, ours = f'{_T}/layer_{i}', f'transformer/layer_{i}'
    for name in ('q', 'k', 'v', 'o', 'r'):
      table.append(Variable(f'{theirs}/rel_attn/{name}/kernel', (d, n, dh), to(f'{ours}/rel_attn/{name}/kernel')))
    for block in ('rel_attn', 'ff'):
      table.append(Variable(f'{theirs}/{block}/LayerNorm/gamma', (d,), to(f'{ours}/{block}/layer_norm/scale')))
      table.append(Variable(f'{theirs}/{block}/LayerNorm/beta', (d,), to(f'{ours}/{block}/layer_norm/bias')))
    for dense, n_in, n_out in (('layer_1', d, f), ('layer_2', f, d)):
      table.append(Variable(f'{theirs}/ff/{dense}/kernel', (n_in, n_out), to(f'{ours}/ff/{dense}/kernel')))
      table.append(Variable(f'{theirs}/ff/{dense}/bias', (n_out,), to(f'{ours}/ff/{dense}/bias')))
  return table, {'model/lm_loss/weight': f'{_T}/word_embedding/lookup_table'}


def config_from_tf(config: Mapping[str, Any], activation: str | None = None) -> ml_collections.ConfigDict:
  """An `xlnet_config.json` dict (`n_token, d_model, n_layer, n_head, d_head, d_inner, ff_activation, untie_r`)
  -> our model config; `activation` replaces the original `ff_activation`, which is read as modeling.py means it."""
  config = dict(config, model_type='xlnet')
  original = config.get('ff_activation', 'gelu')
  if activation:
    config['ff_activation'] = activation
  elif original in _ORIGINAL_ACTIVATIONS:
    config['ff_activation'] = _ORIGINAL_ACTIVATIONS[original]
  else:
    raise UserError(f'{CONFIG_NAME} ff_activation: the original code knows only gelu and relu, got {original!r}')
  config.setdefault('untie_r', False)  # modeling.py's default; the released configs all say true
  try:
    return export.config_from_hf(config)
  except ValueError as e:
    raise UserError(str(e).replace('config.json', CONFIG_NAME)) from e


def load_tf_dir(tf_dir: str, *, activation: str | None = None) -> tuple[ml_collections.ConfigDict, dict[str, Any]]:
  """(cfg, params) from an original XLNet release directory (or a checkpoint prefix `DIR/model.ckpt-N`): params
  are float32 numpy, the tree `xlnet_jax.model.XLNetLMHeadModel` uses."""
  def build(config):
    cfg = config_from_tf(config, activation)
    table, tied = variable_table(cfg)
    return cfg, table, tied
  cfg, params, _ = tf_checkpoint.load(tf_dir, checkpoint_name=CHECKPOINT_NAME, config_name=CONFIG_NAME,
                                      what='XLNet', build=build, our_shapes=export.LAYOUT.our_shapes)
  return cfg, params


def import_tf_dir(tf_dir: str, out: str, *, do_lower_case: bool | None = None,
                  activation: str | None = None) -> list[str]:
  """Writes the release at `tf_dir` as an `XLNetLMHeadModel` directory at `out` (weights, config, `spiece.model`
  and tokenizer config); returns the paths written. `do_lower_case` None: true only when the directory name says
  "uncased" (the released XLNet models are cased)."""
  return tf_checkpoint.write_hf_dir(
      tf_dir, out, load=functools.partial(load_tf_dir, activation=activation), save=export.save_hf_dir,
      checkpoint_name=CHECKPOINT_NAME, tokenizer_name=SPIECE_NAME, do_lower_case=do_lower_case,
      default_lower_case=False, origin='zihangdai/xlnet')


define_flags = functools.partial(tf_checkpoint.define_flags, CHECKPOINT_NAME, CONFIG_NAME, SPIECE_NAME,
                                 'true only when the directory name says "uncased"')
main = functools.partial(tf_checkpoint.main, import_dir=import_tf_dir)


if __name__ == '__main__':
  define_flags()
  run_lib.app_run(main)
