"""SLURM launcher: writes an sbatch script that runs one JAX process per node on N GPU nodes.

  python -m launch.slurm --nodes 4 --gpus-per-node 8 --partition gpu --time 24:00:00 --job-name bert-base \\
      [--account A] [--output slurm_logs] [--env KEY=VALUE ...] [--venv .venv] [--dry-run | --submit] -- \\
      python -m bert_jax.pretrain --config bert_jax/configs/base.py --workdir /shared/runs/bert-base

`--dry-run` prints the script and the sbatch command without writing anything; `--submit` writes the script to
OUTPUT/JOB_NAME.sbatch (or `--script`) and submits it; with neither, the script is written and the command printed.

The script asks for N nodes with one task each, resolves the coordinator as the first host of the allocation
(`scontrol show hostnames`) and a port (`--port`, or derived from the job id), exports JAX_COORDINATOR_ADDRESS and
JAX_LOCAL_DEVICE_IDS (all of the node's GPUs), then `srun`s the command; each task sets JAX_NUM_PROCESSES and
JAX_PROCESS_ID from its own SLURM_NTASKS / SLURM_PROCID, which `common.distributed.initialize()` reads. Task t
writes OUTPUT/JOB_NAME-JOBID-node<t>.log; the batch script itself OUTPUT/JOB_NAME-JOBID.out. The first failing
task ends the whole step (--kill-on-bad-exit). Relative paths resolve against the directory sbatch runs in
(`--chdir` to fix one).
"""
from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
from typing import Sequence

from launch.common import (SAFE_NAME, LaunchError, check_match, export_lines, format_command, parse_env, require,
                           run_main, split_command)

TIME = re.compile(r'(?:[0-9]+-)?[0-9]+:[0-5][0-9]:[0-5][0-9]')
PARTITION = re.compile(r'[A-Za-z0-9_.-]+(?:,[A-Za-z0-9_.-]+)*')
ACCOUNT = re.compile(r'[A-Za-z0-9_.-]+')
PATH = re.compile(r'[A-Za-z0-9_./+-]+')

# Same formula as common.distributed.slurm_port: a per-job port in 20000..39999.
DEFAULT_PORT = '$((20000 + SLURM_JOB_ID % 20000))'

# Runs in every task: SLURM_PROCID / SLURM_NTASKS differ per task, so they are read there, then the command is
# exec'd with its arguments untouched ("$@").
TASK_WRAPPER = 'export JAX_NUM_PROCESSES="$SLURM_NTASKS" JAX_PROCESS_ID="$SLURM_PROCID"; exec "$@"'


def validate(args: argparse.Namespace) -> None:
  require(args.nodes is not None and args.nodes >= 1, '--nodes', f'{args.nodes} must be a positive integer')
  require(args.gpus_per_node is not None and args.gpus_per_node >= 0, '--gpus-per-node',
          f'{args.gpus_per_node} must be a non-negative integer')
  require(args.cpus_per_task is None or args.cpus_per_task >= 0, '--cpus-per-task',
          f'{args.cpus_per_task} must be a non-negative integer (0 leaves it out)')
  check_match(args.partition, PARTITION, '--partition', 'a partition name such as gpu (or a comma-separated list)')
  check_match(args.time, TIME, '--time', 'HH:MM:SS or D-HH:MM:SS, e.g. 24:00:00')
  check_match(args.job_name, SAFE_NAME, '--job-name', 'letters, digits, ".", "_" and "-", starting with a letter or digit')
  if args.account is not None:
    check_match(args.account, ACCOUNT, '--account', 'an account name such as proj123')
  check_match(args.output, PATH, '--output', 'a directory path of letters, digits and ._/+- (no spaces)')
  for field, value in (('--script', args.script), ('--chdir', args.chdir), ('--venv', args.venv)):
    if value is not None:
      check_match(value, PATH, field, 'a path of letters, digits and ._/+- (no spaces)')
  require(args.port is None or 1024 <= args.port <= 65535, '--port', f'{args.port} is not in 1024..65535')
  for option in args.sbatch:
    require(bool(re.fullmatch(r'--[a-z][-a-z]*(?:=[^\n]*)?', option)), '--sbatch',
            f'{option!r} is not an sbatch --option[=value]')
  for line in args.setup:
    require('\n' not in line, '--setup', 'one shell line per --setup')
  require(bool(args.command), 'COMMAND', 'missing; put the command after --, e.g. -- python -m bert_jax.pretrain ...')


