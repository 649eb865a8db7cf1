"""Two processes x 2 fake CPU devices train like one process x 4, through a preemption.

The runs are the real BERT entry point (`tests/drivers/recorded_run.py`, tiny config, the embedded corpus prepared
once) on a `data=4` mesh over all 4 global devices. The two processes form one process group on localhost through
`JAX_COORDINATOR_ADDRESS` / `JAX_NUM_PROCESSES` / `JAX_PROCESS_ID` (`common.distributed.initialize()`); their
cross-process collectives run over gloo, JAX's default CPU collectives. Checked:

* each process reads only its rows: at every step process 0 trained on rows 0-3 and process 1 on rows 4-7 of the
  global batch the single process trained on (row digests recorded by the driver);
* the final train state (parameters and Adam moments) equals the single process's within 1e-5 (fp32; the gradient
  all-reduce crosses processes through gloo, whose summation order may differ from the in-process one);
* only process 0 writes the metrics (each step once) and the config;
* process 0 alone exports the HF directory at the end, and it holds the final params, as does
  `checkpoint.restore_params` in a single process (the test's) reading the two processes' checkpoint;
* on the way, a SIGTERM to both processes (a preemption notice to every host) stops them after the same step,
  agreed through the coordination service (`multihost_utils.reached_preemption_sync_point`); both exit 0 with that
  step checkpointed, and a restart of both finishes the run (no step trained twice, none skipped).

Every child has a timeout; if one process fails, the other is killed at once instead of waiting in a collective.
"""
import collections
import os
import signal
import time

import portpicker
import pytest

from tests.drivers import harness

STEPS = 8
OVERRIDES = [f'--config.num_train_steps={STEPS}', '--config.checkpoint_every=4', '--config.mesh.data=-1']


@pytest.fixture(scope='module')
def cache(tmp_path_factory):
  return harness.shared_dir(tmp_path_factory, 'jax_cache')


@pytest.fixture(scope='module')
def data(tmp_path_factory):
  return harness.prepared_data(tmp_path_factory, 'bert')


def start_pair(workdir, data, cache, log_prefix, record=None, step_delay=0.0, extra=()):
  port = portpicker.pick_unused_port()
  runs = []
  for index in range(2):
    env = harness.child_env(cache, devices=2, JAX_COORDINATOR_ADDRESS=f'localhost:{port}', JAX_NUM_PROCESSES='2',
                            JAX_PROCESS_ID=str(index))
    argv = harness.train_argv('bert', workdir, data, OVERRIDES + list(extra), record=record, step_delay=step_delay)
    runs.append(harness.Run(argv, env, f'{log_prefix}{index}.log'))
  return runs


def wait_pair(runs, timeout):
  """Exit statuses of both; the first failure (or the timeout) kills the other, so nothing waits in a collective."""
  deadline = time.monotonic() + timeout
  while any(run.alive() for run in runs):
    failed = [run for run in runs if not run.alive() and run.proc.returncode != 0]
    if failed or time.monotonic() > deadline:
      for run in runs:
        run.cleanup()
      reason = 'timed out' if not failed else f'process exited {failed[0].proc.returncode}'
      raise AssertionError(f'{reason}:\n' + '\n'.join(f'--- process {i}\n{run.output()[-2500:]}'
                                                    for i, run in enumerate(runs)))
    time.sleep(0.05)
  return [run.proc.returncode for run in runs]


def run_single(root, data, cache):
  """One process, 4 fake devices, uninterrupted: (workdir, records)."""
  workdir, record = str(root / 'single'), str(root / 'single.jsonl')
  returncode, output = harness.run_to_end(harness.train_argv('bert', workdir, data, OVERRIDES, record=record),
                                          harness.child_env(cache, devices=4), str(root / 'single.log'))
  assert returncode == 0, output[-3000:]
  return workdir, harness.read_records(record)


def test_two_processes_train_like_one_through_a_preemption(tmp_path, cache, data):
  single_dir, single_records = run_single(tmp_path, data, cache)

  # Two processes, 2 devices each; SIGTERM to both after step 2, then a restart of both to the end.
  workdir, record = str(tmp_path / 'pair'), str(tmp_path / 'pair.jsonl')
  runs = start_pair(workdir, data, cache, str(tmp_path / 'preempted'), record=record, step_delay=0.3)
  try:
    harness.wait_for_step(runs[0], workdir, 2, timeout=240)
    for run in runs:  # the notice reaches every host, not at the same instant
      run.signal(signal.SIGTERM)
      time.sleep(0.05)
    assert wait_pair(runs, timeout=120) == [0, 0]
  finally:
    for run in runs:
      run.cleanup()
  outputs = [run.output() for run in runs]
  assert 'preemption notice' in outputs[0], outputs[0][-3000:]
  reached = collections.Counter(r['step'] for r in harness.read_records(record))
  k = len(reached)
  assert sorted(reached) == list(range(k)) and set(reached.values()) == {2} and 2 <= k < STEPS, reached
  assert harness.checkpoint_steps(workdir)[-1] == k  # both stopped after the same step and saved it

  runs = start_pair(workdir, data, cache, str(tmp_path / 'resumed'), record=record, extra=['--config.export_hf=True'])
  try:
    assert wait_pair(runs, timeout=300) == [0, 0]
  finally:
    for run in runs:
      run.cleanup()
  outputs = [run.output() for run in runs]
  assert f'resumed from step {k}' in outputs[0]
  for output in outputs:
    assert 'Traceback' not in output, output[-3000:]

  # Each process read its own 4 rows of every global batch, and together exactly the single process's 8.
  by_step = collections.defaultdict(dict)
  for r in harness.read_records(record):
    assert r['processes'] == 2 and len(r['rows']) == 4, r
    assert r['process'] not in by_step[r['step']], f'step {r["step"]} trained twice by process {r["process"]}'
    by_step[r['step']][r['process']] = r['rows']
  assert sorted(by_step) == list(range(STEPS))
  assert [r['step'] for r in single_records] == list(range(STEPS))
  for r in single_records:
    assert r['processes'] == 1 and by_step[r['step']][0] + by_step[r['step']][1] == r['rows'], r['step']

  # The same training, up to the order of the cross-process sums.
  state, ref = harness.restore_state(workdir), harness.restore_state(single_dir)
  assert int(state['step']) == int(ref['step']) == STEPS
  for part in ('params', 'opt_state'):
    diff = harness.max_abs_diff(state[part], ref[part])
    assert diff < 1e-5, f'{part} differ by {diff}'

  # Process 0 alone writes metrics (each step once over the two runs), TensorBoard events (one file per run) and
  # the config.
  assert harness.metric_steps(workdir) == list(range(1, STEPS + 1))
  assert len(os.listdir(os.path.join(workdir, 'tensorboard'))) == 2
  assert os.path.exists(os.path.join(workdir, 'config.json'))
  assert harness.checkpoint_steps(workdir)[-1] == STEPS

  # The export at the end of the run (process 0 alone, reading the checkpoint all processes wrote, with no
  # barrier the others would have to join) holds the final params; and this single process reads them too.
  assert 'exported HF model' in outputs[0] and 'exported HF model' not in outputs[1]
  from bert_jax import export  # pylint: disable=import-outside-toplevel
  from common import checkpoint  # pylint: disable=import-outside-toplevel
  params, config = checkpoint.restore_params(workdir)
  harness.assert_trees_equal(params, state['params'], 'restore_params')
  assert config.num_train_steps == STEPS
  _, hf_params = export.load_hf_dir(os.path.join(workdir, 'hf'))
  harness.assert_trees_equal(hf_params, state['params'], 'HF export')
