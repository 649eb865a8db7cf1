"""BERT pretraining step: our trainer against HF PyTorch `BertForPreTraining` on the same batch, in one run.

  python -m benchmarks.bert_pretrain                        # default dims (4 layers, hidden 256, seq 128, batch 16)
  python -m benchmarks.bert_pretrain --json /tmp/bert.json  # also write every number to a JSON file
  python -m benchmarks.bert_pretrain --profile              # + where our step's time goes (per-op trace, fwd/bwd split)
  python -m benchmarks.bert_pretrain --experiments          # + XLA flags and settings vs ours

What is compared, on one CPU device (no fake devices):
  ours  the real trainer path (`benchmarks.harness.build_jax_step`: `trainer.build_setup` + the jitted step of
        `trainer.compile_train_step`, AdamW with global-norm clipping and the non-finite guard, state donated) with
        BERT's recipe objective: MLM gathered at `--predictions` positions per sequence + NSP, dropout on, float32;
  HF    `transformers.BertForPreTraining` with the same dims (config from `bert_jax.export.config_to_hf`), train
        mode, MLM labels at the same positions (-100 elsewhere) + NSP labels, `loss.backward()`,
        `clip_grad_norm_(1.0)` and `torch.optim.AdamW` (no decay on LayerNorm / bias), `torch.set_num_threads(cores)`.

Timing (interleaved rounds, medians, the median of per-round ratios, CPU time beside wall time), the matmul peak
for MFU, compiled FLOPs and memory: `benchmarks.harness`, described in benchmarks/README.md. Model FLOPs come
from `bert_jax.model.flops_per_example`; HF computes the MLM transform and vocab projection at every position, so
its own model FLOPs are larger than ours (both are reported, with XLA's `cost_analysis()` of our compiled step and
torch's `FlopCounterMode` count of HF's step).
"""
from __future__ import annotations

import argparse
import time

from benchmarks import harness  # first: it sets JAX's platform before JAX starts
from benchmarks.harness import cli

import ml_collections
import numpy as np

from bert_jax import export as bert_export
from bert_jax import model as bert_model
from common.config import ConfigError

# Source functions of BERT's step -> categories of the profile (after the harness's shared ones).
PROFILE_RULES = (
    (('dot_product_attention',), 'matmul: attention scores / context', 'attention softmax + mask'),
    (('*softmax_cross_entropy*', 'mlm_nsp_sums'), 'MLM / NSP loss (log-softmax, argmax, grad)', None),
    (('DenseGeneral.__call__',), 'matmul: dense layers', 'dense bias add / bias grad / layout'),
    (('BertLayer.__call__*',), 'encoder elementwise (GELU, residual)', None),
    (('BertForPreTraining*',), 'MLM head: gather, output bias + its grad', None),
    (('BertModel.__call__',), 'encoder elementwise (GELU, residual)', None),
)


def _no_dropout(config: ml_collections.ConfigDict) -> None:
  config.model.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


VARIANTS = harness.COMMON_VARIANTS + (
    harness.Variant('no-dropout', 'approx', 'dropout probabilities 0 (upper bound on the cost of dropout)',
                    change_config=_no_dropout),)


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog='python -m benchmarks.bert_pretrain', description=__doc__.split('\n')[0])
  p.add_argument('--layers', type=int, default=4)
  p.add_argument('--hidden', type=int, default=256)
  p.add_argument('--heads', type=int, default=4)
  p.add_argument('--intermediate', type=int, default=1024)
  p.add_argument('--vocab', type=int, default=32000)
  p.add_argument('--seq', type=int, default=128)
  p.add_argument('--batch', type=int, default=16)
  p.add_argument('--predictions', type=int, default=20, help='masked positions per sequence (max_predictions_per_seq)')
  cli.add_run_flags(p, steps=10, per_round=2, warmup=2)
  args = p.parse_args(argv)
  cli.require_positive(p, args, ('layers', 'hidden', 'heads', 'intermediate', 'vocab', 'seq', 'batch', 'predictions'))
  if args.hidden % args.heads:
    p.error(f'--hidden {args.hidden} is not divisible by --heads {args.heads}')
  if args.seq < 4 or args.predictions > args.seq - 3:
    p.error(f'--predictions {args.predictions} does not fit in --seq {args.seq} ([CLS] and two [SEP] are never '
            f'predicted)')
  try:
    bert_config(args)
  except ConfigError as e:
    p.error(str(e))
  return args


