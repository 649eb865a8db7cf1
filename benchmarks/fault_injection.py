"""Fault injection for a maintainer's longer run: random SIGKILLs and random checkpoint corruptions.

  python -m benchmarks.fault_injection                            # 6 kills, 6 corruptions, tiny BERT, minutes
  python -m benchmarks.fault_injection --kills 20 --corruptions 10 --model xlnet --seed 3 --workdir /tmp/fi

It runs the real entry point (`python -m bert_jax.pretrain` / `xlnet_jax.pretrain`, the tiny test config on 2 fake
CPU devices with FSDP, under `tests/drivers/recorded_run.py`) and checks every restart against a straight run that
kept a checkpoint of every step:

* kills: a run that saves every step is killed with SIGKILL at a random moment (start-up, or between 0 and 0.8 s
  after a logged step, so most kills land during an asynchronous save), again and again. Each restart must say it
  resumed from the newest complete checkpoint that was on disk, and that checkpoint must be bitwise equal to the
  straight run's at the same step. The last run goes to the end and must equal the straight run bitwise.
* corruptions: a finished workdir keeps its last 3 steps; the newest is damaged at random (bytes flipped in, or a
  truncation, zeroing or deletion of, its largest file half the time, any of its files otherwise) and the run is
  restarted (a detected step means resuming from the one before and training the last step again). It must either move the damaged step aside and
  resume from the one before, or (when the damage hit bytes that are never read) restore values equal to the
  straight run's; either way it must end bitwise equal to the straight run.

The first line printed at the end is the summary:
  kills N, resumed R/S, corrupt detected D/M, bitwise equal E/T
(S: restarts that found a checkpoint and got as far as restoring; M: corruptions whose bytes the restore reads),
followed by one line per event. Exit status 0 when every check held.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import random
import shutil
import signal
import sys
import time
from typing import Any, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

from tests.drivers import harness  # noqa: E402  pylint: disable=wrong-import-position

MESH = ['--config.mesh.data=1', '--config.mesh.fsdp=2']
DAMAGE_KINDS = ('flip', 'truncate', 'zero', 'delete')


class Root:
  """What `harness.prepared_data` needs of pytest's tmp_path_factory."""

  def __init__(self, path):
    self.path = path

  def getbasetemp(self):
    import pathlib  # pylint: disable=import-outside-toplevel
    return pathlib.Path(self.path)


def equal(a, b) -> bool:
  try:
    harness.assert_trees_equal(a, b, 'state')
    return True
  except AssertionError:
    return False


def damage(step_dir: str, rng: random.Random) -> str:
  files = sorted(os.path.join(r, f) for r, _, fs in os.walk(step_dir) for f in fs)
  # Half the time the largest file (the arrays' bytes), otherwise any file of the step: many of those (superseded
  # index nodes, metadata the restore does not need) are never read, which the summary reports as harmless.
  path = max(files, key=os.path.getsize) if rng.random() < 0.5 else rng.choice(files)
  kind = rng.choice(DAMAGE_KINDS)
  size = os.path.getsize(path)
  if kind == 'flip' and size:
    data = bytearray(open(path, 'rb').read())
    for i in rng.sample(range(size), min(size, rng.choice([1, 8, 64]))):
      data[i] ^= 1 << rng.randrange(8)
    open(path, 'wb').write(bytes(data))
  elif kind == 'truncate':
    open(path, 'r+b').truncate(rng.randrange(size) if size else 0)
  elif kind == 'zero':
    open(path, 'wb').write(b'\0' * size)
  else:
    kind = 'delete'
    os.remove(path)
  return f'{kind} {os.path.relpath(path, step_dir)}'


@dataclasses.dataclass
class Campaign:
  """One fault-injection campaign: where, with what, and what was seen."""
  args: argparse.Namespace
  rng: random.Random
  env: dict
  data: Any
  steps: int
  base: list
  events: list = dataclasses.field(default_factory=list)
  restarts: int = 0
  resumed: int = 0
  compared: int = 0
  equal_count: int = 0
  detected: int = 0
  harmless: int = 0

  def log(self, name: str) -> str:
    return os.path.join(self.args.workdir, f'{name}.log')

  def argv(self, workdir: str, extra: Sequence[str] = (), **kwargs) -> list:
    return harness.train_argv(self.args.model, workdir, self.data, self.base + list(extra), **kwargs)


def _straight(c: Campaign) -> dict | None:
  """The reference run, every step kept: {step: state}, or None when it failed."""
  straight = os.path.join(c.args.workdir, 'straight')
  shutil.rmtree(straight, ignore_errors=True)
  code, out = harness.run_to_end(c.argv(straight, [f'--config.keep_checkpoints={c.steps}']), c.env,
                                 c.log('straight'))
  if code != 0:
    print(out[-3000:])
    return None
  return {s: harness.restore_state(straight, s) for s in harness.checkpoint_steps(straight)}


