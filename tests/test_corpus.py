"""Corpus readers: the embedded standard-library corpus, BERT-format files (bad bytes, gzip, globs), TFDS adapter."""
import gzip
import os
import sys
import types

import numpy as np
import pytest

from common.data import corpus, embedded_corpus, sentences


@pytest.fixture(scope='session')
def embedded_dir(tmp_path_factory):
  out_dir = str(tmp_path_factory.getbasetemp() / 'embedded_corpus')
  corpus.build_embedded_corpus(out_dir)
  return out_dir


def _read(path):
  with open(path, 'rb') as f:
    return f.read()


def _blocks(path):
  """Documents of a BERT-format file as tuples of lines, read independently of `iter_documents`."""
  text = _read(path).decode('utf-8')
  return [tuple(block.split('\n')) for block in text.rstrip('\n').split('\n\n')] if text else []


# ---------------------------------------------------------------------------------------------------------------------
# Embedded corpus
# ---------------------------------------------------------------------------------------------------------------------

def test_embedded_corpus_counts_and_format(embedded_dir):
  counts = corpus.build_embedded_corpus(embedded_dir)  # Second call: answered from the stamp.
  for split in ('train', 'valid'):
    path = os.path.join(embedded_dir, f'{split}.txt')
    data = _read(path)
    text = data.decode('utf-8')  # Valid UTF-8 throughout.
    blocks = _blocks(path)
    assert counts[split]['bytes'] == len(data)
    assert counts[split]['documents'] == len(blocks) > 0
    assert counts[split]['sentences'] == sum(map(len, blocks))
    assert text.endswith('\n') and not text.endswith('\n\n') and not text.startswith('\n')
    assert '\n\n\n' not in text and '\r' not in text
    for block in blocks:
      assert len(block) >= embedded_corpus.MIN_DOCUMENT_SENTENCES
      for line in block:
        assert line and line == line.strip() and ' ' * 2 not in line
        assert not sentences.is_control_only(line)
        assert not line.startswith('>>>')
  train_mb = counts['train']['bytes'] / 1e6
  assert 1.0 < train_mb < 6.0, train_mb
  fraction = counts['valid']['documents'] / (counts['valid']['documents'] + counts['train']['documents'])
  assert 0.005 < fraction < 0.05, fraction


def test_embedded_corpus_is_real_english(embedded_dir):
  text = _read(os.path.join(embedded_dir, 'train.txt')).decode('utf-8')
  words = text.lower().split()
  for common_word in ('the', 'of', 'is', 'and', 'return', 'file', 'object'):
    assert words.count(common_word) > 200, common_word
  lines = text.split('\n')
  assert sum(line.startswith('Return ') for line in lines) > 300  # Function docstrings.
  assert sum('statement' in line for line in lines) > 100  # Reference-manual topics.


def test_embedded_corpus_split_is_disjoint(embedded_dir):
  train = set(_blocks(os.path.join(embedded_dir, 'train.txt')))
  valid = set(_blocks(os.path.join(embedded_dir, 'valid.txt')))
  assert train and valid and not train & valid


def test_embedded_corpus_is_deterministic_and_idempotent(embedded_dir, tmp_path):
  rebuilt = str(tmp_path / 'again')
  counts = corpus.build_embedded_corpus(rebuilt)
  for split in ('train', 'valid'):
    assert _read(os.path.join(rebuilt, f'{split}.txt')) == _read(os.path.join(embedded_dir, f'{split}.txt'))
  train_path = os.path.join(rebuilt, 'train.txt')
  mtime = os.stat(train_path).st_mtime_ns
  assert corpus.build_embedded_corpus(rebuilt) == counts
  assert os.stat(train_path).st_mtime_ns == mtime  # Not rewritten.


