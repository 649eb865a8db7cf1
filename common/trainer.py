"""One training loop for every model and objective.

Read top to bottom: config checks → mesh → optimizer → sharded state (init or resume) → jitted step → loop with
logging, eval and checkpoints. An objective (BERT MLM+NSP, XLNet PLM, a fine-tuning task) plugs in through
`Objective`; nothing here knows which model runs.

Exactness: a loss is a sum of terms `sum_t / norm_t` where `norm_t` (e.g. the number of predicted tokens) is computed
from the WHOLE global batch before micro-batching, so gradient accumulation gives the same gradient as one big batch.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import signal
import sys
import threading
import time
from typing import Any, Callable, Mapping

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import linen as nn
from jax.sharding import NamedSharding, PartitionSpec as P

from common import checkpoint as ckpt_lib
from common import metrics as metrics_lib
from common import optim
from common import sharding
from common import storage
from common.config import require, require_positive

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


def trainer_config(**overrides) -> ml_collections.ConfigDict:
  cfg = ml_collections.ConfigDict(dict(
      seed=0,
      num_train_steps=1000,
      global_batch_size=32,
      grad_accum_steps=1,
      log_every=10,
      eval_every=0,            # 0: only at the end
      num_eval_batches=8,
      checkpoint_every=500,
      keep_checkpoints=3,
      async_checkpoint=True,
      max_consecutive_nonfinite=10,
      peak_flops_per_device=0.0,   # 0: data sheet for TPU/GPU, measured matmul on CPU
      progress_bar=True,
      profile_steps='',        # 'A,B': a jax.profiler trace of steps A..B in WORKDIR/profile
      mesh=sharding.mesh_config(),
      logical_rules={},
  ))
  cfg.update(overrides)
  return cfg


def validate_trainer_config(config: ml_collections.ConfigDict, num_devices: int) -> None:
  """Refuses a config that cannot run on `num_devices` devices, before anything is compiled."""
  require_positive(config, ['num_train_steps', 'global_batch_size', 'grad_accum_steps', 'log_every'])
  data, fsdp, tensor = sharding.resolve_mesh_shape(config.mesh, num_devices)
  dp = data * fsdp
  per_micro = config.global_batch_size // config.grad_accum_steps
  require(config.global_batch_size % config.grad_accum_steps == 0, 'global_batch_size',
          f'{config.global_batch_size} is not divisible by grad_accum_steps={config.grad_accum_steps}')
  require(per_micro % dp == 0, 'global_batch_size',
          f'{config.global_batch_size} / grad_accum_steps={config.grad_accum_steps} = {per_micro} is not divisible '
          f'by the data-parallel size data*fsdp={dp}')
  require(config.global_batch_size % jax.process_count() == 0, 'global_batch_size',
          f'{config.global_batch_size} is not divisible by the number of processes {jax.process_count()}')
  for field in ('eval_every', 'checkpoint_every', 'num_eval_batches'):
    require(config[field] >= 0, field, f'must be >= 0, got {config[field]}')
  profile_window(config)
  require(isinstance(config.keep_checkpoints, int) and config.keep_checkpoints >= 1, 'keep_checkpoints',
          f'must be >= 1 (the run always ends with a checkpoint), got {config.keep_checkpoints!r}')


def profile_window(config: ml_collections.ConfigDict) -> tuple[int, int] | None:
  """(first, last) step of `config.profile_steps` ('A,B' or 'A'), or None when empty."""
  spec = str(config.get('profile_steps', '') or '').strip()
  if not spec:
    return None
  try:
    bounds = [int(x) for x in spec.split(',')]
  except ValueError:
    bounds = []
  require(len(bounds) in (1, 2) and 1 <= bounds[0] <= bounds[-1], 'profile_steps',
          f"must be 'A,B' with 1 <= A <= B (steps to trace), got {spec!r}")
  return bounds[0], bounds[-1]


def with_perplexity(values: dict, objective: 'Objective') -> dict:
  """`values` plus `perplexity` = exp(values[objective.perplexity_of]) when the objective has one."""
  key = objective.perplexity_of
  if key and key in values:
    values = dict(values, perplexity=math.exp(min(float(values[key]), 700.0)))
  return values


# ----------------------------------------------------------------------------------------------------------------
# The pure step functions.
# ----------------------------------------------------------------------------------------------------------------

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
  """[] bool: no inf or NaN in any floating-point leaf. `sum(x * 0)` is 0 for finite x and NaN otherwise, so each
  leaf costs one fused pass and large finite values cannot overflow the test."""
  leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
  if not leaves:
    return jnp.array(True)
  return jnp.isfinite(sum(jnp.sum(x * 0, dtype=jnp.float32) for x in leaves))


def make_train_step(objective: Objective, tx: optax.GradientTransformation, schedule: optax.Schedule,
                    accum_steps: int) -> Callable[[TrainState, PyTree], tuple[TrainState, dict]]:
  grad_fn = jax.value_and_grad(objective.loss_fn, has_aux=True)

  def train_step(state: TrainState, batch: PyTree) -> tuple[TrainState, dict]:
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
    updates, new_opt_state = tx.update(grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)
    # A step is kept only if everything it produces is finite: the loss, the gradients, and the new parameters and
    # optimizer state (finite gradients can still meet a non-finite moment restored from a bad checkpoint).
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & all_finite((new_params, new_opt_state))
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)
    new_state = state.replace(
        step=state.step + 1,
        params=keep(new_params, state.params),
        opt_state=keep(new_opt_state, state.opt_state),
        aux=keep(aux, state.aux),
        skipped=state.skipped + (1 - ok.astype(jnp.int32)),
        bad_streak=jnp.where(ok, 0, state.bad_streak + 1),
    )
    metrics = dict(objective.finalize(sums, norms))
    metrics.update(loss=loss, grad_norm=grad_norm, learning_rate=schedule(state.step),
                   step_ok=ok.astype(jnp.float32), skipped_steps=new_state.skipped.astype(jnp.float32),
                   nonfinite_streak=new_state.bad_streak.astype(jnp.float32))
    return new_state, metrics

  return train_step


def make_eval_step(objective: Objective) -> Callable[[PyTree, PyTree, PyTree], tuple[dict, dict]]:
  def eval_step(params, batch, aux):
    norms = objective.normalizers(batch)
    _, (sums, _) = objective.loss_fn(params, batch, jax.random.PRNGKey(0), aux, norms, False)
    return sums, norms
  return eval_step


# ----------------------------------------------------------------------------------------------------------------
# State creation: born sharded, or restored into its shardings.
# ----------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Setup:
  mesh: jax.sharding.Mesh
  rules: Any
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  state_shardings: TrainState
  abstract_state: TrainState
  create_state: Callable[[], TrainState]


def build_setup(config: ml_collections.ConfigDict, objective: Objective,
                mesh: jax.sharding.Mesh | None = None) -> Setup:
  mesh = mesh or sharding.make_mesh(config.mesh)
  validate_trainer_config(config, mesh.size)
  rules = sharding.rules_from_config(config)
  tx, schedule = optim.make_optimizer(config.optim, config.num_train_steps)
  init_rng, state_rng = jax.random.split(jax.random.PRNGKey(config.seed))

  def create(init_rng):
    params = nn.meta.unbox(objective.init_variables(init_rng))['params']
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      aux=objective.init_aux(config.global_batch_size), rng=state_rng,
                      skipped=jnp.zeros((), jnp.int32), bad_streak=jnp.zeros((), jnp.int32))

  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    boxed = jax.eval_shape(objective.init_variables, init_rng)
    abstract = jax.eval_shape(create, init_rng)
  param_shardings = sharding.logical_shardings(boxed, mesh, rules)['params']
  replicated = NamedSharding(mesh, P())
  if objective.aux_partition is not None:
    aux_shardings = jax.tree.map(lambda spec: NamedSharding(mesh, spec), objective.aux_partition(abstract.aux),
                                 is_leaf=lambda x: isinstance(x, P))
  else:
    aux_shardings = jax.tree.map(lambda _: replicated, abstract.aux)
  shardings = TrainState(
      step=replicated, params=param_shardings,
      opt_state=sharding.match_shardings(abstract.opt_state, abstract.params, param_shardings, mesh),
      aux=aux_shardings, rng=replicated, skipped=replicated, bad_streak=replicated)
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)

  def create_state():
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      return jax.jit(create, out_shardings=shardings)(init_rng)

  return Setup(mesh, rules, tx, schedule, shardings, abstract, create_state)


def compile_train_step(setup: Setup, objective: Objective, config: ml_collections.ConfigDict):
  step_fn = make_train_step(objective, setup.tx, setup.schedule, config.grad_accum_steps)
  jitted = jax.jit(step_fn, in_shardings=(setup.state_shardings, None),
                   out_shardings=(setup.state_shardings, NamedSharding(setup.mesh, P())), donate_argnums=(0,))

  def run(state, batch):
    with jax.set_mesh(setup.mesh), nn.logical_axis_rules(setup.rules):
      return jitted(state, batch)
  return run, jitted


# ----------------------------------------------------------------------------------------------------------------
# The loop.
# ----------------------------------------------------------------------------------------------------------------

def evaluate(setup: Setup, eval_step, objective: Objective, state: TrainState, loader, num_batches: int,
             stop: Callable[[], bool] = lambda: False) -> dict | None:
  """Runs `num_batches` fixed eval batches; returns metrics computed from summed sums and norms, or None when
  `stop()` became true before the last batch (an interrupted eval reports nothing rather than part of the set)."""
  total_sums: dict = {}
  total_norms: dict = {}
  aux = objective.init_aux(loader.global_batch_size) if objective.aux_partition else state.aux
  for i in range(num_batches):
    if stop():
      return None
    batch = sharding.host_batch_to_global(loader.host_batch(i), setup.mesh)
    with jax.set_mesh(setup.mesh), nn.logical_axis_rules(setup.rules):
      sums, norms = jax.device_get(eval_step(state.params, batch, aux))
    for k, v in sums.items():
      total_sums[k] = total_sums.get(k, 0.0) + np.float64(v)
    for k, v in norms.items():
      total_norms[k] = total_norms.get(k, 0.0) + np.float64(v)
  return with_perplexity({k: float(v) for k, v in objective.finalize(total_sums, total_norms).items()}, objective)


class PreemptionWatch:
  """SIGTERM (the preemption notice) -> stop at the next step every process agrees on.

  One process: a Python SIGTERM handler sets a flag, checked after every step. Several processes: the flag must be
  agreed on, so the check is `multihost_utils.reached_preemption_sync_point`, fed by the coordination service's own
  SIGTERM notifier that `jax.distributed.initialize` starts (no Python handler then, which would replace it).
  """

  def __init__(self):
    self.requested = False
    self._previous = None
    self._multi = jax.process_count() > 1
    if not self._multi and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def reached(self, step: int) -> bool:
    if self._multi:
      from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
      return multihost_utils.reached_preemption_sync_point(step)
    return self.requested

  def close(self) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None


def place_params(params: PyTree, setup: Setup) -> PyTree:
  """Puts host parameters onto the mesh with the trainer's shardings; refuses a tree that does not match."""
  expected = jax.tree_util.tree_structure(setup.abstract_state.params)
  if jax.tree_util.tree_structure(params) != expected:
    raise ValueError('initial params do not match the model: '
                     f'{jax.tree_util.tree_structure(params)} vs {expected}')
  for path, x, a in zip(jax.tree_util.tree_flatten_with_path(params)[0],
                        jax.tree.leaves(params), jax.tree.leaves(setup.abstract_state.params)):
    if tuple(np.shape(x)) != tuple(a.shape):
      raise ValueError(f'initial param {jax.tree_util.keystr(path[0])} has shape {np.shape(x)}, model expects {a.shape}')
  return jax.device_put(jax.tree.map(lambda x, a: np.asarray(x, a.dtype), params, setup.abstract_state.params),
                        setup.state_shardings.params)


