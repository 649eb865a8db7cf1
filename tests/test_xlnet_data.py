"""Tests for the XLNet data path: sentencepiece training and parity with `transformers.XLNetTokenizer`, rows
`[reuse | A <sep> B <sep> <cls>]`, whole-word span masks, stream order in the step loader, bi_data, and
`prepare_pretraining_data` end to end. Statistics use fixed seeds; tolerances are stated next to each check.

HF reference: `transformers` 5.x only has the Rust `XLNetTokenizer`. Built from the model's pieces, scores and
normalisation map (what the slow-to-fast converter did) it is the original algorithm minus the digit-comma rule, which
`hf_reference_ids` adds on top with HF's own segmentation. (`XLNetTokenizer.from_pretrained` on a bare `spiece.model`
makes the user-defined symbols `. ( ) " -` added tokens that cut the text before segmentation, so its ids differ on
most sentences; it is not used as the reference.) HF also matches its special-token strings (`<cls>`, `<sep>`,
`<eod>`, ...) in raw text, which sentencepiece never does for control symbols: texts holding such literals are left
out of the comparison and checked against the original behaviour instead.
"""
import os

import numpy as np
import pytest

from common.config import ConfigError
from common.data import corpus, shards
from xlnet_jax import pretrain_data as pd
from xlnet_jax import rows
from xlnet_jax import tokenizer as tk

HARD_CASES = [
    'I was born in 2000, and this is falsé.',
    'I was born in 92000, and this is falsé.',
    'Prices: 1,000 or 1,000,000, maybe 3.14, 2,5 and x1, y22, 0,',
    "He said ``like this'' and ''that'' with `single' quotes.",
    'Ångström, naïve café, résumé, Øresund, straße, İstanbul, ÉCOLE, ﬁne ligature.',
    'Fullwidth １，０００ and superscripts x²,y³, and ½, ⅓.',
    '  leading   and\ttrailing \u00a0 spaces \u3000 here  ',
    'Dashes – and — and - and (parens) and "quotes" and £5 or €7.',
    'Emoji 🙂 and CJK 漢字 and Greek ΣΑΣ and Cyrillic Привет.',
    'a,b 1,a a1, ,1 ,,, 11,,22',
    '',
    '   ',
]


# ----------------------------------------------------------------------------------------------------------------
# Fixtures.
# ----------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def embedded_dir(tmp_path_factory):
  out_dir = str(tmp_path_factory.getbasetemp() / 'xlnet_embedded_corpus')
  corpus.build_embedded_corpus(out_dir)
  return out_dir


@pytest.fixture(scope='module')
def spiece_models(embedded_dir, tmp_path_factory):
  """{do_lower_case: spiece.model} trained on the embedded train split (8000 pieces asked; the lower-cased text
  supports fewer, and the soft limit gives a smaller model)."""
  train = os.path.join(embedded_dir, 'train.txt')
  return {lower: tk.train_sentencepiece([train], 8000, str(tmp_path_factory.mktemp(f'spiece_{lower}') / 'spiece'),
                                        do_lower_case=lower)
          for lower in (False, True)}


@pytest.fixture(scope='module')
def corpus_lines(embedded_dir):
  """About 4900 real lines: every 4th line of the train split and the whole validation split."""
  lines = []
  for split, step in (('train', 4), ('valid', 1)):
    with open(os.path.join(embedded_dir, f'{split}.txt'), encoding='utf-8') as f:
      lines.extend([line for line in f.read().split('\n') if line][::step])
  return lines


@pytest.fixture(scope='module')
def documents(embedded_dir):
  """The first 700 documents of the embedded train split (about 70k pieces)."""
  return list(corpus.iter_documents(os.path.join(embedded_dir, 'train.txt')))[:700]


def hf_tokenizer(model_file, do_lower_case):
  from sentencepiece import sentencepiece_model_pb2
  from transformers import XLNetTokenizer
  proto = sentencepiece_model_pb2.ModelProto()
  with open(model_file, 'rb') as f:
    proto.ParseFromString(f.read())
  return XLNetTokenizer(vocab=[(p.piece, p.score) for p in proto.pieces], do_lower_case=do_lower_case,
                        _spm_precompiled_charsmap=proto.normalizer_spec.precompiled_charsmap)


