"""Fine-tuning task data: the original-format readers (`common.tasks`) and the BERT / XLNet feature converters.

The files under tests/data/tasks are small hand-made copies of the original formats (GLUE TSVs, SQuAD JSON, CoNLL-2003,
RACE, SWAG), each with a bad row or two that must be counted and skipped. Tokenizers: a hand-written WordPiece
vocabulary for exact layouts, and a 1000-piece WordPiece vocabulary and sentencepiece model trained once (session
fixture) on a slice of the embedded corpus.
"""
import os
import sys

import numpy as np
import pytest

from bert_jax import finetune_data as bert_data
from bert_jax import tokenizer as bert_tokenizer
from common import task_features, tasks
from common.data import corpus
from xlnet_jax import finetune_data as xlnet_data
from xlnet_jax import tokenizer as xlnet_tokenizer

DATA = os.path.join(os.path.dirname(__file__), 'data', 'tasks')
GLUE = os.path.join(DATA, 'glue')


# ----------------------------------------------------------------------------------------------------------------------
# Fixtures.
# ----------------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope='session')
def corpus_dir(tmp_path_factory):
  out_dir = str(tmp_path_factory.getbasetemp() / 'task_data_corpus')
  corpus.build_embedded_corpus(out_dir)
  return out_dir


@pytest.fixture(scope='session')
def training_text(corpus_dir, tmp_path_factory):
  """The first 4000 lines of the embedded corpus's train split: enough for 1000-piece vocabularies, fast to train."""
  path = str(tmp_path_factory.mktemp('task_data_text') / 'train.txt')
  with open(os.path.join(corpus_dir, 'train.txt'), encoding='utf-8') as f:
    lines = [next(f) for _ in range(4000)]
  with open(path, 'w', encoding='utf-8') as f:
    f.writelines(lines)
  return path


@pytest.fixture(scope='session')
def wordpiece(training_text, tmp_path_factory):
  vocab = bert_tokenizer.train_wordpiece([training_text], 1000, str(tmp_path_factory.mktemp('task_data_wp')),
                                         limit_alphabet=200)
  return bert_tokenizer.load_tokenizer(vocab)


@pytest.fixture(scope='session')
def spiece(training_text, tmp_path_factory):
  prefix = str(tmp_path_factory.mktemp('task_data_sp') / 'spiece')
  return xlnet_tokenizer.load_tokenizer(xlnet_tokenizer.train_sentencepiece([training_text], 1000, prefix))


HAND_VOCAB = ['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]', 'the', 'cat', 'sat', 'on', 'mat', 'dog', 'ran', 'a',
              'black', '##s', '.']


@pytest.fixture(scope='session')
def hand_wordpiece(tmp_path_factory):
  path = str(tmp_path_factory.mktemp('task_data_hand') / 'vocab.txt')
  bert_tokenizer.write_vocab(HAND_VOCAB, path)
  return bert_tokenizer.load_tokenizer(path)


def ids_of(*tokens):
  return [HAND_VOCAB.index(t) for t in tokens]


# ----------------------------------------------------------------------------------------------------------------------
# Readers.
# ----------------------------------------------------------------------------------------------------------------------

# task -> {split: (examples, bad rows)} for the files under tests/data/tasks/glue.
GLUE_COUNTS = {
    'cola': {'train': (3, 2), 'dev': (2, 0), 'test': (2, 0)},
    'sst2': {'train': (3, 1), 'dev': (1, 0), 'test': (1, 0)},
    'mrpc': {'train': (2, 0), 'dev': (1, 0), 'test': (1, 0)},
    'qqp': {'train': (2, 1), 'dev': (1, 0), 'test': (1, 0)},
    'stsb': {'train': (2, 1), 'dev': (1, 0), 'test': (1, 0)},
    'mnli': {'train': (3, 1), 'dev': (2, 0), 'test': (1, 0), 'dev_mismatched': (1, 0)},
    'qnli': {'train': (2, 0), 'dev': (1, 0), 'test': (1, 0)},
    'rte': {'train': (2, 0), 'dev': (1, 0), 'test': (1, 0)},
    'wnli': {'train': (2, 0), 'dev': (1, 0), 'test': (1, 0)},
    'ax': {'test': (2, 0)},
}


