"""Launchers and process-group initialisation.

`launch.tpu` / `launch.slurm` are checked through their `--dry-run` plans: the exact argv of every gcloud command,
the remote shell strings (valid bash, and actually run here against a fake home directory), refused inputs naming
their field, and the sbatch script (content, `bash -n`, and a run under a fake `srun` that starts two real JAX
processes). `common.distributed` is checked in-process for its decisions and with two subprocesses forming one
process group on localhost (2 fake CPU devices each).
"""
import os
import shlex
import signal
import stat
import subprocess
import sys
import textwrap
import time

import jax
import portpicker
import pytest

from common import distributed
from launch import slurm, tpu
from launch.common import LaunchError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ZONE = ['--zone', 'us-central2-b']
TRAIN = ['python', '-m', 'bert_jax.pretrain', '--config', 'bert_jax/configs/base.py', '--workdir', 'gs://bucket/run',
         '--config.optim.learning_rate=2e-4']


def remote_of(argv):
  """The shell string of a `gcloud ... ssh --command=...` argv."""
  (command,) = [a for a in argv if a.startswith('--command=')]
  return command[len('--command='):]


def bash_syntax_ok(text):
  return subprocess.run(['bash', '-n', '-c', text], capture_output=True, text=True, check=False).returncode == 0


def child_env(**extra):
  """A clean environment for subprocesses: no SLURM/JAX settings leaking in, the repo importable, CPU only."""
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(('SLURM_', 'JAX_', 'TPU_', 'MEGASCALE_')) and k != 'XLA_FLAGS'}
  env.update(PYTHONPATH=REPO, JAX_PLATFORMS='cpu', XLA_FLAGS='--xla_force_host_platform_device_count=2',
             TF_CPP_MIN_LOG_LEVEL='3', TPU_SKIP_MDS_QUERY='1')
  env.update(extra)
  return env


# ---------------------------------------------------------------------------------------------------------------
# launch.tpu: exact commands.

def test_create_tpu_vm_spot():
  commands, _ = tpu.plan(['create', '--name', 'bert-v4', *ZONE, '--accelerator-type', 'v4-32', '--spot'])
  assert commands == [['gcloud', 'compute', 'tpus', 'tpu-vm', 'create', 'bert-v4', '--zone=us-central2-b',
                       '--accelerator-type=v4-32', '--version=tpu-ubuntu2204-base', '--spot']]


def test_create_queued_resource_with_project():
  commands, _ = tpu.plan(['create', '--name', 'qr1', *ZONE, '--project', 'my-project-1', '--queued',
                          '--accelerator-type', 'v5p-128', '--spot', '--gcloud-flag=--reserved'])
  assert commands == [['gcloud', 'compute', 'tpus', 'queued-resources', 'create', 'qr1', '--zone=us-central2-b',
                       '--project=my-project-1', '--node-id=qr1', '--accelerator-type=v5p-128',
                       '--runtime-version=v2-alpha-tpuv5', '--spot', '--reserved']]


@pytest.mark.parametrize('accelerator, runtime', [
    ('v4-8', 'tpu-ubuntu2204-base'), ('v5litepod-16', 'v2-alpha-tpuv5-lite'), ('v5p-8', 'v2-alpha-tpuv5'),
    ('v6e-8', 'v2-alpha-tpuv6e'), ('v3-32', 'tpu-ubuntu2204-base')])
def test_create_default_runtime_per_generation(accelerator, runtime):
  (command,), _ = tpu.plan(['create', '--name', 'a', *ZONE, '--accelerator-type', accelerator])
  assert f'--version={runtime}' in command
  (command,), _ = tpu.plan(['create', '--name', 'a', *ZONE, '--accelerator-type', accelerator,
                            '--runtime-version', 'custom-1.0'])
  assert '--version=custom-1.0' in command


def test_setup_git_archive_scp_install(tmp_path):
  tarball = str(tmp_path / 'code.tar.gz')
  commands, _ = tpu.plan(['setup', '--name', 'bert-v4', *ZONE, '--tarball', tarball])
  pack, copy, install = commands
  assert pack == ['git', '-C', REPO, 'archive', '--format=tar.gz', f'--output={tarball}', 'HEAD']
  assert copy == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'scp', tarball, 'bert-v4:xlnet-bert-jax.tar.gz',
                  '--zone=us-central2-b', '--worker=all']
  assert install[:8] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', 'bert-v4', '--zone=us-central2-b',
                         '--worker=all']
  remote = remote_of(install)
  assert bash_syntax_ok(remote)
  for step in ('tar -xzf xlnet-bert-jax.tar.gz -C xlnet-bert-jax', 'python3 -m venv .venv',
               ".venv/bin/python -m pip install -q -e . 'jax[tpu]'"):
    assert step in remote
  assert 'rm -rf' not in remote


