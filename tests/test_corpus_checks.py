"""Bad corpora are refused before anything is prepared from them, naming the file; per-file counts are printed;
overlong lines are split into sentences, never truncated."""
import os
import random
import shutil
import time

import numpy as np
import pytest

from bert_jax import pretrain_data as pd
from common.config import ConfigError, UserError
from common.data import corpus, sentences, shards

WORDS = ('alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau upsilon '
         'phi chi psi omega river stone cloud light paper music garden window').split()


def _sentence(rng, low=4, high=12):
  return ' '.join(rng.choice(WORDS) for _ in range(rng.randint(low, high))).capitalize() + '.'


def _good_text(num_documents, seed):
  rng = random.Random(seed)
  return '\n'.join('\n'.join(_sentence(rng) for _ in range(rng.randint(2, 8))) + '\n'
                   for _ in range(num_documents)).encode()


def _elf_copy(path):
  if not os.path.isfile('/bin/ls'):
    pytest.skip('no /bin/ls to copy')
  shutil.copyfile('/bin/ls', path)


BAD_CORPORA = {
    'empty': lambda path: path.write_bytes(b''),
    'blank_only': lambda path: path.write_bytes(b'\n   \n\t\n\r\n\n'),
    'random_bytes': lambda path: path.write_bytes(np.random.default_rng(0).bytes(200_000)),
    'elf_binary': _elf_copy,
}


def _config(train, valid, **overrides):
  return pd.data_config(corpus=str(train), eval_corpus=str(valid), vocab_size=200, max_seq_length=32,
                        max_predictions_per_seq=5, num_shards=2, num_workers=1, **overrides)


@pytest.mark.parametrize('kind', sorted(BAD_CORPORA))
@pytest.mark.parametrize('split', ['train', 'eval'])
def test_bad_corpus_refused_naming_the_file_before_any_shard(tmp_path, kind, split):
  good = tmp_path / 'good.txt'
  good.write_bytes(_good_text(60, seed=1))
  bad = tmp_path / f'{kind}.txt'
  BAD_CORPORA[kind](bad)
  train, valid = (bad, good) if split == 'train' else (good, bad)
  work = tmp_path / 'work'
  start = time.perf_counter()
  with pytest.raises(UserError) as info:
    pd.prepare_pretraining_data(_config(train, valid), work)
  message = str(info.value)
  assert str(bad) in message and '\n' not in message, message
  assert time.perf_counter() - start < 20  # Read once, refused at once (the bug took ~100 s and named nothing).
  assert not (work / 'tokenizer' / 'vocab.txt').exists()  # No tokenizer trained ...
  assert not (work / 'train').exists() and not (work / 'eval').exists()  # ... and no shard written.


def test_undecodable_fraction_threshold_is_a_validated_config_field(tmp_path):
  rng = random.Random(0)
  lines = []
  for i in range(200):  # 10 % undecodable lines, spread over the documents.
    lines.append(b'\xff\xfe\x80 broken' if i % 10 == 0 else _sentence(rng).encode())
    if i % 5 == 4:
      lines.append(b'')
  noisy = tmp_path / 'noisy.txt'
  noisy.write_bytes(b'\n'.join(lines) + b'\n')
  good = tmp_path / 'good.txt'
  good.write_bytes(_good_text(40, seed=2))
  with pytest.raises(UserError, match=r'noisy\.txt: 20 of 200 lines \(10\.0%\) are not UTF-8'):
    pd.prepare_pretraining_data(_config(noisy, good), tmp_path / 'work')
  _, train_dir, _ = pd.prepare_pretraining_data(_config(noisy, good, max_undecodable_fraction=0.2),
                                                tmp_path / 'work')
  assert shards.read_metadata(train_dir)['info']['input']['reader']['bad_lines'] == 20
  for bad_value in (1.5, -0.1):
    with pytest.raises(ConfigError, match='config.data.max_undecodable_fraction'):
      pd.validate_data_config(_config(noisy, good, max_undecodable_fraction=bad_value))
  for bad_value in (10, -1):
    with pytest.raises(ConfigError, match='config.data.max_line_chars'):
      pd.validate_data_config(_config(noisy, good, max_line_chars=bad_value))