@pytest.mark.parametrize('task,split', [(t, s) for t, splits in GLUE_COUNTS.items() for s in splits])
def test_glue_counts_and_fields(task, split):
  stats = tasks.TaskReadStats()
  examples = tasks.read_task(task, GLUE, split, stats)
  expected, bad = GLUE_COUNTS[task][split]
  assert (len(examples), stats.bad_rows, stats.examples, stats.files) == (expected, bad, expected, 1)
  assert len(stats.warnings) == bad
  info = tasks.task_info(task)
  for example in examples:
    assert isinstance(example, tasks.PairExample) and example.text_a
    assert (example.text_b is None) == (task in ('cola', 'sst2'))
    if split.startswith('test'):
      assert example.label is None
    elif info.kind == 'regression':
      assert isinstance(example.label, float)
    else:
      assert isinstance(example.label, int) and 0 <= example.label < info.num_labels


def test_glue_exact_fields_and_warnings(caplog):
  cola = tasks.read_task('CoLA', GLUE, 'train')  # Headerless: the first line is an example.
  assert cola[0] == tasks.PairExample('train-1', "Our friends won't buy this analysis, let alone the next one we "
                                      'propose.', None, 1)
  assert cola[1].label == 0
  stats = tasks.TaskReadStats()
  with caplog.at_level('WARNING'):
    tasks.read_task('cola', os.path.join(GLUE, 'CoLA'), 'train', stats)  # The task directory works as well.
  assert 'CoLA/train.tsv:4: skipped: 3 columns, expected 4' in caplog.text
  assert "CoLA/train.tsv:5: skipped: unknown label '2'" in caplog.text
  sst = tasks.TaskReadStats()
  tasks.read_task('sst-2', GLUE, 'train', sst)
  assert 'SST-2/train.tsv:5: skipped: not UTF-8' in sst.warnings[0]
  mrpc = tasks.read_task('mrpc', GLUE, 'train')[1]
  assert mrpc.label == 0 and mrpc.text_a.startswith('Yucaipa owned') and mrpc.text_b.startswith('Yucaipa bought')
  qqp = tasks.read_task('qqp', GLUE, 'train')[1]
  assert (qqp.guid, qqp.text_b, qqp.label) == ('train-402555', 'How do you control your horniness?', 1)
  assert tasks.read_task('stsb', GLUE, 'train')[1].label == pytest.approx(3.8)
  mnli = tasks.read_task('mnli', GLUE, 'train')
  labels = tasks.label_list('mnli')
  assert [labels[e.label] for e in mnli] == ['neutral', 'entailment', 'entailment']
  assert mnli[0].text_b == 'Product and geography are what make cream skimming work. '
  dev = tasks.read_task('mnli', GLUE, 'dev')  # dev_matched.tsv: 16 columns, gold label last.
  assert [labels[e.label] for e in dev] == ['neutral', 'contradiction']
  mismatched = tasks.read_task('mnli_mismatched', GLUE, 'validation')
  assert mismatched[0].text_a.startswith('Your contribution') and labels[mismatched[0].label] == 'contradiction'
  qnli = tasks.read_task('qnli', GLUE, 'train')
  assert [tasks.label_list('qnli')[e.label] for e in qnli] == ['not_entailment', 'entailment']


def test_unknown_task_split_and_missing_file(tmp_path):
  with pytest.raises(ValueError, match='unknown task'):
    tasks.read_task('nope', GLUE, 'train')
  with pytest.raises(ValueError, match='no split'):
    tasks.read_task('cola', GLUE, 'dev_mismatched')
  with pytest.raises(FileNotFoundError, match='train.tsv'):
    tasks.read_task('cola', str(tmp_path), 'train')


def test_squad_reader():
  stats = tasks.TaskReadStats()
  train = tasks.read_task('squad_v1.1', os.path.join(DATA, 'squad'), 'train', stats)
  assert [e.qas_id for e in train] == ['q1', 'q2', 'q3'] and stats.bad_rows == 1
  assert 'qas[2] (id q-bad)' in stats.warnings[0]
  for example in train:
    answer = example.answers[0]
    assert not example.is_impossible
    assert example.context[answer['answer_start']:answer['answer_start'] + len(answer['text'])] == answer['text']
  assert train[2].answers == [{'text': '1842', 'answer_start': 30}]
  stats = tasks.TaskReadStats()
  dev = tasks.read_task('squad2', os.path.join(DATA, 'squad'), 'dev', stats)
  assert [(e.qas_id, e.is_impossible, len(e.answers)) for e in dev] == [('n1', False, 2), ('n2', True, 0)]
  assert stats.bad_rows == 1 and 'no "question"' in stats.warnings[0]


