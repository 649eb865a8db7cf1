"""One training loop for every model and objective.

Read top to bottom: config checks → mesh → optimizer → sharded state (init or resume) → jitted step → loop with
logging, eval and checkpoints. An objective (BERT MLM+NSP, XLNet PLM, a fine-tuning task) plugs in through
`Objective`; nothing here knows which model runs. The pure step functions are in `common.train_step` (`TrainState`,
`Objective` and `make_train_step` are importable from here too); throughput, goodput, profiling and the preemption
notice in `common.train_monitor`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import linen as nn
from jax.sharding import NamedSharding, PartitionSpec as P

from common import checkpoint as ckpt_lib
from common import checksums
from common import compilation_cache
from common import compile_ahead
from common import metrics as metrics_lib
from common import optim
from common import sharding
from common import train_monitor
from common.config import require, require_positive
from common.train_monitor import profile_window, with_perplexity
from common.train_step import Objective, PyTree, TrainState, make_eval_step, make_train_step
from common.workdir_lock import WorkdirLock

__all__ = ['Objective', 'Setup', 'TrainState', 'build_setup', 'compile_train_step', 'evaluate', 'lower_train_step',
           'make_eval_step', 'make_train_step', 'place_params', 'train', 'trainer_config', 'use_compilation_cache',
           'validate_trainer_config']


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
      compilation_cache_dir='auto',  # where compiled programs persist across runs: 'auto', 'none' or a directory
                                     # (local or gs://); see common.compilation_cache
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
  create_state: Callable[..., TrainState]   # create_state(params=None): see `build_setup`


def seed_keys(seed: int) -> tuple[jax.Array, jax.Array]:
  """(the key of a fresh state's random init, the state's own key; its steps fold the step in) of a run's seed."""
  init_rng, state_rng = jax.random.split(jax.random.PRNGKey(seed))
  return init_rng, state_rng


