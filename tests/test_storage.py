"""Remote paths (`gs://`) through `etils.epath`: data preparation, shards, tokenizers, metrics, TensorBoard and HF
export on `gs://`, and nothing written to a local `gs:` folder.

Each test runs twice: on a fake object store (`tests/fake_storage.py`: epath's `gs` backend swapped for a directory
with object-store limits), and, when `gcsfs` and `gcp-storage-emulator` are installed, on an emulated GCS server
reached the way a real bucket is (epath -> fsspec -> gcsfs over HTTP; orbax -> tensorstore's gcs driver).
Every test runs in an empty current directory: code that handed a `gs://` string to `open`/`os.makedirs` would leave
a `gs:` folder there, which the fixture refuses.
"""
import json
import os
import random
import socket
import struct

import jax
import numpy as np
import pytest
from etils.epath import backend as epath_backend
from etils.epath import gpath

from common import hf, metrics, storage
from common.data import corpus, shards
from fake_storage import fake_gcs, local_gs_folders

WORDS = ('alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau upsilon '
         'phi chi psi omega river stone cloud light paper music garden window').split()


@pytest.fixture(scope='session')
def gcs_emulator():
  """An in-memory GCS server (gcp-storage-emulator) with the bucket `bucket`, for the session."""
  pytest.importorskip('gcsfs', reason='gcsfs not installed')
  emulator = pytest.importorskip('gcp_storage_emulator.server', reason='gcp-storage-emulator not installed')
  with socket.socket() as sock:
    sock.bind(('localhost', 0))
    port = sock.getsockname()[1]
  server = emulator.create_server('localhost', port, in_memory=True, default_bucket='bucket')
  server.start()
  yield server, f'http://localhost:{port}'
  server.stop()


@pytest.fixture(params=['fake', 'emulator'])
def gcs(request, tmp_path, monkeypatch):
  """gs:// for one test (see the module docstring); cwd and the local cache in tmp_path; no local gs: folder after.

  Yields the `FakeObjectStore` (which records writes) or None on the emulator."""
  cwd = tmp_path / 'cwd'
  cwd.mkdir()
  monkeypatch.chdir(cwd)
  monkeypatch.setenv('XLNET_BERT_JAX_CACHE', str(tmp_path / 'cache'))
  if request.param == 'fake':
    with fake_gcs(str(tmp_path / 'bucket-root')) as store:
      yield store
  else:
    server, url = request.getfixturevalue('gcs_emulator')
    server.wipe(keep_buckets=True)
    for name, value in (('STORAGE_EMULATOR_HOST', url), ('TENSORSTORE_GCS_HTTP_URL', url),
                        ('GOOGLE_AUTH_TOKEN_FOR_TESTING', 'emulator')):
      monkeypatch.setenv(name, value)
    monkeypatch.setattr(gpath, '_is_tf_installed', lambda: False)  # epath -> fsspec (gcsfs), not TF's gfile.
    epath_backend.fsspec_backend._get_filesystem('gcs').invalidate_cache()  # pylint: disable=protected-access
    yield None
  assert not local_gs_folders(str(cwd)), local_gs_folders(str(cwd))
  assert not local_gs_folders(str(tmp_path / 'cache'))


def _text(num_documents, seed):
  rng = random.Random(seed)
  docs = []
  for _ in range(num_documents):
    sentences = [' '.join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))).capitalize() + '.'
                 for _ in range(rng.randint(2, 8))]
    docs.append('\n'.join(sentences) + '\n')
  return '\n'.join(docs)


def _write_corpus(prefix, num_files=2, documents=60, seed=0):
  for i in range(num_files):
    storage.write_text(f'{prefix}/part-{i}.txt', _text(documents, seed + i))


# ----------------------------------------------------------------------------------------------------------------
# The storage layer itself.
# ----------------------------------------------------------------------------------------------------------------

