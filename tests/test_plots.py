"""The drawings: XLNet's factorisation order and stream masks (equal to the training sampler's), and training
curves from a metrics.jsonl."""
import json

import jax
import numpy as np
import pytest

from common import plots
from common.config import UserError
from xlnet_jax import permutation, visualize

pytest.importorskip('matplotlib')


def test_factorization_masks_are_the_samplers(tmp_path):
  sentence = 'the cat sat on the mat by the door'
  masks = visualize.visualize(sentence, str(tmp_path), targets=[1, 4, 6], seed=3)
  assert (tmp_path / 'factorization.png').stat().st_size > 10_000
  saved = np.load(tmp_path / 'masks.npz')
  is_target = np.zeros([9], bool)
  is_target[[1, 4, 6]] = True
  ref = permutation.sample_permutation(jax.random.key(3), is_target[None], np.zeros([1, 9], bool), num_predict=3,
                                       perm_size=None)
  np.testing.assert_array_equal(saved['query_mask'], np.asarray(ref['perm_mask'][0]))
  np.testing.assert_array_equal(saved['content_mask'], np.asarray(permutation.content_stream_mask(ref['perm_mask'])[0]))
  np.testing.assert_array_equal(saved['rank'], np.asarray(ref['rank'][0]))
  assert saved['tokens'].tolist() == sentence.split()
  # What the figure states: a target's query never sees itself, its content stream does; context sees no target.
  for t in (1, 4, 6):
    assert masks['query_mask'][t, t] == 1 and masks['content_mask'][t, t] == 0
  assert masks['content_mask'][0, [1, 4, 6]].tolist() == [1, 1, 1]


def test_visualize_refuses_bad_targets(tmp_path):
  with pytest.raises(UserError, match='outside the 3 tokens'):
    visualize.visualize('a b c', str(tmp_path), targets=[5])


def test_training_curves_from_metrics_jsonl(tmp_path):
  lines = [{'step': s, 'train/loss': 5.0 - s / 100, 'train/mlm_accuracy': s / 1000, 'train/learning_rate': 1e-3,
            'train/tokens_per_sec': 1000.0} for s in range(10, 110, 10)]
  lines.append({'step': 100, 'eval/loss': 4.2, 'eval/mlm_accuracy': 0.1})
  text = '\n'.join(json.dumps(x) for x in lines) + '\n{"step": 110, "train/lo'  # a line cut by a kill is skipped
  (tmp_path / 'metrics.jsonl').write_text(text)
  written = plots.plot_workdir(str(tmp_path))
  assert sorted(p.rsplit('/', 1)[-1] for p in written) == ['accuracy.png', 'learning_rate.png', 'loss.png',
                                                           'throughput.png']
  series = plots.read_series(str(tmp_path / 'metrics.jsonl'))
  assert series['eval/loss'] == [(100, 4.2)] and len(series['train/loss']) == 10
  with pytest.raises(UserError, match='no such file'):
    plots.plot_workdir(str(tmp_path / 'missing'))
