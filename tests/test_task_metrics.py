"""Tests for common/task_metrics.py: GLUE metrics on hand-computed confusion matrices and against scipy, SQuAD
normalisation / EM / F1 / v2 no-answer handling and best-threshold search on hand-made examples, conlleval chunking
and entity F1, multi-seed summaries. Exact values where the arithmetic is exact, else 1e-12 absolute.
"""
import math

import numpy as np
import pytest
import scipy.stats

from common import task_metrics as tm

# ----------------------------------------------------------------------------------------------------------------
# GLUE.
# ----------------------------------------------------------------------------------------------------------------

# Binary confusion matrix: TP=6, TN=3, FP=1, FN=2 (n=12).
BINARY_LABELS = [1] * 6 + [0] * 3 + [0] * 1 + [1] * 2
BINARY_PREDS = [1] * 6 + [0] * 3 + [1] * 1 + [0] * 2


def test_accuracy_and_f1_on_hand_counted_confusion_matrix():
  assert tm.accuracy(BINARY_PREDS, BINARY_LABELS) == pytest.approx(9 / 12)
  # 2TP / (2TP + FP + FN) = 12 / 15.
  assert tm.f1_binary(BINARY_PREDS, BINARY_LABELS) == pytest.approx(0.8)
  # Class 0 as positive: TP=3, FP=2, FN=1 -> 6 / 9.
  assert tm.f1_binary(BINARY_PREDS, BINARY_LABELS, positive=0) == pytest.approx(2 / 3)
  # No positive anywhere: undefined, 0.0 as sklearn.
  assert tm.f1_binary([0, 0], [0, 0]) == 0.0
  # Class scores [n, 2] are reduced by argmax.
  logits = np.eye(2)[BINARY_PREDS] * 3.0 - 1.0
  assert tm.accuracy(logits, BINARY_LABELS) == pytest.approx(0.75)


def test_mcc_binary_hand_computed():
  # (TP TN - FP FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)) = (18 - 2) / sqrt(7 * 8 * 4 * 5).
  assert tm.matthews_corrcoef(BINARY_PREDS, BINARY_LABELS) == pytest.approx(16 / math.sqrt(1120), abs=1e-12)
  assert tm.matthews_corrcoef([0, 1, 1, 0], [0, 1, 1, 0]) == pytest.approx(1.0)
  assert tm.matthews_corrcoef([1, 0, 0, 1], [0, 1, 1, 0]) == pytest.approx(-1.0)


def test_mcc_degenerate_single_class_is_zero():
  assert tm.matthews_corrcoef([1, 1, 1, 1], [0, 1, 0, 1]) == 0.0  # predictions all one class
  assert tm.matthews_corrcoef([0, 1, 0, 1], [1, 1, 1, 1]) == 0.0  # labels all one class
  assert tm.matthews_corrcoef([1, 1, 1], [1, 1, 1]) == 0.0  # both, even though every prediction is right


def test_mcc_multiclass_hand_computed():
  # Confusion (rows gold, columns predicted) [[3,1,0],[0,2,1],[1,0,2]]: n=10, trace=7, row/col sums [4,3,3].
  # (7*10 - 34) / sqrt((100 - 34) * (100 - 34)) = 36 / 66.
  confusion = [[3, 1, 0], [0, 2, 1], [1, 0, 2]]
  labels, preds = [], []
  for gold, row in enumerate(confusion):
    for pred, count in enumerate(row):
      labels += [gold] * count
      preds += [pred] * count
  assert tm.matthews_corrcoef(preds, labels) == pytest.approx(6 / 11, abs=1e-12)
  assert tm.glue_metrics('ax', preds, labels) == {'mcc': pytest.approx(6 / 11, abs=1e-12)}