def test_setup_worktree_clean(tmp_path):
  commands, _ = tpu.plan(['setup', '--name', 'n', *ZONE, '--source', 'worktree', '--tarball', 'c.tgz', '--clean',
                          '--code-dir', 'work/code'])
  assert commands[0] == ['tar', '-C', REPO, '--exclude-vcs', '--exclude-vcs-ignores', '--exclude=./.venv', '-czf',
                         'c.tgz', '.']
  assert commands[1][6] == 'n:work/code.tar.gz'
  assert remote_of(commands[2]).startswith('set -e; rm -rf work/code; mkdir -p work/code; ')


def test_run_all_workers_env_and_quoting():
  commands, _ = tpu.plan(['run', '--name', 'bert-v4', *ZONE, '--project', 'proj-123', '--job', 'bert',
                          '--env', 'WANDB_MODE=offline', '--env', "MSG=it's $HOME; rm -rf /", '--', *TRAIN])
  (argv,) = commands
  assert argv[:9] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', 'bert-v4', '--zone=us-central2-b',
                      '--project=proj-123', '--worker=all']
  remote = remote_of(argv)
  assert bash_syntax_ok(remote)
  assert "export WANDB_MODE=offline; export MSG='it'\"'\"'s $HOME; rm -rf /'; " in remote
  assert ('setsid nohup ' + shlex.join(TRAIN) + ' > "$LOG" 2>&1 < /dev/null & echo $! > "$PIDFILE"') in remote
  assert 'LOG="$HOME"/logs/bert-worker"$W".log' in remote
  assert 'cd xlnet-bert-jax; . .venv/bin/activate' in remote
  # The printed line is one shell word per argv element.
  assert shlex.split(shlex.join(argv)) == argv


def test_run_single_worker_and_absolute_log_dir():
  (argv,), _ = tpu.plan(['run', '--name', 'n', *ZONE, '--worker', '2', '--log-dir', '/data/logs', '--', 'echo', 'x'])
  assert '--worker=2' in argv
  assert 'LOG=/data/logs/train-worker"$W".log' in remote_of(argv)


def test_status_stop_logs_delete_commands():
  describe, check = tpu.plan(['status', '--name', 'n', *ZONE, '--job', 'bert'])[0]
  assert describe == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'describe', 'n', '--zone=us-central2-b']
  assert check[:8] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', 'n', '--zone=us-central2-b', '--worker=all']
  assert 'pgrep -a -s "$P"' in remote_of(check) and bash_syntax_ok(remote_of(check))
  assert tpu.plan(['status', *ZONE, '--queued'])[0] == [
      ['gcloud', 'compute', 'tpus', 'queued-resources', 'list', '--zone=us-central2-b']]
  assert tpu.plan(['status', '--name', 'q', *ZONE, '--queued', '--describe-only'])[0] == [
      ['gcloud', 'compute', 'tpus', 'queued-resources', 'describe', 'q', '--zone=us-central2-b']]

  (stop,), _ = tpu.plan(['stop', '--name', 'n', *ZONE, '--force'])
  assert 'pkill -KILL -s "$P"' in remote_of(stop) and bash_syntax_ok(remote_of(stop))

  (logs,), _ = tpu.plan(['logs', '--name', 'n', *ZONE, '--worker', '3', '--lines', '20', '--follow'])
  assert logs[6:8] == ['--zone=us-central2-b', '--worker=3']
  assert 'tail -n 20 -F "$LOG"' in remote_of(logs) and 'train-worker3.log' in remote_of(logs)
  (fetch,), _ = tpu.plan(['logs', '--name', 'n', *ZONE, '--worker', '1', '--fetch', 'out/'])
  assert fetch == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'scp', 'n:logs/train-worker1.log', 'out/',
                   '--zone=us-central2-b', '--worker=1']

  assert tpu.plan(['delete', '--name', 'n', *ZONE])[0] == [
      ['gcloud', 'compute', 'tpus', 'tpu-vm', 'delete', 'n', '--zone=us-central2-b', '--quiet']]
  assert tpu.plan(['delete', '--name', 'n', *ZONE, '--queued'])[0] == [
      ['gcloud', 'compute', 'tpus', 'queued-resources', 'delete', 'n', '--zone=us-central2-b', '--force', '--quiet']]