def build_setup(config: ml_collections.ConfigDict, objective: Objective,
                mesh: jax.sharding.Mesh | None = None) -> Setup:
  mesh = mesh or sharding.make_mesh(config.mesh)
  validate_trainer_config(config, mesh.size)
  rules = sharding.rules_from_config(config)
  tx, schedule = optim.make_optimizer(config.optim, config.num_train_steps)
  init_rng, state_rng = seed_keys(config.seed)

  def start_from(params):
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      aux=objective.init_aux(config.global_batch_size), rng=state_rng,
                      skipped=jnp.zeros((), jnp.int32), bad_streak=jnp.zeros((), jnp.int32))

  def create(init_rng):
    return start_from(nn.meta.unbox(objective.init_variables(init_rng))['params'])

  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    boxed = jax.eval_shape(objective.init_variables, init_rng)
    # From the boxed shapes: the model's init is traced once, not a second time inside `create`.
    abstract = jax.eval_shape(lambda variables: start_from(nn.meta.unbox(variables)['params']), boxed)
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

  def create_state(params: PyTree | None = None) -> TrainState:
    """The fresh state: randomly initialised, or around `params` (placed with the state's shardings, see
    `place_params`) without running the random init: the optimizer state does not depend on their values."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      if params is None:
        return jax.jit(create, out_shardings=shardings)(init_rng)
      return jax.jit(start_from, out_shardings=shardings)(params)

  return Setup(mesh, rules, tx, schedule, shardings, abstract, create_state)


def compile_train_step(setup: Setup, objective: Objective, config: ml_collections.ConfigDict):
  """(run, jitted): the jitted `train_step(state, batch, state_checked)` (`make_train_step`; the state donated),
  and `run(state, batch, state_checked=None)` calling it under the mesh and its rules (None: test the state).
  `state_checked` is a host value (numpy float32): a device array (the flag as a step returns it) is another
  argument placement, which would compile the step a second time.

  The same `objective` with the same config but for `seed`, on the same mesh, gets the jitted function of the
  previous call (`_program_key`): the seeds of a fine-tuning task (or of a comparison's cell) trace, lower and
  compile their step once. The seed is only an input of the step (the state's key), never part of the program."""
  global _last_step  # pylint: disable=global-statement
  key = _program_key(setup, objective, config)
  if _last_step is not None and _last_step[0] == key and _last_step[1] is objective:
    jitted = _last_step[2]
  else:
    step_fn = make_train_step(objective, setup.tx, setup.schedule, config.grad_accum_steps)
    replicated = NamedSharding(setup.mesh, P())
    jitted = jax.jit(step_fn, in_shardings=(setup.state_shardings, None, replicated),
                     out_shardings=(setup.state_shardings, replicated), donate_argnums=(0,))
    _last_step = (key, objective, jitted)

  def run(state, batch, state_checked=None):
    with jax.set_mesh(setup.mesh), nn.logical_axis_rules(setup.rules):
      return jitted(state, batch, UNCHECKED if state_checked is None else state_checked)
  return run, jitted


UNCHECKED = np.float32(0.0)  # `state_checked` of a state nobody has tested: the step tests it

_last_step: tuple | None = None  # (key, objective (kept alive), jitted) of the last train step built


def _program_key(setup: Setup, objective: Objective, config: ml_collections.ConfigDict) -> tuple:
  """What the jitted train step is a function of: the objective, the mesh and every config field but `seed`
  (conservatively: a field that does not change the program, e.g. `log_every`, still gives a new one)."""
  fields = {k: v for k, v in config.to_dict().items() if k != 'seed'}
  return id(objective), setup.mesh, json.dumps(fields, sort_keys=True, default=repr)


def lower_train_step(jitted, setup: Setup, batch: PyTree):
  """`jitted` (of `compile_train_step`) lowered for the setup's state and `batch` (arrays or ShapeDtypeStructs),
  as every call of it runs, under the mesh and its rules."""
  with jax.set_mesh(setup.mesh), nn.logical_axis_rules(setup.rules):
    return jitted.lower(setup.abstract_state, batch, jax.ShapeDtypeStruct((), jnp.float32))


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


def use_compilation_cache(setting: str) -> str | None:
  """Keeps compiled programs across runs as `setting` says ('auto', 'none' or a directory, local or gs://;
  `common.compilation_cache.use`); returns the directory in use, or None. A later run or seed with the same
  program, shapes, devices and JAX version loads what took >= 1 s to compile instead of compiling it again."""
  return compilation_cache.use(setting)


def train(config: ml_collections.ConfigDict, objective: Objective, train_loader, eval_loader=None,
          workdir: str | None = None, mesh: jax.sharding.Mesh | None = None,
          stop_after: int | None = None, initial_params: PyTree | Callable[[], PyTree] | None = None,
          eval_fn: Callable[[int, PyTree], dict] | None = None) -> tuple[TrainState, list[dict]]:
  """Trains until `config.num_train_steps` (or `stop_after` steps in this call); returns (state, logged metrics).

  With a `workdir`, the run holds the workdir's lock, and a run started on an existing workdir resumes from its
  newest checkpoint that verifies (damaged ones are moved aside). On SIGTERM, at any point from the first step to
  the last save, the run checkpoints the step it reached and returns normally (the entry points then exit 0); a
  restart resumes. The run's last step is always checkpointed before the final eval, and the SIGTERM handler stays
  installed until that checkpoint has committed. `initial_params` (e.g. imported from an HF directory) replace the
  random init of a run that has no checkpoint yet; given as a function of no arguments, it is called only then, after
  the train step has started compiling on a thread (a fine-tuning run's head init and graft overlap that
  compilation, and a resumed run skips them). `eval_fn(step, params) -> metrics` replaces the eval loader's
  objective metrics (a fine-tuning task's own metric, say) at every `eval_every` step and at the end.
  """
  use_compilation_cache(config.get('compilation_cache_dir', ''))
  setup = build_setup(config, objective, mesh)
  with contextlib.ExitStack() as stack:
    if workdir:
      stack.enter_context(WorkdirLock(workdir))
    writer = metrics_lib.MetricWriter(workdir)
    stack.callback(writer.close)
    manager = None
    if workdir:
      manager = ckpt_lib.make_manager(workdir, max_to_keep=config.keep_checkpoints,
                                      async_save=config.async_checkpoint)
      stack.push(lambda exc_type, exc, tb: _close_manager(manager, exc_type))
    preemption = train_monitor.PreemptionWatch()
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


@dataclasses.dataclass
class _Run:
  """What the parts of one run share: its config, objective and setup, where it writes, what it watches, and the
  state and logged metrics reached so far."""
  config: ml_collections.ConfigDict
  objective: Objective
  setup: Setup
  workdir: str | None
  manager: Any                        # an orbax CheckpointManager, or None without a workdir
  writer: metrics_lib.MetricWriter
  preemption: train_monitor.PreemptionWatch
  eval_loader: Any
  eval_fn: Callable[[int, PyTree], dict] | None
  goodput: train_monitor.Goodput = None
  state: TrainState | None = None
  history: list[dict] = dataclasses.field(default_factory=list)
  eval_step: Callable | None = None
  progress: Any = None                # a tqdm bar, or None
  profiler: train_monitor.Profiler | None = None
  clock: train_monitor.StepClock | None = None
  checksums_ahead: compile_ahead.Ahead | None = None  # the checkpoint checksums' programs, compiled on a thread
  step_ahead: compile_ahead.Ahead | None = None       # the train step, compiled on a thread

  @property
  def has_eval(self) -> bool:
    return self.eval_loader is not None or self.eval_fn is not None

  def save(self, step: int, force: bool = False) -> None:
    if self.manager is not None:
      with self.goodput.timed('checkpoint'):
        compile_ahead.wait(self.checksums_ahead)
        ckpt_lib.save(self.manager, step, self.state, {'step': step}, force=force)

  def run_eval(self, step: int, stop: Callable[[], bool] = lambda: False) -> None:
    with self.goodput.timed('eval'):
      if self.eval_fn is not None:
        values = None if stop() else {k: float(v) for k, v in self.eval_fn(step, self.state.params).items()}
      else:
        values = evaluate(self.setup, self.eval_step, self.objective, self.state, self.eval_loader,
                          self.config.num_eval_batches, stop)
    if values is None:
      self.writer.text(f'eval at step {step} interrupted by the preemption notice')
      return
    self.writer.write(step, values, prefix='eval/')
    self.writer.text(f'eval at step {step}: ' + ' '.join(f'{k} {v:.4f}' for k, v in values.items()))
    self.history.append({'step': step, **{f'eval/{k}': v for k, v in values.items()}})


def _train_loop(config, objective, setup, train_loader, eval_loader, workdir, manager, writer, preemption,
                stop_after, initial_params, eval_fn=None):
  run = _Run(config, objective, setup, workdir, manager, writer, preemption, eval_loader, eval_fn,
             goodput=train_monitor.Goodput(workdir))
  # The peak is timed before this run compiles anything on a thread (once per process: a caller that compiles
  # ahead before calling train(), as the fine-tuning runner does, times it first).
  total_peak = train_monitor.total_peak_flops(config, setup.mesh, writer)
  train_step, jitted_step = compile_train_step(setup, objective, config)
  run.step_ahead = _compile_step_ahead(jitted_step, setup, train_loader, manager, config.num_train_steps)
  run.state = _initial_state(run, initial_params)
  if manager is not None:
    run.checksums_ahead = compile_ahead.Ahead('checkpoint checksums',
                                              lambda: checksums.compile_for(setup.abstract_state))
  run.eval_step = jax.jit(make_eval_step(objective), out_shardings=NamedSharding(setup.mesh, P()))

  start_step = int(jax.device_get(run.state.step))
  end_step = config.num_train_steps if stop_after is None else min(config.num_train_steps, start_step + stop_after)
  run.progress = train_monitor.progress_bar(config, start_step, writer)
  run.profiler = train_monitor.Profiler(config, workdir, writer)
  run.clock = train_monitor.StepClock(config.global_batch_size, objective, total_peak)
  step, preempted = start_step, False
  if start_step < end_step:
    step, preempted = _run_steps(run, train_step, train_loader, start_step, end_step)
  run.profiler.stop(run.state)
  _finish(run, step, end_step, preempted)
  return run.state, run.history


def _compile_step_ahead(jitted_step, setup: Setup, train_loader, manager,
                        num_train_steps: int) -> compile_ahead.Ahead | None:
  """The train step compiled on a thread (`common.compile_ahead`) for the batch of the step the run is expected to
  start at (the newest checkpoint's, else 0), while this thread restores or creates the state. A guess that turns
  out wrong (a damaged newest checkpoint, a bucketed loader's other length) costs only that thread's work: the
  first step then compiles what it needs. None for a loader without `host_batch(step)` and for a run whose newest
  checkpoint is already its last step."""
  if not hasattr(train_loader, 'host_batch'):
    return None
  step = manager.latest_step() if manager is not None else None
  if step is not None and step >= num_train_steps:
    return None
  batch = sharding.host_batch_to_global(train_loader.host_batch(step or 0), setup.mesh)
  spec = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=v.sharding) for k, v in batch.items()}
  return compile_ahead.Ahead('train step', lambda: lower_train_step(jitted_step, setup, spec).compile())


