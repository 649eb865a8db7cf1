"""HF datasets saved on disk as pretraining corpora (`hf:PATH[:SPLIT][#COLUMN]`) and as GLUE tasks, offline.

Every dataset is built here with `datasets.Dataset.from_dict` and written with `save_to_disk` (or pyarrow for
parquet / arrow files), next to the text or TSV files holding the same content; the reader of each must give what
the existing file reader gives. Network connections are refused for the whole module and `HF_DATASETS_OFFLINE=1`.
"""
from __future__ import annotations

import os
import random
import socket

import numpy as np
import pytest

datasets = pytest.importorskip('datasets')
datasets.disable_progress_bars()

from bert_jax import pretrain_data as bert_data  # noqa: E402
from common import finetune  # noqa: E402
from common.config import UserError  # noqa: E402
from common import tasks  # noqa: E402
from common.data import corpus, hf_datasets, shards  # noqa: E402

WORDS = ('alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau upsilon '
         'phi chi psi omega river stone cloud light paper music garden window').split()


@pytest.fixture(autouse=True)
def offline(monkeypatch):
  """No test here may reach the network: HF datasets offline, and any socket connection fails."""
  monkeypatch.setenv('HF_DATASETS_OFFLINE', '1')
  monkeypatch.setenv('HF_HUB_OFFLINE', '1')

  def refuse(self, address, *args, **kwargs):
    raise AssertionError(f'network access attempted: {address}')

  monkeypatch.setattr(socket.socket, 'connect', refuse)
  monkeypatch.setattr(socket.socket, 'connect_ex', refuse)


def _sentence(rng, low=4, high=12):
  return ' '.join(rng.choice(WORDS) for _ in range(rng.randint(low, high))).capitalize() + '.'


def _rows(count, seed):
  """Texts of `count` documents, one sentence a line, no blank line inside a document."""
  rng = random.Random(seed)
  return ['\n'.join(_sentence(rng) for _ in range(rng.randint(2, 8))) for _ in range(count)]


def _text_file(path, rows):
  """The same documents in the text corpus format: each row's lines, then a blank line."""
  path.write_bytes(b''.join((row if isinstance(row, bytes) else row.encode()) + b'\n\n' for row in rows))
  return str(path)


def _save(path, splits, column='text', **other_columns):
  """A DatasetDict {split: rows} (or a single Dataset when `splits` is a list) saved with `save_to_disk`."""
  def make(rows):
    return datasets.Dataset.from_dict({column: rows, **{k: v[:len(rows)] for k, v in other_columns.items()}})
  data = make(splits) if isinstance(splits, list) else datasets.DatasetDict({k: make(v) for k, v in splits.items()})
  data.save_to_disk(str(path))
  return str(path)


def _read(source, max_line_chars=corpus.DEFAULT_MAX_LINE_CHARS):
  stats = corpus.ReadStats()
  documents = list(corpus.iter_documents(source, stats, max_line_chars=max_line_chars))
  return documents, stats


# ----------------------------------------------------------------------------------------------------------------------
# Corpora.
# ----------------------------------------------------------------------------------------------------------------------

def test_source_syntax():
  s = hf_datasets.parse_source('hf:/data/wiki')
  assert (s.path, s.split, s.column) == ('/data/wiki', None, 'text')
  s = hf_datasets.parse_source('hf:/data/wiki:validation#content')
  assert (s.path, s.split, s.column) == ('/data/wiki', 'validation', 'content')
  s = hf_datasets.parse_source('hf:/data/part-*.parquet#body')
  assert (s.path, s.split, s.column, s.is_files) == ('/data/part-*.parquet', None, 'body', True)
  with pytest.raises(UserError, match='empty column'):
    hf_datasets.parse_source('hf:/data/wiki#')
  with pytest.raises(UserError, match='local paths'):
    hf_datasets.parse_source('hf:gs://bucket/wiki')