def test_embedded_corpus_rebuilds_on_changed_request_or_damage(tmp_path, monkeypatch):
  builds = []
  documents = [(f'function:m.f{i}', [f'Sentence {i} one.', f'Sentence {i} two.']) for i in range(200)]

  def fake_documents():
    builds.append(1)
    return documents

  monkeypatch.setattr(embedded_corpus, 'embedded_documents', fake_documents)
  out_dir = str(tmp_path / 'c')
  first = corpus.build_embedded_corpus(out_dir, validation_fraction=0.02)
  assert corpus.build_embedded_corpus(out_dir, validation_fraction=0.02) == first and len(builds) == 1
  more_valid = corpus.build_embedded_corpus(out_dir, validation_fraction=0.3)
  assert len(builds) == 2 and more_valid['valid']['documents'] > first['valid']['documents']
  assert more_valid['train']['documents'] + more_valid['valid']['documents'] == 200
  with open(os.path.join(out_dir, 'train.txt'), 'ab') as f:
    f.write(b'tampered\n')
  assert corpus.build_embedded_corpus(out_dir, validation_fraction=0.3) == more_valid and len(builds) == 3
  assert not _read(os.path.join(out_dir, 'train.txt')).endswith(b'tampered\n')
  with open(os.path.join(out_dir, embedded_corpus.STAMP_FILE), 'w') as f:
    f.write('{not json')
  assert corpus.build_embedded_corpus(out_dir, validation_fraction=0.3) == more_valid and len(builds) == 4
  with pytest.raises(ValueError, match='validation_fraction'):
    corpus.build_embedded_corpus(out_dir, validation_fraction=1.0)


def test_validation_split_is_a_stable_hash():
  identities = [f'function:module{i}.name{i}' for i in range(20000)]
  chosen = [embedded_corpus.is_validation_document(identity, 0.02) for identity in identities]
  assert 0.015 < np.mean(chosen) < 0.025
  assert chosen == [embedded_corpus.is_validation_document(identity, 0.02) for identity in identities]
  assert not any(embedded_corpus.is_validation_document(identity, 0.0) for identity in identities[:100])
  # sha256('topic:assert')[:8] is fixed forever: the split never depends on the Python version or the run.
  assert embedded_corpus.is_validation_document('topic:assert', 0.02) == (
      int.from_bytes(__import__('hashlib').sha256(b'topic:assert').digest()[:8], 'big') < 0.02 * 2.0**64)


def test_stdlib_walk_skips_unsafe_modules(embedded_dir):
  names = embedded_corpus.stdlib_module_names()
  assert names == embedded_corpus.stdlib_module_names()
  assert 'json.decoder' in names and 'email.message' in names
  for forbidden in ('tkinter', 'idlelib', 'turtle', 'turtledemo', 'antigravity', 'this', 'test'):
    assert forbidden not in names
    assert not any(name.startswith(forbidden + '.') for name in names)
  assert not any('.test.' in name or name.endswith('.test') or '.tests' in name for name in names)
  assert 'idlelib' not in sys.modules and 'turtledemo' not in sys.modules  # Parsed with `ast`, never imported.


# ---------------------------------------------------------------------------------------------------------------------
# Sentence splitting and docstring cleaning
# ---------------------------------------------------------------------------------------------------------------------

def test_split_paragraph_rules():
  assert sentences.split_paragraph('First one. Second one? Third!  "Quoted" start. (Bracketed) too.') == [
      'First one.', 'Second one?', 'Third!', '"Quoted" start.', '(Bracketed) too.']
  # No split before a lower-case word, after an abbreviation or an initial, or without whitespace.
  assert sentences.split_paragraph('Use e.g. This one, i.e. That. Ask J. Smith. See os.path.join. done.') == [
      'Use e.g. This one, i.e. That.', 'Ask J. Smith.', 'See os.path.join. done.']
  assert sentences.split_paragraph('He said "stop." Then left.') == ['He said "stop."', 'Then left.']
  assert sentences.split_paragraph('  wrapped\n  over   lines.\tNext ') == ['wrapped over lines.', 'Next']
  assert sentences.split_paragraph('') == []


def test_split_sentences_paragraphs():
  text = 'Para one line\ncontinues here. Second.\n  \nPara two'
  assert sentences.split_sentences(text) == ['Para one line continues here.', 'Second.', 'Para two']
  assert sentences.split_sentences(text, line_breaks_are_paragraphs=True) == [
      'Para one line', 'continues here.', 'Second.', 'Para two']