def test_squad_reader_rejects_a_broken_file(tmp_path):
  path = tmp_path / 'train-v1.1.json'
  path.write_bytes(b'{"data": [')
  with pytest.raises(ValueError, match='not a SQuAD JSON file'):
    tasks.read_task('squad', str(tmp_path), 'train')


def test_conll_reader():
  stats = tasks.TaskReadStats()
  examples = tasks.read_task('conll2003', os.path.join(DATA, 'conll2003'), 'train', stats)
  assert [len(e.words) for e in examples] == [9, 2, 2, 3, 3]
  assert examples[0].words[:3] == ['EU', 'rejects', 'German'] and examples[0].tags[:3] == ['B-ORG', 'O', 'B-MISC']
  assert examples[1].words == ['Peter', 'Blackburn'] and examples[1].tags == ['B-PER', 'I-PER']
  assert all(len(e.words) == len(e.tags) and '-DOCSTART-' not in e.words for e in examples)
  assert (stats.bad_rows, stats.dropped_examples) == (2, 2)
  assert ':25: skipped: 3 columns' in stats.warnings[0] and "unknown tag 'B-WHAT'" in stats.warnings[1]
  assert tasks.label_list('conll2003') == tasks.CONLL2003_LABELS


def test_race_reader():
  stats = tasks.TaskReadStats()
  examples = tasks.read_task('race', os.path.join(DATA, 'race'), 'train', stats)
  assert [e.guid for e in examples] == ['middle/middle1.txt-0', 'high/high1.txt-0', 'high/high1.txt-1',
                                        'high/high2.txt-0']
  assert [e.label for e in examples] == [2, 1, 3, 0]
  assert examples[1].question == 'Tom had _ .' and examples[1].endings[1] == 'a dog'
  assert examples[1].context.startswith('Tom had a dog named Max.')
  assert (stats.files, stats.bad_rows) == (4, 2)  # high2's answer 'E', high3 is not JSON.
  assert len(tasks.read_task('race_high', os.path.join(DATA, 'race'), 'train')) == 3
  assert len(tasks.read_task('race/middle', os.path.join(DATA, 'race'), 'train')) == 1


def test_swag_reader():
  stats = tasks.TaskReadStats()
  examples = tasks.read_task('swag', os.path.join(DATA, 'swag'), 'train', stats)
  assert [(e.guid, e.label) for e in examples] == [('train-3416', 0), ('train-3417', 3)]
  first = examples[0]
  assert first.context == ('Members of the procession walk down the street holding small horn brass instruments.')
  assert first.question == 'A drum line' and len(first.endings) == 4
  assert first.endings[0] == 'passes by walking down the street playing their instruments.'
  assert stats.bad_rows == 2 and ':4: skipped: label' in stats.warnings[0] and ':5: skipped: 9 columns' in \
      stats.warnings[1]
  test = tasks.read_task('swag', os.path.join(DATA, 'swag'), 'test')
  assert len(test) == 1 and test[0].label is None and test[0].endings[-1] == 'sings loudly.'


# ----------------------------------------------------------------------------------------------------------------------
# TFDS adapters: read for real (TFDS mock data) in test_tfds_tasks.py; here only the message without TFDS.
# ----------------------------------------------------------------------------------------------------------------------

def test_tfds_missing_says_how_to_install(monkeypatch):
  monkeypatch.setitem(sys.modules, 'tensorflow_datasets', None)
  with pytest.raises(ImportError, match=r"pip install -e '\.\[tfds\]'"):
    tasks.tfds_task('glue/mnli', 'train')


# ----------------------------------------------------------------------------------------------------------------------
# Shared helpers.
# ----------------------------------------------------------------------------------------------------------------------

def test_truncate_and_windows():
  a, b = list(range(6)), list(range(3))
  task_features.truncate_seq_pair(a, b, 7)
  assert (a, b) == ([0, 1, 2, 3], [0, 1, 2])
  a, b = [0, 1, 2], [0, 1, 2]
  task_features.truncate_seq_pair(a, b, 5)  # Ties cut the second segment.
  assert (a, b) == ([0, 1, 2], [0, 1])
  assert task_features.doc_windows(10, 4, 3) == [(0, 4), (3, 4), (6, 4)]
  assert task_features.doc_windows(3, 4, 3) == [(0, 3)] and task_features.doc_windows(0, 4, 3) == [(0, 0)]
  windows = task_features.doc_windows(10, 4, 3)
  for position in range(10):  # Every token has exactly one max-context window.
    assert sum(task_features.is_max_context(windows, w, position) for w in range(len(windows))) == 1
  assert task_features.is_max_context(windows, 1, 4) and task_features.is_max_context(windows, 0, 2)
  # A tie: the earlier one.
  assert task_features.is_max_context(windows, 0, 3) and not task_features.is_max_context(windows, 1, 3)
  words, char_to_word, spans = task_features.whitespace_words(' ab  c\td ')
  assert words == ['ab', 'c', 'd'] and spans == [(1, 2), (5, 5), (7, 7)]
  assert char_to_word == [-1, 0, 0, 0, 0, 1, 1, 2, 2]
  assert task_features.join_question_ending('Tom had _ .', 'a dog') == 'Tom had a dog .'
  assert task_features.join_question_ending('Where?', 'Here') == 'Where? Here'


