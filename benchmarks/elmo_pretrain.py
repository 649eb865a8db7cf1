"""ELMo pretraining step: our trainer against a PyTorch biLM of the same dims on the same batch, in one run.

  python -m benchmarks.elmo_pretrain                        # default dims (2 layers, LSTM 1024 -> 256, seq 20)
  python -m benchmarks.elmo_pretrain --softmax sampled      # the sampled softmax (--num-sampled words)
  python -m benchmarks.elmo_pretrain --json /tmp/elmo.json  # also write every number to a JSON file

What is compared, on one CPU device: ours, the real trainer path (`benchmarks.harness.build_jax_step`) with ELMo's
recipe objective (forward + backward LM, char-CNN token encoder, dropout on, float32), and a PyTorch biLM built here
from `nn.Conv1d`, `nn.Linear` highways and `nn.LSTM(proj_size=...)` layers with the same dims, trained with
`clip_grad_norm_(1.0)` and `torch.optim.AdamW` (no decay on biases). The reference omits the cell and projection
clipping (`nn.LSTM` has no such option) and the constant forget-gate bias; the matmuls are the same on both sides,
so both are measured against one analytic FLOP count. Timing, the matmul peak for MFU, compiled FLOPs and memory:
`benchmarks.harness`.
"""
from __future__ import annotations

import argparse
import math

from benchmarks import harness  # first: it sets JAX's platform before JAX starts
from benchmarks.harness import cli

import ml_collections
import numpy as np

from common.config import ConfigError

FILTERS = ((1, 32), (2, 32), (3, 64), (4, 128), (5, 256))


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog='python -m benchmarks.elmo_pretrain', description=__doc__.split('\n')[0])
  p.add_argument('--layers', type=int, default=2, help='LSTM layers of each direction')
  p.add_argument('--lstm', type=int, default=1024, help='LSTM cells')
  p.add_argument('--projection', type=int, default=256, help='projection (token and LSTM output) size')
  p.add_argument('--chars', type=int, default=50, help='characters per token')
  p.add_argument('--vocab', type=int, default=8192)
  p.add_argument('--softmax', default='full', choices=('full', 'sampled'))
  p.add_argument('--num-sampled', type=int, default=1024, help='with --softmax sampled: words drawn per step')
  p.add_argument('--seq', type=int, default=20)
  p.add_argument('--batch', type=int, default=16)
  cli.add_run_flags(p, steps=8, per_round=2, warmup=2)
  args = p.parse_args(argv)
  cli.require_positive(p, args, ('layers', 'lstm', 'projection', 'chars', 'vocab', 'num_sampled', 'seq', 'batch'))
  try:
    elmo_config(args)
  except ConfigError as e:
    p.error(str(e))
  return args


def elmo_config(args: argparse.Namespace) -> ml_collections.ConfigDict:
  """The pretraining config (`elmo_jax.configs.common.base_config`) with the benchmark's dims."""
  from elmo_jax.configs.common import base_config  # pylint: disable=import-outside-toplevel
  config = base_config()
  config.model.update(vocab_size=args.vocab, max_characters_per_token=args.chars, filters=[list(f) for f in FILTERS],
                      projection_dim=args.projection, lstm_dim=args.lstm, n_lstm_layers=args.layers)
  config.data.update(max_seq_length=args.seq, vocab_size=args.vocab, softmax=args.softmax,
                     num_sampled=args.num_sampled)
  config.update(global_batch_size=args.batch, grad_accum_steps=1, num_train_steps=100_000, progress_bar=False,
                dtype=args.dtype)
  harness.pretraining_recipe('elmo', config)  # checks it as the pretraining runner does
  return config


def make_batch(batch_size: int, seq_len: int, vocab_size: int, cfg: ml_collections.ConfigDict, seed: int = 0):
  """Full rows (every sentence `seq_len` tokens) of random word ids, each word random characters."""
  rng = np.random.default_rng(seed)
  token_ids = rng.integers(0, vocab_size, size=(batch_size, seq_len)).astype(np.int32)
  char_ids = rng.integers(0, cfg.char_vocab_size, size=(batch_size, seq_len, cfg.max_characters_per_token))
  return dict(token_ids=token_ids, char_ids=char_ids.astype(np.int32), lengths=np.full([batch_size], seq_len, np.int32))


