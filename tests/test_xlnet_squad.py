"""XLNet's SQuAD beam-search heads (`xlnet_jax.squad_heads` on `xlnet_jax.heads`, task kind 'squad_beam').

Parity with `transformers.XLNetForQuestionAnswering` on a tiny random-weight model (every parameter perturbed so
LayerNorm scales / biases are not 1 / 0): our weights are loaded into it (`xlnet_jax.export.params_to_hf` for the
encoder, `heads.beam_head_to_hf` for the heads) and, on a right-padded SQuAD-shaped batch with p_mask and
cls_index, the training loss (through our trainer objective) and the inference outputs (top start / end
log-probabilities and indices, cls_logits) must agree within 1e-5 (float32, matmul precision 'highest').
`transformers` returns softmax probabilities under the log-prob names and flattens the end beam end-major; the
test compares log(their probs) and reorders their end beam into ours (start-major).

Fine-tuning: crafted SQuAD v1.1 and v2.0 questions (three short contexts, a small sentencepiece model trained on
them) go through the converter, the trainer objective (100 full-batch Adam steps on one device), `finetune.predict`
and the metrics: the v1.1 questions get their exact answers, the v2.0 answerable one its answer and the
unanswerable ones positive null odds (the answerable ones negative), so EM is 100 at the official threshold.

Post-processing: `squad_predictions.beam_predictions` and `squad_predictions.squad_nbest` on hand-made windows and
outputs return the expected n-best lists, answers and null odds.
"""
import math

import jax
import numpy as np
import pytest
import optax
import torch
import transformers
from flax import linen as nn

from common import finetune, squad_predictions, tasks
from xlnet_jax import export, finetune_data, heads
from xlnet_jax import model as xlnet_model
from xlnet_jax import tokenizer as xlnet_tokenizer

ATOL = 1e-5
BATCH, LENGTH, START_N_TOP, END_N_TOP = 4, 20, 3, 4


def _config():
  return xlnet_model.model_config(vocab_size=120, d_model=32, n_layer=2, n_head=4, d_head=8, d_inner=64,
                                  dropout=0.0, dropatt=0.0, initializer_range=0.1)


def _batch(seed=0):
  """A SQuAD-shaped batch as the XLNet converter lays it out: `context <sep> question <sep> <cls>` padded on the
  right (segments 0 / 1 / 2 / 3), p_mask 0 on context and <cls>, gold positions in the context or at <cls>."""
  rng = np.random.RandomState(seed)
  ids = rng.randint(5, 120, (BATCH, LENGTH)).astype(np.int32)
  segments = np.full((BATCH, LENGTH), 3, np.int32)
  mask = np.zeros((BATCH, LENGTH), np.int32)
  p_mask = np.ones((BATCH, LENGTH), np.int32)
  cls_index = np.zeros(BATCH, np.int32)
  start = np.zeros(BATCH, np.int32)
  end = np.zeros(BATCH, np.int32)
  impossible = np.zeros(BATCH, np.int32)
  for b, (context, question) in enumerate([(10, 5), (8, 4), (12, 5), (9, 3)]):
    length = context + question + 3
    segments[b, :context + 1] = 0
    segments[b, context + 1:length - 1] = 1
    segments[b, length - 1] = 2
    mask[b, :length] = 1
    p_mask[b, :context] = 0
    p_mask[b, length - 1] = 0
    cls_index[b] = length - 1
    if b == 2:  # An unanswerable window: both positions at <cls>.
      start[b] = end[b] = length - 1
      impossible[b] = 1
    else:
      start[b] = rng.randint(0, context - 2)
      end[b] = start[b] + rng.randint(0, 3)
  return dict(input_ids=ids, segment_ids=segments, input_mask=mask, p_mask=p_mask, cls_index=cls_index,
              start_position=start, end_position=end, is_impossible=impossible)


