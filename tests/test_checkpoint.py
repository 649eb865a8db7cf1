"""What a workdir guarantees: checksums that catch any changed word whatever the sharding, damaged steps moved aside
(never deleted) with the run resuming bitwise from the newest good one, a refusal (never a fresh start) when every
step is damaged or the config does not fit, a step that would make the state non-finite skipped, and one run per
workdir.

In-process runs of the shared trainer on the synthetic tiny BERT (one device); the entry-point behaviour
(SIGTERM windows, disk full, one-line errors) is in test_resilience.py.
"""
import json
import os
import shutil
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from bert_jax.objective import make_objective
from common import checkpoint as ckpt_lib
from common import checksums, sharding, trainer, workdir_lock
from tests.synthetic import SyntheticLoader, tiny_config

# One worker runs the module: its tests share `straight_run`, which two workers would each train.
pytestmark = pytest.mark.xdist_group('checkpoint')

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(config, workdir):
  config.peak_flops_per_device = 1e12  # a fixed peak: no matmul measurement at start-up
  state, _ = trainer.train(config, make_objective(config), SyntheticLoader(config), workdir=workdir)
  return jax.device_get(state)


def assert_same(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)


# ---------------------------------------------------------------------------------------------------------------
# Checksums.

def test_checksums_catch_one_changed_bit_and_do_not_depend_on_sharding():
  rng = np.random.default_rng(0)
  tree = {'f32': rng.standard_normal((8, 6)).astype(np.float32),
          'bf16': rng.standard_normal((16,)).astype(jnp.bfloat16),
          'i32': rng.integers(-100, 100, (4, 8)).astype(np.int32),
          'key': np.asarray(jax.random.PRNGKey(3)),
          'scalar': np.float32(2.5)}
  host = checksums.state_checksums(tree)
  mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(4, 2), ('a', 'b'))
  sharded = {'f32': jax.device_put(tree['f32'], NamedSharding(mesh, P('a', 'b'))),
             'bf16': jax.device_put(tree['bf16'], NamedSharding(mesh, P(('a', 'b')))),
             'i32': jax.device_put(tree['i32'], NamedSharding(mesh, P('b', 'a'))),
             'key': jnp.asarray(tree['key']), 'scalar': jnp.asarray(tree['scalar'])}
  assert checksums.state_checksums(sharded) == host
  for name, value in tree.items():
    raw = np.array(value).reshape(-1).view(np.uint8).copy()
    for _ in range(5):
      changed = raw.copy()
      changed[rng.integers(raw.size)] ^= np.uint8(1 << rng.integers(8))
      bad = dict(tree, **{name: changed.view(np.asarray(value).dtype).reshape(np.shape(value))})
      assert checksums.checksum_mismatches(bad, host) == [name]
  # Two words swapped (same values, other places) change the sums too.
  swapped = dict(tree, f32=tree['f32'][::-1].copy())
  assert checksums.checksum_mismatches(swapped, host) == ['f32']


# ---------------------------------------------------------------------------------------------------------------
# A step must not make the state non-finite.

def state_with_a_nan_moment(config):
  """(objective, setup, a fresh state whose Adam second moment holds a NaN in every matrix)."""
  objective = make_objective(config)
  setup = trainer.build_setup(config, objective)
  state = setup.create_state()

  def poison(path, x):
    return x.at[(0,) * x.ndim].set(jnp.nan) if 'nu' in checksums.leaf_name(path) and x.ndim == 2 else x
  return objective, setup, state.replace(opt_state=jax.tree_util.tree_map_with_path(poison, state.opt_state))


def test_step_that_would_make_the_state_nonfinite_is_skipped():
  """A NaN in Adam's second moment (what a damaged checkpoint left) gives a finite loss and gradient norm but would
  give NaN parameters: the step is skipped and counted, and the state is left as it was."""
  config = config_of_straight_run()  # its train step is `straight_run`'s program: one compile for the module
  objective, setup, state = state_with_a_nan_moment(config)
  before = jax.device_get(state)
  step_fn, _ = trainer.compile_train_step(setup, objective, config)
  batch = sharding.host_batch_to_global(SyntheticLoader(config).host_batch(0), setup.mesh)
  new_state, metrics = step_fn(state, batch)
  flag = metrics['state_finite']
  metrics = jax.device_get(metrics)
  assert np.isfinite(metrics['loss']) and np.isfinite(metrics['grad_norm'])
  assert metrics['step_ok'] == 0.0 and metrics['skipped_steps'] == 1.0 and metrics['state_finite'] == 0.0
  host = jax.device_get(new_state)
  assert_same(host.params, before.params)
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(host.params))
  # The next step, given that step's `state_finite` (a host value, as the trainer passes it), tests the state
  # again: skipped.
  new_state, metrics = step_fn(new_state, batch, np.float32(jax.device_get(flag)))
  assert jax.device_get(metrics['step_ok']) == 0.0 and jax.device_get(metrics['skipped_steps']) == 2.0
  assert_same(jax.device_get(new_state).params, before.params)
  # A caller that vouches for the state (nonzero) is believed: no test, and the NaN moment reaches the params.
  new_state, metrics = step_fn(new_state, batch, np.float32(1.0))
  assert jax.device_get(metrics['step_ok']) == 1.0
  assert not all(np.isfinite(x).all() for x in jax.tree.leaves(jax.device_get(new_state).params))


