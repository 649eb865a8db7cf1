"""SQuAD post-processing, model-agnostic and in one place: per-window outputs -> ({qas_id: answer}, {qas_id: n-best
list}, {qas_id: no-answer score}) and the official metrics.

* `squad_nbest`: the simple span head's `[N, 2, L]` start/end logits, as BERT's `run_squad.py`.
* `beam_predictions`: the beam heads' outputs (XLNet's `run_squad.py` `write_predictions`): per example, over the
  windows of its question, every (start i, end j) pair of the beam whose start and end lie in the window's context,
  the start at its max context, end >= start, at most `max_answer_length` tokens; ranked by start_log_prob +
  end_log_prob, mapped to context characters, deduplicated by text, the first `n_best_size` kept. The answer is
  always the best span (never empty); the null odds are the lowest cls_logits over the windows, left to the
  metric's threshold search (`v2`). (The original also drops spans that start or end on a window's last context
  token, `>= paragraph_len - 1`; here every context token can be part of an answer.)

The windows are the models' converters' (`doc_offset`, `paragraph_len`, `token_is_max_context`, `tok_start_to_orig`,
`tok_end_to_orig`, `example_index`).
"""
from __future__ import annotations

import collections
import math
from typing import Any, Mapping, Sequence

import numpy as np

from common import task_metrics


def softmax(scores: Sequence[float]) -> list[float]:
  """Probabilities of `scores` (the original `_compute_softmax`); [] for no scores."""
  if not scores:
    return []
  top = max(scores)
  exps = [math.exp(s - top) for s in scores]
  total = sum(exps)
  return [e / total for e in exps]


def window_span_ok(window: Mapping[str, Any], start: int, end: int, max_answer_length: int) -> bool:
  """(start, end) row positions form a valid answer of `window`: both in its context, start at its max context,
  start <= end, at most `max_answer_length` tokens."""
  offset, length = window['doc_offset'], window['paragraph_len']
  if not (offset <= start < offset + length and offset <= end < offset + length) or end < start:
    return False
  return end - start + 1 <= max_answer_length and window['token_is_max_context'].get(int(start), True)


def span_text(example, window: Mapping[str, Any], start: int, end: int) -> str:
  """The context characters of row positions start..end of `window` (stripped)."""
  offset = window['doc_offset']
  first = window['tok_start_to_orig'][start - offset]
  last = window['tok_end_to_orig'][end - offset]
  return example.context[first:last + 1].strip()


def rows_by_example(windows: Sequence[Mapping[str, Any]]) -> dict[int, list[int]]:
  """{example index: the rows of its windows}, in row order."""
  rows = collections.defaultdict(list)
  for row, window in enumerate(windows):
    rows[window['example_index']].append(row)
  return rows


def nbest_spans(example, windows: Sequence[Mapping[str, Any]], candidates: Sequence[tuple], n_best_size: int
                ) -> list[tuple[str, float, float]]:
  """(text, score part a, score part b) of the best `candidates` `(score, a, b, row, start, end)`: ranked by score
  (stable: ties keep their order), each text once (the first), at most `n_best_size`."""
  seen, entries = set(), []
  for _, a, b, row, start, end in sorted(candidates, key=lambda c: c[0], reverse=True):
    if len(entries) >= n_best_size:
      break
    text = span_text(example, windows[row], start, end)
    if text not in seen:
      seen.add(text)
      entries.append((text, a, b))
  return entries


def beam_predictions(examples: Sequence, windows: Sequence[dict], outputs: Mapping[str, np.ndarray], *,
                     max_answer_length: int = 30, n_best_size: int = 20) -> tuple[dict, dict, dict]:
  """({qas_id: answer}, {qas_id: n-best list}, {qas_id: null odds}) from the beam outputs of every window row.

  An n-best entry is {text, probability (softmax of the kept entries' summed log-probs), start_log_prob,
  end_log_prob}; an example without a valid span gets the single entry {'text': '', ...} with log-probs -1e6, as
  the original. The windows are the converter's (`doc_offset`, `paragraph_len`, `token_is_max_context`,
  `tok_start_to_orig`, `tok_end_to_orig`, `example_index`).
  """
  start_lp = np.asarray(outputs['start_top_log_probs'])
  start_ix = np.asarray(outputs['start_top_index'])
  end_lp = np.asarray(outputs['end_top_log_probs'])
  end_ix = np.asarray(outputs['end_top_index'])
  cls_logits = np.asarray(outputs['cls_logits'])
  start_n_top = start_ix.shape[1]
  end_n_top = end_ix.shape[1] // start_n_top
  answers, nbest, null_odds = {}, {}, {}
  for example_index, rows in rows_by_example(windows).items():
    example = examples[example_index]
    candidates = []  # (score, start_log_prob, end_log_prob, row, start, end) in row, beam order
    for row in rows:
      window = windows[row]
      for i in range(start_n_top):
        s = int(start_ix[row, i])
        for j in range(end_n_top):
          e = int(end_ix[row, i * end_n_top + j])
          if window_span_ok(window, s, e, max_answer_length):
            a, b = float(start_lp[row, i]), float(end_lp[row, i * end_n_top + j])
            candidates.append((a + b, a, b, row, s, e))
    entries = [dict(text=text, start_log_prob=a, end_log_prob=b)
               for text, a, b in nbest_spans(example, windows, candidates, n_best_size)]
    if not entries:
      entries.append(dict(text='', start_log_prob=-1e6, end_log_prob=-1e6))
    probs = softmax([e['start_log_prob'] + e['end_log_prob'] for e in entries])
    nbest[example.qas_id] = [dict(text=e['text'], probability=p, start_log_prob=e['start_log_prob'],
                                  end_log_prob=e['end_log_prob']) for e, p in zip(entries, probs)]
    answers[example.qas_id] = entries[0]['text']
    null_odds[example.qas_id] = float(min(cls_logits[row] for row in rows))
  return answers, nbest, null_odds



