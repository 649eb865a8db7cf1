"""Printing: the comparison table (one column per side), ratio lines, JSON."""
from __future__ import annotations

import dataclasses
import json
import math
import statistics

from benchmarks.harness.timing import REFERENCE, Run, quartiles

NA = '-'


def fmt_bytes(n: float) -> str:
  return f'{n / 2 ** 20:.0f} MiB'


def print_table(rows: list[tuple[str, ...]], column_width: int = 24) -> None:
  """First row: headers. First column left-aligned, the rest right-aligned in `column_width`."""
  width = max(len(r[0]) for r in rows) + 2
  for r in rows:
    print(f'{r[0]:{width}s}' + ''.join(f'{c:>{column_width}s}' for c in r[1:]))


@dataclasses.dataclass(frozen=True)
class Column:
  """One side of the table: `name` is an entry of `Run.steps` or `REFERENCE`; `flops` its analytic model FLOPs
  per step (NaN: none)."""
  label: str
  name: str
  flops: float = math.nan


def _timing_cells(run: Run, name: str, flops: float, useful_flops: float, tokens: int) -> dict[str, str]:
  if not run.timed(name):
    return {}
  t, rounds, cpu = run.step_s(name), run.times[name], run.cpu[name]
  counted = run.reference_flops_counted if name == REFERENCE else run.steps[name].flops_xla()
  q1, q3 = quartiles(rounds)
  cells = {'step': f'{t * 1e3:.0f}', 'iqr': f'{q1 * 1e3:.0f}-{q3 * 1e3:.0f}', 'fastest': f'{min(rounds) * 1e3:.0f}',
           'cpu': f'{statistics.median(cpu):.2f} ({min(cpu):.1f}-{max(cpu):.1f})',
           'tokens': f'{tokens / t:.0f}',
           'mfu_counted': f'{counted / t / run.peak.jax:.1%}'}
  if not math.isnan(flops):
    cells.update(mfu=f'{flops / t / run.peak.jax:.1%}',
                 mfu_cpu=f'{flops / statistics.median(cpu) / run.peak.jax_per_cpu_s:.1%}')
  cells['mfu_useful'] = f'{useful_flops / t / run.peak.jax:.1%}'
  return cells


def _cells(run: Run, column: Column, useful_flops: float, tokens: int) -> dict[str, str]:
  cells = _timing_cells(run, column.name, column.flops, useful_flops, tokens)
  if not math.isnan(column.flops):
    cells['flops'] = f'{column.flops / 1e9:.1f}'
  if column.name == REFERENCE:
    cells.update(counted=f'{run.reference_flops_counted / 1e9:.1f} (torch)',
                 memory=f'{fmt_bytes(run.reference_rss_delta)} RSS delta',
                 state=fmt_bytes(run.reference.state_bytes()))
    return cells
  step = run.steps[column.name]
  memory = step.memory()
  cells.update(counted=f'{step.flops_xla() / 1e9:.1f} (XLA)', memory=f'{fmt_bytes(memory["peak_bytes"])} compiled',
               temps=fmt_bytes(memory.get('temp_size_in_bytes', 0)), state=fmt_bytes(step.state_bytes()))
  if useful_flops != column.flops:  # "useful work" is the first column's FLOPs: another JAX step has its own
    cells.pop('mfu_useful', None)
  return cells


ROWS = (('step', 'step time (median) ms'), ('iqr', '  quartiles over rounds ms'), ('fastest', '  fastest round ms'),
        ('cpu', '  CPU time/step (all threads) s'), ('tokens', 'tokens/s'),
        ('flops', 'model GFLOP/step (analytic)'), ('counted', 'GFLOP/step counted'),
        ('mfu', 'MFU (analytic FLOPs)'), ('mfu_cpu', 'MFU by CPU time (analytic FLOPs)'),
        ('mfu_counted', 'MFU (counted FLOPs: XLA / torch)'), ('mfu_useful', 'MFU (our FLOPs = useful work)'),
        ('memory', 'memory'), ('temps', '  temporaries'), ('state', '  params + optimizer (+ carried state)'))


