"""Fine-tuning task metrics with the official definitions: GLUE, SQuAD v1.1 / v2.0, CoNLL NER, multi-seed summaries.

Pure numpy / python (no JAX): these run on the host over gathered predictions, once per evaluation.

GLUE (as the GLUE benchmark and HF `evaluate`'s `glue` metric compute them; fractions in [0, 1]):
  cola, ax              -> mcc                  (Matthews correlation; multi-class R_K for ax's 3 labels)
  sst2, mnli, qnli, rte,
  wnli                  -> accuracy             (mnli matched / mismatched are two calls, one per dev set)
  mrpc, qqp             -> accuracy, f1         (F1 of the positive class, label 1)
  stsb                  -> pearson, spearman, pearson_spearman_mean

SQuAD (as `evaluate-v1.1.py` / `evaluate-v2.0.py`; percentages in [0, 100], like the official scripts):
  answers are normalised (lower-case, ASCII punctuation removed, the words a/an/the removed, whitespace collapsed),
  EM is string equality after normalisation, F1 is the bag-of-tokens overlap; both take the max over gold answers.
  v2 adds unanswerable questions: their only gold answer is '' (an empty prediction scores 1, any text 0), a
  no-answer threshold on `na_probs`, the HasAns / NoAns breakdown and the best-threshold search.

NER (as `conlleval`; fractions in [0, 1]): chunks are (type, start, end) with `end` exclusive; precision, recall and
  F1 are micro-averaged over chunks of all sentences, a chunk counting as correct only if type, start and end all match.

Seeds: `summarize_seeds` reports mean, sample standard deviation (ddof=1) and the raw values of every metric.
"""
from __future__ import annotations

import collections
import logging
import math
import re
import string
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

# ----------------------------------------------------------------------------------------------------------------
# GLUE.
# ----------------------------------------------------------------------------------------------------------------

# Canonical task name -> the metrics reported for it. Aliases (case, '-' and '_' ignored) map onto these names.
GLUE_TASK_METRICS = {
    'cola': ('mcc',),
    'sst2': ('accuracy',),
    'mrpc': ('accuracy', 'f1'),
    'qqp': ('accuracy', 'f1'),
    'stsb': ('pearson', 'spearman', 'pearson_spearman_mean'),
    'mnli': ('accuracy',),
    'qnli': ('accuracy',),
    'rte': ('accuracy',),
    'wnli': ('accuracy',),
    'ax': ('mcc',),
}
_GLUE_ALIASES = {
    'mnlim': 'mnli', 'mnlimm': 'mnli', 'mnlimatched': 'mnli', 'mnlimismatched': 'mnli',
    'diagnostic': 'ax', 'glueax': 'ax',
}


def _as_labels(values, name: str) -> np.ndarray:
  """Label ids `[n]`; logits / probabilities `[n, num_classes]` are reduced by argmax."""
  array = np.asarray(values)
  if array.ndim == 2:
    array = array.argmax(axis=-1)
  if array.ndim != 1:
    raise ValueError(f'{name}: expected shape [n] (or [n, num_classes] scores), got {array.shape}')
  return array


def _check_pair(preds: np.ndarray, labels: np.ndarray) -> None:
  if preds.shape != labels.shape:
    raise ValueError(f'preds and labels differ in shape: {preds.shape} vs {labels.shape}')
  if preds.size == 0:
    raise ValueError('preds and labels are empty')


def accuracy(preds, labels) -> float:
  """Fraction of `preds [n]` equal to `labels [n]` (preds may be `[n, num_classes]` scores, argmax is taken)."""
  preds, labels = _as_labels(preds, 'preds'), _as_labels(labels, 'labels')
  _check_pair(preds, labels)
  return float(np.mean(preds == labels))


def f1_binary(preds, labels, positive=1) -> float:
  """F1 of the class `positive` (sklearn's `f1_score(average='binary')`): 2 TP / (2 TP + FP + FN).

  0.0 when the positive class appears in neither preds nor labels (sklearn's value for that undefined case).
  """
  preds, labels = _as_labels(preds, 'preds'), _as_labels(labels, 'labels')
  _check_pair(preds, labels)
  pred_pos, gold_pos = preds == positive, labels == positive
  tp = int(np.sum(pred_pos & gold_pos))
  fp = int(np.sum(pred_pos & ~gold_pos))
  fn = int(np.sum(~pred_pos & gold_pos))
  denominator = 2 * tp + fp + fn
  return 2.0 * tp / denominator if denominator else 0.0


