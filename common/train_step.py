"""The pure step functions of training: one jitted optimizer step (with exact gradient accumulation and the
non-finite skip) and one eval step, for any `Objective`.

Exactness: a loss is a sum of terms `sum_t / norm_t` where `norm_t` (e.g. the number of predicted tokens) is computed
from the WHOLE global batch before micro-batching, so gradient accumulation gives the same gradient as one big batch.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import flax
import jax
import jax.numpy as jnp
import optax
from flax import linen as nn

PyTree = Any


@flax.struct.dataclass
class TrainState:
  step: jax.Array          # [] int32, number of optimizer steps taken
  params: PyTree           # float32 master parameters
  opt_state: PyTree
  aux: PyTree              # state carried across steps (XLNet memory); {} when unused
  rng: jax.Array           # [2] uint32 base key; step keys are fold_in(rng, step)
  skipped: jax.Array       # [] int32, steps skipped for non-finite loss or gradients
  bad_streak: jax.Array    # [] int32, consecutive skipped steps up to now


@dataclasses.dataclass(frozen=True)
class Objective:
  """What the trainer needs from a model + loss.

  init_variables(rng) -> boxed flax variables ({'params': ...} with logical-axis metadata).
  loss_fn(params, batch, rng, aux, norms, train) -> (loss, (sums, new_aux)); `loss` already divided by the global
      `norms`; `sums` a dict of scalar sums (losses, correct counts) to be normalised by `finalize`.
  normalizers(batch) -> dict of scalar denominators over the whole global batch.
  finalize(sums, norms) -> dict of scalar metrics (works on jnp or numpy).
  flops_per_example: training FLOPs of one example (forward + backward) for MFU.
  perplexity_of: the finalized metric that is a mean NLL per predicted token (logged as `perplexity` = exp of it).
  tokens_per_example: sequence length (for tokens/s).
  init_aux(global_batch_size) -> aux pytree whose leaves are batch-leading `[global_batch, ...]` (split with the
      batch under gradient accumulation); aux_partition(aux) -> PartitionSpecs (default replicated).
  """
  init_variables: Callable[[jax.Array], PyTree]
  loss_fn: Callable[..., tuple[jax.Array, tuple[dict, PyTree]]]
  normalizers: Callable[[Mapping[str, jax.Array]], dict]
  finalize: Callable[[Mapping[str, Any], Mapping[str, Any]], dict]
  flops_per_example: float
  tokens_per_example: int
  init_aux: Callable[[int], PyTree] = lambda batch_size: {}
  aux_partition: Callable[[PyTree], PyTree] | None = None
  perplexity_of: str | None = None   # the metric (a mean NLL per predicted token) whose exp is logged as perplexity


def _split_microbatches(batch: PyTree, accum: int) -> PyTree:
  """`[B, ...]` -> `[accum, B/accum, ...]` where micro-batch i holds rows i, i+accum, ... so every device keeps
  its own rows (no resharding of the data axis)."""
  def split(x):
    y = x.reshape(x.shape[0] // accum, accum, *x.shape[1:])
    y = jnp.swapaxes(y, 0, 1)
    return nn.with_logical_constraint(y, (None, 'batch') + (None,) * (x.ndim - 1))
  return jax.tree.map(split, batch)


def _merge_microbatches(tree: PyTree) -> PyTree:
  """Inverse of `_split_microbatches`: `[accum, B/accum, ...]` -> `[B, ...]` in the original row order."""
  def merge(y):
    x = jnp.swapaxes(y, 0, 1)
    return x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])
  return jax.tree.map(merge, tree)


def all_finite(tree: PyTree) -> jax.Array:
  """[] bool: no inf or NaN in any floating-point leaf. `sum(x - x)` is 0 for finite x and NaN otherwise (inf - inf
  is NaN), so each leaf costs one read and large finite values cannot overflow the test. Not `x * 0`: XLA:CPU
  feeds that product a zero tensor of the leaf's full shape, written and read every step (the check took 75 ms
  instead of 33 ms over a MiniLM state). Not `max(|x|)`: a vectorised max can drop a NaN."""
  leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
  if not leaves:
    return jnp.array(True)
  return jnp.isfinite(sum(jnp.sum(x - x, dtype=jnp.float32) for x in leaves))


def update_if(ok: jax.Array, update: Callable[[], PyTree], old: PyTree) -> PyTree:
  """`update()` if `ok` else `old`, as one conditional over the whole tree whose taken branch computes the update:
  it writes the new state in place of the donated old one. Computing the update first and then choosing between
  two finished states copied the whole state every step (~90 ms of a 200 ms update at MiniLM size, 6 layers / 384 /
  30522 words); an elementwise `where(ok, new, old)` per leaf gives XLA one select fusion per
  parameter and moment to generate code for, which made compiling the step 2x (4 layers / 256) to 5x (6 layers /
  384) slower for the same step time (benchmarks/README.md, lever table)."""
  return jax.lax.cond(ok, update, lambda: old)


def make_train_step(objective: Objective, tx: optax.GradientTransformation, schedule: optax.Schedule,
                    accum_steps: int) -> Callable[[TrainState, PyTree, jax.Array], tuple[TrainState, dict]]:
  """`train_step(state, batch, state_checked) -> (new state, metrics)`.

  `state_checked` (a float32 scalar): nonzero when the caller knows `state` to be finite: an earlier step of the
  same chain reported `metrics['state_finite']` 1 (the trainer passes the flag of the step before the previous
  one); zero (the first steps of a run, any state made or restored elsewhere) has the step test the parameters
  and Adam state for inf / NaN first, one read of the whole state (~20 ms of the ~80 ms update at MiniLM size).
  Either way a step is applied only if its loss, its gradients and the state it starts from are finite: a finite
  start and finite gradients give a finite new state (see below), a skipped step leaves its start as it was, and
  a step that starts from a non-finite state is skipped and says so (`state_finite` 0), so the steps after it
  test again.
  """
  grad_fn = jax.value_and_grad(objective.loss_fn, has_aux=True)

  def train_step(state: TrainState, batch: PyTree, state_checked: jax.Array) -> tuple[TrainState, dict]:
    rng = jax.random.fold_in(state.rng, state.step)
    norms = objective.normalizers(batch)
    if accum_steps == 1:
      (loss, (sums, aux)), grads = grad_fn(state.params, batch, rng, state.aux, norms, True)
    else:
      # Carried state (XLNet memory) is batch-leading: each micro-batch carries its own rows of it.
      micro = _split_microbatches(batch, accum_steps)
      micro_aux = _split_microbatches(state.aux, accum_steps)

      def body(carry, xs):
        grads_acc, loss_acc, sums_acc = carry
        mb, aux_mb, i = xs
        (l, (s, new_aux)), g = grad_fn(state.params, mb, jax.random.fold_in(rng, i), aux_mb, norms, True)
        return (jax.tree.map(jnp.add, grads_acc, g), loss_acc + l, jax.tree.map(jnp.add, sums_acc, s)), new_aux

      zeros = jax.tree.map(jnp.zeros_like, state.params)
      first, first_aux = jax.tree.map(lambda x: x[0], (micro, micro_aux))
      sums_shape = jax.eval_shape(lambda: objective.loss_fn(state.params, first, rng, first_aux, norms, True))[1][0]
      sums0 = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), sums_shape)
      (grads, loss, sums), aux_stack = jax.lax.scan(body, (zeros, jnp.zeros((), jnp.float32), sums0),
                                                    (micro, micro_aux, jnp.arange(accum_steps)))
      aux = _merge_microbatches(aux_stack)
    grad_norm = optax.tree.norm(grads)
    # A step is applied only if its loss and gradients are finite and so are the parameters and optimizer state it
    # starts from (finite gradients can still meet a non-finite moment restored from a bad checkpoint). Those give
    # a finite new state: Adam's moments are sums of finite terms (the squares too, their sum being the finite
    # gradient norm squared), and its update divides by sqrt(nu) + eps with eps > 0 (`optim`).
    state_ok = jax.lax.cond(jnp.asarray(state_checked) != 0, lambda: jnp.array(True),
                            lambda: all_finite((state.params, state.opt_state)))
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & state_ok

    def update():
      updates, new_opt_state = tx.update(grads, state.opt_state, state.params)
      return optax.apply_updates(state.params, updates), new_opt_state, aux
    kept_params, kept_opt_state, kept_aux = update_if(ok, update, (state.params, state.opt_state, state.aux))
    new_state = state.replace(
        step=state.step + 1,
        params=kept_params,
        opt_state=kept_opt_state,
        aux=kept_aux,
        skipped=state.skipped + (1 - ok.astype(jnp.int32)),
        bad_streak=jnp.where(ok, 0, state.bad_streak + 1),
    )
    metrics = dict(objective.finalize(sums, norms))
    metrics.update(loss=loss, grad_norm=grad_norm, learning_rate=schedule(state.step),
                   step_ok=ok.astype(jnp.float32), skipped_steps=new_state.skipped.astype(jnp.float32),
                   nonfinite_streak=new_state.bad_streak.astype(jnp.float32),
                   state_finite=state_ok.astype(jnp.float32))
    return new_state, metrics

  return train_step


def make_eval_step(objective: Objective) -> Callable[[PyTree, PyTree, PyTree], tuple[dict, dict]]:
  def eval_step(params, batch, aux):
    norms = objective.normalizers(batch)
    _, (sums, _) = objective.loss_fn(params, batch, jax.random.PRNGKey(0), aux, norms, False)
    return sums, norms
  return eval_step
