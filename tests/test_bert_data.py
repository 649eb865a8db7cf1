"""Tests for the BERT data path: masking statistics, whole-word masking, NSP instances, shards, the step loader and
`prepare_pretraining_data` end to end. Statistics use fixed seeds; tolerances are stated next to each check.
"""
import functools
import os
import sys

import numpy as np
import pytest

import bert_jax
from bert_jax import instances as bert_instances
from bert_jax import masking
from bert_jax import pretrain_data as pd
from common.config import ConfigError
from common.data import shards
from common.data.pipeline import StepLoader

PAD, UNK, CLS, SEP, MASK = 0, 1, 2, 3, 4
SPECIALS = [PAD, CLS, SEP, MASK]


# ----------------------------------------------------------------------------------------------------------------
# Helpers.
# ----------------------------------------------------------------------------------------------------------------

SPECIAL_TOKENS = ['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]']


class StandInTokenizer:
  """A WordPiece tokenizer built directly with HF `tokenizers`, with the interface of `bert_jax.tokenizer`'s."""

  def __init__(self, vocab, do_lower_case=True):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    self._vocab = list(vocab)
    self._tok = Tokenizer(models.WordPiece({t: i for i, t in enumerate(self._vocab)}, unk_token='[UNK]'))
    self._tok.normalizer = normalizers.BertNormalizer(lowercase=do_lower_case)
    self._tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    self.vocab_size = len(self._vocab)
    self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id = (self._vocab.index(t) for t in SPECIAL_TOKENS)
    self.is_continuation = np.asarray([t.startswith('##') for t in self._vocab])

  @classmethod
  def from_words(cls, words):
    letters = list('abcdefghijklmnopqrstuvwxyz.,')
    return cls(SPECIAL_TOKENS + letters + ['##' + c for c in letters[:26]] + sorted(set(words)))

  def id_to_token(self, i):
    return self._vocab[i]

  def encode_batch(self, texts):
    return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

  def save(self, out_dir):
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, 'vocab.txt'), 'w') as f:
      f.write('\n'.join(self._vocab) + '\n')


class StandInTokenizerModule:
  """Stands in for `bert_jax.tokenizer` (train_wordpiece / load_tokenizer) while that module does not exist."""

  @staticmethod
  def train_wordpiece(files, vocab_size, out_dir, *, do_lower_case=True, min_frequency=2):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    tok = Tokenizer(models.WordPiece(unk_token='[UNK]'))
    tok.normalizer = normalizers.BertNormalizer(lowercase=do_lower_case)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train([str(f) for f in files], trainers.WordPieceTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                                                 special_tokens=SPECIAL_TOKENS))
    vocab = [t for t, _ in sorted(tok.get_vocab().items(), key=lambda kv: kv[1])]
    StandInTokenizer(vocab).save(out_dir)
    return os.path.join(out_dir, 'vocab.txt')

  @staticmethod
  def load_tokenizer(vocab_file, do_lower_case=True):
    with open(vocab_file) as f:
      return StandInTokenizer([line.rstrip('\n') for line in f], do_lower_case)


WORDS = ('the a of model token layer mask sentence predict next random word piece train data shard step batch '
         'epoch seed loader encoder attention segment document corpus vocab length position label weight').split()


def synthetic_documents(num_documents, seed, min_sentences=2, max_sentences=12):
  rng = np.random.default_rng(seed)
  docs = []
  for _ in range(num_documents):
    sentences = []
    for _ in range(rng.integers(min_sentences, max_sentences + 1)):
      words = [WORDS[i] if rng.random() < 0.9 else ''.join(rng.choice(list('xyzqk'), 3))
               for i in rng.integers(len(WORDS), size=rng.integers(3, 15))]
      sentences.append(' '.join(words).capitalize() + '.')
    docs.append(sentences)
  return docs


def words_of(tokens, is_continuation):
  """Independent word segmentation for checks: a non-special token plus the continuation tokens right after it."""
  words, current = [], []
  for i, t in enumerate(tokens):
    if t in SPECIALS:
      if current:
        words.append(current)
      current = []
    elif is_continuation[t] and current:
      current.append(i)
    else:
      if current:
        words.append(current)
      current = [i]
  if current:
    words.append(current)
  return words


def mask_kwargs(vocab_size, **overrides):
  kw = dict(vocab_size=vocab_size, special_ids=SPECIALS, is_continuation=None, masked_lm_prob=0.15,
            max_predictions_per_seq=20, whole_word_mask=False, mask_id=MASK)
  kw.update(overrides)
  return kw


