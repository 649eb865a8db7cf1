"""The shared trainer: sharded steps equal the single-device step, accumulation is exact, resume is bitwise,
non-finite steps are skipped, bad configs are refused before compute."""
import dataclasses
import json
import os

import jax
import numpy as np
import pytest

from bert_jax.objective import make_objective
from common import checkpoint as ckpt_lib
from common import finetune_loader, sharding, trainer
from common.config import ConfigError
from tests.synthetic import SyntheticLoader, tiny_config

# The resume and non-finite tests share one program: the same config (checkpointing, the poisoning of the data and
# the stopping rule are on the host), so the persistent compilation cache (conftest.py) compiles it once;
# `stop_after` ends the shorter runs early.
STEPS = 6


def config_for(**overrides):
  """`tiny_config` for the runs here: one encoder layer (nothing checked depends on stacking layers; a second one
  only lengthens every compile by ~30 %) and a fixed peak FLOP/s (the MFU denominator), so no run spends seconds
  measuring the CPU's matmul peak at start-up."""
  config = tiny_config(peak_flops_per_device=1e12, **overrides)
  config.model.num_hidden_layers = 1
  return config


def run(config, mesh=None, workdir=None, stop_after=None, loader=None):
  loader = loader or SyntheticLoader(config)
  state, history = trainer.train(config, make_objective(config), loader, workdir=workdir, mesh=mesh,
                                 stop_after=stop_after)
  return jax.device_get(state.params), history


def max_abs_diff(a, b):
  return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in zip(jax.tree.leaves(a),
                                                                                   jax.tree.leaves(b)))


@pytest.fixture(scope='module')
def single_device_params():
  return run(config_for(num_train_steps=3))  # mesh.num_devices=1


@pytest.mark.parametrize('layout', [dict(data=8, fsdp=1, tensor=1), dict(data=1, fsdp=8, tensor=1),
                                    dict(data=2, fsdp=1, tensor=4), dict(data=2, fsdp=2, tensor=2)])
def test_sharded_step_equals_single_device(layout, single_device_params):
  """3 steps with dropout on 8 fake devices match 1 device within 2e-5 (fp32; only reduction order differs)."""
  assert jax.device_count() == 8
  config = config_for(num_train_steps=3)
  config.mesh.update(**layout, num_devices=0)
  state, history = trainer.train(config, make_objective(config), SyntheticLoader(config))
  params = jax.device_get(state.params)
  ref_params, ref_history = single_device_params
  diff = max_abs_diff(params, ref_params)
  assert diff < 2e-5, f'{layout}: params differ from single device by {diff}'
  for h, r in zip(history, ref_history):
    assert abs(h['loss'] - r['loss']) < 1e-5, (layout, h['loss'], r['loss'])
  # The trained parameters really are sharded as the layout says.
  spec = state.params['bert']['layer_0']['query']['kernel'].sharding.spec
  expected = ('fsdp' if layout['fsdp'] > 1 else 'fsdp', 'tensor', None)
  assert tuple(spec) == expected


def test_tensor_parallel_params_are_split():
  config = tiny_config(num_train_steps=2)
  config.mesh.update(data=2, fsdp=1, tensor=4, num_devices=0)
  setup = trainer.build_setup(config, make_objective(config))
  state = setup.create_state()
  kernel = state.params['bert']['layer_0']['intermediate']['kernel']  # [embed, mlp], mlp over tensor
  assert kernel.addressable_shards[0].data.shape == (32, 64 // 4)
  mu = state.opt_state  # Adam moments mirror the parameter shardings
  mu_leaves = [x for x in jax.tree.leaves(mu) if getattr(x, 'shape', None) == (32, 64)]
  assert mu_leaves and all(x.sharding.is_equivalent_to(kernel.sharding, 2) for x in mu_leaves)


def test_gradient_accumulation_equals_full_batch():
  """Without dropout, 4 micro-batches of 4 give the same update as one batch of 16 (the MLM denominator is global)."""
  def cfg(accum):
    c = config_for(num_train_steps=3, grad_accum_steps=accum)
    c.model.hidden_dropout_prob = 0.0
    c.model.attention_probs_dropout_prob = 0.0
    c.mesh.update(data=4, fsdp=1, tensor=1, num_devices=4)
    return c
  full, hist_full = run(cfg(1))
  accum, hist_accum = run(cfg(4))
  assert max_abs_diff(full, accum) < 2e-6
  for a, b in zip(hist_full, hist_accum):
    assert abs(a['loss'] - b['loss']) < 1e-5 and abs(a['mlm_accuracy'] - b['mlm_accuracy']) < 1e-6


def test_resume_is_bitwise_identical(tmp_path):
  """6 steps straight == 3 steps, stop, restart on the same workdir to 6: identical params and batch sequence."""
  config = config_for(num_train_steps=STEPS, checkpoint_every=3)
  straight_loader = SyntheticLoader(config)
  straight, _ = run(config, workdir=str(tmp_path / 'a'), loader=straight_loader)
  first_loader, second_loader = SyntheticLoader(config), SyntheticLoader(config)
  run(config, workdir=str(tmp_path / 'b'), stop_after=3, loader=first_loader)
  assert ckpt_lib.make_manager(str(tmp_path / 'b')).latest_step() == 3
  resumed, _ = run(config, workdir=str(tmp_path / 'b'), loader=second_loader)
  for x, y in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed)):
    np.testing.assert_array_equal(x, y)
  assert first_loader.steps_seen[:3] + second_loader.steps_seen[:3] == straight_loader.steps_seen[:6]
  restored, cfg = ckpt_lib.restore_params(str(tmp_path / 'b'))
  assert cfg.model.hidden_size == 32
  for x, y in zip(jax.tree.leaves(straight), jax.tree.leaves(restored)):
    np.testing.assert_array_equal(x, y)