def train(config: ml_collections.ConfigDict, objective: Objective, train_loader, eval_loader=None,
          workdir: str | None = None, mesh: jax.sharding.Mesh | None = None,
          stop_after: int | None = None, initial_params: PyTree | None = None,
          eval_fn: Callable[[int, PyTree], dict] | None = None) -> tuple[TrainState, list[dict]]:
  """Trains until `config.num_train_steps` (or `stop_after` steps in this call); returns (state, logged metrics).

  With a `workdir`, the run holds the workdir's lock, and a run started on an existing workdir resumes from its
  newest checkpoint that verifies (damaged ones are moved aside). On SIGTERM, at any point from the first step to
  the last save, the run checkpoints the step it reached and returns normally (the entry points then exit 0); a
  restart resumes. The run's last step is always checkpointed before the final eval, and the SIGTERM handler stays
  installed until that checkpoint has committed. `initial_params` (e.g. imported from an HF directory) replace the
  random init of a run that has no checkpoint yet. `eval_fn(step, params) -> metrics` replaces the eval loader's
  objective metrics (a fine-tuning task's own metric, say) at every `eval_every` step and at the end.
  """
  setup = build_setup(config, objective, mesh)
  with contextlib.ExitStack() as stack:
    if workdir:
      stack.enter_context(ckpt_lib.WorkdirLock(workdir))
    writer = metrics_lib.MetricWriter(workdir)
    stack.callback(writer.close)
    manager = None
    if workdir:
      manager = ckpt_lib.make_manager(workdir, max_to_keep=config.keep_checkpoints,
                                      async_save=config.async_checkpoint)
      stack.push(lambda exc_type, exc, tb: _close_manager(manager, exc_type))
    preemption = PreemptionWatch()
    stack.callback(preemption.close)
    return _train_loop(config, objective, setup, train_loader, eval_loader, workdir, manager, writer, preemption,
                       stop_after, initial_params, eval_fn)