def test_rows_read_as_the_equivalent_text_file(tmp_path):
  """Each row is a document whose lines are its sentences: documents and per-source counts equal those of a text
  file with the same lines (control-only lines counted as undecodable, long lines split), from a saved
  DatasetDict, a saved single Dataset, a parquet file and an arrow file; a binary column decodes line by line as a
  file does (an invalid UTF-8 line counted and skipped)."""
  rng = random.Random(5)
  rows = _rows(40, seed=1)
  rows[3] += '\n' + ' '.join(_sentence(rng) for _ in range(40))  # One line of ~2.5 kB: split at max_line_chars.
  rows[7] += '\n\x01\x02\x03'  # Control characters only: an undecodable line.
  rows[9] = '  ' + rows[9].replace('\n', '  \n  ') + '  '  # Surrounding whitespace is stripped, as in a file.
  text_docs, text_stats = _read(_text_file(tmp_path / 'corpus.txt', rows), max_line_chars=500)
  assert text_stats.long_lines == 1 and text_stats.bad_lines == 1
  want_counts = text_stats.sources[str(tmp_path / 'corpus.txt')]

  import pyarrow as pa  # pylint: disable=import-outside-toplevel
  import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
  pq.write_table(pa.table({'id': list(range(len(rows))), 'body': rows}), str(tmp_path / 'corpus.parquet'))
  with pa.OSFile(str(tmp_path / 'corpus.arrow'), 'wb') as sink:
    table = pa.table({'text': rows})
    with pa.ipc.new_stream(sink, table.schema) as writer:
      writer.write_table(table)
  sources = [
      'hf:' + _save(tmp_path / 'dict', {'train': rows, 'test': rows[:2]}),
      'hf:' + _save(tmp_path / 'dict_split', {'train': rows[:2], 'wiki': rows}) + ':wiki',
      'hf:' + _save(tmp_path / 'single', rows, column='content') + '#content',
      f'hf:{tmp_path}/corpus.parquet#body',
      f'hf:{tmp_path}/*.arrow',
  ]
  for source in sources:
    documents, stats = _read(source, max_line_chars=500)
    assert documents == text_docs, source
    assert stats.sources[source] == want_counts, source
    assert (stats.documents, stats.lines, stats.bad_lines, stats.long_lines, stats.long_line_pieces) == (
        text_stats.documents, text_stats.lines, text_stats.bad_lines, text_stats.long_lines,
        text_stats.long_line_pieces), source

  raw = [row.encode() for row in rows[:10]]
  raw[2] += b'\n\xff\xfe broken line'
  text_docs, text_stats = _read(_text_file(tmp_path / 'raw.txt', raw))
  documents, stats = _read('hf:' + _save(tmp_path / 'binary', {'train': raw}))
  assert documents == text_docs and stats.bad_lines == text_stats.bad_lines == 2  # rows[7] and raw[2].
  assert stats.sources['hf:' + str(tmp_path / 'binary')] == text_stats.sources[str(tmp_path / 'raw.txt')]


def test_file_sources_globs_and_formats(tmp_path):
  """A glob of parquet files is one source read in sorted file order; arrow files in the IPC file format (not only
  the stream format datasets writes) are read; a directory of such files that save_to_disk did not write is refused
  with the glob to use; a column missing from one of the files is refused before any row is read."""
  import pyarrow as pa  # pylint: disable=import-outside-toplevel
  import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
  rows = _rows(30, seed=12)
  (tmp_path / 'parts').mkdir()
  for k, start in enumerate(range(0, 30, 10)):
    pq.write_table(pa.table({'text': rows[start:start + 10]}), str(tmp_path / 'parts' / f'part-{k:02d}.parquet'))
  with pa.OSFile(str(tmp_path / 'file_format.arrow'), 'wb') as sink:
    table = pa.table({'text': rows})
    with pa.ipc.new_file(sink, table.schema) as writer:
      writer.write_table(table, max_chunksize=7)
  want, _ = _read(_text_file(tmp_path / 'rows.txt', rows))
  assert _read(f'hf:{tmp_path}/parts/part-*.parquet')[0] == want
  assert _read(f'hf:{tmp_path}/file_format.arrow')[0] == want
  with pytest.raises(UserError, match=r'not a directory written by .*save_to_disk; .*\*\.parquet'):
    _read(f'hf:{tmp_path}/parts')
  pq.write_table(pa.table({'body': ['x']}), str(tmp_path / 'parts' / 'part-99.parquet'))
  with pytest.raises(UserError, match=r"part-99\.parquet\): no column 'text'; columns: body"):
    hf_datasets.iter_texts(f'hf:{tmp_path}/parts/part-*.parquet')  # Refused on the call, before iteration.
  with pytest.raises(FileNotFoundError, match='no file matches'):
    corpus.iter_documents(f'hf:{tmp_path}/none-*.parquet')


