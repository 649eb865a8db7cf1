"""WordPiece tokenizer: ids equal to the original BERT algorithm on real text and on hard Unicode cases.

References, from `transformers` (5.x, where `BertTokenizer` is the Rust-backed fast class):
* `reference_tokens`: the original FullTokenizer algorithm as the legacy pure-Python classes implement it
  (`BasicTokenizer` with nothing protected from splitting, then `WordpieceTokenizer`);
* `BertTokenizerLegacy` (the slow tokenizer) and `BertTokenizer` (the fast one) on text without special-token literals.

The legacy `BasicTokenizer` adds one step the original does not have: NFC normalization before splitting. It changes
nothing when lower-casing (accents are stripped after NFD anyway) but, cased, it composes `e` + U+0301 into `é`;
cased comparisons therefore skip the few texts that NFC changes.
"""
import json
import os
import pickle
import unicodedata

import numpy as np
import pytest
from transformers import BertTokenizer
from transformers.models.bert.tokenization_bert_legacy import BasicTokenizer, BertTokenizerLegacy, WordpieceTokenizer

from bert_jax import tokenizer as tk
from common.data import corpus


@pytest.fixture(scope='session')
def embedded_dir(tmp_path_factory):
  out_dir = str(tmp_path_factory.getbasetemp() / 'embedded_corpus')
  corpus.build_embedded_corpus(out_dir)
  return out_dir


@pytest.fixture(scope='session')
def vocab_files(embedded_dir, tmp_path_factory):
  """{do_lower_case: vocab.txt} trained on the embedded corpus (2000 pieces each)."""
  train = os.path.join(embedded_dir, 'train.txt')
  return {lower: tk.train_wordpiece([train], 2000, str(tmp_path_factory.mktemp(f'vocab_{lower}')),
                                    do_lower_case=lower)
          for lower in (True, False)}


@pytest.fixture(scope='session')
def corpus_lines(embedded_dir):
  """About 4000 real lines: every 6th line of the train split and the whole validation split."""
  lines = []
  for split, step in (('train', 6), ('valid', 1)):
    with open(os.path.join(embedded_dir, f'{split}.txt'), encoding='utf-8') as f:
      lines.extend([line for line in f.read().split('\n') if line][::step])
  return lines


def reference_tokens(text, vocab, do_lower_case):
  basic = BasicTokenizer(do_lower_case=do_lower_case)
  wordpiece = WordpieceTokenizer(vocab=vocab, unk_token=tk.UNK)
  return [piece for word in basic.tokenize(text) for piece in wordpiece.tokenize(word)]


def comparable(text, do_lower_case):
  return do_lower_case or unicodedata.normalize('NFC', text) == text


HARD_CASES = [
    '', ' ', '   \t\n\r  ', '\u3000\u00a0\u2009\u202f', '\u2028\u2029\x85',
    'Café naïve résumé Ångström façade Crème Brûlée', 'CAFÉ NAÏVE', 'e\u0301 cafe\u0301 A\u030a',
    'İstanbul ıi ß ẞ ǅ ǈ ﬁ ﬂ Ω K Å', 'ΟΔΟΣ Σ ΑΣ. σΣ ΣΑΣ-ΣΑΣ', 'Straße München Ærø Œuvre',
    '東京タワー 中文字符测试。日本語のテキスト', '한국어 텍스트 안녕하세요', '𠀀𠀁 𪜀 CJK ext B', '一二三abc四五',
    'مرحبا بالعالم', 'שלום עולם', 'Привет, мир! ЁЖИК', 'नमस्ते दुनिया', 'ไทย ภาษา',
    'a\x00b\x01c\x7fd\u200be\ufffdf\ufeffg\u00adh', '\x00\x00\x00', '\x1c\x1d\x1e\x1f', 'tab\there\vvt\fff',
    '!!!...???,,,;;;:::', '"quoted" (parens) [brackets] {braces} <angles>', '--- *** ___ ~~~ ^^^ ```',
    '¡Hola! ¿Qué? «guillemets» „low“ ‘single’ — en–dash … · • ※ ‰ ′ ″', '$100 €50 £30 ¥20 ₹10 ° ± × ÷ § ¶',
    'http://example.com/path?a=1&b=two#frag user@example.org', 'C:\\Windows\\System32 /usr/local/bin',
    '3.14159e-10 1,000,000 0x1F 1/2 50% #hashtag @mention', "don't won't it's o'clock rock'n'roll",
    'supercalifragilisticexpialidocious ' * 3, 'a' * 100, 'a' * 101, 'Ab' * 60, 'é' * 101,
    'MiXeD CaSe WoRdS HTTPServer getElementById iPhone', 'UPPER CASE SENTENCE. lower case sentence.',
    '😀 👍🏽 👨‍👩‍👧 🇫🇷 ❤️ ✓ ✗', '\ue000\uf8ff private use', '\u0378\u0379 unassigned \U000e0001 tag',
    'a\ud800b lone surrogate', 'x\u0300\u0301\u0302y combining run', '\u0e40\u0e01 Thai', 'ｆｕｌｌｗｉｄｔｈ ＡＢＣ １２３',
    '[MASK] [CLS] [SEP] [PAD] [UNK] literal special tokens', '##ing ## #',
    'The quick brown fox jumps over the lazy dog.',
]