def test_docstring_paragraphs_drop_code_and_doctests():
  doc = '''Summary line of the function.

    Longer description that wraps
    over two lines. It has two sentences.

    Args:
        x: indented argument description

    Example::

        result = compute(x) + 1
        if result == 2:
            print(result)

    >>> compute(1)
    2
    A line after the doctest output.

    The "assert" statement
    **********************

    Final words of the docstring here.
    '''
  assert embedded_corpus.docstring_paragraphs(doc) == [
      'Summary line of the function.',
      'Longer description that wraps over two lines. It has two sentences.',
      'x: indented argument description',
      'The "assert" statement',
      'Final words of the docstring here.',
  ]


# ---------------------------------------------------------------------------------------------------------------------
# Reading files
# ---------------------------------------------------------------------------------------------------------------------

_MESSY = (
    b'\xef\xbb\xbfFirst sentence of doc one.\r\n'  # BOM and CRLF
    b'Second sentence of doc one.\n'
    b'bad \xff\xfe bytes here\n'                     # invalid UTF-8: bad line
    b'\n'
    b'\n'                                              # several blank lines: one separator
    b'   \t \n'
    b'\x00\x00\n'                                      # NUL-only: bad line
    b'\x01\x02 \x1f\n'                                 # controls and whitespace only: bad line
    b'\n'                                              # -> doc two had only bad lines: an empty document
    b'Caf\xc3\xa9 na\xc3\xafve \xe4\xb8\xad\xe6\x96\x87 ok.\n'
    b'Mixed \x00 NUL inside is kept.\n'
    b'\xc3\n'                                          # truncated multi-byte sequence: bad line
    b'Last line without newline'
)


def test_iter_documents_counts_bad_input(tmp_path):
  path = tmp_path / 'messy.txt'
  path.write_bytes(_MESSY)
  stats = corpus.ReadStats()
  documents = list(corpus.iter_documents(str(path), stats))
  assert documents == [
      ['First sentence of doc one.', 'Second sentence of doc one.'],
      ['Café naïve 中文 ok.', 'Mixed \x00 NUL inside is kept.', 'Last line without newline'],
  ]
  assert stats == corpus.ReadStats(documents=2, lines=5, bad_lines=4, empty_documents=1, files=1)


def test_iter_documents_gzip_globs_and_file_boundaries(tmp_path):
  (tmp_path / 'a.txt').write_bytes(b'a1.\na2.\n\na3.')  # No trailing newline: the file end ends the document.
  with gzip.open(tmp_path / 'b.txt.gz', 'wb') as f:
    f.write(b'b1.\n\xff\n\nb2.\nb3.\n')
  (tmp_path / 'c.txt').write_bytes(b'')
  stats = corpus.ReadStats()
  documents = list(corpus.iter_documents([str(tmp_path / '*.txt*'), str(tmp_path / 'a.txt')], stats))
  assert documents == [['a1.', 'a2.'], ['a3.'], ['b1.'], ['b2.', 'b3.']]
  assert stats == corpus.ReadStats(documents=4, lines=6, bad_lines=1, empty_documents=0, files=3)


def test_iter_documents_missing_files_fail_early(tmp_path):
  with pytest.raises(FileNotFoundError, match='no such file'):
    corpus.iter_documents(str(tmp_path / 'missing.txt'))
  with pytest.raises(FileNotFoundError, match='no file matches'):
    corpus.iter_documents(str(tmp_path / 'nothing-*.txt'))
  with pytest.raises(FileNotFoundError, match='not a file'):
    corpus.iter_documents(str(tmp_path))
  with pytest.raises(ValueError, match='no input file'):
    corpus.documents_from_source('')


def test_iter_documents_reads_the_embedded_corpus_losslessly(embedded_dir):
  path = os.path.join(embedded_dir, 'valid.txt')
  stats = corpus.ReadStats()
  assert [tuple(d) for d in corpus.iter_documents(path, stats)] == _blocks(path)
  assert stats.bad_lines == 0 and stats.empty_documents == 0 and stats.documents == len(_blocks(path))


