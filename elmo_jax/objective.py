"""ELMo pretraining objective: forward LM + backward LM negative log-likelihood, as a trainer plug-in.

The forward LM at position t predicts token t+1, the backward LM at t predicts token t-1, over the real tokens of
every sentence (`<S>` and `</S>` included as targets, as the reference). Each direction's NLL is summed over the
global batch and divided by the global normalizer `tokens` = the number of real targets of one direction
(sum of `lengths - 1`); loss = forward NLL + backward NLL, `lm_loss` = their mean (the perplexity's exponent).

Softmax: `data.softmax='full'` scores every word; 'sampled' (training only) scores each target against
`data.num_sampled` words drawn log-uniformly (a Zipf law over the frequency-ordered vocabulary), shared by the
batch, with the usual log expected-count correction and accidental hits removed. Evaluation always uses the full
softmax, so its perplexity is exact.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import optax

from common import layers
from common.trainer import Objective
from elmo_jax import model as elmo_model
from elmo_jax import pretrain_data


def compute_dtype(name: str):
  return layers.compute_dtype(name)


def make_model(config: ml_collections.ConfigDict) -> elmo_model.ElmoBiLM:
  return elmo_model.ElmoBiLM(config.model, compute_dtype(config.dtype))


def lm_targets(token_ids: jax.Array, lengths: jax.Array) -> dict:
  """Targets and weights of both directions: `token_ids [batch, length]`, `lengths [batch]` ->
  `{'forward': (targets, weights), 'backward': (targets, weights)}`, each `[batch, length]`."""
  t = jnp.arange(token_ids.shape[1])[None, :]
  real = t < lengths[:, None]
  forward = (jnp.roll(token_ids, -1, axis=1), (real & (t + 1 < lengths[:, None])).astype(jnp.float32))
  backward = (jnp.roll(token_ids, 1, axis=1), (real & (t >= 1)).astype(jnp.float32))
  return {'forward': forward, 'backward': backward}


def log_uniform_probability(ids: jax.Array, vocab_size: int) -> jax.Array:
  """P(id) = log((id + 2) / (id + 1)) / log(vocab_size + 1)."""
  ids = ids.astype(jnp.float32)
  return (jnp.log(ids + 2.0) - jnp.log(ids + 1.0)) / jnp.log(vocab_size + 1.0)


def sample_log_uniform(rng: jax.Array, num_sampled: int, vocab_size: int) -> jax.Array:
  """`[num_sampled] int32` ids drawn with replacement from `log_uniform_probability`."""
  u = jax.random.uniform(rng, (num_sampled,))
  ids = jnp.floor(jnp.exp(u * jnp.log(vocab_size + 1.0))) - 1.0
  return jnp.clip(ids.astype(jnp.int32), 0, vocab_size - 1)


def full_softmax_nll(model, params, h, targets) -> jax.Array:
  """`h [batch, length, P]`, `targets [batch, length]` -> NLL `[batch, length]` over the whole vocabulary."""
  logits = model.apply({'params': params}, h, method=elmo_model.ElmoBiLM.logits)
  return optax.softmax_cross_entropy_with_integer_labels(logits, targets)


def sampled_softmax_nll(model, params, h, targets, rng, num_sampled: int) -> jax.Array:
  """NLL `[batch, length]` of each target against `num_sampled` log-uniform words (see the module docstring)."""
  vocab_size = model.config.vocab_size
  candidates = sample_log_uniform(rng, num_sampled, vocab_size)
  correction = lambda ids: jnp.log(num_sampled * log_uniform_probability(ids, vocab_size))
  true = model.apply({'params': params}, h, targets, method=elmo_model.ElmoBiLM.target_logits) - correction(targets)
  sampled = model.apply({'params': params}, h, candidates, method=elmo_model.ElmoBiLM.candidate_logits)
  sampled = sampled - correction(candidates)
  sampled = jnp.where(candidates[None, None, :] == targets[..., None], -1e30, sampled)
  return jax.nn.logsumexp(jnp.concatenate([true[..., None], sampled], axis=-1), axis=-1) - true


def make_objective(config: ml_collections.ConfigDict) -> Objective:
  model = make_model(config)
  seq_len = config.data.max_seq_length
  sampled = config.data.softmax == 'sampled'
  num_sampled = int(config.data.num_sampled)

  def init_variables(rng):
    batch = pretrain_data.batch_template(seq_len, config.model.max_characters_per_token)
    return model.init({'params': rng}, jnp.asarray(batch['char_ids']), jnp.asarray(batch['lengths']))

  def normalizers(batch):
    return {'tokens': jnp.maximum(jnp.sum(jnp.maximum(batch['lengths'] - 1, 0)).astype(jnp.float32), 1.0)}

  def loss_fn(params, batch, rng, aux, norms, train):
    dropout_rng, forward_rng, backward_rng = jax.random.split(rng, 3)
    tops = model.apply({'params': params}, batch['char_ids'], batch['lengths'], not train,
                       method=elmo_model.ElmoBiLM.language_model, rngs={'dropout': dropout_rng})
    targets = lm_targets(batch['token_ids'], batch['lengths'])
    sums = {}
    for name, h, sample_rng in zip(('forward', 'backward'), tops, (forward_rng, backward_rng)):
      ids, weights = targets[name]
      if sampled and train:
        nll = sampled_softmax_nll(model, params, h, ids, sample_rng, num_sampled)
      else:
        nll = full_softmax_nll(model, params, h, ids)
      sums[f'{name}_loss'] = jnp.sum(nll * weights)
    loss = (sums['forward_loss'] + sums['backward_loss']) / norms['tokens']
    return loss, (sums, aux)

  def finalize(sums, norms):
    out = {k: sums[k] / norms['tokens'] for k in ('forward_loss', 'backward_loss')}
    out['lm_loss'] = 0.5 * (out['forward_loss'] + out['backward_loss'])
    out['loss'] = out['forward_loss'] + out['backward_loss']
    return out

  columns = num_sampled + 1 if sampled else config.model.vocab_size
  return Objective(init_variables=init_variables, loss_fn=loss_fn, normalizers=normalizers, finalize=finalize,
                   flops_per_example=elmo_model.flops_per_token(config.model, columns) * seq_len,
                   tokens_per_example=seq_len, perplexity_of='lm_loss')
