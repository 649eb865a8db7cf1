"""GPT pretraining objective (causal language modelling) as a trainer plug-in.

Every position predicts the next token of its row. The loss is the sum of the token NLLs over the micro-batch
divided by the number of real target tokens in the whole global batch (`normalizers`, computed before
micro-batching), so gradient accumulation and any sharding give the gradient of one big batch; eval perplexity is
exp of the mean NLL per target token (`perplexity_of='lm_loss'`).
"""
from __future__ import annotations

import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from common import layers
from common.trainer import Objective
from gpt_jax import model as gpt_model
from gpt_jax import pretrain_data


def make_model(config: ml_collections.ConfigDict) -> gpt_model.GPTLMHeadModel:
  return gpt_model.GPTLMHeadModel(config.model, layers.compute_dtype(config.dtype), remat=config.remat)


def batch_template(config: ml_collections.ConfigDict, batch_size: int = 0) -> dict[str, np.ndarray]:
  """A host batch of `batch_size` empty rows with the loader's names, shapes and dtypes."""
  return pretrain_data.rows_to_batch([np.zeros([1], np.int32)] * batch_size, config.data.max_seq_length)


def lm_sums(logits, batch) -> dict:
  """Scalar sums over the batch: `lm_loss` (NLL) and `lm_correct` (arg max == target), weighted by
  `target_weights`. logits `[batch, length, vocab]`, targets and weights `[batch, length]`."""
  weights = batch['target_weights'].astype(jnp.float32)
  labels = batch['target_ids']
  nll = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  correct = layers.argmax_hits(logits, labels)
  return dict(lm_loss=jnp.sum(nll * weights), lm_correct=jnp.sum(correct * weights))


def make_objective(config: ml_collections.ConfigDict) -> Objective:
  model = make_model(config)
  seq_len = config.data.max_seq_length

  def init_variables(rng):
    return model.init({'params': rng}, jnp.zeros((1, seq_len), jnp.int32))

  def normalizers(batch):
    return {'lm': jnp.maximum(jnp.sum(batch['target_weights'].astype(jnp.float32)), 1.0)}

  def loss_fn(params, batch, rng, aux, norms, train):
    logits, _ = model.apply({'params': params}, batch['input_ids'], deterministic=not train,
                            rngs={'dropout': rng})
    sums = lm_sums(logits, batch)
    return sums['lm_loss'] / norms['lm'], (sums, aux)

  def finalize(sums, norms):
    lm_loss = sums['lm_loss'] / norms['lm']
    return dict(lm_loss=lm_loss, lm_accuracy=sums['lm_correct'] / norms['lm'], loss=lm_loss)

  return Objective(init_variables=init_variables, loss_fn=loss_fn, normalizers=normalizers, finalize=finalize,
                   flops_per_example=gpt_model.flops_per_example(config.model, seq_len), tokens_per_example=seq_len,
                   perplexity_of='lm_loss')
