"""Cloud TPU VM launcher: create a slice, ship the code, run the same command on every worker, watch, delete.

  python -m launch.tpu create --name bert-v4 --zone us-central2-b --accelerator-type v4-32 [--spot] [--queued]
  python -m launch.tpu setup  --name bert-v4 --zone us-central2-b [--source head|worktree]
  python -m launch.tpu run    --name bert-v4 --zone us-central2-b [--job bert] [--env KEY=VALUE ...] -- \\
      python -m bert_jax.pretrain --config bert_jax/configs/base.py --workdir gs://BUCKET/run
  python -m launch.tpu status --name bert-v4 --zone us-central2-b [--job bert]
  python -m launch.tpu logs   --name bert-v4 --zone us-central2-b [--job bert] --worker 0 [--follow | --fetch DIR]
  python -m launch.tpu stop   --name bert-v4 --zone us-central2-b [--job bert]
  python -m launch.tpu delete --name bert-v4 --zone us-central2-b [--queued]

Every subcommand takes `--dry-run`: it prints the commands (one per line, shell-quoted, runnable as printed)
instead of running them. `--zone` falls back to $CLOUDSDK_COMPUTE_ZONE, `--project` to gcloud's configured project.

`create --queued` asks for a queued resource (the resource and its single node are both named `--name`);
`delete --queued` deletes it together with its node. `setup` packs the code (`git archive HEAD`, or the working
tree minus ignored files), copies it to every worker, unpacks it into ~/CODE_DIR, creates ~/CODE_DIR/.venv and
installs the package with `jax[tpu]`. `run` starts the command detached (setsid + nohup, so a dropped ssh
connection does not end it) in its own session on every worker, with the venv active and `--env` exported; worker
W writes ~/LOG_DIR/JOB-workerW.log and remembers the session in ~/LOG_DIR/JOB-workerW.pid, which `status` (pgrep
of that session + last log line), `logs` and `stop` (SIGTERM to the session; `--force`: SIGKILL) use. The entry
points call `common.distributed.initialize()`, which finds the other workers from the TPU metadata.
"""
from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import tempfile
from typing import Sequence

from launch.common import (SAFE_NAME, Command, LaunchError, check_match, export_lines, parse_env,
                           print_commands, require, run_commands, run_main, split_command)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

NAME = re.compile(r'[a-z](?:[-a-z0-9]{0,61}[a-z0-9])?')
ZONE = re.compile(r'[a-z]+-[a-z]+[0-9]+-[a-z]')
PROJECT = re.compile(r'(?:[a-z][-a-z0-9.]*:)?[a-z][-a-z0-9]{4,28}[a-z0-9]')
RUNTIME = re.compile(r'[a-z0-9][-a-z0-9._]*')
ACCELERATOR = re.compile(r'(v2|v3|v4|v5p|v5litepod|v6e)-([1-9][0-9]*)')
RELATIVE_PATH = re.compile(r'[A-Za-z0-9_.][A-Za-z0-9_.-]*(?:/[A-Za-z0-9_.][A-Za-z0-9_.-]*)*')
ABSOLUTE_PATH = re.compile(r'/[A-Za-z0-9_.-]+(?:/[A-Za-z0-9_.-]+)*')

# The JAX runtime images recommended per generation ("TPU software versions").
DEFAULT_RUNTIME = {
    'v2': 'tpu-ubuntu2204-base',
    'v3': 'tpu-ubuntu2204-base',
    'v4': 'tpu-ubuntu2204-base',
    'v5p': 'v2-alpha-tpuv5',
    'v5litepod': 'v2-alpha-tpuv5-lite',
    'v6e': 'v2-alpha-tpuv6e',
}

# This worker's index in the slice (TPU VM metadata), falling back to the host name.
WORKER_ID = ("W=$(curl -sf -H 'Metadata-Flavor: Google' "
             'http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number '
             '|| hostname)')


# ---------------------------------------------------------------------------------------------------------------
# Validation.