def build_models():
  """(our head module, its trainer objective, our perturbed params, the transformers model holding the same
  weights)."""
  cfg = _config()
  head = heads.make_head(cfg, 'squad_beam', 2, start_n_top=START_N_TOP, end_n_top=END_N_TOP)
  batch = _batch()
  objective = finetune.make_objective(head, 'squad_beam', batch, 1.0, LENGTH)
  params = nn.meta.unbox(jax.jit(objective.init_variables)(jax.random.PRNGKey(0)))['params']
  rng = np.random.RandomState(1)
  params = jax.tree.map(lambda x: (np.asarray(x) + 0.1 * rng.standard_normal(x.shape)).astype(np.float32), params)
  hf_config = transformers.XLNetConfig(**export.config_to_hf(cfg), start_n_top=START_N_TOP, end_n_top=END_N_TOP)
  model = transformers.XLNetForQuestionAnswering(hf_config).float().eval()
  state = {k: v for k, v in export.params_to_hf(
      {'transformer': params['transformer'], 'lm_loss': {'bias': np.zeros(cfg.vocab_size, np.float32)}}, cfg).items()
           if k.startswith('transformer.')}
  state.update(heads.beam_head_to_hf(params))
  model.load_state_dict({k: torch.tensor(v) for k, v in state.items()}, strict=True)
  return head, objective, params, model


@pytest.fixture(scope='module')
def models():
  return build_models()


def _hf(model, batch, training):
  inputs = dict(input_ids=torch.tensor(batch['input_ids'], dtype=torch.long),
                token_type_ids=torch.tensor(batch['segment_ids'], dtype=torch.long),
                attention_mask=torch.tensor(batch['input_mask'], dtype=torch.float),
                p_mask=torch.tensor(batch['p_mask'], dtype=torch.float),
                cls_index=torch.tensor(batch['cls_index'], dtype=torch.long))
  if training:
    inputs.update(start_positions=torch.tensor(batch['start_position'], dtype=torch.long),
                  end_positions=torch.tensor(batch['end_position'], dtype=torch.long),
                  is_impossible=torch.tensor(batch['is_impossible'], dtype=torch.float))
  with torch.no_grad():
    return model(**inputs)


def _close(ours, theirs, what):
  ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
  assert ours.shape == theirs.shape, f'{what}: shape {ours.shape} != {theirs.shape}'
  err = float(np.abs(ours - theirs).max())
  assert err < ATOL, f'{what} differ by {err:.3g} > {ATOL}'
  return err


def test_training_loss_matches_transformers(models):
  head, objective, params, model = models
  batch = _batch()
  norms = objective.normalizers(batch)
  loss, (sums, _) = jax.jit(objective.loss_fn, static_argnums=5)(params, batch, None, {}, norms, False)
  theirs = float(_hf(model, batch, training=True).loss)
  assert 0.5 < theirs < 20
  err = _close(loss, theirs, 'training loss')
  print(f'training loss {float(loss):.6f} vs transformers {theirs:.6f}: |diff| {err:.2e}')
  # The answerability part alone: transformers without is_impossible / cls_index has no BCE term.
  with torch.no_grad():
    span_only = float(model(input_ids=torch.tensor(batch['input_ids'], dtype=torch.long),
                            token_type_ids=torch.tensor(batch['segment_ids'], dtype=torch.long),
                            attention_mask=torch.tensor(batch['input_mask'], dtype=torch.float),
                            p_mask=torch.tensor(batch['p_mask'], dtype=torch.float),
                            start_positions=torch.tensor(batch['start_position'], dtype=torch.long),
                            end_positions=torch.tensor(batch['end_position'], dtype=torch.long)).loss)
  _close(0.5 * float(sums['cls_loss']) / BATCH, theirs - span_only, 'answerability loss')


