"""XLNet pretraining: no information leaks through the permutation masks, memory is carried exactly, sharded steps
equal one device, and the main job's loss falls on a slice of the embedded corpus."""
import json
import os
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import linen as nn

from common import checkpoint, optim, sharding, trainer
from xlnet_jax import model as xlnet_model
from xlnet_jax import objective as xlnet_objective
from xlnet_jax import permutation, pretrain
from xlnet_jax.configs import tiny
from tests.drivers import harness

L, R, P = 16, 8, 5  # seq_len, reuse_len, num_predict


def small_model_config(**overrides):
  cfg = xlnet_model.model_config(vocab_size=64, d_model=32, n_layer=2, n_head=2, d_head=16, d_inner=64,
                                 dropout=0.0, dropatt=0.0)
  cfg.update(overrides)
  return cfg


def random_inputs(seed, batch=4):
  rng = np.random.default_rng(seed)
  # Unique token per position, so the gradient w.r.t. embedding row ids[j] is the gradient w.r.t. position j.
  ids = np.stack([rng.permutation(64)[:L] for _ in range(batch)]).astype(np.int32)
  is_special = np.zeros((batch, L), bool)
  is_special[:, [L - 3, L - 1]] = True
  is_target = np.zeros((batch, L), bool)
  for b in range(batch):
    is_target[b, rng.choice(np.r_[0:L - 3], size=P, replace=False)] = True
  segments = (np.arange(L) >= L // 2).astype(np.int32)[None].repeat(batch, 0)
  return ids, segments, is_target, is_special


def reachable(perm_mask, n_layer):
  """[B, L, L] bool: what the query stream of i may depend on after n_layer layers (transitive through content)."""
  content = (perm_mask == 0) | np.eye(L, dtype=bool)[None]
  query = perm_mask == 0
  reach = np.eye(L, dtype=bool)[None].repeat(perm_mask.shape[0], 0)  # content h^0_j depends on token j
  for _ in range(n_layer - 1):
    reach = np.einsum('bij,bjk->bik', content, reach) > 0
  return np.einsum('bij,bjk->bik', query, reach) > 0


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_no_leak_through_permutation(seed):
  """The gradient of each target's query-stream output (log p(target) depends on the inputs only through it) with
  respect to the embedding of token j is exactly 0 for every j the target must not see, itself included, and
  non-zero for the tokens it sees directly."""
  cfg = small_model_config()
  model = xlnet_model.XLNetModel(cfg)
  ids, segments, is_target, is_special = random_inputs(seed)
  perm = jax.jit(lambda k: permutation.sample_permutation(k, is_target, is_special, num_predict=P, perm_size=4,
                                                          reuse_len=R))(jax.random.PRNGKey(seed))
  params = nn.meta.unbox(jax.jit(model.init)(jax.random.PRNGKey(seed + 10), ids, segments, None, perm['perm_mask'],
                                             perm['target_mapping']))['params']
  probe = jax.random.normal(jax.random.PRNGKey(seed + 20), (cfg.d_model,))
  perm_mask = np.asarray(perm['perm_mask'])
  allowed = reachable(perm_mask, cfg.n_layer)

  @jax.jit
  def grads(table):
    def g_dot_probe(table):
      new = dict(params, word_embedding={'embedding': table})
      _, g, _ = model.apply({'params': new}, ids, segments, None, perm['perm_mask'], perm['target_mapping'])
      return g[:, :, :] @ probe  # [B, P]
    return jax.jacrev(g_dot_probe)(table)  # [B, P, vocab, d]

  jac = np.abs(np.asarray(grads(params['word_embedding']['embedding']))).sum(-1)  # [B, P, vocab]
  checked = 0
  for b in range(ids.shape[0]):
    for p in range(P):
      t = int(perm['target_index'][b, p])
      per_position = jac[b, p][ids[b]]  # [L]
      for j in range(L):
        if not allowed[b, t, j]:
          assert per_position[j] == 0.0, f'target {t} leaks from position {j} (row {b})'
          checked += 1
      direct = np.flatnonzero(perm_mask[b, t] == 0)
      assert (per_position[direct] > 0).all(), f'target {t} does not see positions it may see'
      assert per_position[t] == 0.0  # the query stream never sees its own token
  assert checked > 20


def test_content_stream_sees_itself_and_reuse_half_sees_only_itself():
  cfg = small_model_config()
  model = xlnet_model.XLNetModel(cfg)
  ids, segments, is_target, is_special = random_inputs(5)
  perm = jax.jit(lambda k: permutation.sample_permutation(k, is_target, is_special, num_predict=P, perm_size=4,
                                                          reuse_len=R))(jax.random.PRNGKey(3))
  params = nn.meta.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), ids, segments, None, perm['perm_mask'],
                                             perm['target_mapping']))['params']
  probe = jax.random.normal(jax.random.PRNGKey(1), (cfg.d_model,))

  @jax.jit
  def grad_table(table, i):  # one program for every position i
    def f(table):
      new = dict(params, word_embedding={'embedding': table})
      h, _, _ = model.apply({'params': new}, ids, segments, None, perm['perm_mask'], perm['target_mapping'])
      return h[0, i] @ probe
    return jax.grad(f)(table)

  def grad_rows(i):
    g = grad_table(params['word_embedding']['embedding'], i)
    return np.abs(np.asarray(g))[ids[0]].sum(-1)

  for i in range(L):
    rows = grad_rows(i)
    assert rows[i] > 0, f'content stream at {i} does not see its own token'
    if i < R:
      assert (rows[R:] == 0).all(), f'reuse position {i} sees the second half'


