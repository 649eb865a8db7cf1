"""Fine-tuning from TensorFlow Datasets: every task `common.tasks.tfds_task` maps to TFDS, read from TFDS's mock
data (nothing is downloaded) and fine-tuned end to end by `common.finetune.run_task`, for BERT and XLNet.

`tfds.testing.mock_data(policy=MockPolicy.USE_CODE)` builds each dataset from its real builder: feature names,
dtypes, class names and nesting come from the TFDS code. (The wheel ships no `dataset_info.json` metadata, so the
default policy falls back to USE_CODE anyway; naming it keeps the tests offline by construction.) The records are
random: strings of 'abcdefghij ', sequences of 5-49 items, class ids in range. Two kinds of mock records are read:

* raw: TFDS's own random records. They break what the real datasets guarantee (a CoNLL sentence has one NER tag per
  token; a RACE record as many option lists and answers as questions, answers are letters; a SQuAD answer lies in its
  context), so the adapters must count and skip them without crashing.
* well-formed: the same generator's records with those guarantees restored, and TFDS's test-split label -1 on GLUE
  test rows, the way the real records come. Record 1 of every split stays broken on purpose (text that is not UTF-8,
  a SQuAD answer outside its context, a RACE answer letter 'E', a CoNLL tag missing), so every run also skips a
  record. These records train.

Tiny models (hidden 32, one layer, sequence 32) with a letter vocabulary (BERT: `a`-`j` and `##a`-`##j`; XLNet: a
sentencepiece model trained on random letter strings), random weights (each model's encoder initialised once and
passed to every run the way a pretrained one is, so no run compiles the encoder's random init, only its task
layer's); one training step per task, evaluation on the mock dev split, the task's official metrics. Tasks of one
kind compile identical programs, so the module runs with a persistent compilation cache in a temporary directory
(restored afterwards), and each model's runs form one xdist group (`make test` runs `--dist loadgroup`), so one
worker's cache serves them all. TensorFlow is imported by the fixtures only, never at collection.
"""
from __future__ import annotations

import math
import os
import re
import zlib

import jax
import numpy as np
import pytest

from bert_jax import export as bert_export
from bert_jax import finetune as bert_finetune
from bert_jax import model as bert_model
from bert_jax import tokenizer as bert_tokenizer
from common import finetune, tasks
from xlnet_jax import export as xlnet_export
from xlnet_jax import finetune as xlnet_finetune
from xlnet_jax import model as xlnet_model
from xlnet_jax import tokenizer as xlnet_tokenizer

NUM_RECORDS = 8
BROKEN = 1  # Index of the record left broken in every well-formed split.
SEQ = 32
LETTERS = 'abcdefghij'

# Every task the project reads from TFDS -> a metric its evaluation must report.
TASKS = {
    'glue/cola': 'mcc', 'glue/sst2': 'accuracy', 'glue/mrpc': 'f1', 'glue/qqp': 'f1', 'glue/stsb': 'pearson',
    'glue/mnli': 'accuracy', 'glue/mnli_mismatched': 'accuracy', 'glue/qnli': 'accuracy', 'glue/rte': 'accuracy',
    'glue/wnli': 'accuracy', 'squad/v1.1': 'f1', 'squad/v2.0': 'f1', 'race': 'accuracy', 'race/middle': 'accuracy',
    'race/high': 'accuracy', 'conll2003': 'f1',
}


# ----------------------------------------------------------------------------------------------------------------------
# TFDS, its mock data and the compilation cache.
# ----------------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def tfds():
  """tensorflow_datasets, imported here (TensorFlow is slow to import) and kept off any accelerator."""
  pytest.importorskip('tensorflow', reason="TensorFlow is not installed: pip install -e '.[test]'")
  module = pytest.importorskip('tensorflow_datasets', reason="TFDS is not installed: pip install -e '.[test]'")
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  try:
    tf.config.set_visible_devices([], 'GPU')
  except RuntimeError:
    pass
  import logging  # pylint: disable=import-outside-toplevel
  logging.getLogger('absl').setLevel(logging.ERROR)  # TFDS warns about the missing metadata on every load.
  return module