# ----------------------------------------------------------------------------------------------------------------------
# Classification layouts.
# ----------------------------------------------------------------------------------------------------------------------

def test_bert_pair_layout_by_hand(hand_wordpiece):
  examples = [tasks.PairExample('0', 'the cat sat', 'the dogs ran', 1),
              tasks.PairExample('1', 'a black cat.', None, None)]
  features = bert_data.convert_pair_examples(examples, hand_wordpiece, 12)
  cls, sep, pad = ids_of('[CLS]', '[SEP]', '[PAD]')
  assert features['input_ids'].tolist() == [
      [cls, *ids_of('the', 'cat', 'sat'), sep, *ids_of('the', 'dog', '##s', 'ran'), sep, pad, pad],
      [cls, *ids_of('a', 'black', 'cat', '.'), sep] + [pad] * 6]
  assert features['segment_ids'].tolist() == [[0] * 5 + [1] * 5 + [0, 0], [0] * 12]
  assert features['input_mask'].tolist() == [[1] * 10 + [0] * 2, [1] * 6 + [0] * 6]
  assert features['label'].tolist() == [1, -1] and features['label'].dtype == np.int32
  assert all(features[k].dtype == np.int32 and features[k].shape == (2, 12)
             for k in ('input_ids', 'segment_ids', 'input_mask'))
  # Truncation: the longer segment loses its last token first (7 tokens into 8 - 3 = 5).
  truncated = bert_data.convert_pair_examples(examples[:1], hand_wordpiece, 8)
  assert truncated['input_ids'][0].tolist() == [cls, *ids_of('the', 'cat', 'sat'), sep, *ids_of('the', 'dog'), sep]
  regression = bert_data.convert_pair_examples([tasks.PairExample('0', 'the cat', 'a dog', 3.8)], hand_wordpiece, 8)
  assert regression['label'].dtype == np.float32 and regression['label'][0] == pytest.approx(3.8)


def test_xlnet_pair_layout(spiece):
  examples = [tasks.PairExample('0', 'The cat sat on the mat.', 'A dog ran.', 2),
              tasks.PairExample('1', 'Only one text here.', None, 0)]
  length = 40
  features = xlnet_data.convert_pair_examples(examples, spiece, length)
  a, b = spiece.encode(examples[0].text_a), spiece.encode(examples[0].text_b)
  sep, cls, pad = spiece.sep_id, spiece.cls_id, spiece.pad_id
  assert (sep, cls, pad) == (4, 3, 5)
  real = a + [sep] + b + [sep, cls]
  n_pad = length - len(real)
  assert n_pad > 0
  assert features['input_ids'][0].tolist() == [pad] * n_pad + real  # Padding on the LEFT, <cls> last.
  assert features['segment_ids'][0].tolist() == ([xlnet_data.SEG_ID_PAD] * n_pad + [0] * (len(a) + 1)
                                                 + [1] * (len(b) + 1) + [2])
  assert features['input_mask'][0].tolist() == [0] * n_pad + [1] * len(real)
  single = spiece.encode(examples[1].text_a) + [sep, cls]
  assert features['input_ids'][1, -len(single):].tolist() == single
  assert features['segment_ids'][1, -len(single):].tolist() == [0] * (len(single) - 1) + [2]
  assert (features['input_ids'][:, -1] == cls).all() and features['label'].tolist() == [2, 0]
  # Truncation keeps <sep> <sep> <cls> and cuts the longer segment first.
  short = xlnet_data.convert_pair_examples(examples[:1], spiece, 8)
  assert short['input_mask'].all() and short['input_ids'][0, -1] == cls
  assert short['input_ids'][0].tolist().count(sep) == 2