def test_dry_run_prints_runnable_lines(capsys):
  argv = ['setup', '--name', 'n', *ZONE, '--tarball', '/tmp/x y.tgz', '--dry-run']
  assert tpu.main(argv) == 0
  lines = capsys.readouterr().out.splitlines()
  expected, _ = tpu.plan(argv)
  assert [shlex.split(line) for line in lines] == expected


def test_zone_from_environment(monkeypatch):
  monkeypatch.setenv('CLOUDSDK_COMPUTE_ZONE', 'europe-west4-a')
  (command,), _ = tpu.plan(['delete', '--name', 'n'])
  assert '--zone=europe-west4-a' in command


@pytest.mark.parametrize('argv, field', [
    (['create', '--name', 'Bad_Name', *ZONE, '--accelerator-type', 'v4-32'], '--name'),
    (['create', '--name=-x', *ZONE, '--accelerator-type', 'v4-32'], '--name'),
    (['create', *ZONE, '--accelerator-type', 'v4-32'], '--name'),
    (['create', '--name', 'n', '--accelerator-type', 'v4-32'], '--zone'),
    (['create', '--name', 'n', '--zone', 'nowhere', '--accelerator-type', 'v4-32'], '--zone'),
    (['create', '--name', 'n', *ZONE, '--accelerator-type', 'v9-32'], '--accelerator-type'),
    (['create', '--name', 'n', *ZONE, '--accelerator-type', 'v4-12'], '--accelerator-type'),
    (['create', '--name', 'n', *ZONE, '--accelerator-type', 'v5e-16'], '--accelerator-type'),
    (['create', '--name', 'n', *ZONE, '--accelerator-type', 'v6e-6'], '--accelerator-type'),
    (['create', '--name', 'n', *ZONE], '--accelerator-type'),
    (['create', '--name', 'n', *ZONE, '--accelerator-type', 'v4-8', '--spot', '--preemptible'], '--spot'),
    (['create', '--name', 'n', *ZONE, '--accelerator-type', 'v4-8', '--queued', '--preemptible'], '--preemptible'),
    (['create', '--name', 'n', *ZONE, '--accelerator-type', 'v4-8', '--runtime-version', 'a b'],
     '--runtime-version'),
    (['create', '--name', 'n', *ZONE, '--project', 'Bad Project', '--accelerator-type', 'v4-8'], '--project'),
    (['run', '--name', 'n', *ZONE, '--env', 'NOEQUALS', '--', 'ls'], '--env'),
    (['run', '--name', 'n', *ZONE, '--env', 'A-B=1', '--', 'ls'], '--env'),
    (['run', '--name', 'n', *ZONE], 'COMMAND'),
    (['run', '--name', 'n', *ZONE, '--job', 'a/b', '--', 'ls'], '--job'),
    (['run', '--name', 'n', *ZONE, '--worker', 'first', '--', 'ls'], '--worker'),
    (['setup', '--name', 'n', *ZONE, '--code-dir', '../escape'], '--code-dir'),
    (['setup', '--name', 'n', *ZONE, '--code-dir', '/abs'], '--code-dir'),
    (['logs', '--name', 'n', *ZONE, '--worker', 'all'], '--worker'),
    (['status', '--name', 'n', *ZONE, '--', 'ls'], 'COMMAND'),
])
def test_tpu_rejects_bad_input(argv, field, capsys):
  with pytest.raises(LaunchError) as error:
    tpu.plan(argv)
  assert error.value.field == field
  assert tpu.main(argv + ['--dry-run'] if '--' not in argv else argv) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith(f'launch.tpu: error: {field}: ') and '\n' not in err


def test_run_failure_reports_exit_status(tmp_path, monkeypatch, capsys):
  fake = tmp_path / 'gcloud'
  fake.write_text('#!/bin/sh\nexit 3\n')
  fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
  monkeypatch.setenv('PATH', f'{tmp_path}:{os.environ["PATH"]}')
  assert tpu.main(['delete', '--name', 'n', *ZONE]) == 3
  assert 'error: command: exit status 3: gcloud compute tpus tpu-vm delete n' in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------