def test_inference_outputs_match_transformers(models):
  head, _, params, model = models
  batch = _batch()
  ours = finetune.predict(head, params, batch, batch_size=BATCH, kind='squad_beam')
  theirs = _hf(model, batch, training=False)
  errors = {}
  np.testing.assert_array_equal(ours['start_top_index'], theirs.start_top_index.numpy())
  errors['start_top_log_probs'] = _close(ours['start_top_log_probs'], np.log(theirs.start_top_log_probs.numpy()),
                                         'start top log-probs')

  def start_major(x):  # transformers: [B, end_n_top, start_n_top] flattened; ours [B, start_n_top, end_n_top].
    return x.reshape(BATCH, END_N_TOP, START_N_TOP).transpose(0, 2, 1).reshape(BATCH, -1)

  np.testing.assert_array_equal(ours['end_top_index'], start_major(theirs.end_top_index.numpy()))
  errors['end_top_log_probs'] = _close(ours['end_top_log_probs'],
                                       np.log(start_major(theirs.end_top_log_probs.numpy())), 'end top log-probs')
  errors['cls_logits'] = _close(ours['cls_logits'], theirs.cls_logits.numpy(), 'cls_logits')
  assert np.abs(theirs.cls_logits.numpy()).max() > 0.05, 'cls_logits too small for the comparison to mean anything'
  # Every start and end in the beam is a position the answer may take (context or <cls>).
  for key in ('start_top_index', 'end_top_index'):
    assert not np.take_along_axis(batch['p_mask'], ours[key], axis=1).any()
  print('max |diff|:', {k: f'{v:.2e}' for k, v in errors.items()})


# ----------------------------------------------------------------------------------------------------------------
# Fine-tuning on crafted questions.
# ----------------------------------------------------------------------------------------------------------------

KITE = 'Tom keeps a red kite in the garden shed behind the old house.'
COLLEGE = 'The university was founded in 1842 by Father Edward Sorin.'
BICYCLE = 'Anna rides her blue bicycle to the market every Sunday morning.'


def _example(qas_id, question, context, answer=None):
  answers = [] if answer is None else [{'text': answer, 'answer_start': context.index(answer)}]
  return tasks.SquadExample(qas_id, question, context, answers, is_impossible=answer is None)


V1 = [_example('v1-kite', 'What colour is the kite?', KITE, 'red'),
      _example('v1-year', 'When was the university founded?', COLLEGE, '1842'),
      _example('v1-founder', 'Who founded the university?', COLLEGE, 'Father Edward Sorin')]
V2 = [_example('v2-ride', 'What does Anna ride to the market?', BICYCLE, 'her blue bicycle'),
      _example('v2-boat', 'Where does Tom keep his boat?', KITE),
      _example('v2-aunt', 'When does Anna visit her aunt?', BICYCLE)]


def test_crafted_questions_are_learned(tmp_path):
  corpus = tmp_path / 'text.txt'
  corpus.write_text('\n'.join([KITE, COLLEGE, BICYCLE] + [e.question for e in V1 + V2]) * 5)
  tokenizer = xlnet_tokenizer.load_tokenizer(xlnet_tokenizer.train_sentencepiece([str(corpus)], 150,
                                                                                 str(tmp_path / 'sp')))
  cfg = _config().copy_and_resolve_references()
  cfg.vocab_size = tokenizer.vocab_size
  config = finetune.finetune_config(n_best_size=5)
  length = 64

  def convert(examples, is_training):
    features, windows = finetune_data.convert_squad_examples(examples, tokenizer, length, doc_stride=32,
                                                             max_query_length=16, is_training=is_training)
    assert len(windows) == len(examples)  # One window each: every context fits.
    return features, windows

  train = finetune.batch_features('squad_beam', convert(V1 + V2, True)[0])
  head = heads.make_head(cfg, 'squad_beam', 2, start_n_top=3, end_n_top=3)
  objective = finetune.make_objective(head, 'squad_beam', train, 1.0, length)
  params = nn.meta.unbox(jax.jit(objective.init_variables)(jax.random.PRNGKey(0)))['params']
  tx = optax.adam(3e-3)
  norms = objective.normalizers(train)

  @jax.jit
  def step(params, opt_state):
    (loss, _), grads = jax.value_and_grad(objective.loss_fn, has_aux=True)(params, train, jax.random.PRNGKey(1), {},
                                                                          norms, True)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  opt_state = tx.init(params)
  for _ in range(100):
    params, opt_state, loss = step(params, opt_state)
  assert float(loss) < 0.05, float(loss)

  (v1, v1_windows), (v2, v2_windows) = convert(V1, False), convert(V2, False)
  outputs = finetune.predict(head, params, {k: np.concatenate([v1[k], v2[k]]) for k in v1}, len(V1 + V2),
                             kind='squad_beam')
  first, rest = ({k: v[:len(V1)] for k, v in outputs.items()}, {k: v[len(V1):] for k, v in outputs.items()})
  metrics, files = finetune.evaluate_predictions('squad/v1.1', 'squad_beam', first, v1, V1, v1_windows, config=config)
  assert files['predictions.json'] == {e.qas_id: e.answers[0]['text'] for e in V1}
  assert metrics == {'exact_match': 100.0, 'f1': 100.0}
  assert all(len(files['nbest_predictions.json'][e.qas_id]) >= 1 for e in V1)

  metrics, files = finetune.evaluate_predictions('squad/v2.0', 'squad_beam', rest, v2, V2, v2_windows, config=config)
  odds = files['null_odds.json']
  assert files['predictions.json']['v2-ride'] == 'her blue bicycle'
  assert odds['v2-ride'] < -1.0 and odds['v2-boat'] > 1.0 and odds['v2-aunt'] > 1.0, odds
  assert metrics['exact'] == metrics['best_exact'] == 100.0 and metrics['HasAns_total'] == 1, metrics


