"""Runs survive what happens to them, and runs that cannot work are refused before they start.

* SIGTERM (a preemption notice) mid-run: the process checkpoints the step it reached and exits 0; a restart ends
  with a train state (parameters, optimizer state, RNG, XLNet's carried memory) bitwise equal to an uninterrupted
  run's, having trained on exactly the same batches: the two partial runs' batches, row by row, are the straight
  run's. For BERT and for XLNet with memory.
* SIGKILL at random moments, several times, with a checkpoint started every step (so most kills land during an
  asynchronous save): every restart finds a complete checkpoint or none, and the last run ends bitwise equal to the
  uninterrupted run.
* A run stopped for consecutive non-finite steps exits non-zero (1), naming the cause, with the last good
  parameters checkpointed (the trainer's skipping and counting is tested in test_trainer.py).
* Batch / device / accumulation / mesh mismatches and XLNet reuse_len / bi_data / perm_size inconsistencies are
  refused by the entry points with the field named, before any data preparation (the trainer-level and other
  data-field refusals are in test_trainer.py, test_bert_pretrain.py and test_xlnet_pretrain.py).
* `--dry_run` compiles the train step for a target without data or a workdir and says whether it fits.

The training runs are subprocesses of the real entry points under `tests/drivers/recorded_run.py` (which records
every host batch trained on), with the tiny configs of `tests/drivers/tiny_configs.py` on 2 fake CPU devices with
the parameters FSDP-sharded over them, and data prepared once per session.
"""
import os
import random
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from common import fit
from common.config import ConfigError
from tests.drivers import harness, tiny_configs

STEPS = 16  # tiny_configs' num_train_steps
MESH = ['--config.mesh.data=1', '--config.mesh.fsdp=2']


@pytest.fixture(scope='module')
def env(tmp_path_factory):
  return harness.child_env(harness.shared_dir(tmp_path_factory, 'jax_cache'), devices=2)


@pytest.fixture(scope='module')
def data(tmp_path_factory):
  return {model: harness.prepared_data(tmp_path_factory, model) for model in ('bert', 'xlnet')}


@pytest.fixture(scope='module')
def straight(tmp_path_factory, env, data):
  """model -> (workdir, batch records) of an uninterrupted run of STEPS steps, run once per session on first use
  (pytest-xdist workers share it)."""
  def get(model):
    root = harness.shared_dir(tmp_path_factory, f'{model}_straight')
    workdir, record = os.path.join(root, 'run'), os.path.join(root, 'batches.jsonl')

    def train():
      returncode, output = harness.run_to_end(harness.train_argv(model, workdir, data[model], MESH, record=record),
                                              env, os.path.join(root, 'log'))
      assert returncode == 0, output[-3000:]
      assert harness.checkpoint_steps(workdir) == [STEPS]
    harness.once(root, train)
    return workdir, harness.read_records(record)
  return get


# ---------------------------------------------------------------------------------------------------------------
# SIGTERM: checkpoint the step reached, exit 0, resume exactly.

@pytest.mark.parametrize('model', ['bert', 'xlnet'])
def test_sigterm_checkpoints_and_resume_is_exact(model, tmp_path, env, data, straight):
  ref_workdir, ref_records = straight(model)
  workdir, record = str(tmp_path / 'run'), str(tmp_path / 'batches.jsonl')
  argv = harness.train_argv(model, workdir, data[model], MESH, record=record, step_delay=0.25)
  run = harness.Run(argv, env, str(tmp_path / 'preempted.log'))
  try:
    harness.wait_for_step(run, workdir, 3, timeout=150)
    run.signal(signal.SIGTERM)
    returncode = run.wait(60)
  finally:
    run.cleanup()
  output = run.output()
  assert returncode == 0, output[-3000:]
  assert 'preemption notice' in output
  reached = [r['step'] for r in harness.read_records(record)]
  k = len(reached)
  assert reached == list(range(k)) and 3 <= k < STEPS, reached
  assert harness.metric_steps(workdir)[-1] == k
  assert harness.checkpoint_steps(workdir) == [k]  # checkpoint_every=0: the preemption save is the only one

  returncode, output = harness.run_to_end(harness.train_argv(model, workdir, data[model], MESH, record=record),
                                          env, str(tmp_path / 'resumed.log'))
  assert returncode == 0, output[-3000:]
  assert f'resumed from step {k}' in output
  records = harness.read_records(record)
  assert [r['step'] for r in records] == list(range(STEPS))
  assert records == ref_records, 'the two partial runs did not train on the straight run\'s batches'
  state, ref_state = harness.restore_state(workdir), harness.restore_state(ref_workdir)
  harness.assert_trees_equal(state, ref_state, f'{model} state')
  if model == 'xlnet':  # the carried memory is part of the compared state, and really carried
    assert state['aux']['mems'].shape == (8, 2, 16, 32) and np.abs(state['aux']['mems']).max() > 0.1