def test_convert_examples_dispatch(spiece, wordpiece):
  stsb = tasks.read_task('stsb', GLUE, 'train')
  for module, tokenizer in ((bert_data, wordpiece), (xlnet_data, spiece)):
    features = module.convert_examples('stsb', stsb, tokenizer, 32)
    assert features['label'].dtype == np.float32 and features['label'].tolist() == pytest.approx([5.0, 3.8])
    test = module.convert_examples('stsb', tasks.read_task('stsb', GLUE, 'test'), tokenizer, 32)
    assert np.isnan(test['label']).all()
    mnli = module.convert_examples('mnli', tasks.read_task('mnli', GLUE, 'train'), tokenizer, 32)
    assert mnli['label'].dtype == np.int32 and mnli['input_ids'].shape == (3, 32)


# ----------------------------------------------------------------------------------------------------------------------
# Multiple choice.
# ----------------------------------------------------------------------------------------------------------------------

def test_multiple_choice(spiece, wordpiece):
  race = tasks.read_task('race', os.path.join(DATA, 'race'), 'train')
  swag = tasks.read_task('swag', os.path.join(DATA, 'swag'), 'train')
  length, max_qa = 32, 8
  for module, tokenizer in ((bert_data, wordpiece), (xlnet_data, spiece)):
    features = module.convert_examples('race', race, tokenizer, length, max_qa_length=max_qa)
    assert features['input_ids'].shape == (4, 4, length) and features['label'].tolist() == [2, 1, 3, 0]
    # Choice 1 of 'Tom had _ .' fills the blank: the second segment is the (end of the) filled question.
    qa = tokenizer.encode('Tom had a dog .')[-max_qa:]
    row, segments = features['input_ids'][1, 1].tolist(), features['segment_ids'][1, 1].tolist()
    context = tokenizer.encode(race[1].context)
    if module is bert_data:
      assert row == [tokenizer.cls_id, *context[:length - 3 - len(qa)], tokenizer.sep_id, *qa, tokenizer.sep_id]
      assert segments == [0] * (length - len(qa) - 1) + [1] * (len(qa) + 1)
    else:
      assert row == [*context[:length - 3 - len(qa)], tokenizer.sep_id, *qa, tokenizer.sep_id, tokenizer.cls_id]
      assert segments == [0] * (length - len(qa) - 2) + [1] * (len(qa) + 1) + [2]
    swag_features = module.convert_examples('swag', swag, tokenizer, 64)
    assert swag_features['input_ids'].shape == (2, 4, 64) and swag_features['label'].tolist() == [0, 3]
    mask = swag_features['input_mask']
    assert (mask[..., 0] == 1).all() if module is bert_data else (mask[..., -1] == 1).all()


# ----------------------------------------------------------------------------------------------------------------------
# SQuAD.
# ----------------------------------------------------------------------------------------------------------------------

FILLER = ('The committee met on a Tuesday to discuss the budget for the coming year. Several members raised concerns '
          'about the cost of maintaining the library and the garden. ')
ANSWER_SENTENCE = 'After a long search, the treasure was found under the old oak tree in 1887. '


def squad_examples():
  context = FILLER * 4 + ANSWER_SENTENCE + FILLER * 4
  start = context.index('the old oak tree')
  year = context.index('1887')
  return [
      tasks.SquadExample('oak', 'Where was the treasure found?', context,
                         [{'text': 'the old oak tree', 'answer_start': start}]),
      tasks.SquadExample('year', 'When was the treasure found?', context, [{'text': '1887', 'answer_start': year}]),
      tasks.SquadExample('none', 'Who buried the treasure?', context, [], is_impossible=True),
  ]


def _check_squad_windows(features, windows, examples, cls_positions):
  n = len(windows)
  assert features['input_ids'].shape == (n, 64) and features['example_index'].tolist() == [
      w['example_index'] for w in windows]
  for name in ('cls_index', 'start_position', 'end_position', 'is_impossible'):
    assert features[name].shape == (n,) and features[name].dtype == np.int32
  by_example = {}
  for row, window in enumerate(windows):
    by_example.setdefault(window['example_index'], []).append(row)
  assert sorted(by_example) == [0, 1, 2]
  for example_index, rows in by_example.items():
    assert len(rows) >= 3  # The long context needs several windows.
    best = {}  # Document token -> how many windows give it its max context.
    for row in rows:
      window = windows[row]
      for position, is_max in window['token_is_max_context'].items():
        doc_position = window['doc_start'] + position - window['doc_offset']
        best[doc_position] = best.get(doc_position, 0) + int(is_max)
    assert set(best.values()) == {1} and sorted(best) == list(range(len(best)))
    answered = [row for row in rows if features['is_impossible'][row] == 0]
    if examples[example_index].is_impossible:
      assert not answered
    else:
      assert answered
    for row in rows:
      if features['is_impossible'][row]:
        assert features['start_position'][row] == features['end_position'][row] == cls_positions(row)
  return by_example


