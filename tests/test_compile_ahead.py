"""Programs compiled ahead on a thread (`common.compile_ahead`) are the ones the run later calls: after
`finetune_head.compile_predict` and `checksums.compile_for`, predicting and checksumming compile nothing more, and
give what they give without them. Counted with JAX's own compilation events (`jax.monitoring`). And what a run does
around those threads, in order: the MFU peak timed before any of them starts, the starting parameters made after
the train step's has started."""
import contextlib
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from jax import monitoring
from jax.sharding import NamedSharding, PartitionSpec as P

from bert_jax import export as bert_export, heads, model as bert_model
from common import checksums, compile_ahead, finetune_head, sharding

BACKEND_COMPILE = '/jax/core/compile/backend_compile_duration'


COMPILE_EVENTS = ('/jax/core/compile/jaxpr_trace_duration', '/jax/core/compile/jaxpr_to_mlir_module_duration',
                  BACKEND_COMPILE)


@contextlib.contextmanager
def recorded_compilations(events=(BACKEND_COMPILE,), fun_part: str = ''):
  """Yields a list that gets (event's last path part, thread name) for each of `events` (tracing, lowering, XLA
  compilation) inside the block, on any thread, of a function whose name contains `fun_part`."""
  seen, active = [], [True]

  def listen(event, duration, *args, fun_name='', **kwargs):
    del duration, args, kwargs
    if event in events and active[0] and fun_part in fun_name:
      seen.append((event.rsplit('/', 1)[-1], threading.current_thread().name))
  monitoring.register_event_duration_secs_listener(listen)
  try:
    yield seen
  finally:
    active[0] = False  # listeners cannot be removed one by one; this one goes quiet


def _recorded_ahead_starts(monkeypatch) -> list:
  """A list that gets 'ahead <name>' each time a `compile_ahead.Ahead` starts."""
  events = []
  started = compile_ahead.Ahead.__init__
  def recorded_start(self, name, work):
    events.append(f'ahead {name}')
    started(self, name, work)
  monkeypatch.setattr(compile_ahead.Ahead, '__init__', recorded_start)
  return events


def _features(n, seq, rng):
  lengths = rng.integers(2, seq + 1, size=n)
  mask = (np.arange(seq)[None] < lengths[:, None]).astype(np.int32)
  return dict(input_ids=(rng.integers(5, 50, size=(n, seq)) * mask).astype(np.int32),
              segment_ids=np.zeros((n, seq), np.int32), input_mask=mask, label=rng.integers(0, 3, n).astype(np.int32))


def test_predictions_compiled_ahead_are_the_ones_called():
  cfg = bert_model.model_config(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=32, max_position_embeddings=32)
  head = heads.make_head(cfg, 'classification', 3)
  features = _features(37, 24, np.random.default_rng(0))
  init = lambda r: nn.meta.unbox(head.init({'params': r}, features['input_ids'][:1], features['segment_ids'][:1],
                                           features['input_mask'][:1]))['params']
  params = jax.jit(init)(jax.random.PRNGKey(1))
  options = dict(kind='classification', buckets=[8, 16, 24], min_bucket_batches=0)
  expected = finetune_head.predict(head, params, features, 8, fn=finetune_head.predict_function(head), **options)

  fn = finetune_head.predict_function(head)
  ahead = compile_ahead.Ahead('predictions', lambda: finetune_head.compile_predict(
      fn, jax.eval_shape(init, jax.random.PRNGKey(0)), features, 8, **options))
  ahead.wait()
  assert ahead.error is None, ahead.error
  with recorded_compilations() as compiled:
    got = finetune_head.predict(head, jax.device_get(params), features, 8, fn=fn, **options)
  assert compiled == [], f'{len(compiled)} programs compiled again'
  np.testing.assert_array_equal(got, expected)