def test_a_row_is_one_document(tmp_path):
  """Blank lines inside a row separate nothing; an empty or missing text is counted as an empty document."""
  source = 'hf:' + _save(tmp_path / 'ds', {'train': ['One sentence.\n\nAnother one.', '', None, ' \n \n',
                                                     'Last row here.']})
  documents, stats = _read(source)
  assert documents == [['One sentence.', 'Another one.'], ['Last row here.']]
  assert stats.sources[source].empty_documents == 3 and stats.empty_documents == 3
  assert stats.sources[source].documents == 2 and stats.sources[source].sentences == 3


def _config(train, valid, **overrides):
  return bert_data.data_config(corpus=str(train), eval_corpus=str(valid), vocab_size=200, max_seq_length=32,
                               max_predictions_per_seq=5, num_shards=2, num_workers=1, **overrides)


def _records(directory):
  reader = shards.ShardReader(directory)
  return [reader[k] for k in range(len(reader))]


def test_pretraining_from_hf_equals_text_files(tmp_path, capfd):
  """Data preparation from `hf:` sources (train and eval splits of one DatasetDict) trains the same vocabulary and
  writes the same train and eval records, in the same order, as from text files with the same documents and seed;
  the per-source counts are reported under the source's name."""
  train_rows, valid_rows = _rows(120, seed=2), _rows(20, seed=3)
  text_cfg = _config(_text_file(tmp_path / 'train.txt', train_rows), _text_file(tmp_path / 'valid.txt', valid_rows))
  path = _save(tmp_path / 'ds', {'train': train_rows, 'validation': valid_rows})
  hf_cfg = _config(f'hf:{path}', f'hf:{path}:validation')

  text_tok, text_train, text_eval = bert_data.prepare_pretraining_data(text_cfg, tmp_path / 'work_text')
  hf_tok, hf_train, hf_eval = bert_data.prepare_pretraining_data(hf_cfg, tmp_path / 'work_hf')
  assert (tmp_path / 'work_text' / 'tokenizer' / 'vocab.txt').read_text() == \
         (tmp_path / 'work_hf' / 'tokenizer' / 'vocab.txt').read_text()
  assert hf_tok.vocab_size == text_tok.vocab_size
  for text_dir, hf_dir in ((text_train, hf_train), (text_eval, hf_eval)):
    want, got = _records(text_dir), _records(hf_dir)
    assert len(got) == len(want) > 10
    for a, b in zip(want, got):
      assert a.keys() == b.keys()
      for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    assert shards.read_metadata(hf_dir)['info']['input']['reader']['documents'] == \
        shards.read_metadata(text_dir)['info']['input']['reader']['documents']
  report = [line for line in capfd.readouterr().err.splitlines() if line.startswith('corpus hf:')]
  assert report[0].startswith(f'corpus hf:{path}: 120 documents')
  assert report[1].startswith(f'corpus hf:{path}:validation: 20 documents')

  # Unchanged: every stage is reused. A changed dataset is read again (its files are part of the fingerprint).
  again = bert_data.prepare_pretraining_data(hf_cfg, tmp_path / 'work_hf')
  assert len(_records(again[1])) == len(_records(hf_train))
  _save(tmp_path / 'ds_new', {'train': train_rows[:60], 'validation': valid_rows})
  os.rename(path, tmp_path / 'ds_old')
  os.rename(tmp_path / 'ds_new', path)
  _, changed_train, _ = bert_data.prepare_pretraining_data(hf_cfg, tmp_path / 'work_hf')
  assert shards.read_metadata(changed_train)['info']['input']['reader']['documents'] == 60


