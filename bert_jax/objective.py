"""BERT pretraining objective (masked LM + next-sentence prediction) as a trainer plug-in.

Losses follow the original `run_pretraining.py`: the MLM loss is the weighted mean over predicted positions
(sum(nll * weight) / (sum(weight) + 1e-5)), the NSP loss the mean over examples; total = MLM + NSP (NSP omitted
when `data.next_sentence` is False). Both denominators are computed over the whole global batch.
"""
from __future__ import annotations

import jax.numpy as jnp
import ml_collections
import optax

from bert_jax import model as bert_model
from common import layers
from common.trainer import Objective


def compute_dtype(name: str):
  return layers.compute_dtype(name)


def make_model(config: ml_collections.ConfigDict) -> bert_model.BertForPreTraining:
  return bert_model.BertForPreTraining(config.model, compute_dtype(config.dtype), remat=config.remat)


def dummy_batch(batch_size: int, seq_len: int, num_predictions: int) -> dict:
  ids = jnp.zeros((batch_size, seq_len), jnp.int32)
  return dict(input_ids=ids, segment_ids=ids, input_mask=jnp.ones_like(ids),
              masked_lm_positions=jnp.zeros((batch_size, num_predictions), jnp.int32),
              masked_lm_ids=jnp.zeros((batch_size, num_predictions), jnp.int32),
              masked_lm_weights=jnp.zeros((batch_size, num_predictions), jnp.float32),
              next_sentence_labels=jnp.zeros((batch_size,), jnp.int32))


def mlm_nsp_sums(mlm_logits, nsp_logits, batch, use_nsp: bool) -> dict:
  """Scalar sums over the batch: MLM nll / correct (weighted), NSP nll / correct."""
  weights = batch['masked_lm_weights'].astype(jnp.float32)
  labels = batch['masked_lm_ids']
  nll = optax.softmax_cross_entropy_with_integer_labels(mlm_logits, labels)
  correct = layers.argmax_hits(mlm_logits, labels)
  sums = dict(mlm_loss=jnp.sum(nll * weights), mlm_correct=jnp.sum(correct * weights))
  if use_nsp:
    nsp_labels = batch['next_sentence_labels']
    sums.update(nsp_loss=jnp.sum(optax.softmax_cross_entropy_with_integer_labels(nsp_logits, nsp_labels)),
                nsp_correct=jnp.sum(layers.argmax_hits(nsp_logits, nsp_labels)))
  return sums


def make_objective(config: ml_collections.ConfigDict) -> Objective:
  model = make_model(config)
  seq_len = config.data.max_seq_length
  num_predictions = config.data.max_predictions_per_seq
  use_nsp = bool(config.data.next_sentence)

  def init_variables(rng):
    b = dummy_batch(1, seq_len, num_predictions)
    return model.init({'params': rng}, b['input_ids'], b['segment_ids'], b['input_mask'], b['masked_lm_positions'])

  def normalizers(batch):
    norms = {'mlm': jnp.sum(batch['masked_lm_weights'].astype(jnp.float32)) + 1e-5}
    if use_nsp:
      norms['nsp'] = jnp.asarray(batch['next_sentence_labels'].shape[0], jnp.float32)
    return norms

  def loss_fn(params, batch, rng, aux, norms, train):
    mlm_logits, nsp_logits = model.apply(
        {'params': params}, batch['input_ids'], batch['segment_ids'], batch['input_mask'],
        batch['masked_lm_positions'], deterministic=not train, rngs={'dropout': rng})
    sums = mlm_nsp_sums(mlm_logits, nsp_logits, batch, use_nsp)
    loss = sums['mlm_loss'] / norms['mlm']
    if use_nsp:
      loss = loss + sums['nsp_loss'] / norms['nsp']
    return loss, (sums, aux)

  def finalize(sums, norms):
    out = dict(mlm_loss=sums['mlm_loss'] / norms['mlm'], mlm_accuracy=sums['mlm_correct'] / norms['mlm'])
    total = out['mlm_loss']
    if use_nsp:
      out.update(nsp_loss=sums['nsp_loss'] / norms['nsp'], nsp_accuracy=sums['nsp_correct'] / norms['nsp'])
      total = total + out['nsp_loss']
    out['loss'] = total  # the objective's loss, under the name every objective uses
    return out

  return Objective(init_variables=init_variables, loss_fn=loss_fn, normalizers=normalizers, finalize=finalize,
                   flops_per_example=bert_model.flops_per_example(config.model, seq_len, num_predictions, use_nsp),
                   tokens_per_example=seq_len, perplexity_of='mlm_loss')