def test_trained_vocab_layout_and_determinism(vocab_files, embedded_dir, tmp_path):
  for lower, vocab_file in vocab_files.items():
    tokens = tk.read_vocab(vocab_file)
    assert tuple(tokens[:5]) == tk.SPECIAL_TOKENS
    assert len(tokens) == 2000 and len(set(tokens)) == 2000
    assert ('The' in tokens) != lower  # Cased vocabularies keep capitals.
    assert any(t.startswith('##') and len(t) > 3 for t in tokens)
  small = os.path.join(embedded_dir, 'valid.txt')
  first = tk.train_wordpiece([small], 400, str(tmp_path / 'a'), min_frequency=2)
  second = tk.train_wordpiece([small], 400, str(tmp_path / 'b'), min_frequency=2)
  with open(first, 'rb') as f1, open(second, 'rb') as f2:
    assert f1.read() == f2.read()
  with pytest.raises(ValueError, match='no room'):
    tk.train_wordpiece([small], 50, str(tmp_path / 'c'))


@pytest.mark.parametrize('do_lower_case', [True, False])
def test_ids_match_reference_on_real_text(vocab_files, corpus_lines, do_lower_case):
  vocab_file = vocab_files[do_lower_case]
  ours = tk.load_tokenizer(vocab_file, do_lower_case=do_lower_case)
  legacy = BertTokenizerLegacy(vocab_file, do_lower_case=do_lower_case)
  fast = BertTokenizer(vocab=vocab_file, do_lower_case=do_lower_case)
  lines = [line for line in corpus_lines if comparable(line, do_lower_case)]
  assert len(lines) > 3000
  got = ours.encode_batch(lines)
  want = [legacy.convert_tokens_to_ids(legacy.tokenize(line)) for line in lines]
  mismatches = [line for line, g, w in zip(lines, got, want) if g != w]
  assert not mismatches, mismatches[:3]
  assert got == fast(lines, add_special_tokens=False)['input_ids']
  vocab = legacy.vocab
  for line, ids in zip(lines[:300], got):
    assert ours.encode(line) == ids
    assert ours.tokenize(line) == reference_tokens(line, vocab, do_lower_case)
  assert sum(map(len, got)) > 50_000
  assert np.mean([i == ours.unk_id for ids in got for i in ids]) < 0.01


@pytest.mark.parametrize('do_lower_case', [True, False])
def test_hard_cases_match_reference(vocab_files, do_lower_case):
  vocab_file = vocab_files[do_lower_case]
  ours = tk.load_tokenizer(vocab_file, do_lower_case=do_lower_case)
  vocab = tk.read_vocab(vocab_file)
  vocab = {token: i for i, token in enumerate(vocab)}
  for text in HARD_CASES:
    if comparable(text, do_lower_case):
      tokens = reference_tokens(text, vocab, do_lower_case)
      assert ours.tokenize(text) == tokens, text
      assert ours.encode(text) == [vocab[t] for t in tokens], text
  batch = [text for text in HARD_CASES if comparable(text, do_lower_case)]
  assert ours.encode_batch(batch) == [ours.encode(text) for text in batch]
  assert ours.encode('') == [] and ours.encode(' \t\n\u3000') == [] and ours.encode_batch([]) == []
  assert ours.tokenize('a' * 101) == [tk.UNK]
  assert ours.tokenize('\x00\x00\x00') == []