def test_documents_from_source_dispatch(embedded_dir, tmp_path):
  train = list(corpus.documents_from_source('embedded', cache_dir=embedded_dir))
  valid = list(corpus.documents_from_source('embedded:valid', cache_dir=embedded_dir))
  assert [tuple(d) for d in train] == _blocks(os.path.join(embedded_dir, 'train.txt'))
  assert [tuple(d) for d in valid] == _blocks(os.path.join(embedded_dir, 'valid.txt'))
  (tmp_path / 'x.txt').write_text('x1.\n\nx2.\n')
  (tmp_path / 'y.txt').write_text('y1.\n')
  source = f'{tmp_path / "x.txt"},{tmp_path / "y.txt"}'
  assert list(corpus.documents_from_source(source)) == [['x1.'], ['x2.'], ['y1.']]
  assert corpus.parse_tfds_source('tfds:wikipedia/20230601.en:train[:1%]') == ('wikipedia/20230601.en', 'train[:1%]')
  assert corpus.parse_tfds_source('tfds:lm1b') == ('lm1b', 'train')
  with pytest.raises(ValueError, match='tfds:NAME'):
    corpus.parse_tfds_source('tfds:')


# ---------------------------------------------------------------------------------------------------------------------
# TFDS adapter (a stand-in `tensorflow_datasets` module: TensorFlow is not needed to test the adapter's logic)
# ---------------------------------------------------------------------------------------------------------------------

def test_tfds_missing_gives_install_hint(monkeypatch):
  monkeypatch.setitem(sys.modules, 'tensorflow_datasets', None)  # Makes `import tensorflow_datasets` fail.
  with pytest.raises(ImportError, match=r"pip install '\.\[tfds\]'"):
    corpus.tfds_documents('wikipedia/20230601.en', 'train')  # Fails on the call, before any iteration.


def test_tfds_documents_with_stand_in_module(monkeypatch):
  examples = [
      {'text': np.array('Title line\nFirst sentence. Second sentence.\n\nThird one.'.encode('utf-8')), 'id': b'1'},
      {'text': b'\xff\xfe not utf-8', 'id': b'2'},
      {'text': b'  \n \x00 \n', 'id': b'3'},
      {'text': 'Already a str. Yes.', 'id': b'4'},
  ]
  calls = []

  def load(name, split, data_dir=None, shuffle_files=False):
    calls.append((name, split, data_dir, shuffle_files))
    return examples

  fake = types.ModuleType('tensorflow_datasets')
  fake.load = load
  fake.as_numpy = lambda dataset: iter(dataset)
  monkeypatch.setitem(sys.modules, 'tensorflow_datasets', fake)
  stats = corpus.ReadStats()
  documents = list(corpus.documents_from_source('tfds:wiki/en:train[:10]', stats=stats, data_dir='/data'))
  assert documents == [['Title line', 'First sentence.', 'Second sentence.', 'Third one.'],
                       ['Already a str.', 'Yes.']]
  assert calls == [('wiki/en', 'train[:10]', '/data', False)]
  assert stats == corpus.ReadStats(documents=2, lines=6, bad_lines=1, empty_documents=1, files=1)
  with pytest.raises(KeyError, match='no feature'):
    list(corpus.tfds_documents('wiki/en', 'train', text_key='body'))


def test_decode_text_helpers():
  assert corpus.decode_text(b'caf\xc3\xa9') == 'café'
  assert corpus.decode_text(np.bytes_(b'abc')) == 'abc'
  assert corpus.decode_text(np.array(b'xyz')) == 'xyz'
  assert corpus.decode_text('str') == 'str'
  assert corpus.decode_text(b'\xff') is None
  assert corpus.decode_line(b'  hi \r\n') == 'hi'
  assert corpus.decode_line(b'\x00\t\x07') is None
  assert corpus.decode_line(b'\xe2\x80') is None
  assert corpus.decode_line(b' \n') == ''
