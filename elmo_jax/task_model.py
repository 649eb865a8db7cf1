"""Feature-based fine-tuning (Peters et al. 2018, section 3.3): the biLM frozen, a small task model trained on its
scalar-mixed layers, as an objective of the shared trainer.

The task model: `ScalarMix` over the biLM layers (masked to the words), dropout, then

a per-position dense layer (relu), then

* `classification`: the words' max- and mean-pooled vectors -> `num_labels` logits `[batch, labels]`;
* `pair`: both sentences so pooled (one shared task model), `[a, b, |a - b|, a * b]` -> logits `[batch, labels]`;
* `tagging`: every position -> logits `[batch, length, labels]` (scored at the words only).

Batches: `char_ids [batch, length, chars]`, `lengths [batch]`, `word_mask [batch, length]` (`features
.sentences_to_batch`), for `pair` also `char_ids_b`, `lengths_b`, `word_mask_b`; `labels [batch]` (or
`[batch, length]` aligned with the positions for tagging). Only the task model's parameters are trained: the biLM's
are constants of the step and its features are computed under `stop_gradient`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn

from common import layers
from common.trainer import Objective
from elmo_jax import model as elmo_model
from elmo_jax.features import BiLM
from elmo_jax.scalar_mix import ScalarMix

KINDS = ('classification', 'pair', 'tagging')


def masked_pool(x: jax.Array, mask: jax.Array) -> jax.Array:
  """`x [batch, length, d]`, `mask [batch, length]` -> max ‖ mean over the masked positions `[batch, 2 d]`."""
  weights = mask.astype(x.dtype)[..., None]
  maximum = jnp.max(jnp.where(weights > 0, x, -1e9), axis=1)
  mean = jnp.sum(x * weights, axis=1) / jnp.maximum(jnp.sum(weights, axis=1), 1.0)
  return jnp.concatenate([maximum, mean], axis=-1)


class FeatureTaskModel(nn.Module):
  """Scalar mix + a small head over frozen biLM features (see the module docstring)."""
  kind: str
  num_labels: int
  num_layers: int
  hidden_size: int = 64
  layer_norm: bool = False
  dropout: float = 0.1

  def _encode(self, features, mask, deterministic):
    """Scalar mix, dropout, then a per-position dense (relu): `[layers, batch, length, d] -> [batch, length, h]`."""
    mixed = ScalarMix(self.num_layers, self.layer_norm, name='scalar_mix')(features, mask)
    mixed = nn.Dropout(self.dropout)(mixed, deterministic=deterministic)
    hidden = layers.DenseGeneral((self.hidden_size,), (None, 'mlp'), name='hidden')
    return nn.Dropout(self.dropout)(jax.nn.relu(hidden(mixed)), deterministic=deterministic)

  @nn.compact
  def __call__(self, features, mask, features_b=None, mask_b=None, *, deterministic: bool = True) -> jax.Array:
    """`features [layers, batch, length, d]`, `mask [batch, length]` -> logits (see the module docstring)."""
    h = self._encode(features, mask, deterministic)
    if self.kind == 'classification':
      h = masked_pool(h, mask)
    elif self.kind == 'pair':
      a, b = masked_pool(h, mask), masked_pool(self._encode(features_b, mask_b, deterministic), mask_b)
      h = jnp.concatenate([a, b, jnp.abs(a - b), a * b], axis=-1)
    return layers.DenseGeneral((self.num_labels,), (None, 'classes'), name='output')(h).astype(jnp.float32)


def make_task_objective(bilm: BiLM, kind: str, num_labels: int, *, max_seq_length: int, hidden_size: int = 64,
                        layer_norm: bool = False, dropout: float = 0.1) -> Objective:
  """The trainer objective of a feature-based task on a frozen `bilm`: cross-entropy over the examples
  (classification, pair) or the words (tagging), normalised over the global batch; metrics `loss`, `accuracy`."""
  if kind not in KINDS:
    raise ValueError(f'kind must be one of {KINDS}, got {kind!r}')
  bilm_model = elmo_model.ElmoBiLM(bilm.config)
  bilm_params = jax.tree.map(jnp.asarray, bilm.params)
  head = FeatureTaskModel(kind, num_labels, bilm.num_layers, hidden_size, layer_norm, dropout)

  def features(char_ids, lengths):
    out = bilm_model.apply({'params': bilm_params}, char_ids, lengths, method=elmo_model.ElmoBiLM.features)
    return jax.lax.stop_gradient(out)

  def logits_of(params, batch, deterministic, rng=None):
    extra = {}
    if kind == 'pair':
      extra = dict(features_b=features(batch['char_ids_b'], batch['lengths_b']), mask_b=batch['word_mask_b'])
    return head.apply({'params': params}, features(batch['char_ids'], batch['lengths']), batch['word_mask'],
                      deterministic=deterministic, rngs={'dropout': rng} if rng is not None else {}, **extra)

  def weights_of(batch):
    if kind == 'tagging':
      return batch['word_mask'].astype(jnp.float32)
    return jnp.ones(batch['labels'].shape, jnp.float32)

  def init_variables(rng):
    length, chars = max_seq_length, int(bilm.config.max_characters_per_token)
    char_ids = jnp.zeros((1, length, chars), jnp.int32)
    feats = features(char_ids, jnp.ones((1,), jnp.int32))
    mask = jnp.ones((1, length), jnp.int32)
    extra = dict(features_b=feats, mask_b=mask) if kind == 'pair' else {}
    return head.init({'params': rng}, feats, mask, **extra)

  def normalizers(batch):
    return {'examples': jnp.maximum(jnp.sum(weights_of(batch)), 1.0)}

  def loss_fn(params, batch, rng, aux, norms, train):
    logits = logits_of(params, batch, not train, rng if train else None)
    weights = weights_of(batch)
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch['labels'])
    correct = (jnp.argmax(logits, -1) == batch['labels']).astype(jnp.float32)
    sums = {'loss': jnp.sum(nll * weights), 'correct': jnp.sum(correct * weights)}
    return sums['loss'] / norms['examples'], (sums, aux)

  def finalize(sums, norms):
    return {'loss': sums['loss'] / norms['examples'], 'accuracy': sums['correct'] / norms['examples']}

  return Objective(init_variables=init_variables, loss_fn=loss_fn, normalizers=normalizers, finalize=finalize,
                   flops_per_example=0.0, tokens_per_example=max_seq_length)