def parse_accelerator(value: str | None) -> tuple[str, int]:
  """'v4-32' -> ('v4', 32). The number counts TensorCores for v2-v5p and chips for v5litepod / v6e."""
  if value and value.startswith('v5e-'):
    raise LaunchError('--accelerator-type', f'{value!r} is invalid; TPU v5e is spelled v5litepod-N (v5litepod-16)')
  check_match(value, ACCELERATOR, '--accelerator-type',
              'GENERATION-SIZE with GENERATION in v2, v3, v4, v5p, v5litepod, v6e (e.g. v4-32, v5litepod-16, v5p-128)')
  generation, size = ACCELERATOR.fullmatch(value).groups()
  size = int(size)
  if generation in ('v5litepod', 'v6e'):
    require(size in (1, 4, 8) or size % 16 == 0, '--accelerator-type',
            f'{value!r} is invalid; {generation} sizes are 1, 4, 8 or a multiple of 16')
  else:
    require(size % 8 == 0, '--accelerator-type', f'{value!r} is invalid; {generation} sizes are multiples of 8')
  return generation, size


def check_target(args: argparse.Namespace, name_required: bool = True) -> None:
  if name_required or args.name is not None:
    check_match(args.name, NAME, '--name',
                'lowercase letters, digits and hyphens, starting with a letter, at most 63 characters')
  if not args.zone:
    raise LaunchError('--zone', 'missing; pass --zone (e.g. us-central2-b) or set CLOUDSDK_COMPUTE_ZONE')
  check_match(args.zone, ZONE, '--zone', 'a zone such as us-central2-b or europe-west4-a')
  if args.project is not None:
    check_match(args.project, PROJECT, '--project', 'a Google Cloud project id such as my-project-123')


def check_job(args: argparse.Namespace) -> None:
  check_match(args.job, SAFE_NAME, '--job', 'letters, digits, ".", "_" and "-", starting with a letter or digit')
  check_match(args.code_dir, RELATIVE_PATH, '--code-dir', 'a path relative to the remote home directory')
  require('..' not in args.code_dir.split('/'), '--code-dir', f'{args.code_dir!r} must not contain ".."')
  if not ABSOLUTE_PATH.fullmatch(args.log_dir):
    check_match(args.log_dir, RELATIVE_PATH, '--log-dir', 'a path relative to the remote home directory, or absolute')


def check_worker(value: str, allow_all: bool = True) -> str:
  if allow_all and value == 'all':
    return value
  check_match(value, r'[0-9]+', '--worker', 'a worker index 0, 1, ...' + (' or all' if allow_all else ''))
  return str(int(value))


# ---------------------------------------------------------------------------------------------------------------
# Command builders.

def gcloud(group: str, verb: str, *positional: str) -> Command:
  return ['gcloud', 'compute', 'tpus', group, verb, *positional]


def location(args: argparse.Namespace) -> list[str]:
  return [f'--zone={args.zone}'] + ([f'--project={args.project}'] if args.project else [])


def ssh(args: argparse.Namespace, worker: str, remote: str) -> Command:
  """`gcloud ... tpu-vm ssh` running the shell string `remote` on one worker or all."""
  return gcloud('tpu-vm', 'ssh', args.name) + location(args) + [f'--worker={worker}', f'--command={remote}']


def remote_path(path: str) -> str:
  """A remote path as shell text: relative paths are anchored at the remote home directory."""
  return shlex.quote(path) if path.startswith('/') else '"$HOME"/' + shlex.quote(path)


def job_files(args: argparse.Namespace, worker: str = '"$W"') -> str:
  """Shell statements setting LOG and PIDFILE for `worker` (shell text; "$W" = this worker)."""
  base = f'{remote_path(args.log_dir)}/{shlex.quote(args.job)}-worker{worker}'
  return f'LOG={base}.log; PIDFILE={base}.pid'


def build_create(args: argparse.Namespace) -> list[Command]:
  check_target(args)
  generation, _ = parse_accelerator(args.accelerator_type)
  runtime = args.runtime_version or DEFAULT_RUNTIME[generation]
  check_match(runtime, RUNTIME, '--runtime-version', 'a TPU software version such as tpu-ubuntu2204-base')
  require(not (args.spot and args.preemptible), '--spot', '--spot and --preemptible exclude each other')
  for flag in args.gcloud_flag:
    require(flag.startswith('--') and '\n' not in flag, '--gcloud-flag', f'{flag!r} is not a --flag[=value]')
  if args.queued:
    require(not args.preemptible, '--preemptible', 'queued resources take --spot, not --preemptible')
    command = gcloud('queued-resources', 'create', args.name) + location(args) + [
        f'--node-id={args.name}', f'--accelerator-type={args.accelerator_type}', f'--runtime-version={runtime}']
  else:
    command = gcloud('tpu-vm', 'create', args.name) + location(args) + [
        f'--accelerator-type={args.accelerator_type}', f'--version={runtime}']
  command += ['--spot'] if args.spot else []
  command += ['--preemptible'] if args.preemptible else []
  return [command + list(args.gcloud_flag)]