class PoisonedLoader(SyntheticLoader):
  """Makes the MLM weights NaN at the given steps, so loss and gradients are non-finite there."""

  def __init__(self, config, bad_steps):
    super().__init__(config)
    self.bad_steps = set(bad_steps)

  def host_batch(self, step):
    batch = super().host_batch(step)
    if step in self.bad_steps:
      batch['masked_lm_weights'] = batch['masked_lm_weights'] * np.nan
    return batch


@pytest.fixture(scope='module')
def clean_two_steps():
  """Parameters after the first 2 (clean) steps of the non-finite tests' config."""
  return run(config_for(num_train_steps=STEPS), stop_after=2)[0]


def test_nonfinite_step_is_skipped_and_counted(clean_two_steps):
  config = config_for(num_train_steps=STEPS)
  params, history = run(config, loader=PoisonedLoader(config, bad_steps=[2, 3]), stop_after=4)
  assert [h['step_ok'] for h in history] == [1.0, 1.0, 0.0, 0.0]
  assert history[-1]['skipped_steps'] == 2.0
  for x, y in zip(jax.tree.leaves(clean_two_steps), jax.tree.leaves(params)):  # skipped steps left params unchanged
    np.testing.assert_array_equal(x, y)


def test_consecutive_nonfinite_steps_stop_the_run(tmp_path, clean_two_steps):
  config = config_for(num_train_steps=STEPS, max_consecutive_nonfinite=3)
  with pytest.raises(FloatingPointError, match='3 consecutive steps'):
    run(config, workdir=str(tmp_path), loader=PoisonedLoader(config, bad_steps=range(2, STEPS)))
  restored, _ = ckpt_lib.restore_params(str(tmp_path))
  for x, y in zip(jax.tree.leaves(clean_two_steps), jax.tree.leaves(restored)):
    np.testing.assert_array_equal(x, y)