def test_paths_stay_urls(gcs):
  assert storage.join('gs://bucket/run', 'data', 'train') == 'gs://bucket/run/data/train'
  assert storage.is_remote('gs://bucket/x') and not storage.is_remote('runs/x') and not storage.is_remote('file:///x')
  assert storage.absolute('gs://bucket/x') == 'gs://bucket/x'
  storage.write_text('gs://bucket/dir/a.txt', 'A')
  storage.write_text('gs://bucket/dir/b.txt', 'B')
  storage.write_text('gs://bucket/dir/sub/c.txt', 'C')
  assert storage.glob('gs://bucket/dir/*.txt') == ['gs://bucket/dir/a.txt', 'gs://bucket/dir/b.txt']
  assert storage.isfile('gs://bucket/dir/a.txt') and storage.isdir('gs://bucket/dir') and not storage.isfile('gs://bucket/dir')
  assert storage.listdir('gs://bucket/dir') == ['a.txt', 'b.txt', 'sub']
  assert corpus.expand_paths(['gs://bucket/dir/b.txt', 'gs://bucket/dir/*.txt']) == ['gs://bucket/dir/b.txt', 'gs://bucket/dir/a.txt']
  with pytest.raises(FileNotFoundError, match='gs://bucket/nothing/'):
    corpus.expand_paths('gs://bucket/nothing/*.txt')
  with pytest.raises(ValueError, match='append'):
    storage.open_file('gs://bucket/dir/a.txt', 'a')


def test_append_file_continues_a_remote_file(gcs):
  with storage.AppendFile('gs://bucket/m.jsonl', upload_every=3600) as f:
    f.write(b'one\n')
    f.flush()  # Uploaded on the first flush (nothing uploaded yet), not again within the hour.
    assert storage.read_text('gs://bucket/m.jsonl') == 'one\n'
    f.write(b'two\n')
    f.flush()
    assert storage.read_text('gs://bucket/m.jsonl') == 'one\n'
  assert storage.read_text('gs://bucket/m.jsonl') == 'one\ntwo\n'  # close() uploads.
  with storage.AppendFile('gs://bucket/m.jsonl') as f:  # A resumed run appends.
    f.write(b'three\n')
  assert storage.read_text('gs://bucket/m.jsonl') == 'one\ntwo\nthree\n'


def test_staged_dir_uploads_only_on_success(gcs):
  with storage.staged_dir('gs://bucket/ok') as local:
    assert not storage.is_remote(local)
    os.makedirs(os.path.join(local, 'sub'))
    with open(os.path.join(local, 'sub', 'x'), 'w') as f:
      f.write('x')
  assert storage.read_text('gs://bucket/ok/sub/x') == 'x'
  with pytest.raises(RuntimeError):
    with storage.staged_dir('gs://bucket/failed') as local:
      with open(os.path.join(local, 'y'), 'w') as f:
        f.write('y')
      raise RuntimeError('boom')
  assert not storage.exists('gs://bucket/failed/y')


# ----------------------------------------------------------------------------------------------------------------
# Data preparation on gs://.
# ----------------------------------------------------------------------------------------------------------------

def test_bert_data_preparation_on_gs(gcs, tmp_path):
  from bert_jax import pretrain_data as pd
  _write_corpus('gs://bucket/text', num_files=2, documents=80, seed=0)
  _write_corpus('gs://bucket/valid', num_files=1, documents=30, seed=10)
  cfg = pd.data_config(corpus='gs://bucket/text/*.txt', eval_corpus='gs://bucket/valid/*.txt', vocab_size=200,
                       max_seq_length=32, max_predictions_per_seq=5, num_shards=2, num_workers=1)
  tok, train_dir, eval_dir = pd.prepare_pretraining_data(cfg, 'gs://bucket/run/data')
  assert (train_dir, eval_dir) == ('gs://bucket/run/data/train', 'gs://bucket/run/data/eval')
  assert storage.listdir(train_dir) == ['metadata.json', 'shard-00000-of-00002.array_record',
                                        'shard-00001-of-00002.array_record']
  assert storage.isfile('gs://bucket/run/data/tokenizer/vocab.txt')
  assert storage.isfile('gs://bucket/run/data/corpus/checked_sources.json')
  meta = shards.read_metadata(train_dir)
  assert meta['info']['input']['documents'] == 160
  assert meta['info']['input']['reader']['files'] == 2

  loader = pd.make_loader(train_dir, cfg, tok, 8, seed=0)  # Shards copied to the local cache, then read.
  batch = loader.host_batch(1)
  assert batch['input_ids'].shape == (8, 32) and np.all(batch['input_ids'][:, 0] == tok.cls_id)
  assert os.listdir(tmp_path / 'cache' / 'mirror')

  before = storage.stat_identity(storage.join(train_dir, 'metadata.json'))
  written = len(gcs.written) if gcs else None
  tok2, _, _ = pd.prepare_pretraining_data(cfg, 'gs://bucket/run/data')  # Everything reused: nothing written.
  assert tok2.vocab_size == tok.vocab_size
  assert storage.stat_identity(storage.join(train_dir, 'metadata.json')) == before
  if gcs:
    assert len(gcs.written) == written, gcs.written[written:]

  tok.save('gs://bucket/run')  # What the entry point does with the vocabulary.
  assert storage.read_text('gs://bucket/run/vocab.txt').split('\n')[:5] == ['[PAD]', '[UNK]', '[CLS]', '[SEP]',
                                                                         '[MASK]']
  from bert_jax import tokenizer as bert_tokenizer
  assert bert_tokenizer.load_tokenizer('gs://bucket/run').vocab_size == tok.vocab_size