def hf_reference_ids(hf, text):
  """HF's segmentation plus the original digit-comma rule (transcribed from the original `encode_pieces`)."""
  pieces = []
  for piece in hf.tokenize(text):
    if len(piece) > 1 and piece[-1] == ',' and piece[-2].isdigit():
      sub = hf.tokenize(piece[:-1].replace(tk.SPIECE_UNDERLINE, ''))
      if piece[0] != tk.SPIECE_UNDERLINE and sub and sub[0][0] == tk.SPIECE_UNDERLINE:
        sub = sub[1:] if len(sub[0]) == 1 else [sub[0][1:]] + sub[1:]
      pieces.extend(sub + [','])
    else:
      pieces.append(piece)
  return hf.convert_tokens_to_ids(pieces)


# ----------------------------------------------------------------------------------------------------------------
# Tokenizer.
# ----------------------------------------------------------------------------------------------------------------

def test_symbols_and_training_determinism(spiece_models, embedded_dir, tmp_path):
  tok = tk.load_tokenizer(spiece_models[False])
  assert tok.vocab_size == 8000 and 1000 < tk.load_tokenizer(spiece_models[True]).vocab_size <= 8000
  assert [tok.id_to_piece(i) for i in range(17)] == [s[1] for s in tk.SPECIAL_SYMBOLS] + list(
      tk.USER_DEFINED_SYMBOLS[1:])
  assert (tok.unk_id, tok.bos_id, tok.eos_id, tok.cls_id, tok.sep_id, tok.pad_id, tok.mask_id, tok.eod_id,
          tok.eop_id) == tuple(range(9))
  assert tok.is_word_start[:17].all() and tok.id_to_piece(tok.space_id) == tk.SPIECE_UNDERLINE
  ids = tok.encode('a <cls> b <eop> c')  # User-defined symbols match in text, control symbols never do.
  assert ids.count(tok.eop_id) == 1 and tok.cls_id not in ids
  saved = tok.save(str(tmp_path / 'saved'))
  assert tk.load_tokenizer(str(tmp_path / 'saved')).encode(HARD_CASES[0]) == tok.encode(HARD_CASES[0])
  assert saved.endswith('spiece.model')
  # Same input, same model: pieces, scores and bytes (the model records its output prefix, so same prefix).
  small = os.path.join(embedded_dir, 'valid.txt')
  first = tk.train_sentencepiece([small], 600, str(tmp_path / 'a' / 'spiece'))
  with open(first, 'rb') as f:
    first_bytes = f.read()
  again = tk.train_sentencepiece([small], 600, str(tmp_path / 'a' / 'spiece'))
  with open(again, 'rb') as f:
    assert f.read() == first_bytes
  other = tk.train_sentencepiece([small], 600, str(tmp_path / 'b' / 'spiece'))
  a, b = tk.load_tokenizer(first), tk.load_tokenizer(other)
  assert a.pieces == b.pieces
  assert [a._sp.get_score(i) for i in range(600)] == [b._sp.get_score(i) for i in range(600)]


@pytest.mark.parametrize('lower', [False, True])
def test_ids_equal_hf_xlnet_tokenizer(spiece_models, corpus_lines, lower):
  tok = tk.load_tokenizer(spiece_models[lower], do_lower_case=lower)
  hf = hf_tokenizer(spiece_models[lower], lower)
  texts = corpus_lines + HARD_CASES
  ours = tok.encode_batch(texts)
  assert len(texts) > 4000
  theirs = hf(texts, add_special_tokens=False)['input_ids']  # Without the digit-comma rule.
  rule_lines = [i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b]
  for i in rule_lines:
    assert ours[i] == hf_reference_ids(hf, texts[i]), texts[i]
    assert any(len(p) > 1 and p[-1] == ',' and p[-2].isdigit() for p in hf.tokenize(texts[i]))
  assert 0 < len(rule_lines) < 0.05 * len(texts)
  for text in HARD_CASES:
    assert tok.encode(text) == hf_reference_ids(hf, text), text
    assert tok.encode(text) == tok.encode_batch([text])[0]
  pieces = tok.encode_pieces('born in 2000, or 92000, and 1,000,000')
  assert not any(len(p) > 1 and p.endswith(',') and p[-2].isdigit() for p in pieces)
  assert ''.join(pieces).replace(tk.SPIECE_UNDERLINE, ' ').strip() == 'born in 2000, or 92000, and 1,000,000'


def test_preprocess_text():
  assert tk.preprocess_text("  ``Café''\t naïve  ") == '"Cafe" naive'
  assert tk.preprocess_text('Café', lower=True) == 'cafe'
  assert tk.preprocess_text('Café', keep_accents=True) == 'Café'