def test_checksums_compiled_ahead_are_the_ones_called():
  """On one device and sharded over a 2 x 4 mesh (one program over every leaf), leaves of several shapes."""
  mesh = sharding.make_mesh(sharding.mesh_config(data=2, fsdp=4))
  tree = {'a': np.arange(24 * 8, dtype=np.float32).reshape(24, 8), 'b': np.ones(8, np.float32) * 3,
          'c': np.arange(16, dtype=np.int32), 'step': np.int32(7)}
  expected = checksums.state_checksums(tree)
  layouts = {'one device': lambda x: jax.device_put(x, jax.devices()[0]),
             'sharded': lambda x: jax.device_put(x, NamedSharding(mesh, P('fsdp') if np.ndim(x) else P()))}
  for name, place in layouts.items():
    placed = {k: place(v) for k, v in tree.items()}
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), placed)
    ahead = compile_ahead.Ahead('checksums', lambda a=abstract: checksums.compile_for(a))
    ahead.wait()
    assert ahead.error is None, (name, ahead.error)
    with recorded_compilations() as compiled:
      got = checksums.state_checksums(placed)
    assert compiled == [], f'{name}: {len(compiled)} programs compiled again'
    assert got == expected, name


def test_a_failure_ahead_is_kept_and_does_not_raise():
  def broken():
    raise ValueError('no such shape')
  ahead = compile_ahead.Ahead('broken', broken)
  compile_ahead.wait(ahead)
  compile_ahead.wait(None)
  assert isinstance(ahead.error, ValueError)
  assert jnp.asarray(1) + 1 == 2  # the process carries on


def test_train_step_compiled_ahead_is_the_one_the_run_calls(tmp_path):
  """`trainer.train` compiles its step on a thread while the state is created, for the batch of the step it starts
  at: the step's XLA compilation happens once, on that thread, in a fresh run and in a resumed one (the newest
  checkpoint's batch), and the run is the one it was without compiling ahead (same final state)."""
  from bert_jax.objective import make_objective
  from common import trainer
  from tests.synthetic import SyntheticLoader, tiny_config

  def train(config, workdir=None, **kwargs):
    config.peak_flops_per_device = 1e12
    with recorded_compilations(fun_part='train_step') as compiled:
      state, _ = trainer.train(config, make_objective(config), SyntheticLoader(config), workdir=workdir, **kwargs)
    return jax.device_get(state), [thread for _, thread in compiled]

  config = tiny_config(num_train_steps=4, checkpoint_every=2, num_eval_batches=0)
  workdir = str(tmp_path / 'run')
  _, compiled = train(config, workdir, stop_after=2)
  assert compiled == ['compile-ahead-train step'], compiled  # once, on the thread
  resumed, compiled = train(tiny_config(num_train_steps=4, checkpoint_every=2), workdir)
  assert int(resumed.step) == 4 and compiled == ['compile-ahead-train step'], compiled

  original = trainer._compile_step_ahead  # pylint: disable=protected-access
  try:
    trainer._compile_step_ahead = lambda *args: None  # pylint: disable=protected-access
    straight, compiled = train(tiny_config(num_train_steps=4))
  finally:
    trainer._compile_step_ahead = original  # pylint: disable=protected-access
  assert compiled == ['MainThread'], compiled
  for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(straight)):
    np.testing.assert_array_equal(a, b)


def test_seeds_of_one_objective_share_the_compiled_train_step():
  """A second `train()` with the same objective and config but its seed traces and compiles no train step, and
  trains as a run of that seed alone does (bit for bit); another config field compiles a new one."""
  from bert_jax.objective import make_objective
  from common import trainer
  from tests.synthetic import SyntheticLoader, tiny_config

  with recorded_compilations(COMPILE_EVENTS, fun_part='train_step') as events:
    config = tiny_config(num_train_steps=3, peak_flops_per_device=1e12)
    objective = make_objective(config)
    trainer.train(config, objective, SyntheticLoader(config))
    assert ('backend_compile_duration', 'compile-ahead-train step') in events, events
    events.clear()
    second, _ = trainer.train(tiny_config(num_train_steps=3, peak_flops_per_device=1e12, seed=4), objective,
                              SyntheticLoader(config))
    assert events == [], events  # nothing traced, lowered or compiled for the train step
    other = tiny_config(num_train_steps=4, peak_flops_per_device=1e12, seed=4)
    trainer.train(other, objective, SyntheticLoader(other), stop_after=1)
    assert any(e == 'backend_compile_duration' for e, _ in events), events  # another schedule: a new program
  alone_config = tiny_config(num_train_steps=3, peak_flops_per_device=1e12, seed=4)
  alone, _ = trainer.train(alone_config, make_objective(alone_config), SyntheticLoader(alone_config))
  for a, b in zip(jax.tree.leaves(jax.device_get(second)), jax.tree.leaves(jax.device_get(alone))):
    np.testing.assert_array_equal(a, b)