# launch.tpu: the remote shell strings run for real against a fake worker home.

def test_remote_run_status_logs_stop_lifecycle(tmp_path):
  home, bin_dir = tmp_path / 'home', tmp_path / 'bin'
  (home / 'xlnet-bert-jax' / '.venv' / 'bin').mkdir(parents=True)
  (home / 'xlnet-bert-jax' / '.venv' / 'bin' / 'activate').write_text('export ACTIVATED=yes\n')
  bin_dir.mkdir()
  curl = bin_dir / 'curl'  # the metadata server answers "worker 0"
  curl.write_text('#!/bin/sh\necho 0\n')
  curl.chmod(0o755)
  env = dict(os.environ, HOME=str(home), PATH=f'{bin_dir}:{os.environ["PATH"]}')
  job = [sys.executable, '-c', 'import os, time; print("started", os.environ["ACTIVATED"], os.environ["MSG"]); '
                               'time.sleep(60)']

  def remote(argv):
    command = tpu.plan(argv)[0][-1]  # status describes first, then checks the workers
    return subprocess.run(['bash', '-c', remote_of(command)], cwd=home, env=env, capture_output=True, text=True,
                          timeout=30, check=False)

  base = ['--name', 'n', *ZONE, '--job', 'demo']
  pidfile = home / 'logs' / 'demo-worker0.pid'
  try:
    started = remote(['run', *base, '--env', 'MSG=a b', '--', *job])
    assert started.returncode == 0, started.stderr
    assert 'worker 0: started job demo' in started.stdout
    log = home / 'logs' / 'demo-worker0.log'
    deadline = time.time() + 20
    while 'started' not in (log.read_text() if log.exists() else '') and time.time() < deadline:
      time.sleep(0.1)
    assert log.read_text().startswith('started yes a b')

    again = remote(['run', *base, '--', *job])
    assert again.returncode == 1 and 'already running' in again.stderr

    status = remote(['status', *base])
    assert 'worker 0: job demo running' in status.stdout and 'worker 0: log: started yes a b' in status.stdout

    shown = remote(['logs', *base, '--worker', '0', '--lines', '5'])
    assert shown.returncode == 0 and 'started yes a b' in shown.stdout
    missing = remote(['logs', *base, '--worker', '7'])
    assert missing.returncode == 1 and 'no log' in missing.stderr

    stopped = remote(['stop', *base])
    assert 'worker 0: sent SIGTERM to job demo' in stopped.stdout
    deadline = time.time() + 20
    while 'not running' not in remote(['status', *base]).stdout and time.time() < deadline:
      time.sleep(0.2)
    assert 'worker 0: job demo not running' in remote(['status', *base]).stdout
  finally:
    if pidfile.exists():
      subprocess.run(['pkill', '-KILL', '-s', pidfile.read_text().strip()], check=False)


# ---------------------------------------------------------------------------------------------------------------
# launch.slurm

SLURM_BASE = ['--nodes', '4', '--gpus-per-node', '8', '--partition', 'gpu', '--time', '24:00:00',
              '--job-name', 'bert-base']


def test_sbatch_script_content():
  script, sbatch, _ = slurm.plan([*SLURM_BASE, '--account', 'proj1', '--env', 'NCCL_DEBUG=WARN',
                                  '--env', "NOTE=it's a test", '--sbatch=--exclusive', '--', *TRAIN])
  lines = script.splitlines()
  assert lines[0] == '#!/bin/bash'
  directives = [line for line in lines if line.startswith('#SBATCH')]
  assert directives == ['#SBATCH --job-name=bert-base', '#SBATCH --nodes=4', '#SBATCH --ntasks-per-node=1',
                        '#SBATCH --gpus-per-node=8', '#SBATCH --cpus-per-task=64', '#SBATCH --time=24:00:00',
                        '#SBATCH --partition=gpu', '#SBATCH --account=proj1',
                        '#SBATCH --output=slurm_logs/bert-base-%j.out', '#SBATCH --exclusive']
  assert 'COORDINATOR_HOST=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)' in lines
  assert 'export JAX_COORDINATOR_ADDRESS="$COORDINATOR_HOST:$((20000 + SLURM_JOB_ID % 20000))"' in lines
  assert 'export JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7' in lines
  assert "export NCCL_DEBUG=WARN" in lines and "export NOTE='it'\"'\"'s a test'" in lines
  srun = script[script.index('srun '):]
  assert srun.startswith('srun --nodes=4 --ntasks=4 --ntasks-per-node=1 --gpus-per-node=8 --cpus-per-task=64 '
                         '--kill-on-bad-exit=1 \\\n    --output=slurm_logs/bert-base-%j-node%t.log \\\n')
  assert ("bash -c 'export JAX_NUM_PROCESSES=\"$SLURM_NTASKS\" JAX_PROCESS_ID=\"$SLURM_PROCID\"; exec \"$@\"' bash"
          in srun)
  assert srun.rstrip().endswith(shlex.join(TRAIN))
  # The srun invocation parses back to the exact argv: wrapper, then the user's command untouched.
  words = shlex.split(srun.replace('\\\n', ' '))
  assert words[words.index('-c') + 2:] == ['bash', *TRAIN]
  assert sbatch == ['sbatch', 'slurm_logs/bert-base.sbatch']
  assert subprocess.run(['bash', '-n'], input=script, text=True, check=False).returncode == 0