def build_setup(args: argparse.Namespace) -> list[Command]:
  check_target(args)
  check_job(args)
  check_match(args.python, r'[A-Za-z0-9_./-]+', '--python', 'a python executable such as python3 or python3.11')
  require(bool(args.jax.strip()) and '\n' not in args.jax, '--jax', 'missing; a pip requirement such as jax[tpu]')
  source_dir = os.path.abspath(args.source_dir)
  tarball = args.tarball or os.path.join(tempfile.gettempdir(), f'{args.name}-code.tar.gz')
  if args.source == 'head':
    pack = ['git', '-C', source_dir, 'archive', '--format=tar.gz', f'--output={tarball}', 'HEAD']
  else:
    pack = ['tar', '-C', source_dir, '--exclude-vcs', '--exclude-vcs-ignores', '--exclude=./.venv', '-czf',
            tarball, '.']
  remote_tar = f'{args.code_dir}.tar.gz'
  copy = gcloud('tpu-vm', 'scp', tarball, f'{args.name}:{remote_tar}') + location(args) + ['--worker=all']
  code, python = shlex.quote(args.code_dir), shlex.quote(args.python)
  install = [
      'set -e',
      *([f'rm -rf {code}'] if args.clean else []),
      f'mkdir -p {code}',
      f'tar -xzf {shlex.quote(remote_tar)} -C {code}',
      f'rm -f {shlex.quote(remote_tar)}',
      f'cd {code}',
      # TPU images may lack ensurepip; install python3-venv once if venv creation fails.
      f'if [ ! -x .venv/bin/python ]; then {python} -m venv .venv || {{ sudo apt-get update -qq && '
      f'sudo apt-get install -y -qq python3-venv && {python} -m venv .venv; }}; fi',
      '.venv/bin/python -m pip install -q --upgrade pip',
      f'.venv/bin/python -m pip install -q -e . {shlex.quote(args.jax)}',
      '.venv/bin/python -c \'import jax; print("jax", jax.__version__)\'',
  ]
  return [pack, copy, ssh(args, 'all', '; '.join(install))]


def build_run(args: argparse.Namespace) -> list[Command]:
  check_target(args)
  check_job(args)
  worker = check_worker(args.worker)
  env = [('PYTHONUNBUFFERED', '1')] + parse_env(args.env)
  command = list(args.command)
  require(bool(command), 'COMMAND', 'missing; put the command after --, e.g. -- python -m bert_jax.pretrain ...')
  job = shlex.quote(args.job)
  remote = '; '.join([
      'set -e',
      WORKER_ID,
      f'mkdir -p {remote_path(args.log_dir)}',
      job_files(args),
      'if [ -f "$PIDFILE" ] && pgrep -s "$(cat "$PIDFILE")" > /dev/null; then '
      f'echo "worker $W: job {job} is already running (session $(cat "$PIDFILE")); stop it first" >&2; exit 1; fi',
      f'cd {shlex.quote(args.code_dir)}',
      '. .venv/bin/activate',
      *export_lines(env),
      f'setsid nohup {shlex.join(command)} > "$LOG" 2>&1 < /dev/null & echo $! > "$PIDFILE"',
      f'echo "worker $W: started job {job} (session $(cat "$PIDFILE")), log $LOG"',
  ])
  return [ssh(args, worker, remote)]


def build_stop(args: argparse.Namespace) -> list[Command]:
  check_target(args)
  check_job(args)
  worker = check_worker(args.worker)
  signal = 'KILL' if args.force else 'TERM'
  job = shlex.quote(args.job)
  remote = '; '.join([
      WORKER_ID,
      job_files(args),
      'P=$(cat "$PIDFILE" 2>/dev/null || true)',
      f'if [ -n "$P" ] && pgrep -s "$P" > /dev/null; then pkill -{signal} -s "$P"; '
      f'echo "worker $W: sent SIG{signal} to job {job} (session $P)"; '
      f'else echo "worker $W: job {job} is not running"; fi',
  ])
  return [ssh(args, worker, remote)]