# ---------------------------------------------------------------------------------------------------------------
# SIGKILL at random moments, during asynchronous saves too.

def test_sigkill_at_random_moments_then_resume_is_exact(tmp_path, env, data, straight):
  ref_workdir, _ = straight('bert')
  workdir = str(tmp_path / 'run')
  metrics = os.path.join(workdir, 'metrics.jsonl')
  argv = harness.train_argv('bert', workdir, data['bert'], MESH + ['--config.checkpoint_every=1'], step_delay=0.05)
  rng = random.Random(7)
  history = []
  for attempt in range(3):
    before = harness.checkpoint_steps(workdir)
    offset = harness.file_size(metrics)
    run = harness.Run(argv, env, str(tmp_path / f'killed{attempt}.log'))
    try:
      if attempt == 1:  # anywhere in start-up: imports, restore, compile, first steps
        delay = rng.uniform(0.5, 6.0)
        time.sleep(delay)
      else:  # while training: a save is started every step and takes about as long as the step
        # Step s + 2 is logged after save s + 1 started, which waited for save s to commit: one more checkpoint.
        harness.wait_for_step(run, workdir, (before[-1] if before else 0) + 3, timeout=150, offset=offset)
        delay = rng.uniform(0.0, 0.8)
        time.sleep(delay)
      assert run.alive(), f'attempt {attempt} finished before it was killed:\n{run.output()[-2000:]}'
      run.signal(signal.SIGKILL)
      assert run.wait(30) == -signal.SIGKILL
    finally:
      run.cleanup()
    output = run.output()
    logged = harness.metric_steps(workdir, offset)
    if before and logged:  # it got as far as training, so it had restored the latest complete checkpoint
      assert f'resumed from step {before[-1]}' in output, output[-3000:]
    after = harness.checkpoint_steps(workdir)
    assert not before or (after and after[-1] >= before[-1]), (before, after)
    if after:  # the latest complete checkpoint is readable
      assert int(harness.restore_state(workdir)['step']) == after[-1]
    leftovers = [n for n in os.listdir(os.path.join(workdir, 'checkpoints')) if not n.isdigit()] \
        if os.path.isdir(os.path.join(workdir, 'checkpoints')) else []
    history.append(dict(attempt=attempt, delay=round(delay, 2), logged=logged[-1:], checkpoints=after,
                        unfinished_saves=leftovers))
  print('kills:', *history, sep='\n  ')
  assert history[-1]['checkpoints'], history

  returncode, output = harness.run_to_end(argv, env, str(tmp_path / 'final.log'))
  assert returncode == 0, output[-3000:]
  last = history[-1]['checkpoints'][-1]
  assert f'resumed from step {last}' in output, (history, output[-3000:])
  harness.assert_trees_equal(harness.restore_state(workdir), harness.restore_state(ref_workdir),
                             f'state after kills {history}: ')


# ---------------------------------------------------------------------------------------------------------------
# SIGTERM after the last step: the final checkpoint is written before the final eval, and the handler stays until
# it has committed.