def torch_bilm(cfg: ml_collections.ConfigDict, softmax: str, num_sampled: int):
  """The reference biLM: an `nn.Module` whose `forward(char_ids, token_ids)` returns the training loss (forward +
  backward NLL per target token, every position scored as ours does). Char embedding, one `nn.Conv1d` per filter
  (max over the characters, then the activation), `nn.Linear` highways, the projection, per direction one
  `nn.LSTM(proj_size=...)` per layer (residual around every layer but the first, dropout on every layer's input and
  the top), one shared softmax: full, or the sampled softmax of `elmo_jax.objective` (log-uniform candidates, the
  log expected-count correction, accidental hits removed). No cell / projection clipping (`nn.LSTM` has none) and
  no constant forget bias. The benchmark's rows are full, so the backward LM reads every row flipped."""
  import torch  # pylint: disable=import-outside-toplevel
  from torch import nn  # pylint: disable=import-outside-toplevel

  class Highway(nn.Module):
    def __init__(self, d):
      super().__init__()
      self.carry, self.transform = nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x):
      gate = torch.sigmoid(self.carry(x))
      return gate * torch.relu(self.transform(x)) + (1.0 - gate) * x

  class BiLM(nn.Module):
    def __init__(self):
      super().__init__()
      p, filters = cfg.projection_dim, sum(ch for _, ch in cfg.filters)
      self.char_embed = nn.Embedding(cfg.char_vocab_size, cfg.char_embedding_dim)
      self.convs = nn.ModuleList(nn.Conv1d(cfg.char_embedding_dim, ch, w) for w, ch in cfg.filters)
      self.highways = nn.ModuleList(Highway(filters) for _ in range(cfg.n_highway))
      self.projection = nn.Linear(filters, p)
      self.lms = nn.ModuleList(nn.ModuleList(nn.LSTM(p, cfg.lstm_dim, proj_size=p, batch_first=True)
                                             for _ in range(cfg.n_lstm_layers)) for _ in range(2))
      self.softmax = nn.Linear(p, cfg.vocab_size)
      self.dropout = nn.Dropout(cfg.dropout)
      self.act = torch.relu if cfg.activation == 'relu' else torch.tanh

    def encode(self, char_ids):
      batch, length, chars = char_ids.shape
      x = self.char_embed(char_ids.reshape(batch * length, chars)).transpose(1, 2)  # [N, dim, chars]
      h = torch.cat([self.act(conv(x).max(dim=-1).values) for conv in self.convs], dim=-1)
      for highway in self.highways:
        h = highway(h)
      return self.projection(h).reshape(batch, length, -1)

    def run_lm(self, layers, x):
      for i, lstm in enumerate(layers):
        inputs = self.dropout(x)
        h, _ = lstm(inputs)
        x = h + inputs if cfg.use_skip_connections and i > 0 else h
      return self.dropout(x)

    def nll(self, h, targets):
      if softmax == 'full':
        return nn.functional.cross_entropy(self.softmax(h).flatten(0, 1), targets.flatten(), reduction='none')
      v = cfg.vocab_size
      u = torch.rand(num_sampled)
      candidates = (torch.floor(torch.exp(u * math.log(v + 1.0))) - 1.0).long().clamp(0, v - 1)
      correction = lambda ids: torch.log(num_sampled * torch.log((ids + 2.0) / (ids + 1.0)) / math.log(v + 1.0))
      weight, bias = self.softmax.weight, self.softmax.bias
      true = (h * weight[targets]).sum(-1) + bias[targets] - correction(targets.float())
      sampled = h @ weight[candidates].T + bias[candidates] - correction(candidates.float())
      sampled = sampled.masked_fill(candidates[None, None, :] == targets[..., None], -1e30)
      return (torch.logsumexp(torch.cat([true[..., None], sampled], -1), -1) - true).flatten()

    def forward(self, char_ids, token_ids):
      """Every position is scored (as ours); the row's last (forward) and first (backward) get weight 0."""
      tokens = self.encode(char_ids)
      forward = self.run_lm(self.lms[0], tokens)
      backward = self.run_lm(self.lms[1], tokens.flip(1)).flip(1)
      weights = torch.ones(token_ids.shape)
      forward_weights, backward_weights = weights.clone(), weights.clone()
      forward_weights[:, -1] = 0.0
      backward_weights[:, 0] = 0.0
      loss = (self.nll(forward, token_ids.roll(-1, 1)) * forward_weights.flatten()).sum()
      loss = loss + (self.nll(backward, token_ids.roll(1, 1)) * backward_weights.flatten()).sum()
      return loss / forward_weights.sum()

  return BiLM()


def build_reference(config: ml_collections.ConfigDict, host_batch: dict, threads: int) -> harness.TorchStep:
  chars, tokens = harness.torch_long(host_batch['char_ids']), harness.torch_long(host_batch['token_ids'])
  return harness.hf_training_step(
      lambda: torch_bilm(config.model, config.data.softmax, config.data.num_sampled), config.optim,
      lambda model, _: model(chars, tokens), no_decay=lambda n: n.endswith('bias') or n.startswith('bias'),
      threads=threads)


def main(argv=None) -> dict:
  args = parse_args(argv)
  out = cli.environment(args)
  out['dims'] = dict(layers=args.layers, lstm=args.lstm, projection=args.projection, chars=args.chars,
                     filters=FILTERS, vocab=args.vocab, softmax=args.softmax, num_sampled=args.num_sampled,
                     seq=args.seq, batch=args.batch, dtype=args.dtype)
  softmax = f'sampled softmax ({args.num_sampled} words)' if args.softmax == 'sampled' else 'full softmax'
  print(f'ELMo biLM pretraining step, {args.layers} LSTM layers x 2 directions, {args.lstm} cells -> '
        f'{args.projection}, {args.chars} chars, vocab {args.vocab} ({softmax}), seq {args.seq}, batch {args.batch}, '
        f'{args.dtype}; {out["cores"]} cores; jax {out["jax_version"]}', flush=True)
  config = elmo_config(args)
  host_batch = make_batch(args.batch, args.seq, args.vocab, config.model)
  recipe = harness.pretraining_recipe('elmo', config)
  run = harness.run_comparison(
      {'ours': lambda: harness.build_jax_step(config, recipe.make_objective(config), host_batch)},
      None if args.no_hf else lambda: build_reference(config, host_batch, out['torch_threads']),
      steps=args.steps, per_round=args.round, warmup=args.warmup)
  flops = run.steps['ours'].objective.flops_per_example * args.batch  # the reference does the same matmuls
  if run.reference is not None:
    out.update(cli.reference_versions())
  harness.report_against_reference(run, out, 'PyTorch nn.LSTM', flops, args.batch * args.seq, args.round, args.json,
                                   ' (each LSTM loop body counted once, not per time step)')
  return out


if __name__ == '__main__':
  main()