@pytest.fixture(scope='session')
def compilation_cache_dir(tmp_path_factory):
  """One directory per test process, so the cache survives the module fixture being set up again (xdist may run
  other modules' tests in between)."""
  return str(tmp_path_factory.mktemp('tfds_jax_cache'))


@pytest.fixture(scope='module', autouse=True)
def compilation_cache(compilation_cache_dir):
  """A persistent compilation cache while this module runs: runs of one task kind hit it instead of compiling."""
  from jax.experimental.compilation_cache import compilation_cache as cache  # pylint: disable=import-outside-toplevel
  names = ('jax_compilation_cache_dir', 'jax_persistent_cache_min_compile_time_secs',
           'jax_persistent_cache_min_entry_size_bytes')
  saved = {name: getattr(jax.config, name) for name in names}
  jax.config.update('jax_compilation_cache_dir', compilation_cache_dir)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.2)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)
  cache.reset_cache()
  yield
  for name, value in saved.items():
    jax.config.update(name, value)
  cache.reset_cache()


def _raw_mock(tfds):
  return tfds.testing.mock_data(num_examples=NUM_RECORDS, policy=tfds.testing.MockPolicy.USE_CODE)


def _well_formed_mock(tfds):
  """mock_data whose records come from TFDS's random generator on the builder's real features, then repaired."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  from tensorflow_datasets.testing import mocking  # pylint: disable=import-outside-toplevel

  def as_dataset(builder, split, decoders=None, read_config=None, **kwargs):
    del decoders, read_config, kwargs
    features = builder.info.features
    config = builder.builder_config.name if builder.builder_config else ''
    split = str(split)
    seed = zlib.crc32(f'{builder.name}/{config}/{split}'.encode())
    rng = np.random.default_rng(seed)
    records = [_repair(builder.name, config, split, index, record, rng)
               for index, record in enumerate(mocking.RandomFakeGenerator(features, NUM_RECORDS, seed=seed))]
    signature = tf.nest.map_structure(lambda info: tf.TensorSpec(info.shape, info.tf_dtype),
                                      features.get_tensor_info())
    return tf.data.Dataset.from_generator(lambda: iter(records), output_signature=signature)

  return tfds.testing.mock_data(policy=tfds.testing.MockPolicy.USE_CODE, as_dataset_fn=as_dataset)


def _repair(dataset: str, config: str, split: str, index: int, record: dict, rng) -> dict:
  """The random record with the structure the real dataset guarantees; record BROKEN keeps one defect."""
  broken = index == BROKEN
  if dataset == 'glue':
    label = record['label']
    if split.startswith('test'):
      record['label'] = np.asarray(-1, dtype=label.dtype)  # TFDS's GLUE test rows carry no label.
    elif config == 'stsb':
      record['label'] = np.asarray(5.0 * label, dtype=label.dtype)  # Scores lie in [0, 5].
    if broken:
      first_text = next(key for key, value in record.items() if isinstance(value, str))
      record[first_text] = b'\xffnot utf-8'
  elif dataset == 'squad':
    context = record['context']
    count = 1 if split == 'train' else 3  # Dev questions have several reference answers.
    if broken and 'is_impossible' in record:
      record['is_impossible'] = np.asarray(False)
    if record.get('is_impossible', False):
      texts, starts = [], []  # SQuAD 2.0: an unanswerable question has no answers (plausible_answers may).
    elif broken:
      texts, starts = ['beyond the context'] * count, [len(context) + 3] * count
    else:
      words = [m for m in re.finditer(r'\S+', context)]
      pick = words[int(rng.integers(len(words)))]
      texts, starts = [pick.group()] * count, [pick.start()] * count
    record['answers'] = {'text': np.array(texts, dtype=object), 'answer_start': np.array(starts, dtype=np.int32)}
  elif dataset == 'race':
    questions = min(3, len(record['questions']), len(record['options']))
    record['questions'] = record['questions'][:questions]
    record['options'] = record['options'][:questions, :4]
    letters = [str(letter) for letter in rng.choice(list('ABCD'), size=questions)]
    if broken:
      letters[0] = 'E'
    record['answers'] = np.array(letters, dtype=object)
  elif dataset == 'conll2003':
    length = min(12, *(len(record[key]) for key in ('tokens', 'pos', 'chunks', 'ner')))
    for key in ('tokens', 'pos', 'chunks', 'ner'):
      record[key] = record[key][:length]
    if broken:
      record['ner'] = record['ner'][:-1]
  return record


# ----------------------------------------------------------------------------------------------------------------------
# The adapters on both kinds of mock records.
# ----------------------------------------------------------------------------------------------------------------------

def test_names_and_splits():
  assert tasks.tfds_name_and_split('mnli', 'dev') == ('glue/mnli', 'validation_matched')
  assert tasks.tfds_name_and_split('glue/mnli_matched', 'test') == ('glue/mnli', 'test_matched')
  assert tasks.tfds_name_and_split('glue/mnli_mismatched', 'validation') == ('glue/mnli', 'validation_mismatched')
  assert tasks.tfds_name_and_split('mnli_mismatched', 'train') == ('glue/mnli', 'train')
  assert tasks.tfds_name_and_split('SST-2', 'dev') == ('glue/sst2', 'validation')
  assert tasks.tfds_name_and_split('squad2', 'dev') == ('squad/v2.0', 'validation')
  assert tasks.tfds_name_and_split('conll2003', 'validation') == ('conll2003', 'dev')  # TFDS calls it 'dev'.
  assert tasks.tfds_name_and_split('race_high', 'dev') == ('race/high', 'dev')
  with pytest.raises(ValueError, match='race/middle and race/high'):
    tasks.tfds_name_and_split('race', 'train')
  with pytest.raises(ValueError, match='SWAG is not in the TFDS catalog'):
    tasks.tfds_name_and_split('swag', 'train')
  with pytest.raises(ValueError, match='SWAG is not in the TFDS catalog'):
    tasks.tfds_task('swag', 'train')


@pytest.mark.parametrize('task', ['glue/mrpc', 'stsb', 'mnli', 'squad_v1.1', 'squad_v2.0', 'race', 'conll2003'])
def test_raw_mock_records_are_counted_and_skipped(tfds, task):
  """TFDS's own random records: whatever the adapters cannot use is a counted bad row, never an exception."""
  stats = tasks.TaskReadStats()
  with _raw_mock(tfds):
    examples = tasks.tfds_task(task, 'train', stats=stats)
  sources = 2 if task == 'race' else 1
  assert stats.files == sources and stats.examples == len(examples)
  if task in ('glue/mrpc', 'stsb', 'mnli'):  # Nothing in a random GLUE record is out of range.
    assert len(examples) == NUM_RECORDS and stats.bad_rows == 0
  else:  # Random lengths never line up and random answers miss their (short) contexts.
    assert examples == [] and stats.bad_rows == NUM_RECORDS * sources
    assert len(stats.warnings) == NUM_RECORDS * sources and all(': skipped: ' in w for w in stats.warnings)