def test_output_bias_gradient_is_the_column_sum_of_the_cotangent():
  """`layers.add_bias` (the LM heads' output bias, gradient as a ones-row matmul) against numpy's column sum."""
  from common import layers
  rng = np.random.default_rng(0)
  x = rng.normal(size=(3, 5, 70)).astype(np.float32)
  bias = rng.normal(size=(70,)).astype(np.float32)
  weight = rng.normal(size=(3, 5, 70)).astype(np.float32)
  loss = lambda x, b: (layers.add_bias(x, b) ** 2 * weight).sum()
  dx, dbias = jax.grad(loss, argnums=(0, 1))(x, bias)
  cotangent = 2 * (x + bias) * weight
  np.testing.assert_allclose(np.asarray(layers.add_bias(x, bias)), x + bias, rtol=0, atol=0)
  np.testing.assert_allclose(np.asarray(dx), cotangent, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(np.asarray(dbias), cotangent.reshape(-1, 70).sum(0), rtol=1e-5, atol=1e-4)


def test_argmax_hits_equal_numpy_argmax_with_ties():
  """`layers.argmax_hits` (the objectives' accuracy) against numpy's argmax, which takes the first of tied maxima:
  rows with ties at, before and after the label, a label at the first and last index, jitted and eager; a row
  holding NaN is a miss."""
  from common import layers
  rng = np.random.default_rng(0)
  logits = rng.integers(-3, 3, size=(4, 50, 9)).astype(np.float32)   # few values: most rows hold ties
  labels = rng.integers(0, 9, size=(4, 50)).astype(np.int32)
  labels[0, :9] = np.arange(9)
  expected = (np.argmax(logits, -1) == labels).astype(np.float32)
  assert 0 < expected.mean() < 1 and (np.sort(logits, -1)[..., -1] == np.sort(logits, -1)[..., -2]).mean() > 0.3
  tied_label_missed = (logits[np.arange(4)[:, None], np.arange(50)[None], labels] == logits.max(-1)) & (expected == 0)
  assert tied_label_missed.any()   # a label tied for the max that is not the first of them counts as a miss
  np.testing.assert_array_equal(np.asarray(layers.argmax_hits(logits, labels)), expected)
  np.testing.assert_array_equal(np.asarray(jax.jit(layers.argmax_hits)(logits, labels)), expected)
  wide = rng.normal(size=(3, 32000)).astype(np.float32)
  hit = np.argmax(wide, -1).astype(np.int32)
  np.testing.assert_array_equal(np.asarray(layers.argmax_hits(wide, hit)), np.ones(3, np.float32))
  np.testing.assert_array_equal(np.asarray(layers.argmax_hits(wide, (hit + 1) % 32000)), np.zeros(3, np.float32))
  wide[1, 5] = np.nan   # a row holding NaN is a miss, whichever label
  np.testing.assert_array_equal(np.asarray(layers.argmax_hits(wide, hit)), [1, 0, 1])
  np.testing.assert_array_equal(np.asarray(layers.argmax_hits(wide, np.array([0, 5, 0], np.int32)))[1], 0)


def test_dropout_keep_mask_statistics():
  """`layers.keep_mask` (16 random bits per element): the drop rate, independence of the two halves of a random
  word, odd last dims, determinism in the key; and `Dropout` keeps the expectation."""
  from common import layers
  key = jax.random.PRNGKey(0)
  n = 1 << 20
  for rate in (0.1, 0.5):
    keep = np.asarray(layers.keep_mask(key, rate, (n // 1024, 1024)))
    se = np.sqrt(rate * (1 - rate) / n)
    assert abs((1 - keep.mean()) - rate) < 5 * se, (rate, keep.mean())
    pairs = keep.reshape(-1, 2)   # the two elements cut from one 32-bit word
    both = (~pairs[:, 0] & ~pairs[:, 1]).mean()
    assert abs(both - rate * rate) < 5 * np.sqrt(rate * rate / (n // 2)), (rate, both)
  odd = layers.keep_mask(key, 0.3, (5, 7, 3))
  assert odd.shape == (5, 7, 3) and odd.dtype == bool
  np.testing.assert_array_equal(odd, layers.keep_mask(key, 0.3, (5, 7, 3)))
  assert not np.array_equal(odd, layers.keep_mask(jax.random.PRNGKey(1), 0.3, (5, 7, 3)))
  x = np.ones((256, 1024), np.float32)
  out = layers.Dropout(0.1).apply({}, x, False, rngs={'dropout': key})
  assert abs(float(out.mean()) - 1.0) < 5 * np.sqrt(0.1 / 0.9 / x.size)
  np.testing.assert_array_equal(layers.Dropout(0.1).apply({}, x, True), x)


_AUTO_CACHE_SCRIPT = """
import sys, warnings, jax, numpy as np
from jax import monitoring
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
hits = []
monitoring.register_event_listener(lambda event, **kw: hits.append(event) if event.endswith('cache_hits') else None)
from tests.test_trainer import config_for, run
with warnings.catch_warnings(record=True) as caught:
  warnings.simplefilter('always')
  params, _ = run(config_for(num_train_steps=2, compilation_cache_dir=sys.argv[1]))
np.save(sys.argv[2], np.concatenate([np.ravel(x) for x in jax.tree.leaves(params)]))
print('DIR', jax.config.jax_compilation_cache_dir, jax.config.jax_compilation_cache_max_size)
print('HITS', len(hits), 'UNREADABLE', sum('compilation cache entry' in str(w.message) for w in caught))
"""


def test_compilation_cache_on_by_default_keyed_by_host_and_a_damaged_entry_is_compiled_again(tmp_path):
  """The default `compilation_cache_dir='auto'` keeps programs under `$XLNET_BERT_JAX_CACHE/jax/<host>` with a size
  bound; a second run (given that directory by name) loads them instead of compiling and trains bit for bit as the
  first (a process of its own each: the cache is process-wide); entries cut short (a crash while writing) are
  warned about and compiled again, the result unchanged; 'none' writes nothing; 'None' / 'OFF' / 'Auto' read as
  the lower-case words, a non-string is refused."""
  import subprocess
  import sys
  from common import compilation_cache
  env = {k: v for k, v in os.environ.items() if k != 'JAX_COMPILATION_CACHE_DIR'}   # as a user's shell has it

  def train(setting, name, root='home_cache'):
    out = subprocess.run([sys.executable, '-c', _AUTO_CACHE_SCRIPT, setting, str(tmp_path / name)],
                         env=dict(env, JAX_PLATFORMS='cpu', XLNET_BERT_JAX_CACHE=str(tmp_path / root)),
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), capture_output=True,
                         text=True, check=True).stdout
    words = out.split('DIR')[-1].split()
    return np.load(tmp_path / f'{name}.npy'), dict(dir=words[0], max_size=int(words[1]), hits=int(words[3]),
                                                    unreadable=int(words[5]))

  first, fill = train('auto', 'first')
  cache = tmp_path / 'home_cache' / 'jax' / compilation_cache.host_key()
  entries = sorted(cache.glob('*-cache'))
  assert fill == dict(dir=str(cache), max_size=compilation_cache.AUTO_MAX_BYTES, hits=0, unreadable=0)
  assert entries, sorted(cache.iterdir())
  again, hit = train(str(cache), 'again')   # a directory given: that one, unbounded (JAX's default)
  assert hit['dir'] == str(cache) and hit['max_size'] == -1
  assert hit['hits'] >= 2 and hit['unreadable'] == 0, hit   # at least the train step and the state's initialiser
  np.testing.assert_array_equal(again, first)
  for entry in entries:   # cut short, as a process killed while writing leaves them
    entry.write_bytes(entry.read_bytes()[:len(entry.read_bytes()) // 2])
  damaged, recompiled = train('auto', 'damaged')
  assert recompiled['unreadable'] == len(entries) and recompiled['hits'] == 0, recompiled
  np.testing.assert_array_equal(damaged, first)
  _, off = train('none', 'off', root='off_cache')
  assert off['dir'] == 'None' and not (tmp_path / 'off_cache').exists(), off
  before = jax.config.jax_compilation_cache_dir   # this worker's own directory (conftest)
  assert [compilation_cache.use(s) for s in ('None', ' OFF ', '', 'Auto')] == [before] * 4
  assert jax.config.jax_compilation_cache_dir == before
  with pytest.raises(ValueError, match='compilation_cache_dir'):
    compilation_cache.use(None)


@pytest.mark.parametrize('overrides, field', [
    (dict(global_batch_size=12), 'global_batch_size'),
    (dict(grad_accum_steps=3), 'global_batch_size'),
    (dict(num_train_steps=0), 'num_train_steps'),
])
def test_bad_config_refused_before_compute(overrides, field):
  config = tiny_config(**overrides)
  config.mesh.update(num_devices=0)  # all 8 devices
  with pytest.raises(ConfigError, match=f'config.{field}'):
    trainer.build_setup(config, make_objective(config))


def test_bad_mesh_refused():
  config = tiny_config()
  config.mesh.update(data=3, fsdp=1, tensor=1, num_devices=0)
  with pytest.raises(ConfigError, match='config.mesh'):
    trainer.build_setup(config, make_objective(config))


def test_mesh_on_a_device_subset():
  """`mesh.num_devices`: the run's mesh spans the process's first N devices, and everything sized by the mesh
  (validation, the fine-tuning batch split) counts those; 0 means all of them; anything else is refused."""
  config = tiny_config(global_batch_size=12)  # 12 rows: split 2 ways, not 8
  config.mesh.update(num_devices=2)
  setup = trainer.build_setup(config, make_objective(config))
  assert list(setup.mesh.devices.flat) == jax.devices()[:2] and dict(setup.mesh.shape)['data'] == 2
  assert finetune_loader.batch_shards(config) == 2
  config.mesh.update(num_devices=0)
  with pytest.raises(ConfigError, match='config.global_batch_size'):  # 12 rows on all 8 devices
    trainer.build_setup(config, make_objective(config))
  for bad in (9, -1):
    config.mesh.num_devices = bad
    with pytest.raises(ConfigError, match=f'config.mesh.num_devices: .* got {bad}'):
      trainer.build_setup(config, make_objective(config))


def test_batch_spec_splits_the_leading_axis_over_the_batch_axes():
  assert sharding.batch_spec(1) == jax.sharding.PartitionSpec(('data', 'fsdp'))
  assert sharding.batch_spec(3) == jax.sharding.PartitionSpec(('data', 'fsdp'), None, None)
  mesh = sharding.make_mesh(sharding.mesh_config(data=2, fsdp=2), devices=jax.devices()[:4])
  assert sharding.batch_sharding(mesh, 3).spec == sharding.batch_spec(3)


def test_remat_matches_and_bfloat16_keeps_float32_master_params(single_device_params):
  """Rematerialisation changes memory, not math; bf16 compute keeps float32 parameters and a close loss."""
  plain, plain_hist = single_device_params  # the same 3 steps, one device, neither remat nor bf16
  remat, _ = run(config_for(num_train_steps=3, remat=True))
  assert max_abs_diff(plain, remat) < 1e-6
  bf16, bf16_hist = run(config_for(num_train_steps=3, dtype='bfloat16'))
  assert all(x.dtype == np.float32 for x in jax.tree.leaves(bf16))
  assert abs(bf16_hist[0]['loss'] - plain_hist[0]['loss']) < 2e-2
  assert 0 < max_abs_diff(plain, bf16) < 1e-2


def test_eval_loss_perplexity_profile_goodput_and_tensorboard_config(tmp_path, capsys):
  """Every objective reports `loss` and `perplexity` under the same names; `profile_steps` writes a trace; a run
  ends with a goodput line and appends to goodput.jsonl; TensorBoard holds the config as text and hparams."""
  config = config_for(num_train_steps=4, num_eval_batches=2, profile_steps='2,3')
  workdir = str(tmp_path / 'run')
  loader = SyntheticLoader(config)
  _, history = trainer.train(config, make_objective(config), loader, loader, workdir=workdir)
  final = [h for h in history if 'eval/loss' in h][-1]
  assert abs(final['eval/perplexity'] - np.exp(final['eval/mlm_loss'])) < 1e-3 * final['eval/perplexity']
  assert abs(final['eval/loss'] - final['eval/mlm_loss'] - final['eval/nsp_loss']) < 1e-5
  assert all('perplexity' in h and 'total_loss' not in h for h in history if 'loss' in h)
  traces = [f for _, _, fs in os.walk(tmp_path / 'run' / 'profile') for f in fs if f.endswith('.xplane.pb')]
  assert traces, 'no profiler trace written'
  err = capsys.readouterr().err
  assert 'goodput ' in err and 'compile' in err
  records = [json.loads(line) for line in open(tmp_path / 'run' / 'goodput.jsonl')]
  assert len(records) == 1 and records[0]['steps'] == 4 and 0 < records[0]['productive_s'] <= records[0]['wall_s']
  events = b''.join(open(os.path.join(r, f), 'rb').read() for r, _, fs in os.walk(tmp_path / 'run' / 'tensorboard')
                    for f in fs)
  assert b'config' in events and b'hparams' in events and b'num_train_steps' in events
  with pytest.raises(ConfigError, match='config.profile_steps'):
    trainer.validate_trainer_config(tiny_config(profile_steps='3,1'), 8)


def test_cpu_peak_is_measured_once_per_process(monkeypatch):
  """A run of several seeds or tasks trains several times in one process: the matmul peak is measured once."""
  from common import metrics  # pylint: disable=import-outside-toplevel
  calls = []
  monkeypatch.setattr(metrics, '_MEASURED_PEAK', {})
  monkeypatch.setattr(metrics, 'measure_matmul_peak', lambda: calls.append(1) or 1.5e11)
  first, second = metrics.peak_flops_per_device(), metrics.peak_flops_per_device()
  assert first == second == (1.5e11, f'measured fp32 matmul ({jax.devices()[0].device_kind})')
  assert len(calls) == 1
  assert metrics.peak_flops_per_device(2e12) == (2e12, 'config') and len(calls) == 1


def test_tensorboard_output_without_importing_torch(tmp_path):
  """tensorboardX imports torch when it is installed (seconds of every run's start-up); the metric writer imports
  it without, still writes the event file, and `import torch` works afterwards. In a fresh interpreter."""
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  pytest.importorskip('torch')
  code = ('import os, sys\nfrom common import metrics\n'
          f'w = metrics.MetricWriter({str(tmp_path)!r}, enabled=True)\n'
          "w.write(1, {'loss': 2.5}); w.config({'lr': 0.1}, ['eval/loss']); w.close()\n"
          "assert 'torch' not in sys.modules, 'torch was imported'\n"
          "import torch\nprint(sorted(os.listdir(os.path.join(" + repr(str(tmp_path)) + ", 'tensorboard'))))\n")
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  result = subprocess.run([sys.executable, '-c', code], cwd=repo, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, JAX_PLATFORMS='cpu'), check=False)
  assert result.returncode == 0, result.stderr[-2000:]
  assert 'events.out.tfevents' in result.stdout
