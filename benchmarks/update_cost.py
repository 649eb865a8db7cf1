"""The optimizer update and the train step's non-finite guard alone, at MiniLM size (22.6 M parameters).

  python -m benchmarks.update_cost                     # every variant
  python -m benchmarks.update_cost plain landed        # some

Each variant is one jitted function (state donated) of (params, Adam state, gradients) with the fine-tuning
optimizer (AdamW, clipping at 1.0); printed: compile + first call, then the median and minimum of 30 calls.
  plain    the update, no guard
  after    the guard as it was before `train_step.update_if`: update, check the new state, lax.cond between the
           two finished states
  where    the update, then a select per leaf on the gradient norm's finiteness (no state check)
  inside   the update inside the lax.cond, gated on the gradient norm only
  landed   `train_step.update_if` as the train step uses it: the starting state checked too
"""
from __future__ import annotations

import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from common import optim, train_step

# all-MiniLM-L6-v2's parameter shapes: word / position / type embeddings, 6 layers of 4 x [384, 384] and the FFN,
# and the vectors (biases, LayerNorms).
SHAPES = ([(30522, 384), (512, 384), (2, 384)] + [(384, 384)] * 24 + [(384, 1536), (1536, 384)] * 6
          + [(384,)] * 60 + [(1536,)] * 6)
VARIANTS = ('plain', 'after', 'where', 'inside', 'landed')


def make_variant(kind: str, tx: optax.GradientTransformation):
  def step(params, opt_state, grads):
    grad_norm = optax.tree.norm(grads)

    def update():
      updates, new_opt = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), new_opt

    ok = jnp.isfinite(grad_norm)
    if kind == 'plain':
      new = update()
    elif kind == 'after':
      new = update()
      ok = ok & train_step.all_finite(new)
      new = jax.lax.cond(ok, lambda: new, lambda: (params, opt_state))
    elif kind == 'where':
      new = jax.tree.map(lambda a, b: jnp.where(ok, a, b), update(), (params, opt_state))
    elif kind == 'inside':
      new = train_step.update_if(ok, update, (params, opt_state))
    else:
      ok = ok & train_step.all_finite((params, opt_state))
      new = train_step.update_if(ok, update, (params, opt_state))
    return new[0], new[1], grad_norm + ok
  return jax.jit(step, donate_argnums=(0, 1))


def main(argv: list[str]) -> None:
  kinds = argv or list(VARIANTS)
  unknown = [k for k in kinds if k not in VARIANTS]
  if unknown:
    raise SystemExit(f'unknown variant {unknown[0]!r}: one of {", ".join(VARIANTS)}')
  params = {f'p{i}': jnp.asarray(np.random.RandomState(i).normal(0, 0.02, s), jnp.float32)
            for i, s in enumerate(SHAPES)}
  print(f'{sum(x.size for x in params.values()) / 1e6:.1f} M parameters; {jax.devices()[0].device_kind}')
  cfg = optim.optim_config(learning_rate=1e-4, warmup_steps=10, weight_decay=0.01, clip_grad_norm=1.0)
  tx, _ = optim.make_optimizer(cfg, 125)
  grads = jax.tree.map(lambda x: x * 1e-3, params)
  for kind in kinds:
    fn = make_variant(kind, tx)
    p = jax.tree.map(jnp.copy, params)
    o = tx.init(p)
    start = time.perf_counter()
    p, o, n = fn(p, o, grads)
    jax.block_until_ready(n)
    first = time.perf_counter() - start
    times = []
    for _ in range(30):
      start = time.perf_counter()
      p, o, n = fn(p, o, grads)
      jax.block_until_ready((p, o))
      times.append(time.perf_counter() - start)
    print(f'{kind:8s} compile + first call {first:.2f} s; update median {np.median(times) * 1e3:.1f} ms, '
          f'min {np.min(times) * 1e3:.1f} ms')


if __name__ == '__main__':
  main(sys.argv[1:])
