"""Long sequences: compiled memory and step time of the REAL training step with `attention_impl` 'materialized'
against 'chunked', as the sequence grows.

  python -m benchmarks.long_sequence                                  # XLNet and BERT, seq 512 to 4096
  python -m benchmarks.long_sequence --models xlnet --seqs 512,1024 --steps 2
  python -m benchmarks.long_sequence --max-materialized 2048          # skip the materialised steps above 2048

What is measured, on one CPU device, per model, sequence length and implementation: the step of
`benchmarks.harness.build_jax_step` (`trainer.compile_train_step` with the recipe's objective: AdamW, clipping,
the non-finite guard, dropout on, state donated) compiled ahead of time; `memory_analysis()` temporaries and peak
(arguments + outputs + temporaries); the median wall time of `--steps` steps after one warm-up step, the two
implementations of one length timed in alternation. XLNet: `mem_len = seq` (keys over 2 x seq positions),
`reuse_len = seq / 2`, seq / 6 predictions, 'bi' attention, batch 1. BERT: `max_position_embeddings = seq`, seq / 7
MLM predictions + NSP, full rows. Small dims (2 layers, 256 wide, 4 heads, FFN 1024) so that it runs on a CPU.
The ratios compare the two implementations compiled and run in the same process.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

from benchmarks import harness  # first: it sets JAX's platform before JAX starts
from benchmarks import bert_pretrain, xlnet_pretrain

import jax

IMPLS = ('materialized', 'chunked')


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog='python -m benchmarks.long_sequence', description=__doc__.split('\n')[0])
  p.add_argument('--models', default='xlnet,bert', help='comma-separated: xlnet, bert')
  p.add_argument('--seqs', default='512,1024,2048,4096', help='comma-separated sequence lengths')
  p.add_argument('--max-materialized', type=int, default=4096,
                 help='skip the materialised step above this length (its memory grows with the square)')
  p.add_argument('--block', type=int, default=512, help='attention_block of the chunked step')
  p.add_argument('--steps', type=int, default=3, help='timed steps per implementation (after one warm-up)')
  for flag, default in (('layers', 2), ('hidden', 256), ('heads', 4), ('intermediate', 1024), ('vocab', 32000),
                        ('batch', 1)):
    p.add_argument(f'--{flag}', type=int, default=default)
  args = p.parse_args(argv)
  args.models = [m for m in args.models.split(',') if m]
  args.seqs = [int(s) for s in args.seqs.split(',') if s]
  if not set(args.models) <= {'xlnet', 'bert'}:
    p.error(f'--models: xlnet and/or bert, got {args.models}')
  if any(s < 64 or s % 16 for s in args.seqs):
    p.error(f'--seqs: multiples of 16, at least 64, got {args.seqs}')
  if min(args.steps, args.block, args.layers, args.hidden, args.heads, args.batch) <= 0:
    p.error('--steps, --block and the dims must be positive')
  return args


def _namespace(args, seq: int) -> argparse.Namespace:
  return argparse.Namespace(layers=args.layers, hidden=args.hidden, heads=args.heads, intermediate=args.intermediate,
                            vocab=args.vocab, batch=args.batch, seq=seq, dtype='float32', no_dropout=False)


def build(model: str, impl: str, seq: int, args) -> harness.JaxStep:
  """The real step of `model` at length `seq` with `attention_impl = impl`."""
  ns = _namespace(args, seq)
  if model == 'xlnet':
    ns.reuse, ns.mem, ns.predict = seq // 2, seq, seq // 6
    config = xlnet_pretrain.xlnet_config(ns)
    batch = xlnet_pretrain.make_batch(args.batch, seq, ns.reuse, ns.predict, args.vocab)
  else:
    ns.predictions = seq // 7
    config = bert_pretrain.bert_config(ns)
    config.model.max_position_embeddings = seq
    batch = bert_pretrain.make_batch(args.batch, seq, ns.predictions, args.vocab)
  config.model.update(attention_impl=impl, attention_block=args.block)
  recipe = harness.pretraining_recipe(model, config)
  return harness.build_jax_step(config, recipe.make_objective(config), batch, name=f'{model}-{impl}-{seq}')


def _first_loss(step: harness.JaxStep) -> float | None:
  metrics = step.first_metrics or {}
  return metrics.get('lm_loss', metrics.get('loss'))


def measure(model: str, seq: int, args) -> list[dict]:
  """Both implementations at one length: memory, compile time, step times timed in alternation."""
  steps = {}
  for impl in IMPLS:
    if impl == 'materialized' and seq > args.max_materialized:
      continue
    steps[impl] = build(model, impl, seq, args)
    steps[impl].run(1)  # warm-up (and the first step from the initial state)
  times = {impl: [] for impl in steps}
  for _ in range(args.steps):
    for impl, step in steps.items():
      started = time.perf_counter()
      step.run(1)
      times[impl].append(time.perf_counter() - started)
  rows = []
  for impl, step in steps.items():
    memory = step.memory()
    rows.append(dict(model=model, seq=seq, impl=impl, temp=memory.get('temp_size_in_bytes', 0),
                     peak=memory.get('peak_bytes', 0), compile_s=step.compile_s,
                     step_s=statistics.median(times[impl]), loss=_first_loss(step)))
  del steps
  return rows


def print_rows(rows: list[dict]) -> None:
  print(f'{"model":6} {"seq":>5} {"impl":13} {"temp MiB":>9} {"peak MiB":>9} {"step s":>7} {"compile s":>9} '
        f'{"temp / mat.":>11} {"time / mat.":>11} {"first loss":>10}')
  for r in rows:
    ref = next((x for x in rows if x['model'] == r['model'] and x['seq'] == r['seq']
                and x['impl'] == 'materialized'), None)
    temp_ratio = f'{r["temp"] / ref["temp"]:.3f}' if ref else '-'
    time_ratio = f'{r["step_s"] / ref["step_s"]:.2f}' if ref else '-'
    loss = f'{r["loss"]:.4f}' if r['loss'] is not None else '-'
    print(f'{r["model"]:6} {r["seq"]:>5} {r["impl"]:13} {r["temp"] / 2**20:>9.1f} {r["peak"] / 2**20:>9.1f} '
          f'{r["step_s"]:>7.2f} {r["compile_s"]:>9.1f} {temp_ratio:>11} {time_ratio:>11} {loss:>10}')


def main(argv=None) -> list[dict]:
  args = parse_args(argv)
  print(f'Long sequences: {args.layers} layers, hidden {args.hidden}, {args.heads} heads, FFN {args.intermediate}, '
        f'vocab {args.vocab}, batch {args.batch}, block {args.block}; {harness.cores()} cores; jax '
        f'{jax.__version__}; load average {os.getloadavg()[0]:.1f}', flush=True)
  rows = []
  for model in args.models:
    for seq in args.seqs:
      rows.extend(measure(model, seq, args))
      print(f'  {model} seq {seq} done; load average {os.getloadavg()[0]:.1f}', flush=True)
  print()
  print_rows(rows)
  print(f'\nload average at the end {os.getloadavg()[0]:.1f} {os.getloadavg()[1]:.1f} {os.getloadavg()[2]:.1f}')
  return rows


if __name__ == '__main__':
  main()