def _close_manager(manager, exc_type) -> None:
  """Waits for the last save and closes; on the error path it must not hide the error being raised."""
  if exc_type is None:
    manager.wait_until_finished()
    manager.close()
  # On the error path the manager is left as it is: closing it would wait on (or tear down under) writes that are
  # failing, and the process is about to report the error and exit; committed steps are already complete on disk.


class Goodput:
  """Where a run's wall time goes: productive steps versus compile (the first step), eval, checkpoints, restore.

  Appends one JSON line per run to WORKDIR/goodput.jsonl, so the closing line also covers the earlier runs
  (restarts) of the same workdir.
  """

  def __init__(self, workdir: str | None):
    self.workdir = workdir
    self.start = time.perf_counter()
    self.parts = dict(restore=0.0, compile=0.0, eval=0.0, checkpoint=0.0)
    self.steps = 0

  @contextlib.contextmanager
  def timed(self, part: str):
    t = time.perf_counter()
    try:
      yield
    finally:
      self.parts[part] += time.perf_counter() - t

  def finish(self, writer: metrics_lib.MetricWriter) -> None:
    wall = time.perf_counter() - self.start
    productive = max(0.0, wall - sum(self.parts.values()))
    record = dict(wall_s=round(wall, 3), productive_s=round(productive, 3), steps=self.steps,
                  **{f'{k}_s': round(v, 3) for k, v in self.parts.items()})
    runs = [record]
    if self.workdir and jax.process_index() == 0:
      path = storage.join(self.workdir, 'goodput.jsonl')
      if storage.exists(path):
        runs = [json.loads(line) for line in storage.read_text(path).splitlines() if line.strip()] + runs
      storage.write_text(path, ''.join(json.dumps(r) + '\n' for r in runs))
    parts = ', '.join(f'{k} {v:.1f} s' for k, v in self.parts.items())
    line = (f'goodput {productive / max(wall, 1e-9):.2f}: steps {productive:.1f} s of {wall:.1f} s wall '
            f'({self.steps} steps; {parts}; data loading and logging count as steps)')
    if len(runs) > 1:
      total = sum(r['wall_s'] for r in runs)
      line += (f'; all {len(runs)} runs of this workdir: {sum(r["productive_s"] for r in runs) / total:.2f} '
               f'({total:.1f} s wall)')
    writer.text(line)


