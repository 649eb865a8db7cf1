"""The GPT model: no information flows from later positions (the causal leak test), both layouts do what their
names say, and `flops_per_example` counts what the compiled train step executes.

Leak test: for every position t, the gradient of a random projection of logit_t with respect to every input
embedding j is exactly 0 for j > t (and not 0 for j <= t), in eval mode and with dropout. The gradients are taken
as one vjp per position, vmapped over 16 positions at a time (JAX 0.10.2 on CPU computes `jit(vmap(vjp))` through
LayerNorm wrongly for 64 or more cotangents, so no full Jacobian in one call).

FLOP count: as tests/test_flop_counts.py for BERT and XLNet, the train step is compiled on one device and
`global_batch_size * flops_per_example` must lie within 10 % below XLA's `cost_analysis()` total and within 1 % of
the matmul FLOPs of the compiled HLO.
"""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from common import optim, trainer
from gpt_jax import model as gpt_model
from gpt_jax import objective as gpt_objective
from tests.test_flop_counts import compile_step, hlo_dot_flops, xla_flops

SEQ = 16


def small_config(layout, **overrides):
  fields = dict(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                max_position_embeddings=SEQ, layout=layout, initializer_range=0.2)
  return gpt_model.model_config(**{**fields, **overrides})


@pytest.mark.parametrize('layout', ['gpt1', 'gpt2'])
@pytest.mark.parametrize('deterministic', [True, False])
def test_no_gradient_flows_from_later_positions(layout, deterministic):
  cfg = small_config(layout)
  model = gpt_model.GPTLMHeadModel(cfg)
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, SEQ), jnp.int32))['params']
  embeds = jax.random.normal(jax.random.PRNGKey(1), (1, SEQ, cfg.hidden_size))
  projection = jax.random.normal(jax.random.PRNGKey(2), (SEQ, cfg.vocab_size))

  def logits_of(x):
    logits, _ = model.apply({'params': params}, None, inputs_embeds=x, deterministic=deterministic,
                            rngs={'dropout': jax.random.PRNGKey(3)})
    return logits[0]  # [SEQ, vocab]

  _, vjp = jax.vjp(logits_of, embeds)

  def grad_at(t):
    cotangent = jnp.zeros((SEQ, cfg.vocab_size)).at[t].set(projection[t])
    return vjp(cotangent)[0][0]  # [SEQ, hidden]: d(projection . logit_t) / d embedding_j

  grads = np.asarray(jax.vmap(grad_at)(jnp.arange(SEQ)))  # [t, j, hidden]
  per_pair = np.abs(grads).max(-1)
  later = np.triu(np.ones((SEQ, SEQ), bool), k=1)
  assert (per_pair[later] == 0).all(), f'leak from later positions: max {per_pair[later].max()}'
  assert (per_pair[~later] > 0).all(), 'an earlier position has no influence'


def test_layouts():
  """gpt2 has a final LayerNorm and gpt1 none; changing the input at position 5 changes only logits >= 5; the
  rematerialised model computes the same logits."""
  params1 = gpt_model.GPTLMHeadModel(small_config('gpt1')).init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))
  params2 = gpt_model.GPTLMHeadModel(small_config('gpt2')).init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))
  assert 'final_LayerNorm' not in params1['params']['gpt'] and 'final_LayerNorm' in params2['params']['gpt']
  assert set(params1['params']['gpt']['layer_0']) == set(params2['params']['gpt']['layer_0'])
  model = gpt_model.GPTLMHeadModel(small_config('gpt1'))
  ids = np.arange(SEQ)[None] % 50
  changed = ids.copy()
  changed[0, 5] = 7
  a, _ = model.apply(params1, ids)
  b, _ = model.apply(params1, changed)
  diff = np.abs(np.asarray(a) - np.asarray(b)).max(-1)[0]
  assert (diff[:5] == 0).all() and (diff[5:] > 0).all()
  rematerialised, _ = gpt_model.GPTLMHeadModel(small_config('gpt1'), remat=True).apply(params1, ids)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(rematerialised))


def test_bad_model_config_refused():
  from common.config import ConfigError
  with pytest.raises(ConfigError, match='config.model.layout'):
    gpt_model.validate_model_config(small_config('gpt3'))
  with pytest.raises(ConfigError, match='config.model.hidden_size'):
    gpt_model.validate_model_config(small_config('gpt1', num_attention_heads=5))


def flop_case(layout, layers, seq, batch=8):
  config = trainer.trainer_config(num_train_steps=10, global_batch_size=batch, log_every=1, eval_every=0,
                                  num_eval_batches=0, checkpoint_every=0, progress_bar=False)
  config.model = gpt_model.model_config(vocab_size=1000, hidden_size=256, num_hidden_layers=layers,
                                        num_attention_heads=4, intermediate_size=1024, max_position_embeddings=seq,
                                        layout=layout)
  config.data = ml_collections.ConfigDict(dict(max_seq_length=seq))
  config.optim = optim.optim_config(learning_rate=1e-3, warmup_steps=2, weight_decay=0.01)
  config.dtype, config.remat = 'float32', False
  return config, gpt_objective.make_objective(config), gpt_objective.batch_template(config, batch)


@pytest.mark.parametrize('layout, layers, seq', [('gpt1', 2, 64), ('gpt2', 1, 32)])
def test_flops_per_example_matches_compiled_step(layout, layers, seq):
  config, objective, batch = flop_case(layout, layers, seq)
  compiled = compile_step(config, objective, batch)
  ours = config.global_batch_size * objective.flops_per_example
  total = xla_flops(compiled)
  dots = hlo_dot_flops(compiled.as_text())
  assert 0.9 * total <= ours <= total, f'ours {ours:.4e}, XLA cost_analysis {total:.4e} ({ours / total:.3f})'
  assert ours == pytest.approx(dots, rel=0.01), f'ours {ours:.4e}, HLO matmuls {dots:.4e} ({ours / dots:.4f})'