def test_fine_tuning_times_the_peak_before_anything_compiles_ahead(tmp_path, monkeypatch):
  """The MFU denominator (a matmul timed on this host, once per process) is measured before any program compiles on
  a thread: timed while the prediction programs compiled it read up to ~1.7x low, and fine-tuning logged MFUs of
  0.78 to 0.85 where a quiet measurement gives ~0.5."""
  from bert_jax import finetune as bert_finetune
  from bert_jax import tokenizer as bert_tokenizer
  from common import finetune, metrics

  events = _recorded_ahead_starts(monkeypatch)
  def timed_peak(*args, **kwargs):
    del args, kwargs
    events.append('peak')
    return 1e12
  monkeypatch.setattr(metrics, 'measure_matmul_peak', timed_peak)
  monkeypatch.setattr(metrics, '_MEASURED_PEAK', {})
  made = finetune._grafted_params  # pylint: disable=protected-access
  def recorded_graft(*args):
    events.append('initial params')
    return made(*args)
  monkeypatch.setattr(finetune, '_grafted_params', recorded_graft)

  vocab = bert_tokenizer.write_vocab(list(bert_tokenizer.SPECIAL_TOKENS) + ['pineapple'], str(tmp_path / 'vocab.txt'))
  model_cfg = bert_model.model_config(vocab_size=len(bert_tokenizer.read_vocab(vocab)), hidden_size=16,
                                      num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                                      max_position_embeddings=32)
  config = finetune.finetune_config(global_batch_size=8, max_seq_length=16, eval_batch_size=8, epochs=1.0,
                                    num_train_examples=16, num_eval_examples=8, learnable_max_words=12,
                                    async_checkpoint=False, length_buckets=1, log_every=100)
  config.mesh.update(num_devices=1)
  assert config.peak_flops_per_device == 0.0  # the default: measured
  encoder = bert_export.init_params(model_cfg, jax.random.PRNGKey(0))['bert']
  tokenizer = bert_tokenizer.load_tokenizer(vocab)
  with pytest.raises(ValueError, match="pretrained 'bert' parameters do not match"):
    finetune.run_task(config, bert_finetune.ADAPTER, 'learnable', tokenizer, model_cfg,
                      {k: v for k, v in encoder.items() if k != 'pooler'}, None)
  assert events == [], events  # refused before anything is measured or compiled
  result = finetune.run_task(config, bert_finetune.ADAPTER, 'learnable', tokenizer, model_cfg, encoder, None)
  assert result['runs'][0]['steps'] == 2
  assert events[0] == 'peak' and events.count('peak') == 1, events
  assert {'ahead predictions', 'ahead train step'} <= set(events), events
  # The head's init and the graft run while the train step compiles on its thread.
  assert events.count('initial params') == 1, events
  assert events.index('ahead train step') < events.index('initial params'), events


def test_initial_params_as_a_function_are_made_while_the_step_compiles_and_not_on_resume(tmp_path, monkeypatch):
  """`train(initial_params=fn)` calls `fn` after the train step has started compiling on its thread, trains from what
  it returns as from the tree itself (same state, bit for bit), and does not call it when the run resumes."""
  from bert_jax.objective import make_objective
  from common import trainer
  from tests.synthetic import SyntheticLoader, tiny_config

  events = _recorded_ahead_starts(monkeypatch)
  config = tiny_config(num_train_steps=2, checkpoint_every=1, peak_flops_per_device=1e12)
  objective = make_objective(config)
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda a: (0.05 * rng.standard_normal(a.shape)).astype(a.dtype),
                        trainer.build_setup(config, objective).abstract_state.params)

  def made():
    events.append('initial params')
    return params
  workdir = str(tmp_path / 'run')
  state, _ = trainer.train(config, objective, SyntheticLoader(config), workdir=workdir, stop_after=1,
                           initial_params=made)
  assert events.count('initial params') == 1, events
  assert events.index('ahead train step') < events.index('initial params'), events
  given, _ = trainer.train(config, objective, SyntheticLoader(config), stop_after=1, initial_params=params)
  for a, b in zip(jax.tree.leaves(jax.device_get(state)), jax.tree.leaves(jax.device_get(given))):
    np.testing.assert_array_equal(a, b)

  def refused():
    raise AssertionError('initial_params called by a resumed run')
  resumed, _ = trainer.train(config, objective, SyntheticLoader(config), workdir=workdir, initial_params=refused)
  assert int(jax.device_get(resumed.step)) == 2