def test_a_run_resumed_on_a_nonfinite_moment_skips_every_step(tmp_path):
  """A checkpoint whose Adam moment holds a NaN (saved as is, so its checksums verify): the trainer tests the
  state on its first steps and, since each of those steps reports a non-finite start, on every later one; no step
  is applied and the parameters stay the saved ones."""
  config = config_of_straight_run()  # `straight_run`'s step program
  _, _, state = state_with_a_nan_moment(config)
  workdir = str(tmp_path / 'run')
  manager = ckpt_lib.make_manager(workdir, async_save=False)
  ckpt_lib.save(manager, 0, state, {'step': 0})
  manager.close()
  ckpt_lib.write_config(workdir, config)
  saved = jax.device_get(state.params)
  final = run(config, workdir)
  assert int(final.step) == 4 and int(final.skipped) == 4 and int(final.bad_streak) == 4
  assert_same(final.params, saved)


# ---------------------------------------------------------------------------------------------------------------
# Damaged checkpoints.

@pytest.fixture(scope='module')
def straight_run(tmp_path_factory):
  """4 steps checkpointed at 2 and 4: (workdir, final state)."""
  workdir = str(tmp_path_factory.mktemp('straight') / 'run')
  return workdir, run(config_of_straight_run(), workdir)


def config_of_straight_run(**overrides):
  return tiny_config(num_train_steps=4, checkpoint_every=2, keep_checkpoints=3, **overrides)