def xlnet_config(**overrides):
  config = trainer.trainer_config(num_train_steps=3, global_batch_size=8, log_every=1, num_eval_batches=0,
                                  checkpoint_every=0, progress_bar=False, seed=1)
  config.model = small_model_config(mem_len=R, reuse_len=R, dropout=0.1, dropatt=0.1)
  config.data = ml_collections.ConfigDict(dict(seq_len=L, reuse_len=R, num_predict=P, perm_size=4, bi_data=False))
  config.optim = optim.optim_config(learning_rate=1e-3, warmup_steps=1)
  config.dtype, config.remat = 'float32', False
  config.update(overrides)
  return config


class StreamLoader:
  def __init__(self, global_batch_size):
    self.global_batch_size = global_batch_size

  def host_batch(self, step):
    ids, segments, is_target, is_special = random_inputs(100 + step, self.global_batch_size)
    return dict(input_ids=ids, segment_ids=segments, input_mask=np.ones_like(ids), is_target=is_target,
                is_special=is_special)

  def iterate(self, start):
    step = start
    while True:
      yield step, self.host_batch(step)
      step += 1


def test_memory_is_carried_exactly():
  """After each step the carried memory equals the new memory of an independent forward pass with the step's
  parameters, permutation and previous memory; the reported loss equals that pass's loss; the memory is used."""
  config = xlnet_config(num_train_steps=1)
  config.model.update(dropout=0.0, dropatt=0.0)
  objective = xlnet_objective.make_objective(config)
  mesh = sharding.make_mesh(config.mesh, devices=jax.devices()[:1])
  setup = trainer.build_setup(config, objective, mesh)
  step_fn, _ = trainer.compile_train_step(setup, objective, config)
  state = setup.create_state()
  loader = StreamLoader(8)
  aux = objective.init_aux(8)
  loss_fn = jax.jit(objective.loss_fn, static_argnums=5)  # an independent pass: the loss alone, not the train step
  for s in range(3):
    params, batch = jax.device_get(state.params), loader.host_batch(s)
    rng = jax.random.fold_in(state.rng, state.step)
    norms = objective.normalizers(batch)
    loss, (_, expected_aux) = loss_fn(params, batch, rng, aux, norms, True)
    state, metrics = step_fn(state, sharding.host_batch_to_global(batch, mesh))
    np.testing.assert_allclose(np.asarray(state.aux['mems']), np.asarray(expected_aux['mems']), atol=1e-5)
    np.testing.assert_allclose(float(metrics['loss']), float(loss), rtol=1e-5)  # two programs, fp32
    if s > 0:  # the memory is used: layer 0's output (layer 1's cached input) changes without it
      _, (_, without) = loss_fn(params, batch, rng, objective.init_aux(8), norms, True)
      assert np.abs(np.asarray(without['mems'][:, 1]) - np.asarray(expected_aux['mems'][:, 1])).max() > 1e-3  # noise is ~1e-6
    aux = expected_aux
  # The memory holds the last mem_len (= reuse_len) hidden states of the reuse part of the last batch's input.
  assert state.aux['mems'].shape == (8, 2, R, 32)


def test_sharded_xlnet_step_equals_single_device():
  """3 steps (dropout on, memory carried) on a data x fsdp x tensor = 2 x 2 x 2 mesh equal one device."""
  def train(mesh_layout, devices):
    config = xlnet_config()
    config.mesh.update(**mesh_layout)
    mesh = sharding.make_mesh(config.mesh, devices=devices)
    state, history = trainer.train(config, xlnet_objective.make_objective(config), StreamLoader(8), mesh=mesh)
    return jax.device_get(state), history

  single, single_hist = train(dict(data=1, fsdp=1, tensor=1), jax.devices()[:1])
  sharded, sharded_hist = train(dict(data=2, fsdp=2, tensor=2), jax.devices())
  for a, b in zip(jax.tree.leaves((single.params, single.aux)), jax.tree.leaves((sharded.params, sharded.aux))):
    np.testing.assert_allclose(a, b, atol=2e-5)
  for a, b in zip(single_hist, sharded_hist):
    assert abs(a['loss'] - b['loss']) < 1e-5 * abs(a['loss'])


