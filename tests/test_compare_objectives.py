"""The objective comparison (`benchmarks/compare_objectives.py`) on its micro preset: two objectives pretrained to
one FLOP budget, one task, one seed; every output written; a rerun recomputes nothing; a changed setting or a bad
argument is refused before any compute."""
import importlib
import json
import os
import types

import numpy as np
import pytest

from benchmarks import compare_objectives
from benchmarks.compare import cells, presets
from tests.drivers import harness

# One worker runs the module: its tests share the micro run (and its workdir locks). Session scope: the worker may
# interleave other modules' tests with these, which would tear a module-scoped run down and redo it.
pytestmark = pytest.mark.xdist_group('compare_micro')


@pytest.fixture(scope='session')
def micro_run(tmp_path_factory):
  train, valid = harness.shared_small_corpus(tmp_path_factory)
  out = str(tmp_path_factory.mktemp('compare_micro') / 'out')
  preset = presets.get('micro')
  table = compare_objectives.run(preset, out, train, valid)
  return preset, out, table, (train, valid)


def test_micro_comparison_writes_every_output_within_the_budget(micro_run):
  preset, out, table, _ = micro_run
  for name in ('results.md', 'results.json', 'loss_vs_flops.png', 'downstream.png'):
    assert os.path.getsize(os.path.join(out, name)) > 0, name
  with open(os.path.join(out, 'results.json')) as f:
    saved = json.load(f)
  assert list(saved['objectives']) == list(preset.objectives) and saved['tasks'] == ['learnable']
  for name, row in saved['objectives'].items():
    p = row['pretrain']
    per_step = p['flops_per_example'] * preset.batch_size
    # The budget is spent to within one step, by the objective's own count.
    assert preset.budget_flops - per_step < p['flops'] <= preset.budget_flops, name
    assert p['steps'] == round(p['flops'] / per_step) and p['params'] > 0 and p['loss_bits'] > 0
    assert len(p['train_curve']) >= 2 and p['train_curve'][-1][0] == pytest.approx(p['flops'])
    metrics = row['tasks']['learnable']['metrics']
    assert metrics['accuracy']['values'] and 0.0 <= metrics['accuracy']['mean'] <= 1.0
  # Cheaper objectives get more steps for the same budget.
  rows = saved['objectives']
  cheap, dear = sorted(rows, key=lambda n: rows[n]['pretrain']['flops_per_example'])
  assert rows[cheap]['pretrain']['steps'] >= rows[dear]['pretrain']['steps']
  text = open(os.path.join(out, 'results.md')).read()
  assert all(f'| {name} |' in text for name in rows)


def test_rerun_reuses_finished_cells(micro_run, monkeypatch):
  preset, out, table, (train, valid) = micro_run
  stamps = {}
  for root, _, files in os.walk(out):
    if cells.CELL_FILE in files:
      stamps[root] = os.stat(os.path.join(root, cells.CELL_FILE)).st_mtime_ns
  assert len(stamps) == 4  # 2 pretraining + 2 task cells

  def refuse(*args, **kwargs):
    raise AssertionError('a finished cell was recomputed')
  monkeypatch.setattr(cells.pretrain, 'run', refuse)
  for model in ('bert', 'gpt'):
    monkeypatch.setattr(importlib.import_module(f'{model}_jax.finetune'), 'run', refuse)
  again = compare_objectives.run(presets.get('micro'), out, train, valid)
  assert again['objectives'].keys() == table['objectives'].keys()
  for name in table['objectives']:
    assert again['objectives'][name]['pretrain']['flops'] == table['objectives'][name]['pretrain']['flops']
  assert {r: os.stat(os.path.join(r, cells.CELL_FILE)).st_mtime_ns for r in stamps} == stamps


def test_changed_settings_are_refused_not_mixed(micro_run):
  _, out, _, (train, valid) = micro_run
  preset = presets.get('micro')
  compare_objectives.apply_overrides(preset, ['budget_flops=7e8'])
  with pytest.raises(ValueError, match='computed with other settings'):
    compare_objectives.run(preset, out, train, valid)


@pytest.mark.parametrize('change, match', [
    (dict(tasks=('cola',)), 'needs --glue_dir'),
    (dict(objectives=('random_init', 'gpt')), 'random_init takes the BERT architecture'),
    (dict(objectives=('bert_mlm', 'nope')), "unknown objective 'nope'"),
])
def test_bad_arguments_are_refused_before_any_compute(tmp_path, change, match):
  preset = presets.get('micro')
  preset.update(change)
  with pytest.raises(ValueError, match=match):
    compare_objectives.run(preset, str(tmp_path / 'out'), 'embedded', '')
  assert not os.path.exists(tmp_path / 'out')