def test_xlnet_data_preparation_on_gs(gcs, tmp_path):
  from xlnet_jax import pretrain_data as pd
  from xlnet_jax import tokenizer as xlnet_tokenizer
  _write_corpus('gs://bucket/text', num_files=1, documents=120, seed=3)
  _write_corpus('gs://bucket/valid', num_files=1, documents=40, seed=13)
  cfg = pd.data_config(corpus='gs://bucket/text/part-0.txt', eval_corpus='gs://bucket/valid/part-0.txt',
                       vocab_size=120, seq_len=32, reuse_len=16, num_predict=5, num_shards=2, num_workers=1)
  tok, train_dir, eval_dir = pd.prepare_pretraining_data(cfg, 'gs://bucket/xrun/data')
  assert storage.isfile('gs://bucket/xrun/data/tokenizer/spiece.model')
  assert shards.read_metadata(train_dir)['num_records'] > 0 and shards.read_metadata(eval_dir)['num_records'] > 0
  again = xlnet_tokenizer.load_tokenizer('gs://bucket/xrun/data/tokenizer')
  assert again.pieces == tok.pieces
  tok.save('gs://bucket/xrun')
  assert storage.read_bytes('gs://bucket/xrun/spiece.model') == storage.read_bytes(
      'gs://bucket/xrun/data/tokenizer/spiece.model')


# ----------------------------------------------------------------------------------------------------------------
# Metrics and TensorBoard on gs://.
# ----------------------------------------------------------------------------------------------------------------

def _event_records(data: bytes) -> list[bytes]:
  """The records of a TFRecord-framed event file (length, crc, payload, crc)."""
  records, offset = [], 0
  while offset < len(data):
    (length,) = struct.unpack('<Q', data[offset:offset + 8])
    records.append(data[offset + 12:offset + 12 + length])
    offset += 12 + length + 4
  return records


def test_metrics_and_tensorboard_on_gs(gcs):
  writer = metrics.MetricWriter('gs://bucket/run', enabled=True)
  for step in (1, 2, 3):
    writer.write(step, {'loss': 4.0 - step, 'learning_rate': 1e-3})
  writer.write(3, {'loss': 0.5}, prefix='eval/')
  writer.close()
  rows = metrics.read_jsonl('gs://bucket/run/metrics.jsonl')
  assert [r['step'] for r in rows] == [1, 2, 3, 3] and rows[-1] == {'step': 3, 'eval/loss': 0.5}
  events = storage.glob('gs://bucket/run/tensorboard/events.out.tfevents.*')
  assert len(events) == 1
  records = _event_records(storage.read_bytes(events[0]))
  assert len(records) >= 5  # The file-version record plus one per scalar written.
  assert any(b'eval/loss' in r for r in records) and any(b'learning_rate' in r for r in records)

  resumed = metrics.MetricWriter('gs://bucket/run', enabled=True)  # A restart appends to the same JSONL.
  resumed.write(4, {'loss': 0.1})
  resumed.close()
  assert [r['step'] for r in metrics.read_jsonl('gs://bucket/run/metrics.jsonl')] == [1, 2, 3, 3, 4]


# ----------------------------------------------------------------------------------------------------------------
# Hugging Face export and import on gs://.
# ----------------------------------------------------------------------------------------------------------------

def test_bert_hf_export_and_import_on_gs(gcs):
  from bert_jax import export
  cfg = export.config_from_hf(dict(vocab_size=120, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                   intermediate_size=64, max_position_embeddings=32, type_vocab_size=2))
  params = export.init_params(cfg, jax.random.PRNGKey(0))
  vocab = ['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]'] + [f'w{i}' for i in range(115)]
  storage.write_text('gs://bucket/run/vocab.txt', ''.join(t + '\n' for t in vocab))
  written = export.save_hf_dir('gs://bucket/hf', cfg, params, vocab_file='gs://bucket/run/vocab.txt')
  assert all(p.startswith('gs://bucket/hf/') for p in written), written
  assert {'model.safetensors', 'config.json', 'vocab.txt'} <= set(storage.listdir('gs://bucket/hf'))
  cfg_back, params_back = export.load_hf_dir('gs://bucket/hf')
  assert cfg_back == cfg
  flat, flat_back = hf.flatten(params), hf.flatten(params_back)
  assert set(flat) == set(flat_back)
  for key in flat:
    np.testing.assert_array_equal(np.asarray(flat[key]), flat_back[key])
  assert hf.read_vocab('gs://bucket/hf/vocab.txt') == vocab