def build_status(args: argparse.Namespace) -> list[Command]:
  check_target(args, name_required=False)
  group = 'queued-resources' if args.queued else 'tpu-vm'
  if args.name is None:
    return [gcloud(group, 'list') + location(args)]
  commands = [gcloud(group, 'describe', args.name) + location(args)]
  if args.describe_only:
    return commands
  check_job(args)
  job = shlex.quote(args.job)
  remote = '; '.join([
      WORKER_ID,
      job_files(args),
      'P=$(cat "$PIDFILE" 2>/dev/null || true)',
      f'if [ -n "$P" ] && pgrep -s "$P" > /dev/null; then echo "worker $W: job {job} running (session $P)"; '
      'pgrep -a -s "$P" | sed "s|^|worker $W:   |"; '
      f'else echo "worker $W: job {job} not running"; fi',
      'if [ -f "$LOG" ]; then tail -n 1 "$LOG" | sed "s|^|worker $W: log: |"; fi',
  ])
  return commands + [ssh(args, check_worker(args.worker), remote)]


def build_logs(args: argparse.Namespace) -> list[Command]:
  check_target(args)
  check_job(args)
  worker = check_worker(args.worker, allow_all=False)
  require(args.lines > 0, '--lines', f'{args.lines} must be positive')
  log_name = f'{args.job}-worker{worker}.log'
  if args.fetch:
    source = f'{args.name}:{args.log_dir}/{log_name}'  # relative paths are relative to the remote home
    return [gcloud('tpu-vm', 'scp', source, args.fetch) + location(args) + [f'--worker={worker}']]
  tail = ['tail', '-n', str(args.lines)] + (['-F'] if args.follow else [])
  remote = '; '.join([
      job_files(args, worker),
      f'if [ -f "$LOG" ]; then {shlex.join(tail)} "$LOG"; '
      f'else echo "worker {worker}: no log $LOG; present:" >&2; ls {remote_path(args.log_dir)} >&2; exit 1; fi',
  ])
  return [ssh(args, worker, remote)]


def build_delete(args: argparse.Namespace) -> list[Command]:
  check_target(args)
  if args.queued:
    return [gcloud('queued-resources', 'delete', args.name) + location(args) + ['--force', '--quiet']]
  return [gcloud('tpu-vm', 'delete', args.name) + location(args) + ['--quiet']]


BUILDERS = {
    'create': build_create,
    'setup': build_setup,
    'run': build_run,
    'stop': build_stop,
    'status': build_status,
    'logs': build_logs,
    'delete': build_delete,
}


# ---------------------------------------------------------------------------------------------------------------
# Command line.

