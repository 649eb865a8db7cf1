"""The data written for a split depends on the corpus and the data settings, never on `num_workers` (how many
processes write it): the eval split's shard count is a function of `num_shards` alone, and small corpora are
written without spawning processes."""
import hashlib
import logging
import os
import random

import pytest

from common.data import prepare, shards

WORDS = 'river stone cloud light paper music garden window alpha beta gamma delta kappa omega tau sigma'.split()


def _write_corpus(path, num_documents, seed):
  rng = random.Random(seed)
  docs = ['\n'.join(' '.join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))).capitalize() + '.'
                    for _ in range(rng.randint(2, 8))) for _ in range(num_documents)]
  path.write_text('\n\n'.join(docs) + '\n', encoding='utf-8')


def _split_digest(directory):
  meta = shards.read_metadata(directory)
  digests = [hashlib.sha256(open(os.path.join(directory, s['file']), 'rb').read()).hexdigest() for s in meta['shards']]
  return meta['num_records'], digests


def _data_config(model, **paths):
  if model == 'bert':
    from bert_jax import pretrain_data as pd
    return pd, pd.data_config(vocab_size=200, max_seq_length=32, max_predictions_per_seq=5, **paths)
  if model == 'gpt':
    from gpt_jax import pretrain_data as pd
    return pd, pd.data_config(vocab_size=400, max_seq_length=32, **paths)
  from elmo_jax import pretrain_data as pd
  return pd, pd.data_config(vocab_size=100, max_seq_length=16, **paths)


@pytest.mark.parametrize('model', ['bert', 'gpt', 'elmo'])
def test_eval_split_does_not_depend_on_num_workers(tmp_path, model, caplog):
  _write_corpus(tmp_path / 'train.txt', 60, seed=1)
  _write_corpus(tmp_path / 'valid.txt', 40, seed=2)
  out = {}
  for workers in (1, 3):
    pd, cfg = _data_config(model, corpus=str(tmp_path / 'train.txt'), eval_corpus=str(tmp_path / 'valid.txt'))
    cfg.update(num_shards=4, num_workers=workers)
    with caplog.at_level(logging.INFO, logger='common.data.prepare'):
      _, train_dir, eval_dir = pd.prepare_pretraining_data(cfg, tmp_path / f'work{workers}')
    out[workers] = _split_digest(train_dir), _split_digest(eval_dir)
  (train1, eval1), (train3, eval3) = out[1], out[3]
  assert train1 == train3 and len(train1[1]) == 4
  assert eval1 == eval3 and len(eval1[1]) == prepare.EVAL_SHARDS and eval1[0] > 0
  assert 'written by 1 writer process(es) of the 3 allowed' in caplog.text  # a small corpus: no processes spawned


def test_writer_processes_scale_with_the_tokens():
  per = prepare.TOKENS_PER_WRITER
  assert prepare.writer_processes(4, 10) == 1
  assert prepare.writer_processes(4, 2 * per + 1) == 2
  assert prepare.writer_processes(4, 100 * per) == 4
  assert prepare.writer_processes(1, 100 * per) == 1
