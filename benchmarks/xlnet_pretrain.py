"""XLNet pretraining step: our trainer against HF PyTorch `XLNetLMHeadModel` on the same batch, and against our
BERT step at equal dimensions, in one run.

  python -m benchmarks.xlnet_pretrain                        # default dims (4 layers, d_model 256, seq 128, batch 16)
  python -m benchmarks.xlnet_pretrain --quick                # fewer rounds, no BERT timing: about 2 minutes
  python -m benchmarks.xlnet_pretrain --json /tmp/xlnet.json # also write every number to a JSON file
  python -m benchmarks.xlnet_pretrain --profile              # + where our step's time goes (per-op trace)
  python -m benchmarks.xlnet_pretrain --one-core             # both sides on one pinned core (one thread each)

What is compared, on one CPU device (no fake devices):
  ours  the real trainer path (`benchmarks.harness.build_jax_step`) with XLNet's objective: the factorisation
        order, perm mask and target mapping sampled on device inside the step, two-stream relative attention over
        `mem_len + seq` keys with the memory carried in the train state, the query stream and the tied LM head at
        the `--predict` targets, AdamW with clipping and the non-finite guard, state donated, dropout on;
  HF    `transformers.XLNetLMHeadModel` with the same dims (config from `xlnet_jax.export.config_to_hf`), train
        mode, `perm_mask` + `target_mapping` + `mems` (the previous step's) + `labels` at the targets, AdamW with
        the same decay mask, `clip_grad_norm_(1.0)`. Its masks are drawn with our own sampler on the host before
        timing (a few, cycled), so HF's time excludes what ours includes;
  BERT  our BERT step at the same layers / hidden / heads / FFN / vocab / seq / batch with `--predict` MLM
        predictions (+ NSP): the reference for XLNet's extra FLOPs and memory, timed in the same rounds unless
        `--quick` or `--no-bert-timing`.

Timing, peak, FLOPs and memory: `benchmarks.harness` (benchmarks/README.md). MFU is against the matmul FLOPs our
step executes (`xlnet_vs_bert.flop_terms`: the total of `xlnet_jax.model.flops_per_example`, which the trainer logs).
"""
from __future__ import annotations

import argparse
import math
import os
import time

from benchmarks import harness  # first: it sets JAX's platform before JAX starts
from benchmarks import bert_pretrain, xlnet_vs_bert
from benchmarks.harness import cli

import jax
import ml_collections
import numpy as np

from common.config import ConfigError
from xlnet_jax import export as xlnet_export
from xlnet_jax import permutation
from xlnet_jax import pretrain_data

SEP_ID, CLS_ID = 4, 3   # the ids of <sep> and <cls> in XLNet's sentencepiece vocabulary (only their places matter)
HF_MASK_SETS = 4        # different (perm_mask, target_mapping) samples HF cycles through

# Source functions of XLNet's step -> categories of the profile (after the harness's shared ones).
PROFILE_RULES = (
    (('sample_permutation', 'permutation.py'), 'permutation sampling (sort, masks, target mapping)', None),
    (('rel_shift', 'rel_shift_rows'), 'rel_shift (content) / rel_shift_rows gather (query)', None),
    (('two_stream_masks', 'segment_mismatch', 'gather_rows', 'causal_mask'), 'attention masks / segment mismatch',
     None),
    (('relative_positional_encoding', 'sinusoid_encoding', 'relative_distances', 'repeat_halves'),
     'positional encoding', None),
    (('cache_mem',), 'memory (cache_mem)', None),
    (('relative_attention',), 'matmul: attention scores / context', 'attention softmax, bias adds, mask'),
    (('*softmax_cross_entropy*', 'loss_fn'), 'LM loss (log-softmax, argmax, grad)', None),
    (('DenseGeneral.__call__', 'HeadsToModel.__call__'), 'matmul: dense layers (q/k/v/o/r, FFN)',
     'dense bias add / bias grad / layout'),
    (('OutputBias.__call__',), 'LM head output bias + its grad', None),
    (('FeedForward*', 'XLNetLayer*', 'RelativeAttention*'), 'layer elementwise (GELU, residual, target weight)', None),
    (('XLNetModel*', 'XLNetLMHeadModel*'), 'model glue (mask_emb, stacking, casts)', None),
)


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog='python -m benchmarks.xlnet_pretrain', description=__doc__.split('\n')[0])
  for flag, default, what in (('layers', 4, 'n_layer'), ('hidden', 256, 'd_model (d_head = hidden / heads)'),
                              ('heads', 4, 'n_head'), ('intermediate', 1024, 'd_inner'), ('vocab', 32000, ''),
                              ('seq', 128, 'seq_len'), ('reuse', 64, 'reuse_len (also the permutation block)'),
                              ('mem', 64, 'mem_len (>= reuse_len)'),
                              ('predict', 20, 'num_predict (BERT: max_predictions_per_seq)'), ('batch', 16, '')):
    p.add_argument(f'--{flag}', type=int, default=default, help=what or None)
  cli.add_run_flags(p, steps=10, per_round=1, warmup=2)
  p.add_argument('--quick', action='store_true', help='--steps 4 --round 1 --warmup 1 --no-bert-timing')
  p.add_argument('--one-core', action='store_true',
                 help='pin the process to one core before JAX or torch start (as `taskset -c N`): one thread each')
  p.add_argument('--no-bert', action='store_true', help='skip the BERT step (no FLOPs / memory comparison)')
  p.add_argument('--no-bert-timing', action='store_true', help='compile the BERT step for FLOPs / memory only')
  p.add_argument('--no-dropout', action='store_true',
                 help='diagnostic, not pretraining: dropout and dropatt 0 on both sides (what dropout costs)')
  args = p.parse_args(argv)
  if args.quick:
    args.steps, args.round, args.warmup, args.no_bert_timing = 4, 1, 1, True
  if args.one_core:  # before any JAX computation (the config check below starts the backend) or torch thread
    harness.pin_to_one_core()
  cli.require_positive(p, args, ('layers', 'hidden', 'heads', 'intermediate', 'vocab', 'seq', 'reuse', 'predict',
                                 'batch'))
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