def _log_values(metrics, t_last, steps_since, config, objective, total_peak) -> dict:
  """The logged values of a log step; the clock is read only once the step's metrics are on the host (dispatch is
  asynchronous: before that, the steps may still be running)."""
  values = with_perplexity({k: float(v) for k, v in jax.device_get(metrics).items()}, objective)
  elapsed = time.perf_counter() - t_last
  examples = steps_since * config.global_batch_size
  values['steps_per_sec'] = steps_since / elapsed
  values['tokens_per_sec'] = examples * objective.tokens_per_example / elapsed
  values['model_flops_per_sec'] = examples * objective.flops_per_example / elapsed
  values['mfu'] = metrics_lib.mfu(values['model_flops_per_sec'], total_peak)  # NaN (n/a) above 1
  return values


class Profiler:
  """A `jax.profiler` trace of steps A..B (`config.profile_steps`) in WORKDIR/profile, process 0 only."""

  def __init__(self, config, workdir: str | None, writer: metrics_lib.MetricWriter):
    self.window = profile_window(config) if workdir and jax.process_index() == 0 else None
    self.directory = storage.join(workdir, 'profile') if workdir else None
    self.writer = writer
    self.active = False

  def before(self, step: int) -> None:
    """Called before step `step` (1-based) runs."""
    if self.window and step == self.window[0] and not self.active:
      jax.profiler.start_trace(self.directory)
      self.active = True

  def after(self, step: int, state) -> None:
    if self.active and step >= self.window[1]:
      self.stop(state)

  def stop(self, state) -> None:
    if self.active:
      jax.block_until_ready(state)
      jax.profiler.stop_trace()
      self.active = False
      self.writer.text(f'profile of steps {self.window[0]}-{self.window[1]} written to {self.directory}')