def damage(step_dir, kind, seed=0):
  """Damages a committed step as storage can: `flipped_bytes` (64 random bytes flipped in every file of the step;
  flips in one file alone can land in bytes a restore never reads, see benchmarks/fault_injection.py),
  `checksum_mismatch` (the stored values no longer match what was saved: here the saved checksum of one array is
  altered, which the restore cannot tell from a changed value), `no_metadata`."""
  if kind == 'checksum_mismatch':
    path = os.path.join(step_dir, 'meta', 'metadata')
    meta = json.loads(open(path).read())
    names = sorted(n for n in meta['checksums'] if n.startswith('params/'))
    name = names[seed % len(names)]
    meta['checksums'][name][0] ^= 1 << 7
    open(path, 'w').write(json.dumps(meta))
    return
  files = [os.path.join(r, f) for r, _, fs in os.walk(step_dir) for f in fs]
  biggest = max(files, key=os.path.getsize)
  if kind == 'flipped_bytes':  # the fault-injection finding: flipped bytes in the arrays' files
    rng = np.random.default_rng(seed)
    for path in files:
      data = bytearray(open(path, 'rb').read())
      for i in rng.choice(len(data), min(64, len(data)), replace=False):
        data[i] ^= 0xFF
      open(path, 'wb').write(bytes(data))
  elif kind == 'truncated':
    open(biggest, 'r+b').truncate(os.path.getsize(biggest) // 3)
  elif kind == 'zeroed':
    open(biggest, 'wb').write(b'\0' * os.path.getsize(biggest))
  elif kind == 'no_metadata':
    os.remove(os.path.join(step_dir, 'state', '_METADATA'))
  elif kind == 'no_state':
    shutil.rmtree(os.path.join(step_dir, 'state'))
  else:
    raise ValueError(kind)


@pytest.mark.parametrize('kind', ['flipped_bytes', 'checksum_mismatch', 'no_metadata'])
def test_damaged_newest_step_is_moved_aside_and_the_run_resumes_exactly(kind, straight_run, tmp_path, capsys):
  ref_workdir, ref_state = straight_run
  workdir = str(tmp_path / 'run')
  shutil.copytree(ref_workdir, workdir)
  damage(os.path.join(workdir, 'checkpoints', '4'), kind)
  # The run is told to go to step 4 again: it must find 4 damaged, resume from 2 and redo steps 3 and 4.
  state = run(config_of_straight_run(), workdir)
  captured = capsys.readouterr()
  out = captured.out + captured.err
  assert 'checkpoint step 4 is damaged' in out and 'resumed from step 2' in out, out
  assert_same(state, ref_state)
  aside = os.path.join(workdir, ckpt_lib.DAMAGED_DIR, '4')
  assert os.path.isdir(aside)  # moved, not deleted, with the reason
  reason = open(os.path.join(aside, 'REASON.txt')).read()
  if kind == 'checksum_mismatch':
    assert 'checksum mismatch in 1 arrays' in reason, reason
  assert ckpt_lib.committed_steps(workdir) == [2, 4]
  assert_same(ckpt_lib.read_state(workdir)['params'], ref_state.params)


def test_read_state_refuses_a_damaged_step(straight_run, tmp_path):
  """Export and fine-tuning read checkpoints through read_state: a damaged step is refused, not exported."""
  workdir = str(tmp_path / 'run')
  shutil.copytree(straight_run[0], workdir)
  damage(os.path.join(workdir, 'checkpoints', '4'), 'checksum_mismatch', seed=1)
  with pytest.raises(ckpt_lib.CheckpointError, match='step 4 .* is damaged: checksum mismatch in 1 arrays'):
    ckpt_lib.restore_params(workdir)
  ckpt_lib.restore_params(workdir, step=2)


def test_every_step_damaged_is_refused_not_restarted(straight_run, tmp_path):
  workdir = str(tmp_path / 'run')
  shutil.copytree(straight_run[0], workdir)
  damage(os.path.join(workdir, 'checkpoints', '2'), 'no_metadata')
  damage(os.path.join(workdir, 'checkpoints', '4'), 'checksum_mismatch')
  metrics_before = open(os.path.join(workdir, 'metrics.jsonl')).read()
  with pytest.raises(ckpt_lib.CheckpointError, match=r'every checkpoint in .* is damaged \(steps \[2, 4\]\)'):
    run(config_of_straight_run(), workdir)
  assert sorted(os.listdir(os.path.join(workdir, ckpt_lib.DAMAGED_DIR))) == ['2', '4']
  assert ckpt_lib.committed_steps(workdir) == []
  assert open(os.path.join(workdir, 'metrics.jsonl')).read() == metrics_before  # nothing was trained


def test_checkpoint_of_another_config_is_refused_and_left_alone(straight_run, tmp_path):
  workdir = str(tmp_path / 'run')
  shutil.copytree(straight_run[0], workdir)
  config_before = open(os.path.join(workdir, 'config.json')).read()
  config = config_of_straight_run()
  config.model.intermediate_size = 48
  with pytest.raises(ckpt_lib.CheckpointError, match=r'step 4 .* does not fit this config: .*intermediate'):
    run(config, workdir)
  assert ckpt_lib.committed_steps(workdir) == [2, 4]
  assert not os.path.exists(os.path.join(workdir, ckpt_lib.DAMAGED_DIR))
  assert open(os.path.join(workdir, 'config.json')).read() == config_before


# ---------------------------------------------------------------------------------------------------------------
# One run per workdir.

HOLDER = """
import sys, time
sys.path.insert(0, {repo!r})
from common.workdir_lock import WorkdirLock
with WorkdirLock({workdir!r}):
  print('locked', flush=True)
  time.sleep(120)
"""


def test_second_run_on_a_locked_workdir_is_refused(tmp_path):
  workdir = str(tmp_path / 'run')
  holder = subprocess.Popen([sys.executable, '-c', HOLDER.format(repo=REPO, workdir=workdir)],
                            stdout=subprocess.PIPE, text=True, env=dict(os.environ, JAX_PLATFORMS='cpu'))
  try:
    assert holder.stdout.readline().strip() == 'locked'
    config = tiny_config(num_train_steps=2)
    with pytest.raises(workdir_lock.WorkdirBusy, match=f'in use by another run: pid {holder.pid} on '):
      run(config, workdir)
    assert not os.path.exists(os.path.join(workdir, 'checkpoints'))
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait(30)
  # The holder died without releasing: the kernel did, so the lock is not stale and the next run proceeds.
  with workdir_lock.WorkdirLock(workdir):
    with workdir_lock.WorkdirLock(workdir):  # re-entrant within a process (entry point, then trainer)
      info = json.loads(open(os.path.join(workdir, workdir_lock.LOCK_FILE)).read())
      assert info['pid'] == os.getpid()