def test_pearson_spearman_match_scipy_with_ties():
  rng = np.random.default_rng(0)
  labels = np.round(rng.uniform(0, 5, size=200), 1)  # rounded: many ties, as STS-B gold scores
  preds = np.round(labels + rng.normal(0, 1.0, size=200), 1)
  result = tm.pearson_spearman(preds, labels)
  assert result['pearson'] == pytest.approx(scipy.stats.pearsonr(preds, labels)[0], abs=1e-12)
  assert result['spearman'] == pytest.approx(scipy.stats.spearmanr(preds, labels)[0], abs=1e-12)
  # Hand example: ranks of [1, 2, 2, 3] are [1, 2.5, 2.5, 4].
  small = tm.pearson_spearman([1.0, 2.0, 2.0, 3.0], [1.0, 2.0, 3.0, 4.0])
  assert small['spearman'] == pytest.approx(scipy.stats.spearmanr([1, 2, 2, 3], [1, 2, 3, 4])[0], abs=1e-12)
  assert math.isnan(tm.pearson_spearman([1.0, 1.0, 1.0], [1.0, 2.0, 3.0])['pearson'])


def test_glue_metrics_official_sets_per_task():
  assert set(tm.glue_metrics('CoLA', BINARY_PREDS, BINARY_LABELS)) == {'mcc'}
  for task in ('SST-2', 'mnli', 'mnli_mismatched', 'MNLI-mm', 'qnli', 'rte', 'wnli'):
    assert tm.glue_metrics(task, BINARY_PREDS, BINARY_LABELS) == {'accuracy': pytest.approx(0.75)}
  for task in ('mrpc', 'QQP'):
    assert tm.glue_metrics(task, BINARY_PREDS, BINARY_LABELS) == {'accuracy': pytest.approx(0.75),
                                                                   'f1': pytest.approx(0.8)}
  stsb = tm.glue_metrics('STS-B', [[0.5], [2.0], [1.0], [4.5]], [0.0, 2.5, 1.5, 5.0])
  assert set(stsb) == {'pearson', 'spearman', 'pearson_spearman_mean'}
  assert stsb['spearman'] == pytest.approx(1.0)
  assert stsb['pearson_spearman_mean'] == pytest.approx((stsb['pearson'] + stsb['spearman']) / 2)
  with pytest.raises(ValueError, match='unknown GLUE task'):
    tm.glue_metrics('squad', [1], [1])
  with pytest.raises(ValueError, match='shape'):
    tm.accuracy([1, 0], [1, 0, 1])


# ----------------------------------------------------------------------------------------------------------------
# SQuAD.
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize('text, expected', [
    ('The Theatre', 'theatre'),                      # article inside a word is kept
    ('anthem athens thereof', 'anthem athens thereof'),
    ('A cat, an apple & the dog.', 'cat apple dog'),  # punctuation, then articles, then whitespace
    ('The  a  an', ''),                              # only articles -> empty
    ('the.', ''),                                    # punctuation is removed before the article test
    ("Don't stop", 'dont stop'),
    ('  Hello\tworld\n ', 'hello world'),
    ('ÜBER the Straße', 'über straße'),              # unicode letters lower-cased and kept
    ('Café “Noir”', 'café “noir”'),                  # non-ASCII punctuation is not removed
    ('a—b', '—b'),                                   # the em dash is a word boundary, so 'a' is an article
])
def test_squad_normalize(text, expected):
  assert tm.squad_normalize(text) == expected


def test_squad_em_f1_multiple_gold_answers():
  # pred tokens [cat, sat, on, mat] vs gold [cat, on, mat]: P = 3/4, R = 1 -> F1 = 6/7; 'dog' scores 0.
  assert tm.squad_em_f1('the cat sat on mat', ['a cat on the mat', 'dog']) == (0.0, pytest.approx(6 / 7))
  # Max over golds: one of them matches exactly after normalisation.
  assert tm.squad_em_f1('the cat sat on mat', ['dog', 'Cat sat on the mat.']) == (1.0, 1.0)
  # Token counts are clipped: [cat, cat, dog] vs [cat, dog, dog] share 2 tokens -> P = R = 2/3.
  assert tm.squad_em_f1('cat cat dog', ['cat dog dog']) == (0.0, pytest.approx(2 / 3))
  assert tm.squad_em_f1('Paris', ['London']) == (0.0, 0.0)