# ----------------------------------------------------------------------------------------------------------------
# Rows and span masks.
# ----------------------------------------------------------------------------------------------------------------

def test_truncate_pair_matches_the_loop():
  rng = np.random.default_rng(0)
  for _ in range(500):
    a, b, total = (int(x) for x in rng.integers(1, 40, 3))
    total = max(total, 2)
    ra, rb = a, b
    while ra + rb > total:
      if ra > rb:
        ra -= 1
      else:
        rb -= 1
    assert rows.truncate_pair(a, b, total) == (ra, rb)
  assert rows.prediction_goals(512, 256, 85) == (43, 42)


def test_span_mask_statistics():
  """n-gram lengths follow p(n) ∝ 1/n (bound 0.01 on each frequency; about 26k spans, standard error <= 0.003);
  in the span step about mask_beta / (mask_alpha + mask_beta) = 1/7 of the words are masked (bound 10 %)."""
  rng = np.random.default_rng(3)
  num_words, spans, masked = 4000, [], 0
  for _ in range(60):
    lengths = np.ones([num_words], np.int64)
    mask, part_spans, filled = rows.sample_span_mask(lengths, np.ones([num_words], bool), 10 * num_words, rng,
                                                    max_ngram=5, mask_alpha=6, mask_beta=1)
    spans.extend(part_spans[:-1])  # The last span may be cut by the end of the words.
    masked += mask.sum() - filled
  frequencies = np.bincount(spans, minlength=6)[1:] / len(spans)
  np.testing.assert_allclose(frequencies, rows.ngram_probabilities(5), atol=0.01)
  assert abs(masked / (60 * num_words) - 1 / 7) < 0.1 / 7
  # Goals are met exactly with single-token words, never exceeded with longer ones; ineligible words stay.
  lengths = rng.integers(1, 4, 300)
  eligible = rng.random(300) < 0.8
  for goal in (1, 7, 40, 85):
    mask, part_spans, _ = rows.sample_span_mask(lengths, eligible, goal, rng, max_ngram=5, mask_alpha=6, mask_beta=1)
    assert goal - 2 <= lengths[mask].sum() <= goal and not mask[~eligible].any()
    assert all(1 <= s <= 5 for s in part_spans)


@pytest.fixture(scope='module')
def forward_shards(spiece_models, documents, tmp_path_factory):
  tok = tk.load_tokenizer(spiece_models[False])
  cfg = pd.data_config(seq_len=128, reuse_len=64, num_predict=20, num_shards=3, num_workers=1)
  out = tmp_path_factory.mktemp('forward')
  stats = pd.write_pretraining_shards(documents, tok, out, cfg, num_shards=3, num_workers=1, seed=5)
  return tok, cfg, out, stats


def row_word_starts(ids, reuse_len, a_len, tok):
  """The documented word boundaries of a row, from the tokenizer's word-start table."""
  special = (ids == tok.sep_id) | (ids == tok.cls_id) | (ids == tok.eod_id)
  starts = tok.is_word_start[ids].copy()
  starts[1:] &= ids[:-1] != tok.space_id
  starts |= special
  starts[1:] |= special[:-1]
  starts[[0, reuse_len, reuse_len + a_len + 1]] = True
  return starts


def test_rows_layout_and_whole_word_masks(forward_shards):
  tok, cfg, out, stats = forward_shards
  L, R, P = cfg.seq_len, cfg.reuse_len, cfg.num_predict
  reader = shards.ShardReader(out)
  records = list(reader)
  assert len(records) == stats['summary']['rows'] > 500
  batch = pd.rows_to_batch(records, seq_len=L, reuse_len=R, sep_id=tok.sep_id, cls_id=tok.cls_id)
  ids, seg = batch['input_ids'], batch['segment_ids']
  targets = batch['is_target']
  for r, record in enumerate(records):
    a_len = int(record['a_len'])
    b_len = L - R - 3 - a_len
    assert a_len >= 1 and b_len >= 1
    assert np.flatnonzero(ids[r] == tok.sep_id).tolist() == [R + a_len, L - 2] and ids[r, -1] == tok.cls_id
    assert tok.cls_id not in ids[r, :-1]
    np.testing.assert_array_equal(seg[r], [0] * (R + a_len + 1) + [1] * (b_len + 1) + [2])
    np.testing.assert_array_equal(batch['is_special'][r], (ids[r] == tok.sep_id) | (ids[r] == tok.cls_id))
    # Whole words only: every word entirely targeted or not at all; no special ever a target.
    word = np.cumsum(row_word_starts(ids[r], R, a_len, tok)) - 1
    per_word = np.bincount(word, weights=targets[r], minlength=word[-1] + 1)
    sizes = np.bincount(word)
    assert np.all((per_word == 0) | (per_word == sizes))
    assert not targets[r][np.isin(ids[r], [tok.sep_id, tok.cls_id, tok.eod_id])].any()
  counts = targets.sum(1)
  # At most P per row, and P almost always: mean within 1 % of P, goals split 10 + 10 between the parts.
  assert counts.max() <= P and counts.mean() > 0.99 * P
  assert abs(targets[:, :R].sum(1).mean() - 10) < 0.2 and abs(targets[:, R:].sum(1).mean() - 10) < 0.2
  assert np.all(batch['input_mask'] == 1)
  # About half of B is random (1/2 of rows with a cut point, all rows without): bound 0.4-0.65.
  assert 0.4 < batch['next_sentence_labels'].mean() < 0.65
  summary = stats['summary']
  assert summary['mean_targets'] == pytest.approx(counts.mean(), abs=1e-3)
  assert 1.5 < summary['mean_span_words'] < 2.6  # E[n] = 5 / H_5 = 2.19 before the goal caps it.