def test_sigterm_during_the_final_eval_keeps_the_final_checkpoint(tmp_path, env, data):
  workdir = str(tmp_path / 'run')
  # STEPS steps: the train step is the straight runs' program, so it usually comes from the compilation cache.
  argv = harness.train_argv('bert', workdir, data['bert'], MESH + ['--config.num_eval_batches=400'])
  run = harness.Run(argv, env, str(tmp_path / 'log'))
  try:
    deadline = time.monotonic() + 150
    while f'step {STEPS}:' not in run.output():  # the last step is logged; the save and the long eval follow
      assert run.alive() and time.monotonic() < deadline, run.output()[-3000:]
      time.sleep(0.02)
    run.signal(signal.SIGTERM)
    returncode = run.wait(120)
  finally:
    run.cleanup()
  output = run.output()
  assert returncode == 0, output[-3000:]
  assert f'eval at step {STEPS} interrupted by the preemption notice' in output, output[-3000:]
  assert f'preemption notice during the final eval or save: step {STEPS} is checkpointed' in output
  assert harness.checkpoint_steps(workdir) == [STEPS]
  assert int(harness.restore_state(workdir)['step']) == STEPS


# ---------------------------------------------------------------------------------------------------------------
# Disk full: one line, non-zero, the checkpoints before it intact.

def _mount_tmpfs(path: str, size: str) -> bool:
  os.makedirs(path, exist_ok=True)
  result = subprocess.run(['mount', '-t', 'tmpfs', '-o', f'size={size}', 'tmpfs', path], capture_output=True,
                          check=False)
  return result.returncode == 0


def test_disk_full_is_one_line_and_keeps_the_checkpoints_before_it(tmp_path, env, data):
  """The workdir is on a 1200 KiB tmpfs; a checkpoint of the tiny BERT takes ~0.7 MB, every step is saved, so the
  second save cannot fit. Where tmpfs cannot be mounted (no privileges), the free space is made to look that small."""
  mount = str(tmp_path / 'small_disk')
  mounted = _mount_tmpfs(mount, '1200k')
  extra = [] if mounted else ['--disk_bytes', str(1200 << 10)]
  try:
    workdir = os.path.join(mount, 'run')
    argv = harness.train_argv('bert', workdir, data['bert'], MESH + ['--config.checkpoint_every=1'])
    argv[2:2] = extra
    returncode, output = harness.run_to_end(argv, env, str(tmp_path / 'log'))
    assert returncode == 1, output[-3000:]
    lines = [line for line in output.splitlines()
             if line.strip() and not line.startswith(('step ', 'mesh ', 'corpus '))]  # progress reports
    assert len(lines) == 1, output[-3000:]
    assert lines[0].startswith(f'error: no space left on device writing {workdir}/checkpoints (a checkpoint needs '
                               'about'), lines
    steps = harness.checkpoint_steps(workdir)
    assert steps and int(harness.restore_state(workdir)['step']) == steps[-1]
  finally:
    if mounted:
      subprocess.run(['umount', mount], check=False)


# ---------------------------------------------------------------------------------------------------------------
# User errors at the entry point: one line, exit 2; --help exits 0.

@pytest.mark.parametrize('flag, message', [
    ('--config.keep_checkpoints=0', 'error: config.keep_checkpoints: must be >= 1'),
    ('--config.global_batch_size=abc', 'error: '),
    ('--config.optim.learning_rte=1e-3', 'error: '),
    ('--help', None),
])
def test_user_errors_are_one_line(flag, message, tmp_path, env, data):
  workdir = str(tmp_path / 'run')
  argv = [sys.executable, '-m', 'bert_jax.pretrain', f'--config={harness.CONFIG}:bert', f'--workdir={workdir}',
          *data['bert'].flags(), flag]
  result = subprocess.run(argv, env=env, cwd=harness.REPO, capture_output=True, text=True, timeout=120, check=False)
  if message is None:
    assert result.returncode == 0, result.stderr[-3000:]
    assert '--dry_run' in result.stdout and '--workdir' in result.stdout
    return
  assert result.returncode == 2, result.stdout + result.stderr[-3000:]
  lines = [line for line in result.stderr.splitlines() if line.strip()]
  assert len(lines) == 1 and lines[0].startswith(message), result.stderr[-3000:]
  assert flag.split('=')[0].removeprefix('--config.').split('.')[-1] in lines[0]
  assert not os.path.exists(workdir)


