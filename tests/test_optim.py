"""Tests for common/optim.py: schedules, AdamW against the original BERT rule and torch, LAMB, clipping, decay masks
and layer-wise decay of the updates. Float32 JAX against float64 references, tolerance 1e-6 absolute.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from common import optim
from common.config import ConfigError
from common.sharding import match_shardings

# ----------------------------------------------------------------------------------------------------------------
# Helpers.
# ----------------------------------------------------------------------------------------------------------------


def tree_from_paths(shapes: dict, rng: np.random.Generator | None = None, dtype=np.float32) -> dict:
  """{'a/b/c': shape} -> nested dict of arrays (random normal, or zeros without rng)."""
  tree = {}
  for path, shape in shapes.items():
    node = tree
    parts = path.split('/')
    for part in parts[:-1]:
      node = node.setdefault(part, {})
    node[parts[-1]] = (rng.normal(size=shape) if rng is not None else np.zeros(shape)).astype(dtype)
  return tree


def flat(tree) -> dict:
  """{path: leaf} for a nested dict."""
  paths = jax.tree.leaves(optim.param_paths(tree))
  return dict(zip(paths, jax.tree.leaves(tree)))


def run_steps(tx, params, grads_seq):
  """Applies `tx` for each gradient tree in `grads_seq` (jitted); returns the list of parameter trees after each."""
  state = tx.init(params)

  @jax.jit
  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return jax.tree.map(lambda p, u: p + u, params, updates), state

  history = []
  for grads in grads_seq:
    params, state = step(params, state, grads)
    history.append(params)
  return history


def reference_lr(step, peak, warmup, total):
  """Linear warmup then linear decay to 0, written out independently of the schedule code."""
  if step < warmup:
    return peak * step / warmup
  return peak * max(0.0, (total - step) / (total - warmup))


SMALL_TREE = {
    'bert/embeddings/word_embeddings/embedding': (6, 4),
    'bert/embeddings/LayerNorm/scale': (4,),
    'bert/layer_0/query/kernel': (4, 4),
    'bert/layer_0/query/bias': (4,),
    'bert/layer_0/attention_LayerNorm/scale': (4,),
    'bert/layer_0/attention_LayerNorm/bias': (4,),
    'mlm_output_bias': (6,),
}
SMALL_NO_DECAY = {'bert/embeddings/LayerNorm/scale', 'bert/layer_0/query/bias',
                  'bert/layer_0/attention_LayerNorm/scale', 'bert/layer_0/attention_LayerNorm/bias',
                  'mlm_output_bias'}


def random_problem(num_steps=5, seed=0, grad_scale=1.0):
  rng = np.random.default_rng(seed)
  params = tree_from_paths(SMALL_TREE, rng)
  grads_seq = [jax.tree.map(lambda x: x * grad_scale, tree_from_paths(SMALL_TREE, rng)) for _ in range(num_steps)]
  return params, grads_seq


def numpy_clip(grads: dict, max_norm: float) -> dict:
  norm = math.sqrt(sum(float(np.sum(np.square(g.astype(np.float64)))) for g in grads.values()))
  return {k: g.astype(np.float64) * max_norm / max(norm, max_norm) for k, g in grads.items()}

# ----------------------------------------------------------------------------------------------------------------
# Schedules.
# ----------------------------------------------------------------------------------------------------------------

# lr 1e-3, warmup 100, total 1100 (1000 decay steps). Steps: 0, mid-warmup, peak, a quarter / half into the decay,
# the end, past the end.
STEPS = (0, 50, 100, 350, 600, 1100, 2000)
EXPECTED = {
    ('linear', 1.0, 0.0): (0.0, 5e-4, 1e-3, 7.5e-4, 5e-4, 0.0, 0.0),
    # end = 1e-4: 1e-4 + 9e-4 * (1 - f) ** 2 with f = 0.25, 0.5.
    ('polynomial', 2.0, 0.1): (0.0, 5e-4, 1e-3, 1e-4 + 9e-4 * 0.5625, 1e-4 + 9e-4 * 0.25, 1e-4, 1e-4),
    # (1 + cos(pi / 4)) / 2 = 0.853553390593...
    ('cosine', 1.0, 0.0): (0.0, 5e-4, 1e-3, 8.535533905932737e-4, 5e-4, 0.0, 0.0),
    ('cosine', 1.0, 0.2): (0.0, 5e-4, 1e-3, 2e-4 + 8e-4 * 0.8535533905932737, 6e-4, 2e-4, 2e-4),
    ('constant', 1.0, 0.0): (0.0, 5e-4, 1e-3, 1e-3, 1e-3, 1e-3, 1e-3),
}


@pytest.mark.parametrize('key', list(EXPECTED))
def test_schedule_values(key):
  kind, power, end_ratio = key
  cfg = optim.optim_config(learning_rate=1e-3, warmup_steps=100, total_steps=1100, schedule=kind, poly_power=power,
                           end_lr_ratio=end_ratio)
  schedule = optim.learning_rate_schedule(cfg)
  got = [float(schedule(s)) for s in STEPS]
  np.testing.assert_allclose(got, EXPECTED[key], rtol=1e-6, atol=1e-12)
  # Traced steps give the same values.
  np.testing.assert_allclose(jax.jit(jax.vmap(schedule))(jnp.array(STEPS)), EXPECTED[key], rtol=1e-6, atol=1e-12)


def test_polynomial_with_power_one_is_linear():
  common = dict(learning_rate=2e-4, warmup_steps=10, total_steps=110, end_lr_ratio=0.0)
  poly = optim.learning_rate_schedule(optim.optim_config(schedule='polynomial', poly_power=1.0, **common))
  linear = optim.learning_rate_schedule(optim.optim_config(schedule='linear', **common))
  steps = jnp.arange(0, 130)
  np.testing.assert_allclose(jax.vmap(poly)(steps), jax.vmap(linear)(steps), rtol=1e-6)


def test_schedule_total_steps_from_trainer_and_no_warmup():
  cfg = optim.optim_config(learning_rate=1.0, warmup_steps=0, total_steps=0, schedule='linear')
  schedule = optim.learning_rate_schedule(cfg, total_steps=200)  # the trainer's num_train_steps
  assert float(schedule(0)) == pytest.approx(1.0)
  assert float(schedule(50)) == pytest.approx(0.75)
  assert float(schedule(200)) == pytest.approx(0.0)
  # config.optim.total_steps wins over the trainer's.
  cfg.total_steps = 100
  assert float(optim.learning_rate_schedule(cfg, total_steps=200)(50)) == pytest.approx(0.5)

# ----------------------------------------------------------------------------------------------------------------
# AdamW.
# ----------------------------------------------------------------------------------------------------------------


def bert_adam_weight_decay_reference(params, grads_seq, *, lrs, wd, b1, b2, eps, clip, no_decay):
  """The original BERT `AdamWeightDecayOptimizer` (no bias correction), after `tf.clip_by_global_norm`."""
  params = {k: v.astype(np.float64) for k, v in flat(params).items()}
  m = {k: np.zeros_like(v) for k, v in params.items()}
  v = {k: np.zeros_like(x) for k, x in params.items()}
  history = []
  for lr, grads in zip(lrs, grads_seq):
    grads = numpy_clip(flat(grads), clip)
    for k in params:
      g = grads[k]
      m[k] = b1 * m[k] + (1 - b1) * g
      v[k] = b2 * v[k] + (1 - b2) * g * g
      update = m[k] / (np.sqrt(v[k]) + eps)
      if k not in no_decay:
        update = update + wd * params[k]
      params[k] = params[k] - lr * update
    history.append(dict(params))
  return history


def test_adamw_without_bias_correction_matches_original_bert_optimizer():
  params, grads_seq = random_problem(num_steps=6)
  peak, warmup, total = 1e-2, 2, 10
  cfg = optim.optim_config(learning_rate=peak, warmup_steps=warmup, total_steps=total, weight_decay=0.1,
                           bias_correction=False, clip_grad_norm=1.0)
  tx, _ = optim.make_optimizer(cfg)
  got = run_steps(tx, params, grads_seq)
  lrs = [reference_lr(s, peak, warmup, total) for s in range(len(grads_seq))]
  want = bert_adam_weight_decay_reference(params, grads_seq, lrs=lrs, wd=0.1, b1=0.9, b2=0.999, eps=1e-6, clip=1.0,
                                          no_decay=SMALL_NO_DECAY)
  for step, (g, w) in enumerate(zip(got, want)):
    for path, value in flat(g).items():
      np.testing.assert_allclose(value, w[path], atol=1e-6, rtol=0, err_msg=f'step {step} {path}')
  # The exclusions matter here: an excluded parameter differs from what decaying it would give.
  assert not np.allclose(flat(got[-1])['mlm_output_bias'], flat(params)['mlm_output_bias'])


def test_adamw_with_bias_correction_matches_torch():
  torch = pytest.importorskip('torch')
  params, grads_seq = random_problem(num_steps=5, seed=1)
  peak, warmup, total, wd = 1e-2, 2, 10, 0.1
  cfg = optim.optim_config(learning_rate=peak, warmup_steps=warmup, total_steps=total, weight_decay=wd,
                           bias_correction=True, clip_grad_norm=0.0, eps=1e-6)
  got = run_steps(optim.make_optimizer(cfg)[0], params, grads_seq)

  tensors = {k: torch.tensor(v, dtype=torch.float64, requires_grad=True) for k, v in flat(params).items()}
  groups = [dict(params=[t for k, t in tensors.items() if k not in SMALL_NO_DECAY], weight_decay=wd),
            dict(params=[t for k, t in tensors.items() if k in SMALL_NO_DECAY], weight_decay=0.0)]
  opt = torch.optim.AdamW(groups, lr=peak, betas=(0.9, 0.999), eps=1e-6)
  for step, grads in enumerate(grads_seq):
    for group in opt.param_groups:
      group['lr'] = reference_lr(step, peak, warmup, total)
    for k, g in flat(grads).items():
      tensors[k].grad = torch.tensor(g, dtype=torch.float64)
    opt.step()
    for path, value in flat(got[step]).items():
      np.testing.assert_allclose(value, tensors[path].detach().numpy(), atol=1e-6, rtol=0,
                                 err_msg=f'step {step} {path}')


def test_optimizer_state_mirrors_params_and_takes_their_shardings():
  params, grads_seq = random_problem(num_steps=1)
  params = {'params': params}
  grads = {'params': grads_seq[0]}
  tx, _ = optim.make_optimizer(optim.optim_config(total_steps=100, warmup_steps=10, layer_decay=0.8, name='lamb'))
  state = tx.init(params)
  adam = [s for s in state if isinstance(s, optax.ScaleByAdamState)]
  assert len(adam) == 1
  assert jax.tree.structure(adam[0].mu) == jax.tree.structure(params)
  assert jax.tree.map(np.shape, adam[0].nu) == jax.tree.map(np.shape, params)
  # Only mu and nu are parameter-sized; the rest are scalars.
  param_sized = [leaf for leaf in jax.tree.leaves(state) if np.ndim(leaf) > 0]
  assert len(param_sized) == 2 * len(jax.tree.leaves(params))

  mesh = Mesh(np.asarray(jax.devices()[:2]).reshape(1, 2, 1), ('data', 'fsdp', 'tensor'))
  param_shardings = jax.tree.map(
      lambda x: NamedSharding(mesh, P('fsdp') if x.shape[0] % 2 == 0 else P()), params)
  state_shardings = match_shardings(state, params, param_shardings, mesh)
  assert jax.tree.leaves(state_shardings[1].mu) == jax.tree.leaves(param_shardings)
  # The jitted update runs with those shardings.
  params = jax.device_put(params, param_shardings)
  state = jax.device_put(state, state_shardings)
  updates, state = jax.jit(tx.update)(grads, state, params)
  assert jax.tree.structure(updates) == jax.tree.structure(params)

# ----------------------------------------------------------------------------------------------------------------
# LAMB.
# ----------------------------------------------------------------------------------------------------------------


def lamb_reference(params, grads_seq, *, lrs, wd, b1, b2, eps, bias_correction, no_decay):
  """LAMB (You et al. 2019): Adam direction + wd * w, scaled by ||w|| / ||update|| per array; parameters excluded
  from decay are also excluded from the trust ratio; a zero norm gives ratio 1."""
  params = {k: v.astype(np.float64) for k, v in flat(params).items()}
  m = {k: np.zeros_like(v) for k, v in params.items()}
  v = {k: np.zeros_like(x) for k, x in params.items()}
  history = []
  for t, (lr, grads) in enumerate(zip(lrs, grads_seq), start=1):
    grads = {k: g.astype(np.float64) for k, g in flat(grads).items()}
    for k in params:
      g = grads[k]
      m[k] = b1 * m[k] + (1 - b1) * g
      v[k] = b2 * v[k] + (1 - b2) * g * g
      m_hat, v_hat = (m[k] / (1 - b1 ** t), v[k] / (1 - b2 ** t)) if bias_correction else (m[k], v[k])
      update = m_hat / (np.sqrt(v_hat) + eps)
      ratio = 1.0
      if k not in no_decay:
        update = update + wd * params[k]
        w_norm, u_norm = np.linalg.norm(params[k]), np.linalg.norm(update)
        ratio = w_norm / u_norm if w_norm > 0 and u_norm > 0 else 1.0
      params[k] = params[k] - lr * ratio * update
    history.append(dict(params))
  return history


@pytest.mark.parametrize('bias_correction', [True, False])
def test_lamb_matches_reference(bias_correction):
  params, grads_seq = random_problem(num_steps=5, seed=2)
  # A decayed parameter that starts at zero: its trust ratio is 1 on the first step.
  params['bert']['layer_0']['query']['kernel'] = np.zeros((4, 4), np.float32)
  peak, warmup, total, wd = 1e-2, 2, 10, 0.01
  cfg = optim.optim_config(name='lamb', learning_rate=peak, warmup_steps=warmup, total_steps=total, weight_decay=wd,
                           bias_correction=bias_correction, clip_grad_norm=0.0)
  got = run_steps(optim.make_optimizer(cfg)[0], params, grads_seq)
  lrs = [reference_lr(s, peak, warmup, total) for s in range(len(grads_seq))]
  want = lamb_reference(params, grads_seq, lrs=lrs, wd=wd, b1=0.9, b2=0.999, eps=1e-6,
                        bias_correction=bias_correction, no_decay=SMALL_NO_DECAY)
  for step, (g, w) in enumerate(zip(got, want)):
    for path, value in flat(g).items():
      np.testing.assert_allclose(value, w[path], atol=1e-6, rtol=0, err_msg=f'step {step} {path}')

# ----------------------------------------------------------------------------------------------------------------
# Clipping.
# ----------------------------------------------------------------------------------------------------------------


def test_clip_by_global_norm():
  grads = {'a': jnp.full((4,), 3.0), 'b': {'c': jnp.array([4.0, 0.0, 0.0, 0.0]), 'd': jnp.zeros((2, 2))}}
  # ||a||^2 = 36, ||c||^2 = 16, plus 48 more in 'e' -> global norm 10.
  grads['e'] = jnp.array([4.0, 4.0, 4.0])
  assert float(optim.global_norm(grads)) == pytest.approx(10.0)
  clip = optim.clip_by_global_norm(1.0)
  clipped, _ = clip.update(grads, clip.init(grads))
  assert float(optim.global_norm(clipped)) == pytest.approx(1.0, rel=1e-6)
  jax.tree.map(lambda c, g: np.testing.assert_allclose(c, g / 10.0, rtol=1e-6), clipped, grads)
  # Below the threshold nothing changes.
  small = jax.tree.map(lambda g: g / 20.0, grads)
  unchanged, _ = clip.update(small, clip.init(small))
  jax.tree.map(lambda c, g: np.testing.assert_allclose(c, g, rtol=1e-6), unchanged, small)


def test_clipping_happens_inside_the_chain_before_adam():
  grads = {'w': jnp.array([6.0, 8.0])}  # norm 10
  params = {'w': jnp.array([1.0, 1.0])}
  tx, _ = optim.make_optimizer(optim.optim_config(total_steps=10, warmup_steps=0, clip_grad_norm=1.0))
  _, state = tx.update(grads, tx.init(params), params)
  np.testing.assert_allclose(state[1].mu['w'], 0.1 * np.array([0.6, 0.8]), rtol=1e-6)
  tx, _ = optim.make_optimizer(optim.optim_config(total_steps=10, warmup_steps=0, clip_grad_norm=0.0))
  _, state = tx.update(grads, tx.init(params), params)
  np.testing.assert_allclose(state[0].mu['w'], 0.1 * np.array([6.0, 8.0]), rtol=1e-6)

# ----------------------------------------------------------------------------------------------------------------
# Layer-wise decay.
# ----------------------------------------------------------------------------------------------------------------

TOY_TREE = {
    'bert/embeddings/word_embeddings/embedding': (5, 3),
    'bert/embeddings/LayerNorm/scale': (3,),
    'bert/layer_0/query/kernel': (3, 3),
    'bert/layer_1/query/kernel': (3, 3),
    'bert/layer_2/query/kernel': (3, 3),
    'bert/layer_2/output_LayerNorm/bias': (3,),
    'bert/pooler/kernel': (3, 3),
    'mlm_output_bias': (5,),
}
# layer_decay 0.5, 3 layers: embeddings 0.5^4, layer i 0.5^(3 - i), everything above the encoder 1.
TOY_SCALES = {
    'bert/embeddings/word_embeddings/embedding': 0.0625,
    'bert/embeddings/LayerNorm/scale': 0.0625,
    'bert/layer_0/query/kernel': 0.125,
    'bert/layer_1/query/kernel': 0.25,
    'bert/layer_2/query/kernel': 0.5,
    'bert/layer_2/output_LayerNorm/bias': 0.5,
    'bert/pooler/kernel': 1.0,
    'mlm_output_bias': 1.0,
}


@pytest.mark.parametrize('num_layers', [3, 0])  # 0: inferred from the paths
def test_layer_decay_scales(num_layers):
  params = {'params': tree_from_paths(TOY_TREE)}
  scales = flat(optim.layer_decay_scales(params, 0.5, num_layers))
  assert scales == TOY_SCALES


def test_layer_decay_scales_xlnet_paths():
  shapes = {
      'transformer/word_embedding/embedding': (5, 3),
      'transformer/mask_emb/mask_emb': (1, 1, 3),
      'transformer/layer_0/rel_attn/q/kernel': (3, 3),
      'transformer/layer_1/rel_attn/r_w_bias': (2, 2),
      'transformer/layer_1/rel_attn/seg_embed': (2, 2, 2),
      'transformer/layer_1/ff/layer_norm/scale': (3,),
      'lm_loss/bias': (5,),
  }
  scales = flat(optim.layer_decay_scales(tree_from_paths(shapes), 0.9, 2))
  assert scales['transformer/word_embedding/embedding'] == pytest.approx(0.9 ** 3)
  assert scales['transformer/mask_emb/mask_emb'] == pytest.approx(0.9 ** 3)
  assert scales['transformer/layer_0/rel_attn/q/kernel'] == pytest.approx(0.9 ** 2)
  assert scales['transformer/layer_1/rel_attn/r_w_bias'] == pytest.approx(0.9)
  assert scales['transformer/layer_1/rel_attn/seg_embed'] == pytest.approx(0.9)  # its layer wins over 'embed'
  assert scales['transformer/layer_1/ff/layer_norm/scale'] == pytest.approx(0.9)
  assert scales['lm_loss/bias'] == 1.0
  with pytest.raises(ConfigError, match='config.optim.num_layers'):
    optim.layer_decay_scales(tree_from_paths(shapes), 0.9, 1)


def first_step_over_lr(grads, layer_decay):
  """(param change) / lr after one AdamW step with bias correction, no decay: m_hat / (sqrt(v_hat) + eps)."""
  params = tree_from_paths(TOY_TREE, np.random.default_rng(3))
  lr = 1e-2
  cfg = optim.optim_config(learning_rate=lr, warmup_steps=0, schedule='constant', weight_decay=0.0,
                           clip_grad_norm=0.0, layer_decay=layer_decay, num_layers=3, eps=1e-10)
  tx, _ = optim.make_optimizer(cfg)
  updates, _ = tx.update(grads, tx.init(params), params)
  return {k: np.asarray(u) / lr for k, u in flat(updates).items()}


def test_layer_decay_scales_the_update():
  grads = tree_from_paths(TOY_TREE, np.random.default_rng(4))
  steps = first_step_over_lr(grads, 0.5)
  for path, step in steps.items():
    # First Adam step with bias correction: m_hat / sqrt(v_hat) = sign(g); the update is -lr * scale * sign(g).
    np.testing.assert_allclose(step, -TOY_SCALES[path] * np.sign(flat(grads)[path]), rtol=1e-6, err_msg=path)


def test_layer_decay_is_applied_to_updates_not_gradients():
  grads = tree_from_paths(TOY_TREE, np.random.default_rng(5))
  base = first_step_over_lr(grads, 0.5)
  # A gradient scaled by 100 gives the same first step: the scale would be cancelled by Adam ...
  scaled = first_step_over_lr(jax.tree.map(lambda g: 100.0 * g, grads), 0.5)
  for path in base:
    np.testing.assert_allclose(scaled[path], base[path], rtol=1e-6, err_msg=path)
  # ... so scaling the gradients by the layer factors (without layer decay) would leave the step unchanged,
  # whereas scaling the updates gives the layer factors.
  grad_scales = optim.layer_decay_scales(grads, 0.5, 3)
  grads_scaled_per_layer = jax.tree.map(lambda g, s: g * s, grads, grad_scales)
  undecayed = first_step_over_lr(grads_scaled_per_layer, 1.0)
  for path in base:
    np.testing.assert_allclose(undecayed[path], -np.sign(flat(grads)[path]), rtol=1e-6, err_msg=path)
    np.testing.assert_allclose(base[path], TOY_SCALES[path] * undecayed[path], rtol=1e-6, err_msg=path)

# ----------------------------------------------------------------------------------------------------------------
# Decay masks.
# ----------------------------------------------------------------------------------------------------------------

BERT_DECAYED = [
    'bert/embeddings/position_embeddings/embedding',
    'bert/embeddings/token_type_embeddings/embedding',
    'bert/embeddings/word_embeddings/embedding',
    'bert/pooler/kernel',
    'mlm_transform/kernel',
    'nsp/kernel',
] + [f'bert/layer_{i}/{name}/kernel' for i in range(2)
     for name in ('query', 'key', 'value', 'attention_output', 'intermediate', 'output')]
BERT_NOT_DECAYED = [
    'bert/embeddings/LayerNorm/bias',
    'bert/embeddings/LayerNorm/scale',
    'bert/pooler/bias',
    'mlm_LayerNorm/bias',
    'mlm_LayerNorm/scale',
    'mlm_output_bias',
    'mlm_transform/bias',
    'nsp/bias',
] + [f'bert/layer_{i}/{name}/bias' for i in range(2)
     for name in ('query', 'key', 'value', 'attention_output', 'intermediate', 'output')] + [
    f'bert/layer_{i}/{ln}/{leaf}' for i in range(2) for ln in ('attention_LayerNorm', 'output_LayerNorm')
    for leaf in ('scale', 'bias')]


def test_decay_mask_bert_tree():
  params = {'params': tree_from_paths({p: (1,) for p in BERT_DECAYED + BERT_NOT_DECAYED})}
  mask = flat(optim.decay_mask(params))
  assert sorted(p for p, m in mask.items() if m) == sorted(BERT_DECAYED)
  assert sorted(p for p, m in mask.items() if not m) == sorted(BERT_NOT_DECAYED)
  assert jax.tree.structure(optim.decay_mask(params)) == jax.tree.structure(params)


def test_decay_mask_xlnet_tree():
  decayed = ['transformer/word_embedding/embedding', 'transformer/mask_emb/mask_emb',
             'transformer/layer_0/rel_attn/q/kernel', 'transformer/layer_0/rel_attn/seg_embed',
             'transformer/layer_0/ff/layer_1/kernel', 'transformer/bias_proj/kernel']
  excluded = ['transformer/layer_0/rel_attn/r_w_bias', 'transformer/layer_0/rel_attn/r_r_bias',
              'transformer/layer_0/rel_attn/r_s_bias', 'transformer/layer_0/rel_attn/layer_norm/scale',
              'transformer/layer_0/ff/layer_norm/bias', 'transformer/layer_0/ff/layer_1/bias', 'lm_loss/bias']
  mask = flat(optim.decay_mask(tree_from_paths({p: (1,) for p in decayed + excluded})))
  assert sorted(p for p, m in mask.items() if m) == sorted(decayed)


def test_custom_decay_patterns():
  params = tree_from_paths({'a/kernel': (1,), 'a/bias': (1,), 'b/kernel': (1,)})
  mask = flat(optim.decay_mask(params, [r'^b/']))
  assert mask == {'a/bias': True, 'a/kernel': True, 'b/kernel': False}

# ----------------------------------------------------------------------------------------------------------------
# Config validation.
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize('overrides, total, message', [
    (dict(warmup_steps=2000, total_steps=1000), None, 'config.optim.warmup_steps: must be <= total_steps (1000)'),
    (dict(warmup_steps=2000, total_steps=0), 1000, 'config.optim.warmup_steps: must be <= total_steps (1000)'),
    (dict(total_steps=0), None, 'config.optim.total_steps: is 0'),
    (dict(name='sgd'), 100, 'config.optim.name: must be one of'),
    (dict(schedule='step'), 100, 'config.optim.schedule: must be one of'),
    (dict(learning_rate=0.0), 100, 'config.optim.learning_rate: must be a positive number'),
    (dict(b2=1.0), 100, 'config.optim.b2: must be in [0, 1)'),
    (dict(eps=0.0), 100, 'config.optim.eps: must be a number > 0'),
    (dict(end_lr_ratio=1.5), 100, 'config.optim.end_lr_ratio'),
    (dict(layer_decay=0.0), 100, 'config.optim.layer_decay'),
    (dict(clip_grad_norm=-1.0), 100, 'config.optim.clip_grad_norm'),
    (dict(no_decay_patterns=('(unclosed',)), 100, 'config.optim.no_decay_patterns: invalid regex'),
    (dict(layer_index_pattern='layer_'), 100, 'config.optim.layer_index_pattern'),
])
def test_validate_optim_config_errors(overrides, total, message):
  cfg = optim.optim_config(**{'warmup_steps': 10, **overrides})
  with pytest.raises(ConfigError) as info:
    optim.validate_optim_config(cfg, total)
  assert str(info.value).startswith(message), str(info.value)
  with pytest.raises(ConfigError):
    optim.make_optimizer(cfg, total)


def test_validate_accepts_defaults_and_constant_without_total():
  optim.validate_optim_config(optim.optim_config(), 1_000_000)
  optim.validate_optim_config(optim.optim_config(schedule='constant', warmup_steps=0))