def test_rows_continue_the_stream(forward_shards):
  tok, cfg, out, _ = forward_shards
  R, L = cfg.reuse_len, cfg.seq_len
  reader = shards.ShardReader(out)
  records = list(reader)
  start = 0
  pairs = continuations = 0
  for shard in reader.metadata['shards']:
    group = records[start:start + shard['num_records']]
    start += shard['num_records']
    stream = np.concatenate([r['input_ids'][:R] for r in group])  # The reuse parts tile the stream.
    for k, (prev, row) in enumerate(zip(group, group[1:])):
      assert int(prev['offset']) == k * R and int(row['offset']) == (k + 1) * R
      a_len = int(prev['a_len'])
      a_tokens = prev['input_ids'][R:R + a_len]
      n = min(a_len, R)
      np.testing.assert_array_equal(row['input_ids'][:n], a_tokens[:n])  # A of row k starts row k + 1's reuse.
      b = prev['input_ids'][R + a_len + 1:L - 2]
      begin = (k + 1) * R
      end = begin + (L - R - 3) + len(b)  # B starts before begin + tot.
      if int(prev['next_sentence_label']) == 0 and end <= len(stream):
        # True continuation: B is the stream text after A (A may have lost its right end to the length limit).
        window = np.lib.stride_tricks.sliding_window_view(stream[begin + a_len:end], len(b))
        assert np.all(window == b, axis=1).any()
        continuations += 1
      pairs += 1
  assert pairs > 500 and continuations > 0.3 * pairs


def test_random_b_avoids_its_own_window():
  rng = np.random.default_rng(0)
  sentence_start = np.zeros([5000], bool)
  sentence_start[np.unique(rng.integers(0, 5000, 400))] = True
  sentence_start[0] = True
  starts = np.flatnonzero(sentence_start)
  labels = []
  for offset in range(0, 5000 - 128, 64):
    pair = rows.split_a_b(starts, 5000, offset, seq_len=128, reuse_len=64, rng=rng)
    assert pair['a_len'] + pair['b_len'] == 128 - 64 - 3 and pair['a_len'] >= 1 and pair['b_len'] >= 1
    assert pair['a_begin'] == offset + 64
    assert sentence_start[pair['b_begin']]
    if pair['random_b']:
      assert pair['b_begin'] + pair['b_len'] <= offset or pair['b_begin'] >= offset + 128 - 20
    else:
      assert pair['b_begin'] == pair['a_begin'] + pair['a_len'] or pair['a_len'] + pair['b_len'] == 61
    labels.append(pair['random_b'])
  assert 0.4 < np.mean(labels) < 0.7


# ----------------------------------------------------------------------------------------------------------------
# Loader: stream order, processes, resume, bi_data.
# ----------------------------------------------------------------------------------------------------------------