def test_squad_em_f1_v1_versus_v2_on_empty_answers():
  # v2: an unanswerable question's gold is '', an empty prediction scores 1, any text 0.
  assert tm.squad_em_f1('', []) == (1.0, 1.0)
  assert tm.squad_em_f1('the', []) == (1.0, 1.0)  # normalises to ''
  assert tm.squad_em_f1('Paris', []) == (0.0, 0.0)
  assert tm.squad_em_f1('', ['Paris']) == (0.0, 0.0)
  # A gold that normalises to '' is dropped in v2; v1 keeps it and gives F1 0 without token overlap.
  assert tm.squad_em_f1('', ['the']) == (1.0, 1.0)
  assert tm.squad_em_f1('', ['the'], version=1) == (1.0, 0.0)
  with pytest.raises(ValueError, match='no gold answers'):
    tm.squad_em_f1('x', [], version=1)


def _squad_json(questions):
  """Official SQuAD JSON structure from (id, answers, is_impossible) triples (one paragraph per two questions)."""
  paragraphs = []
  for i in range(0, len(questions), 2):
    qas = []
    for qid, answers, impossible in questions[i:i + 2]:
      qa = {'id': qid, 'question': 'q?', 'answers': [{'text': a, 'answer_start': 0} for a in answers]}
      if impossible is not None:
        qa['is_impossible'] = impossible
        if impossible:
          qa['plausible_answers'] = [{'text': 'plausible', 'answer_start': 0}]
      qas.append(qa)
    paragraphs.append({'context': 'ctx', 'qas': qas})
  return {'version': 'v2.0', 'data': [{'title': 't', 'paragraphs': paragraphs}]}


def test_squad_v1_evaluate_official_and_flat_inputs():
  questions = [('q1', ['Denver Broncos', 'The Broncos'], None), ('q2', ['Santa Clara'], None),
               ('q3', ['Levi\'s Stadium'], None)]
  predictions = {'q1': 'Broncos', 'q2': 'Santa Clara, California', 'q4': 'ignored'}
  # q1: EM 1 ('broncos' == 'broncos'), F1 1; q2: EM 0, F1 = 2 * 1 * (2/3) / (5/3) = 0.8; q3 missing: 0 in a total of 3.
  expected = {'exact_match': pytest.approx(100 / 3), 'f1': pytest.approx(180 / 3)}
  assert tm.squad_v1_evaluate(_squad_json(questions), predictions) == expected
  assert tm.squad_v1_evaluate(_squad_json(questions)['data'], predictions) == expected
  flat = [{'id': qid, 'answers': answers} for qid, answers, _ in questions]
  assert tm.squad_v1_evaluate(flat, predictions) == expected


V2_QUESTIONS = [('q1', ['Denver Broncos'], False), ('q2', ['Santa Clara', "Levi's Stadium"], False),
                ('q3', [], True), ('q4', [], True)]
V2_PREDICTIONS = {'q1': 'Denver Broncos', 'q2': '', 'q3': '', 'q4': 'Paris'}


def test_squad_v2_no_answer_handling_and_breakdown():
  result = tm.squad_v2_evaluate(_squad_json(V2_QUESTIONS), V2_PREDICTIONS)
  # q1 right, q2 empty on an answerable question (0), q3 empty on an impossible one (1), q4 text on it (0).
  assert result == {'exact': 50.0, 'f1': 50.0, 'total': 4, 'HasAns_exact': 50.0, 'HasAns_f1': 50.0,
                    'HasAns_total': 2, 'NoAns_exact': 50.0, 'NoAns_f1': 50.0, 'NoAns_total': 2}
  flat = [{'id': qid, 'answers': answers, 'is_impossible': imp} for qid, answers, imp in V2_QUESTIONS]
  assert tm.squad_v2_evaluate(flat, V2_PREDICTIONS) == result
  # Without is_impossible, no answers means unanswerable (the official rule).
  assert tm.squad_v2_evaluate(_squad_json([(q, a, None) for q, a, _ in V2_QUESTIONS]), V2_PREDICTIONS) == result
  # Threshold 0.5: q3 and q4 (na_prob > 0.5) become no-answer predictions and are right.
  na_probs = {'q1': 0.1, 'q2': 0.2, 'q3': 0.9, 'q4': 0.8}
  thresholded = tm.squad_v2_evaluate(flat, V2_PREDICTIONS, na_probs=na_probs, na_prob_thresh=0.5)
  assert thresholded['exact'] == 75.0 and thresholded['NoAns_exact'] == 100.0 and thresholded['HasAns_exact'] == 50.0
  assert {'best_exact', 'best_exact_thresh', 'best_f1', 'best_f1_thresh'} <= set(thresholded)
  assert 'best_exact' not in result
  with pytest.raises(ValueError, match='predictions: 1 of 4'):
    tm.squad_v2_evaluate(flat, {k: v for k, v in V2_PREDICTIONS.items() if k != 'q4'})