def test_second_run_on_a_busy_workdir_is_one_line(tmp_path, env, data):
  workdir = str(tmp_path / 'run')
  holder = subprocess.Popen([sys.executable, '-c', 'import sys, time; from common.checkpoint import WorkdirLock\n'
                             f'with WorkdirLock({workdir!r}):\n  print("locked", flush=True); time.sleep(120)'],
                            cwd=harness.REPO, env=env, stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == 'locked'
    returncode, output = harness.run_to_end(harness.train_argv('bert', workdir, data['bert'], MESH), env,
                                            str(tmp_path / 'log'))
  finally:
    holder.kill()
    holder.wait(30)
  assert returncode == 2, output[-3000:]
  assert output.strip().splitlines()[-1].startswith(f'error: {workdir} is in use by another run: pid {holder.pid}')
  assert 'Traceback' not in output and not os.path.exists(os.path.join(workdir, 'checkpoints'))


# ---------------------------------------------------------------------------------------------------------------
# Non-finite steps at the entry point.

def test_nonfinite_stop_exits_nonzero_with_last_good_checkpoint(tmp_path, env, data):
  """Steps 4 and 5 get NaN inputs; with max_consecutive_nonfinite=2 the run stops at step 5 of STEPS, exit status 1.
  (The limit is checked on the host, so the train step is the straight runs' program, usually from the cache.)"""
  workdir = str(tmp_path / 'run')
  argv = harness.train_argv('bert', workdir, data['bert'], MESH + ['--config.max_consecutive_nonfinite=2'],
                            nan_from_step=3)
  returncode, output = harness.run_to_end(argv, env, str(tmp_path / 'log'))
  assert returncode == 1, output[-3000:]
  last_line = [line for line in output.splitlines() if line.strip()][-1]
  assert last_line.startswith('error: 2 consecutive steps had non-finite loss, gradients or new state (at '
                              'step 5)'), output[-3000:]
  assert 'Traceback' not in output
  assert harness.checkpoint_steps(workdir) == [5]
  state = harness.restore_state(workdir)
  assert int(state['skipped']) == 2 and int(state['bad_streak']) == 2
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(state['params']))


# ---------------------------------------------------------------------------------------------------------------
# Configs that cannot run, refused by the entry points before any data preparation (8 fake devices here).

def entry_point(model):
  if model == 'bert':
    from bert_jax import pretrain  # pylint: disable=import-outside-toplevel
  else:
    from xlnet_jax import pretrain  # pylint: disable=import-outside-toplevel
  return pretrain


def set_fields(config, overrides):
  for dotted, value in overrides.items():
    *parents, name = dotted.split('.')
    node = config
    for part in parents:
      node = node[part]
    node[name] = value
  return config


@pytest.mark.parametrize('model', ['bert', 'xlnet'])
@pytest.mark.parametrize('overrides, field', [
    ({'keep_checkpoints': 0}, 'keep_checkpoints'),                          # would end with no checkpoint
    ({'global_batch_size': 12}, 'global_batch_size'),                       # 12 rows on 8 devices
    ({'global_batch_size': 16, 'grad_accum_steps': 4}, 'global_batch_size'),  # micro-batches of 4 on 8 devices
    ({'mesh.data': 2, 'mesh.fsdp': 2}, 'mesh'),                             # 2 * 2 * 1 = 4 != 8 devices
    ({'mesh.fsdp': 3}, 'mesh'),                                             # 8 devices not divisible by 3
])
def test_unrunnable_config_refused_before_any_work(model, overrides, field, tmp_path):
  config = set_fields(tiny_configs.get_config(model), overrides)
  with pytest.raises(ConfigError, match=f'^config.{field}: '):
    entry_point(model).run(config, str(tmp_path / 'run'))
  assert not os.path.exists(tmp_path / 'run')


@pytest.mark.parametrize('overrides, field', [
    ({'data.reuse_len': 32}, 'data.reuse_len'),        # the reused part must leave room for A <sep> B <sep> <cls>
    ({'model.bi_data': True}, 'model.bi_data'),         # differs from data.bi_data
    ({'data.perm_size': 5}, 'data.perm_size'),          # must divide reuse_len and seq_len - reuse_len
])
def test_inconsistent_xlnet_config_refused_before_any_work(overrides, field, tmp_path):
  config = set_fields(tiny_configs.get_config('xlnet'), overrides)
  with pytest.raises(ConfigError, match=f'^config.{field}: '):
    entry_point('xlnet').run(config, str(tmp_path / 'run'))
  assert not os.path.exists(tmp_path / 'run')