def test_overrides_parse_literals_and_lists():
  preset = presets.get('micro')
  compare_objectives.apply_overrides(preset, ['budget_flops=2e9', 'seeds=0,1,2', 'finetune.epochs=2.5'])
  assert preset.budget_flops == 2e9 and preset.seeds == (0, 1, 2) and preset.finetune.epochs == 2.5
  for bad in ('nope=1', 'nope.epochs=1', 'finetune.nope=1', 'budget_flops.x=1'):
    with pytest.raises(ValueError, match='no such preset field'):
      compare_objectives.apply_overrides(preset, [bad])


def test_a_preempted_pretraining_is_not_recorded_as_finished(micro_run, tmp_path, monkeypatch):
  """SIGTERM makes the trainer checkpoint and return early; that run must not leave a cell (it resumes later)."""
  from benchmarks.compare import objectives
  _, _, _, (train, valid) = micro_run
  stopped = types.SimpleNamespace(step=np.int32(3), params={})
  monkeypatch.setattr(cells.pretrain, 'run', lambda recipe, config, workdir: (stopped, []))
  with pytest.raises(RuntimeError, match=r'stopped at step 3 of \d+; rerun to resume'):
    cells.pretrain_cell(objectives.get('gpt'), presets.get('micro'), str(tmp_path / 'gpt'), train, valid)
  assert not os.path.exists(tmp_path / 'gpt' / cells.CELL_FILE)


def _squad_article(title, n_questions):
  context = f'{title} was founded in 1900 by the river.'
  qas = [{'id': f'{title}-{i}', 'question': f'When was {title} founded? ({i})',
          'answers': [{'text': '1900', 'answer_start': context.index('1900')}]} for i in range(n_questions)]
  return {'title': title, 'paragraphs': [{'context': context, 'qas': qas}]}


def test_squad_halves_split_by_article(tmp_path):
  """The halves are the even and the odd articles: every question in exactly one, no context in both."""
  source = tmp_path / 'dev-v1.1.json'
  articles = [_squad_article(f'Town{i}', i + 1) for i in range(5)]
  source.write_text(json.dumps({'version': '1.1', 'data': articles}))
  out = compare_objectives.task_data_dir(compare_objectives.SQUAD_HALVES, str(tmp_path / 'out'),
                                         squad_file=str(source))
  halves = {split: json.loads((tmp_path / 'out' / 'squad_halves_data' / f'{split}-v1.1.json').read_text())
            for split in ('train', 'dev')}
  assert out == str(tmp_path / 'out' / 'squad_halves_data')
  assert [a['title'] for a in halves['train']['data']] == ['Town0', 'Town2', 'Town4']
  assert [a['title'] for a in halves['dev']['data']] == ['Town1', 'Town3']
  ids = [q['id'] for h in halves.values() for a in h['data'] for p in a['paragraphs'] for q in p['qas']]
  assert sorted(ids) == sorted(q['id'] for a in articles for p in a['paragraphs'] for q in p['qas'])
  from common import tasks
  assert len(tasks.read_task('squad_v1.1', out, 'train')) == 1 + 3 + 5
  bad = tmp_path / 'bad.json'
  bad.write_text('{"data": 3')
  with pytest.raises(ValueError, match='not a SQuAD JSON file'):
    compare_objectives.task_data_dir('squad_halves', str(tmp_path / 'o2'), squad_file=str(bad))
  with pytest.raises(ValueError, match='needs --squad_file'):
    compare_objectives.task_data_dir('squad_halves', str(tmp_path / 'o3'))


def test_tasks_a_model_does_not_offer_are_na_not_run(tmp_path):
  """GPT has no tagging or span head and ELMo no span head: their cells are n/a, and the runners do refuse them."""
  from benchmarks.compare import objectives, results
  from common.tasks import registry
  offered = {name: [objectives.offers(objectives.get(name), registry.task_info(compare_objectives.registry_task(t)).kind)
                    for t in ('cola', 'stsb', 'conll2003', 'squad_halves')]
             for name in ('bert_mlm', 'xlnet', 'gpt', 'elmo')}
  assert offered == {'bert_mlm': [True] * 4, 'xlnet': [True] * 4, 'gpt': [True, True, False, False],
                     'elmo': [True, True, True, False]}
  from gpt_jax import finetune_data
  with pytest.raises(Exception, match='tagging'):
    finetune_data.convert_examples('conll2003', [], None, 32)
  from elmo_jax import finetune as elmo_finetune
  assert 'squad' not in elmo_finetune.MODEL_KINDS and 'token' in elmo_finetune.MODEL_KINDS
  specs = [objectives.get('bert_mlm'), objectives.get('gpt')]
  table = results.build_table(specs, ['conll2003'], {}, {'gpt': {'conll2003': results.NOT_OFFERED}})
  text = results.markdown(table, ['# t'])
  assert '| gpt |' in text and '| n/a |' in text and "does not offer" in text