def xlnet_config(args: argparse.Namespace) -> ml_collections.ConfigDict:
  """The pretraining config (`xlnet_jax.configs.common.base_config`) with the benchmark's dims, validated and
  completed as the pretraining runner does."""
  from xlnet_jax.configs.common import base_config  # pylint: disable=import-outside-toplevel
  config = base_config()
  config.model.update(vocab_size=args.vocab, d_model=args.hidden, n_layer=args.layers, n_head=args.heads,
                      d_head=args.hidden // args.heads, d_inner=args.intermediate, mem_len=args.mem,
                      ff_activation='gelu', untie_r=True)
  config.data.update(vocab_size=args.vocab, seq_len=args.seq, reuse_len=args.reuse, num_predict=args.predict,
                     bi_data=False)
  config.optim.update(weight_decay=0.01)  # as the base / large configs (BERT's default too)
  config.update(global_batch_size=args.batch, grad_accum_steps=1, num_train_steps=100_000, progress_bar=False)
  config.dtype, config.remat = args.dtype, False
  if args.no_dropout:
    config.model.update(dropout=0.0, dropatt=0.0)
  harness.pretraining_recipe('xlnet', config)  # checks it; `model.reuse_len` / `bi_data` follow the data
  return config


def make_batch(batch_size: int, seq_len: int, reuse_len: int, num_predict: int, vocab_size: int,
               seed: int = 0) -> dict:
  """Full rows `[reuse | A <sep> B <sep> <cls>]` as `xlnet_jax.pretrain_data.rows_to_batch` writes them (no
  padding; `[batch, seq]` numpy arrays), exactly `num_predict` targets per row at distinct random non-special
  positions, split between the reuse part and the rest as the data pipeline splits its goals."""
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
  rest = np.setdiff1d(np.arange(reuse_len, seq_len), [sep_a, seq_len - 2, seq_len - 1])
  is_target = np.zeros((batch_size, seq_len), bool)
  for b in range(batch_size):
    is_target[b, rng.choice(np.arange(reuse_len), num_predict - goal_rest, replace=False)] = True
    is_target[b, rng.choice(rest, goal_rest, replace=False)] = True
  return dict(input_ids=ids, segment_ids=segment_ids, input_mask=np.ones_like(ids), is_target=is_target,
              is_special=is_special, next_sentence_labels=rng.integers(0, 2, size=batch_size).astype(np.int32))


def host_permutations(config: ml_collections.ConfigDict, host_batch: dict, count: int) -> list[dict]:
  """`count` samples of our sampler on the host: HF's `perm_mask [B, S, S]`, `target_mapping [B, P, S]` and
  `labels [B, P]` (-100 where a target slot is empty), as numpy."""
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