def test_xlnet_hf_export_on_gs(gcs):
  from xlnet_jax import export
  cfg = export.config_from_hf(dict(vocab_size=64, d_model=32, n_layer=1, n_head=2, d_head=16, d_inner=64,
                                   mem_len=8))
  params = export.init_params(cfg, jax.random.PRNGKey(0))
  export.save_hf_dir('gs://bucket/xhf', cfg, params)
  assert json.loads(storage.read_text('gs://bucket/xhf/config.json'))['d_model'] == 32
  _, params_back = export.load_hf_dir('gs://bucket/xhf')
  for key, value in hf.flatten(params).items():
    np.testing.assert_array_equal(np.asarray(value), hf.flatten(params_back)[key])


# ----------------------------------------------------------------------------------------------------------------
# Whole runs.
# ----------------------------------------------------------------------------------------------------------------

def test_tiny_bert_run_with_data_and_export_on_gs(gcs, tmp_path):
  """What works today: corpus, prepared data and HF export on gs://, checkpoints and metrics in a local workdir."""
  from bert_jax import export, pretrain
  from drivers import tiny_configs
  _write_corpus('gs://bucket/text', num_files=2, documents=60, seed=0)
  _write_corpus('gs://bucket/valid', num_files=1, documents=30, seed=10)
  config = tiny_configs.bert_config()
  config.update(num_train_steps=3, log_every=1)
  config.mesh.update(num_devices=1)  # storage, not sharding
  config.data.update(corpus='gs://bucket/text/*.txt', eval_corpus='gs://bucket/valid/*.txt', vocab_size=200,
                     num_workers=1)
  config.data_dir = 'gs://bucket/prepared'
  workdir = str(tmp_path / 'run')
  _, history = pretrain.run(config, workdir)
  assert len(history) == 3 and all(np.isfinite(h['loss']) for h in history)
  assert storage.isfile('gs://bucket/prepared/train/metadata.json')
  written = export.export_workdir(workdir, 'gs://bucket/hf')
  assert 'gs://bucket/hf/model.safetensors' in written and storage.isfile('gs://bucket/hf/vocab.txt')
  assert export.load_hf_dir('gs://bucket/hf')[0].hidden_size == config.model.hidden_size


# ----------------------------------------------------------------------------------------------------------------
# A whole run on gs://: waits for the checkpoint code.
# ----------------------------------------------------------------------------------------------------------------

def test_tiny_bert_run_and_export_on_gs(gcs, tmp_path):
  """The README's TPU recipe: everything, checkpoints included, under a gs:// workdir."""
  if gcs is not None:
    pytest.skip('orbax writes arrays through tensorstore, past the epath fake: this runs on the GCS emulator '
                '(gcsfs + gcp-storage-emulator installed), which tensorstore reaches via TENSORSTORE_GCS_HTTP_URL')
  from bert_jax import export, pretrain
  from drivers import tiny_configs
  _write_corpus('gs://bucket/text', num_files=1, documents=80, seed=0)
  _write_corpus('gs://bucket/valid', num_files=1, documents=30, seed=10)
  config = tiny_configs.bert_config()
  config.update(num_train_steps=4, checkpoint_every=2)
  config.mesh.update(num_devices=1)
  config.data.update(corpus='gs://bucket/text/*.txt', eval_corpus='gs://bucket/valid/*.txt', vocab_size=200,
                     num_workers=1)
  pretrain.run(config, 'gs://bucket/run')
  assert storage.isfile('gs://bucket/run/config.json') and storage.isfile('gs://bucket/run/metrics.jsonl')
  assert {'2', '4'} <= set(storage.listdir('gs://bucket/run/checkpoints'))
  _, history = pretrain.run(config, 'gs://bucket/run')  # Resumes at step 4: nothing left to train.
  assert not history
  export.export_workdir('gs://bucket/run', 'gs://bucket/run/hf')
  assert storage.isfile('gs://bucket/run/hf/model.safetensors')