def cpus_per_task(args: argparse.Namespace) -> int:
  """`--cpus-per-task`, default 8 per GPU (8 for a CPU-only node); 0 = leave it to the cluster's default."""
  if args.cpus_per_task is not None:
    return args.cpus_per_task
  return 8 * max(1, args.gpus_per_node)


def gpu_option(args: argparse.Namespace) -> list[str]:
  if args.gpus_per_node == 0:
    return []
  return [f'--gres=gpu:{args.gpus_per_node}'] if args.gres else [f'--gpus-per-node={args.gpus_per_node}']


def build_script(args: argparse.Namespace) -> str:
  """The sbatch script text (validated inputs; every user value is shell-quoted)."""
  cpus = cpus_per_task(args)
  output = args.output.rstrip('/') or '/'
  directives = [
      f'--job-name={args.job_name}',
      f'--nodes={args.nodes}',
      '--ntasks-per-node=1',
      *gpu_option(args),
      *([f'--cpus-per-task={cpus}'] if cpus else []),
      f'--time={args.time}',
      f'--partition={args.partition}',
      *([f'--account={args.account}'] if args.account else []),
      f'--output={output}/{args.job_name}-%j.out',
      *([f'--chdir={args.chdir}'] if args.chdir else []),
      *args.sbatch,
  ]
  srun = [  # one line each: srun's options, its per-node log, the per-task wrapper, the user's command
      ['srun', f'--nodes={args.nodes}', f'--ntasks={args.nodes}', '--ntasks-per-node=1', *gpu_option(args),
       *([f'--cpus-per-task={cpus}'] if cpus else []), '--kill-on-bad-exit=1'],
      [f'--output={output}/{args.job_name}-%j-node%t.log'],
      ['bash', '-c', TASK_WRAPPER, 'bash'],
      list(args.command),
  ]
  port = str(args.port) if args.port else DEFAULT_PORT
  lines = [
      '#!/bin/bash',
      '# Written by `python -m launch.slurm`: one JAX process per node, all nodes in one process group.',
      *[f'#SBATCH {directive}' for directive in directives],
      'set -eu',
      '',
  ]
  if args.venv:
    lines += [f'source {shlex.quote(args.venv)}/bin/activate']
  lines += list(args.setup)
  lines += export_lines(parse_env(args.env))
  lines += [
      '',
      '# The coordinator is the first node of the allocation; every task connects to it.',
      'COORDINATOR_HOST=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
      f'export JAX_COORDINATOR_ADDRESS="$COORDINATOR_HOST:{port}"',
  ]
  if args.gpus_per_node:
    lines += ['# One process per node drives all of its GPUs.',
              f'export JAX_LOCAL_DEVICE_IDS={",".join(str(i) for i in range(args.gpus_per_node))}']
  lines += [
      'echo "job $SLURM_JOB_ID: $SLURM_JOB_NUM_NODES nodes ($SLURM_JOB_NODELIST), '
      'coordinator $JAX_COORDINATOR_ADDRESS"',
      '',
      ' \\\n    '.join(shlex.join(part) for part in srun),
      '',
  ]
  return '\n'.join(lines)


def script_path(args: argparse.Namespace) -> str:
  return args.script or os.path.join(args.output, f'{args.job_name}.sbatch')


def sbatch_command(args: argparse.Namespace) -> list[str]:
  return ['sbatch', '--parsable', script_path(args)] if args.submit else ['sbatch', script_path(args)]