# ---------------------------------------------------------------------------------------------------------------
# Fit before launch.

def test_dry_run_of_tiny_bert_fits(tmp_path):
  """tpu:v5litepod-8 is 8 devices, as many as this process has: the step compiles for them (an estimate on CPU)."""
  config = tiny_configs.get_config('bert')
  config.model.vocab_size = 1000  # no tokenizer in a dry run
  config.data_dir = str(tmp_path / 'data')
  report = entry_point('bert').dry_run(config, fit.parse_target('tpu:v5litepod-8'))
  printed = fit.format_report(report)
  assert printed.startswith('dry run for tpu:v5litepod-8: 8 devices, mesh {\'data\': 8, \'fsdp\': 1, \'tensor\': 1}')
  for row in ('arguments (state + batch)', 'outputs (new state + metrics)', 'donated, reused by outputs',
              'temporaries (activations, grads)', 'generated code', 'total', 'device memory', 'FLOPs per step'):
    assert row in printed, row
  assert report.target.hbm_bytes == 16 * 2 ** 30 and '16384.000 MiB   (data sheet)' in printed  # v5e: 16 GiB
  if not fit.libtpu_available():
    assert 'ESTIMATE: compiled for 8 fake CPU devices' in printed
  assert printed.splitlines()[-1].startswith('VERDICT: fits: ')
  assert report.fits and not os.path.exists(tmp_path / 'data')
  state = sum(report.state.values())
  assert report.memory['arguments (state + batch)'] >= state > 0  # the train state is an argument of the step
  assert report.total_bytes >= report.memory['temporaries (activations, grads)'] > 0
  # XLA counts at least the model's matmuls, plus the elementwise work (layer norms, softmax, Adam), which weighs a
  # lot at hidden size 32.
  assert 0.7 < report.xla_flops_per_device * 8 / report.analytic_flops < 4.0


def test_dry_run_refusals():
  config = tiny_configs.get_config('xlnet')
  assert config.model.vocab_size == 0
  with pytest.raises(ConfigError, match='^config.model.vocab_size: 0 means'):
    entry_point('xlnet').dry_run(config, fit.parse_target('tpu:v5litepod-8'))
  # Validated for the target's 16 devices, not this process's 8: micro-batches of 8 rows cannot be split 16 ways.
  config = tiny_configs.get_config('bert')
  config.model.vocab_size = 1000
  config.update(global_batch_size=16, grad_accum_steps=2)
  with pytest.raises(ConfigError, match='^config.global_batch_size: .* data-parallel size data\\*fsdp=16'):
    entry_point('bert').dry_run(config, fit.parse_target('tpu:v4-32'))
  with pytest.raises(ConfigError, match='^--target: '):
    fit.parse_target('tpu:v9-8')
  with pytest.raises(ConfigError, match='^--target: '):
    fit.parse_target('gpu:k80')


@pytest.mark.parametrize('spec, devices, gib, usable, topology', [
    ('tpu:v4-32', 16, 32, 1.0, 'v4:2x2x4'),          # the suffix counts TensorCores; a v4 device is a chip
    ('tpu:v5p-128', 64, 95, 1.0, 'v5:4x4x4'),
    ('tpu:v5litepod-16', 16, 16, 1.0, 'v5e:4x4'),    # v5e / v6e: the suffix counts chips
    ('tpu:v6e-256', 256, 32, 1.0, 'v6e:16x16'),
    ('tpu:v3-8', 8, 16, 1.0, None),                  # v3: a device is a TensorCore
    ('gpu:h100', 1, 80, 0.75, None),                 # JAX preallocates 75 % of GPU memory
    ('gpu:h200x8', 8, 141, 0.75, None),
])
def test_dry_run_targets(spec, devices, gib, usable, topology, monkeypatch):
  monkeypatch.delenv('XLA_PYTHON_CLIENT_MEM_FRACTION', raising=False)
  target = fit.parse_target(spec)
  assert (target.num_devices, target.hbm_bytes / 2 ** 30, target.usable_fraction) == (devices, gib, usable)
  if target.generation:  # the compile-only topology asked of libtpu where it is installed
    name = fit._topology_name(fit.TPU_GENERATIONS[target.generation], devices)  # pylint: disable=protected-access
    assert name == topology
  overridden = fit.parse_target(spec, hbm_gb=0.5, num_devices=3)
  assert (overridden.num_devices, overridden.hbm_bytes, overridden.usable_fraction) == (3, 2 ** 29, 1.0)


