"""Optimizers for pretraining and fine-tuning: AdamW / LAMB optax chains, learning-rate schedules, decay masks and
layer-wise learning-rate decay. Model-agnostic: everything is decided from parameter paths.

A parameter's path is its tree path joined with '/', without a leading `params` collection, e.g.
`bert/layer_3/query/kernel`, `bert/embeddings/word_embeddings/embedding`, `transformer/layer_5/rel_attn/r_w_bias`.

The chain built by `make_optimizer` is, in order:

  clip by global norm  ->  Adam moments (with or without bias correction)  ->  + weight_decay * param (masked)
  ->  [LAMB only: trust ratio ||param|| / ||update||, masked]  ->  layer-wise decay of the update  ->  * -lr(step)

so the step applied to a parameter is `param -= lr(step) * layer_scale * (adam_direction + weight_decay * param)`.
Every transformation is stateless except Adam (`mu`, `nu` mirror the parameter tree, so shardings can be copied
from the parameters by tree path, see `common.sharding.match_shardings`) and the schedule counter. Call
`tx.update(grads, opt_state, params)` with the parameters: weight decay and the trust ratio need them.
"""
from __future__ import annotations

import math
import re
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import optax

from common.config import ConfigError, require

OPTIMIZERS = ('adamw', 'lamb')
SCHEDULES = ('linear', 'polynomial', 'cosine', 'constant')

# What the original BERT and XLNet exclude from weight decay ("LayerNorm", "layer_norm", "bias" as substrings of
# the variable name), as regexes searched in the path: any LayerNorm module, and any leaf whose own name contains
# 'bias' (dense biases, XLNet's r_w_bias / r_r_bias / r_s_bias, BERT's mlm_output_bias). Unlike a bare substring,
# a module that merely has 'bias' in its name (`bias_proj/kernel`) is still decayed.
DEFAULT_NO_DECAY_PATTERNS = ('LayerNorm', 'layer_norm', r'bias[^/]*$')
DEFAULT_LAYER_INDEX_PATTERN = r'(?:^|/)layer_(\d+)(?:/|$)'
# Parameters below the first encoder layer: word / position / segment embeddings (and their LayerNorm), XLNet's
# mask_emb. They get the smallest layer-decay scale.
DEFAULT_EMBEDDING_PATTERN = r'embed|mask_emb'


# ----------------------------------------------------------------------------------------------------------------
# Config.
# ----------------------------------------------------------------------------------------------------------------

def optim_config(**overrides) -> ml_collections.ConfigDict:
  """The `config.optim` section; defaults are BERT's pretraining optimizer (AdamW, lr 1e-4, 10k warmup, linear).

  Fields:
    name: 'adamw' or 'lamb'.
    learning_rate: peak learning rate, reached at the end of warmup.
    warmup_steps: linear warmup from 0 to the peak over this many steps.
    total_steps: where the decay ends; 0 means the trainer's num_train_steps (passed to `make_optimizer`).
    schedule: 'linear' | 'polynomial' | 'cosine' | 'constant' (the shape after warmup).
    poly_power: exponent of the 'polynomial' schedule (1.0 is linear).
    end_lr_ratio: the learning rate at total_steps, as a fraction of the peak.
    weight_decay: decoupled weight decay, added to the update as weight_decay * param before the lr scaling.
    b1, b2, eps: Adam moments and the epsilon added to sqrt(nu).
    bias_correction: divide the moments by (1 - b^t). The original BERT `AdamWeightDecayOptimizer` and ALBERT's
      LAMB have none: `bias_correction=False` reproduces them exactly; True matches `torch.optim.AdamW` and the
      LAMB paper.
    clip_grad_norm: clip gradients to this global norm first; 0 disables clipping.
    layer_decay: layer-wise learning-rate decay factor (1.0 = off), see `layer_decay_scales`.
    num_layers: encoder depth for layer decay; 0 infers it from the parameter paths.
    no_decay_patterns: regexes searched in parameter paths; a match is excluded from weight decay (and, for LAMB,
      from the trust ratio).
    layer_index_pattern: regex whose first group is the layer number in a path.
    embedding_pattern: regex marking parameters below the first layer (for layer decay).
  """
  cfg = ml_collections.ConfigDict(dict(
      name='adamw', learning_rate=1e-4, warmup_steps=10_000, total_steps=0, schedule='linear', poly_power=1.0,
      end_lr_ratio=0.0, weight_decay=0.01, b1=0.9, b2=0.999, eps=1e-6, bias_correction=True, clip_grad_norm=1.0,
      layer_decay=1.0, num_layers=0, no_decay_patterns=DEFAULT_NO_DECAY_PATTERNS,
      layer_index_pattern=DEFAULT_LAYER_INDEX_PATTERN, embedding_pattern=DEFAULT_EMBEDDING_PATTERN,
  ))
  cfg.update(overrides)
  return cfg