def test_step_loader_stream_order():
  from common.data.pipeline import StepLoader
  batch_fn = lambda records, keys, epoch: {'key': np.asarray(keys), 'epoch': np.full(len(keys), epoch)}  # noqa
  one = StepLoader(list(range(103)), batch_fn, 8, seed=0, order='stream')  # 8 streams of 12, 7 records unused.
  assert one.steps_per_epoch == 12
  np.testing.assert_array_equal(one.global_batch(0)['key'], np.arange(8) * 12)
  np.testing.assert_array_equal(one.global_batch(25)['key'], np.arange(8) * 12 + 1)
  assert np.all(one.global_batch(25)['epoch'] == 2)
  two = StepLoader(list(range(103)), batch_fn, 8, seed=0, order='stream', stream_groups=2)  # 2 x 51 records.
  np.testing.assert_array_equal(two.global_batch(5)['key'], [5, 17, 29, 41, 56, 68, 80, 92])
  halves = [StepLoader(list(range(103)), batch_fn, 8, seed=0, order='stream', stream_groups=2, process_index=p,
                       process_count=4) for p in range(4)]
  np.testing.assert_array_equal(np.concatenate([h.host_batch(5)['key'] for h in halves]), two.global_batch(5)['key'])
  with pytest.raises(ValueError, match='needs order'):
    StepLoader(list(range(103)), batch_fn, 8, seed=0, stream_groups=2)
  with pytest.raises(ValueError, match='divisible by stream_groups'):
    StepLoader(list(range(103)), batch_fn, 6, seed=0, order='stream', stream_groups=4)
  with pytest.raises(ValueError, match='fewer than one per stream'):
    StepLoader(list(range(7)), batch_fn, 8, seed=0, order='stream')


def test_stream_loader(forward_shards):
  tok, cfg, out, _ = forward_shards
  R = cfg.reuse_len
  loader = pd.make_loader(out, cfg, 8, seed=0)
  n = loader.num_records
  per_stream = n // 8
  assert loader.steps_per_epoch == per_stream
  np.testing.assert_array_equal(loader.record_ids(0, slice(None)), np.arange(8) * per_stream)
  np.testing.assert_array_equal(loader.record_ids(per_stream + 3, slice(None)), np.arange(8) * per_stream + 3)
  # Row b at step s + 1 continues row b at step s (inside a shard, i.e. almost always).
  reader = shards.ShardReader(out)
  shard_of = np.repeat(np.arange(len(reader.metadata['shards'])), [s['num_records'] for s in reader.metadata['shards']])
  continued = 0
  for step in range(per_stream - 1):
    now, nxt = loader.global_batch(step), loader.global_batch(step + 1)
    ids_now, ids_next = loader.record_ids(step, slice(None)), loader.record_ids(step + 1, slice(None))
    for b in range(8):
      if shard_of[ids_now[b]] != shard_of[ids_next[b]]:
        continue
      a_len = int((now['segment_ids'][b] == 0).sum()) - R - 1
      m = min(a_len, R)
      np.testing.assert_array_equal(nxt['input_ids'][b, :m], now['input_ids'][b, R:R + m])
      continued += 1
  assert continued >= 0.95 * 8 * (per_stream - 1)
  # Two processes build the same global batch; resuming at step k equals the uninterrupted run.
  halves = [pd.make_loader(out, cfg, 8, seed=0, process_index=p, process_count=2) for p in range(2)]
  for step in (0, 5, per_stream, 3 * per_stream + 1):
    full = loader.host_batch(step)
    parts = [h.host_batch(step) for h in halves]
    for name in full:
      np.testing.assert_array_equal(full[name], np.concatenate([p[name] for p in parts]))
  straight = [batch for _, batch in loader.iterate(0, num_steps=12)]
  resumed = list(pd.make_loader(out, cfg, 8, seed=0).iterate(7, num_steps=5))
  assert [s for s, _ in resumed] == list(range(7, 12))
  for (_, batch), ref in zip(resumed, straight[7:]):
    for name in ref:
      np.testing.assert_array_equal(batch[name], ref[name])
  with pytest.raises(ValueError, match='seq_len'):
    pd.make_loader(out, pd.data_config(seq_len=256, reuse_len=64), 8, seed=0)
  with pytest.raises(ValueError, match='fewer than one per stream'):
    pd.make_loader(out, cfg, n + 1, seed=0)