def matthews_corrcoef(preds, labels) -> float:
  """Matthews correlation coefficient; for more than two classes, Gorodkin's R_K (what sklearn computes).

  From the confusion matrix C (rows gold, columns predicted), with s = n, c = trace(C), t = row sums, p = column sums:
    MCC = (c s - t.p) / sqrt((s^2 - p.p) (s^2 - t.t)).
  0.0 when either side holds a single class (the denominator is zero), as sklearn.
  """
  preds, labels = _as_labels(preds, 'preds'), _as_labels(labels, 'labels')
  _check_pair(preds, labels)
  classes, encoded = np.unique(np.concatenate([labels, preds]), return_inverse=True)
  gold_ids, pred_ids = encoded[:labels.size], encoded[labels.size:]
  confusion = np.zeros((classes.size, classes.size), dtype=np.float64)
  np.add.at(confusion, (gold_ids, pred_ids), 1.0)
  gold_totals, pred_totals = confusion.sum(axis=1), confusion.sum(axis=0)
  n, correct = confusion.sum(), np.trace(confusion)
  covariance = correct * n - pred_totals @ gold_totals
  pred_variance = n * n - pred_totals @ pred_totals
  gold_variance = n * n - gold_totals @ gold_totals
  if pred_variance * gold_variance == 0:
    return 0.0
  return float(covariance / math.sqrt(pred_variance * gold_variance))


def _average_ranks(values: np.ndarray) -> np.ndarray:
  """1-based ranks `[n]` with ties given the mean of the ranks they span (scipy's `rankdata(method='average')`)."""
  order = np.argsort(values, kind='mergesort')
  sorted_values = values[order]
  # Start index of each run of equal values in sorted order.
  run_starts = np.flatnonzero(np.concatenate([[True], sorted_values[1:] != sorted_values[:-1]]))
  run_ends = np.concatenate([run_starts[1:], [values.size]])
  run_ranks = (run_starts + run_ends + 1) / 2.0  # mean of the 1-based ranks start+1 .. end
  ranks = np.empty(values.size, dtype=np.float64)
  ranks[order] = np.repeat(run_ranks, run_ends - run_starts)
  return ranks


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
  x, y = x - x.mean(), y - y.mean()
  denominator = math.sqrt(float(x @ x) * float(y @ y))
  if denominator == 0.0:
    return float('nan')  # a constant input: undefined, as scipy
  return float(np.clip((x @ y) / denominator, -1.0, 1.0))


def pearson_spearman(preds, labels) -> dict:
  """{'pearson', 'spearman'} correlations of `preds [n]` with `labels [n]` (STS-B scores; `[n, 1]` is flattened).

  Spearman is the Pearson correlation of average ranks (ties share their mean rank), as `scipy.stats.spearmanr`.
  NaN when either input is constant, as scipy.
  """
  preds = np.asarray(preds, dtype=np.float64).reshape(-1)
  labels = np.asarray(labels, dtype=np.float64).reshape(-1)
  _check_pair(preds, labels)
  if preds.size < 2:
    raise ValueError('correlations need at least 2 points')
  return {'pearson': _pearson(preds, labels), 'spearman': _pearson(_average_ranks(preds), _average_ranks(labels))}


def glue_task_name(task_name: str) -> str:
  """Canonical GLUE task name ('SST-2' -> 'sst2', 'mnli_mismatched' -> 'mnli', 'STS-B' -> 'stsb')."""
  key = task_name.lower().replace('-', '').replace('_', '')
  key = _GLUE_ALIASES.get(key, key)
  if key not in GLUE_TASK_METRICS:
    raise ValueError(f'task_name: unknown GLUE task {task_name!r}; expected one of {sorted(GLUE_TASK_METRICS)}')
  return key