def _wait_for_train_step(run: _Run) -> None:
  """Waits for the train step compiled ahead (if any), so that the first step does not compile it again."""
  compile_ahead.wait(run.step_ahead)


def _initial_state(run: _Run, initial_params: PyTree | Callable[[], PyTree] | None) -> TrainState:
  """The newest checkpoint that verifies, else a fresh state (with `initial_params`, or what calling it returns,
  when given); then the run's config is written, only once the checkpoints (if any) are known to fit it."""
  state = None
  if run.manager is not None and run.manager.all_steps():
    with run.goodput.timed('restore'):
      state, _, restored_step = ckpt_lib.restore(run.manager, run.setup.abstract_state, workdir=run.workdir,
                                                 log=run.writer.text)
    run.writer.text(f'resumed from step {restored_step} in {run.workdir}')
  if state is None:
    if callable(initial_params):
      initial_params = initial_params()
    state = run.setup.create_state(None if initial_params is None else place_params(initial_params, run.setup))
  if run.workdir:
    ckpt_lib.write_config(run.workdir, run.config)
    run.writer.config(run.config.to_dict(), ['eval/loss', 'eval/perplexity'])
  return state


def _run_steps(run: _Run, train_step, train_loader, start_step: int, end_step: int) -> tuple[int, bool]:
  """Steps `start_step + 1 .. end_step` with logging, eval and checkpoints on their steps; stops early at a
  preemption notice. Returns (the last step taken, whether a preemption notice stopped the run)."""
  config = run.config
  step = start_step
  # The previous step's (loss, state_finite), waited on after dispatching the next step. Its flag is then the
  # next step's `state_checked`: that step has finished, so reading it costs no wait, and if its start was
  # finite, so are the starts of the two steps after it (`make_train_step`). Until then, and after a non-finite
  # start, 0: the step tests the state itself.
  in_flight, checked = None, UNCHECKED
  for data_step, host_batch in train_loader.iterate(start_step):
    if data_step >= end_step:
      break
    batch = sharding.host_batch_to_global(host_batch, run.setup.mesh)
    run.profiler.before(data_step + 1)
    if step == start_step:  # the first step compiles: timed to its end for the goodput line
      with run.goodput.timed('compile'):
        _wait_for_train_step(run)
        run.state, metrics = train_step(run.state, batch, checked)
        jax.block_until_ready(metrics)
    else:
      run.state, metrics = train_step(run.state, batch, checked)
    # At most two steps queued on the device: without this wait the loop dispatches up to the next log step
    # ahead, and a preemption notice is acted on only after all of those have run.
    if in_flight is not None:
      in_flight[0].block_until_ready()
      checked = np.float32(np.asarray(in_flight[1].addressable_data(0)))
    in_flight = metrics['loss'], metrics.pop('state_finite')
    run.clock.tick()
    step = data_step + 1
    run.goodput.steps += 1
    run.profiler.after(step, run.state)
    if run.progress is not None:
      run.progress.update(1)
    # Metrics leave the device only on log steps, so dispatch stays asynchronous in between.
    if step % config.log_every == 0 or step == end_step:
      _log_step(run, step, metrics)
    if run.has_eval and config.eval_every and step % config.eval_every == 0 and step != end_step:
      run.run_eval(step)
    if config.checkpoint_every and step % config.checkpoint_every == 0:
      run.save(step)
    if run.preemption.reached(step):
      run.writer.text(f'preemption notice: checkpointing step {step} and stopping')
      return step, True
    if step >= end_step:
      break
  return step, False


