"""XLNet pretraining step: our trainer against HF PyTorch `XLNetLMHeadModel` on the same batch, and against our
BERT step at equal dimensions, in one run.

  python -m benchmarks.xlnet_pretrain                        # default dims (4 layers, d_model 256, seq 128, batch 16)
  python -m benchmarks.xlnet_pretrain --quick                # fewer rounds, no BERT timing: about 2 minutes
  python -m benchmarks.xlnet_pretrain --json /tmp/xlnet.json # also write every number to a JSON file
  python -m benchmarks.xlnet_pretrain --profile              # + where our step's time goes (per-op trace)
  python -m benchmarks.xlnet_pretrain --one-core             # both sides on one pinned core (one thread each)

What is compared, on one CPU device (no fake devices):
  ours  the real trainer path: `trainer.build_setup` + the jitted step of `trainer.compile_train_step` with
        `xlnet_jax.objective`: the factorisation order, perm mask and target mapping sampled on device inside the
        step (`xlnet_jax.permutation`), two-stream relative attention over `mem_len + seq` keys with the memory
        carried from step to step in the train state, the query stream and the tied LM head at the `--predict`
        target positions, backward, AdamW with global-norm clipping and the non-finite guard, state donated,
        dropout on, float32;
  HF    `transformers.XLNetLMHeadModel` with the same dims (config from `xlnet_jax.export.config_to_hf`), train
        mode, `perm_mask` + `target_mapping` + `mems` (the previous step's, detached, as the original) +
        `labels` at the targets, `loss.backward()`, `clip_grad_norm_(1.0)`, `torch.optim.AdamW` (no decay on
        LayerNorm / biases, as ours), `torch.set_num_threads(cores)`. HF takes the masks as inputs: they are
        sampled with `xlnet_jax.permutation.sample_permutation` on the host before timing (a few different ones,
        cycled), so HF's time excludes what ours includes;
  BERT  our BERT step (`benchmarks.bert_pretrain.build_ours`) with the same layers / hidden / heads / FFN / vocab /
        seq / batch and `--predict` MLM predictions (+ NSP): its compiled FLOPs and memory are the reference for
        XLNet's overhead, and it is timed in the same rounds (unless `--quick` or `--no-bert-timing`).

Timing, peak and memory are measured as in `benchmarks.bert_pretrain` (whose helpers this script uses):
interleaved rounds (one step per side by default) with the order alternating, medians over rounds, the median of
per-round ratios and the ratio of the fastest rounds, process CPU time beside wall time (its min-max over rounds
shows threads fighting other processes: torch's OpenMP threads then burn CPU time waiting for each other), a
jitted fp32 square matmul as the peak for MFU (before and after the timed rounds, best kept),
`compiled.cost_analysis()` FLOPs and `compiled.memory_analysis()` bytes (arguments + outputs not aliased to an
argument + temporaries) of the executables that are timed. MFU is against the matmul FLOPs our step executes
(`flop_terms`, term by term; the same total as `xlnet_jax.model.flops_per_example`, what the trainer logs MFU with).
"""
from __future__ import annotations

import argparse
import collections
import math
import os
import statistics
import sys
import time
import types
from typing import Any

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('TRANSFORMERS_OFFLINE', '1')

import jax  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import bert_pretrain as bench  # noqa: E402
from common.config import ConfigError  # noqa: E402
from xlnet_jax import export as xlnet_export  # noqa: E402
from xlnet_jax import objective as xlnet_objective  # noqa: E402
from xlnet_jax import permutation  # noqa: E402
from xlnet_jax import pretrain_data  # noqa: E402

SEP_ID, CLS_ID = 4, 3   # the ids of <sep> and <cls> in XLNet's sentencepiece vocabulary (only their places matter)
HF_MASK_SETS = 4        # different (perm_mask, target_mapping) samples HF cycles through