def test_well_formed_glue(tfds):
  with _well_formed_mock(tfds):
    stats = tasks.TaskReadStats()
    train = tasks.tfds_task('mnli', 'train', stats=stats)
    test = tasks.tfds_task('glue/mnli_mismatched', 'test')
    stsb_test = tasks.tfds_task('stsb', 'test')
    stsb_dev = tasks.tfds_task('stsb', 'dev')
    cola = tasks.tfds_task('cola', 'train')
    ax = tasks.tfds_task('glue/ax', 'test')
  assert len(train) == NUM_RECORDS - 1 and stats.bad_rows == 1 and 'UnicodeDecodeError' in stats.warnings[0]
  assert all(isinstance(e.text_a, str) and isinstance(e.text_b, str) for e in train)
  assert {e.label for e in train} <= {0, 1, 2} and all(e.guid.startswith('train-') for e in train)
  assert [e.label for e in test] == [None] * (NUM_RECORDS - 1)
  assert [e.label for e in stsb_test] == [None] * (NUM_RECORDS - 1)  # TFDS's -1.0, not a score.
  assert all(isinstance(e.label, float) and 0.0 <= e.label <= 5.0 for e in stsb_dev)
  assert all(e.text_b is None and e.label in (0, 1) for e in cola)
  assert len(ax) == NUM_RECORDS - 1 and all(e.label is None for e in ax)


