"""GPT pretraining step: our trainer against HF PyTorch `GPT2LMHeadModel` on the same batch, in one run.

  python -m benchmarks.gpt_pretrain                        # default dims (4 layers, hidden 256, seq 128, batch 16)
  python -m benchmarks.gpt_pretrain --json /tmp/gpt.json   # also write every number to a JSON file

What is compared, on one CPU device: ours, the real trainer path (`benchmarks.harness.build_jax_step`) with GPT's
recipe objective (causal LM over every position of full rows, GPT-2 layout, dropout on, float32), and HF
`transformers.GPT2LMHeadModel` with the same dims (config from `gpt_jax.export.config_to_hf`), train mode,
`labels=input_ids` (HF shifts them: one target fewer per row), `clip_grad_norm_(1.0)` and `torch.optim.AdamW` (no
decay on LayerNorm / bias). Timing, the matmul peak for MFU, compiled FLOPs and memory: `benchmarks.harness`.
"""
from __future__ import annotations

import argparse

from benchmarks import harness  # first: it sets JAX's platform before JAX starts
from benchmarks.harness import cli

import ml_collections
import numpy as np

from common.config import ConfigError
from gpt_jax import export as gpt_export


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog='python -m benchmarks.gpt_pretrain', description=__doc__.split('\n')[0])
  p.add_argument('--layers', type=int, default=4)
  p.add_argument('--hidden', type=int, default=256)
  p.add_argument('--heads', type=int, default=4)
  p.add_argument('--vocab', type=int, default=32000)
  p.add_argument('--seq', type=int, default=128)
  p.add_argument('--batch', type=int, default=16)
  cli.add_run_flags(p, steps=10, per_round=2, warmup=2)
  args = p.parse_args(argv)
  cli.require_positive(p, args, ('layers', 'hidden', 'heads', 'vocab', 'seq', 'batch'))
  try:
    gpt_config(args)
  except ConfigError as e:
    p.error(str(e))
  return args


def gpt_config(args: argparse.Namespace) -> ml_collections.ConfigDict:
  """The pretraining config (`gpt_jax.configs.common.base_config`, GPT-2 layout) with the benchmark's dims."""
  from gpt_jax.configs.common import base_config  # pylint: disable=import-outside-toplevel
  config = base_config()
  config.model.update(vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
                      num_attention_heads=args.heads, intermediate_size=4 * args.hidden,
                      max_position_embeddings=max(512, args.seq), layout='gpt2')
  config.data.update(max_seq_length=args.seq)
  config.update(global_batch_size=args.batch, grad_accum_steps=1, num_train_steps=100_000, progress_bar=False,
                dtype=args.dtype)
  harness.pretraining_recipe('gpt', config)  # checks it as the pretraining runner does
  return config


def make_batch(batch_size: int, seq_len: int, vocab_size: int, seed: int = 0) -> dict:
  """Full rows of `seq_len + 1` random ids as the packed loader gives them: inputs, next-token targets, weights."""
  rows = np.random.default_rng(seed).integers(0, vocab_size, size=(batch_size, seq_len + 1)).astype(np.int32)
  return dict(input_ids=rows[:, :-1], target_ids=rows[:, 1:], target_weights=np.ones((batch_size, seq_len),
                                                                                     np.float32))


def build_hf(config: ml_collections.ConfigDict, host_batch: dict, threads: int) -> harness.TorchStep:
  import transformers  # pylint: disable=import-outside-toplevel
  ids = harness.torch_long(host_batch['input_ids'])
  hf_config = gpt_export.config_to_hf(config.model, eos_token_id=config.model.vocab_size - 1)
  return harness.hf_training_step(
      lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(**hf_config)),
      config.optim, lambda model, _: model(input_ids=ids, labels=ids).loss,
      no_decay=lambda n: 'ln_' in n or n.endswith('bias'), threads=threads)


def main(argv=None) -> dict:
  args = parse_args(argv)
  out = cli.environment(args)
  out['dims'] = dict(layers=args.layers, hidden=args.hidden, heads=args.heads, vocab=args.vocab, seq=args.seq,
                     batch=args.batch, dtype=args.dtype)
  print(f'GPT-2-layout pretraining step, {args.layers} layers, hidden {args.hidden}, {args.heads} heads, vocab '
        f'{args.vocab}, seq {args.seq}, batch {args.batch}, {args.dtype}; {out["cores"]} cores; jax '
        f'{out["jax_version"]}', flush=True)
  config = gpt_config(args)
  host_batch = make_batch(args.batch, args.seq, args.vocab)
  recipe = harness.pretraining_recipe('gpt', config)
  run = harness.run_comparison(
      {'ours': lambda: harness.build_jax_step(config, recipe.make_objective(config), host_batch)},
      None if args.no_hf else lambda: build_hf(config, host_batch, out['torch_threads']),
      steps=args.steps, per_round=args.round, warmup=args.warmup)
  flops = run.steps['ours'].objective.flops_per_example * args.batch  # HF: the same matmuls (one loss position fewer)
  if run.reference is not None:
    out.update(cli.reference_versions(), hf_attn_implementation=run.reference.attn_implementation())
  harness.report_against_reference(run, out, 'HF (PyTorch)', flops, args.batch * args.seq, args.round, args.json)
  return out


if __name__ == '__main__':
  main()
