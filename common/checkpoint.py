"""Checkpoints with orbax: asynchronous, atomic, keep-N, automatic resume from the latest complete step.

A checkpoint holds two items:
  `state` — the TrainState pytree (params, optimizer state, step, RNG key, carried auxiliary state such as XLNet
            memory), restored straight into its target shardings;
  `meta`  — JSON: the step the data loader resumes at and the run's config. The input pipeline is a pure function
            of (seed, step) (`common.data.pipeline.StepLoader`), so the data position is exactly the step.
The run's config is also written to `WORKDIR/config.json` so tools (export) can rebuild the model.
"""
from __future__ import annotations

import json
import os
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

CONFIG_FILE = 'config.json'


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), 'checkpoints')


def make_manager(workdir: str, *, max_to_keep: int = 3, async_save: bool = True) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, enable_async_checkpointing=async_save,
                                         create=True)
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options, item_names=('state', 'meta'))


def save(manager: ocp.CheckpointManager, step: int, state: Any, meta: dict, *, force: bool = False) -> bool:
  """Starts an (asynchronous) save of `state` and `meta` at `step`; orbax commits it atomically when done."""
  return manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                    meta=ocp.args.JsonSave(meta)), force=force)


def restore(manager: ocp.CheckpointManager, abstract_state: Any, step: int | None = None) -> tuple[Any, dict, int]:
  """Restores (state, meta, step) from `step` or the latest complete checkpoint into `abstract_state`'s shardings.

  `abstract_state` is a pytree of `jax.ShapeDtypeStruct` carrying `.sharding`.
  """
  step = manager.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f'no checkpoint in {manager.directory}')
  restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                                           meta=ocp.args.JsonRestore()))
  return restored['state'], dict(restored['meta']), step


def write_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    tmp = os.path.join(workdir, CONFIG_FILE + '.tmp')
    with open(tmp, 'w') as f:
      f.write(config.to_json_best_effort(indent=2))
    os.replace(tmp, os.path.join(workdir, CONFIG_FILE))


def read_config(workdir: str) -> ml_collections.ConfigDict:
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path} not found: is {workdir} a training workdir?')
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def committed_steps(workdir: str) -> list[int]:
  """Steps with a complete checkpoint in `workdir`, ascending. orbax writes a step under a temporary name and renames
  it when every process has finished, so a bare integer directory is a committed one."""
  directory = checkpoint_dir(workdir)
  if not os.path.isdir(directory):
    return []
  return sorted(int(name) for name in os.listdir(directory)
                if name.isdigit() and os.path.isdir(os.path.join(directory, name, 'state')))


def read_state(workdir: str, step: int | None = None, *, only: str | None = None) -> Any:
  """A saved TrainState (or its field `only`, e.g. 'params') as a tree of host numpy arrays.

  Reads in the calling process alone, whatever devices and processes wrote it: no target shardings (restoring
  with the saved ones fails in a process that lacks the writers' devices, e.g. after a multi-host run) and no
  cross-process barrier (so process 0 may call it while the others have moved on or exited).
  """
  steps = committed_steps(workdir)
  if step is None:
    if not steps:
      raise FileNotFoundError(f'no complete checkpoint in {checkpoint_dir(workdir)}')
    step = steps[-1]
  elif step not in steps:
    raise FileNotFoundError(f'no complete checkpoint for step {step} in {checkpoint_dir(workdir)} '
                            f'(complete: {steps or "none"})')
  path = os.path.join(checkpoint_dir(workdir), str(step), 'state')
  local = ocp.options.MultiprocessingOptions(primary_host=jax.process_index(),
                                             active_processes={jax.process_index()})
  handler = ocp.PyTreeCheckpointHandler(multiprocessing_options=local)
  with ocp.Checkpointer(handler, multiprocessing_options=local) as checkpointer:
    tree = checkpointer.metadata(path).item_metadata.tree
    if only is not None:
      if only not in tree:
        raise KeyError(f'{path} has no field {only!r} (fields: {sorted(tree)})')
      tree = {only: tree[only]}
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    restored = checkpointer.restore(path, args=ocp.args.PyTreeRestore(item=tree, restore_args=restore_args,
                                                                      partial_restore=only is not None))
  return restored[only] if only is not None else dict(restored)


def restore_params(workdir: str, step: int | None = None) -> tuple[Any, ml_collections.ConfigDict]:
  """(params as host numpy arrays, run config) from the latest (or given) complete checkpoint of a training workdir.

  Needs no optimizer, mesh or other process: see `read_state`.
  """
  return read_state(workdir, step, only='params'), read_config(workdir)