# ----------------------------------------------------------------------------------------------------------------
# Arguments.
# ----------------------------------------------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog='python -m benchmarks.xlnet_pretrain', description=__doc__.split('\n')[0])
  p.add_argument('--layers', type=int, default=4, help='n_layer')
  p.add_argument('--hidden', type=int, default=256, help='d_model (d_head = hidden / heads)')
  p.add_argument('--heads', type=int, default=4, help='n_head')
  p.add_argument('--intermediate', type=int, default=1024, help='d_inner')
  p.add_argument('--vocab', type=int, default=32000)
  p.add_argument('--seq', type=int, default=128, help='seq_len')
  p.add_argument('--reuse', type=int, default=64, help='reuse_len (also the permutation block, perm_size)')
  p.add_argument('--mem', type=int, default=64, help='mem_len (>= reuse_len)')
  p.add_argument('--predict', type=int, default=20, help='num_predict (BERT: max_predictions_per_seq)')
  p.add_argument('--batch', type=int, default=16)
  p.add_argument('--steps', type=int, default=10, help='timed steps of each side')
  p.add_argument('--round', type=int, default=1, help='steps of one side per interleaved round')
  p.add_argument('--warmup', type=int, default=2, help='untimed steps of each side after compilation')
  p.add_argument('--quick', action='store_true', help='--steps 4 --round 1 --warmup 1 --no-bert-timing')
  p.add_argument('--dtype', default='float32', choices=('float32', 'bfloat16'), help='our compute dtype')
  p.add_argument('--threads', type=int, default=0, help='torch threads (0: the cores this process may use)')
  p.add_argument('--one-core', action='store_true',
                 help='pin the process to one core before JAX or torch start (as `taskset -c N`): one thread each, '
                      'XLA and torch alike; a comparison that load from other processes distorts less')
  p.add_argument('--no-hf', action='store_true', help='skip HF')
  p.add_argument('--no-bert', action='store_true', help='skip the BERT step (no FLOPs / memory comparison)')
  p.add_argument('--no-bert-timing', action='store_true', help='compile the BERT step for FLOPs / memory only')
  p.add_argument('--no-dropout', action='store_true',
                 help='diagnostic, not pretraining: dropout and dropatt 0 on both sides (what dropout costs)')
  p.add_argument('--profile', action='store_true', help='per-op trace of our XLNet step by source function')
  p.add_argument('--json', default='', metavar='OUT', help='write the numbers to this JSON file')
  args = p.parse_args(argv)
  if args.quick:
    args.steps, args.round, args.warmup, args.no_bert_timing = 4, 1, 1, True
  if args.one_core:  # before any JAX computation (the config check below starts the backend) or torch thread
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
  for name in ('layers', 'hidden', 'heads', 'intermediate', 'vocab', 'seq', 'reuse', 'predict', 'batch', 'steps',
               'round'):
    if getattr(args, name) <= 0:
      p.error(f'--{name} must be positive, got {getattr(args, name)}')
  if args.hidden % args.heads:
    p.error(f'--hidden {args.hidden} is not divisible by --heads {args.heads}')
  goal_rest = args.predict * (args.seq - args.reuse) // args.seq
  if args.predict - goal_rest > args.reuse or goal_rest > args.seq - args.reuse - 3:
    p.error(f'--predict {args.predict} targets do not fit in --seq {args.seq} / --reuse {args.reuse}')
  if not args.no_bert and args.predict > args.seq - 3:
    p.error(f'--predict {args.predict} does not fit in a BERT row of --seq {args.seq}')
  try:
    xlnet_config(args)
  except ConfigError as e:
    p.error(str(e))
  return args


# ----------------------------------------------------------------------------------------------------------------
# Configs and batch.
# ----------------------------------------------------------------------------------------------------------------

def xlnet_config(args: argparse.Namespace) -> ml_collections.ConfigDict:
  """The pretraining config (`xlnet_jax.configs.common.base_config`) with the benchmark's dims, validated and
  completed as `xlnet_jax.pretrain.run` does (`model.reuse_len` / `bi_data` follow the data section)."""
  from xlnet_jax import pretrain as xlnet_pretrain
  from xlnet_jax.configs.common import base_config
  config = base_config()
  config.model.update(vocab_size=args.vocab, d_model=args.hidden, n_layer=args.layers, n_head=args.heads,
                      d_head=args.hidden // args.heads, d_inner=args.intermediate, mem_len=args.mem,
                      ff_activation='gelu', untie_r=True)
  config.data.update(vocab_size=args.vocab, seq_len=args.seq, reuse_len=args.reuse, num_predict=args.predict,
                     bi_data=False)
  config.optim.update(weight_decay=0.01)  # as the base / large configs (BERT's default too)
  config.update(global_batch_size=args.batch, grad_accum_steps=1, num_train_steps=100_000, progress_bar=False)
  config.dtype = args.dtype
  config.remat = False
  if getattr(args, 'no_dropout', False):
    config.model.update(dropout=0.0, dropatt=0.0)
  xlnet_pretrain.validate_config(config, 1)
  config.model.reuse_len = config.data.reuse_len
  config.model.bi_data = config.data.bi_data
  return config


