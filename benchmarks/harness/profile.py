"""Where our step's time goes: per-op trace events of the compiled step, each op attributed through its HLO
`stack_frame_id` to the source function it came from and from there to a category by the model's rules; a
forward / forward+backward / full-step split; the step's matmul shapes timed alone."""
from __future__ import annotations

import collections
import fnmatch
import glob
import math
import os
import re
import shutil
import statistics
import tempfile
import time
from typing import Callable

import jax
import jax.numpy as jnp
from flax import linen as nn

from benchmarks.harness.steps import JaxStep
from benchmarks.harness.timing import interleaved

_SECTION = re.compile(r'^(FileNames|FunctionNames|FileLocations|StackFrames)$')
_INSTR = re.compile(r'^\s*(?:ROOT\s+)?%([^\s=]+)\s*=\s*')
TRACED_OPTIONS = {'xla_cpu_enable_xprof_traceme': True}   # compiler options that give per-op trace events (CPU)

# Parts every model's step has, by one source frame: (file or function patterns, category of a matmul, of the rest).
SHARED_RULES = (
    (('Dropout.__call__',), 'dropout (random bits, mask, scaling)', None),
    (('Embed.attend',), 'matmul: tied vocab projection', 'vocab projection: layout copies'),
    (('LayerNorm.__call__',), 'LayerNorm', None),
    (('Embed.__call__',), 'embedding lookup + scatter-add grad', None),
    (('optim.py', 'transform.py', 'update.py', 'numerics.py', 'linear_algebra.py', '_tree_math.py',
      '_combining.py', 'base.py', 'alias.py', 'apply_updates*', 'all_finite*'),
     'optimizer (AdamW, clipping, norms, guard)', None),
)


def _instruction(line: str, match: re.Match) -> dict:
  rest = line[match.end():]
  if rest.startswith('('):  # tuple shape: skip to its closing parenthesis
    depth = 0
    for i, ch in enumerate(rest):
      depth += ch == '('
      depth -= ch == ')'
      if depth == 0:
        rest = rest[i + 1:]
        break
  else:
    rest = rest.split(' ', 1)[1] if ' ' in rest else ''
  op_name = re.search(r'op_name="([^"]*)"', line)
  frame = re.search(r'stack_frame_id=(\d+)', line)
  return dict(opcode=rest.strip().split('(', 1)[0], op_name=op_name.group(1) if op_name else '',
              frame=int(frame.group(1)) if frame else 0)


def _frames(tables: dict[str, dict[int, str]], frame_id: int) -> list[tuple[str, str, int]]:
  """The source stack of a frame id, innermost first: (file base name, function, line)."""
  def field(text, name):
    m = re.search(name + r'=(\d+)', text)
    return int(m.group(1)) if m else 0

  out, seen = [], set()
  while frame_id and frame_id not in seen and frame_id in tables['StackFrames']:
    seen.add(frame_id)
    entry = tables['StackFrames'][frame_id]
    loc = tables['FileLocations'].get(field(entry, 'file_location_id'), '')
    file = tables['FileNames'].get(field(loc, 'file_name_id'), '').strip().strip('"')
    function = tables['FunctionNames'].get(field(loc, 'function_name_id'), '').strip().strip('"')
    out.append((os.path.basename(file), function, field(loc, 'line')))
    frame_id = field(entry, 'parent_frame_id') - 1  # printed 1-based; 0 means no parent
  return out


def hlo_instructions(hlo_text: str) -> dict[str, dict]:
  """name -> {opcode, op_name, frames (innermost first: (file, function, line))} for every HLO instruction."""
  tables: dict[str, dict[int, str]] = {k: {} for k in ('FileNames', 'FunctionNames', 'FileLocations', 'StackFrames')}
  section = None
  instructions = {}
  for line in hlo_text.splitlines():
    if _SECTION.match(line):
      section = line
      continue
    if section and re.match(r'^\d+ ', line):
      idx, rest = line.split(' ', 1)
      tables[section][int(idx)] = rest
      continue
    section = None
    m = _INSTR.match(line)
    if m:
      instructions[m.group(1)] = _instruction(line, m)
  for info in instructions.values():
    info['frames'] = _frames(tables, info.pop('frame'))
  return instructions