# ----------------------------------------------------------------------------------------------------------------
# Post-processing.
# ----------------------------------------------------------------------------------------------------------------

CONTEXT = 'alpha beta gamma delta epsilon zeta'
WORDS = CONTEXT.split()
STARTS = [CONTEXT.index(w) for w in WORDS]
ENDS = [s + len(w) - 1 for s, w in zip(STARTS, WORDS)]


def _window(example_index, doc_start, length, offset, max_context):
  """A converter-shaped window over the words doc_start..doc_start + length - 1, placed at row `offset`."""
  return dict(example_index=example_index, doc_offset=offset, paragraph_len=length,
              tok_start_to_orig=STARTS[doc_start:doc_start + length],
              tok_end_to_orig=ENDS[doc_start:doc_start + length],
              token_is_max_context={offset + i: max_context[i] for i in range(length)})


def test_beam_postprocessing_on_hand_made_outputs():
  """Two windows of one question (words 0-3 and 2-5, XLNet layout: context first) and a second question; start_n_top
  2, end_n_top 2. Invalid beam entries (end before start, outside the context, start not at its max context, too
  long) are dropped; a repeated text is kept once; the null odds are the lowest cls_logits over the windows."""
  examples = [tasks.SquadExample('q1', '?', CONTEXT, []), tasks.SquadExample('q2', '?', CONTEXT, [])]
  windows = [_window(0, 0, 4, 0, [True, True, True, False]), _window(0, 2, 4, 0, [False, True, True, True]),
             _window(1, 0, 6, 0, [True] * 6)]
  # Row positions: 0.. are context words of the window, then <sep>, question, <cls> (not used by the beam here).
  outputs = dict(
      start_top_index=np.array([[1, 3], [1, 0], [5, 2]]),
      start_top_log_probs=np.log(np.array([[0.5, 0.3], [0.6, 0.2], [0.9, 0.05]])),
      # Row 0: start 1 -> ends (2, 0); start 3 (not max context) -> ends (3, 3).
      # Row 1: start 1 (word 3) -> ends (1, 6 outside); start 0 (word 2, not max context) -> (1, 1).
      # Row 2: start 5 -> ends (4 before start, 5); start 2 -> ends (2, 5 too long with max_answer_length 3).
      end_top_index=np.array([[2, 0, 3, 3], [1, 6, 1, 1], [4, 5, 2, 5]]),
      end_top_log_probs=np.log(np.array([[0.7, 0.2, 0.9, 0.9], [0.8, 0.1, 0.9, 0.9], [0.8, 0.1, 0.6, 0.3]])),
      cls_logits=np.array([1.5, -0.5, 2.0]))
  answers, nbest, null_odds = squad_predictions.beam_predictions(examples, windows, outputs, max_answer_length=3,
                                                          n_best_size=5)
  # q1: row 1 delta..delta (0.6 * 0.8), row 0 beta..gamma (0.5 * 0.7).
  q1 = [('delta', math.log(0.6), math.log(0.8)), ('beta gamma', math.log(0.5), math.log(0.7))]
  assert [e['text'] for e in nbest['q1']] == [text for text, _, _ in q1]
  assert [(e['start_log_prob'], e['end_log_prob']) for e in nbest['q1']] == [pytest.approx((a, b)) for _, a, b in q1]
  totals = np.array([a + b for _, a, b in q1])
  probs = np.exp(totals - totals.max()) / np.exp(totals - totals.max()).sum()
  assert [e['probability'] for e in nbest['q1']] == pytest.approx(probs.tolist())
  # q2: zeta..zeta (0.9 * 0.1), gamma..gamma (0.05 * 0.6).
  assert [e['text'] for e in nbest['q2']] == ['zeta', 'gamma']
  assert answers == {'q1': 'delta', 'q2': 'zeta'}
  assert null_odds == {'q1': -0.5, 'q2': 2.0}
  # n_best_size cuts the list.
  answers, nbest, _ = squad_predictions.beam_predictions(examples, windows, outputs, max_answer_length=3,
                                                         n_best_size=1)
  assert [e['text'] for e in nbest['q1']] == ['delta'] and nbest['q1'][0]['probability'] == 1.0
  # Row 1 now spans words 0-3 with word 0 at its max context: start 1 -> 'beta'; start 0 -> 'alpha beta' twice
  # (both of its ends are 1), kept once.
  windows[1] = _window(0, 0, 4, 0, [True, True, True, False])
  _, nbest, _ = squad_predictions.beam_predictions(examples, windows, outputs, max_answer_length=3, n_best_size=5)
  assert [e['text'] for e in nbest['q1']] == ['beta', 'beta gamma', 'alpha beta']
  # No valid span at all: one empty entry, as the original.
  outputs['end_top_index'][:] = 0
  outputs['start_top_index'][:] = 3
  answers, nbest, _ = squad_predictions.beam_predictions(examples[1:], [_window(0, 0, 6, 0, [True] * 6)],
                                                  jax.tree.map(lambda x: x[2:], outputs))
  assert answers == {'q2': ''} and nbest['q2'] == [dict(text='', probability=1.0, start_log_prob=-1e6,
                                                        end_log_prob=-1e6)]


