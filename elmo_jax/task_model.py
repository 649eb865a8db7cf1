"""Feature-based fine-tuning (Peters et al. 2018, section 3.3): the biLM frozen, a small task model trained on its
scalar-mixed layers, as an objective of the shared trainer.

The task model: `ScalarMix` over the biLM layers (masked to the words), dropout, then

a per-position dense layer (relu), then

* `classification`: the words' max- and mean-pooled vectors -> `num_labels` logits `[batch, labels]`;
* `pair`: both sentences so pooled (one shared task model), `[a, b, |a - b|, a * b]` -> logits `[batch, labels]`;
* `tagging`: every position -> logits `[batch, length, labels]` (scored at the words only);
* `regression` / `pair_regression`: as `classification` / `pair` with one output, the score `[batch]` (squared
  error; STS-B).

Batches: `char_ids [batch, length, chars]`, `lengths [batch]`, `word_mask [batch, length]` (`features
.sentences_to_batch`), for the pair kinds also `char_ids_b`, `lengths_b`, `word_mask_b`; `labels [batch]` (or
`[batch, length]` aligned with the positions for tagging; float32 scores for the regression kinds). A label below 0
(classification, pair) or NaN (regression) marks an unlabelled row, left out of the loss. Only the task model's
parameters are trained: the biLM's are constants of the step and its features are computed under `stop_gradient`.
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

KINDS = ('classification', 'pair', 'tagging', 'regression', 'pair_regression')
PAIR_KINDS = ('pair', 'pair_regression')
REGRESSION_KINDS = ('regression', 'pair_regression')
OUTPUT_LAYER = 'output'  # the task model's last dense layer (its bias: `config.regression_bias`)


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

  @nn.compact
  def __call__(self, features, mask, features_b=None, mask_b=None, *, deterministic: bool = True) -> jax.Array:
    """`features [layers, batch, length, d]`, `mask [batch, length]` -> logits (see the module docstring)."""
    scalar_mix = ScalarMix(self.num_layers, self.layer_norm, name='scalar_mix')
    hidden = layers.DenseGeneral((self.hidden_size,), (None, 'mlp'), name='hidden')
    dropout = nn.Dropout(self.dropout)

    def encode(x, m):  # scalar mix, dropout, a per-position dense (relu), dropout: [batch, length, hidden]
      mixed = dropout(scalar_mix(x, m), deterministic=deterministic)
      return dropout(jax.nn.relu(hidden(mixed)), deterministic=deterministic)

    h = encode(features, mask)
    if self.kind in PAIR_KINDS:  # one task model for both sentences
      a, b = masked_pool(h, mask), masked_pool(encode(features_b, mask_b), mask_b)
      h = jnp.concatenate([a, b, jnp.abs(a - b), a * b], axis=-1)
    elif self.kind != 'tagging':
      h = masked_pool(h, mask)
    width = 1 if self.kind in REGRESSION_KINDS else self.num_labels
    out = layers.DenseGeneral((width,), (None, 'classes'), name=OUTPUT_LAYER)(h).astype(jnp.float32)
    return out[..., 0] if self.kind in REGRESSION_KINDS else out


class _Forward:
  """The frozen biLM's features and the task model's outputs on a batch (what training and prediction share)."""

  def __init__(self, bilm: BiLM, kind: str, num_labels: int, hidden_size: int, layer_norm: bool, dropout: float):
    if kind not in KINDS:
      raise ValueError(f'kind must be one of {KINDS}, got {kind!r}')
    self.kind = kind
    self.bilm = bilm
    self.bilm_model = elmo_model.ElmoBiLM(bilm.config)
    self.bilm_params = jax.tree.map(jnp.asarray, bilm.params)
    self.head = FeatureTaskModel(kind, num_labels, bilm.num_layers, hidden_size, layer_norm, dropout)

  def features(self, char_ids, lengths):
    out = self.bilm_model.apply({'params': self.bilm_params}, char_ids, lengths,
                                method=elmo_model.ElmoBiLM.features)
    return jax.lax.stop_gradient(out)

  def outputs(self, params, batch, deterministic, rng=None):
    extra = {}
    if self.kind in PAIR_KINDS:
      extra = dict(features_b=self.features(batch['char_ids_b'], batch['lengths_b']), mask_b=batch['word_mask_b'])
    return self.head.apply({'params': params}, self.features(batch['char_ids'], batch['lengths']),
                           batch['word_mask'], deterministic=deterministic,
                           rngs={'dropout': rng} if rng is not None else {}, **extra)

  def init_variables(self, rng, max_seq_length: int):
    length, chars = max_seq_length, int(self.bilm.config.max_characters_per_token)
    feats = self.features(jnp.zeros((1, length, chars), jnp.int32), jnp.ones((1,), jnp.int32))
    mask = jnp.ones((1, length), jnp.int32)
    extra = dict(features_b=feats, mask_b=mask) if self.kind in PAIR_KINDS else {}
    return self.head.init({'params': rng}, feats, mask, **extra)


def make_task_objective(bilm: BiLM, kind: str, num_labels: int, *, max_seq_length: int, hidden_size: int = 64,
                        layer_norm: bool = False, dropout: float = 0.1) -> Objective:
  """The trainer objective of a feature-based task on a frozen `bilm`: cross-entropy over the labelled examples
  (classification, pair) or the words (tagging), squared error over the scored examples (the regression kinds),
  normalised over the global batch; metrics `loss`, and `accuracy` but for the regression kinds."""
  forward = _Forward(bilm, kind, num_labels, hidden_size, layer_norm, dropout)
  regression = kind in REGRESSION_KINDS

  def weights_of(batch):
    if kind == 'tagging':
      return batch['word_mask'].astype(jnp.float32)
    if regression:
      return (~jnp.isnan(batch['labels'])).astype(jnp.float32)
    return (batch['labels'] >= 0).astype(jnp.float32)

  def normalizers(batch):
    return {'examples': jnp.maximum(jnp.sum(weights_of(batch)), 1.0)}

  def loss_fn(params, batch, rng, aux, norms, train):
    outputs = forward.outputs(params, batch, not train, rng if train else None)
    weights = weights_of(batch)
    if regression:
      error = jnp.where(weights > 0, outputs - jnp.where(weights > 0, batch['labels'], 0.0), 0.0)
      sums = {'loss': jnp.sum(error * error)}
    else:
      labels = jnp.maximum(batch['labels'], 0)
      nll = optax.softmax_cross_entropy_with_integer_labels(outputs, labels)
      correct = layers.argmax_hits(outputs, labels)
      sums = {'loss': jnp.sum(nll * weights), 'correct': jnp.sum(correct * weights)}
    return sums['loss'] / norms['examples'], (sums, aux)

  def finalize(sums, norms):
    out = {'loss': sums['loss'] / norms['examples']}
    if 'correct' in sums:
      out['accuracy'] = sums['correct'] / norms['examples']
    return out

  return Objective(init_variables=lambda rng: forward.init_variables(rng, max_seq_length), loss_fn=loss_fn,
                   normalizers=normalizers, finalize=finalize, flops_per_example=0.0,
                   tokens_per_example=max_seq_length)


def make_predictor(bilm: BiLM, kind: str, num_labels: int, *, hidden_size: int = 64, layer_norm: bool = False):
  """The jitted deterministic outputs `(params, batch) -> logits [batch, labels]` (`[batch, length, labels]` for
  tagging, scores `[batch]` for the regression kinds) of the task model `make_task_objective` trains."""
  forward = _Forward(bilm, kind, num_labels, hidden_size, layer_norm, 0.0)
  return jax.jit(lambda params, batch: forward.outputs(params, batch, True))