def glue_metrics(task_name: str, preds, labels) -> dict:
  """The official metric set of one GLUE task (see `GLUE_TASK_METRICS`), as {name: float}.

  preds: label ids `[n]` or class scores `[n, num_classes]` (argmax is taken); for stsb, regression scores `[n]`.
  MNLI's matched and mismatched dev sets are two calls; the caller names the results.
  """
  task = glue_task_name(task_name)
  if task == 'stsb':
    result = pearson_spearman(preds, labels)
    result['pearson_spearman_mean'] = (result['pearson'] + result['spearman']) / 2.0
    return result
  if task in ('cola', 'ax'):
    return {'mcc': matthews_corrcoef(preds, labels)}
  result = {'accuracy': accuracy(preds, labels)}
  if task in ('mrpc', 'qqp'):
    result['f1'] = f1_binary(preds, labels, positive=1)
  return result


# ----------------------------------------------------------------------------------------------------------------
# SQuAD v1.1 and v2.0.
# ----------------------------------------------------------------------------------------------------------------

_ASCII_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r'\b(?:a|an|the)\b')


def squad_normalize(text: str) -> str:
  """The official answer normalisation, in the official order.

  lower-case -> drop ASCII punctuation (`string.punctuation` only: unicode quotes and dashes stay) -> replace the
  whole words a / an / the by a space (word boundaries are unicode-aware: 'theatre' keeps its 'the') -> collapse
  whitespace. Punctuation goes first, so "the." loses its article and "don't" becomes "dont".
  """
  text = ''.join(ch for ch in text.lower() if ch not in _ASCII_PUNCTUATION)
  return ' '.join(_ARTICLES.sub(' ', text).split())


def _token_f1(prediction_tokens: Sequence[str], gold_tokens: Sequence[str]) -> float:
  common = collections.Counter(prediction_tokens) & collections.Counter(gold_tokens)
  overlap = sum(common.values())
  if overlap == 0:
    return 0.0
  precision, recall = overlap / len(prediction_tokens), overlap / len(gold_tokens)
  return 2.0 * precision * recall / (precision + recall)


def squad_em_f1(prediction: str, gold_answers: Sequence[str], version: int = 2) -> tuple[float, float]:
  """(exact match, F1) of one prediction in [0, 1], each the max over `gold_answers`.

  version=2 (`evaluate-v2.0.py`, the default): gold answers that normalise to '' are dropped; with none left the
  question is unanswerable and its gold answer is '' (an empty prediction scores (1, 1), anything else (0, 0)); when
  either side normalises to nothing, F1 is 1 if both do and 0 otherwise.
  version=1 (`evaluate-v1.1.py`): gold answers are used as given (there must be at least one) and F1 is 0 without
  token overlap, even when both sides are empty.
  """
  prediction_norm = squad_normalize(prediction)
  if version == 1:
    if not gold_answers:
      raise ValueError('squad_em_f1(version=1): no gold answers (an unanswerable question needs version=2)')
    golds = [squad_normalize(gold) for gold in gold_answers]
    exact = max(float(prediction_norm == gold) for gold in golds)
    f1 = max(_token_f1(prediction_norm.split(), gold.split()) for gold in golds)
    return exact, f1
  if version != 2:
    raise ValueError(f'version: expected 1 or 2, got {version!r}')
  golds = [normalized for normalized in (squad_normalize(gold) for gold in gold_answers) if normalized] or ['']
  exact = max(float(prediction_norm == gold) for gold in golds)
  prediction_tokens = prediction_norm.split()
  f1 = 0.0
  for gold in golds:
    gold_tokens = gold.split()
    if not gold_tokens or not prediction_tokens:
      f1 = max(f1, float(gold_tokens == prediction_tokens))
    else:
      f1 = max(f1, _token_f1(prediction_tokens, gold_tokens))
  return exact, f1


def _answer_texts(answers: Any) -> list[str]:
  """Gold answer texts from a list of strings, a list of {'text': ...} dicts or an HF-style {'text': [...]} dict."""
  if answers is None:
    return []
  if isinstance(answers, Mapping):
    texts = answers.get('text', [])
    return [texts] if isinstance(texts, str) else list(texts)
  if isinstance(answers, str):
    return [answers]
  return [answer['text'] if isinstance(answer, Mapping) else answer for answer in answers]