def comparison_rows(run: Run, columns: list[Column], tokens: int) -> list[tuple[str, ...]]:
  """The standard table (`tokens` per step): timing, tokens/s, FLOPs (analytic and counted), MFU four ways,
  memory; '-' where a side has no such figure (an untimed step, HF's compiled memory). The useful-work MFU of the
  reference is the first column's FLOPs over the reference's time."""
  cells = [_cells(run, c, columns[0].flops, tokens) for c in columns]
  rows = [('',) + tuple(c.label for c in columns)]
  for key, label in ROWS:
    rows.append((label,) + tuple(c.get(key, NA) for c in cells))
  return rows


def side_record(run: Run, name: str, flops: float, tokens: int) -> dict:
  """Every number of one side, for the JSON."""
  record = run.summary(name, flops, tokens) if run.timed(name) else {}
  record['flops_analytic'] = flops
  if name == REFERENCE:
    record.update(flops_counted=run.reference_flops_counted, rss_delta_bytes=run.reference_rss_delta,
                  state_bytes=run.reference.state_bytes())
  else:
    step = run.steps[name]
    record.update(flops_xla=step.flops_xla(), memory=step.memory(), state_bytes=step.state_bytes(),
                  compile_s=step.compile_s)
  if 'step_s' in record:
    counted = record.get('flops_counted', record.get('flops_xla'))
    record['mfu_counted_flops'] = counted / record['step_s'] / run.peak.jax
  return record


def records(run: Run, columns: list[Column], tokens: int) -> dict:
  """`side_record` of every column by name, the peak, and the first column's speedup over the reference."""
  out = {c.name: side_record(run, c.name, c.flops, tokens) for c in columns}
  out.update(peak_flops_jax=run.peak.jax, peak_flops_per_cpu_s_jax=run.peak.jax_per_cpu_s,
             peak_flops_torch=run.peak.torch)
  if run.reference is not None and run.timed(columns[0].name):
    speedup = run.speedup(columns[0].name, REFERENCE)
    out.update(ratio_tokens_per_s=speedup['median'], ratio_fastest_rounds=speedup['fastest'],
               ratio_cpu_time=speedup['cpu_time'])
  return out


def print_speedup(run: Run, name: str = 'ours', over: str = REFERENCE, what: str = 'ours / HF tokens/s') -> dict:
  """Prints and returns `Run.speedup(name, over)`."""
  s = run.speedup(name, over)
  print(f'{what}: {s["median"]:.2f}x (median over rounds of the per-round ratio); fastest round against fastest '
        f'round: {s["fastest"]:.2f}x; by CPU time: {s["cpu_time"]:.2f}x')
  return s


def write_json(path: str, out: dict) -> None:
  if path:
    with open(path, 'w') as f:
      json.dump(out, f, indent=2, default=float)
    print(f'\nwrote {path}')


def print_comparison(run: Run, columns: list, tokens: int, per_round: int) -> None:
  """The peak line, the compile line, the ours-vs-reference table and (with a reference) the speed-up line."""
  print(f'\n{run.peak.describe()}')
  print(f'our step compiled in {run.steps["ours"].compile_s:.1f} s; {len(run.times["ours"])} rounds of {per_round} '
        'steps each side\n')
  print_table(comparison_rows(run, columns, tokens), 26)
  if run.reference is not None:
    print()
    print_speedup(run)


def report_against_reference(run: Run, out: dict, reference_label: str, flops: float, tokens: int, per_round: int,
                             json_path: str, xla_note: str = '') -> dict:
  """The ending of a one-model benchmark: our column and (when timed) the reference's, both at the model count
  `flops` per step, their records into `out`, the comparison table, the compiled memory and XLA's FLOPs next to the
  model count (`xla_note` says what XLA's figure leaves out), and `out` written to `json_path`."""
  ours = run.steps['ours']
  columns = [Column('ours (JAX)', 'ours', flops)]
  if run.reference is not None:
    columns.append(Column(reference_label, REFERENCE, flops))
  out.update(records(run, columns, tokens))
  print_comparison(run, columns, tokens, per_round)
  memory = ours.memory()
  print(f'XLA temp buffers {fmt_bytes(memory.get("temp_size_in_bytes", 0))}, arguments '
        f'{fmt_bytes(memory.get("argument_size_in_bytes", 0))}; XLA cost_analysis '
        f'{ours.flops_xla() / 1e9:.1f} GFLOP/step{xla_note} vs the model count {flops / 1e9:.1f}', flush=True)
  write_json(json_path, out)
  return out
