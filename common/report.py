"""What a newcomer should see at the end of a pretraining run: the model's accuracy next to the best constant
predictor on the same eval rows, and a few fill-in-the-blank examples with the model's top 5.

Model-agnostic pieces; each recipe's `learning_report(config, params, eval_loader, tokenizer)` gathers its
predictions and calls these.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np


def constant_baseline(labels: np.ndarray, weights: np.ndarray) -> tuple[int, float]:
  """The id that is right most often among the weighted `labels`, and its accuracy: the best any predictor that
  ignores its input (a constant, or the unigram distribution's mode) can do on these rows."""
  kept = np.asarray(labels)[np.asarray(weights) > 0].astype(np.int64)
  if not len(kept):
    return 0, 0.0
  counts = np.bincount(kept)
  best = int(np.argmax(counts))
  return best, float(counts[best]) / len(kept)


def accuracy_line(name: str, accuracy: float, baseline: float, baseline_name: str, count: int) -> str:
  """`name: acc vs base for ... (ratio, count predictions; z standard errors above it)`: z is the gap over the
  binomial standard error of the baseline's rate on `count` predictions (about 2 or more: not luck of the rows)."""
  ratio = f'{accuracy / baseline:.1f}x' if baseline > 0 else 'n/a'
  stderr = np.sqrt(baseline * (1.0 - baseline) / count) if count and 0 < baseline < 1 else 0.0
  gap = f'; {(accuracy - baseline) / stderr:+.1f} standard errors from it' if stderr > 0 else ''
  return (f'  {name}: {accuracy:.3f} vs {baseline:.3f} for {baseline_name} ({ratio} the baseline, {count} '
          f'predictions{gap})')


def fill_in_line(tokens: Sequence[str], position: int, truth: str, top: Sequence[str], window: int = 10,
                 blank: str = '[MASK]') -> str:
  """`... words [MASK] words ...  -> top 5: a, b, c, d, e (truth: x)`, `window` tokens on each side."""
  left = ' '.join(tokens[max(0, position - window):position])
  right = ' '.join(tokens[position + 1:position + 1 + window])
  mark = '+' if top and top[0] == truth else ' '
  return f'  {mark} ... {left} {blank} {right} ...\n      top 5: {", ".join(top)}   (truth: {truth})'