def _is_number(value: Any) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_int(value: Any) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _require_regex(pattern: Any, field: str, groups: int = 0) -> None:
  require(isinstance(pattern, str), field, f'must be a regex string, got {pattern!r}')
  try:
    compiled = re.compile(pattern)
  except re.error as e:
    raise ConfigError(f'config.{field}: invalid regex {pattern!r} ({e})') from None
  require(compiled.groups >= groups, field, f'regex {pattern!r} needs a capture group for the layer number')


def resolve_total_steps(cfg: ml_collections.ConfigDict, total_steps: int | None = None) -> int:
  """`cfg.total_steps` if set (> 0), else the trainer's `total_steps` (num_train_steps), else 0."""
  if cfg.total_steps:
    return int(cfg.total_steps)
  return int(total_steps or 0)


def validate_optim_config(cfg: ml_collections.ConfigDict, total_steps: int | None = None,
                          prefix: str = 'optim') -> None:
  """Raises `ConfigError('config.optim.<field>: ...')` for the first invalid field.

  `total_steps` is the trainer's num_train_steps, used when `cfg.total_steps` is 0.
  """
  f = lambda name: f'{prefix}.{name}'
  require(cfg.name in OPTIMIZERS, f('name'), f'must be one of {OPTIMIZERS}, got {cfg.name!r}')
  require(cfg.schedule in SCHEDULES, f('schedule'), f'must be one of {SCHEDULES}, got {cfg.schedule!r}')
  require(_is_number(cfg.learning_rate) and cfg.learning_rate > 0, f('learning_rate'),
          f'must be a positive number, got {cfg.learning_rate!r}')
  require(_is_int(cfg.warmup_steps) and cfg.warmup_steps >= 0, f('warmup_steps'),
          f'must be an integer >= 0, got {cfg.warmup_steps!r}')
  require(_is_int(cfg.total_steps) and cfg.total_steps >= 0, f('total_steps'),
          f'must be an integer >= 0 (0 = the trainer\'s num_train_steps), got {cfg.total_steps!r}')
  total = resolve_total_steps(cfg, total_steps)
  if cfg.schedule != 'constant':
    require(total > 0, f('total_steps'),
            f'is 0 and no num_train_steps was given; the {cfg.schedule!r} schedule needs a number of steps')
  if total > 0:
    require(cfg.warmup_steps <= total, f('warmup_steps'),
            f'must be <= total_steps ({total}), got {cfg.warmup_steps}')
  require(_is_number(cfg.poly_power) and cfg.poly_power > 0, f('poly_power'),
          f'must be a positive number, got {cfg.poly_power!r}')
  require(_is_number(cfg.end_lr_ratio) and 0.0 <= cfg.end_lr_ratio <= 1.0, f('end_lr_ratio'),
          f'must be in [0, 1], got {cfg.end_lr_ratio!r}')
  require(_is_number(cfg.weight_decay) and cfg.weight_decay >= 0, f('weight_decay'),
          f'must be a number >= 0, got {cfg.weight_decay!r}')
  for name in ('b1', 'b2'):
    value = cfg[name]
    require(_is_number(value) and 0.0 <= value < 1.0, f(name), f'must be in [0, 1), got {value!r}')
  # > 0: a parameter whose gradients were all 0 would otherwise be updated by 0 / 0 (the train step's guard
  # applies an update only from a finite state and finite gradients, which then give a finite new state).
  require(_is_number(cfg.eps) and cfg.eps > 0, f('eps'), f'must be a number > 0, got {cfg.eps!r}')
  require(isinstance(cfg.bias_correction, bool), f('bias_correction'),
          f'must be True or False, got {cfg.bias_correction!r}')
  require(_is_number(cfg.clip_grad_norm) and cfg.clip_grad_norm >= 0, f('clip_grad_norm'),
          f'must be a number >= 0 (0 disables clipping), got {cfg.clip_grad_norm!r}')
  require(_is_number(cfg.layer_decay) and 0.0 < cfg.layer_decay <= 1.0, f('layer_decay'),
          f'must be in (0, 1] (1 disables layer decay), got {cfg.layer_decay!r}')
  require(_is_int(cfg.num_layers) and cfg.num_layers >= 0, f('num_layers'),
          f'must be an integer >= 0 (0 = infer from parameter paths), got {cfg.num_layers!r}')
  patterns = cfg.no_decay_patterns
  require(isinstance(patterns, (list, tuple)), f('no_decay_patterns'),
          f'must be a list of regex strings, got {patterns!r}')
  for pattern in patterns:
    _require_regex(pattern, f('no_decay_patterns'))
  _require_regex(cfg.layer_index_pattern, f('layer_index_pattern'), groups=1)
  _require_regex(cfg.embedding_pattern, f('embedding_pattern'))