def test_per_file_counts_are_printed(tmp_path, capfd):
  train_a, train_b, valid = tmp_path / 'a.txt', tmp_path / 'b.txt', tmp_path / 'valid.txt'
  train_a.write_bytes(_good_text(50, seed=3) + b'\n\xff\xfe\n')
  train_b.write_bytes(_good_text(30, seed=4))
  valid.write_bytes(_good_text(20, seed=5))
  cfg = _config(f'{train_a},{train_b}', valid)
  pd.prepare_pretraining_data(cfg, tmp_path / 'work')
  err = capfd.readouterr().err
  lines = [line for line in err.splitlines() if line.startswith('corpus ')]
  assert [line.split(':')[0] for line in lines] == [f'corpus {train_a}', f'corpus {train_b}', f'corpus {valid}']
  assert f'corpus {train_a}: 50 documents' in lines[0] and '1 undecodable' in lines[0]
  assert f'corpus {train_b}: 30 documents' in lines[1] and '0 undecodable' in lines[1]
  pd.prepare_pretraining_data(cfg, tmp_path / 'work')  # Reused stages still report the (cached) counts.
  assert len([line for line in capfd.readouterr().err.splitlines() if line.startswith('corpus ')]) == 3


def test_split_long_line_keeps_every_word():
  rng = random.Random(7)
  text = ' '.join(_sentence(rng) for _ in range(3000))  # ~200 kB on one line.
  pieces = sentences.split_long_line(text, 1000)
  assert len(pieces) > 100 and all(0 < len(p) <= 1000 for p in pieces)
  assert ' '.join(pieces).split() == text.split()
  word = 'x' * 2500  # One "word" longer than the limit is cut, not dropped.
  assert sentences.split_long_line(word, 1000) == ['x' * 1000, 'x' * 1000, 'x' * 500]
  assert sentences.split_long_line('short line.', 1000) == ['short line.']


def test_overlong_line_is_split_not_dropped(tmp_path, capfd):
  rng = random.Random(8)
  long_line = ' '.join(_sentence(rng) for _ in range(20_000)).encode()  # ~1.4 MB, one line.
  train = tmp_path / 'one_line.txt'
  train.write_bytes(_good_text(20, seed=9) + b'\n' + long_line + b'\n')
  valid = tmp_path / 'valid.txt'
  valid.write_bytes(_good_text(20, seed=10))

  stats = corpus.ReadStats()
  documents = list(corpus.iter_documents(str(train), stats))
  assert stats.long_lines == 1 and stats.long_line_pieces == len(documents[-1]) > 1000
  assert ' '.join(documents[-1]).split() == long_line.decode().split()  # Every word kept.

  _, train_dir, _ = pd.prepare_pretraining_data(_config(train, valid), tmp_path / 'work')
  meta = shards.read_metadata(train_dir)
  assert meta['info']['input']['reader']['long_lines'] == 1
  # Instances of up to 32 tokens from all of it, not one truncated instance.
  assert meta['num_records'] > 1000
  report = [line for line in capfd.readouterr().err.splitlines() if line.startswith(f'corpus {train}')]
  assert len(report) == 1 and '1 long lines split into' in report[0]


def test_a_line_beyond_the_hard_limit_is_refused(tmp_path, monkeypatch):
  monkeypatch.setattr(corpus, 'MAX_LINE_BYTES', 1000)
  path = tmp_path / 'no_newlines.bin'
  path.write_bytes(b'a' * (3 << 20))
  with pytest.raises(UserError, match='no_newlines.bin: a line longer than'):
    list(corpus.iter_documents(str(path)))


def test_many_files_are_summarised():
  counts = {f'f{i}.txt': corpus.SourceCounts(lines=10, documents=2, sentences=10) for i in range(30)}
  counts['f7.txt'] = corpus.SourceCounts(lines=10, undecodable=1, documents=2, sentences=9)
  lines = corpus.format_counts(counts)
  assert lines[0].startswith('30 files: 60 documents, 299 sentences from 300 lines, 1 undecodable'), lines[0]
  assert len(lines) == 2 and lines[1].startswith('f7.txt: 2 documents')


def test_xlnet_preparation_refuses_a_binary_corpus_too(tmp_path):
  from xlnet_jax import pretrain_data as xpd
  good = tmp_path / 'good.txt'
  good.write_bytes(_good_text(40, seed=11))
  bad = tmp_path / 'binary.bin'
  BAD_CORPORA['random_bytes'](bad)
  cfg = xpd.data_config(corpus=str(bad), eval_corpus=str(good), vocab_size=120, seq_len=32, reuse_len=16,
                        num_predict=5, num_shards=2, num_workers=1)
  with pytest.raises(UserError, match='binary.bin: .* are not UTF-8 text'):
    xpd.prepare_pretraining_data(cfg, tmp_path / 'work')
  assert not (tmp_path / 'work' / 'tokenizer' / 'spiece.model').exists() and not (tmp_path / 'work' / 'train').exists()