def bert_config(args: argparse.Namespace) -> ml_collections.ConfigDict:
  """Our BERT pretraining config at the same dims (`--predict` MLM predictions per row)."""
  config = bench.bert_config(types.SimpleNamespace(
      vocab=args.vocab, hidden=args.hidden, layers=args.layers, heads=args.heads, intermediate=args.intermediate,
      seq=args.seq, predictions=args.predict, batch=args.batch, dtype=args.dtype))
  if getattr(args, 'no_dropout', False):
    config.model.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
  return config


def make_batch(batch_size: int, seq_len: int, reuse_len: int, num_predict: int, vocab_size: int,
               seed: int = 0) -> dict:
  """Full rows `[reuse | A <sep> B <sep> <cls>]` as `xlnet_jax.pretrain_data.rows_to_batch` writes them (no
  padding), with exactly `num_predict` targets per row, split between the reuse part and the rest as the data
  pipeline splits its goals; targets are distinct random non-special positions."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(10, vocab_size, size=(batch_size, seq_len)).astype(np.int32)
  sep_a = reuse_len + (seq_len - reuse_len - 3) // 2
  ids[:, sep_a], ids[:, seq_len - 2], ids[:, seq_len - 1] = SEP_ID, SEP_ID, CLS_ID
  segment_ids = np.zeros((batch_size, seq_len), np.int32)
  segment_ids[:, sep_a + 1:] = 1
  segment_ids[:, -1] = 2
  is_special = np.zeros((batch_size, seq_len), bool)
  is_special[:, [sep_a, seq_len - 2, seq_len - 1]] = True
  goal_rest = num_predict * (seq_len - reuse_len) // seq_len
  reuse_part = np.arange(reuse_len)
  rest = np.setdiff1d(np.arange(reuse_len, seq_len), [sep_a, seq_len - 2, seq_len - 1])
  is_target = np.zeros((batch_size, seq_len), bool)
  for b in range(batch_size):
    is_target[b, rng.choice(reuse_part, num_predict - goal_rest, replace=False)] = True
    is_target[b, rng.choice(rest, goal_rest, replace=False)] = True
  return dict(input_ids=ids, segment_ids=segment_ids, input_mask=np.ones_like(ids), is_target=is_target,
              is_special=is_special, next_sentence_labels=rng.integers(0, 2, size=batch_size).astype(np.int32))


def host_permutations(config: ml_collections.ConfigDict, host_batch: dict, count: int) -> list[dict]:
  """`count` samples of our sampler on the host, as numpy: HF's `perm_mask`, `target_mapping` and labels."""
  data = config.data
  sample = jax.jit(lambda key: permutation.sample_permutation(
      key, host_batch['is_target'], host_batch['is_special'], num_predict=data.num_predict,
      perm_size=pretrain_data.effective_perm_size(data), reuse_len=data.reuse_len))
  out = []
  for i in range(count):
    perm = jax.device_get(sample(jax.random.PRNGKey(1000 + i)))
    labels = np.take_along_axis(host_batch['input_ids'], perm['target_index'], axis=1).astype(np.int64)
    labels[perm['target_weights'] == 0] = -100
    out.append(dict(perm_mask=np.array(perm['perm_mask'], np.float32),
                    target_mapping=np.array(perm['target_mapping'], np.float32), labels=labels))
  return out


# ----------------------------------------------------------------------------------------------------------------
# HF PyTorch: XLNetLMHeadModel + torch.optim.AdamW, memory carried between steps.
# ----------------------------------------------------------------------------------------------------------------