# ----------------------------------------------------------------------------------------------------------------
# Masking.
# ----------------------------------------------------------------------------------------------------------------

def test_mask_statistics_over_a_million_tokens():
  vocab = 30000
  rng = np.random.default_rng(0)
  selected = eligible = to_mask = kept = replaced = total = 0
  while total < 1_000_000:
    n = int(rng.integers(256, 513))
    tokens = rng.integers(5, vocab, size=n).astype(np.int32)
    tokens[0], tokens[n // 2], tokens[-1] = CLS, SEP, SEP
    input_ids, positions, labels, weights = masking.mask_tokens(
        tokens, rng, **mask_kwargs(vocab, max_predictions_per_seq=n))
    num = int(weights.sum())
    p = positions[:num]
    assert np.all(np.diff(p) > 0), 'positions sorted and distinct'
    assert not np.isin(tokens[p], SPECIALS).any(), 'specials are never chosen'
    np.testing.assert_array_equal(labels[:num], tokens[p])
    assert np.all(weights[num:] == 0) and np.all(positions[num:] == 0)
    unchanged = np.ones(n, bool)
    unchanged[p] = False
    np.testing.assert_array_equal(input_ids[unchanged], tokens[unchanged])
    assert num == max(1, round(n * 0.15))
    selected += num
    eligible += n - 3
    to_mask += int(np.sum(input_ids[p] == MASK))
    kept += int(np.sum(input_ids[p] == tokens[p]))  # Includes random draws equal to the original (p = 1/30000).
    replaced += int(np.sum((input_ids[p] != MASK) & (input_ids[p] != tokens[p])))
    total += n
  # Tolerance 0.5 percentage points each (the standard error is ~0.04 and ~0.1 points).
  assert abs(selected / eligible - 0.15) < 0.005, selected / eligible
  assert abs(to_mask / selected - 0.8) < 0.005, to_mask / selected
  assert abs(kept / selected - 0.1) < 0.005, kept / selected
  assert abs(replaced / selected - 0.1) < 0.005, replaced / selected


def test_max_predictions_binds():
  rng = np.random.default_rng(1)
  for _ in range(200):
    tokens = rng.integers(5, 1000, size=256).astype(np.int32)
    _, positions, _, weights = masking.mask_tokens(tokens, rng, **mask_kwargs(1000, max_predictions_per_seq=20))
    assert weights.shape == (20,) and weights.sum() == 20  # round(256 * 0.15) = 38 > 20.
  tokens = np.asarray([CLS, 7, SEP], np.int32)  # At least one prediction even for tiny sequences.
  _, positions, _, weights = masking.mask_tokens(tokens, rng, **mask_kwargs(1000))
  assert weights.sum() == 1 and positions[0] == 1


def test_whole_word_masking_never_splits_a_word():
  vocab = 2000
  is_cont = np.zeros(vocab, bool)
  is_cont[1000:] = True  # ids >= 1000 are `##` pieces.
  rng = np.random.default_rng(2)
  masked_words = total_selected = 0
  for _ in range(1500):
    n = int(rng.integers(16, 129))
    tokens = np.where(rng.random(n) < 0.35, rng.integers(1000, vocab, n), rng.integers(5, 1000, n)).astype(np.int32)
    tokens[0], tokens[-1] = CLS, SEP
    tokens[n // 2] = SEP
    maxp = int(rng.choice([5, 20, 64]))
    _, positions, _, weights = masking.mask_tokens(
        tokens, rng, **mask_kwargs(vocab, is_continuation=is_cont, whole_word_mask=True, max_predictions_per_seq=maxp))
    chosen = set(positions[:int(weights.sum())].tolist())
    budget = min(maxp, max(1, round(n * 0.15)))
    assert len(chosen) <= budget
    for word in words_of(tokens.tolist(), is_cont):
      inside = [i in chosen for i in word]
      assert all(inside) or not any(inside), (tokens, word, sorted(chosen))
      masked_words += all(inside)
    total_selected += len(chosen)
  assert masked_words > 1000 and total_selected > 5000


# ----------------------------------------------------------------------------------------------------------------
# Instances (NSP).
# ----------------------------------------------------------------------------------------------------------------

def consecutive_documents(num_documents, rng, sentence_lengths=(3, 30), sentences=(5, 40)):
  """Documents whose concatenated tokens are consecutive ids, so every token says which document it is from."""
  docs, starts, next_id = [], [], 10
  for _ in range(num_documents):
    starts.append(next_id)
    doc = []
    for _ in range(rng.integers(*sentences)):
      length = int(rng.integers(*sentence_lengths))
      doc.append(np.arange(next_id, next_id + length, dtype=np.int32))
      next_id += length
    docs.append(doc)
  return docs, np.asarray(starts + [next_id])


def test_truncate_seq_pair_matches_token_by_token_rule():
  rng = np.random.default_rng(3)
  for _ in range(500):
    la, lb, limit = (int(x) for x in rng.integers(1, 80, 3))
    a, b = np.arange(la), np.arange(100, 100 + lb)
    ta, tb = bert_instances.truncate_seq_pair(a, b, limit, rng)
    ea, eb = la, lb
    while ea + eb > limit:  # The original rule: shorten the longer one, A on ties.
      if ea >= eb:
        ea -= 1
      else:
        eb -= 1
    assert (len(ta), len(tb)) == (ea, eb)
    assert np.all(np.diff(ta) == 1) and np.all(np.diff(tb) == 1)  # Contiguous: cut only at the ends.


@pytest.mark.parametrize('max_seq_length', [64, 128])
def test_nsp_instances(max_seq_length):
  rng = np.random.default_rng(4)
  docs, starts = consecutive_documents(150, rng)
  doc_of = lambda ids: np.searchsorted(starts, ids, side='right') - 1  # noqa: E731
  labels, truncated = [], 0
  for d in range(len(docs)):
    for inst in bert_instances.create_instances_from_document(docs, d, max_seq_length=max_seq_length,
                                                              short_seq_prob=0.1, rng=rng, cls_id=CLS, sep_id=SEP):
      ids, num_a = inst['input_ids'], inst['num_a']
      assert len(ids) <= max_seq_length
      assert ids[0] == CLS and ids[num_a - 1] == SEP and ids[-1] == SEP
      assert np.sum(ids == SEP) == 2 and np.sum(ids == CLS) == 1
      a, b = ids[1:num_a - 1], ids[num_a:-1]
      assert len(a) >= 1 and len(b) >= 1
      assert np.all(np.diff(a) == 1) and np.all(np.diff(b) == 1)  # Each segment is contiguous text.
      assert np.all(doc_of(a) == d)
      doc_b = doc_of(b)
      assert np.all(doc_b == doc_b[0])
      if inst['next_sentence_label']:
        assert doc_b[0] != d, 'a random B comes from another document'
      else:
        assert doc_b[0] == d and b[0] > a[-1], 'the actual next text follows A'
      truncated += len(a) + len(b) == max_seq_length - 3
      labels.append(inst['next_sentence_label'])
  assert len(labels) > 500 and 0.4 < np.mean(labels) < 0.65
  assert truncated > 100


def test_nsp_random_next_rate():
  rng = np.random.default_rng(12)
  docs, _ = consecutive_documents(1000, rng, sentence_lengths=(3, 10), sentences=(20, 60))
  labels = [inst['next_sentence_label'] for d in range(len(docs))
            for inst in bert_instances.create_instances_from_document(docs, d, max_seq_length=64, short_seq_prob=0.0,
                                                                      rng=rng, cls_id=CLS, sep_id=SEP)]
  # Short sentences make single-sentence chunks (always random-next) rare, so the rate is close to 1/2: with
  # ~5800 instances the standard error is 0.7 points; tolerance [0.47, 0.54] (the residual bias is about +1 point).
  assert len(labels) > 5000
  assert 0.47 < np.mean(labels) < 0.54, np.mean(labels)


def test_single_sentence_chunks_are_split_inside_the_sentence():
  """Sentences longer than the target make every chunk a single sentence (the original pairs every such chunk with
  a random B: 100 % random here). Each is split inside its sentence: A its head, B its tail or random text that also
  starts inside a sentence, half each, so the labels stay balanced and where B starts does not tell the label."""
  rng = np.random.default_rng(7)
  docs, starts = consecutive_documents(800, rng, sentence_lengths=(62, 90), sentences=(1, 4))
  sentence_of = np.asarray(sorted(int(s[0]) for doc in docs for s in doc))
  sentence_starts = set(sentence_of.tolist())
  doc_of = lambda ids: np.searchsorted(starts, ids, side='right') - 1  # noqa: E731
  labels, b_at_sentence_start = [], {0: [], 1: []}
  for d in range(len(docs)):
    for inst in bert_instances.create_instances_from_document(docs, d, max_seq_length=64, short_seq_prob=0.1,
                                                              rng=rng, cls_id=CLS, sep_id=SEP):
      ids, num_a, label = inst['input_ids'], inst['num_a'], inst['next_sentence_label']
      a, b = ids[1:num_a - 1], ids[num_a:-1]
      labels.append(label)
      assert np.searchsorted(sentence_of, a[0], 'right') == np.searchsorted(sentence_of, a[-1], 'right')
      b_at_sentence_start[label].append(int(b[0]) in sentence_starts)
      if label == 0:  # The sentence's own tail.
        assert b[0] > a[-1] and np.searchsorted(sentence_of, b[0], 'right') == np.searchsorted(sentence_of, a[0],
                                                                                               'right')
      else:
        assert doc_of(b[0]) != d
  # ~1580 instances (0.496 random with this seed): standard error 1.3 points, tolerance 4.5 points either side.
  assert len(labels) > 1300
  assert 0.455 < np.mean(labels) < 0.545, np.mean(labels)
  # B starts inside a sentence for both labels (a random B cut at its front past its first sentence can start at
  # the next one: rare).
  assert np.mean(b_at_sentence_start[0]) == 0.0 and np.mean(b_at_sentence_start[1]) < 0.05


def test_one_token_sentence_chunk_gets_a_random_next():
  docs = [[np.asarray([10], np.int32)], [np.arange(20, 30, dtype=np.int32)], [np.arange(40, 50, dtype=np.int32)]]
  for seed in range(20):
    [inst] = bert_instances.create_instances_from_document(docs, 0, max_seq_length=16, short_seq_prob=0.0,
                                                           rng=np.random.default_rng(seed), cls_id=CLS, sep_id=SEP)
    assert inst['next_sentence_label'] == 1 and inst['input_ids'][1] == 10 and inst['num_a'] == 3


def test_segment_ids_and_padding_in_batch():
  rng = np.random.default_rng(5)
  docs, _ = consecutive_documents(20, rng)
  instances = bert_instances.create_instances_from_document(docs, 0, max_seq_length=64, short_seq_prob=0.0, rng=rng,
                                                cls_id=CLS, sep_id=SEP)
  rows = []
  for inst in instances:
    ids, pos, lab, w = masking.mask_tokens(inst['input_ids'], rng, **mask_kwargs(10**6, max_predictions_per_seq=10))
    rows.append(dict(inst, input_ids=ids, masked_lm_positions=pos, masked_lm_ids=lab, masked_lm_weights=w))
  batch = pd.pad_batch(rows, max_seq_length=64, max_predictions_per_seq=10)
  assert {k: (v.shape, v.dtype.name) for k, v in batch.items()} == {
      'input_ids': ((len(rows), 64), 'int32'), 'input_mask': ((len(rows), 64), 'int32'),
      'segment_ids': ((len(rows), 64), 'int32'), 'masked_lm_positions': ((len(rows), 10), 'int32'),
      'masked_lm_ids': ((len(rows), 10), 'int32'), 'masked_lm_weights': ((len(rows), 10), 'float32'),
      'next_sentence_labels': ((len(rows),), 'int32')}
  for r, inst in enumerate(instances):
    n, num_a = len(inst['input_ids']), inst['num_a']
    np.testing.assert_array_equal(batch['segment_ids'][r], [0] * num_a + [1] * (n - num_a) + [0] * (64 - n))
    np.testing.assert_array_equal(batch['input_mask'][r], [1] * n + [0] * (64 - n))
    assert batch['next_sentence_labels'][r] == inst['next_sentence_label']


def test_full_sentences_without_nsp():
  rng = np.random.default_rng(6)
  docs, _ = consecutive_documents(30, rng, sentence_lengths=(3, 90))
  for d, doc in enumerate(docs):
    instances = bert_instances.create_instances_from_document(docs, d, max_seq_length=64, short_seq_prob=0.1, rng=rng,
                                                  cls_id=CLS, sep_id=SEP, next_sentence=False)
    for inst in instances:
      ids = inst['input_ids']
      assert len(ids) <= 64 and ids[0] == CLS and ids[-1] == SEP and inst['num_a'] == len(ids)
      assert inst['next_sentence_label'] == 0
    text = np.concatenate([inst['input_ids'][1:-1] for inst in instances])
    np.testing.assert_array_equal(text, np.concatenate(doc))  # All of the document, in order, nothing lost.


# ----------------------------------------------------------------------------------------------------------------
# Shards.
# ----------------------------------------------------------------------------------------------------------------

FEATURES = {'ids': ('uint16', (None,)), 'pair': ('int32', (None, 2)), 'label': ('uint8', ()), 'score': ('float32', ())}


def make_test_records(task):
  """Module-level so spawned writer processes can import it."""
  rng = np.random.default_rng(task)
  for _ in range(int(rng.integers(0, 40))):
    n = int(rng.integers(0, 30))
    yield {'ids': rng.integers(0, 65536, n), 'pair': rng.integers(-5, 5, (n // 2, 2)),
           'label': int(rng.integers(0, 2)), 'score': np.float32(rng.random())}
  return {'tasks': 1}


def test_codec_round_trip_and_errors():
  for task in range(20):
    for record in make_test_records(task):
      back = shards.decode_record(shards.encode_record(record, FEATURES), FEATURES)
      for name in FEATURES:
        np.testing.assert_array_equal(back[name], np.asarray(record[name]).astype(FEATURES[name][0]))
  with pytest.raises(ValueError, match='do not fit'):
    shards.encode_record({'ids': [70000], 'pair': np.zeros([0, 2]), 'label': 0, 'score': 0.0}, FEATURES)
  with pytest.raises(ValueError, match='expected shape'):
    shards.encode_record({'ids': [1], 'pair': np.zeros([1, 3]), 'label': 0, 'score': 0.0}, FEATURES)


def test_shards_parallel_equals_serial_and_reuse(tmp_path):
  tasks = list(range(5))
  serial = shards.write_shards(tmp_path / 'serial', tasks, make_test_records, FEATURES, num_workers=1,
                               fingerprint='fp-1', info={'note': 'test'})
  parallel = shards.write_shards(tmp_path / 'parallel', tasks, make_test_records, FEATURES, num_workers=2,
                                 fingerprint='fp-1')
  expected = [r for t in tasks for r in make_test_records(t)]
  assert serial['num_records'] == parallel['num_records'] == len(expected)
  assert [s['num_records'] for s in serial['shards']] == [s['num_records'] for s in parallel['shards']]
  assert serial['stats']['tasks'] == 5 and serial['stats']['records'] == len(expected)
  assert serial['stats']['features']['label']['sum'] == sum(r['label'] for r in expected)
  a, b = shards.ShardReader(tmp_path / 'serial'), shards.ShardReader(tmp_path / 'parallel')
  assert len(a) == len(b) == len(expected)
  for ra, rb, want in zip(a, b, expected):
    for name in FEATURES:
      np.testing.assert_array_equal(ra[name], np.asarray(want[name]).astype(FEATURES[name][0]))
      np.testing.assert_array_equal(rb[name], ra[name])
  some = [3, 0, len(expected) - 1]
  assert [int(r['label']) for r in a.__getitems__(some)] == [int(expected[k]['label']) for k in some]
  # Same fingerprint: reused, nothing rewritten. Another fingerprint: rewritten.
  shard_file = tmp_path / 'serial' / serial['shards'][0]['file']
  mtime = os.stat(shard_file).st_mtime_ns
  again = shards.write_shards(tmp_path / 'serial', tasks, make_test_records, FEATURES, fingerprint='fp-1')
  assert again['reused'] and os.stat(shard_file).st_mtime_ns == mtime
  other = shards.write_shards(tmp_path / 'serial', tasks[:2], make_test_records, FEATURES, fingerprint='fp-2')
  assert not other['reused'] and len(shards.ShardReader(tmp_path / 'serial')) == other['num_records']
  assert sorted(os.listdir(tmp_path / 'serial')) == sorted([s['file'] for s in other['shards']] + ['metadata.json'])


def test_pretraining_shards_count_empty_documents_and_mask_statically(tmp_path):
  docs = synthetic_documents(60, seed=8)
  tok = StandInTokenizer.from_words(WORDS)
  bad = [[], ['   ', ''], ['\x00\x01'], ['\u200b']]  # Nothing survives tokenisation in any of these.
  cfg = pd.data_config(max_seq_length=32, max_predictions_per_seq=5, masking='static', dupe_factor=2,
                       whole_word_mask=True)
  stats = pd.write_pretraining_shards(docs[:30] + bad + docs[30:], tok, tmp_path / 'static', cfg, num_shards=3,
                                      num_workers=1, seed=1)
  assert stats['documents'] == 64 and stats['documents_empty'] == 4
  assert not stats['reused'] and stats['summary']['instances'] == len(shards.ShardReader(tmp_path / 'static'))
  assert 0.35 < stats['summary']['random_next_fraction'] < 0.75
  reader = shards.ShardReader(tmp_path / 'static')
  for record in reader:
    ids, pos = record['input_ids'], record['masked_lm_positions']
    assert len(ids) <= 32 and 1 <= len(pos) <= 5 and ids[0] == CLS
    assert np.all(np.diff(pos.astype(int)) > 0) and not np.isin(record['masked_lm_ids'], SPECIALS).any()
  again = pd.write_pretraining_shards(iter(docs[:30] + bad + docs[30:]), tok, tmp_path / 'static', cfg,
                                      num_shards=3, num_workers=1, seed=1)
  assert again['reused'] and again['fingerprint'] == stats['fingerprint']
  loader = pd.make_loader(tmp_path / 'static', cfg, tok, 8, seed=0)
  batch = loader.host_batch(0)
  assert batch['input_ids'].shape == (8, 32) and batch['masked_lm_positions'].shape == (8, 5)
  real = batch['masked_lm_weights'] > 0
  assert np.all(real.sum(1) >= 1)
  assert not np.isin(batch['masked_lm_ids'][real], SPECIALS).any()
  assert np.all(np.take_along_axis(batch['input_mask'], batch['masked_lm_positions'], 1)[real] == 1)
  masked = np.take_along_axis(batch['input_ids'], batch['masked_lm_positions'], 1)[real]
  assert np.mean(masked == MASK) > 0.5  # 80 % expected; a loose bound on a few dozen predictions.



def test_dynamic_nsp_shards_cut_fresh_pairs_each_pass(tmp_path):
  """With NSP, every `dupe_factor` pass cuts the documents again with new split points and random B segments
  (dynamic masking too): a small corpus does not repeat the same pairs every epoch. Without NSP the packing is the
  same every pass, so one pass is written."""
  docs = synthetic_documents(40, seed=4)
  tok = StandInTokenizer.from_words(WORDS)

  def instances(name, **fields):
    cfg = pd.data_config(max_seq_length=32, masking='dynamic', **fields)
    pd.write_pretraining_shards(docs, tok, tmp_path / name, cfg, num_shards=2, num_workers=1, seed=1)
    return [tuple(r['input_ids'].tolist()) + (int(r['next_sentence_label']),)
            for r in shards.ShardReader(tmp_path / name)]

  one, three = instances('one', dupe_factor=1), instances('three', dupe_factor=3)
  assert 2.7 * len(one) <= len(three) <= 3.3 * len(one)
  # Mostly new pairs: far fewer repeats than three copies of one pass would give.
  assert len(set(three)) > 2 * len(set(one))
  assert 0.4 < np.mean([r[-1] for r in three]) < 0.6
  assert len(instances('full1', dupe_factor=1, next_sentence=False)) == len(
      instances('full3', dupe_factor=3, next_sentence=False))

# ----------------------------------------------------------------------------------------------------------------
# Step loader.
# ----------------------------------------------------------------------------------------------------------------

def _row_batch(records, keys, epoch, *, seed):
  """A row-wise batch function drawing randomness from (seed, epoch, key) only."""
  noise = [np.random.default_rng([seed, epoch, int(k)]).integers(1000) for k in keys]
  return {'value': np.asarray([r for r in records]), 'key': np.asarray(keys), 'noise': np.asarray(noise),
          'epoch': np.full(len(keys), epoch)}


def test_step_loader_contract():
  source = list(range(103))  # 103 records, B = 8: 12 steps per epoch, 7 records dropped per epoch.
  make = lambda **kw: StepLoader(source, functools.partial(_row_batch, seed=5), 8, seed=11, **kw)  # noqa: E731
  one = make()
  assert one.steps_per_epoch == 12 and one.num_records == 103
  two = [make(process_index=p, process_count=2) for p in range(2)]
  for step in (0, 5, 11, 12, 30):
    full = one.host_batch(step)
    halves = [loader.host_batch(step) for loader in two]
    for name in full:
      np.testing.assert_array_equal(full[name], np.concatenate([h[name] for h in halves]))
    assert np.all(full['epoch'] == step // 12)
  epoch0 = np.concatenate([one.host_batch(s)['key'] for s in range(12)])
  epoch1 = np.concatenate([one.host_batch(s)['key'] for s in range(12, 24)])
  assert len(set(epoch0.tolist())) == 96 and len(set(epoch1.tolist())) == 96  # No repeats within an epoch.
  assert not np.array_equal(epoch0, epoch1)
  # Resuming: iterate(k) reproduces the uninterrupted run from step k.
  from_zero = [b for _, b in one.iterate(0, num_steps=20)]
  from_k = list(make().iterate(13, num_steps=7))
  assert [s for s, _ in from_k] == list(range(13, 20))
  for (_, b), ref in zip(from_k, from_zero[13:]):
    for name in ref:
      np.testing.assert_array_equal(b[name], ref[name])
  # Unshuffled (eval): in order, every record each pass, the last batch completed from the start of the pass.
  ordered = make(shuffle=False)
  assert ordered.steps_per_epoch == 13
  np.testing.assert_array_equal(ordered.host_batch(1)['key'], np.arange(8, 16))
  np.testing.assert_array_equal(ordered.host_batch(12)['key'], [96, 97, 98, 99, 100, 101, 102, 0])
  np.testing.assert_array_equal(ordered.host_batch(13)['key'], np.arange(8))
  tiny = StepLoader(list(range(5)), functools.partial(_row_batch, seed=0), 8, seed=0, shuffle=False)
  np.testing.assert_array_equal(tiny.host_batch(0)['key'], [0, 1, 2, 3, 4, 0, 1, 2])
  with pytest.raises(ValueError, match='not divisible by process_count'):
    make(process_count=3)
  with pytest.raises(ValueError, match='fewer than one global batch'):
    StepLoader(list(range(5)), _row_batch, 8, seed=0)


def test_iterate_propagates_errors_and_closes():
  def failing(records, keys, epoch):
    if epoch > 0:
      raise RuntimeError('boom')
    return {'x': np.asarray(records)}
  loader = StepLoader(list(range(16)), failing, 4, seed=0, prefetch=1)
  it = loader.iterate(0)
  assert [next(it)[0] for _ in range(4)] == [0, 1, 2, 3]
  with pytest.raises(RuntimeError, match='boom'):
    next(it)
  it = loader.iterate(0)
  next(it)
  it.close()  # Must not hang.


@pytest.fixture(scope='module')
def dynamic_shards(tmp_path_factory):
  tok = StandInTokenizer.from_words(WORDS)
  cfg = pd.data_config(max_seq_length=32, max_predictions_per_seq=5, masking='dynamic', whole_word_mask=True)
  out = tmp_path_factory.mktemp('dynamic')
  stats = pd.write_pretraining_shards(synthetic_documents(80, seed=9), tok, out, cfg, num_shards=2, num_workers=1,
                                      seed=3)
  return tok, cfg, out, stats


def test_dynamic_masks_fresh_per_epoch_identical_across_processes(dynamic_shards):
  tok, cfg, out, stats = dynamic_shards
  assert stats['summary']['instances'] >= 64
  loader = pd.make_loader(out, cfg, tok, 16, seed=7)
  halves = [pd.make_loader(out, cfg, pd.describe_tokenizer(tok), 16, seed=7, process_index=p, process_count=2)
            for p in range(2)]
  spe = loader.steps_per_epoch
  for step in (0, spe + 1):
    full = loader.host_batch(step)
    parts = [h.host_batch(step) for h in halves]
    for name in full:
      np.testing.assert_array_equal(full[name], np.concatenate([p[name] for p in parts]))
  # The same record in epochs 0 and 1: same text, different masks; the same (epoch, record): same masks.
  def rows_by_record(epoch):
    out = {}
    for step in range(epoch * spe, (epoch + 1) * spe):
      batch = loader.host_batch(step)
      for i, key in enumerate(loader.record_ids(step)):
        out[int(key)] = {k: v[i] for k, v in batch.items()}
    return out
  e0, e1 = rows_by_record(0), rows_by_record(1)
  common_ids = sorted(set(e0) & set(e1))
  assert len(common_ids) > 20
  differ = 0
  for k in common_ids:
    a, b = e0[k], e1[k]
    np.testing.assert_array_equal(a['segment_ids'], b['segment_ids'])
    text_a = a['input_ids'].copy()
    text_a[a['masked_lm_positions'][a['masked_lm_weights'] > 0]] = a['masked_lm_ids'][a['masked_lm_weights'] > 0]
    text_b = b['input_ids'].copy()
    text_b[b['masked_lm_positions'][b['masked_lm_weights'] > 0]] = b['masked_lm_ids'][b['masked_lm_weights'] > 0]
    np.testing.assert_array_equal(text_a, text_b)
    differ += not np.array_equal(a['masked_lm_positions'], b['masked_lm_positions'])
  assert differ > 0.7 * len(common_ids)
  again = pd.make_loader(out, cfg, tok, 16, seed=7).host_batch(spe + 1)
  for name, value in loader.host_batch(spe + 1).items():
    np.testing.assert_array_equal(again[name], value)


def test_eval_loader_is_deterministic(dynamic_shards):
  tok, cfg, out, _ = dynamic_shards
  loader = pd.make_loader(out, cfg, tok, 16, seed=7, shuffle=False)
  spe = loader.steps_per_epoch
  first = loader.host_batch(0)
  np.testing.assert_array_equal(loader.record_ids(0), np.arange(16))
  seen = np.concatenate([loader.record_ids(s) for s in range(spe)])
  assert set(seen.tolist()) == set(range(loader.num_records))  # One pass covers the whole eval set.
  big = pd.make_loader(out, cfg, tok, 2 * loader.num_records + 2, seed=7, shuffle=False)  # Bigger than the set.
  assert big.host_batch(0)['input_ids'].shape[0] == 2 * loader.num_records + 2
  for batch in (loader.host_batch(0), loader.host_batch(spe), pd.make_loader(out, cfg, tok, 16, seed=7,
                                                                              shuffle=False).host_batch(0)):
    for name in first:
      np.testing.assert_array_equal(batch[name], first[name])


# ----------------------------------------------------------------------------------------------------------------
# Config and end to end.
# ----------------------------------------------------------------------------------------------------------------

def test_validate_data_config():
  pd.validate_data_config(pd.data_config())
  with pytest.raises(ConfigError, match=r'data\.max_predictions_per_seq'):
    pd.validate_data_config(pd.data_config(max_seq_length=16, max_predictions_per_seq=20))
  with pytest.raises(ConfigError, match=r'data\.eval_corpus'):
    pd.validate_data_config(pd.data_config(corpus='/some/files*.txt'))
  with pytest.raises(ConfigError, match=r'data\.masking'):
    pd.validate_data_config(pd.data_config(masking='sometimes'))
  with pytest.raises(ConfigError, match=r'data\.max_seq_length'):
    pd.validate_data_config(pd.data_config(max_seq_length=4))


def test_prepare_pretraining_data_end_to_end(tmp_path, monkeypatch):
  try:
    import bert_jax.tokenizer  # noqa: F401
  except ImportError:  # Not written yet: a stand-in with the same two functions.
    monkeypatch.setitem(sys.modules, 'bert_jax.tokenizer', StandInTokenizerModule)
    monkeypatch.setattr(bert_jax, 'tokenizer', StandInTokenizerModule, raising=False)

  def write(path, docs, bad_line=False):
    with open(path, 'wb') as f:
      for i, doc in enumerate(docs):
        for sentence in doc:
          f.write(sentence.encode() + b'\n')
        if bad_line and i == 3:
          f.write(b'\xff\xfe broken utf-8\n')
        f.write(b'\n')

  write(tmp_path / 'train.txt', synthetic_documents(300, seed=10), bad_line=True)
  write(tmp_path / 'valid.txt', synthetic_documents(40, seed=11))
  cfg = pd.data_config(corpus=str(tmp_path / 'train.txt'), eval_corpus=str(tmp_path / 'valid.txt'), vocab_size=200,
                       max_seq_length=64, max_predictions_per_seq=10, num_shards=2, num_workers=2)
  tok, train_dir, eval_dir = pd.prepare_pretraining_data(cfg, tmp_path / 'work')
  train_meta, eval_meta = shards.read_metadata(train_dir), shards.read_metadata(eval_dir)
  assert train_meta['info']['input']['documents'] == 300
  assert train_meta['info']['input']['reader']['bad_lines'] == 1
  assert eval_meta['num_records'] >= 16 and train_meta['num_records'] > eval_meta['num_records']
  train = pd.make_loader(train_dir, cfg, tok, 16, seed=0)
  batch = train.host_batch(3)
  assert batch['input_ids'].shape == (16, 64) and batch['input_ids'].max() < tok.vocab_size
  assert np.all(batch['input_ids'][:, 0] == tok.cls_id)
  stamp = os.stat(os.path.join(train_dir, 'metadata.json')).st_mtime_ns
  _, train_dir2, _ = pd.prepare_pretraining_data(cfg, tmp_path / 'work')  # Second call: everything reused.
  assert train_dir2 == train_dir and os.stat(os.path.join(train_dir, 'metadata.json')).st_mtime_ns == stamp