def test_squad_v2_best_threshold_hand_made():
  examples = [
      {'id': 'q1', 'answers': ['Denver Broncos'], 'is_impossible': False},       # EM 1, F1 1
      {'id': 'q2', 'answers': [], 'is_impossible': True},                        # text on impossible: -1 if answered
      {'id': 'q3', 'answers': ['big red barn'], 'is_impossible': False},         # EM 0, F1 0.5
      {'id': 'q4', 'answers': ['north south east west'], 'is_impossible': False},  # EM 0, F1 0.75
  ]
  predictions = {'q1': 'Denver Broncos', 'q2': 'foo', 'q3': 'red', 'q4': 'north south east up'}
  na_probs = {'q1': 0.1, 'q2': 0.3, 'q3': 0.5, 'q4': 0.7}
  result = tm.squad_v2_evaluate(examples, predictions, na_probs=na_probs)
  # Walk by na_prob from "all no-answer" (score 1, from q2): EM 2 @0.1, 1, 1, 1 -> best 2/4 at 0.1;
  # F1 2 @0.1, 1, 1.5, 2.25 @0.7 -> best 2.25/4 at 0.7.
  assert result['best_exact'] == pytest.approx(50.0) and result['best_exact_thresh'] == 0.1
  assert result['best_f1'] == pytest.approx(56.25) and result['best_f1_thresh'] == 0.7
  assert result['exact'] == pytest.approx(25.0) and result['f1'] == pytest.approx(56.25)  # thresh 1.0: all answered
  # The best scores are what applying the best thresholds gives, and no candidate threshold does better.
  at = {t: tm.squad_v2_evaluate(examples, predictions, na_probs=na_probs, na_prob_thresh=t)
        for t in [0.0] + list(na_probs.values())}
  assert at[0.1]['exact'] == pytest.approx(result['best_exact'])
  assert at[0.7]['f1'] == pytest.approx(result['best_f1'])
  assert max(r['exact'] for r in at.values()) == pytest.approx(result['best_exact'])
  assert max(r['f1'] for r in at.values()) == pytest.approx(result['best_f1'])


def test_squad_v2_best_threshold_answering_nothing_is_best():
  examples = [{'id': 'a', 'answers': [], 'is_impossible': True},
              {'id': 'b', 'answers': ['x y'], 'is_impossible': False}]
  result = tm.squad_v2_evaluate(examples, {'a': 'wrong', 'b': 'z'}, na_probs={'a': 0.2, 'b': 0.6})
  assert result['best_exact'] == 50.0 and result['best_exact_thresh'] == 0.0


# ----------------------------------------------------------------------------------------------------------------
# NER.
# ----------------------------------------------------------------------------------------------------------------


def test_ner_spans_bio_tricky_sequences():
  tags = ['B-PER', 'I-PER', 'O', 'I-LOC', 'I-LOC', 'B-LOC', 'I-ORG', 'B-ORG', 'I-ORG']
  assert tm.ner_spans(tags, 'BIO') == [
      ('PER', 0, 2),  # B- I-
      ('LOC', 3, 5),  # I- after O starts a chunk
      ('LOC', 5, 6),  # B- of the same type splits
      ('ORG', 6, 7),  # I- of another type starts a chunk
      ('ORG', 7, 9),
  ]
  assert tm.ner_spans(['I-PER'], 'BIO') == [('PER', 0, 1)]  # I- at the sentence start
  assert tm.ner_spans(['B-PER', 'I-ORG', 'I-PER'], 'IOB2') == [('PER', 0, 1), ('ORG', 1, 2), ('PER', 2, 3)]
  assert tm.ner_spans(['O', 'O'], 'BIO') == []
  assert tm.ner_spans([], 'BIO') == []


