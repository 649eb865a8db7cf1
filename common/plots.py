"""Training curves of a workdir, drawn from its `metrics.jsonl` (any model: the names are the trainer's).

  python -m common.plots --workdir runs/bert_tiny [--out runs/bert_tiny/plots]

Writes one PNG per panel family into `--out` (default `WORKDIR/plots`): `loss.png` (train and eval loss and
perplexity-bearing LM losses), `accuracy.png` (every `*accuracy*` metric, train and eval), `learning_rate.png`,
`throughput.png` (tokens/s and, where logged, MFU). A panel with no data is not drawn. Needs matplotlib
(`pip install matplotlib`); rendering uses the Agg backend, so no display is needed.
"""
from __future__ import annotations

import collections
import json
from typing import Iterable, Mapping, Sequence

from common import storage
from common.config import UserError

# Panel name -> predicate on the metric name without its `train/` or `eval/` prefix.
PANELS = {
    'loss': lambda name: name == 'loss' or name.endswith('_loss'),
    'accuracy': lambda name: 'accuracy' in name,
    'learning_rate': lambda name: name == 'learning_rate',
    'throughput': lambda name: name in ('tokens_per_sec', 'mfu'),
}


def read_series(path: str) -> dict[str, list[tuple[int, float]]]:
  """`{'train/loss': [(step, value), ...], ...}` from a `metrics.jsonl`; a line that is not JSON is skipped (a run
  killed mid-write leaves at most one). A rerun that resumed repeats steps: the last value of a step wins."""
  series: dict[str, dict[int, float]] = collections.defaultdict(dict)
  with storage.open_file(path, 'r') as f:
    for line in f:
      try:
        record = json.loads(line)
      except ValueError:
        continue
      step = int(record.pop('step', -1))
      for name, value in record.items():
        if isinstance(value, (int, float)):
          series[name][step] = float(value)
  return {name: sorted(points.items()) for name, points in series.items()}


def panel_series(series: Mapping[str, Sequence[tuple[int, float]]]) -> dict[str, list[str]]:
  """The metric names drawn in each panel (sorted), panels with none left out."""
  panels: dict[str, list[str]] = {}
  for panel, wanted in PANELS.items():
    names = sorted(n for n in series if wanted(n.split('/', 1)[-1]))
    if names:
      panels[panel] = names
  return panels


def draw(series: Mapping[str, Sequence[tuple[int, float]]], out_dir: str, title: str = '') -> list[str]:
  """Draws every panel of `series` as `out_dir/<panel>.png`; returns the files written."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use('Agg')
  from matplotlib import pyplot as plt  # pylint: disable=import-outside-toplevel
  storage.makedirs(out_dir)
  written = []
  for panel, names in panel_series(series).items():
    fig, ax = plt.subplots(figsize=(7, 4))
    for name in names:
      steps, values = zip(*series[name])
      style = 'o--' if name.startswith('eval/') else '-'
      ax.plot(steps, values, style, label=name, markersize=3)
    ax.set_xlabel('step')
    ax.set_title(f'{title} {panel}'.strip())
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    path = storage.join(out_dir, f'{panel}.png')
    with storage.open_file(path, 'wb') as f:
      fig.savefig(f, format='png', dpi=110, bbox_inches='tight')
    plt.close(fig)
    written.append(path)
  return written


def plot_workdir(workdir: str, out_dir: str | None = None) -> list[str]:
  path = storage.join(workdir, 'metrics.jsonl')
  if not storage.exists(path):
    raise UserError(f'{path}: no such file (is {workdir} a training workdir?)')
  return draw(read_series(path), out_dir or storage.join(workdir, 'plots'), title=storage.basename(workdir))


def main(argv: Iterable[str] | None = None) -> int:
  import argparse  # pylint: disable=import-outside-toplevel
  from common import run as run_lib  # pylint: disable=import-outside-toplevel
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--workdir', required=True, help='a training workdir (holds metrics.jsonl)')
  parser.add_argument('--out', default=None, help='where the PNGs go (default WORKDIR/plots)')
  args = parser.parse_args(None if argv is None else list(argv))
  for path in run_lib.guard(lambda _: plot_workdir(args.workdir, args.out))([]):
    print(path)
  return 0


if __name__ == '__main__':
  raise SystemExit(main())