def test_sbatch_gres_port_venv_cpu_only():
  script, _, _ = slurm.plan([*SLURM_BASE, '--gres', '--port', '12345', '--venv', '.venv', '--cpus-per-task', '0',
                             '--setup', 'module load cuda', '--', 'python', 'x.py'])
  assert '#SBATCH --gres=gpu:8' in script and '--gpus-per-node' not in script and '--cpus-per-task' not in script
  assert 'export JAX_COORDINATOR_ADDRESS="$COORDINATOR_HOST:12345"' in script
  assert 'source .venv/bin/activate\nmodule load cuda\n' in script
  cpu_script, _, _ = slurm.plan(['--nodes', '2', '--gpus-per-node', '0', '--partition', 'cpu', '--time',
                                 '1-00:00:00', '--job-name', 'c', '--', 'python', 'x.py'])
  assert 'gpu' not in cpu_script.replace('--partition=cpu', '') and 'JAX_LOCAL_DEVICE_IDS' not in cpu_script
  assert '#SBATCH --cpus-per-task=8' in cpu_script


def test_slurm_dry_run_prints_script_and_command(capsys, tmp_path):
  out = tmp_path / 'logs'
  assert slurm.main([*SLURM_BASE, '--output', str(out), '--dry-run', '--', 'python', 'x.py']) == 0
  printed = capsys.readouterr().out
  assert printed.startswith('#!/bin/bash\n')
  assert printed.splitlines()[-1] == f'sbatch {out}/bert-base.sbatch'
  assert not out.exists()


def test_slurm_write_and_submit(tmp_path, monkeypatch, capsys):
  out = tmp_path / 'logs'
  assert slurm.main([*SLURM_BASE, '--output', str(out), '--', 'python', 'x.py']) == 0
  written = (out / 'bert-base.sbatch').read_text()
  assert written == slurm.plan([*SLURM_BASE, '--output', str(out), '--', 'python', 'x.py'])[0]
  assert f'sbatch {out}/bert-base.sbatch' in capsys.readouterr().out

  fake = tmp_path / 'sbatch'
  fake.write_text(f'#!/bin/sh\necho "$@" > {tmp_path}/sbatch.args\necho "4242;cluster"\n')
  fake.chmod(0o755)
  monkeypatch.setenv('PATH', f'{tmp_path}:{os.environ["PATH"]}')
  assert slurm.main([*SLURM_BASE, '--output', str(out), '--submit', '--', 'python', 'x.py']) == 0
  assert (tmp_path / 'sbatch.args').read_text().strip() == f'--parsable {out}/bert-base.sbatch'
  assert f'submitted job 4242; logs: {out}/bert-base-4242-node*.log' in capsys.readouterr().out