def _matches(patterns: tuple[str, ...], file: str, function: str) -> bool:
  return any(fnmatch.fnmatchcase(function, p) or fnmatch.fnmatchcase(file, p) for p in patterns)


def op_category(info: dict, rules, default_matmul: str) -> str:
  """Which part of the step an HLO op (forward or backward) belongs to: the innermost source frame that a rule
  names decides (a backward op carries the stack of the forward op it differentiates). `rules`: (patterns,
  category of a matmul, category of anything else or None for the same), tried after `SHARED_RULES`."""
  is_dot = 'dot_general' in info['op_name'] or info['opcode'] in ('dot', 'convolution')
  for file, function, _ in info['frames']:
    if file in ('trainer.py', 'train_step.py') and '<lambda>' in function:
      return 'optimizer (AdamW, clipping, norms, guard)'  # the non-finite guard, fused into the update
    for patterns, dot_category, other in (*SHARED_RULES, *rules):
      if _matches(patterns, file, function):
        return dot_category if is_dot or other is None else other
  if is_dot:
    return default_matmul
  if not info['frames'] and info['opcode'] in ('copy', 'fusion', 'transpose'):
    return 'copies without source (state copies, layouts)'
  return 'other (step bookkeeping, metrics)'


def trace_op_times(step: JaxStep, steps: int) -> tuple[dict[str, float], float]:
  """Runs `steps` steps under `jax.profiler.trace`; returns (op name -> summed event seconds per step, wall s/step)."""
  directory = tempfile.mkdtemp(prefix='step_profile_')
  try:
    with jax.profiler.trace(directory):
      t = time.perf_counter()
      step.run(steps)
      wall = (time.perf_counter() - t) / steps
    files = glob.glob(os.path.join(directory, '**', '*.xplane.pb'), recursive=True)
    totals: dict[str, float] = collections.defaultdict(float)
    for plane in jax.profiler.ProfileData.from_file(files[0]).planes:
      for line in plane.lines:
        for event in line.events:
          totals[event.name] += event.duration_ns * 1e-9 / steps
    return dict(totals), wall
  finally:
    shutil.rmtree(directory, ignore_errors=True)


def op_profile(traced: JaxStep, steps: int, rules, default_matmul: str = 'matmul: dense layers') -> dict:
  """Prints the op time of `traced` (built with `TRACED_OPTIONS`) by category and its 15 slowest ops."""
  traced.run(2)
  op_times, wall = trace_op_times(traced, steps)
  instructions = hlo_instructions(traced.hlo())
  skip = {'while', 'conditional', 'call'}
  per_op = {n: s for n, s in op_times.items() if n in instructions and instructions[n]['opcode'] not in skip}
  total = sum(per_op.values())
  by_category: dict[str, float] = collections.defaultdict(float)
  for name, seconds in per_op.items():
    by_category[op_category(instructions[name], rules, default_matmul)] += seconds
  print(f'traced step: {wall * 1e3:.0f} ms wall; ops sum to {total * 1e3:.0f} ms '
        f'(ops on all threads count; op time / wall = {total / wall:.2f})')
  print(f'{"category (forward + backward)":54s} {"ms/step":>9s} {"share":>7s}')
  for category, seconds in sorted(by_category.items(), key=lambda kv: -kv[1]):
    print(f'{category:54s} {seconds * 1e3:9.1f} {seconds / total:7.1%}')
  top = sorted(per_op.items(), key=lambda kv: -kv[1])[:15]
  print(f'\n{"top ops":60s} {"ms/step":>9s}  source')
  for name, seconds in top:
    info = instructions[name]
    where = next((f'{fn} ({f}:{ln})' for f, fn, ln in info['frames']), info['op_name'][-60:])
    print(f'{name[:60]:60s} {seconds * 1e3:9.1f}  {where}')
  return dict(traced_wall_s=wall, op_sum_s=total, categories_s=dict(by_category), top_ops_s=dict(top))


def _repeat(fn: Callable[[], object]) -> Callable[[int], None]:
  def run(k: int) -> None:
    out = None
    for _ in range(k):
      out = fn()
    jax.block_until_ready(out)
  return run