def test_dry_run_command_line_of_tiny_xlnet_does_not_fit(tmp_path, env):
  """The real entry point's flags; 2 made-up devices of 1 MiB: the table, then a verdict that says no, exit status
  3; no workdir. The process starts with 1 CPU device: the dry run asks for the target's 2 itself. (The step is the
  training runs' above, so its executable usually comes from the compilation cache.)"""
  workdir = tmp_path / 'run'
  argv = [sys.executable, '-m', 'xlnet_jax.pretrain', f'--config={harness.CONFIG}:xlnet', f'--workdir={workdir}',
          *MESH, '--dry_run', '--target=gpu:h100x2', '--target_hbm_gb=0.001', '--config.model.vocab_size=1000']
  env = dict(env, XLA_FLAGS=env['XLA_FLAGS'].replace('device_count=2', 'device_count=1'))
  result = subprocess.run(argv, env=env, cwd=harness.REPO, capture_output=True, text=True, timeout=300, check=False)
  assert result.returncode == 3, result.stdout + result.stderr[-3000:]
  assert result.stdout.startswith("dry run for gpu:h100x2: 2 devices, mesh {'data': 1, 'fsdp': 2, 'tensor': 1}")
  assert 'temporaries (activations, grads)' in result.stdout and '(--target_hbm_gb)' in result.stdout
  assert 'carried (memory)' in result.stdout  # XLNet's memory is part of the train state
  verdict = result.stdout.strip().splitlines()[-1]
  assert verdict.startswith('VERDICT: does not fit: needs ') and 'short by' in verdict, result.stdout
  assert not workdir.exists()


def _libtpu_path() -> str | None:
  """Where libtpu is importable from: the environment, or `LIBTPU_PYTHONPATH` (a `pip install --target DIR libtpu`
  kept out of the test venv, where JAX would otherwise look for a TPU at every start)."""
  import importlib.util  # pylint: disable=import-outside-toplevel
  if importlib.util.find_spec('libtpu') is not None:
    return ''
  extra = os.environ.get('LIBTPU_PYTHONPATH')
  return extra if extra and os.path.isdir(os.path.join(extra, 'libtpu')) else None


@pytest.mark.skipif(_libtpu_path() is None, reason='libtpu not installed (pip install libtpu, or LIBTPU_PYTHONPATH)')
def test_dry_run_compiles_for_a_compile_only_tpu_topology(tmp_path, env):
  """With libtpu and no TPU: the step is compiled by the TPU compiler for a v4-8 topology (4 chips); the memory
  table is XLA-TPU's, not an estimate."""
  argv = [sys.executable, '-m', 'bert_jax.pretrain', f'--config={harness.CONFIG}:bert', f'--workdir={tmp_path / "w"}',
          '--dry_run', '--target=tpu:v4-8', '--config.model.vocab_size=1000']
  env = dict(env, JAX_PLATFORMS='cpu')
  if _libtpu_path():
    env['PYTHONPATH'] = os.pathsep.join(filter(None, [_libtpu_path(), env.get('PYTHONPATH')]))
  result = subprocess.run(argv, env=env, cwd=harness.REPO, capture_output=True, text=True, timeout=540, check=False)
  assert result.returncode == 0, result.stdout + result.stderr[-3000:]
  report = result.stdout[result.stdout.index('dry run for'):]
  assert report.startswith("dry run for tpu:v4-8: 4 devices, mesh {'data': 4, 'fsdp': 1, 'tensor': 1}"), report
  assert 'compiled for a compile-only TPU v4 topology (4 devices)' in report and 'ESTIMATE' not in report, report
  assert report.strip().splitlines()[-1].startswith('VERDICT: fits: ')
  assert not (tmp_path / 'w').exists()