# ----------------------------------------------------------------------------------------------------------------
# Learning-rate schedule.
# ----------------------------------------------------------------------------------------------------------------

def learning_rate_schedule(cfg: ml_collections.ConfigDict, total_steps: int | None = None) -> optax.Schedule:
  """lr(step): linear warmup from 0 to `learning_rate` over `warmup_steps`, then decay to `end_lr_ratio * peak`.

  With W = warmup_steps, T = total steps, f = clip((step - W) / (T - W), 0, 1), end = end_lr_ratio * peak:
    step < W:     peak * step / W
    linear:       end + (peak - end) * (1 - f)
    polynomial:   end + (peak - end) * (1 - f) ** poly_power
    cosine:       end + (peak - end) * (1 + cos(pi * f)) / 2
    constant:     peak
  and lr stays at `end` after T. The decay starts from the peak at W (the original BERT decays over [0, T] and
  overwrites the warmup part, so its lr right after warmup is peak * (1 - W / T); with W << T the two agree).
  `total_steps` is the trainer's num_train_steps, used when `cfg.total_steps` is 0. Accepts traced steps.
  """
  peak = float(cfg.learning_rate)
  warmup = int(cfg.warmup_steps)
  total = resolve_total_steps(cfg, total_steps)
  kind = cfg.schedule
  if kind not in SCHEDULES:
    raise ConfigError(f'config.optim.schedule: must be one of {SCHEDULES}, got {kind!r}')
  if kind != 'constant' and total <= 0:
    raise ConfigError(f'config.optim.total_steps: is 0 and no num_train_steps was given; '
                      f'the {kind!r} schedule needs a number of steps')
  end = peak * float(cfg.end_lr_ratio)
  power = float(cfg.poly_power)
  decay_steps = max(total - warmup, 1)

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    warm = peak * step / max(warmup, 1)
    frac = jnp.clip((step - warmup) / decay_steps, 0.0, 1.0)
    if kind == 'constant':
      after = jnp.full_like(step, peak)
    elif kind == 'linear':
      after = end + (peak - end) * (1.0 - frac)
    elif kind == 'polynomial':
      after = end + (peak - end) * (1.0 - frac) ** power
    else:
      after = end + (peak - end) * 0.5 * (1.0 + jnp.cos(jnp.pi * frac))
    return jnp.where(step < warmup, warm, after)

  return schedule


# ----------------------------------------------------------------------------------------------------------------
# Parameter paths, decay mask, layer-decay scales.
# ----------------------------------------------------------------------------------------------------------------

def _key_name(key: Any) -> str:
  for attr in ('key', 'name', 'idx'):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def param_paths(tree: Any) -> Any:
  """The tree with each leaf replaced by its path string, e.g. 'bert/layer_0/query/kernel'.

  A leading 'params' (flax collection) is dropped, so `{'params': p}` and `p` give the same paths.
  """
  def path_of(key_path, _):
    parts = [_key_name(k) for k in key_path]
    if parts and parts[0] == 'params':
      parts = parts[1:]
    return '/'.join(parts)

  return jax.tree_util.tree_map_with_path(path_of, tree)


def decay_mask(params: Any, patterns: Sequence[str] = DEFAULT_NO_DECAY_PATTERNS) -> Any:
  """Tree of Python bools shaped like `params`: True = apply weight decay, False = a `patterns` regex matched."""
  compiled = [re.compile(p) for p in patterns]
  return jax.tree.map(lambda path: not any(c.search(path) for c in compiled), param_paths(params))


def layer_index(path: str, pattern: str = DEFAULT_LAYER_INDEX_PATTERN) -> int | None:
  """The layer number in `path` (first group of the first match of `pattern`), or None."""
  match = re.search(pattern, path)
  return None if match is None else int(match.group(1))


