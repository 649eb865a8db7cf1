"""The end-of-run report for BERT: MLM accuracy against the best constant predictor and NSP accuracy against the
majority class, on the eval rows the trainer evaluates, plus fill-in-the-blank examples (`common/report.py`)."""
from __future__ import annotations

import jax
import ml_collections
import numpy as np

from bert_jax import objective
from common import report


def _predictions(config: ml_collections.ConfigDict, params, eval_loader) -> dict[str, np.ndarray]:
  """Top-5 MLM ids `[N, P, 5]` at the masked positions and NSP logits `[N, 2]` for the eval batches, with the batch
  arrays they came from (N = num_eval_batches * global batch)."""
  model = objective.make_model(config)

  @jax.jit
  def predict(p, batch):
    mlm_logits, nsp_logits = model.apply({'params': p}, batch['input_ids'], batch['segment_ids'],
                                         batch['input_mask'], batch['masked_lm_positions'], deterministic=True)
    return jax.lax.top_k(mlm_logits, 5)[1], nsp_logits

  parts = []
  for step in range(max(1, int(config.num_eval_batches))):
    batch = eval_loader.global_batch(step)
    top5, nsp_logits = jax.device_get(predict(params, batch))
    parts.append(dict(batch, top5=top5, nsp_logits=nsp_logits))
  return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def learning_report(config: ml_collections.ConfigDict, params, eval_loader, tokenizer,
                    num_examples: int = 4) -> list[str]:
  out = _predictions(config, params, eval_loader)
  labels, weights = out['masked_lm_ids'], out['masked_lm_weights']
  correct = (out['top5'][..., 0] == labels) & (weights > 0)
  count = int((weights > 0).sum())
  best, base = report.constant_baseline(labels, weights)
  name = tokenizer.convert_ids_to_tokens([best])[0]
  lines = ['what the model learned, on the eval rows:',
           report.accuracy_line('MLM accuracy', correct.sum() / max(count, 1), base, f'always {name!r}', count)]
  if config.data.next_sentence:
    nsp_labels = out['next_sentence_labels']
    nsp = float(np.mean(np.argmax(out['nsp_logits'], -1) == nsp_labels))
    random_rate = float(np.mean(nsp_labels))
    majority, name = (random_rate, 'random next') if random_rate >= 0.5 else (1.0 - random_rate, 'is next')
    lines.append(report.accuracy_line('NSP accuracy', nsp, majority, f'always {name!r} (the majority rate)',
                                      len(nsp_labels)))
  lines.append('fill in the blank (+: top 1 right):')
  for row in range(len(labels)):
    if len(lines) >= 3 + int(config.data.next_sentence) + num_examples:
      break
    masked = [k for k in range(labels.shape[1])
              if weights[row, k] > 0 and out['input_ids'][row, out['masked_lm_positions'][row, k]] == tokenizer.mask_id]
    if not masked:
      continue
    k = masked[0]
    length = int(out['input_mask'][row].sum())
    tokens = tokenizer.convert_ids_to_tokens(out['input_ids'][row, :length].tolist())
    lines.append(report.fill_in_line(tokens, int(out['masked_lm_positions'][row, k]),
                                     tokenizer.convert_ids_to_tokens([int(labels[row, k])])[0],
                                     tokenizer.convert_ids_to_tokens(out['top5'][row, k].tolist())))
  return lines
