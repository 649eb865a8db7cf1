"""Checkpoints with orbax: asynchronous, atomic, verified, keep-N, automatic resume from the newest good step.

A checkpoint holds two items:
  `state` — the TrainState pytree (params, optimizer state, step, RNG key, carried auxiliary state such as XLNet
            memory), restored straight into its target shardings;
  `meta`  — JSON: the step, and a checksum of every array of `state` (`state_checksums`), computed on device from the
            values being saved (`common.checksums`). The input pipeline is a pure function of (seed, step)
            (`common.data.pipeline.StepLoader`), so the data position is exactly the step.
The run's config is written to `WORKDIR/config.json` so tools (export) can rebuild the model.

What a workdir guarantees:
  * atomic steps: orbax writes a step under a temporary name and renames it when every process has finished, so a
    step directory exists only complete; a kill at any moment leaves the previous steps intact;
  * integrity: a restore recomputes every array's checksum and compares it with the one saved in `meta`; a step
    whose files are missing, truncated, unreadable or whose values differ from what was saved is damaged;
  * fallback: a damaged step is moved aside to `WORKDIR/damaged_checkpoints/` (never deleted) with the reason, and
    the run resumes from the newest step that verifies; a workdir whose checkpoints are all damaged is refused, never
    silently restarted from scratch;
  * one run at a time: process 0 holds an exclusive lock on the workdir (`common.workdir_lock.WorkdirLock`, also
    importable from here) for the whole run.
All paths go through `etils.epath`, so a workdir may be local or on a remote filesystem (`gs://...`).
"""
from __future__ import annotations

import contextlib
import datetime
import errno
import json
import logging
import os
import re
import shutil
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from common import storage
from common.checksums import checksum_mismatches, leaf_name, state_checksums
from common.config import UserError
# Re-exported: the pretraining entry points (and a resilience test) take the workdir lock from here.
from common.workdir_lock import WorkdirLock  # noqa: F401  pylint: disable=unused-import

CONFIG_FILE = 'config.json'
DAMAGED_DIR = 'damaged_checkpoints'


class CheckpointError(UserError):
  """A workdir's checkpoints cannot be used as they are (all damaged, or made by a different config)."""


def _root(workdir: str | os.PathLike) -> epath.Path:
  """The workdir as an epath path, absolute when local (orbax wants absolute paths)."""
  return storage.as_path(storage.absolute(workdir))


def checkpoint_dir(workdir: str) -> epath.Path:
  return _root(workdir) / 'checkpoints'


def make_manager(workdir: str, *, max_to_keep: int = 3, async_save: bool = True) -> ocp.CheckpointManager:
  """The workdir's checkpoint manager. Arrays are written uncompressed: orbax's default zstd took ~2x the time of
  the whole save (and of the restore) for 7 % fewer bytes on a fine-tuning state (benchmarks/README.md); steps
  written compressed restore all the same (the codec is recorded with each array)."""
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, enable_async_checkpointing=async_save,
                                         create=True)
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options,
                               item_handlers={'state': ocp.PyTreeCheckpointHandler(use_compression=False),
                                              'meta': ocp.JsonCheckpointHandler()})


# ----------------------------------------------------------------------------------------------------------------
# Save and verified restore.
# ----------------------------------------------------------------------------------------------------------------

def check_free_space(directory: epath.Path, state: Any) -> None:
  """Raises ENOSPC before a save that cannot fit on a local disk (the state's bytes, 5 % + 256 KiB of metadata).

  A save that runs out of space half-way fails inside the checkpointing library's writer threads, which log a
  traceback per failed write; checking first turns the common case (checkpoints outgrowing the disk) into one line.
  """
  if storage.is_remote(directory):
    return
  need = sum(int(np.prod(np.shape(x))) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(state))
  need = int(need * 1.05) + (256 << 10)
  probe = directory
  while not os.path.exists(os.fspath(probe)) and probe != probe.parent:
    probe = probe.parent
  free = shutil.disk_usage(os.fspath(probe)).free
  if free < need:
    raise OSError(errno.ENOSPC, f'No space left on device: a checkpoint needs about {need / 2**20:.1f} MiB, '
                  f'{free / 2**20:.1f} MiB free', os.fspath(directory))


def save(manager: ocp.CheckpointManager, step: int, state: Any, meta: dict, *, force: bool = False) -> bool:
  """Starts an (asynchronous) save of `state` and `meta` (plus the state's checksums) at `step`; orbax commits it
  atomically when done. Refuses (ENOSPC) a save that cannot fit on a local disk."""
  manager.check_for_errors()  # a failed earlier save surfaces here, before the next one starts
  if manager.is_saving_in_progress():
    manager.wait_until_finished()  # the space check must see the disk after the previous save and its rotation
  check_free_space(_root(manager.directory), state)
  meta = dict(meta, checksums=state_checksums(state))
  return manager.save(step, args=ocp.args.Composite(state=ocp.args.PyTreeSave(state),
                                                    meta=ocp.args.JsonSave(meta)), force=force)