@pytest.mark.parametrize('change, field', [
    ({'--nodes': '0'}, '--nodes'),
    ({'--gpus-per-node': '-1'}, '--gpus-per-node'),
    ({'--time': '24:00'}, '--time'),
    ({'--time': '1:61:00'}, '--time'),
    ({'--partition': 'gpu queue'}, '--partition'),
    ({'--job-name': 'my job'}, '--job-name'),
    ({'--account': 'a;b'}, '--account'),
    ({'--output': 'logs dir'}, '--output'),
    ({'--port': '80'}, '--port'),
    ({'--env': 'BAD-KEY=1'}, '--env'),
    ({'--sbatch': 'exclusive'}, '--sbatch'),
    ({'COMMAND': None}, 'COMMAND'),
])
def test_slurm_rejects_bad_input(change, field, capsys):
  argv = list(SLURM_BASE)
  for key, value in change.items():
    if key in argv:
      argv[argv.index(key) + 1] = value
    elif key != 'COMMAND':
      argv += [key, value]
  argv += [] if 'COMMAND' in change else ['--', 'python', 'x.py']
  with pytest.raises(LaunchError) as error:
    slurm.plan(argv)
  assert error.value.field == field
  assert slurm.main(argv[:argv.index('--')] + ['--dry-run'] + argv[argv.index('--'):] if '--' in argv
                    else argv + ['--dry-run']) == 2
  assert capsys.readouterr().err.startswith(f'launch.slurm: error: {field}: ')


CHILD = textwrap.dedent('''
    import os
    import sys
    from common import distributed
    distributed.initialize()
    distributed.initialize()  # idempotent
    import jax
    from jax.experimental import multihost_utils
    gathered = multihost_utils.process_allgather(jax.numpy.array([jax.process_index()]))
    # One write() of the whole line: Gloo logs to stderr (the same pipe or log file) from its own threads, and a
    # print() of several arguments under PYTHONUNBUFFERED is several writes that those logs can land between.
    fields = (jax.process_count(), jax.device_count(), jax.local_device_count(), gathered.ravel().tolist(),
              distributed.is_primary(), distributed.describe())
    os.write(1, ('RESULT ' + ' '.join(map(str, fields)) + chr(10)).encode())
    sys.exit(0 if (jax.process_count(), jax.device_count()) == (2, 4) else 1)
''')


def run_group(commands, timeout=60):
  """Starts every command in its own session; returns their (returncode, output), killing all on timeout."""
  procs = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            **kwargs) for argv, kwargs in commands]
  results = []
  try:
    for proc in procs:
      out, _ = proc.communicate(timeout=timeout)
      results.append((proc.returncode, out))
  finally:
    for proc in procs:
      if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
  return results


def test_sbatch_script_runs_two_processes_under_fake_srun(tmp_path):
  """The generated script, run with stand-ins for scontrol and srun, forms one 2-process JAX group."""
  bin_dir, out = tmp_path / 'bin', tmp_path / 'logs'
  bin_dir.mkdir()
  (bin_dir / 'scontrol').write_text('#!/bin/sh\necho localhost\necho otherhost\n')
  (bin_dir / 'srun').write_text(textwrap.dedent('''\
      #!/bin/bash
      # Stand-in for srun: starts --ntasks local copies with SLURM_PROCID / SLURM_NTASKS, logs per --output.
      n=1; out=/dev/stdout
      while [[ $# -gt 0 && $1 == --* ]]; do
        case $1 in --ntasks=*) n=${1#--ntasks=};; --output=*) out=${1#--output=};; esac
        shift
      done
      pids=()
      for ((i = 0; i < n; i++)); do
        log=$(echo "$out" | sed "s/%j/$SLURM_JOB_ID/; s/%t/$i/")
        SLURM_PROCID=$i SLURM_NTASKS=$n SLURM_LOCALID=0 "$@" > "$log" 2>&1 &
        pids+=($!)
      done
      rc=0
      for pid in "${pids[@]}"; do wait "$pid" || rc=$?; done
      exit $rc
  '''))
  for tool in ('scontrol', 'srun'):
    (bin_dir / tool).chmod(0o755)
  port = portpicker.pick_unused_port()
  script, _, _ = slurm.plan(['--nodes', '2', '--gpus-per-node', '2', '--partition', 'debug', '--time', '00:05:00',
                             '--job-name', 'pair', '--output', str(out), '--port', str(port),
                             '--env', 'XLA_FLAGS=--xla_force_host_platform_device_count=2', '--',
                             sys.executable, '-c', CHILD])
  out.mkdir()
  (out / 'pair.sbatch').write_text(script)
  env = child_env(PATH=f'{bin_dir}:{os.environ["PATH"]}', XLA_FLAGS='', SLURM_JOB_ID='4242',
                  SLURM_JOB_NODELIST='localhost,otherhost', SLURM_JOB_NUM_NODES='2')
  ((returncode, output),) = run_group([(['bash', str(out / 'pair.sbatch')], dict(env=env, cwd=tmp_path))])
  logs = [(out / f'pair-4242-node{i}.log').read_text() for i in range(2)]
  assert returncode == 0, output + '\n'.join(logs)
  assert f'coordinator localhost:{port}' in output
  for index, log in enumerate(logs):
    assert f'RESULT 2 4 2 [0, 1] {index == 0} process {index}/2' in log, log