def phase_split(step: JaxStep, steps: int, per_round: int) -> dict:
  """Times forward-only and forward+backward programs of the step's loss (same params, batch and carried state)
  interleaved with the full step, and prints what backward and the optimizer take."""
  objective, setup, batch = step.objective, step.setup, step.batch
  rng = jax.random.PRNGKey(1)

  def loss(params, batch, aux, rng):
    return objective.loss_fn(params, batch, rng, aux, objective.normalizers(batch), True)[0]

  args = (step.state.params, batch, step.state.aux, rng)
  with jax.set_mesh(setup.mesh), nn.logical_axis_rules(setup.rules):
    forward = jax.jit(loss).lower(*args).compile()
    grad = jax.jit(jax.value_and_grad(loss)).lower(*args).compile()
  runners = {'forward': _repeat(lambda: forward(step.state.params, batch, step.state.aux, rng)),
             'forward+backward': _repeat(lambda: grad(step.state.params, batch, step.state.aux, rng)),
             'full step': step.run}
  for name in ('forward', 'forward+backward'):
    runners[name](1)
  split = {k: statistics.median(v) for k, v in interleaved(runners, steps, per_round).items()}
  full = split['full step']
  print(f'\n{"program":30s} {"ms":>8s} {"of step":>8s}')
  for name, seconds in split.items():
    print(f'{name:30s} {seconds * 1e3:8.1f} {seconds / full:8.1%}')
  print(f'=> backward ~ {(split["forward+backward"] - split["forward"]) * 1e3:.0f} ms, optimizer + guard ~ '
        f'{(full - split["forward+backward"]) * 1e3:.0f} ms')
  return split


def matmul_roofline(matmuls: list[tuple[str, tuple[int, int, int, int], int]], full_step_s: float, steps: int,
                    per_round: int) -> dict:
  """Times every matmul shape of the step alone (fp32; `matmuls` as (name, (batch, M, K, N), count per step)),
  interleaved with each other and with a 2048^2 square matmul (the reference for the same load), and prints how
  long the step's matmuls would take if everything else were free."""
  runners = {}
  for name, (b, m, k, n), _ in matmuls:
    x, y = jnp.ones((b, m, k), jnp.float32), jnp.ones((b, k, n), jnp.float32)
    fn = jax.jit(lambda x, y: jnp.einsum('bmk,bkn->bmn', x, y))
    fn(x, y).block_until_ready()
    runners[name] = _repeat(lambda fn=fn, x=x, y=y: fn(x, y))
  square = jnp.ones((2048, 2048), jnp.float32)
  square_fn = jax.jit(lambda x: x @ x)
  square_fn(square).block_until_ready()
  runners['2048^2 square'] = _repeat(lambda: square_fn(square))
  times = {k: statistics.median(v) for k, v in interleaved(runners, steps, per_round).items()}
  peak = 2.0 * 2048 ** 3 / times.pop('2048^2 square')
  rows = [dict(name=name, shape=shape, count=count, flops=2.0 * math.prod(shape) * count,
               seconds=times[name] * count, gflops_per_s=2.0 * math.prod(shape) / times[name] / 1e9)
          for name, shape, count in matmuls]
  total_s, total_flops = sum(r['seconds'] for r in rows), sum(r['flops'] for r in rows)
  print(f'\n{"matmul alone (fp32)":34s} {"[batch, M, K, N]":>22s} {"x":>4s} {"GFLOP/s":>8s} {"ms/step":>8s}')
  for r in rows:
    print(f'{r["name"]:34s} {str(list(r["shape"])):>22s} {r["count"]:4d} {r["gflops_per_s"]:8.0f} '
          f'{r["seconds"] * 1e3:8.1f}')
  print(f'=> the step\'s {total_flops / 1e9:.1f} GFLOP of matmuls take {total_s * 1e3:.0f} ms alone '
        f'({total_flops / total_s / 1e9:.0f} GFLOP/s; a 2048^2 matmul, interleaved: {peak / 1e9:.0f} GFLOP/s), '
        f'{total_s / full_step_s:.0%} of the full step ({full_step_s * 1e3:.0f} ms)')
  return dict(matmuls=rows, matmuls_alone_s=total_s, peak_now=peak)