def squad_nbest(examples: Sequence, windows: Sequence[dict], logits: np.ndarray, *, max_answer_length: int = 30,
                n_best_size: int = 20, cls_index: Sequence[int] | None = None) -> tuple[dict, dict, dict]:
  """The simple span head's ({qas_id: answer}, {qas_id: n-best list}, {qas_id: no-answer score}) from per-window
  `logits [N, 2, L]` (p_mask applied), as BERT's `run_squad.py`.

  Candidates: per window, the `n_best_size` top starts x top ends that form a valid span (`
  window_span_ok`: in the window's context, start at its max context, start <= end, at most `max_answer_length`
  tokens), ranked by start + end logit over all windows of the example; an n-best entry is {text, probability,
  start_logit, end_logit}, deduplicated by text, the first `n_best_size` kept (a single '' entry when no span is
  valid). The answer is the best span's text ('' when none). The no-answer score is the lowest
  `start[cls] + end[cls] - best span score` over the windows that have a valid span (1e9 when none), `cls` being
  the row's `cls_index` (default 0, BERT's [CLS]).
  """
  answers, nbest, na_scores = {}, {}, {}
  for example_index, rows in rows_by_example(windows).items():
    example = examples[example_index]
    candidates, null_diff = [], np.inf  # (score, start logit, end logit, row, start, end) in encounter order
    for row in rows:
      window = windows[row]
      start_logits, end_logits = logits[row, 0], logits[row, 1]
      starts = np.argsort(-start_logits)[:n_best_size]
      ends = np.argsort(-end_logits)[:n_best_size]
      window_best = -np.inf
      for s in starts:
        for e in ends:
          if window_span_ok(window, int(s), int(e), max_answer_length):
            score = float(start_logits[s] + end_logits[e])
            window_best = max(window_best, score)
            candidates.append((score, float(start_logits[s]), float(end_logits[e]), row, int(s), int(e)))
      cls = int(cls_index[row]) if cls_index is not None else 0
      if np.isfinite(window_best):
        null_diff = min(null_diff, float(start_logits[cls] + end_logits[cls]) - window_best)
    entries = [dict(text=text, start_logit=a, end_logit=b)
               for text, a, b in nbest_spans(example, windows, candidates, n_best_size)]
    answers[example.qas_id] = entries[0]['text'] if entries else ''
    entries = entries or [dict(text='', start_logit=0.0, end_logit=0.0)]
    probs = softmax([e['start_logit'] + e['end_logit'] for e in entries])
    nbest[example.qas_id] = [dict(text=e['text'], probability=p, start_logit=e['start_logit'],
                                  end_logit=e['end_logit']) for e, p in zip(entries, probs)]
    na_scores[example.qas_id] = float(null_diff) if np.isfinite(null_diff) else 1e9
  return answers, nbest, na_scores


def squad_predictions(examples: Sequence, windows: Sequence[dict], logits: np.ndarray, *,
                      max_answer_length: int = 30, n_best_size: int = 20,
                      cls_index: Sequence[int] | None = None) -> tuple[dict, dict]:
  """({qas_id: answer text}, {qas_id: no-answer score}) of the simple span head (see `squad_nbest`)."""
  answers, _, na_scores = squad_nbest(examples, windows, logits, max_answer_length=max_answer_length,
                                      n_best_size=n_best_size, cls_index=cls_index)
  return answers, na_scores


def squad_metrics(task: str, examples: Sequence, answers: Mapping[str, str],
                  na_probs: Mapping[str, float]) -> dict:
  """The official SQuAD metrics: v2.0 (with the best no-answer threshold search over `na_probs`) when the task is
  v2 or any example is unanswerable, else v1.1; numbers only."""
  golds = [{'id': e.qas_id, 'answers': [a['text'] for a in e.answers], 'is_impossible': e.is_impossible}
           for e in examples]
  if any(e.is_impossible for e in examples) or 'v2' in task:
    metrics = task_metrics.squad_v2_evaluate(golds, answers, na_probs)
  else:
    metrics = task_metrics.squad_v1_evaluate(golds, answers)
  return {k: v for k, v in metrics.items() if isinstance(v, (int, float))}


def sigmoid(x: float) -> float:
  return float(1 / (1 + math.exp(-max(min(x, 50.0), -50.0))))


def evaluate(task: str, outputs, features: Mapping[str, np.ndarray], examples: Sequence, windows: Sequence[dict], *,
             beam: bool, max_answer_length: int = 30, n_best_size: int = 20) -> tuple[dict, dict]:
  """(official metrics, {'predictions.json': answers, 'nbest_predictions.json', 'null_odds.json'}) of one evaluated
  split. na_probs for the v2 metrics: the simple head's no-answer score through a sigmoid; the beam head's null
  odds (the answerability logit) as they are (`evaluate-v2.0.py --na-prob-file null_odds.json`; its `best_exact` /
  `best_f1` are the original's reported numbers)."""
  options = dict(max_answer_length=max_answer_length, n_best_size=n_best_size)
  if beam:
    answers, nbest, null_odds = beam_predictions(examples, windows, outputs, **options)
    na_probs = null_odds
  else:
    answers, nbest, null_odds = squad_nbest(examples, windows, outputs, cls_index=features.get('cls_index'),
                                            **options)
    na_probs = {k: sigmoid(v) for k, v in null_odds.items()}
  files = {'predictions.json': answers, 'nbest_predictions.json': nbest, 'null_odds.json': null_odds}
  return squad_metrics(task, examples, answers, na_probs), files