def test_xlnet_pretraining_from_hf_equals_text_files(tmp_path):
  """The same for XLNet: the sentencepiece model trained on an `hf:` parquet source and the shards written from it
  equal those made from the text files."""
  from xlnet_jax import pretrain_data as xlnet_data  # pylint: disable=import-outside-toplevel
  import pyarrow as pa  # pylint: disable=import-outside-toplevel
  import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
  train_rows, valid_rows = _rows(80, seed=6), _rows(15, seed=7)
  pq.write_table(pa.table({'text': train_rows}), str(tmp_path / 'train.parquet'))
  pq.write_table(pa.table({'text': valid_rows}), str(tmp_path / 'valid.parquet'))

  def config(train, valid):
    return xlnet_data.data_config(corpus=train, eval_corpus=valid, vocab_size=120, seq_len=32, reuse_len=16,
                                  num_predict=5, num_shards=2, num_workers=1)

  text = xlnet_data.prepare_pretraining_data(
      config(_text_file(tmp_path / 'train.txt', train_rows), _text_file(tmp_path / 'valid.txt', valid_rows)),
      tmp_path / 'work_text')
  hf = xlnet_data.prepare_pretraining_data(config(f'hf:{tmp_path}/train.parquet', f'hf:{tmp_path}/valid.parquet'),
                                           tmp_path / 'work_hf')
  assert (tmp_path / 'work_text' / 'tokenizer' / 'spiece.vocab').read_text() == \
         (tmp_path / 'work_hf' / 'tokenizer' / 'spiece.vocab').read_text()
  for text_dir, hf_dir in zip(text[1:], hf[1:]):
    want, got = _records(text_dir), _records(hf_dir)
    assert len(got) == len(want) > 0
    for a, b in zip(want, got):
      for key in a:
        np.testing.assert_array_equal(a[key], b[key])


def test_entry_point_refuses_a_missing_column_in_one_line(tmp_path):
  """`python -m bert_jax.pretrain` with a missing column: one `error:` line naming the columns, exit status 2."""
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  path = _save(tmp_path / 'ds', {'train': _rows(20, seed=8), 'validation': _rows(5, seed=9)}, column='content')
  env = dict(os.environ, HF_DATASETS_OFFLINE='1', JAX_PLATFORMS='cpu')
  proc = subprocess.run(
      [sys.executable, '-m', 'bert_jax.pretrain', '--config', 'bert_jax/configs/tiny.py', '--workdir',
       str(tmp_path / 'work'), f'--config.data.corpus=hf:{path}', f'--config.data.eval_corpus=hf:{path}:validation'],
      cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), env=env, capture_output=True, text=True,
      timeout=300, check=False)
  assert proc.returncode == 2, proc.stderr[-2000:]
  errors = [line for line in proc.stderr.splitlines() if line.startswith('error:')]
  assert errors == [f"error: hf:{path}: no column 'text'; columns: content (name the text column with #COLUMN)"]
  assert 'Traceback' not in proc.stderr


@pytest.mark.parametrize('which', ['corpus', 'eval_corpus'])
def test_missing_column_split_or_text_refused_in_one_line(tmp_path, which):
  """A missing column or split, a column that is not text, an empty dataset and a missing path are refused with
  one line naming the source and what exists, before a tokenizer or a shard is made."""
  good = 'hf:' + _save(tmp_path / 'good', {'train': _rows(60, seed=4), 'validation': _rows(10, seed=5)},
                       label=list(range(60)))
  empty = 'hf:' + _save(tmp_path / 'empty', {'train': ['', ' ', None]})
  cases = {
      f'{good}#body': ["no column 'body'", 'columns: text, label'],
      f'{good}:valid': ["no split 'valid'", 'splits: train, validation'],
      f'{good}#label': ["column 'label' holds int64, not text"],
      f'{good}/train:train': ['single Dataset', 'drop ":train"'],
      empty: [f'{empty} has no text'],
  }
  for source, expected in cases.items():
    sources = {'corpus': good, 'eval_corpus': f'{good}:validation', which: source}
    work = tmp_path / 'work'
    with pytest.raises(UserError) as info:
      bert_data.prepare_pretraining_data(_config(sources['corpus'], sources['eval_corpus']), work)
    message = str(info.value)
    assert '\n' not in message and source.split('#')[0].split(':valid')[0] in message, message
    for part in expected:
      assert part in message, (part, message)
    assert not (work / 'tokenizer' / 'vocab.txt').exists()
    assert not (work / 'train').exists() and not (work / 'eval').exists()
  with pytest.raises(FileNotFoundError, match='no such directory') as info:
    bert_data.prepare_pretraining_data(_config(f'hf:{tmp_path}/missing', f'{good}:validation'), tmp_path / 'w2')
  assert '\n' not in str(info.value)


