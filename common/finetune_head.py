"""A model's task head (`ModelAdapter.make_head`) on batches: the trainer objective of a task kind (`make_objective`),
batched prediction (`predict`) and the pretrained encoder grafted into a fresh head (`graft_encoder`). The kind (a
`common.task_kinds` name or object) supplies the loss sums, normalisers and the head's extra inputs."""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from common import task_kinds, trainer
from common.finetune_loader import fold_lengths, padding_side
from common.finetune_packing import PACKING_FIELDS


def apply_head(head, params, batch, *, deterministic: bool, rng=None, kind: str = 'classification',
               targets: bool = False, auxiliary: bool = False):
  """`head`'s outputs on `batch` (`kind`'s `head_inputs` with `targets`: those of the loss); with `auxiliary`
  (a head with an `auxiliary_loss`, see `common.model_adapter.AuxiliaryLoss`): (outputs, auxiliary loss sum)."""
  extra = {'auxiliary': True} if auxiliary else {}
  extra.update({k: batch[k] for k in PACKING_FIELDS if k in batch})  # packed rows (common.finetune_packing)
  return head.apply({'params': params}, batch['input_ids'], batch['segment_ids'], batch['input_mask'],
                    batch.get('p_mask'), deterministic=deterministic,
                    rngs=None if rng is None else {'dropout': rng},
                    **task_kinds.get(kind).head_inputs(batch, targets=targets), **extra)


def make_objective(head, kind: str | task_kinds.TaskKind, template: Mapping[str, np.ndarray], flops_per_example: float,
                   seq_len: int) -> trainer.Objective:
  """The trainer objective of `head` (a model from a `ModelAdapter`) on batches shaped like `template` rows: the
  kind's loss, plus `weight x` the mean auxiliary loss when the head has an `auxiliary_loss`
  (`common.model_adapter.AuxiliaryLoss`; reported as `auxiliary_loss`, the kind's as `task_loss`)."""
  kind = task_kinds.get(kind)
  auxiliary = getattr(head, 'auxiliary_loss', None)

  def init_variables(rng):
    dummy = {k: jnp.zeros((1, *np.shape(v)[1:]), np.asarray(v).dtype) for k, v in template.items()}
    return head.init({'params': rng}, dummy['input_ids'], dummy['segment_ids'], dummy['input_mask'],
                     dummy.get('p_mask'), **kind.head_inputs(dummy, targets=True))

  def normalizers(batch):
    norms = kind.normalizers(batch)
    if auxiliary is not None:
      norms['auxiliary'] = jnp.maximum(jnp.asarray(auxiliary.normalizer(batch), jnp.float32), 1.0)
    return norms

  def loss_fn(params, batch, rng, aux, norms, train):
    outputs = apply_head(head, params, batch, deterministic=not train, rng=rng, kind=kind, targets=True,
                         auxiliary=auxiliary is not None)
    if auxiliary is None:
      sums = kind.loss_sums(outputs, batch)
      return sums['loss'] / norms['rows'], (sums, aux)
    logits, auxiliary_sum = outputs
    sums = dict(kind.loss_sums(logits, batch), auxiliary_loss=auxiliary_sum)
    loss = sums['loss'] / norms['rows'] + auxiliary.weight * auxiliary_sum / norms['auxiliary']
    return loss, (sums, aux)

  def finalize(sums, norms):
    out = {'task_loss': sums['loss'] / norms['rows']}
    if 'correct' in sums:
      out['accuracy'] = sums['correct'] / norms['rows']
    if 'auxiliary_loss' in sums:
      out['auxiliary_loss'] = sums['auxiliary_loss'] / norms['auxiliary']
    return out

  return trainer.Objective(init_variables=init_variables, loss_fn=loss_fn, normalizers=normalizers,
                           finalize=finalize, flops_per_example=flops_per_example, tokens_per_example=seq_len)


def predict_function(head, kind: str = 'classification') -> Callable:
  """`head`'s jitted inference `(params, batch) -> outputs`; build it once to predict several times."""
  return jax.jit(lambda p, b: apply_head(head, p, b, deterministic=True, kind=kind))