def build_hf(config: ml_collections.ConfigDict, host_batch: dict, threads: int, device: str = 'cpu',
             autocast=None) -> harness.TorchStep:
  """`XLNetLMHeadModel` cycling through `HF_MASK_SETS` host-sampled masks, its memory carried from step to step
  (zeros before the first, sequence-first `[mem_len, batch, d_model]` per layer, as ours starts from zeros).
  `device` / `autocast`: `harness.hf_training_step`'s."""
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  cfg = config.model
  base = dict(input_ids=harness.torch_long(host_batch['input_ids']),
              token_type_ids=harness.torch_long(host_batch['segment_ids']),
              attention_mask=torch.from_numpy(host_batch['input_mask'].astype(np.float32)))
  inputs = [{k: v.to(device) for k, v in dict(base, **{k: torch.from_numpy(v) for k, v in p.items()}).items()}
            for p in host_permutations(config, host_batch, HF_MASK_SETS)]
  batch = host_batch['input_ids'].shape[0]
  mems = [[torch.zeros(cfg.mem_len, batch, cfg.d_model, device=device) for _ in range(cfg.n_layer)]
          if cfg.mem_len else None]

  def loss_of(model, call):
    out = model(**inputs[call % len(inputs)], mems=mems[0], use_mems=True)
    mems[0] = out.mems  # detached by the model (`cache_mem`)
    return out.loss
  return harness.hf_training_step(
      lambda: transformers.XLNetLMHeadModel(transformers.XLNetConfig(**xlnet_export.config_to_hf(cfg))),
      config.optim, loss_of, no_decay=lambda n: 'layer_norm' in n or n.endswith('bias'), threads=threads,
      device=device, autocast=autocast)


def step_matmuls(config: ml_collections.ConfigDict) -> list[tuple[str, tuple[int, int, int, int], int]]:
  """The matmuls of one training step as (name, (batch, M, K, N), count), the terms of the FLOP table (forward,
  input and weight gradients; a gradient is timed at its forward's shape, same FLOPs): the content stream in all
  layers but the last (dead in pretraining), K / V over memory + sequence, the relative position projection once
  per step, the query stream at the predicted rows, the tied vocab projection. The segment term (0.02 GFLOP) is
  left out."""
  m, d = config.model, config.data
  b, s, p, h, f, v = config.global_batch_size, d.seq_len, d.num_predict, m.d_model, m.d_inner, m.vocab_size
  klen, rlen, bh, hd, n = m.mem_len + s, m.mem_len + 2 * s, b * m.n_head, m.d_head, m.n_layer
  rows, kv_rows, q_rows = b * s, b * klen, b * p
  return [('content q/o proj fwd + input grad', (1, rows, h, h), 4 * (n - 1)),
          ('content q/o proj weight grad', (1, h, rows, h), 2 * (n - 1)),
          ('k/v proj over mem + seq (3 kinds)', (1, kv_rows, h, h), 6 * n),
          ('r proj fwd + weight grad', (1, rlen, h, h), 2 * n),
          ('content q.k, p.v / grads', (bh, s, hd, klen), 6 * (n - 1)),
          ('content position scores / grads', (bh, s, hd, rlen), 3 * (n - 1)),
          ('content ffn (3 kinds each way)', (1, rows, h, f), 6 * (n - 1)),
          ('query q/o proj (3 kinds)', (1, q_rows, h, h), 6 * n),
          ('query q.k, p.v / grads', (bh, p, hd, klen), 6 * n),
          ('query position scores / grads', (bh, p, hd, rlen), 3 * n),
          ('query ffn (3 kinds each way)', (1, q_rows, h, f), 6 * n),
          ('vocab logits fwd + grads', (1, q_rows, h, v), 3)]