def make_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog='python -m launch.slurm',
                                   usage='%(prog)s --nodes N --gpus-per-node G --partition P --time HH:MM:SS '
                                         '--job-name NAME [options] -- COMMAND ...',
                                   description=__doc__.split('\n', 1)[0], epilog=__doc__.split('\n', 1)[1],
                                   formatter_class=argparse.RawTextHelpFormatter)
  parser.add_argument('--nodes', type=int, required=True, help='number of nodes (one JAX process each)')
  parser.add_argument('--gpus-per-node', type=int, required=True, help='GPUs per node (0: CPU-only)')
  parser.add_argument('--partition', required=True, help='SLURM partition')
  parser.add_argument('--time', required=True, help='wall-clock limit, HH:MM:SS or D-HH:MM:SS')
  parser.add_argument('--job-name', required=True, help='job name (also names the script and logs)')
  parser.add_argument('--account', help='account to charge')
  parser.add_argument('--output', default='slurm_logs', help='directory for the script and logs (default slurm_logs)')
  parser.add_argument('--script', help='where to write the script (default OUTPUT/JOB_NAME.sbatch)')
  parser.add_argument('--cpus-per-task', type=int, help='CPUs per task (default 8 per GPU; 0 leaves it out)')
  parser.add_argument('--gres', action='store_true', help='ask for GPUs with --gres=gpu:G instead of --gpus-per-node')
  parser.add_argument('--port', type=int, help='coordinator port (default 20000 + SLURM_JOB_ID %% 20000)')
  parser.add_argument('--chdir', help='working directory of the job (default: where sbatch runs)')
  parser.add_argument('--env', action='append', default=[], metavar='KEY=VALUE', help='exported in the job (repeatable)')
  parser.add_argument('--venv', help='virtual environment to activate first, e.g. .venv')
  parser.add_argument('--setup', action='append', default=[], metavar='LINE',
                      help='shell line run before srun, verbatim, e.g. "module load cuda" (repeatable)')
  parser.add_argument('--sbatch', action='append', default=[], metavar='--OPTION[=VALUE]',
                      help='extra #SBATCH directive, e.g. --sbatch=--exclusive (repeatable)')
  mode = parser.add_mutually_exclusive_group()
  mode.add_argument('--dry-run', '--dry_run', action='store_true',
                    help='print the script and the sbatch command; write nothing')
  mode.add_argument('--submit', action='store_true', help='write the script and submit it with sbatch')
  return parser


def plan(argv: Sequence[str]) -> tuple[str, list[str], argparse.Namespace]:
  """(script text, sbatch argv, parsed args) for `argv`; raises LaunchError on bad input."""
  options, command = split_command(argv)
  args = make_parser().parse_args(options)
  args.command = command
  validate(args)
  return build_script(args), sbatch_command(args), args


def main(argv: Sequence[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else argv

  def body():
    script, sbatch, args = plan(argv)
    path = script_path(args)
    if args.dry_run:
      sys.stdout.write(script)
      print(f'### end of {path} (not written: --dry-run) ###')
      print(format_command(sbatch))
      return
    # SLURM does not create the log directory itself; it resolves it against the job's working directory.
    os.makedirs(os.path.join(args.chdir or '', args.output), exist_ok=True)
    if os.path.dirname(path):
      os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'w', encoding='utf-8') as f:
      f.write(script)
    os.chmod(path, 0o755)
    if not args.submit:
      print(f'wrote {path}; submit with:\n{format_command(sbatch)}')
      return
    try:
      result = subprocess.run(sbatch, capture_output=True, text=True, check=False)
    except FileNotFoundError:
      raise LaunchError('sbatch', 'not found on PATH (run this on a SLURM login node)', exit_code=127) from None
    if result.returncode != 0:
      message = (result.stderr or result.stdout).strip().replace('\n', ' ')
      raise LaunchError('sbatch', f'exit status {result.returncode}: {message}', exit_code=result.returncode)
    job_id = result.stdout.strip().split(';')[0]
    print(f'submitted job {job_id}; logs: {args.output}/{args.job_name}-{job_id}-node*.log')

  return run_main('launch.slurm', body)


if __name__ == '__main__':
  sys.exit(main())