# ----------------------------------------------------------------------------------------------------------------------
# GLUE tasks.
# ----------------------------------------------------------------------------------------------------------------------

# (task, TSV directory, Hub glue columns, Hub class names, TSV label strings by Hub label value)
PAIR_ROWS = [('A man is playing a guitar.', 'A person plays an instrument.'),
             ('The cat sat on the mat.', 'A dog ran in the park.'),
             ('Stocks fell sharply on Monday.', 'Markets dropped at the start of the week.'),
             ('She bought three apples.', 'She purchased some fruit.'),
             ('The meeting was cancelled.', 'The meeting took place as planned.')]


def _write_tsv(path, header, rows):
  path.parent.mkdir(parents=True, exist_ok=True)
  lines = ([header] if header is not None else []) + ['\t'.join(map(str, row)) for row in rows]
  path.write_text('\n'.join(lines) + '\n')


def _glue_files(tmp_path):
  """The same GLUE rows as TSV files (the official layouts) and as DatasetDicts with the Hub glue columns."""
  from datasets import ClassLabel, Features, Value  # pylint: disable=import-outside-toplevel
  glue, hub = tmp_path / 'glue', tmp_path / 'hub'
  n = len(PAIR_ROWS)
  a, b = [r[0] for r in PAIR_ROWS], [r[1] for r in PAIR_ROWS]
  split_rows = {'train': range(n), 'validation': range(n - 2, n), 'test': range(2)}

  def save(name, columns, features, label_of):
    dd = {}
    for split, index in split_rows.items():
      data = {k: [v[i] for i in index] for k, v in columns.items()}
      data['label'] = [-1 if split == 'test' else label_of(i) for i in index]
      data['idx'] = list(range(len(index)))
      dd[split] = datasets.Dataset.from_dict(data, features=Features({**features, 'idx': Value('int32')}))
    datasets.DatasetDict(dd).save_to_disk(str(hub / name))

  rte = [0, 1, 0, 0, 1]  # Hub names: entailment, not_entailment (ours too).
  save('rte', {'sentence1': a, 'sentence2': b},
       {'sentence1': Value('string'), 'sentence2': Value('string'),
        'label': ClassLabel(names=['entailment', 'not_entailment'])}, lambda i: rte[i])
  names = ('entailment', 'not_entailment')
  for split, tsv in (('train', 'train'), ('validation', 'dev')):
    _write_tsv(glue / 'RTE' / f'{tsv}.tsv', 'index\tsentence1\tsentence2\tlabel',
               [(k, a[i], b[i], names[rte[i]]) for k, i in enumerate(split_rows[split])])
  _write_tsv(glue / 'RTE' / 'test.tsv', 'index\tsentence1\tsentence2',
             [(k, a[i], b[i]) for k, i in enumerate(split_rows['test'])])

  mrpc = [1, 0, 1, 1, 0]  # Hub names: not_equivalent, equivalent; the TSV has 0 / 1.
  save('mrpc', {'sentence1': a, 'sentence2': b},
       {'sentence1': Value('string'), 'sentence2': Value('string'),
        'label': ClassLabel(names=['not_equivalent', 'equivalent'])}, lambda i: mrpc[i])
  for split, tsv in (('train', 'train'), ('validation', 'dev')):
    _write_tsv(glue / 'MRPC' / f'{tsv}.tsv', 'Quality\t#1 ID\t#2 ID\t#1 String\t#2 String',
               [(mrpc[i], 100 + i, 200 + i, a[i], b[i]) for i in split_rows[split]])

  mnli = [2, 0, 1, 0, 2]  # Hub order: entailment, neutral, contradiction; ours: contradiction, entailment, neutral.
  hub_names = ('entailment', 'neutral', 'contradiction')
  split_rows = {'train': range(n), 'validation_matched': range(n - 2, n), 'validation_mismatched': range(1, 3)}
  save('mnli', {'premise': a, 'hypothesis': b},
       {'premise': Value('string'), 'hypothesis': Value('string'), 'label': ClassLabel(names=list(hub_names))},
       lambda i: mnli[i])
  header = '\t'.join(['index'] + [f'c{k}' for k in range(1, 8)] + ['sentence1', 'sentence2', 'gold_label'])
  for split, tsv in (('train', 'train'), ('validation_matched', 'dev_matched'),
                     ('validation_mismatched', 'dev_mismatched')):
    _write_tsv(glue / 'MNLI' / f'{tsv}.tsv', header,
               [(k, *['x'] * 7, a[i], b[i], hub_names[mnli[i]]) for k, i in enumerate(split_rows[split])])

  scores = [4.5, 0.25, 3.75, 2.0, 0.5]  # Exact in float32 (the Hub's label type for STS-B).
  split_rows = {'train': range(n), 'validation': range(n - 2, n), 'test': range(2)}
  save('stsb', {'sentence1': a, 'sentence2': b},
       {'sentence1': Value('string'), 'sentence2': Value('string'), 'label': Value('float32')}, lambda i: scores[i])
  header = 'index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2'
  for split, tsv in (('train', 'train'), ('validation', 'dev')):
    _write_tsv(glue / 'STS-B' / f'{tsv}.tsv', header + '\tscore',
               [(k, 'g', 'f', 'y', k, 's', 's', a[i], b[i], scores[i]) for k, i in enumerate(split_rows[split])])
  _write_tsv(glue / 'STS-B' / 'test.tsv', header,
             [(k, 'g', 'f', 'y', k, 's', 's', a[i], b[i]) for k, i in enumerate(split_rows['test'])])

  sst2 = [1, 0, 1, 0, 1]
  save('sst2', {'sentence': a}, {'sentence': Value('string'), 'label': ClassLabel(names=['negative', 'positive'])},
       lambda i: sst2[i])
  for split, tsv in (('train', 'train'), ('validation', 'dev')):
    _write_tsv(glue / 'SST-2' / f'{tsv}.tsv', 'sentence\tlabel', [(a[i], sst2[i]) for i in split_rows[split]])
  return glue, hub


