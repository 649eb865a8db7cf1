"""The comparison's outputs: `results.json` (every cell), `results.md` (objective x task, mean ± std over seeds,
with the pretraining FLOPs, steps, parameters, wall time and final loss) and two plots (pretraining loss vs FLOPs;
downstream score per objective with error bars)."""
from __future__ import annotations

import json
import math
import os
from typing import Any, Sequence



# The cell of a task the objective's model does not offer (`objectives.offers`).
NOT_OFFERED = {'not_offered': True}


def _fmt(summary: dict | None, metric: str | None) -> str:
  if not summary or metric not in summary:
    return '—'
  s = summary[metric]
  values = s.get('values') or [s['mean']]
  if len(values) > 1 and s.get('std') is not None and math.isfinite(s['std']):
    return f"{s['mean']:.3f} ± {s['std']:.3f}"
  return f"{s['mean']:.3f}"


def _sci(x: float | None) -> str:
  return '—' if x is None else f'{x:.2e}'


def task_metric(cells: dict, task: str) -> str | None:
  """The metric a task's column shows: the main metric its cells report."""
  for row in cells.values():
    cell = row['tasks'].get(task)
    if cell and not cell.get('not_offered'):
      return cell['main_metric']
  return None


def markdown(table: dict, header: Sequence[str]) -> str:
  """`table` (`build_table`'s) as the markdown of results.md, below the `header` lines."""
  rows, tasks = table['objectives'], table['tasks']
  metrics = {t: task_metric(rows, t) for t in tasks}
  lines = list(header) + ['']
  cols = ['objective', 'downstream', 'params', 'pretrain FLOPs', 'steps', 'train wall (s)', 'final loss (bits)']
  cols += [f'{t} ({metrics[t]})' for t in tasks]
  lines += ['| ' + ' | '.join(cols) + ' |', '|' + '---|' * len(cols)]
  for name, row in rows.items():
    p = row.get('pretrain') or {}
    loss = '—' if p.get('loss_bits') is None else f"{p['loss_bits']:.3f} / {p['loss_unit']}"
    cells = [name, row['downstream'], str(p.get('params', '—')), _sci(p.get('flops')), str(p.get('steps', '—')),
             '—' if p.get('train_wall_s') is None else f"{p['train_wall_s']:.0f}", loss]
    cells += ['n/a' if (row['tasks'].get(t) or {}).get('not_offered') else
              _fmt((row['tasks'].get(t) or {}).get('metrics'), metrics[t]) for t in tasks]
    lines.append('| ' + ' | '.join(cells) + ' |')
  lines += ['', 'n/a: the model\'s fine-tuning does not offer that kind of task (GPT-1 reads a task input at its '
            'last token: no tagging or spans; the ELMo task models classify, regress and tag).'] * any(
      c.get('not_offered') for row in rows.values() for c in row['tasks'].values())
  lines += ['', 'Objectives:', '']
  lines += [f"- `{name}`: {row['description']}" for name, row in rows.items()]
  return '\n'.join(lines) + '\n'


def write_all(out_dir: str, table: dict, header: Sequence[str]) -> list[str]:
  """results.json, results.md and the plots into `out_dir`; returns the paths written."""
  paths = [os.path.join(out_dir, 'results.json'), os.path.join(out_dir, 'results.md')]
  with open(paths[0], 'w') as f:
    json.dump(table, f, indent=1, default=float)
  with open(paths[1], 'w') as f:
    f.write(markdown(table, header))
  return paths + plot(out_dir, table)


def plot(out_dir: str, table: dict) -> list[str]:
  """`loss_vs_flops.png` (each objective's train loss in bits against training FLOPs; the losses are of different
  tasks, so the curves show each objective's progress, not which is better) and `downstream.png` (one panel per
  task: mean ± std over seeds per objective)."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use('Agg')
  from matplotlib import pyplot as plt  # pylint: disable=import-outside-toplevel
  rows = table['objectives']
  fig, ax = plt.subplots(figsize=(8, 5))
  for name, row in rows.items():
    curve = (row.get('pretrain') or {}).get('train_curve')
    if curve:
      ax.plot([c[0] for c in curve], [c[1] / math.log(2.0) for c in curve], label=name)
  ax.set_xlabel('training FLOPs (each objective\'s own count)')
  ax.set_ylabel('train loss (bits per predicted unit)')
  ax.set_title('Pretraining loss vs compute (different objectives: compare shapes, not levels)')
  ax.legend(fontsize=8)
  fig.tight_layout()
  paths = [os.path.join(out_dir, 'loss_vs_flops.png')]
  fig.savefig(paths[0], dpi=100)
  plt.close(fig)
  tasks = table['tasks']
  if tasks:
    fig, axes = plt.subplots(1, len(tasks), figsize=(4 * len(tasks), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
      metric = task_metric(rows, task)
      names, means, stds = [], [], []
      for name, row in rows.items():
        summary = ((row['tasks'].get(task) or {}).get('metrics') or {}).get(metric)
        if summary:
          names.append(name)
          means.append(summary['mean'])
          stds.append(summary.get('std') or 0.0)
      ax.bar(range(len(names)), means, yerr=stds, capsize=3)
      ax.set_xticks(range(len(names)))
      ax.set_xticklabels(names, rotation=60, ha='right', fontsize=7)
      ax.set_title(f'{task} ({metric})')
    fig.tight_layout()
    paths.append(os.path.join(out_dir, 'downstream.png'))
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)
  return paths


def build_table(specs: Sequence[Any], tasks: Sequence[str], pretrain: dict, downstream: dict) -> dict:
  """{'tasks': [...], 'objectives': {name: {description, model, downstream, pretrain cell, tasks: {task: cell}}}}."""
  return dict(tasks=list(tasks), objectives={
      spec.name: dict(description=spec.description, model=spec.model, downstream=spec.downstream,
                      pretrain=pretrain.get(spec.name), tasks=downstream.get(spec.name, {}))
      for spec in specs})