def test_bert_squad_windows(wordpiece):
  examples = squad_examples()
  features, windows = bert_data.convert_squad_examples(examples, wordpiece, max_seq_length=64, doc_stride=16,
                                                       max_query_length=16, is_training=True)
  by_example = _check_squad_windows(features, windows, examples, cls_positions=lambda row: 0)
  assert (features['cls_index'] == 0).all() and (features['input_ids'][:, 0] == wordpiece.cls_id).all()
  for row, window in enumerate(windows):
    offset, length = window['doc_offset'], window['paragraph_len']
    query = wordpiece.encode(examples[window['example_index']].question)[:16]
    ids = features['input_ids'][row].tolist()
    assert ids[:offset] == [wordpiece.cls_id, *query, wordpiece.sep_id] and ids[offset + length] == wordpiece.sep_id
    assert features['segment_ids'][row].tolist() == [0] * offset + [1] * (length + 1) + [0] * (63 - offset - length)
    assert features['p_mask'][row].tolist() == [0] + [1] * (offset - 1) + [0] * length + [1] * (64 - offset - length)
  # 'the old oak tree': whole words, so the word map and the character map both give back the exact text.
  context = examples[0].context
  for row in by_example[0]:
    if features['is_impossible'][row] == 0:
      window, start, end = windows[row], features['start_position'][row], features['end_position'][row]
      words = window['doc_words'][window['token_to_orig_map'][start]:window['token_to_orig_map'][end] + 1]
      assert ' '.join(words) == 'the old oak tree'
      offset = window['doc_offset']
      assert context[window['tok_start_to_orig'][start - offset]:window['tok_end_to_orig'][end - offset] + 1] == \
          'the old oak tree'
      assert window['token_is_max_context'][start] in (True, False)
  # '1887' inside the word '1887.': the span is narrowed to the pieces of '1887' (`_improve_answer_span`).
  for row in by_example[1]:
    if features['is_impossible'][row] == 0:
      span = features['input_ids'][row, features['start_position'][row]:features['end_position'][row] + 1]
      assert span.tolist() == wordpiece.encode('1887')


def test_xlnet_squad_windows(spiece):
  examples = squad_examples()
  features, windows = xlnet_data.convert_squad_examples(examples, spiece, max_seq_length=64, doc_stride=16,
                                                        max_query_length=16, is_training=True)
  by_example = _check_squad_windows(features, windows, examples,
                                    cls_positions=lambda row: features['cls_index'][row])
  for row, window in enumerate(windows):
    length = window['paragraph_len']
    query = spiece.encode(examples[window['example_index']].question)[:16]
    ids = features['input_ids'][row].tolist()
    cls_index = length + len(query) + 2
    assert features['cls_index'][row] == cls_index and window['doc_offset'] == 0
    assert ids[length:cls_index + 1] == [spiece.sep_id, *query, spiece.sep_id, spiece.cls_id]
    assert ids[cls_index + 1:] == [spiece.pad_id] * (63 - cls_index)  # Padding on the right, as run_squad.py.
    assert features['segment_ids'][row].tolist() == ([0] * (length + 1) + [1] * (len(query) + 1) + [2]
                                                     + [xlnet_data.SQUAD_SEG_ID_PAD] * (63 - cls_index))
    assert features['p_mask'][row].tolist() == [0] * length + [1] * (len(query) + 2) + [0] + [1] * (63 - cls_index)
  context = examples[0].context
  for example_index, answer in ((0, 'the old oak tree'), (1, '1887')):
    hits = 0
    for row in by_example[example_index]:
      if features['is_impossible'][row] == 0:
        window, start, end = windows[row], features['start_position'][row], features['end_position'][row]
        text = context[window['tok_start_to_orig'][start]:window['tok_end_to_orig'][end] + 1]
        assert text.strip() == answer
        hits += 1
    assert hits >= 1