# task, split, whether the TSV layout carries the row id (else the TSV guid is the line number, the Hub's the idx).
GLUE_CASES = [('rte', 'train', True), ('rte', 'dev', True), ('rte', 'test', True),
              ('mrpc', 'train', False), ('mrpc', 'dev', False),
              ('mnli', 'train', True), ('mnli', 'dev', True), ('mnli_mismatched', 'dev', True),
              ('mnli', 'dev_mismatched', True),
              ('stsb', 'train', True), ('stsb', 'dev', True), ('stsb', 'test', True),
              ('sst2', 'train', False), ('sst2', 'dev', False)]


def test_glue_from_saved_datasetdict_equals_tsv(tmp_path):
  """Single-sentence, pair and regression GLUE tasks read from a DatasetDict with the Hub glue columns give the
  examples the TSV reader gives for the same rows: texts, labels (MNLI's class names mapped by name, MRPC's and
  SST-2's indices kept, STS-B scores, test rows unlabelled) and, where the TSV holds the row id, the guids; through
  `finetune.load_examples` with `--data_dir hf:PATH` as well."""
  glue, hub = _glue_files(tmp_path)
  for task, split, same_guid in GLUE_CASES:
    base = 'mnli' if task.startswith('mnli') else task
    directory = {'rte': 'RTE', 'mrpc': 'MRPC', 'mnli': 'MNLI', 'stsb': 'STS-B', 'sst2': 'SST-2'}[base]
    want = tasks.read_task(task, str(glue / directory), split)
    stats = tasks.TaskReadStats()
    got = hf_datasets.read_task(task, f'hf:{hub / base}', split, stats)
    assert stats.bad_rows == 0 and stats.examples == len(got) == len(want) > 0, (task, split)
    for w, g in zip(want, got):
      assert (g.text_a, g.text_b, g.label) == (w.text_a, w.text_b, w.label), (task, split)
      assert type(g.label) is type(w.label)  # noqa: E721 - int for classes, float for scores, None for test rows.
      if same_guid:
        assert g.guid == w.guid, (task, split)
  config = finetune.finetune_config()
  assert finetune.load_examples('glue/rte', 'train', f'hf:{hub / "rte"}', config) == \
         finetune.load_examples('glue/rte', 'train', str(glue / 'RTE'), config)