def test_glue_labels_follow_the_names(tfds):
  """TFDS orders MNLI's classes entailment, neutral, contradiction; the GLUE files' order is ours."""
  with _raw_mock(tfds):
    builder = tfds.builder('glue/mnli')
    raw = [int(r['label']) for r in tfds.as_numpy(tfds.load('glue/mnli', split='train'))]
    examples = tasks.tfds_task('mnli', 'train')
  names = builder.info.features['label'].names
  assert names == ['entailment', 'neutral', 'contradiction']
  assert [tasks.label_list('mnli')[e.label] for e in examples] == [names[i] for i in raw]


def test_well_formed_squad(tfds):
  with _well_formed_mock(tfds):
    stats = tasks.TaskReadStats()
    train = tasks.tfds_task('squad/v1.1', 'train', stats=stats)
    dev = tasks.tfds_task('squad_v2.0', 'dev')
  assert len(train) == NUM_RECORDS - 1 and stats.bad_rows == 1 and 'lies outside the context' in stats.warnings[0]
  for example in train:
    answer = example.answers[0]
    assert len(example.answers) == 1 and not example.is_impossible
    assert example.context[answer['answer_start']:][:len(answer['text'])] == answer['text']
  assert all(isinstance(e.qas_id, str) and isinstance(e.question, str) for e in train)
  impossible = [e for e in dev if e.is_impossible]
  assert impossible and all(e.answers == [] for e in impossible)
  assert all(len(e.answers) == 3 for e in dev if not e.is_impossible)


def test_well_formed_race_and_conll(tfds):
  with _well_formed_mock(tfds):
    stats = tasks.TaskReadStats()
    race = tasks.tfds_task('race', 'dev', stats=stats)
    conll_stats = tasks.TaskReadStats()
    conll = tasks.tfds_task('conll2003', 'validation', stats=conll_stats)
  assert stats.files == 2 and stats.bad_rows == 2  # One bad answer letter in each level.
  assert "answer 'E' is not one of the letters A-D" in stats.warnings[0]
  assert race[0].guid.startswith('middle/') and race[-1].guid.startswith('high/')
  assert all(len(e.endings) == 4 and 0 <= e.label < 4 for e in race)
  assert len(race) == stats.examples
  assert len(conll) == NUM_RECORDS - 1 and conll_stats.bad_rows == 1 and 'NER tags' in conll_stats.warnings[0]
  assert all(len(e.words) == len(e.tags) and set(e.tags) <= set(tasks.CONLL2003_LABELS) for e in conll)
  assert all(e.guid.startswith('dev-') for e in conll)


# ----------------------------------------------------------------------------------------------------------------------
# End to end: TFDS -> features -> one training step -> predictions -> official metrics.
# ----------------------------------------------------------------------------------------------------------------------

def _random_letter_lines(count: int, seed: int) -> list[str]:
  rng = np.random.default_rng(seed)
  return [' '.join(''.join(rng.choice(list(LETTERS), size=int(rng.integers(1, 9)))) for _ in range(8))
          for _ in range(count)]