@pytest.mark.parametrize('do_lower_case', [True, False])
def test_every_character_matches_reference(vocab_files, do_lower_case):
  """Every BMP code point (and a sample of the other planes), in runs of 7 with separators, as the original does.

  This is what keeps the fast Rust path honest: characters its Unicode tables treat differently must be detected.
  """
  ours = tk.load_tokenizer(vocab_files[do_lower_case], do_lower_case=do_lower_case)
  vocab = dict(ours.vocab)
  code_points = [cp for cp in range(0x10000) if not 0xD800 <= cp <= 0xDFFF] + list(range(0x10000, 0x110000, 89))
  texts = []
  for start in range(0, len(code_points), 7):
    run = ''.join(map(chr, code_points[start:start + 7]))
    texts.append(f'{run} a{run[::2]}B {run[1::2]}c')
  texts = [text for text in texts if comparable(text, do_lower_case)]
  got = ours.encode_batch(texts)
  mismatches = [text for text, ids in zip(texts, got)
                if ids != [vocab[t] for t in reference_tokens(text, vocab, do_lower_case)]]
  assert not mismatches, [ascii(text) for text in mismatches[:3]]


def test_context_dependent_sigma_and_literal_special_tokens(tmp_path):
  pieces = ['[', ']', 'mask', 'MASK', 'cls', 'οδος', 'οδοσ', 'σας', 'σασ', 'σ', 'ς', 'α', 'ο', '##ς', '##σ', '##α',
            '##ο', '##δ', 'δ', 'Σ', 'ΟΔΟΣ', '-', '.', 'a', '##b', 'cafe', 'café', '##e', '##́']
  vocab_file = tk.write_vocab(list(tk.SPECIAL_TOKENS) + pieces, str(tmp_path / 'vocab.txt'))
  texts = ['ΟΔΟΣ', 'ΟΔΟΣ.', 'ΣΑΣ ΣΑΣ-ΣΑΣ', 'αΣ Σα ΑΣΑ', 'σΣ Σ', 'Σ.Α', 'ab ΟΔΟΣ ab', '[MASK] [CLS]', 'café Café']
  for lower in (True, False):
    ours = tk.load_tokenizer(vocab_file, do_lower_case=lower)
    vocab = dict(ours.vocab)
    for text in texts:
      assert ours.tokenize(text) == reference_tokens(text, vocab, lower), (lower, text)
    assert ours.encode_batch(texts) == [ours.encode(text) for text in texts]
  lower = tk.load_tokenizer(vocab_file)
  assert lower.tokenize('ΟΔΟΣ ΟΔΟΣ.') == ['οδος', 'οδος', '.']  # Python's final sigma.
  assert lower.tokenize('[MASK]') == ['[', 'mask', ']'] and lower.mask_id not in lower.encode('[MASK] [CLS]')