@pytest.mark.parametrize('lower', [False, True])
def test_xlnet_squad_alignment_survives_normalisation(spiece, lower):
  """Accents, case, LaTeX quotes, ligatures, '…' (NFKC '...'), tabs and doubled spaces change the piece text; every
  answer still maps back to its exact characters."""
  tokenizer = xlnet_tokenizer.load_tokenizer(spiece.model_file, do_lower_case=lower)
  context = '  In 1887,  the  Café "Zürich" sold ``fine\'\' wine for £2,000, ☃ snowmen and ﬁsh — quickly…\tDone.\n'
  pieces = tokenizer.encode_pieces(context)
  starts, ends, _, fraction = xlnet_data.align_pieces(context, pieces, tokenizer)
  assert fraction > 0.85 and len(starts) == len(ends) == len(pieces)
  assert all(0 <= s <= e < len(context) for s, e in zip(starts, ends))
  assert starts == sorted(starts) and ends == sorted(ends)
  answers = ['1887', 'Café "Zürich"', '£2,000', 'snowmen', 'ﬁsh', "fine'' wine", 'Done', 'quickly…']
  examples = [tasks.SquadExample(str(i), 'What?', context, [{'text': a, 'answer_start': context.index(a)}])
              for i, a in enumerate(answers)]
  features, windows = xlnet_data.convert_squad_examples(examples, tokenizer, 128, 32, 16, is_training=True)
  assert len(windows) == len(answers) and not features['is_impossible'].any()
  for row, window in enumerate(windows):
    start, end = features['start_position'][row], features['end_position'][row]
    assert context[window['tok_start_to_orig'][start]:window['tok_end_to_orig'][end] + 1].strip() == answers[row]


def test_squad_unplaceable_answers(wordpiece, spiece):
  example = squad_examples()[0]
  misplaced = tasks.SquadExample('misplaced', example.question, example.context,
                                 [{'text': 'the old oak tree', 'answer_start': len(example.context) + 5}])
  wrong_text = tasks.SquadExample('wrong', example.question, example.context,
                                  [{'text': 'not in the text', 'answer_start': 3}])
  for module, tokenizer in ((bert_data, wordpiece), (xlnet_data, spiece)):
    # Training drops an answer that cannot be placed (BERT also checks the text against the words, as the original).
    broken = [misplaced, wrong_text] if module is bert_data else [misplaced]
    skipped = []
    features, windows = module.convert_squad_examples([*broken, example], tokenizer, 64, 16, 16, is_training=True,
                                                      skipped=skipped)
    assert skipped == [e.qas_id for e in broken] and {w['qas_id'] for w in windows} == {'oak'}
    assert features['input_ids'].shape[0] == len(windows) and (features['example_index'] == len(broken)).all()
    # Evaluation keeps every example (predictions are needed for each question); such windows have no answer.
    features, windows = module.convert_squad_examples(broken, tokenizer, 64, 16, 16, is_training=False)
    assert {w['qas_id'] for w in windows} == {e.qas_id for e in broken} and features['is_impossible'].all()
    assert (features['start_position'] == features['cls_index']).all()


def test_squad_reader_to_features(wordpiece, spiece):
  examples = tasks.read_task('squad2', os.path.join(DATA, 'squad'), 'dev')
  for module, tokenizer in ((bert_data, wordpiece), (xlnet_data, spiece)):
    features, windows = module.convert_examples('squad_v2.0', examples, tokenizer, 128, doc_stride=32,
                                                max_query_length=16)
    assert [w['qas_id'] for w in windows] == ['n1', 'n2']  # Short context: one window each.
    assert features['is_impossible'].tolist() == [0, 1]
    window = windows[0]
    start, end = features['start_position'][0], features['end_position'][0]
    offset = window['doc_offset']
    text = examples[0].context[window['tok_start_to_orig'][start - offset]:window['tok_end_to_orig'][end - offset]
                               + 1]
    assert text.strip().rstrip('.') == 'France'


# ----------------------------------------------------------------------------------------------------------------------
# Token classification.
# ----------------------------------------------------------------------------------------------------------------------