def test_xlnet_pretrain_end_to_end(tmp_path, tmp_path_factory, capsys):
  """On a ~300 kB slice of the embedded corpus (its whole validation split for eval): 60 steps of 8 rows train on
  fewer rows than the slice holds, so the whole corpus would only cost data preparation time. (The loss falls by
  1.35 in 60 steps as in 120; the shards are written in this process: XLNet's prepared data does not depend on
  num_workers.)"""
  config = tiny.get_config()
  train_corpus, eval_corpus = harness.shared_small_corpus(tmp_path_factory)
  config.data.update(corpus=train_corpus, eval_corpus=eval_corpus)
  config.update(num_train_steps=60, global_batch_size=8, log_every=1, eval_every=0, num_eval_batches=1,
                checkpoint_every=0, progress_bar=False, report_examples=2)
  # One layer: the loss falls as with two (1.353 vs 1.354 in 60 steps) and each of the two runs compiles in about
  # half the time; the HF export of several layers is test_xlnet_hf.py's.
  config.model.update(d_model=64, n_layer=1, d_head=32, d_inner=128, mem_len=16)
  config.data.update(vocab_size=1000, seq_len=32, reuse_len=16, num_predict=6, num_workers=1)
  config.optim.update(warmup_steps=10, learning_rate=2e-3)
  config.mesh.update(num_devices=1)  # sharded steps: test_sharded_xlnet_step_equals_single_device
  workdir = str(tmp_path / 'run')
  _, history = pretrain.run(config, workdir)
  train = [h for h in history if 'loss' in h]
  vocab = json.load(open(os.path.join(workdir, 'config.json')))['model']['vocab_size']
  first, last = np.mean([h['loss'] for h in train[:3]]), np.mean([h['loss'] for h in train[-20:]])
  assert abs(first - np.log(vocab)) < 0.3, (first, np.log(vocab))  # chance level at init
  assert last < first - 1.0, f'loss did not fall: {first:.3f} -> {last:.3f}'
  # The end-of-run report scores the final eval's rows with the eval step's orders: the same accuracy.
  printed = capsys.readouterr().out
  found = re.search(r'PLM accuracy: ([0-9.]+) vs ([0-9.]+) for always', printed)
  evals = [h for h in history if 'eval/loss' in h]
  assert found and abs(float(found[1]) - evals[-1]['eval/lm_accuracy']) < 2e-3, (printed, evals[-1])
  assert printed.count('top 5: ') == 2
  transformers = pytest.importorskip('transformers')
  model, info = transformers.XLNetLMHeadModel.from_pretrained(os.path.join(workdir, 'hf'), output_loading_info=True)
  assert not info['missing_keys'] and not info['unexpected_keys']
  assert os.path.exists(os.path.join(workdir, 'hf', 'spiece.model'))

  # Continued pretraining from the exported directory (config.init_from), as for BERT: one step at learning rate 0
  # leaves the imported parameters as they were, so the new run's checkpoint equals the HF weights.
  config.update(num_train_steps=1, num_eval_batches=0, export_hf=False, init_from=os.path.join(workdir, 'hf'))
  config.model.update(vocab_size=0, d_model=32)  # replaced by the HF directory's architecture
  config.optim.update(warmup_steps=1)
  pretrain.run(config, str(tmp_path / 'continued'))
  from xlnet_jax import export  # pylint: disable=import-outside-toplevel
  _, hf_params = export.load_hf_dir(os.path.join(workdir, 'hf'))
  continued, continued_config = checkpoint.restore_params(str(tmp_path / 'continued'))
  assert continued_config.model.d_model == 64
  assert continued_config.data.spiece_model == os.path.join(workdir, 'hf', 'spiece.model')
  for x, y in zip(jax.tree.leaves(hf_params), jax.tree.leaves(continued)):
    np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize('section, overrides, field', [
    ('model', dict(reuse_len=7), 'model.reuse_len'),
    ('model', dict(mem_len=4), 'model.mem_len'),
    ('data', dict(num_predict=100), 'data.num_predict'),
])
def test_bad_xlnet_config_refused_before_any_work(tmp_path, section, overrides, field):
  from common.config import ConfigError
  config = tiny.get_config()
  config[section].update(overrides)
  with pytest.raises(ConfigError, match=f'config.{field}'):
    pretrain.run(config, str(tmp_path / 'run'))
  assert not os.path.exists(tmp_path / 'run' / 'data')