def infer_num_layers(params: Any, pattern: str = DEFAULT_LAYER_INDEX_PATTERN) -> int:
  """1 + the largest layer number found in the parameter paths (0 if there is none)."""
  indices = [layer_index(p, pattern) for p in jax.tree.leaves(param_paths(params))]
  return 1 + max((i for i in indices if i is not None), default=-1)


def layer_decay_scales(params: Any, layer_decay: float, num_layers: int = 0,
                       pattern: str = DEFAULT_LAYER_INDEX_PATTERN, *,
                       embedding_pattern: str = DEFAULT_EMBEDDING_PATTERN) -> Any:
  """Tree of Python floats shaped like `params`: the learning-rate multiplier of every parameter.

  With L = num_layers (0: inferred from the paths) and d = layer_decay:
    a parameter of layer i (0-based, from `pattern`)     -> d ** (L - i)    (top layer: d, bottom layer: d ** L)
    no layer number, matches `embedding_pattern`          -> d ** (L + 1)    (embeddings, mask_emb)
    anything else (pooler, MLM / NSP / task heads)        -> 1
  The layer number is looked up first, so a per-layer segment embedding belongs to its layer.
  """
  num_layers = num_layers or infer_num_layers(params, pattern)
  embedding = re.compile(embedding_pattern)

  def scale(path: str) -> float:
    index = layer_index(path, pattern)
    if index is not None:
      if index >= num_layers:
        raise ConfigError(f'config.optim.num_layers: is {num_layers} but parameter {path!r} is in layer {index}')
      return float(layer_decay) ** (num_layers - index)
    if embedding.search(path):
      return float(layer_decay) ** (num_layers + 1)
    return 1.0

  return jax.tree.map(scale, param_paths(params))


# ----------------------------------------------------------------------------------------------------------------
# Gradient transformations.
# ----------------------------------------------------------------------------------------------------------------

def global_norm(tree: Any) -> jax.Array:
  """sqrt(sum of squares of every leaf). A scalar."""
  return optax.tree.norm(tree)


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
  """g * max_norm / ||g|| when ||g|| > max_norm, as `tf.clip_by_global_norm` in the original BERT (optax's)."""
  return optax.clip_by_global_norm(max_norm)


def scale_by_adam(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-6,
                  bias_correction: bool = True) -> optax.GradientTransformation:
  """Adam direction m_hat / (sqrt(v_hat) + eps), with m = b1 m + (1-b1) g and v = b2 v + (1-b2) g^2.

  With `bias_correction` m_hat = m / (1 - b1^t), v_hat = v / (1 - b2^t) (Adam, torch AdamW, the LAMB paper);
  without it m_hat = m, v_hat = v (the original BERT `AdamWeightDecayOptimizer`, ALBERT's LAMB). State:
  `optax.ScaleByAdamState(count, mu, nu)` with `mu` and `nu` shaped, typed and pathed like the parameters.
  """

  def init_fn(params):
    zeros = lambda p: jnp.zeros_like(p)
    return optax.ScaleByAdamState(count=jnp.zeros((), jnp.int32), mu=jax.tree.map(zeros, params),
                                  nu=jax.tree.map(zeros, params))

  def update_fn(updates, state, params=None):
    del params
    mu = jax.tree.map(lambda m, g: b1 * m + (1.0 - b1) * g.astype(m.dtype), state.mu, updates)
    nu = jax.tree.map(lambda v, g: b2 * v + (1.0 - b2) * jnp.square(g.astype(v.dtype)), state.nu, updates)
    count = optax.safe_int32_increment(state.count)
    if bias_correction:
      # 1 - b^t as -expm1(t log b): computing b^t in float32 and subtracting from 1 loses ~1e-5 relative accuracy
      # for b2 = 0.999 in the first steps.
      t = count.astype(jnp.float32)
      c1 = -jnp.expm1(t * math.log(b1)) if b1 > 0 else jnp.ones((), jnp.float32)
      c2 = -jnp.expm1(t * math.log(b2)) if b2 > 0 else jnp.ones((), jnp.float32)
    else:
      c1 = c2 = 1.0

    def direction(g, m, v):
      m_hat = m / jnp.asarray(c1, m.dtype)
      v_hat = v / jnp.asarray(c2, v.dtype)
      return (m_hat / (jnp.sqrt(v_hat) + eps)).astype(g.dtype)

    new_updates = jax.tree.map(direction, updates, mu, nu)
    return new_updates, optax.ScaleByAdamState(count=count, mu=mu, nu=nu)

  return optax.GradientTransformation(init_fn, update_fn)