def _prediction_batches(features: Mapping[str, np.ndarray], batch_size: int, kind, buckets: Sequence[int] | None,
                        min_bucket_batches: int, first_of_each_length: bool = False):
  """(row order, an iterator of (rows, batch)) of `predict`: the batches it runs, each of `batch_size` rows (the
  last padded by repeating its first row) cut to its bucket length, taking the rows in that order; with
  `first_of_each_length`, only the first batch of each length (one per program `predict` runs)."""
  kind = task_kinds.get(kind)
  names = task_kinds.MODEL_INPUTS + (('p_mask',) if 'p_mask' in features else ()) + kind.predict_fields
  inputs = {k: np.asarray(features[k]) for k in names}
  n = len(inputs['input_ids'])
  shape = inputs['input_ids'].shape
  order, side, need = np.arange(n), 'right', np.full(n, shape[-1])
  lengths = sorted({int(b) for b in (buckets or ()) if 0 < int(b) < shape[-1]} | {shape[-1]})
  if kind.pooled and len(lengths) > 1:
    side, need = padding_side(inputs)
    order = np.argsort(need, kind='stable')
  starts = range(0, n, batch_size)
  bucket = [next(b for b in lengths if b >= need[order[s:s + batch_size]].max()) for s in starts]
  folded = fold_lengths(bucket, min_bucket_batches)

  def batches():
    seen = set()
    for i, start in enumerate(starts):
      if first_of_each_length:
        if folded[bucket[i]] in seen:
          continue
        seen.add(folded[bucket[i]])
      index = order[start:start + batch_size]
      chunk = {k: v[index] for k, v in inputs.items()}
      rows = len(index)
      if rows < batch_size:  # One compiled shape per length: pad the last batch by repeating its first row.
        chunk = {k: np.concatenate([v, np.repeat(v[:1], batch_size - rows, 0)]) for k, v in chunk.items()}
      length = folded[bucket[i]]
      if length < shape[-1]:
        cut = slice(None, length) if side == 'right' else slice(shape[-1] - length, None)
        chunk = {k: (np.ascontiguousarray(v[..., cut]) if v.shape[1:] == shape[1:] else v) for k, v in chunk.items()}
      yield rows, chunk
  return order, batches()


def _on_one_device(params):
  """The parameters (possibly sharded over a mesh) on this process's first device, once for all batches."""
  return jax.device_put(jax.device_get(params), jax.local_devices()[0])


def predict(head, params, features: Mapping[str, np.ndarray], batch_size: int, kind: str = 'classification',
            fn: Callable | None = None, buckets: Sequence[int] | None = None, min_bucket_batches: int = 0):
  """`head`'s outputs for every row of `features` (deterministic), in row order: numpy `[N, ...]` (a dict of them
  for the beam head). `fn`: a `predict_function(head, kind)` to reuse. With `buckets` (see `TaskLoader`), the
  pooled kinds (classification, regression, multiple choice: outputs without a sequence axis) predict the rows
  sorted by length, each batch cut to the smallest bucket that holds it (at most `len(buckets)` compiled shapes),
  a bucket that fewer than `min_bucket_batches` batches use folded into the next longer one in use
  (`fold_lengths`); the other kinds keep the full length."""
  params = _on_one_device(params)
  fn = fn or predict_function(head, kind)
  order, batches = _prediction_batches(features, batch_size, kind, buckets, min_bucket_batches)
  out = [jax.tree.map(lambda x, r=rows: np.asarray(x)[:r], jax.device_get(fn(params, chunk)))
         for rows, chunk in batches]
  result = jax.tree.map(lambda *chunks: np.concatenate(chunks), *out)
  inverse = np.empty_like(order)
  inverse[order] = np.arange(len(order))
  return jax.tree.map(lambda x: x[inverse], result)


def compile_predict(fn: Callable, param_shapes: Any, features: Mapping[str, np.ndarray], batch_size: int,
                    kind: str = 'classification', buckets: Sequence[int] | None = None,
                    min_bucket_batches: int = 0) -> None:
  """Compiles `fn` (a `predict_function`) for every batch shape `predict` will give it on `features`, computing
  nothing: `param_shapes` are the parameters' shapes (`jax.eval_shape` of the init); see `common.compile_ahead`."""
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), param_shapes)
  for _, chunk in _prediction_batches(features, batch_size, kind, buckets, min_bucket_batches,
                                      first_of_each_length=True)[1]:
    fn.lower(params, {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in chunk.items()}).compile()


def graft_encoder(params: Mapping[str, Any], encoder: Mapping[str, Any] | None, encoder_key: str) -> dict:
  """`params` (a freshly initialised head model) with its encoder subtree replaced by `encoder` (pretrained)."""
  params = dict(params)
  if encoder is not None:
    check_graft(params, encoder, encoder_key)
    params[encoder_key] = jax.tree.map(np.asarray, encoder)
  return params


def check_graft(params: Mapping[str, Any], encoder: Mapping[str, Any], encoder_key: str) -> None:
  """Raises unless `encoder` has the structure of the `encoder_key` subtree of `params` (values or shapes)."""
  if encoder_key not in params:
    raise ValueError(f'the task model has no {encoder_key!r} subtree')
  fresh, given = jax.tree_util.tree_structure(params[encoder_key]), jax.tree_util.tree_structure(encoder)
  if fresh != given:
    raise ValueError(f'pretrained {encoder_key!r} parameters do not match the model: {given} vs {fresh}')