def profile(args, config, host_batch, ours: harness.JaxStep) -> dict:
  """Per-op trace of a traced copy of the step by source function, the forward / backward split, the step's
  matmuls alone."""
  print('\n== Profile of our XLNet step ==', flush=True)
  traced = harness.build_jax_step(config, ours.objective, host_batch, name='traced',
                                  compiler_options=harness.TRACED_OPTIONS)
  out = harness.op_profile(traced, max(args.steps // 2, 2), PROFILE_RULES, 'matmul: dense layers (q/k/v/o/r, FFN)')
  del traced
  out['programs_s'] = harness.phase_split(ours, args.steps, args.round)
  out.update(harness.matmul_roofline(step_matmuls(config), out['programs_s']['full step'], max(3 * args.round, 3),
                                     args.round))
  return out


def main(argv=None) -> dict:
  started = time.perf_counter()
  args = parse_args(argv)
  variants = harness.select(harness.COMMON_VARIANTS, args.only) if args.experiments else []
  out = cli.environment(args)
  config, bcfg = xlnet_config(args), xlnet_vs_bert.bert_config(args)
  out.update(one_core=args.one_core, dims=dict(
      layers=args.layers, d_model=args.hidden, heads=args.heads, d_head=args.hidden // args.heads,
      d_inner=args.intermediate, vocab=args.vocab, seq=args.seq, reuse=args.reuse, mem=args.mem,
      predict=args.predict, batch=args.batch, dtype=args.dtype, dropout=config.model.dropout))
  print(f'XLNet pretraining step, {args.layers} layers, d_model {args.hidden}, {args.heads} heads, d_inner '
        f'{args.intermediate}, vocab {args.vocab}, seq {args.seq}, reuse {args.reuse}, mem {args.mem}, '
        f'{args.predict} predictions/seq, batch {args.batch}, {args.dtype}; {out["cores"]} cores, torch threads '
        f'{out["torch_threads"]}{" (pinned to one core)" if args.one_core else ""}; jax {out["jax_version"]}; '
        f'load average {out["load_average_start"][0]:.1f}', flush=True)
  host_batch = make_batch(args.batch, args.seq, args.reuse, args.predict, args.vocab)
  tokens = args.batch * args.seq
  recipe = harness.pretraining_recipe('xlnet', config)
  objective = recipe.make_objective(config)
  builders = {'ours': lambda: harness.build_jax_step(config, objective, host_batch)}
  if not args.no_bert:
    bert_batch = bert_pretrain.make_batch(args.batch, args.seq, args.predict, args.vocab)
    bert_objective = harness.pretraining_recipe('bert', bcfg).make_objective(bcfg)
    builders['bert'] = lambda: harness.build_jax_step(bcfg, bert_objective, bert_batch, name='bert')
  run = harness.run_comparison(
      builders, None if args.no_hf else lambda: build_hf(config, host_batch, out['torch_threads']),
      steps=args.steps, per_round=args.round, warmup=args.warmup, untimed=('bert',) if args.no_bert_timing else ())
  out['load_average_end'] = os.getloadavg()
  ours = run.steps['ours']
  terms = xlnet_vs_bert.flop_terms(config, bcfg)
  flops_ours, flops_formula = sum(t[1] for t in terms), objective.flops_per_example * args.batch
  columns = [harness.Column('ours XLNet (JAX)', 'ours', flops_ours)]
  if run.reference is not None:
    columns.append(harness.Column('HF XLNet (PyTorch)', harness.REFERENCE))
    out.update(cli.reference_versions())
  if 'bert' in run.steps:
    columns.append(harness.Column('ours BERT (JAX)', 'bert', sum(t[2] for t in terms)))
  out.update(harness.records(run, columns, tokens), flop_terms=[dict(term=t[0], xlnet=t[1], bert=t[2])
                                                                for t in terms])
  first_loss = (ours.first_metrics or {}).get('lm_loss', math.nan)
  out['ours'].update(flops_formula=flops_formula, first_step_lm_loss=first_loss,
                     mfu_formula_flops=flops_formula / out['ours']['step_s'] / run.peak.jax)

  print(f'\n{run.peak.describe()}')
  print(f'our XLNet step compiled in {ours.compile_s:.1f} s' +
        (f', BERT step in {run.steps["bert"].compile_s:.1f} s' if 'bert' in run.steps else '') +
        f'; {len(run.times["ours"])} rounds of {args.round} steps each side; load average '
        f'{out["load_average_start"][0]:.1f} -> {out["load_average_end"][0]:.1f}\n')
  harness.print_table(harness.comparison_rows(run, columns, tokens))
  print(f'(first-step lm_loss of ours: {first_loss:.3f}; ln(vocab) = {math.log(args.vocab):.3f}; MFU with the '
        f'model formula, as the trainer logs it: {out["ours"]["mfu_formula_flops"]:.1%})')
  if run.reference is not None:
    print()
    harness.print_speedup(run)
    print('HF gets its perm_mask / target_mapping as inputs (sampled outside the timed region); ours samples them '
          'inside its step.')
  if 'bert' in run.steps:
    out.update(xlnet_vs_bert.compare_with_bert(run, terms))
  xlnet_vs_bert.print_terms(terms, flops_formula)
  if 'bert' in run.steps:
    print(f'memory_analysis() bytes, XLNet: {ours.memory()}\n                         BERT:  '
          f'{run.steps["bert"].memory()}')
  print(f'({time.perf_counter() - started:.0f} s so far)', flush=True)
  if args.profile:
    out['profile'] = profile(args, config, host_batch, ours)
  if args.experiments:
    out['experiments'] = harness.run_experiments(variants, config, recipe.make_objective, host_batch, ours,
                                                 steps=args.steps, per_round=args.round, warmup=args.warmup)
  harness.write_json(args.json, out)
  return out


if __name__ == '__main__':
  main()