def _encoder(export, cfg, adapter):
  """Random encoder weights, initialised once per model: every task's run starts from them the way a run from a
  pretrained encoder does, so no run compiles the encoder's random init (only its task layer's)."""
  return jax.device_get(export.init_params(cfg, jax.random.PRNGKey(0))[adapter.encoder_key])


@pytest.fixture(scope='module')
def bert_setup(tmp_path_factory):
  out = str(tmp_path_factory.mktemp('tfds_bert'))
  vocab = bert_tokenizer.write_vocab(list(bert_tokenizer.SPECIAL_TOKENS) + list(LETTERS) +
                                     [f'##{c}' for c in LETTERS], os.path.join(out, 'vocab.txt'))
  tokenizer = bert_tokenizer.load_tokenizer(vocab)
  cfg = bert_model.model_config(vocab_size=len(bert_tokenizer.read_vocab(vocab)), hidden_size=32,
                                num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                max_position_embeddings=SEQ)
  return bert_finetune.ADAPTER, tokenizer, cfg, _encoder(bert_export, cfg, bert_finetune.ADAPTER)


@pytest.fixture(scope='module')
def xlnet_setup(tmp_path_factory):
  out = tmp_path_factory.mktemp('tfds_xlnet')
  (out / 'text.txt').write_text('\n'.join(_random_letter_lines(400, seed=0)) + '\n')
  model = xlnet_tokenizer.train_sentencepiece([str(out / 'text.txt')], 48, str(out / 'sp'))
  tokenizer = xlnet_tokenizer.load_tokenizer(model)
  cfg = xlnet_model.model_config(vocab_size=tokenizer.vocab_size, d_model=32, n_layer=1, n_head=2, d_head=16,
                                 d_inner=64)
  return xlnet_finetune.ADAPTER, tokenizer, cfg, _encoder(xlnet_export, cfg, xlnet_finetune.ADAPTER)


@pytest.mark.parametrize('model', [pytest.param(name, marks=pytest.mark.xdist_group(f'tfds_{name}'))
                                   for name in ('bert', 'xlnet')])
@pytest.mark.parametrize('task', list(TASKS))
def test_task_end_to_end(tfds, task, model, request, monkeypatch):
  adapter, tokenizer, model_cfg, encoder = request.getfixturevalue(f'{model}_setup')
  reads = []
  read = tasks.tfds_task

  def counted_read(name, split, data_dir=None, stats=None):
    stats = stats if stats is not None else tasks.TaskReadStats()
    reads.append((name, split, stats))
    return read(name, split, data_dir, stats)

  monkeypatch.setattr(tasks, 'tfds_task', counted_read)
  config = finetune.finetune_config(
      global_batch_size=8, eval_batch_size=8, max_seq_length=SEQ, epochs=1e-3, learning_rate=1e-3, dropout=0.0,
      doc_stride=8, max_query_length=8, log_every=100, async_checkpoint=False, peak_flops_per_device=1e12,
      length_buckets=1)
  with _well_formed_mock(tfds):
    result = finetune.run_task(config, adapter, task, tokenizer, model_cfg, encoder, None)
  # Both splits came from TFDS, each with its broken record skipped (one per RACE level).
  assert [split for _, split, _ in reads] == ['train', 'dev']
  assert all(stats.bad_rows == stats.files and stats.examples > 0 for _, _, stats in reads)
  run = result['runs'][0]
  assert run['steps'] == 1 and math.isfinite([h for h in run['history'] if 'loss' in h][-1]['loss'])
  metric = TASKS[task]
  assert metric in result['metrics'], result['metrics']
  value = result['metrics'][metric]['mean']
  assert math.isfinite(value) or (metric in ('pearson', 'mcc') and math.isnan(value)), result['metrics']
