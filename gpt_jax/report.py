"""The end-of-run report for GPT: next-token accuracy against the best constant predictor (the most frequent target)
on the eval rows the trainer evaluates, plus a few next-token examples with the model's top 5 (`common/report.py`)."""
from __future__ import annotations

import jax
import ml_collections
import numpy as np

from common import report
from gpt_jax import objective


def _predictions(config: ml_collections.ConfigDict, params, eval_loader) -> dict[str, np.ndarray]:
  """Top-5 next-token ids `[N, L, 5]` for the eval batches, with the batch arrays they came from."""
  model = objective.make_model(config)

  @jax.jit
  def predict(p, input_ids):
    logits, _ = model.apply({'params': p}, input_ids, deterministic=True)
    return jax.lax.top_k(logits, 5)[1]

  parts = []
  for step in range(max(1, int(config.num_eval_batches))):
    batch = eval_loader.global_batch(step)
    parts.append(dict(batch, top5=jax.device_get(predict(params, batch['input_ids']))))
  return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def learning_report(config: ml_collections.ConfigDict, params, eval_loader, tokenizer,
                    num_examples: int = 4) -> list[str]:
  out = _predictions(config, params, eval_loader)
  labels, weights = out['target_ids'], out['target_weights']
  count = int((weights > 0).sum())
  correct = ((out['top5'][..., 0] == labels) & (weights > 0)).sum()
  best, base = report.constant_baseline(labels, weights)
  piece = lambda i: tokenizer.decode([int(i)]).strip() or repr(tokenizer.decode([int(i)]))
  lines = ['what the model learned, on the eval rows:',
           report.accuracy_line('next-token accuracy', correct / max(count, 1), base, f'always {piece(best)!r}',
                                count),
           'next token after the context (+: top 1 right):']
  rng = np.random.default_rng(0)
  for row in range(min(num_examples, len(labels))):
    length = int(weights[row].sum())
    if length < 2:
      continue
    position = int(rng.integers(length // 2, length))
    context = [piece(i) for i in out['input_ids'][row, :position + 1]]
    lines.append(report.fill_in_line(context + ['?'], position + 1, piece(labels[row, position]),
                                     [piece(i) for i in out['top5'][row, position]], blank='[NEXT]'))
  return lines
