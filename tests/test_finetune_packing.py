"""Packed fine-tuning batches (`common.finetune_packing`): several examples per row give each example the outputs,
loss and gradients it has alone in its own padded row (float32, within 1e-5), with the materialised and the chunked
attention; the packed loader trains each step on the very examples of the unpacked one; packing applies only where
a model's heads read packed rows. The whole packed run against the unpacked one is in
`test_finetune_user.py::test_bucketed_and_packed_runs_match_full_padding_and_compile_one_step_per_shape`."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import linen as nn

from bert_jax import model as bert_model
from bert_jax import tasks as bert_tasks
from common import finetune, finetune_packing, task_kinds
from common.config import UserError
from common.finetune_head import apply_head
from xlnet_jax import tasks as xlnet_tasks

SEQ = 16


def _batch(kind: str, rows: int = 8, seed: int = 0):
  rng = np.random.default_rng(seed)
  lengths = rng.integers(2, SEQ + 1, rows)
  lengths[0] = SEQ  # one example fills a whole row
  mask = (np.arange(SEQ)[None] < lengths[:, None]).astype(np.int32)
  ids = rng.integers(1, 64, (rows, SEQ)).astype(np.int32) * mask
  segments = ((np.arange(SEQ)[None] >= lengths[:, None] // 2) & (mask > 0)).astype(np.int32)
  label = (rng.integers(0, 3, rows).astype(np.int32) if kind == 'classification'
           else rng.normal(size=rows).astype(np.float32))
  return {'input_ids': ids, 'segment_ids': segments, 'input_mask': mask, 'label': label}, lengths


def test_first_fit_decreasing_places_every_example_once_within_the_row():
  lengths = [5, 16, 3, 9, 7, 1, 12, 4]
  rows = finetune_packing.first_fit_decreasing(lengths, SEQ)
  assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
  assert all(sum(lengths[i] for i in row) <= SEQ for row in rows)
  assert len(rows) == -(-sum(lengths) // SEQ)  # 57 positions in 4 rows: no row wasted here
  assert rows == finetune_packing.first_fit_decreasing(lengths, SEQ)
  with pytest.raises(ValueError, match='does not fit'):
    finetune_packing.first_fit_decreasing([SEQ + 1], SEQ)


@pytest.mark.parametrize('kind_name, impl', [('classification', 'materialized'), ('regression', 'materialized'),
                                             ('classification', 'chunked')])
def test_packed_rows_give_each_example_its_unpacked_outputs_and_gradients(kind_name, impl):
  cfg = bert_model.model_config(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=64, max_position_embeddings=SEQ, attention_impl=impl,
                                attention_block=8)
  head = bert_tasks.ADAPTER.make_head(cfg, kind_name, 3)
  kind = task_kinds.get(kind_name)
  batch, lengths = _batch(kind_name)
  params = nn.meta.unbox(head.init(jax.random.PRNGKey(0), *(batch[k][:1] for k in task_kinds.MODEL_INPUTS)))
  rows = len(finetune_packing.first_fit_decreasing(lengths, SEQ))
  packed = finetune_packing.pack_batch(batch, lengths, rows + 1)  # + an all-padding row
  assert packed['input_ids'].shape == (rows + 1, SEQ) and packed['pool_at'].shape == (8,)
  assert rows < 8 and not packed['example_ids'][-1].any()

  def loss(p, b):
    out = apply_head(head, p['params'], b, deterministic=True, kind=kind, targets=True)
    return kind.loss_sums(out, b)['loss'], out

  step = jax.jit(jax.value_and_grad(loss, has_aux=True))
  (loss0, out0), grads0 = step(params, batch)
  (loss1, out1), grads1 = step(params, packed)
  np.testing.assert_allclose(out1, out0, rtol=0, atol=1e-5)
  np.testing.assert_allclose(loss1, loss0, rtol=1e-6)
  for g0, g1 in zip(jax.tree.leaves(grads0), jax.tree.leaves(grads1)):
    np.testing.assert_allclose(g1, g0, rtol=0, atol=1e-5 * max(1.0, float(jnp.abs(g0).max())))


def test_packed_loader_trains_each_step_on_the_unpacked_steps_examples():
  batch, _ = _batch('classification', rows=40, seed=1)
  batch['label'] = np.arange(40, dtype=np.int32)  # each example's own id
  plain = finetune.make_loader(batch, 8, seed=5)
  packed = finetune.make_loader(batch, 8, seed=5, steps=12, pack=True)
  need = batch['input_mask'].sum(1)
  most = max(len(finetune_packing.first_fit_decreasing(need[plain.record_ids(s, slice(None))], SEQ))
             for s in range(12))
  assert packed.num_rows == most < 8
  assert finetune.make_loader(batch, 8, seed=5, steps=12, pack=True, row_multiple=4).num_rows == -(-most // 4) * 4
  for step in (0, 4, 11):
    unpacked, rows = plain.host_batch(step), packed.host_batch(step)
    np.testing.assert_array_equal(rows['label'], unpacked['label'])
    assert rows['input_ids'].shape == (packed.num_rows, SEQ)
    assert rows['input_mask'].sum() == unpacked['input_mask'].sum()
    flat = rows['input_ids'].reshape(-1)
    for i, first in enumerate(rows['pool_at']):  # each example's tokens, in order, from its pool position
      n = int(unpacked['input_mask'][i].sum())
      np.testing.assert_array_equal(flat[first:first + n], unpacked['input_ids'][i, :n])
    assert packed.computed_rows(step) * packed.length(step) < plain.computed_rows(step) * plain.length(step)


def test_packing_applies_only_where_the_model_and_task_allow_it():
  config = ml_collections.ConfigDict(dict(pack_examples=True, grad_accum_steps=1))
  assert finetune.packing(config, bert_tasks.ADAPTER, 'classification')
  assert finetune.packing(config, bert_tasks.ADAPTER, 'regression')
  assert not finetune.packing(config, bert_tasks.ADAPTER, 'squad')
  assert not finetune.packing(config, xlnet_tasks.ADAPTER, 'classification')
  assert not finetune.packing(ml_collections.ConfigDict(dict(pack_examples=True, grad_accum_steps=2)),
                              bert_tasks.ADAPTER, 'classification')
  assert not finetune.packing(ml_collections.ConfigDict(dict(pack_examples=False)), bert_tasks.ADAPTER,
                              'classification')
  with pytest.raises(UserError, match='pack_examples'):
    finetune.packing(ml_collections.ConfigDict(dict(pack_examples='yes')), bert_tasks.ADAPTER, 'classification')