def _log_step(run: _Run, step: int, metrics: dict) -> None:
  """Writes a log step's values; stops the run (FloatingPointError, last good parameters checkpointed) after
  `config.max_consecutive_nonfinite` skipped steps in a row."""
  values = run.clock.values(metrics)
  run.writer.write(step, values, prefix='train/')
  run.history.append({'step': step, **values})
  if run.progress is not None:
    run.progress.set_postfix(loss=f"{values['loss']:.3f}", mfu=f"{values['mfu']:.2f}")
  elif jax.process_index() == 0:
    run.writer.text(train_monitor.step_line(step, values))
  streak = int(values['nonfinite_streak'])
  limit = run.config.max_consecutive_nonfinite
  if limit and streak >= limit:
    run.save(step, force=True)  # parameters are the last good ones: skipped steps left them unchanged
    if run.manager is not None:
      run.manager.wait_until_finished()
    raise FloatingPointError(f'{streak} consecutive steps had non-finite loss, gradients or new state (at '
                             f'step {step}); stopped with the last good parameters checkpointed')


def _finish(run: _Run, step: int, end_step: int, preempted: bool) -> None:
  """The end: checkpoint first, then the final eval (which a preemption notice cuts short), then the goodput line."""
  if run.manager is not None and run.manager.latest_step() != step:
    run.save(step, force=True)
  if run.has_eval and (run.config.num_eval_batches or run.eval_fn is not None) and step == end_step and not preempted:
    run.run_eval(step, stop=lambda: run.preemption.requested)
  if run.manager is not None:
    with run.goodput.timed('checkpoint'):
      run.manager.wait_until_finished()
  if run.preemption.requested and not preempted:
    run.writer.text(f'preemption notice during the final eval or save: step {step} is checkpointed')
  if run.progress is not None:
    run.progress.close()
    run.writer.progress = None
  run.goodput.finish(run.writer)
