"""Draws what XLNet's permutation LM does to one sentence: a sampled factorisation order and the content-stream and
query-stream attention masks it induces (the two-stream figures of the XLNet paper).

  python -m xlnet_jax.visualize --sentence "New York is a city" --num_predict 3 --out runs/viz
  python -m xlnet_jax.visualize --sentence "..." --init runs/xlnet_tiny --targets 2,3 --seed 1 --out runs/viz

Tokens: the sentencepiece pieces of `--init` (a workdir or HF directory holding `spiece.model`), else the sentence's
whitespace words. Targets: `--targets` (0-based token positions), else `--num_predict` positions drawn with `--seed`.
The order and the masks come from the same sampler the training step uses (`xlnet_jax.permutation`), so the
picture is exactly what the model sees: in both masks row i is the query, column j the key, white = i may attend
to j. Writes `OUT/factorization.png` and `OUT/masks.npz` (`perm_mask`, `content_mask`, `query_mask`, `rank`,
`is_target`, `tokens`). Needs matplotlib (`pip install matplotlib`).
"""
from __future__ import annotations

import argparse
from typing import Sequence

import jax
import numpy as np

from common import storage
from common.config import UserError
from xlnet_jax import permutation


def tokenize(sentence: str, init: str | None) -> list[str]:
  if not sentence.strip():
    raise UserError('--sentence is empty')
  if not init:
    return sentence.split()
  from xlnet_jax import tokenizer as xlnet_tokenizer  # pylint: disable=import-outside-toplevel
  model_file = storage.join(init, xlnet_tokenizer.MODEL_FILE)
  if not storage.exists(model_file):
    raise UserError(f'{init}: no {xlnet_tokenizer.MODEL_FILE} there')
  tok = xlnet_tokenizer.load_tokenizer(model_file)
  return [tok.id_to_piece(i) for i in tok.encode_batch([sentence])[0]]


def choose_targets(num_tokens: int, targets: Sequence[int] | None, num_predict: int, seed: int) -> np.ndarray:
  """`[L] bool`: the given positions, or `num_predict` drawn without replacement."""
  is_target = np.zeros([num_tokens], bool)
  if targets:
    bad = [t for t in targets if not 0 <= t < num_tokens]
    if bad:
      raise UserError(f'--targets {bad} outside the {num_tokens} tokens (0-based)')
    is_target[list(targets)] = True
  else:
    if not 0 < num_predict <= num_tokens:
      raise UserError(f'--num_predict={num_predict} must be in [1, {num_tokens}] (the number of tokens)')
    is_target[np.random.default_rng(seed).choice(num_tokens, num_predict, replace=False)] = True
  return is_target


def sample_masks(is_target: np.ndarray, seed: int) -> dict[str, np.ndarray]:
  """The sampler's order and masks for one row (no specials, no reuse part); 1 = may NOT attend."""
  out = permutation.sample_permutation(jax.random.key(seed), is_target[None], np.zeros_like(is_target)[None],
                                       num_predict=int(is_target.sum()), perm_size=None)
  perm_mask = np.asarray(out['perm_mask'][0])
  return {'perm_mask': perm_mask, 'query_mask': perm_mask,
          'content_mask': np.asarray(permutation.content_stream_mask(out['perm_mask'])[0]),
          'rank': np.asarray(out['rank'][0]), 'is_target': np.asarray(out['is_target'][0])}


def _draw_mask(ax, mask: np.ndarray, tokens: Sequence[str], title: str) -> None:
  ax.imshow(1.0 - mask, cmap='gray', vmin=0, vmax=1)
  ax.set_xticks(range(len(tokens)), tokens, rotation=90, fontsize=7)
  ax.set_yticks(range(len(tokens)), tokens, fontsize=7)
  ax.set_xlabel('key (attended to)')
  ax.set_ylabel('query')
  ax.set_title(title, fontsize=9)


def draw(tokens: Sequence[str], masks: dict[str, np.ndarray], out_dir: str) -> str:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use('Agg')
  from matplotlib import pyplot as plt  # pylint: disable=import-outside-toplevel
  order = [int(p) for p in np.argsort(masks['rank']) if masks['is_target'][p]]
  context = [f'{t} ({p})' for p, t in enumerate(tokens) if not masks['is_target'][p]]
  fig, axes = plt.subplots(1, 3, figsize=(15, 5), gridspec_kw={'width_ratios': [1.2, 1, 1]})
  ax = axes[0]
  lines = ['context (not predicted, all see each other):'] + ['   ' + ', '.join(context[i:i + 6])
                                                               for i in range(0, len(context), 6)]
  lines += ['', 'then the targets, in the sampled order:']
  lines += [f'   {place + 1}. {tokens[p]} ({p}) sees the context and targets 1..{place}' if place else
            f'   1. {tokens[p]} ({p}) sees the context only' for place, p in enumerate(order)]
  for k, line in enumerate(lines):
    ax.text(0.0, 1 - (k + 1) / (len(lines) + 1), line, fontsize=8, transform=ax.transAxes,
            color='tab:red' if line.startswith('   ') and '. ' in line[:8] else 'black')
  ax.axis('off')
  ax.set_title('factorisation order (token (position))', fontsize=9)
  _draw_mask(axes[1], masks['content_mask'], tokens, 'content stream h: sees itself')
  _draw_mask(axes[2], masks['query_mask'], tokens, 'query stream g: not itself (targets)')
  storage.makedirs(out_dir)
  path = storage.join(out_dir, 'factorization.png')
  with storage.open_file(path, 'wb') as f:
    fig.savefig(f, format='png', dpi=110, bbox_inches='tight')
  plt.close(fig)
  return path


def visualize(sentence: str, out_dir: str, *, init: str | None = None, targets: Sequence[int] | None = None,
              num_predict: int = 2, seed: int = 0) -> dict[str, np.ndarray]:
  tokens = tokenize(sentence, init)
  masks = sample_masks(choose_targets(len(tokens), targets, num_predict, seed), seed)
  draw(tokens, masks, out_dir)
  with storage.open_file(storage.join(out_dir, 'masks.npz'), 'wb') as f:
    np.savez(f, tokens=np.asarray(tokens), **masks)
  return masks


def main(argv: Sequence[str] | None = None) -> int:
  from common import run as run_lib  # pylint: disable=import-outside-toplevel
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--sentence', required=True)
  parser.add_argument('--out', required=True, help='output directory')
  parser.add_argument('--init', default=None, help='a directory with spiece.model (else whitespace words)')
  parser.add_argument('--targets', default='', help='comma-separated 0-based target positions')
  parser.add_argument('--num_predict', type=int, default=2, help='targets drawn when --targets is not given')
  parser.add_argument('--seed', type=int, default=0)
  args = parser.parse_args(argv)
  targets = [int(t) for t in args.targets.split(',') if t.strip()]
  run_lib.guard(lambda _: visualize(args.sentence, args.out, init=args.init, targets=targets,
                                    num_predict=args.num_predict, seed=args.seed))([])
  print(storage.join(args.out, 'factorization.png'))
  return 0


if __name__ == '__main__':
  raise SystemExit(main())