def _train_loop(config, objective, setup, train_loader, eval_loader, workdir, manager, writer, preemption,
                stop_after, initial_params, eval_fn=None):
  goodput = Goodput(workdir)
  # --- state: resume or init -----------------------------------------------------------------------------------
  state = None
  if manager is not None and manager.all_steps():
    with goodput.timed('restore'):
      state, _, restored_step = ckpt_lib.restore(manager, setup.abstract_state, workdir=workdir, log=writer.text)
    writer.text(f'resumed from step {restored_step} in {workdir}')
  if state is None:
    state = setup.create_state()
    if initial_params is not None:
      state = state.replace(params=place_params(initial_params, setup))
  if workdir:  # only once the checkpoints (if any) are known to fit this config
    ckpt_lib.write_config(workdir, config)
    writer.config(config.to_dict(), ['eval/loss', 'eval/perplexity'])

  # --- step functions ------------------------------------------------------------------------------------------
  train_step, _ = compile_train_step(setup, objective, config)
  eval_step = jax.jit(make_eval_step(objective), out_shardings=NamedSharding(setup.mesh, P()))

  peak, peak_source = metrics_lib.peak_flops_per_device(config.peak_flops_per_device)
  on_cpu = jax.devices()[0].platform == 'cpu'
  total_peak = peak if on_cpu else peak * jax.device_count()  # fake CPU devices share one CPU
  writer.text(f'mesh {dict(setup.mesh.shape)}; peak {total_peak / 1e9:.1f} GFLOP/s ({peak_source})')

  start_step = int(jax.device_get(state.step))
  end_step = config.num_train_steps if stop_after is None else min(config.num_train_steps, start_step + stop_after)
  history: list[dict] = []
  progress = None
  if config.progress_bar and sys.stderr.isatty() and jax.process_index() == 0:
    from tqdm import tqdm
    progress = tqdm(total=config.num_train_steps, initial=start_step, unit='step', dynamic_ncols=True)
    writer.progress = progress
  profiler = Profiler(config, workdir, writer)

  def save(step, force=False):
    if manager is not None:
      with goodput.timed('checkpoint'):
        ckpt_lib.save(manager, step, state, {'step': step}, force=force)

  def run_eval(step, stop=lambda: False):
    with goodput.timed('eval'):
      if eval_fn is not None:
        values = None if stop() else {k: float(v) for k, v in eval_fn(step, state.params).items()}
      else:
        values = evaluate(setup, eval_step, objective, state, eval_loader, config.num_eval_batches, stop)
    if values is None:
      writer.text(f'eval at step {step} interrupted by the preemption notice')
      return
    writer.write(step, values, prefix='eval/')
    writer.text(f'eval at step {step}: ' + ' '.join(f'{k} {v:.4f}' for k, v in values.items()))
    history.append({'step': step, **{f'eval/{k}': v for k, v in values.items()}})

  has_eval = eval_loader is not None or eval_fn is not None
  t_last, steps_since = time.perf_counter(), 0
  step = start_step
  preempted = False
  in_flight = None  # The previous step's loss: waited on after dispatching the next step.
  if start_step < end_step:
    for data_step, host_batch in train_loader.iterate(start_step):
      if data_step >= end_step:
        break
      batch = sharding.host_batch_to_global(host_batch, setup.mesh)
      profiler.before(data_step + 1)
      if step == start_step:  # the first step compiles: timed to its end for the goodput line
        with goodput.timed('compile'):
          state, metrics = train_step(state, batch)
          jax.block_until_ready(metrics)
      else:
        state, metrics = train_step(state, batch)
      # At most two steps queued on the device: without this wait the loop dispatches up to the next log step
      # ahead, and a preemption notice is acted on only after all of those have run.
      if in_flight is not None:
        in_flight.block_until_ready()
      in_flight = metrics['loss']
      steps_since += 1
      step = data_step + 1
      goodput.steps += 1
      profiler.after(step, state)
      if progress is not None:
        progress.update(1)
      # Metrics leave the device only on log steps, so dispatch stays asynchronous in between.
      if step % config.log_every == 0 or step == end_step:
        values = _log_values(metrics, t_last, steps_since, config, objective, total_peak)
        t_last, steps_since = time.perf_counter(), 0
        writer.write(step, values, prefix='train/')
        history.append({'step': step, **values})
        if progress is not None:
          progress.set_postfix(loss=f"{values['loss']:.3f}", mfu=f"{values['mfu']:.2f}")
        elif jax.process_index() == 0:
          writer.text(f"step {step}: loss {values['loss']:.4f} lr {values['learning_rate']:.2e} "
                      f"grad_norm {values['grad_norm']:.3f} tokens/s {values['tokens_per_sec']:.0f} "
                      f"mfu {values['mfu']:.3f}")
        streak = int(values['nonfinite_streak'])
        if config.max_consecutive_nonfinite and streak >= config.max_consecutive_nonfinite:
          save(step, force=True)  # parameters are the last good ones: skipped steps left them unchanged
          if manager is not None:
            manager.wait_until_finished()
          raise FloatingPointError(f'{streak} consecutive steps had non-finite loss, gradients or new state (at '
                                   f'step {step}); stopped with the last good parameters checkpointed')
      if has_eval and config.eval_every and step % config.eval_every == 0 and step != end_step:
        run_eval(step)
      if config.checkpoint_every and step % config.checkpoint_every == 0:
        save(step)
      if preemption.reached(step):
        writer.text(f'preemption notice: checkpointing step {step} and stopping')
        preempted = True
        break
      if step >= end_step:
        break
  profiler.stop(state)

  # --- the end: checkpoint first, then the final eval (which a preemption notice cuts short) --------------------
  if manager is not None and manager.latest_step() != step:
    save(step, force=True)
  if has_eval and (config.num_eval_batches or eval_fn is not None) and step == end_step and not preempted:
    run_eval(step, stop=lambda: preemption.requested)
  if manager is not None:
    with goodput.timed('checkpoint'):
      manager.wait_until_finished()
  if preemption.requested and not preempted:
    writer.text(f'preemption notice during the final eval or save: step {step} is checkpointed')
  if progress is not None:
    progress.close()
    writer.progress = None
  goodput.finish(writer)
  return state, history