def squad_examples(dataset_or_examples: Any) -> list[dict]:
  """Flat examples `[{'id', 'answers': [texts], 'is_impossible': bool}]` from any accepted input.

  Accepts the official SQuAD JSON (the whole file `{'data': [...]}` or its `data` list of articles with
  `paragraphs/qas/answers`), or an already flat list of `{'id', 'answers', 'is_impossible'?}`. A question is
  unanswerable when `is_impossible` is true or, without that field, when it has no answers (the official v2 rule);
  an unanswerable question's answers are dropped (v2.0 files keep `plausible_answers` apart, so nothing is lost).
  """
  data = dataset_or_examples
  if isinstance(data, Mapping):
    if 'data' not in data:
      raise ValueError("dataset: a mapping must be the SQuAD JSON file with a 'data' field")
    data = data['data']
  data = list(data)
  questions: Iterable[Mapping] = data
  if data and 'paragraphs' in data[0]:
    questions = (qa for article in data for paragraph in article['paragraphs'] for qa in paragraph['qas'])
  examples = []
  for qa in questions:
    answers = _answer_texts(qa.get('answers'))
    impossible = bool(qa['is_impossible']) if 'is_impossible' in qa else not answers
    examples.append({'id': qa['id'], 'answers': [] if impossible else answers, 'is_impossible': impossible})
  return examples


def squad_v1_evaluate(dataset_or_examples: Any, predictions: Mapping[str, str]) -> dict:
  """{'exact_match', 'f1'} in percent over all questions, as `evaluate-v1.1.py`.

  predictions: {question id: answer text}. A question without a prediction scores 0 and still counts in the total
  (a warning is logged, as the official script prints one); predictions for unknown ids are ignored.
  """
  examples = squad_examples(dataset_or_examples)
  if not examples:
    raise ValueError('dataset: no questions')
  exact_total = f1_total = 0.0
  missing = 0
  for example in examples:
    if example['id'] not in predictions:
      missing += 1
      continue
    exact, f1 = squad_em_f1(predictions[example['id']], example['answers'], version=1)
    exact_total += exact
    f1_total += f1
  if missing:
    logging.warning('squad_v1_evaluate: %d of %d questions have no prediction; they score 0', missing, len(examples))
  return {'exact_match': 100.0 * exact_total / len(examples), 'f1': 100.0 * f1_total / len(examples)}


def _best_threshold(predictions, raw_scores, na_probs, has_answer) -> tuple[float, float]:
  """`find_best_thresh` of `evaluate-v2.0.py`: (best score in percent, the na_prob threshold that reaches it).

  Start from "every question answered with no-answer" (score = number of unanswerable questions), then walk the
  questions by increasing na_prob, switching each to its predicted text: an answerable one adds its raw score, an
  unanswerable one loses 1 if the prediction string is non-empty. The threshold reported is the na_prob of the
  question after which the running score was strictly best (0.0 if answering nothing is best).
  As in the official script: the non-empty test is on the raw string (a prediction such as 'the' loses 1 here
  although it normalises to ''), and a tie in na_probs can be split by the walk (stable order of `na_probs`).
  """
  score = best = float(sum(not has for has in has_answer.values()))
  best_thresh = 0.0
  for qid in sorted(na_probs, key=lambda key: na_probs[key]):
    if qid not in raw_scores:
      continue
    if has_answer[qid]:
      score += raw_scores[qid]
    elif predictions[qid]:
      score -= 1.0
    if score > best:
      best, best_thresh = score, na_probs[qid]
  return 100.0 * best / len(raw_scores), float(best_thresh)