def _shape_mismatches(manager: ocp.CheckpointManager, step: int, abstract_state: Any) -> list[str]:
  """Leaves whose saved shape differs from the run's (a changed config, not damage). Raises if unreadable."""
  saved = manager.item_metadata(step)['state']
  saved_shapes = {leaf_name(p): tuple(getattr(m, 'shape', ()) or ())
                  for p, m in jax.tree_util.tree_flatten_with_path(saved)[0]}
  if not saved_shapes:
    raise ValueError('no array metadata')
  wanted = {leaf_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(abstract_state)[0]}
  if wanted != set(saved_shapes):
    only_saved, only_wanted = sorted(set(saved_shapes) - wanted), sorted(wanted - set(saved_shapes))
    return [f'{only_saved[0]} is only in the checkpoint' if only_saved else f'{only_wanted[0]} is not in the checkpoint']
  out = []
  for path, a in jax.tree_util.tree_flatten_with_path(abstract_state)[0]:
    name = leaf_name(path)
    if name in saved_shapes and saved_shapes[name] != tuple(a.shape):
      out.append(f'{name} is {saved_shapes[name]} in the checkpoint, {tuple(a.shape)} in this config')
  return out


def _first_line(error: BaseException) -> str:
  text = str(error).strip().splitlines()
  return f'{type(error).__name__}: {text[0] if text else ""}'[:300]


def _try_restore(manager: ocp.CheckpointManager, step: int, abstract_state: Any) -> tuple[Any, dict | None, str]:
  """(state, meta, '') when step `step` restores and verifies; (None, None, reason) when it is damaged."""
  try:
    mismatched = _shape_mismatches(manager, step, abstract_state)
  except Exception as e:  # pylint: disable=broad-except
    return None, None, f'unreadable metadata ({_first_line(e)})'
  if mismatched:
    raise CheckpointError(f'the checkpoint at step {step} in {manager.directory} does not fit this config: '
                          f'{mismatched[0]}; use the run\'s config ({CONFIG_FILE}) or another workdir')
  try:
    state_args = ocp.args.PyTreeRestore(abstract_state,
                                        restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_state))
    restored = manager.restore(step, args=ocp.args.Composite(state=state_args, meta=ocp.args.JsonRestore()))
  except Exception as e:  # pylint: disable=broad-except
    return None, None, f'unreadable ({_first_line(e)})'
  meta = dict(restored['meta'] or {})
  if 'checksums' not in meta:
    return restored['state'], meta, ''  # written before checksums existed: nothing to compare with
  bad = checksum_mismatches(restored['state'], meta['checksums'])
  if bad:
    return None, None, f'checksum mismatch in {len(bad)} arrays (first: {bad[0]})'
  return restored['state'], meta, ''


def _agree(ok: bool) -> bool:
  """True when every process says ok (one process: `ok`)."""
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  return bool(np.all(multihost_utils.process_allgather(np.int32(ok))))


def move_aside(workdir: str, step: int, reason: str) -> epath.Path:
  """Moves step `step`'s directory to WORKDIR/damaged_checkpoints/<step>[.<n>] with a REASON.txt; returns it."""
  source = checkpoint_dir(workdir) / str(step)
  target_root = _root(workdir) / DAMAGED_DIR
  target_root.mkdir(parents=True, exist_ok=True)
  target, n = target_root / str(step), 1
  while target.exists():
    target, n = target_root / f'{step}.{n}', n + 1
  source.rename(target)
  (target / 'REASON.txt').write_text(f'{datetime.datetime.now().isoformat()} step {step}: {reason}\n')
  return target


def restore(manager: ocp.CheckpointManager, abstract_state: Any, step: int | None = None, *,
            workdir: str | None = None, log: Callable[[str], None] = print) -> tuple[Any, dict, int]:
  """Restores (state, meta, step) into `abstract_state`'s shardings from `step`, or from the newest step that
  verifies.

  Without `step`, every damaged step met on the way down is moved aside (with `workdir`) and reported through
  `log`; if there were checkpoints and none verifies, raises `CheckpointError` (never a silent fresh start).
  `abstract_state` is a pytree of `jax.ShapeDtypeStruct` carrying `.sharding`.
  """
  if step is not None:
    state, meta, reason = _try_restore(manager, step, abstract_state)
    if not _agree(state is not None):
      raise CheckpointError(f'checkpoint step {step} in {manager.directory} is damaged: {reason or "elsewhere"}')
    return state, meta, step
  steps = sorted(manager.all_steps(), reverse=True)
  if not steps:
    raise FileNotFoundError(f'no checkpoint in {manager.directory}')
  damaged = []
  for candidate in steps:
    state, meta, reason = _try_restore(manager, candidate, abstract_state)
    if _agree(state is not None):
      return state, meta, candidate
    reason = reason or 'damaged in another process'
    damaged.append(candidate)
    if workdir is not None:
      if jax.process_index() == 0:
        where = move_aside(workdir, candidate, reason)
        log(f'checkpoint step {candidate} is damaged ({reason}); moved aside to {where}')
      if jax.process_count() > 1:
        from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
        multihost_utils.sync_global_devices(f'moved_aside_{candidate}')
      manager.reload()  # the manager's list of steps must forget the one moved aside
    else:
      log(f'checkpoint step {candidate} is damaged ({reason})')
  raise CheckpointError(f'every checkpoint in {manager.directory} is damaged (steps {sorted(damaged)}), moved aside '
                        f'to {_root(workdir) / DAMAGED_DIR if workdir else "nowhere"}; nothing was trained. '
                        'Rerun to start from scratch, or restore a copy')