def add_masked_weight_decay(weight_decay: float,
                            patterns: Sequence[str] = DEFAULT_NO_DECAY_PATTERNS) -> optax.GradientTransformation:
  """update + weight_decay * param where `decay_mask` is True (optax's `add_decayed_weights` with that mask).

  After the learning-rate scaling this is decoupled weight decay: param -= lr * (direction + wd * param), i.e.
  param * (1 - lr * wd) - lr * direction, which is exactly what `torch.optim.AdamW` does (it multiplies the
  parameter by (1 - lr * weight_decay) before the Adam step) and what the original BERT optimizer does.
  """
  if weight_decay == 0:
    return optax.identity()
  return optax.add_decayed_weights(weight_decay, mask=lambda params: decay_mask(params, patterns))


def scale_by_masked_trust_ratio(patterns: Sequence[str] = DEFAULT_NO_DECAY_PATTERNS) -> optax.GradientTransformation:
  """LAMB's layer adaptation: update * ||param|| / ||update|| per parameter array (1 if either norm is 0).

  Parameters excluded from weight decay (`patterns`) are excluded from the trust ratio too, as in the original
  LAMB implementation (exclude_from_layer_adaptation defaults to exclude_from_weight_decay): optax's
  `scale_by_trust_ratio` under that mask.
  """
  return optax.masked(optax.scale_by_trust_ratio(), lambda params: decay_mask(params, patterns))


def scale_by_layer_decay(layer_decay: float, num_layers: int = 0, pattern: str = DEFAULT_LAYER_INDEX_PATTERN, *,
                         embedding_pattern: str = DEFAULT_EMBEDDING_PATTERN) -> optax.GradientTransformation:
  """Multiplies each parameter's UPDATE by its `layer_decay_scales` factor. Stateless.

  It must sit after the Adam / LAMB normalisation, where it acts as a per-parameter learning rate. Scaling the
  gradients instead (as the original XLNet fine-tuning code does) is almost a no-op under Adam: m / sqrt(v) is
  invariant to a constant gradient scale c (m -> c m, sqrt(v) -> c sqrt(v)), so only the eps term would feel it.
  Weight decay is added before this transformation, so it is scaled too: the whole step of a lower layer shrinks.
  """
  if layer_decay == 1.0:
    return optax.identity()

  def update_fn(updates, state, params=None):
    del params
    scales = layer_decay_scales(updates, layer_decay, num_layers, pattern, embedding_pattern=embedding_pattern)
    return jax.tree.map(lambda u, s: u * jnp.asarray(s, u.dtype), updates, scales), state

  return optax.GradientTransformation(optax.init_empty_state, update_fn)


def make_optimizer(cfg: ml_collections.ConfigDict,
                   total_steps: int | None = None) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """(optax chain, lr schedule) for `config.optim`; `total_steps` is the trainer's num_train_steps.

  Chain: [clip_by_global_norm] -> scale_by_adam -> add_masked_weight_decay -> [LAMB: trust ratio]
  -> [scale_by_layer_decay] -> scale by -schedule(step). Transformations that are switched off (clip 0,
  layer_decay 1) are left out of the chain. The state is a tuple whose only parameter-shaped leaves are Adam's
  `mu` and `nu`; the trainer logs the lr by calling `schedule(step)` itself.
  """
  validate_optim_config(cfg, total_steps)
  schedule = learning_rate_schedule(cfg, total_steps)
  patterns = tuple(cfg.no_decay_patterns)
  parts = []
  if cfg.clip_grad_norm > 0:
    parts.append(clip_by_global_norm(float(cfg.clip_grad_norm)))
  parts.append(scale_by_adam(float(cfg.b1), float(cfg.b2), float(cfg.eps), bool(cfg.bias_correction)))
  parts.append(add_masked_weight_decay(float(cfg.weight_decay), patterns))
  if cfg.name == 'lamb':
    parts.append(scale_by_masked_trust_ratio(patterns))
  if cfg.layer_decay != 1.0:
    parts.append(scale_by_layer_decay(float(cfg.layer_decay), int(cfg.num_layers), cfg.layer_index_pattern,
                                      embedding_pattern=cfg.embedding_pattern))
  parts.append(optax.scale_by_learning_rate(schedule))
  return optax.chain(*parts), schedule
