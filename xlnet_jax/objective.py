"""XLNet permutation language modelling as a trainer plug-in.

Per step, inside the jitted function: sample a factorisation order per row from (`is_target`, `is_special`)
(`xlnet_jax.permutation`), run the two-stream model with the memory carried from the previous step, and score the
query stream's predictions of the target tokens (the input tokens themselves at the target positions). The loss is
the mean negative log-likelihood over all targets of the global batch (the original `train.py` averages over
`target_mask`). The memory (`aux['mems']`, `[batch, n_layer, mem_len, d_model]`) is the stop-gradient of each
layer's last `mem_len` hidden states, carried to the next step where row b continues row b's text stream.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import optax

from common import layers, sharding
from common.trainer import Objective
from xlnet_jax import model as xlnet_model
from xlnet_jax import permutation
from xlnet_jax import pretrain_data

def compute_dtype(name: str):
  """float32 or bfloat16: float16's range cannot hold the attention masks' large negative logits."""
  return layers.compute_dtype(name, allowed=('float32', 'bfloat16'))


def make_model(config: ml_collections.ConfigDict) -> xlnet_model.XLNetLMHeadModel:
  return xlnet_model.XLNetLMHeadModel(config.model, compute_dtype(config.dtype), remat=config.remat)


def num_targets(batch) -> jax.Array:
  """Targets per row that the sampler keeps: real targets, specials excluded, at most num_predict (per row)."""
  return jnp.sum(batch['is_target'].astype(bool) & ~batch['is_special'].astype(bool), axis=1)


def make_objective(config: ml_collections.ConfigDict) -> Objective:
  model = make_model(config)
  cfg, data = config.model, config.data
  seq_len, num_predict, mem_len = data.seq_len, data.num_predict, cfg.mem_len
  perm_size = pretrain_data.effective_perm_size(data)

  def init_variables(rng):
    ids = jnp.zeros((2, seq_len), jnp.int32)
    return model.init({'params': rng}, ids, ids, jnp.ones_like(ids), jnp.zeros((2, seq_len, seq_len)),
                      jnp.zeros((2, num_predict, seq_len)).at[:, :, 0].set(1.0))

  def init_aux(batch_size):
    if not mem_len:
      return {}
    return {'mems': jnp.zeros((batch_size, cfg.n_layer, mem_len, cfg.d_model), jnp.float32)}

  def aux_partition(aux):
    return jax.tree.map(lambda x: sharding.batch_spec(x.ndim), aux)

  def normalizers(batch):
    return {'lm': jnp.maximum(jnp.sum(jnp.minimum(num_targets(batch), num_predict)).astype(jnp.float32), 1.0)}

  def loss_fn(params, batch, rng, aux, norms, train):
    perm_rng, dropout_rng = jax.random.split(rng)
    perm = permutation.sample_permutation(perm_rng, batch['is_target'], batch['is_special'], num_predict=num_predict,
                                          perm_size=perm_size, reuse_len=data.reuse_len)
    mems = [aux['mems'][:, i].astype(model.dtype) for i in range(cfg.n_layer)] if mem_len else None
    logits, new_mems = model.apply(
        {'params': params}, batch['input_ids'], batch['segment_ids'], batch['input_mask'], perm['perm_mask'],
        perm['target_mapping'], mems, deterministic=not train, rngs={'dropout': dropout_rng})
    labels = jnp.take_along_axis(batch['input_ids'], perm['target_index'], axis=1)
    weights = perm['target_weights']
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    correct = layers.argmax_hits(logits, labels)
    sums = dict(lm_loss=jnp.sum(nll * weights), lm_correct=jnp.sum(correct * weights))
    new_aux = {'mems': jnp.stack(new_mems, axis=1).astype(jnp.float32)} if mem_len else aux
    return sums['lm_loss'] / norms['lm'], (sums, new_aux)

  def finalize(sums, norms):
    lm_loss = sums['lm_loss'] / norms['lm']
    return dict(loss=lm_loss, lm_loss=lm_loss, lm_accuracy=sums['lm_correct'] / norms['lm'])

  return Objective(init_variables=init_variables, loss_fn=loss_fn, normalizers=normalizers, finalize=finalize,
                   flops_per_example=xlnet_model.flops_per_example(
                       cfg, seq_len, num_predict, mem_len, config.global_batch_size // config.grad_accum_steps),
                   tokens_per_example=seq_len, init_aux=init_aux, aux_partition=aux_partition,
                   perplexity_of='lm_loss')