# ----------------------------------------------------------------------------------------------------------------
# Config and plain-array reads.
# ----------------------------------------------------------------------------------------------------------------

def write_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  if jax.process_index() == 0:
    root = _root(workdir)
    root.mkdir(parents=True, exist_ok=True)
    text = config.to_json_best_effort(indent=2)
    if storage.is_remote(workdir):  # an object write is atomic; object stores have no rename
      (root / CONFIG_FILE).write_text(text)
      return
    tmp = root / (CONFIG_FILE + '.tmp')
    tmp.write_text(text)
    tmp.replace(root / CONFIG_FILE)


def read_config(workdir: str) -> ml_collections.ConfigDict:
  path = _root(workdir) / CONFIG_FILE
  if not path.exists():
    raise FileNotFoundError(f'{path} not found: is {workdir} a training workdir?')
  return ml_collections.ConfigDict(json.loads(path.read_text()))


def committed_steps(workdir: str) -> list[int]:
  """Steps with a complete checkpoint in `workdir`, ascending. orbax writes a step under a temporary name and renames
  it when every process has finished, so a bare integer directory is a committed one."""
  directory = checkpoint_dir(workdir)
  if not directory.is_dir():
    return []
  # On object stores orbax writes a step in place and marks it complete with commit_success.txt instead.
  marker = (lambda p: (p / 'commit_success.txt').exists()) if storage.is_remote(workdir) else (lambda p: True)
  return sorted(int(p.name) for p in directory.iterdir()
                if p.name.isdigit() and (p / 'state').is_dir() and marker(p))


def _read_meta(path: epath.Path) -> dict:
  for name in ('meta/metadata', 'meta'):
    candidate = path / name
    if candidate.is_file():
      return json.loads(candidate.read_text())
  return {}


def read_state(workdir: str, step: int | None = None, *, only: str | None = None, verify: bool = True) -> Any:
  """A saved TrainState (or its field `only`, e.g. 'params') as a tree of host numpy arrays, checked against the
  checksums saved with it (`verify`).

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
  path = checkpoint_dir(workdir) / str(step) / 'state'
  with _without_item_metadata_warning():
    restored = _read_item(path, only)
  if verify:
    expected = _read_meta(path.parent).get('checksums')
    if expected is not None:
      bad = checksum_mismatches(restored, expected)
      if bad:
        raise CheckpointError(f'checkpoint step {step} in {checkpoint_dir(workdir)} is damaged: checksum mismatch '
                              f'in {len(bad)} arrays (first: {bad[0]})')
  return restored[only] if only is not None else restored


class _ItemMetadataFilter(logging.Filter):
  def filter(self, record: logging.LogRecord) -> bool:
    return '_CHECKPOINT_METADATA' not in record.getMessage()


@contextlib.contextmanager
def _without_item_metadata_warning():
  """Reading one item of a step directly, orbax warns that the step-level metadata file is not in the item's
  directory (it is one level up, as it should be); that warning says nothing to the user."""
  logger, quiet = logging.getLogger('absl'), _ItemMetadataFilter()
  logger.addFilter(quiet)
  try:
    yield
  finally:
    logger.removeFilter(quiet)


def _read_item(path: epath.Path, only: str | None) -> dict:
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
  return dict(restored)


def restore_params(workdir: str, step: int | None = None) -> tuple[Any, ml_collections.ConfigDict]:
  """(params as host numpy arrays, run config) from the latest (or given) complete checkpoint of a training workdir.

  Needs no optimizer, mesh or other process: see `read_state`.
  """
  return read_state(workdir, step, only='params'), read_config(workdir)


def no_space_error(error: BaseException) -> OSError | None:
  """The ENOSPC `OSError` in `error`'s chain (cause / context), or None."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
      return error
    if 'No space left on device' in str(error):
      if isinstance(error, OSError):
        return error
      where = re.search(r'(?:local file|Failed writing:) "([^"]+)"', str(error))  # tensorstore's wording
      return OSError(errno.ENOSPC, 'No space left on device', where.group(1) if where else None)
    error = error.__cause__ or error.__context__
  return None