def bert_config(args: argparse.Namespace) -> ml_collections.ConfigDict:
  """The pretraining config (`bert_jax.configs.common.base_config`) with the benchmark's dims, validated."""
  from bert_jax.configs.common import base_config  # pylint: disable=import-outside-toplevel
  config = base_config()
  config.model.update(vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
                      num_attention_heads=args.heads, intermediate_size=args.intermediate,
                      max_position_embeddings=max(512, args.seq))
  config.data.update(max_seq_length=args.seq, max_predictions_per_seq=args.predictions, next_sentence=True)
  config.update(global_batch_size=args.batch, grad_accum_steps=1, num_train_steps=100_000, progress_bar=False)
  config.dtype = args.dtype
  config.remat = False
  harness.pretraining_recipe('bert', config)  # checks it as the pretraining runner does
  return config


def make_batch(batch_size: int, seq_len: int, num_predictions: int, vocab_size: int, seed: int = 0) -> dict:
  """Full-length rows `[CLS] A [SEP] B [SEP]` (no padding, so both sides do the same work), `num_predictions`
  distinct predicted positions per row (all weight 1), random NSP labels; `[batch, seq]` / `[batch, P]` / `[batch]`
  numpy arrays under the pretraining loader's feature names."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(5, vocab_size, size=(batch_size, seq_len)).astype(np.int32)
  sep = seq_len // 2
  ids[:, 0], ids[:, sep - 1], ids[:, -1] = 2, 3, 3
  segment_ids = (np.arange(seq_len)[None] >= sep).astype(np.int32).repeat(batch_size, 0)
  candidates = np.setdiff1d(np.arange(1, seq_len - 1), [sep - 1])
  positions = np.sort(np.stack([rng.choice(candidates, num_predictions, replace=False)
                                for _ in range(batch_size)]), 1).astype(np.int32)
  return dict(input_ids=ids, input_mask=np.ones_like(ids), segment_ids=segment_ids,
              masked_lm_positions=positions, masked_lm_ids=np.take_along_axis(ids, positions, 1),
              masked_lm_weights=np.ones((batch_size, num_predictions), np.float32),
              next_sentence_labels=rng.integers(0, 2, size=batch_size).astype(np.int32))


def build_hf(config: ml_collections.ConfigDict, host_batch: dict, threads: int, device: str = 'cpu',
             autocast=None) -> harness.TorchStep:
  """`BertForPreTraining` on the same batch: MLM labels at the predicted positions (-100 elsewhere) + NSP.
  `device` / `autocast`: `harness.hf_training_step`'s."""
  import transformers  # pylint: disable=import-outside-toplevel
  ids = harness.torch_long(host_batch['input_ids'])
  labels = ids.new_full(ids.shape, -100)
  labels.scatter_(1, harness.torch_long(host_batch['masked_lm_positions']),
                  harness.torch_long(host_batch['masked_lm_ids']))
  inputs = dict(input_ids=ids, token_type_ids=harness.torch_long(host_batch['segment_ids']),
                attention_mask=harness.torch_long(host_batch['input_mask']), labels=labels,
                next_sentence_label=harness.torch_long(host_batch['next_sentence_labels']))
  inputs = {k: v.to(device) for k, v in inputs.items()}
  return harness.hf_training_step(
      lambda: transformers.BertForPreTraining(transformers.BertConfig(**bert_export.config_to_hf(config.model))),
      config.optim, lambda model, _: model(**inputs).loss, no_decay=lambda n: 'LayerNorm' in n or 'bias' in n,
      threads=threads, device=device, autocast=autocast)


def step_matmuls(config: ml_collections.ConfigDict) -> list[tuple[str, tuple[int, int, int, int], int]]:
  """The matmuls of one training step as (name, (batch, M, K, N), count): forward, input grad, weight grad."""
  m, d = config.model, config.data
  tokens = config.global_batch_size * d.max_seq_length
  preds = config.global_batch_size * d.max_predictions_per_seq
  h, f, v, n = m.hidden_size, m.intermediate_size, m.vocab_size, m.num_hidden_layers
  s, bh, hd = d.max_seq_length, config.global_batch_size * m.num_attention_heads, h // m.num_attention_heads
  return [('q/k/v/o fwd + input grad', (1, tokens, h, h), 8 * n), ('q/k/v/o weight grad', (1, h, tokens, h), 4 * n),
          ('ffn in fwd, ffn out input grad', (1, tokens, h, f), 2 * n),
          ('ffn out fwd, ffn in input grad', (1, tokens, f, h), 2 * n),
          ('ffn weight grads', (1, h, tokens, f), 2 * n), ('attention q.k / grads', (bh, s, hd, s), 3 * n),
          ('attention p.v / grads', (bh, s, s, hd), 3 * n), ('mlm transform (3x)', (1, preds, h, h), 3),
          ('vocab logits fwd', (1, preds, h, v), 1), ('vocab input grad', (1, preds, v, h), 1),
          ('vocab (embedding) weight grad', (1, v, preds, h), 1)]