def squad_v2_evaluate(examples: Any, predictions: Mapping[str, str], na_probs: Mapping[str, float] | None = None,
                      na_prob_thresh: float = 1.0) -> dict:
  """The dict of `evaluate-v2.0.py`, scores in percent.

  examples: the official SQuAD JSON or flat examples (see `squad_examples`). predictions: {id: text}, '' meaning
  "no answer". na_probs: {id: the model's no-answer probability or null odds}; a question with na_prob >
  na_prob_thresh is treated as predicted no-answer (scoring 1 if unanswerable, 0 otherwise).

  Returns exact, f1, total; HasAns_exact/_f1/_total and NoAns_exact/_f1/_total for the groups that occur; with
  na_probs, also best_exact, best_exact_thresh, best_f1, best_f1_thresh (see `_best_threshold`; computed on raw
  scores, independent of na_prob_thresh). Every question needs a prediction (and an na_prob when na_probs are given):
  the official script fails on a missing one too, so evaluate a subset by passing only its examples.
  """
  examples = squad_examples(examples)
  if not examples:
    raise ValueError('examples: no questions')
  has_answer = {example['id']: not example['is_impossible'] for example in examples}
  missing = [qid for qid in has_answer if qid not in predictions]
  if missing:
    raise ValueError(f'predictions: {len(missing)} of {len(has_answer)} questions have none, e.g. {missing[:3]}')
  if na_probs is not None:
    missing = [qid for qid in has_answer if qid not in na_probs]
    if missing:
      raise ValueError(f'na_probs: {len(missing)} of {len(has_answer)} questions have none, e.g. {missing[:3]}')
  raw_exact, raw_f1 = {}, {}
  for example in examples:
    raw_exact[example['id']], raw_f1[example['id']] = squad_em_f1(predictions[example['id']], example['answers'])

  def thresholded(raw: dict) -> dict:  # without na_probs every na_prob is 0.0, as in the official script
    return {qid: float(not has_answer[qid]) if (na_probs[qid] if na_probs is not None else 0.0) > na_prob_thresh
            else score for qid, score in raw.items()}

  exact, f1 = thresholded(raw_exact), thresholded(raw_f1)

  def group(qids: list) -> dict:
    return {'exact': 100.0 * sum(exact[q] for q in qids) / len(qids),
            'f1': 100.0 * sum(f1[q] for q in qids) / len(qids), 'total': len(qids)}

  result = group(list(exact))
  for prefix, wanted in (('HasAns', True), ('NoAns', False)):
    qids = [qid for qid in exact if has_answer[qid] == wanted]
    if qids:
      result.update({f'{prefix}_{key}': value for key, value in group(qids).items()})
  if na_probs is not None:
    result['best_exact'], result['best_exact_thresh'] = _best_threshold(predictions, raw_exact, na_probs, has_answer)
    result['best_f1'], result['best_f1_thresh'] = _best_threshold(predictions, raw_f1, na_probs, has_answer)
  return result


# ----------------------------------------------------------------------------------------------------------------
# NER: conlleval chunks and entity-level F1.
# ----------------------------------------------------------------------------------------------------------------

NER_SCHEMES = ('BIO', 'IOB1')
_SCHEME_ALIASES = {'BIO': 'BIO', 'IOB2': 'BIO', 'IOB1': 'IOB1', 'IOB': 'IOB1'}


def _split_tag(tag: str) -> tuple[str, str]:
  """'B-PER' -> ('B', 'PER'), 'O' -> ('O', '')."""
  if tag == 'O':
    return 'O', ''
  prefix, sep, chunk_type = tag.partition('-')
  if not sep or prefix not in ('B', 'I') or not chunk_type:
    raise ValueError(f"tag {tag!r}: expected 'O', 'B-<type>' or 'I-<type>'")
  return prefix, chunk_type


def ner_spans(tags: Sequence[str], scheme: str = 'BIO') -> list[tuple[str, int, int]]:
  """Chunks of one sentence as [(type, start, end)], `end` exclusive, in order, with conlleval's rules.

  A chunk ends before a tag that is O, B-, or of another type; a chunk starts at every B- tag and at an I- tag that
  does not continue a chunk of its type (after O, at the sentence start, or after another type). So
  `O I-LOC I-LOC` is one LOC chunk, `B-PER B-PER` two PER chunks, `B-PER I-ORG` a PER and an ORG chunk.
  conlleval takes no scheme option because these rules read BIO (IOB2, every chunk opens with B-) and IOB1 (B- only
  between two adjacent chunks of one type) alike; `scheme` ('BIO'/'IOB2' or 'IOB1'/'IOB') names the input and is
  checked, the tags themselves must be 'O', 'B-<type>' or 'I-<type>'.
  """
  if str(scheme).upper() not in _SCHEME_ALIASES:
    raise ValueError(f'scheme: expected one of {NER_SCHEMES} (or IOB2 / IOB), got {scheme!r}')
  spans = []
  start, current_type = None, ''
  for position, tag in enumerate(tags):
    prefix, chunk_type = _split_tag(tag)
    continues = prefix == 'I' and start is not None and chunk_type == current_type
    if continues:
      continue
    if start is not None:
      spans.append((current_type, start, position))
      start = None
    if prefix != 'O':
      start, current_type = position, chunk_type
  if start is not None:
    spans.append((current_type, start, len(tags)))
  return spans