def test_simple_head_nbest_on_hand_made_logits():
  """The simple span head's n-best (BERT layout: [CLS] question [SEP] context): ranked by start + end logit over
  both windows, deduplicated; the no-answer score is cls start + end minus the best span, lowest over windows."""
  examples = [tasks.SquadExample('q1', '?', CONTEXT, [])]
  windows = [_window(0, 0, 4, 3, [True, True, True, False]), _window(0, 2, 4, 3, [False, True, True, True])]
  logits = np.full((2, 2, 10), -1e30, np.float32)
  logits[:, :, 0] = 0.0  # [CLS]
  logits[:, :, 3:7] = -5.0
  logits[0, 0, 4], logits[0, 1, 5] = 2.0, 1.0   # beta..gamma: 3
  logits[1, 0, 4], logits[1, 1, 4] = 3.0, 1.5   # delta: 4.5
  logits[0, 0, 6] = 4.0                         # delta in window 0 is not at its max context
  answers, nbest, na = squad_predictions.squad_nbest(examples, windows, logits, max_answer_length=3, n_best_size=3)
  assert answers == {'q1': 'delta'}
  assert [e['text'] for e in nbest['q1']][:2] == ['delta', 'beta gamma']
  assert nbest['q1'][0]['start_logit'] == 3.0 and nbest['q1'][0]['end_logit'] == 1.5
  assert sum(e['probability'] for e in nbest['q1']) == pytest.approx(1.0)
  assert na == {'q1': pytest.approx(min(0.0 - 3.0, 0.0 - 4.5))}
  assert squad_predictions.squad_predictions(examples, windows, logits, max_answer_length=3,
                                             n_best_size=3) == (answers, na)