def make_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog='python -m launch.tpu', description=__doc__.split('\n', 1)[0], epilog=__doc__.split('\n', 1)[1],
                                   formatter_class=argparse.RawTextHelpFormatter)
  sub = parser.add_subparsers(dest='subcommand', required=True, metavar='SUBCOMMAND')

  target = argparse.ArgumentParser(add_help=False)
  target.add_argument('--name', help='TPU VM name (and queued resource id)')
  target.add_argument('--zone', default=os.environ.get('CLOUDSDK_COMPUTE_ZONE'),
                      help='e.g. us-central2-b (default: $CLOUDSDK_COMPUTE_ZONE)')
  target.add_argument('--project', help="Google Cloud project (default: gcloud's configured project)")
  target.add_argument('--dry-run', '--dry_run', action='store_true', help='print the commands instead of running them')

  job = argparse.ArgumentParser(add_help=False)
  job.add_argument('--job', default='train', help='job name: log and pid files are LOG_DIR/JOB-workerW.{log,pid}')
  job.add_argument('--code-dir', default='xlnet-bert-jax', help='remote code directory, relative to home')
  job.add_argument('--log-dir', default='logs', help='remote log directory (relative to home, or absolute)')

  create = sub.add_parser('create', parents=[target], help='create a TPU VM slice or a queued resource')
  create.add_argument('--accelerator-type', help='e.g. v4-32, v5litepod-16, v5p-128, v6e-8')
  create.add_argument('--runtime-version', help='TPU software version (default: the JAX image for the generation)')
  create.add_argument('--spot', action='store_true', help='Spot capacity (preemptible at any time)')
  create.add_argument('--preemptible', action='store_true', help='legacy preemptible TPU VM (not with --queued)')
  create.add_argument('--queued', action='store_true', help='request a queued resource instead of a direct create')
  create.add_argument('--gcloud-flag', action='append', default=[],
                      help='extra flag passed to gcloud create, e.g. --gcloud-flag=--reserved (repeatable)')

  setup = sub.add_parser('setup', parents=[target, job], help='copy the code to every worker and install it')
  setup.add_argument('--source', choices=('head', 'worktree'), default='head',
                     help='head: git archive HEAD (committed code); worktree: the working tree minus ignored files')
  setup.add_argument('--source-dir', default=REPO_ROOT, help='local repository root (default: this checkout)')
  setup.add_argument('--tarball', help='local path of the packed code (default: TMPDIR/NAME-code.tar.gz)')
  setup.add_argument('--python', default='python3', help='remote python used to create the venv')
  setup.add_argument('--jax', default='jax[tpu]', help='pip requirement installing JAX for TPU')
  setup.add_argument('--clean', action='store_true', help='remove the remote code directory (and venv) first')

  run = sub.add_parser('run', parents=[target, job], help='start a command on every worker, detached',
                       usage='python -m launch.tpu run --name NAME --zone ZONE [options] -- COMMAND ...')
  run.add_argument('--env', action='append', default=[], metavar='KEY=VALUE', help='exported remotely (repeatable)')
  run.add_argument('--worker', default='all', help='all (default) or one worker index')

  stop = sub.add_parser('stop', parents=[target, job], help="end a job's processes on every worker")
  stop.add_argument('--worker', default='all', help='all (default) or one worker index')
  stop.add_argument('--force', action='store_true', help='SIGKILL instead of SIGTERM')

  status = sub.add_parser('status', parents=[target, job], help='describe the slice and the job on every worker')
  status.add_argument('--queued', action='store_true', help='describe / list queued resources')
  status.add_argument('--describe-only', action='store_true', help='skip the per-worker job check')
  status.add_argument('--worker', default='all', help='all (default) or one worker index')

  logs = sub.add_parser('logs', parents=[target, job], help="show or fetch one worker's log")
  logs.add_argument('--worker', default='0', help='worker index (default 0)')
  logs.add_argument('--lines', type=int, default=100, help='lines to show (default 100)')
  logs.add_argument('--follow', action='store_true', help='keep following the log (tail -F)')
  logs.add_argument('--fetch', metavar='DEST', help='copy the log file to DEST locally instead of showing it')

  delete = sub.add_parser('delete', parents=[target], help='delete the slice (or the queued resource and its node)')
  delete.add_argument('--queued', action='store_true', help='delete a queued resource and its node')
  return parser


def plan(argv: Sequence[str]) -> tuple[list[Command], argparse.Namespace]:
  """Parses `argv` and returns the commands the subcommand would run (raises LaunchError on bad input).

  Everything after the first `--` is the command of `run`, passed through untouched.
  """
  options, command = split_command(argv)
  args = make_parser().parse_args(options)
  args.command = command
  require(args.subcommand == 'run' or not command, 'COMMAND',
          f'only run takes a command after --, not {args.subcommand}')
  return BUILDERS[args.subcommand](args), args


def main(argv: Sequence[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else argv

  def body():
    commands, args = plan(argv)
    if args.dry_run:
      print_commands(commands)
      return
    if args.subcommand == 'setup' and args.source == 'head':
      dirty = subprocess.run(['git', '-C', os.path.abspath(args.source_dir), 'status', '--porcelain',
                              '--untracked-files=no'], capture_output=True, text=True, check=False).stdout
      if dirty.strip():
        print('launch.tpu: warning: uncommitted changes are not shipped with --source head '
              '(use --source worktree to ship them)', file=sys.stderr)
    run_commands(commands)

  return run_main('launch.tpu', body)


if __name__ == '__main__':
  sys.exit(main())