def test_ner_spans_iob1():
  # IOB1: chunks open with I-; B- only separates two adjacent chunks of one type.
  tags = ['I-PER', 'I-PER', 'B-PER', 'I-LOC', 'O', 'I-MISC', 'B-MISC', 'I-MISC']
  assert tm.ner_spans(tags, 'IOB1') == [('PER', 0, 2), ('PER', 2, 3), ('LOC', 3, 4), ('MISC', 5, 6), ('MISC', 6, 8)]
  # The conlleval rules decode both schemes alike.
  assert tm.ner_spans(tags, 'BIO') == tm.ner_spans(tags, 'IOB1')


def test_ner_spans_rejects_bad_input():
  with pytest.raises(ValueError, match='scheme'):
    tm.ner_spans(['O'], 'BILOU')
  with pytest.raises(ValueError, match="tag 'E-PER'"):
    tm.ner_spans(['E-PER'], 'BIO')
  with pytest.raises(ValueError, match="tag 'PER'"):
    tm.ner_spans(['PER'], 'BIO')


def test_ner_f1_hand_made():
  gold = [['B-PER', 'I-PER', 'O', 'B-LOC'],            # PER(0,2) LOC(3,4)
          ['B-ORG', 'I-ORG', 'I-ORG', 'O', 'B-MISC'],  # ORG(0,3) MISC(4,5)
          ['O', 'B-PER', 'I-PER']]                     # PER(1,3)
  pred = [['B-PER', 'I-PER', 'O', 'B-ORG'],            # PER right, ORG(3,4) wrong type
          ['B-ORG', 'I-ORG', 'I-ORG', 'O', 'O'],       # ORG right, MISC missed
          ['O', 'I-PER', 'I-PER']]                     # I- after O: PER(1,3), right
  # 4 predicted, 5 gold, 3 correct: P = 3/4, R = 3/5, F1 = 2/3.
  result = tm.ner_f1(pred, gold, 'BIO')
  assert result == {'precision': pytest.approx(0.75), 'recall': pytest.approx(0.6), 'f1': pytest.approx(2 / 3)}
  # A boundary error is simply wrong: ORG(0,2) against ORG(0,3).
  assert tm.ner_f1([['B-ORG', 'I-ORG', 'O']], [['B-ORG', 'I-ORG', 'I-ORG']], 'BIO')['f1'] == 0.0
  # No chunk crosses sentences: two one-token PERs, not one two-token PER.
  assert tm.ner_f1([['I-PER'], ['I-PER']], [['B-PER'], ['B-PER']], 'BIO')['f1'] == 1.0
  assert tm.ner_f1([['O']], [['O']], 'BIO') == {'precision': 0.0, 'recall': 0.0, 'f1': 0.0}
  with pytest.raises(ValueError, match='sentence 0'):
    tm.ner_f1([['O']], [['O', 'O']], 'BIO')


# ----------------------------------------------------------------------------------------------------------------
# Multi-seed summaries.
# ----------------------------------------------------------------------------------------------------------------


def test_mean_std_and_summarize_seeds():
  mean, std = tm.mean_std([0.8, 0.9, 0.85])
  assert mean == pytest.approx(0.85) and std == pytest.approx(0.05)  # sample std: sqrt(0.005 / 2)
  assert math.isnan(tm.mean_std([1.0])[1])
  runs = [{'accuracy': 0.8, 'f1': 0.7, 'task': 'mrpc'}, {'accuracy': 0.9, 'f1': 0.75, 'task': 'mrpc'},
          {'accuracy': 0.85, 'f1': 0.8, 'task': 'mrpc'}]
  summary = tm.summarize_seeds(runs)
  assert list(summary) == ['accuracy', 'f1']
  assert summary['accuracy']['mean'] == pytest.approx(0.85) and summary['accuracy']['std'] == pytest.approx(0.05)
  assert summary['f1']['values'] == [0.7, 0.75, 0.8]
  assert summary['f1']['std'] == pytest.approx(np.std([0.7, 0.75, 0.8], ddof=1))
  with pytest.raises(ValueError, match="run 1 has no numeric 'f1'"):
    tm.summarize_seeds([{'f1': 1.0}, {'accuracy': 1.0}])
  with pytest.raises(ValueError, match='missing from run 0'):
    tm.summarize_seeds([{'f1': 1.0}, {'f1': 1.0, 'accuracy': 1.0}])