def test_token_classification_first_subtoken(wordpiece, spiece):
  examples = tasks.read_task('conll2003', os.path.join(DATA, 'conll2003'), 'train')
  labels = tasks.CONLL2003_LABELS
  length = 24
  for module, tokenizer in ((bert_data, wordpiece), (xlnet_data, spiece)):
    features = module.convert_examples('conll2003', examples, tokenizer, length)
    assert features['label'].shape == (len(examples), length) and features['label_weights'].dtype == np.float32
    for i, example in enumerate(examples):
      pieces = [tokenizer.encode(word) or [tokenizer.unk_id] for word in example.words]
      assert any(len(p) > 1 for p in pieces) or i > 0  # The first sentence has multi-piece words.
      flat = [t for p in pieces for t in p][:length - 2]
      expected_labels = [v for p, tag in zip(pieces, example.tags)
                         for v in [labels.index(tag)] + [bert_data.IGNORE_LABEL] * (len(p) - 1)][:length - 2]
      expected_words = [w for w, p in enumerate(pieces) for _ in p][:length - 2]
      ids, row_labels = features['input_ids'][i].tolist(), features['label'][i].tolist()
      if module is bert_data:  # [CLS] pieces [SEP] pad...
        real = slice(1, 1 + len(flat))
        assert ids[:len(flat) + 2] == [tokenizer.cls_id, *flat, tokenizer.sep_id]
        assert row_labels[0] == row_labels[len(flat) + 1] == -100
      else:  # pad... pieces <sep> <cls>
        real = slice(length - 2 - len(flat), length - 2)
        assert ids[real.start:] == [*flat, tokenizer.sep_id, tokenizer.cls_id]
        assert row_labels[-2:] == [-100, -100] and features['segment_ids'][i, -1] == xlnet_data.SEG_ID_CLS
      assert row_labels[real] == expected_labels
      assert features['word_index'][i, real].tolist() == expected_words
      assert features['label_weights'][i].sum() == features['num_words'][i] == len(set(expected_words))
      assert sum(1 for v in row_labels if v != -100) == features['num_words'][i]
  # Truncation: the first sentence does not fit in 8 tokens; only words whose first piece fits are labelled.
  short = bert_data.convert_token_examples(examples[:1], wordpiece, 8)
  assert 0 < short['num_words'][0] < len(examples[0].words) and short['label_weights'][0].sum() == short[
      'num_words'][0]


def test_token_classification_by_hand(hand_wordpiece):
  example = tasks.TokenExample('0', ['the', 'cats', 'sat'], ['O', 'B-PER', 'O'])
  features = bert_data.convert_token_examples([example], hand_wordpiece, 8)
  assert features['input_ids'][0].tolist() == ids_of('[CLS]', 'the', 'cat', '##s', 'sat', '[SEP]', '[PAD]', '[PAD]')
  assert features['label'][0].tolist() == [-100, 0, 1, -100, 0, -100, -100, -100]
  assert features['word_index'][0].tolist() == [-1, 0, 1, 1, 2, -1, -1, -1]
  assert features['label_weights'][0].tolist() == [0, 1, 1, 0, 1, 0, 0, 0]


# ----------------------------------------------------------------------------------------------------------------------
# The learnable task.
# ----------------------------------------------------------------------------------------------------------------------

def test_make_learnable_task(corpus_dir):
  examples = tasks.make_learnable_task(200, seed=3, cache_dir=corpus_dir)
  again = tasks.make_learnable_task(200, seed=3, cache_dir=corpus_dir)
  other = tasks.make_learnable_task(200, seed=4, cache_dir=corpus_dir)
  assert examples == again and examples != other
  assert sum(e.label for e in examples) == 100
  assert all((e.label == 1) == ('pineapple' in e.text_a.split()) for e in examples)
  assert all('pineapple' not in e.text_a for e in examples if e.label == 0)
  assert all(e.text_b is None and len(e.text_a.split()) <= 25 for e in examples)
  odd = tasks.make_learnable_task(7, seed=0, word='zebra', cache_dir=corpus_dir)
  assert sum(e.label for e in odd) == 3 and all((e.label == 1) == ('zebra' in e.text_a) for e in odd)


# ----------------------------------------------------------------------------------------------------------------------
# The registry and the layering.
# ----------------------------------------------------------------------------------------------------------------------

def test_every_task_has_a_kind_and_a_source():
  """One vocabulary of kinds: every registered task's kind is a `task_kinds` object; each task is read from files,
  from TFDS or generated (`learnable` is registered like the others)."""
  from common import task_kinds  # pylint: disable=import-outside-toplevel
  for info in tasks.TASKS.values():
    assert task_kinds.get(info.kind).name == info.kind
    assert info.read is not None or info.generate is not None, info.name
    assert tasks.check_task(info.spelling) == info.spelling
  assert tasks.task_info('conll2003').kind == 'token' and tasks.task_info('learnable').generate is not None


def test_model_library_modules_import_no_runner():
  """Heads, feature converters and the models' tasks.py load without the fine-tuning runner or the extractor."""
  import subprocess  # pylint: disable=import-outside-toplevel
  code = ('import sys; import bert_jax.tasks, xlnet_jax.tasks; '
          "print(sorted(m for m in sys.modules if m.startswith(('common.finetune', 'common.extract'))))")
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert out.stdout.strip() == '[]', out.stdout