def test_glue_from_hf_refusals(tmp_path):
  """A missing split or column is one line naming what exists; a bad label is counted and skipped as the TSV and
  TFDS readers do; a single Dataset and tasks other than GLUE are refused."""
  train_only = _save(tmp_path / 'train_only', {'train': ['a', 'b']}, column='sentence1', sentence2=['c', 'd'],
                     label=[0, 7], idx=[0, 1])
  stats = tasks.TaskReadStats()
  examples = hf_datasets.read_task('rte', f'hf:{train_only}', 'train', stats)
  assert [(e.text_a, e.text_b, e.label) for e in examples] == [('a', 'c', 0)]
  assert stats.bad_rows == 1 and 'label 7' in stats.warnings[0]
  cases = [
      (('rte', f'hf:{train_only}', 'dev'), ["no split 'validation'", 'splits: train']),
      (('mrpc', f'hf:{train_only}', 'train'), []),  # Same columns as RTE: read.
      (('sst2', f'hf:{train_only}', 'train'), ["no column 'sentence'", 'columns: sentence1, sentence2, label, idx']),
      (('qqp', f'hf:{train_only}', 'train'), ["no column 'question1'"]),
      (('rte', f'hf:{train_only}/train', 'train'), ['single Dataset']),
      (('squad_v1.1', f'hf:{train_only}', 'train'), ['GLUE tasks']),
      (('rte', f'hf:{tmp_path}/nothing', 'train'), ['no such directory']),
  ]
  for args, expected in cases:
    if not expected:
      assert len(hf_datasets.read_task(*args)) == 1
      continue
    with pytest.raises((UserError, FileNotFoundError)) as info:
      hf_datasets.read_task(*args)
    message = str(info.value)
    assert '\n' not in message and all(part in message for part in expected), (args, message)


def test_glue_labels_written_as_strings(tmp_path):
  """A DatasetDict whose labels are the TSV files' strings: class names mapped to our indices, scores parsed,
  an unknown name counted as a bad row and skipped, '-1' an unlabelled row."""
  rte = _save(tmp_path / 'rte', {'train': ['a', 'b', 'c', 'd']}, column='sentence1', sentence2=['w', 'x', 'y', 'z'],
              label=['not_entailment', 'entailment', 'maybe', '-1'])
  stats = tasks.TaskReadStats()
  examples = hf_datasets.read_task('rte', f'hf:{rte}', 'train', stats)
  assert [(e.text_a, e.label) for e in examples] == [('a', 1), ('b', 0), ('d', None)]
  assert stats.bad_rows == 1 and "unknown label 'maybe'" in stats.warnings[0]
  stsb = _save(tmp_path / 'stsb', {'train': ['a', 'b']}, column='sentence1', sentence2=['x', 'y'],
               label=['3.800', '0.5'])
  assert [e.label for e in hf_datasets.read_task('stsb', f'hf:{stsb}', 'train')] == [3.8, 0.5]


def test_datasets_is_imported_only_for_hf_sources():
  """`datasets` stays an optional extra: the corpus modules import without importing it (the fine-tuning hook
  imports `hf_datasets` only for an `hf:` data_dir)."""
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  code = ('import sys; import common.data.corpus, common.data.prepare, common.data.hf_datasets; '
          'assert "datasets" not in sys.modules, sorted(sys.modules)')
  proc = subprocess.run([sys.executable, '-c', code], cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        capture_output=True, text=True, timeout=300, check=False,
                        env=dict(os.environ, JAX_PLATFORMS='cpu'))
  assert proc.returncode == 0, proc.stderr[-2000:]