def ner_f1(pred_tag_seqs: Sequence[Sequence[str]], gold_tag_seqs: Sequence[Sequence[str]], scheme: str = 'BIO') -> dict:
  """Entity-level {'precision', 'recall', 'f1'} in [0, 1], micro-averaged over the chunks of all sentences.

  A predicted chunk is correct when a gold chunk of the same sentence has the same type, start and end. precision =
  correct / predicted chunks, recall = correct / gold chunks (each 0 when its denominator is 0, as conlleval), f1 =
  their harmonic mean (0 when both are 0). Sentences are decoded separately: no chunk crosses a sentence boundary.
  """
  pred_tag_seqs, gold_tag_seqs = list(pred_tag_seqs), list(gold_tag_seqs)
  if len(pred_tag_seqs) != len(gold_tag_seqs):
    raise ValueError(f'{len(pred_tag_seqs)} predicted sentences but {len(gold_tag_seqs)} gold sentences')
  num_pred = num_gold = num_correct = 0
  for index, (pred_tags, gold_tags) in enumerate(zip(pred_tag_seqs, gold_tag_seqs)):
    if len(pred_tags) != len(gold_tags):
      raise ValueError(f'sentence {index}: {len(pred_tags)} predicted tags but {len(gold_tags)} gold tags')
    pred_spans, gold_spans = set(ner_spans(pred_tags, scheme)), set(ner_spans(gold_tags, scheme))
    num_pred += len(pred_spans)
    num_gold += len(gold_spans)
    num_correct += len(pred_spans & gold_spans)
  precision = num_correct / num_pred if num_pred else 0.0
  recall = num_correct / num_gold if num_gold else 0.0
  f1 = 2.0 * precision * recall / (precision + recall) if precision + recall else 0.0
  return {'precision': precision, 'recall': recall, 'f1': f1}


# ----------------------------------------------------------------------------------------------------------------
# Multi-seed summaries.
# ----------------------------------------------------------------------------------------------------------------


def mean_std(values: Sequence[float]) -> tuple[float, float]:
  """(mean, sample standard deviation with ddof=1) of `values`; the std of a single value is NaN (undefined)."""
  array = np.asarray(values, dtype=np.float64).reshape(-1)
  if array.size == 0:
    raise ValueError('mean_std: no values')
  std = float(np.std(array, ddof=1)) if array.size > 1 else float('nan')
  return float(np.mean(array)), std


def summarize_seeds(results: Sequence[Mapping[str, Any]]) -> dict:
  """{metric: {'mean', 'std', 'values'}} over runs with different seeds (one metric dict per run).

  std is the sample standard deviation (ddof=1; NaN for a single run). Every run must report the same numeric
  metrics; non-numeric entries (strings, nested dicts) are skipped. Metric order follows the first run.
  """
  results = list(results)
  if not results:
    raise ValueError('summarize_seeds: no runs')

  def is_number(value) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)

  names = [name for name, value in results[0].items() if is_number(value)]
  summary = {}
  for name in names:
    values = []
    for run, result in enumerate(results):
      if name not in result or not is_number(result[name]):
        raise ValueError(f'summarize_seeds: run {run} has no numeric {name!r}')
      values.append(float(result[name]))
    mean, std = mean_std(values)
    summary[name] = {'mean': mean, 'std': std, 'values': values}
  extra = sorted({name for result in results[1:] for name, value in result.items() if is_number(value)} - set(names))
  if extra:
    raise ValueError(f'summarize_seeds: metrics {extra} are missing from run 0')
  return summary