def test_special_ids_come_from_the_vocab_file(tmp_path):
  # The released BERT layout: [PAD]=0, [unused0..98], [UNK]=100, [CLS]=101, [SEP]=102, [MASK]=103, [unused99...
  tokens = (['[PAD]'] + [f'[unused{i}]' for i in range(99)] + ['[UNK]', '[CLS]', '[SEP]', '[MASK]']
            + ['the', '##s', 'dog', '##g', 'un', '##aff', '##able'])
  vocab_file = tk.write_vocab(tokens, str(tmp_path / 'vocab.txt'))
  tok = tk.load_tokenizer(str(tmp_path))  # A directory holding vocab.txt works too.
  assert (tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id, tok.mask_id) == (0, 100, 101, 102, 103)
  assert tok.special_ids.tolist() == [0, 100, 101, 102, 103]
  assert tok.vocab_size == len(tokens) and tok.id_to_token == tokens and tok.vocab['dog'] == tokens.index('dog')
  assert tok.is_continuation.dtype == np.bool_ and tok.is_continuation.shape == (len(tokens),)
  assert np.flatnonzero(tok.is_continuation).tolist() == [i for i, t in enumerate(tokens) if t.startswith('##')]
  assert tok.tokenize('Unaffable dogs!') == ['un', '##aff', '##able', 'dog', '##s', '[UNK]']
  assert tok.convert_tokens_to_ids(['dog', 'nope']) == [tokens.index('dog'), 100]
  assert tok.convert_ids_to_tokens(tok.encode('the dogs')) == ['the', 'dog', '##s']
  assert tok.decode(tok.encode('unaffable dogs')) == 'unaffable dogs'
  with pytest.raises(ValueError, match='outside the vocabulary'):
    tok.convert_ids_to_tokens([len(tokens)])
  with pytest.raises(ValueError, match='outside the vocabulary'):
    tok.convert_ids_to_tokens([-1])
  assert tk.load_tokenizer(vocab_file, do_lower_case=False).tokenize('Dog') == ['[UNK]']
  copy = pickle.loads(pickle.dumps(tok))  # Shard writers hand the tokenizer to worker processes.
  assert copy.encode('Unaffable ΣΑΣ dogs') == tok.encode('Unaffable ΣΑΣ dogs') and copy.mask_id == 103


def test_invalid_vocab_files_are_refused(tmp_path):
  missing = str(tmp_path / 'nope.txt')
  with pytest.raises(ValueError, match='nope.txt.*does not exist'):
    tk.load_tokenizer(missing)
  for token in tk.SPECIAL_TOKENS:
    path = tk.write_vocab([t for t in tk.SPECIAL_TOKENS if t != token] + ['a'], str(tmp_path / 'partial.txt'))
    with pytest.raises(ValueError, match=rf'partial\.txt.*has no \{token[:-1]}\] token'):
      tk.load_tokenizer(path)
  path = tk.write_vocab(list(tk.SPECIAL_TOKENS) + ['a', 'b', 'a'], str(tmp_path / 'dup.txt'))
  with pytest.raises(ValueError, match=r"dup\.txt.*'a' appears twice \(lines 6 and 8\)"):
    tk.load_tokenizer(path)
  (tmp_path / 'binary.txt').write_bytes(b'[PAD]\n\xff\xfe\n')
  with pytest.raises(ValueError, match='binary.txt.*UTF-8'):
    tk.load_tokenizer(str(tmp_path / 'binary.txt'))


@pytest.mark.parametrize('do_lower_case', [True, False])
def test_save_is_read_by_transformers(vocab_files, corpus_lines, tmp_path, do_lower_case):
  ours = tk.load_tokenizer(vocab_files[do_lower_case], do_lower_case=do_lower_case)
  out_dir = str(tmp_path / 'saved')
  vocab_file = ours.save(out_dir, model_max_length=256)
  assert vocab_file == os.path.join(out_dir, 'vocab.txt') and tk.read_vocab(vocab_file) == ours.id_to_token
  with open(os.path.join(out_dir, 'tokenizer_config.json')) as f:
    config = json.load(f)
  assert config['do_lower_case'] == do_lower_case and config['mask_token'] == '[MASK]'
  for cls in (BertTokenizer, BertTokenizerLegacy):
    loaded = cls.from_pretrained(out_dir)
    assert loaded.do_lower_case == do_lower_case and loaded.model_max_length == 256
    assert loaded.mask_token_id == ours.mask_id and loaded.pad_token_id == ours.pad_id
    sample = [line for line in corpus_lines[:200] if comparable(line, do_lower_case)]
    assert loaded(sample, add_special_tokens=False)['input_ids'] == ours.encode_batch(sample)
  reloaded = tk.load_tokenizer(out_dir, do_lower_case=do_lower_case)
  assert reloaded.encode_batch(corpus_lines[:50]) == ours.encode_batch(corpus_lines[:50])