def test_bi_data_backward_streams(spiece_models, documents, tmp_path):
  tok = tk.load_tokenizer(spiece_models[False])
  cfg = pd.data_config(seq_len=128, reuse_len=64, num_predict=20, bi_data=True)
  stats = pd.write_pretraining_shards(documents[:200], tok, tmp_path, cfg, num_shards=1, num_workers=1, seed=2)
  records = list(shards.ShardReader(tmp_path))
  assert len(records) % 2 == 0
  half = len(records) // 2
  forward, backward = records[:half], records[half:]
  R = cfg.reuse_len
  stream = np.concatenate([r['input_ids'][:R] for r in forward])  # stream[0, half * R)
  total = stats['stream_tokens'] // 2
  checked = 0
  for k, row in enumerate(backward):  # Backward reuse part k = reversed(stream[T - (k + 1) R, T - k R)).
    lo, hi = total - (k + 1) * R, total - k * R
    if hi <= len(stream):
      np.testing.assert_array_equal(row['input_ids'][:R][::-1], stream[lo:hi])
      checked += 1
  assert checked > 0.8 * half
  assert np.mean([r['target_positions'].size for r in backward]) > 0.99 * cfg.num_predict
  loader = pd.make_loader(tmp_path, cfg, 4, seed=0)
  ids = loader.record_ids(3, slice(None))
  assert np.all(ids[:2] < half) and np.all(ids[2:] >= half)
  np.testing.assert_array_equal(ids, [3, half // 2 + 3, half + 3, half + half // 2 + 3])
  with pytest.raises(ValueError, match='even'):
    pd.make_loader(tmp_path, cfg, 3, seed=0)


# ----------------------------------------------------------------------------------------------------------------
# Config and end to end.
# ----------------------------------------------------------------------------------------------------------------

def test_validate_data_config():
  pd.validate_data_config(pd.data_config())
  assert pd.effective_perm_size(pd.data_config()) == 256
  for overrides, field in [(dict(reuse_len=512), 'reuse_len'), (dict(num_predict=300), 'num_predict'),
                           (dict(perm_size=96), 'perm_size'), (dict(seq_len=384, reuse_len=256), 'perm_size'),
                           (dict(corpus='/some/files*.txt'), 'eval_corpus'), (dict(mask_beta=0), 'mask_beta'),
                           (dict(max_ngram=0), 'max_ngram'), (dict(spiece_model='/missing.model'), 'spiece_model')]:
    with pytest.raises(ConfigError, match=rf'data\.{field}:'):
      pd.validate_data_config(pd.data_config(**overrides))
  pd.validate_data_config(pd.data_config(seq_len=384, reuse_len=256, perm_size=128))


def test_prepare_pretraining_data_end_to_end(embedded_dir, tmp_path):
  import jax
  from xlnet_jax import permutation

  def write(path, docs):
    with open(path, 'w', encoding='utf-8') as f:
      for doc in docs:
        f.write('\n'.join(doc) + '\n\n')

  docs = list(corpus.iter_documents(os.path.join(embedded_dir, 'train.txt')))
  write(tmp_path / 'train.txt', docs[:300])
  write(tmp_path / 'valid.txt', docs[300:340])
  cfg = pd.data_config(corpus=str(tmp_path / 'train.txt'), eval_corpus=str(tmp_path / 'valid.txt'), vocab_size=1000,
                       seq_len=64, reuse_len=32, num_predict=10, num_shards=2, num_workers=2)
  tok, train_dir, eval_dir = pd.prepare_pretraining_data(cfg, tmp_path / 'work')
  assert tok.vocab_size == 1000 and os.path.exists(tmp_path / 'work' / 'tokenizer' / 'spiece.model')
  train_meta, eval_meta = shards.read_metadata(train_dir), shards.read_metadata(eval_dir)
  assert train_meta['info']['input']['documents'] == 300 and eval_meta['num_records'] >= 16
  loader = pd.make_loader(train_dir, cfg, 16, seed=0)
  batch = loader.host_batch(2)
  assert batch['input_ids'].shape == (16, 64) and batch['input_ids'].max() < tok.vocab_size
  assert np.all(batch['input_ids'][:, -1] == tok.cls_id) and batch['is_target'].sum(1).max() <= 10
  out = jax.jit(lambda key, t, s: permutation.sample_permutation(key, t, s, num_predict=10, perm_size=32,
                                                                 reuse_len=32))(
      jax.random.key(0), batch['is_target'], batch['is_special'])
  assert out['perm_mask'].shape == (16, 64, 64) and out['target_mapping'].shape == (16, 10, 64)
  np.testing.assert_array_equal(np.asarray(out['target_weights']).sum(1), batch['is_target'].sum(1))
  stamp = os.stat(os.path.join(train_dir, 'metadata.json')).st_mtime_ns
  _, train_dir2, _ = pd.prepare_pretraining_data(cfg, tmp_path / 'work')  # Second call: everything reused.
  assert train_dir2 == train_dir and os.stat(os.path.join(train_dir, 'metadata.json')).st_mtime_ns == stamp