class HFStep:
  def __init__(self, config: ml_collections.ConfigDict, host_batch: dict, perms: list[dict], threads: int):
    import torch
    import transformers
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    cfg = config.model
    hf_config = transformers.XLNetConfig(**xlnet_export.config_to_hf(cfg))
    self.model = transformers.XLNetLMHeadModel(hf_config).float().train()
    long = lambda x: torch.from_numpy(np.asarray(x, np.int64))
    common = dict(input_ids=long(host_batch['input_ids']), token_type_ids=long(host_batch['segment_ids']),
                  attention_mask=torch.from_numpy(host_batch['input_mask'].astype(np.float32)))
    self.inputs = [dict(common, perm_mask=torch.from_numpy(p['perm_mask']),
                        target_mapping=torch.from_numpy(p['target_mapping']), labels=torch.from_numpy(p['labels']))
                   for p in perms]
    # Memory from the start, so every step has the same shapes (ours starts from zeros too); HF keeps it
    # sequence-first: [mem_len, batch, d_model] per layer.
    batch = host_batch['input_ids'].shape[0]
    self.mems = [torch.zeros(cfg.mem_len, batch, cfg.d_model) for _ in range(cfg.n_layer)] if cfg.mem_len else None
    named = list(self.model.named_parameters())
    no_decay = lambda n: 'layer_norm' in n or n.endswith('bias')
    optim_cfg = config.optim
    self.optimizer = torch.optim.AdamW(
        [{'params': [p for n, p in named if not no_decay(n)], 'weight_decay': optim_cfg.weight_decay},
         {'params': [p for n, p in named if no_decay(n)], 'weight_decay': 0.0}],
        lr=optim_cfg.learning_rate, betas=(optim_cfg.b1, optim_cfg.b2), eps=optim_cfg.eps)
    self.clip = optim_cfg.clip_grad_norm
    self.calls = 0

  def step(self):
    import torch
    inputs = self.inputs[self.calls % len(self.inputs)]
    self.calls += 1
    out = self.model(**inputs, mems=self.mems, use_mems=True)
    out.loss.backward()
    if self.clip > 0:
      torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
    self.optimizer.step()
    self.optimizer.zero_grad(set_to_none=True)
    self.mems = out.mems  # detached by the model (`cache_mem`)
    return out.loss

  def run(self, steps: int) -> None:
    for _ in range(steps):
      self.step()

  def counted_flops(self) -> float:
    """FLOPs of one step as torch's `FlopCounterMode` counts them (matmuls, einsums)."""
    from torch.utils.flop_counter import FlopCounterMode
    counter = FlopCounterMode(display=False)
    with counter:
      self.step()
    return float(counter.get_total_flops())

  def state_bytes(self) -> int:
    import torch
    return sum(p.numel() * p.element_size() for p in self.model.parameters()) + sum(
        t.numel() * t.element_size() for s in self.optimizer.state.values() for t in s.values() if torch.is_tensor(t))


# ----------------------------------------------------------------------------------------------------------------
# Analytic FLOPs, term by term: XLNet (as we compute it) against BERT at the same dims.
# ----------------------------------------------------------------------------------------------------------------

