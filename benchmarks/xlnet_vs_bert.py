"""XLNet against our BERT step at equal dimensions: the analytic matmul FLOPs of both, term by term, and the
ratios of FLOPs, compiled memory and step time that `benchmarks.xlnet_pretrain` prints."""
from __future__ import annotations

import argparse

import ml_collections

from benchmarks import bert_pretrain
from benchmarks.harness import Run


def bert_config(args: argparse.Namespace) -> ml_collections.ConfigDict:
  """Our BERT pretraining config at the same dims (`--predict` MLM predictions per row)."""
  config = bert_pretrain.bert_config(argparse.Namespace(**vars(args), predictions=args.predict))
  if args.no_dropout:
    config.model.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
  return config


def flop_terms(xcfg: ml_collections.ConfigDict, bcfg: ml_collections.ConfigDict) -> list[tuple[str, float, float]]:
  """(term, XLNet FLOPs, BERT FLOPs) of one training step of the whole batch, matmuls only, as the compiled steps
  execute them: 2 FLOPs per multiply-add, backward = 2x forward, except where noted. The XLNet total is
  `xlnet_jax.model.flops_per_example` times the batch: the positional encoding is projected once per step (a
  constant: forward + weight gradient only), and the last layer's content stream, which nothing reads, is counted
  for `n_layer - 1` layers (XLA removes it)."""
  m, d = xcfg.model, xcfg.data
  b, length, mem, p = xcfg.global_batch_size, d.seq_len, m.mem_len, d.num_predict
  k_len = mem + length
  r_len = k_len + (length if m.attn_type == 'bi' else 1)
  dm, inner, ff, vocab, n = m.d_model, m.n_head * m.d_head, m.d_inner, m.vocab_size, m.n_layer
  h, bff, bp = bcfg.model.hidden_size, bcfg.model.intermediate_size, bcfg.data.max_predictions_per_seq
  nb, nc = bcfg.model.num_hidden_layers, n - 1  # nc: layers whose content-stream output is used
  rows = [  # (term, XLNet multiply-adds, BERT multiply-adds) of the forward pass, times 3 x 2 below
      ('Q + O projections (content rows)', nc * b * length * 2 * dm * inner, nb * b * length * 2 * h * h),
      ('K + V projections (XLNet: over mem + seq)', n * b * k_len * 2 * dm * inner, nb * b * length * 2 * h * h),
      ('r projection of the positional encoding', n * r_len * dm * inner * 2 / 3, 0),
      ('scores q.k + context p.v (content rows)', nc * b * length * 2 * k_len * inner,
       nb * b * length * 2 * length * h),
      ('position scores over r_len = mem + 2 seq', nc * b * length * r_len * inner, 0),
      ('segment term', (nc * length + n * p) * b * 2 * inner, 0),
      ('FFN (content rows)', nc * b * length * 2 * dm * ff, nb * b * length * 2 * h * bff),
      ('query stream at P rows (proj, attention, FFN)',
       n * b * p * (2 * dm * inner + 2 * k_len * inner + r_len * inner + 2 * dm * ff), 0),
      ('MLM transform (BERT) at P rows', 0, b * bp * h * h),
      ('tied vocab projection at P rows', b * p * dm * vocab, b * bp * h * bcfg.model.vocab_size),
      ('pooler + NSP (BERT)', 0, b * (h * h + 2 * h)),
  ]
  return [(name, 6.0 * x, 6.0 * y) for name, x, y in rows]


def compare_with_bert(run: Run, terms: list[tuple[str, float, float]]) -> dict:
  """XLNet / BERT ratios of FLOPs, compiled memory and (when both were timed) step time."""
  xlnet, bert = run.steps['ours'], run.steps['bert']
  memory, bert_memory = xlnet.memory(), bert.memory()
  out = dict(flops_ratio_analytic=sum(t[1] for t in terms) / sum(t[2] for t in terms),
             flops_ratio_xla=xlnet.flops_xla() / bert.flops_xla(),
             memory_ratio=memory['peak_bytes'] / bert_memory['peak_bytes'],
             temp_ratio=memory.get('temp_size_in_bytes', 0) / max(bert_memory.get('temp_size_in_bytes', 0), 1))
  line = (f'XLNet / BERT at equal dims: FLOPs {out["flops_ratio_xla"]:.2f}x (XLA cost analysis), '
          f'{out["flops_ratio_analytic"]:.2f}x (executed matmuls, terms below); compiled memory '
          f'{out["memory_ratio"]:.2f}x (temporaries {out["temp_ratio"]:.2f}x)')
  if run.timed('bert'):
    speed = run.speedup('bert', 'ours')  # how much faster BERT is = XLNet's step time over BERT's
    out.update(time_ratio_vs_bert=speed['median'], time_ratio_vs_bert_fastest=speed['fastest'],
               cpu_time_ratio_vs_bert=speed['cpu_time'])
    line += (f'; step time {speed["median"]:.2f}x (fastest rounds {speed["fastest"]:.2f}x, CPU time '
             f'{speed["cpu_time"]:.2f}x)')
  print(f'\n{line}')
  return out


def print_terms(terms: list[tuple[str, float, float]], flops_formula: float) -> None:
  """The term table (GFLOP per step) and the total the trainer's MFU uses."""
  xlnet, bert = sum(t[1] for t in terms), sum(t[2] for t in terms)
  print(f'\n{"analytic GFLOP/step (training, matmuls)":48s} {"XLNet":>8s} {"BERT":>8s} {"extra":>8s}')
  for name, x, y in terms + [('total', xlnet, bert)]:
    print(f'{name:48s} {x / 1e9:8.2f} {y / 1e9:8.2f} {(x - y) / 1e9:+8.2f}')
  print(f'(`xlnet_jax.model.flops_per_example` x batch, what the trainer logs MFU with: {flops_formula / 1e9:.2f} '
        f'GFLOP/step)')