# ---------------------------------------------------------------------------------------------------------------
# common.distributed

@pytest.mark.parametrize('nodelist, host', [
    ('node001', 'node001'), ('a1,b2', 'a1'), ('gpu[003-005,010],cpu1', 'gpu003'), ('gpu[7,9]', 'gpu7'),
    ('rack[2-3]-n[01-04]', 'rack2-n01'), ('n[1-2]-ib', 'n1-ib')])
def test_first_slurm_host(nodelist, host):
  assert distributed.first_slurm_host(nodelist) == host


def test_slurm_settings(monkeypatch):
  for key in list(os.environ):
    if key.startswith(('SLURM_', 'JAX_')):
      monkeypatch.delenv(key)
  assert distributed._slurm_settings() is None  # pylint: disable=protected-access
  monkeypatch.setenv('SLURM_JOB_ID', '20007')
  monkeypatch.setenv('SLURM_STEP_NODELIST', 'gpu[12-13]')
  monkeypatch.setenv('SLURM_NTASKS', '2')
  monkeypatch.setenv('SLURM_STEP_NUM_NODES', '2')
  monkeypatch.setenv('SLURM_PROCID', '1')
  monkeypatch.setenv('SLURM_LOCALID', '0')
  assert distributed._slurm_settings() == ('gpu12:20007', 2, 1, None)  # pylint: disable=protected-access
  monkeypatch.setenv('SLURM_NTASKS', '16')  # 8 tasks per node: one GPU each
  monkeypatch.setenv('SLURM_LOCALID', '5')
  monkeypatch.setenv('JAX_COORDINATOR_PORT', '1234')
  assert distributed._slurm_settings() == ('gpu12:1234', 16, 1, [5])  # pylint: disable=protected-access


def test_tpu_host_count_from_environment(monkeypatch):
  monkeypatch.setenv('TPU_WORKER_HOSTNAMES', 'w0,w1,w2,w3')
  monkeypatch.setenv('MEGASCALE_NUM_SLICES', '2')
  assert distributed.tpu_host_count() == 8


def test_initialize_single_process_and_refusals(monkeypatch):
  monkeypatch.setattr(distributed, '_DONE', False)
  for key in list(os.environ):
    if key.startswith(('SLURM_', 'JAX_COORDINATOR', 'JAX_NUM_PROCESSES', 'JAX_PROCESS_ID', 'TPU_WORKER')):
      monkeypatch.delenv(key)
  monkeypatch.setattr(distributed, 'tpu_host_count', lambda: 0)
  with pytest.raises(ValueError, match=r'missing num_processes \(JAX_NUM_PROCESSES\), process_id'):
    distributed.initialize(coordinator_address='localhost:1234')
  with pytest.raises(ValueError, match=r'process_id=2 is not in \[0, num_processes=2\)'):
    distributed.initialize('localhost:1234', 2, 2)
  jax.devices()  # the backend now exists: joining a group is refused instead of silently training alone
  with pytest.raises(RuntimeError, match='before any JAX computation'):
    distributed.initialize('localhost:1234', 2, 0)
  distributed.initialize()  # nothing configured: a single process, nothing to do
  assert distributed.is_primary()
  assert distributed.describe().startswith(f'process 0/1, devices {jax.local_device_count()} local / ')


def test_two_processes_from_environment():
  """Two processes on localhost, 2 fake CPU devices each, joined through the JAX_* environment."""
  port = portpicker.pick_unused_port()
  commands = [([sys.executable, '-c', CHILD],
               dict(env=child_env(JAX_COORDINATOR_ADDRESS=f'localhost:{port}', JAX_NUM_PROCESSES='2',
                                  JAX_PROCESS_ID=str(index)), cwd=REPO)) for index in range(2)]
  for index, (returncode, output) in enumerate(run_group(commands, timeout=50)):
    assert returncode == 0, output
    assert f'RESULT 2 4 2 [0, 1] {index == 0} process {index}/2, devices 2 local / 4 global, platform cpu' in output
