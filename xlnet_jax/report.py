"""The end-of-run report for XLNet: permutation-LM accuracy at the targets against the best constant predictor, on
the eval rows and with the eval step's factorisation orders (memory empty, as the trainer evaluates), plus
fill-in-the-blank examples (`common/report.py`)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from common import report
from xlnet_jax import objective, permutation, pretrain_data


def _predictions(config: ml_collections.ConfigDict, params, eval_loader) -> dict[str, np.ndarray]:
  """Top-5 ids `[N, P, 5]`, labels, weights and positions of the targets of the eval batches, with `input_ids`."""
  model = objective.make_model(config)
  cfg, data = config.model, config.data

  @jax.jit
  def predict(p, batch):
    perm_rng, _ = jax.random.split(jax.random.PRNGKey(0))  # the eval step's key
    perm = permutation.sample_permutation(perm_rng, batch['is_target'], batch['is_special'],
                                          num_predict=data.num_predict,
                                          perm_size=pretrain_data.effective_perm_size(data), reuse_len=data.reuse_len)
    rows = batch['input_ids'].shape[0]
    mems = [jnp.zeros((rows, cfg.mem_len, cfg.d_model), model.dtype)] * cfg.n_layer if cfg.mem_len else None
    logits, _ = model.apply({'params': p}, batch['input_ids'], batch['segment_ids'], batch['input_mask'],
                            perm['perm_mask'], perm['target_mapping'], mems, deterministic=True)
    labels = jnp.take_along_axis(batch['input_ids'], perm['target_index'], axis=1)
    return dict(top5=jax.lax.top_k(logits, 5)[1], labels=labels, weights=perm['target_weights'],
                positions=perm['target_index'], input_ids=batch['input_ids'])

  parts = [jax.device_get(predict(params, eval_loader.global_batch(step)))
           for step in range(max(1, int(config.num_eval_batches)))]
  return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def learning_report(config: ml_collections.ConfigDict, params, eval_loader, tokenizer,
                    num_examples: int = 4) -> list[str]:
  out = _predictions(config, params, eval_loader)
  labels, weights = out['labels'], out['weights']
  count = int((weights > 0).sum())
  correct = float(((out['top5'][..., 0] == labels) & (weights > 0)).sum())
  best, base = report.constant_baseline(labels, weights)
  lines = ['what the model learned, on the eval rows (targets predicted in a sampled order):',
           report.accuracy_line('PLM accuracy', correct / max(count, 1), base,
                                f'always {tokenizer.id_to_piece(best)!r}', count),
           'fill in the blank ([?] = a target; later targets of the order are hidden from it too; +: top 1 right):']
  for row in range(min(num_examples, len(labels))):
    if weights[row, 0] <= 0:
      continue
    tokens = tokenizer.convert_ids_to_tokens(out['input_ids'][row].tolist())
    lines.append(report.fill_in_line(tokens, int(out['positions'][row, 0]), tokenizer.id_to_piece(int(labels[row, 0])),
                                     tokenizer.convert_ids_to_tokens(out['top5'][row, 0].tolist()), blank='[?]'))
  return lines
