"""The benchmark harness: interleaved rounds, HLO source attribution, and a BERT benchmark end to end at tiny dims
(ours only: no torch, a fixed matmul peak)."""
import json

import jax
import jax.numpy as jnp
import pytest

from benchmarks import harness  # noqa: F401  (sets JAX's defaults before the imports below use JAX)
from benchmarks.harness import machine, profile, timing

TINY_BERT = ['--layers', '1', '--hidden', '32', '--heads', '2', '--intermediate', '64', '--vocab', '128', '--seq',
             '16', '--batch', '2', '--predictions', '3', '--steps', '2', '--round', '1', '--warmup', '1', '--no-hf']


def test_interleaved_alternates_order_and_times_every_round():
  calls = []
  runners = {name: (lambda k, name=name: calls.append((name, k))) for name in ('a', 'b')}
  cpu = {}
  times = timing.interleaved(runners, steps=6, per_round=2, cpu=cpu)
  assert calls == [('a', 2), ('b', 2), ('b', 2), ('a', 2), ('a', 2), ('b', 2)]
  assert [len(times[n]) for n in 'ab'] == [3, 3] and [len(cpu[n]) for n in 'ab'] == [3, 3]
  assert timing.median_ratio([2.0, 4.0, 9.0], [1.0, 1.0, 3.0]) == 3.0


def scaled_tanh(x):
  return jnp.tanh(x @ x) * 3.0


def test_ops_are_attributed_to_their_source_function():
  x = jnp.ones((8, 8), jnp.float32)
  hlo = jax.jit(scaled_tanh).lower(x).compile().as_text()
  instructions = profile.hlo_instructions(hlo)
  rules = ((('scaled_tanh',), 'the matmul', 'the rest'),)
  categories = {profile.op_category(info, rules, 'other matmul') for info in instructions.values()
                if any(fn == 'scaled_tanh' for _, fn, _ in info['frames'])}
  assert 'the matmul' in categories or 'the rest' in categories
  dot = {'opcode': 'dot', 'op_name': 'jit(f)/dot_general', 'frames': [('model.py', 'Dense.__call__', 3)]}
  assert profile.op_category(dot, (), 'dense matmul') == 'dense matmul'
  dropout = dict(dot, opcode='fusion', op_name='', frames=[('linear.py', 'Dropout.__call__', 9)])
  assert profile.op_category(dropout, (), 'dense matmul').startswith('dropout')


def test_bert_benchmark_runs_the_real_step(tmp_path, monkeypatch, capsys):
  monkeypatch.setattr(machine, 'jax_matmul_peak', lambda: (1e9, 1e9))
  from benchmarks import bert_pretrain  # pylint: disable=import-outside-toplevel
  out = bert_pretrain.main(TINY_BERT + ['--json', str(tmp_path / 'out.json')])
  printed = capsys.readouterr().out
  assert 'step time (median) ms' in printed and 'MFU (analytic FLOPs)' in printed
  ours = json.loads((tmp_path / 'out.json').read_text())['ours']
  assert ours['flops_analytic'] == pytest.approx(out['ours']['flops_analytic'])
  assert 0 < ours['flops_analytic'] <= ours['flops_xla']  # XLA also counts elementwise work and AdamW
  assert ours['memory']['peak_bytes'] >= ours['state_bytes'] > 0
  assert len(ours['step_s_rounds']) == 2


def test_a_bad_flag_is_a_one_line_usage_error(capsys):
  from benchmarks import bert_pretrain  # pylint: disable=import-outside-toplevel
  with pytest.raises(SystemExit):
    bert_pretrain.parse_args(['--hidden', '30', '--heads', '4'])
  assert '--hidden 30 is not divisible by --heads 4' in capsys.readouterr().err


def test_accelerator_benchmark_runs_its_steps_at_tiny_dims(tmp_path, capsys):
  """`benchmarks.accelerator` end to end on the CPU (`--tiny`, ours only): the fused BERT step really runs the
  fused route, the attention check compares it with float32, and every number lands in the JSON."""
  from benchmarks import accelerator  # pylint: disable=import-outside-toplevel
  path = tmp_path / 'acc.json'
  accelerator.main(['--tiny', '--no-hf', '--only', 'bert:bfloat16:fused', '--json', str(path)])
  out = json.loads(path.read_text())
  row = out['bert_bfloat16_fused_attention_attention_dropout_0']
  assert row['attention_impl'] == 'fused' and row['dtype'] == 'bfloat16' and len(row['round_ms']) == 2
  assert row['step_ms'] > 0 and 0 < row['mfu'] and row['model_gflop_per_step'] > 0
  assert row['first_metrics']['loss'] == pytest.approx(7.6, abs=0.5)  # ln(1000) + ln(2) at initialisation
  check = out['attention_check']
  assert check['fused']['output_rel_err'] < 1e-2 and check['fused']['grad_rel_err'] < 1e-2  # bfloat16 vs float32
  assert check['fused']['cudnn_calls'] == {}  # the CPU: XLA's kernel
  assert 'bert bfloat16 fused attention' in capsys.readouterr().out.splitlines()[-2]
  with pytest.raises(SystemExit):
    accelerator.parse_args(['--only', 'bert:float16'])
  assert "--only: unknown ['bert:float16']" in capsys.readouterr().err