def _one_kill(c: Campaign, run: 'harness.Run', killed: str, before: list, offset: int, last: bool) -> str:
  if last:
    return f'final run exit {run.wait(300)}'
  if c.rng.random() < 0.25:
    time.sleep(c.rng.uniform(0.5, 6.0))
    what = 'killed during start-up'
  else:
    harness.wait_for_step(run, killed, (before[-1] if before else 0) + 2, timeout=200, offset=offset)
    time.sleep(c.rng.uniform(0.0, 0.8))
    what = 'killed while training'
  run.signal(signal.SIGKILL)
  run.wait(30)
  return what


def _kills(c: Campaign, reference: dict) -> None:
  """SIGKILLs at random moments, each followed by a restart; the newest checkpoint must equal the reference's."""
  killed = os.path.join(c.args.workdir, 'killed')
  shutil.rmtree(killed, ignore_errors=True)
  argv = c.argv(killed, step_delay=0.05)
  metrics = os.path.join(killed, 'metrics.jsonl')
  for attempt in range(c.args.kills + 1):
    before = harness.checkpoint_steps(killed)
    offset = harness.file_size(metrics)
    run = harness.Run(argv, c.env, c.log(f'kill{attempt}'))
    try:
      what = _one_kill(c, run, killed, before, offset, attempt == c.args.kills)
    finally:
      run.cleanup()
    output = run.output()
    if before and ('resumed from step' in output or harness.metric_steps(killed, offset)):
      c.restarts += 1
      if f'resumed from step {before[-1]}' in output:
        c.resumed += 1
      else:
        c.events.append(f'attempt {attempt}: did NOT resume from step {before[-1]}')
    after = harness.checkpoint_steps(killed)
    if after:
      c.compared += 1
      same = equal(harness.restore_state(killed), reference[after[-1]])
      c.equal_count += same
      what += f', newest checkpoint {after[-1]} {"equal" if same else "DIFFERENT"}'
    c.events.append(f'attempt {attempt}: {what}; checkpoints before {before[-1:]} after {after[-1:]}')


def _corruptions(c: Campaign, reference: dict) -> None:
  """Damaged newest checkpoints: each must be moved aside (or never read) and the run end equal to the reference."""
  straight = os.path.join(c.args.workdir, 'straight')
  for i in range(c.args.corruptions):
    work = os.path.join(c.args.workdir, f'corrupt{i}')
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(straight, work)
    for name in os.listdir(os.path.join(work, 'checkpoints')):
      if name.isdigit() and int(name) < c.steps - 2:
        shutil.rmtree(os.path.join(work, 'checkpoints', name))
    how = damage(os.path.join(work, 'checkpoints', str(c.steps)), c.rng)
    code, _ = harness.run_to_end(c.argv(work), c.env, c.log(f'corrupt{i}'))
    moved = os.path.isdir(os.path.join(work, 'damaged_checkpoints', str(c.steps)))
    c.detected += moved
    c.compared += 1
    same = code == 0 and equal(harness.restore_state(work), reference[c.steps])
    c.equal_count += same
    if not moved and same:
      c.harmless += 1  # the damaged bytes were never read: the restored values were the saved ones
    verdict = 'moved aside' if moved else ('not read (values intact)' if same else 'NOT DETECTED')
    c.events.append(f'corruption {i}: {how}: {verdict}, exit {code}, final state {"equal" if same else "DIFFERENT"}')


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--kills', type=int, default=6)
  parser.add_argument('--corruptions', type=int, default=6)
  parser.add_argument('--model', choices=['bert', 'xlnet'], default='bert')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--workdir', default='/tmp/fault_injection')
  args = parser.parse_args()
  os.makedirs(args.workdir, exist_ok=True)
  steps = max(16, 2 * args.kills + 4)
  c = Campaign(args=args, rng=random.Random(args.seed),
               env=harness.child_env(os.path.join(args.workdir, 'jax_cache'), devices=2),
               data=harness.prepared_data(Root(args.workdir), args.model), steps=steps,
               base=MESH + [f'--config.num_train_steps={steps}', '--config.checkpoint_every=1'])
  reference = _straight(c)
  if reference is None:
    return 1
  _kills(c, reference)
  _corruptions(c, reference)
  print(f'kills {args.kills}, resumed {c.resumed}/{c.restarts}, corrupt detected '
        f'{c.detected}/{args.corruptions - c.harmless}, bitwise equal {c.equal_count}/{c.compared}')
  for line in c.events:
    print('  ' + line)
  ok = (c.equal_count == c.compared and c.resumed == c.restarts and c.detected == args.corruptions - c.harmless
        and not any('NOT' in e for e in c.events))
  return 0 if ok else 1


if __name__ == '__main__':
  sys.exit(main())