def flop_terms(xcfg: ml_collections.ConfigDict, bcfg: ml_collections.ConfigDict) -> list[tuple[str, float, float]]:
  """(term, XLNet FLOPs, BERT FLOPs) of one training step of the whole batch, matmuls only, as the compiled steps
  execute them: 2 FLOPs per multiply-add, backward = 2x forward (input and weight gradients), except where noted.

  The XLNet total is `xlnet_jax.model.flops_per_example` times the batch (no `bi_data` here), broken down:
  * the relative positional encoding is projected once per step, shared across the batch, and being a constant it
    needs no input gradient (forward + weight gradient only);
  * the last layer's content stream (its q / o projections, attention rows and FFN) feeds nothing: pretraining
    reads only the query stream after the last layer, and the memory is cut from each layer's input, so XLA
    removes it. Those rows are counted for `n_layer - 1` layers here.
  (The original's way of counting, the r projection per sequence and every layer's content stream, gives 1.29x
  this at the default dims.)
  """
  m, d = xcfg.model, xcfg.data
  b, length, mem, p = xcfg.global_batch_size, d.seq_len, m.mem_len, d.num_predict
  k_len = mem + length
  r_len = k_len + (length if m.attn_type == 'bi' else 1)
  dm, inner, ff, vocab, n = m.d_model, m.n_head * m.d_head, m.d_inner, m.vocab_size, m.n_layer
  h, bff, bp = bcfg.model.hidden_size, bcfg.model.intermediate_size, bcfg.data.max_predictions_per_seq
  nb = bcfg.model.num_hidden_layers
  nc = n - 1  # layers whose content-stream output is used
  train = 3.0 * 2.0
  rows = [  # (term, XLNet multiply-adds, BERT multiply-adds) of the forward pass, times `train`
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
  return [(name, train * x, train * y) for name, x, y in rows]


# ----------------------------------------------------------------------------------------------------------------
# Profile: per-op trace of our XLNet step attributed to source functions.
# ----------------------------------------------------------------------------------------------------------------

def op_category(info: dict) -> str:
  """Which part of the XLNet step an HLO op (forward or backward) belongs to: the innermost source frame that names
  a known part decides."""
  is_dot = 'dot_general' in info['op_name'] or info['opcode'] in ('dot', 'convolution')
  for file, function, _ in info['frames']:
    shared = bench.shared_op_category(file, function, is_dot)
    if shared:
      return shared
    if function == 'sample_permutation' or file == 'permutation.py':
      return 'permutation sampling (sort, masks, target mapping)'
    if function in ('rel_shift', 'rel_shift_rows'):
      return 'rel_shift (content) / rel_shift_rows gather (query)'
    if function in ('two_stream_masks', 'segment_mismatch', 'gather_rows', 'causal_mask'):
      return 'attention masks / segment mismatch'
    if function in ('relative_positional_encoding', 'sinusoid_encoding', 'relative_distances', 'repeat_halves'):
      return 'positional encoding'
    if function == 'cache_mem':
      return 'memory (cache_mem)'
    if function == 'relative_attention':
      return 'matmul: attention scores / context' if is_dot else 'attention softmax, bias adds, mask'
    if 'softmax_cross_entropy' in function or function == 'loss_fn':
      return 'LM loss (log-softmax, argmax, grad)'
    if function in ('DenseGeneral.__call__', 'HeadsToModel.__call__'):
      return 'matmul: dense layers (q/k/v/o/r, FFN)' if is_dot else 'dense bias add / bias grad / layout'
    if function == 'OutputBias.__call__':
      return 'LM head output bias + its grad'
    if function.startswith(('FeedForward', 'XLNetLayer', 'RelativeAttention')):
      return 'layer elementwise (GELU, residual, target weight)'
    if function.startswith(('XLNetModel', 'XLNetLMHeadModel')):
      return 'model glue (mask_emb, stacking, casts)'
  if is_dot:
    return 'matmul: dense layers (q/k/v/o/r, FFN)'
  return bench.sourceless_op_category(info)


def profile_ours(config, host_batch, objective, steps: int) -> dict:
  print('\n== Profile of our XLNet step ==', flush=True)
  traced = bench.build_ours(config, host_batch, name='traced', objective=objective,
                            compiler_options={'xla_cpu_enable_xprof_traceme': True})
  traced.run(2)
  op_times, wall = bench.trace_op_times(traced, steps)
  instructions = bench.hlo_instructions(traced.hlo())
  skip = {'while', 'conditional', 'call'}
  per_op = {n: s for n, s in op_times.items() if n in instructions and instructions[n]['opcode'] not in skip}
  total = sum(per_op.values())
  by_category: dict[str, float] = collections.defaultdict(float)
  for name, seconds in per_op.items():
    by_category[op_category(instructions[name])] += seconds
  print(f'traced step: {wall * 1e3:.0f} ms wall; ops sum to {total * 1e3:.0f} ms (op time / wall = '
        f'{total / wall:.2f})')
  print(f'{"category (forward + backward)":54s} {"ms/step":>9s} {"share":>7s}')
  for cat, seconds in sorted(by_category.items(), key=lambda kv: -kv[1]):
    print(f'{cat:54s} {seconds * 1e3:9.1f} {seconds / total:7.1%}')
  top = sorted(per_op.items(), key=lambda kv: -kv[1])[:15]
  print(f'\n{"top ops":60s} {"ms/step":>9s}  source')
  for name, seconds in top:
    info = instructions[name]
    where = next((f'{fn} ({f}:{ln})' for f, fn, ln in info['frames']), info['op_name'][-60:])
    print(f'{name[:60]:60s} {seconds * 1e3:9.1f}  {where}')
  return dict(traced_wall_s=wall, op_sum_s=total, categories_s=dict(by_category), top_ops_s=dict(top))


# ----------------------------------------------------------------------------------------------------------------
# Main.
# ----------------------------------------------------------------------------------------------------------------

def main(argv=None) -> dict:
  started = time.perf_counter()
  args = parse_args(argv)
  if 'xla_force_host_platform_device_count' in os.environ.get('XLA_FLAGS', ''):
    print('note: XLA_FLAGS asks for fake CPU devices; the benchmark uses the first device only', file=sys.stderr)
  threads = args.threads or bench.cores()
  config = xlnet_config(args)
  host_batch = make_batch(args.batch, args.seq, args.reuse, args.predict, args.vocab)
  tokens = args.batch * args.seq
  dims = dict(layers=args.layers, d_model=args.hidden, heads=args.heads, d_head=args.hidden // args.heads,
              d_inner=args.intermediate, vocab=args.vocab, seq=args.seq, reuse=args.reuse, mem=args.mem,
              predict=args.predict, batch=args.batch, dtype=args.dtype, dropout=config.model.dropout)
  out: dict[str, Any] = dict(dims=dims, cores=bench.cores(), torch_threads=threads, one_core=args.one_core,
                             device=str(jax.devices()[0]), jax_version=jax.__version__,
                             load_average_start=os.getloadavg())
  print(f'XLNet pretraining step, {args.layers} layers, d_model {args.hidden}, {args.heads} heads, d_inner '
        f'{args.intermediate}, vocab {args.vocab}, seq {args.seq}, reuse {args.reuse}, mem {args.mem}, '
        f'{args.predict} predictions/seq, batch {args.batch}, {args.dtype}; {bench.cores()} cores, torch threads '
        f'{threads}{" (pinned to one core)" if args.one_core else ""}; jax {jax.__version__}; load average '
        f'{os.getloadavg()[0]:.1f}', flush=True)

  # HF first (its masks come from our sampler on the host), so the process's peak RSS before it is close to the
  # current RSS and the delta is HF's own.
  hf = None
  if not args.no_hf:
    import torch
    import transformers
    perms = host_permutations(config, host_batch, HF_MASK_SETS)
    rss0 = bench.rss_bytes()
    hf = HFStep(config, host_batch, perms, threads)
    hf_flops_counted = hf.counted_flops()  # the first warm-up step
    hf.run(max(args.warmup - 1, 0))
    hf_rss_delta = bench.max_rss_bytes() - rss0
    out.update(torch_version=torch.__version__, transformers_version=transformers.__version__)

  peak_jax, peak_jax_cpu = bench.jax_matmul_peak()
  peak_torch = bench.torch_matmul_peak()[0] if hf is not None else float('nan')

  objective = xlnet_objective.make_objective(config)
  ours = bench.build_ours(config, host_batch, objective=objective)
  ours.run(1)
  ours.run(max(args.warmup - 1, 0))
  flops_xla = bench.compiled_flops(ours.compiled)
  memory = bench.compiled_memory(ours.compiled)
  state_bytes = bench.tree_bytes(ours.state)
  first_loss = (ours.first_metrics or {}).get('lm_loss', math.nan)

  bcfg = bert_config(args)
  terms = flop_terms(config, bcfg)
  flops_ours = sum(t[1] for t in terms)                         # matmul FLOPs our step executes
  flops_formula = objective.flops_per_example * args.batch      # what the trainer logs MFU with
  bert = None
  if not args.no_bert:
    bert = bench.build_ours(bcfg, bench.make_batch(args.batch, args.seq, args.predict, args.vocab), name='bert')
    if not args.no_bert_timing:
      bert.run(args.warmup)

  runners = {'ours': ours.run}
  if hf is not None:
    runners['hf'] = hf.run
  if bert is not None and not args.no_bert_timing:
    runners['bert'] = bert.run
  cpu: dict[str, list[float]] = {}
  times = bench.interleaved(runners, args.steps, args.round, cpu)
  again = bench.jax_matmul_peak()
  peak_jax, peak_jax_cpu = max(peak_jax, again[0]), max(peak_jax_cpu, again[1])
  if hf is not None:
    peak_torch = max(peak_torch, bench.torch_matmul_peak()[0])
  out['load_average_end'] = os.getloadavg()

  t_ours, cpu_ours = statistics.median(times['ours']), statistics.median(cpu['ours'])
  res: dict[str, Any] = dict(
      peak_flops_jax=peak_jax, peak_flops_per_cpu_s_jax=peak_jax_cpu, peak_flops_torch=peak_torch,
      ours=dict(step_s=t_ours, step_s_rounds=times['ours'], cpu_s=cpu_ours, cpu_s_rounds=cpu['ours'],
                tokens_per_s=tokens / t_ours, flops_executed=flops_ours, flops_formula=flops_formula,
                flops_xla=flops_xla, mfu=flops_ours / t_ours / peak_jax,
                mfu_formula_flops=flops_formula / t_ours / peak_jax, mfu_xla_flops=flops_xla / t_ours / peak_jax,
                mfu_cpu_time=flops_ours / cpu_ours / peak_jax_cpu, memory=memory, state_bytes=state_bytes,
                compile_s=ours.compile_s, first_step_lm_loss=first_loss),
      flop_terms=[dict(term=t[0], xlnet=t[1], bert=t[2]) for t in terms])
  if hf is not None:
    t_hf, cpu_hf = statistics.median(times['hf']), statistics.median(cpu['hf'])
    res['hf'] = dict(step_s=t_hf, step_s_rounds=times['hf'], cpu_s=cpu_hf, cpu_s_rounds=cpu['hf'],
                     tokens_per_s=tokens / t_hf, flops_counted=hf_flops_counted,
                     mfu_own_flops=hf_flops_counted / t_hf / peak_jax, mfu_useful=flops_ours / t_hf / peak_jax,
                     mfu_cpu_time=hf_flops_counted / cpu_hf / peak_jax_cpu, rss_delta_bytes=hf_rss_delta,
                     state_bytes=hf.state_bytes())
    res['ratio_tokens_per_s'] = bench.median_ratio(times['hf'], times['ours'])
    res['ratio_fastest_rounds'] = min(times['hf']) / min(times['ours'])
    res['ratio_cpu_time'] = bench.median_ratio(cpu['hf'], cpu['ours'])
  bert_flops = sum(t[2] for t in terms)
  res['flops_ratio_analytic'] = flops_ours / bert_flops
  if bert is not None:
    bert_memory = bench.compiled_memory(bert.compiled)
    res['bert'] = dict(flops_executed=bert_flops, flops_xla=bench.compiled_flops(bert.compiled), memory=bert_memory,
                       state_bytes=bench.tree_bytes(bert.state), compile_s=bert.compile_s)
    res['flops_ratio_xla'] = flops_xla / res['bert']['flops_xla']
    res['memory_ratio'] = memory['peak_bytes'] / bert_memory['peak_bytes']
    res['temp_ratio'] = memory.get('temp_size_in_bytes', 0) / max(bert_memory.get('temp_size_in_bytes', 0), 1)
    if 'bert' in times:
      t_bert, cpu_bert = statistics.median(times['bert']), statistics.median(cpu['bert'])
      res['bert'].update(step_s=t_bert, step_s_rounds=times['bert'], cpu_s=cpu_bert, cpu_s_rounds=cpu['bert'],
                         tokens_per_s=tokens / t_bert, mfu=bert_flops / t_bert / peak_jax,
                         mfu_cpu_time=bert_flops / cpu_bert / peak_jax_cpu)
      res['time_ratio_vs_bert'] = bench.median_ratio(times['ours'], times['bert'])
      res['time_ratio_vs_bert_fastest'] = min(times['ours']) / min(times['bert'])
      res['cpu_time_ratio_vs_bert'] = bench.median_ratio(cpu['ours'], cpu['bert'])
  out.update(res)

  # --- report ---------------------------------------------------------------------------------------------------
  mib = bench.fmt_bytes
  o, h, bt = res['ours'], res.get('hf'), res.get('bert')
  print(f'\nfp32 matmul peak: JAX {peak_jax / 1e9:.0f} GFLOP/s ({peak_jax_cpu / 1e9:.0f} GFLOP per CPU-second), '
        f'torch {peak_torch / 1e9:.0f} GFLOP/s (best of 2048^2 and 3072^2, before and after timing); MFU is '
        f'against JAX\'s')
  print(f'our XLNet step compiled in {ours.compile_s:.1f} s' +
        (f', BERT step in {bert.compile_s:.1f} s' if bert is not None else '') +
        f'; {len(times["ours"])} rounds of {args.round} steps each side; load average '
        f'{out["load_average_start"][0]:.1f} -> {out["load_average_end"][0]:.1f}\n')
  na = '-'
  timed_bert = bt is not None and 'step_s' in bt

  def cpu_range(name):  # median (min-max over rounds): a wide range means threads fighting other processes
    return f'{statistics.median(cpu[name]):.2f} ({min(cpu[name]):.1f}-{max(cpu[name]):.1f})'

  rows = [('', 'ours XLNet (JAX)', 'HF XLNet (PyTorch)', 'ours BERT (JAX)')]
  rows += [
      ('step time (median) ms', f'{o["step_s"] * 1e3:.0f}', f'{h["step_s"] * 1e3:.0f}' if h else na,
       f'{bt["step_s"] * 1e3:.0f}' if timed_bert else na),
      ('  fastest round ms', f'{min(times["ours"]) * 1e3:.0f}', f'{min(times["hf"]) * 1e3:.0f}' if h else na,
       f'{min(times["bert"]) * 1e3:.0f}' if timed_bert else na),
      ('  CPU time/step (all threads) s', cpu_range('ours'), cpu_range('hf') if h else na,
       cpu_range('bert') if timed_bert else na),
      ('tokens/s', f'{o["tokens_per_s"]:.0f}', f'{h["tokens_per_s"]:.0f}' if h else na,
       f'{bt["tokens_per_s"]:.0f}' if timed_bert else na),
      ('GFLOP/step, matmuls executed (analytic)', f'{flops_ours / 1e9:.1f}', na, f'{bert_flops / 1e9:.1f}'),
      ('GFLOP/step counted', f'{flops_xla / 1e9:.1f} (XLA)', f'{h["flops_counted"] / 1e9:.1f} (torch)' if h else na,
       f'{bt["flops_xla"] / 1e9:.1f} (XLA)' if bt else na),
      ('GFLOP/step, model formula', f'{flops_formula / 1e9:.1f}', na, f'{bert_flops / 1e9:.1f}'),
      ('MFU (executed matmul FLOPs)', f'{o["mfu"]:.1%}', na, f'{bt["mfu"]:.1%}' if timed_bert else na),
      ('MFU by CPU time (same FLOPs)', f'{o["mfu_cpu_time"]:.1%}', na,
       f'{bt["mfu_cpu_time"]:.1%}' if timed_bert else na),
      ('MFU (counted FLOPs: XLA / torch)', f'{o["mfu_xla_flops"]:.1%}', f'{h["mfu_own_flops"]:.1%}' if h else na,
       na),
      ('MFU (our executed FLOPs = useful work)', f'{o["mfu"]:.1%}', f'{h["mfu_useful"]:.1%}' if h else na, na),
      ('MFU (model formula, as the trainer logs)', f'{o["mfu_formula_flops"]:.1%}', na, na),
      ('memory', f'{mib(memory["peak_bytes"])} compiled', f'{mib(h["rss_delta_bytes"])} RSS delta' if h else na,
       f'{mib(bt["memory"]["peak_bytes"])} compiled' if bt else na),
      ('  temporaries', mib(memory.get('temp_size_in_bytes', 0)), na,
       mib(bt['memory'].get('temp_size_in_bytes', 0)) if bt else na),
      ('  params + optimizer (+ XLNet memory)', mib(state_bytes), mib(h['state_bytes']) if h else na,
       mib(bt['state_bytes']) if bt else na),
  ]
  width = max(len(r[0]) for r in rows) + 2
  for r in rows:
    print(f'{r[0]:{width}s}' + ''.join(f'{c:>24s}' for c in r[1:]))
  print(f'(first-step lm_loss of ours: {first_loss:.3f}; ln(vocab) = {math.log(args.vocab):.3f})')
  if h:
    print(f'\nours / HF tokens/s: {res["ratio_tokens_per_s"]:.2f}x (median over rounds of the per-round ratio); '
          f'fastest round against fastest round: {res["ratio_fastest_rounds"]:.2f}x; by CPU time: '
          f'{res["ratio_cpu_time"]:.2f}x. HF gets its perm_mask / target_mapping as inputs (sampled '
          f'outside the timed region); ours samples them inside its step.')
  if bt:
    print(f'\nXLNet / BERT at equal dims: FLOPs {res["flops_ratio_xla"]:.2f}x (XLA cost analysis), '
          f'{res["flops_ratio_analytic"]:.2f}x (executed matmuls, terms below); compiled memory '
          f'{res["memory_ratio"]:.2f}x (temporaries {res["temp_ratio"]:.2f}x)' +
          (f'; step time {res["time_ratio_vs_bert"]:.2f}x (fastest rounds {res["time_ratio_vs_bert_fastest"]:.2f}x, '
           f'CPU time {res["cpu_time_ratio_vs_bert"]:.2f}x)'
           if 'time_ratio_vs_bert' in res else ''))
  print(f'\n{"analytic GFLOP/step (training, matmuls)":48s} {"XLNet":>8s} {"BERT":>8s} {"extra":>8s}')
  for name, x, y in terms:
    print(f'{name:48s} {x / 1e9:8.2f} {y / 1e9:8.2f} {(x - y) / 1e9:+8.2f}')
  print(f'{"total":48s} {flops_ours / 1e9:8.2f} {bert_flops / 1e9:8.2f} {(flops_ours - bert_flops) / 1e9:+8.2f}')
  print(f'(`xlnet_jax.model.flops_per_example` x batch, what the trainer logs MFU with: {flops_formula / 1e9:.2f} '
        f'GFLOP/step)')
  if bt:
    print(f'memory_analysis() bytes, XLNet: {memory}\n                         BERT:  {bt["memory"]}')
  print(f'({time.perf_counter() - started:.0f} s so far)', flush=True)

  if args.profile:
    out['profile'] = profile_ours(config, host_batch, objective, max(args.steps // 2, 2))
  if args.json:
    import json
    with open(args.json, 'w') as f:
      json.dump(out, f, indent=2, default=float)
    print(f'\nwrote {args.json}')
  return out


if __name__ == '__main__':
  main()