def profile(args, config, host_batch, ours: harness.JaxStep) -> dict:
  """Per-op trace of a traced copy of the step, forward / backward split, the step's matmuls alone."""
  print('\n== Profile of our step ==', flush=True)
  traced = harness.build_jax_step(config, ours.objective, host_batch, name='traced',
                                  compiler_options=harness.TRACED_OPTIONS)
  out = harness.op_profile(traced, args.steps, PROFILE_RULES)
  del traced
  out['programs_s'] = harness.phase_split(ours, args.steps, args.round)
  out.update(harness.matmul_roofline(step_matmuls(config), out['programs_s']['full step'], 3 * args.round,
                                     args.round))
  return out


def main(argv=None) -> dict:
  started = time.perf_counter()
  args = parse_args(argv)
  variants = harness.select(VARIANTS, args.only) if args.experiments else []
  out = cli.environment(args)
  out['dims'] = dict(layers=args.layers, hidden=args.hidden, heads=args.heads, intermediate=args.intermediate,
                     vocab=args.vocab, seq=args.seq, batch=args.batch, predictions=args.predictions, dtype=args.dtype)
  print(f'BERT pretraining step, {args.layers} layers, hidden {args.hidden}, {args.heads} heads, intermediate '
        f'{args.intermediate}, vocab {args.vocab}, seq {args.seq}, batch {args.batch}, {args.predictions} '
        f'predictions/seq, {args.dtype}; {out["cores"]} cores; jax {out["jax_version"]}', flush=True)
  config = bert_config(args)
  host_batch = make_batch(args.batch, args.seq, args.predictions, args.vocab)
  tokens = args.batch * args.seq
  build_reference = None if args.no_hf else lambda: build_hf(config, host_batch, out['torch_threads'])
  recipe = harness.pretraining_recipe('bert', config)
  run = harness.run_comparison(
      {'ours': lambda: harness.build_jax_step(config, recipe.make_objective(config), host_batch)},
      build_reference, steps=args.steps, per_round=args.round, warmup=args.warmup)
  ours = run.steps['ours']
  flops_ours = ours.objective.flops_per_example * args.batch
  flops_hf = bert_model.flops_per_example(config.model, args.seq, args.seq) * args.batch
  columns = [harness.Column('ours (JAX)', 'ours', flops_ours)]
  if run.reference is not None:
    columns.append(harness.Column('HF (PyTorch)', harness.REFERENCE, flops_hf))
    out.update(cli.reference_versions(), hf_attn_implementation=run.reference.attn_implementation())
  out.update(harness.records(run, columns, tokens))

  harness.print_comparison(run, columns, tokens, args.round)
  if run.reference is not None:
    print(f'HF runs the MLM transform and vocab projection at all {args.seq} positions ({flops_hf / 1e9:.1f} vs '
          f'{flops_ours / 1e9:.1f} GFLOP/step); attention implementation: {out["hf_attn_implementation"]}')
  memory = ours.memory()
  print(f'XLA temp buffers {harness.fmt_bytes(memory.get("temp_size_in_bytes", 0))}, arguments '
        f'{harness.fmt_bytes(memory.get("argument_size_in_bytes", 0))} (state donated: alias '
        f'{harness.fmt_bytes(memory.get("alias_size_in_bytes", 0))})')
  print(f'({time.perf_counter() - started:.0f} s so far)', flush=True)
  if args.profile:
    out['profile'] = profile(args, config, host_batch, ours)
  if args.experiments:
    out['experiments'] = harness.run_experiments(
        variants, config, recipe.make_objective, host_batch, ours,
        steps=args.steps, per_round=args.round, warmup=args.warmup)
  harness.write_json(args.json, out)
  return out


if __name__ == '__main__':
  main()
