"""BERT pretraining step: our trainer against HF PyTorch `BertForPreTraining` on the same batch, in one run.

  python -m benchmarks.bert_pretrain                        # default dims (4 layers, hidden 256, seq 128, batch 16)
  python -m benchmarks.bert_pretrain --json /tmp/bert.json  # also write every number to a JSON file
  python -m benchmarks.bert_pretrain --profile              # + where our step's time goes (per-op trace, fwd/bwd split)
  python -m benchmarks.bert_pretrain --experiments          # + XLA flags, settings and local model changes vs ours

What is compared, on one CPU device (no fake devices):
  ours  the real trainer path: `trainer.build_setup` + the jitted step of `trainer.compile_train_step` (AdamW with
        global-norm clipping and the non-finite guard, state donated), `bert_jax.objective` MLM gathered at
        `--predictions` positions per sequence + NSP, dropout on, float32 (`--dtype` to change the compute dtype);
  HF    `transformers.BertForPreTraining` with the same dims (config from `bert_jax.export.config_to_hf`), train
        mode (dropout on), MLM labels at the same positions (-100 elsewhere) + NSP labels, `loss.backward()`,
        `clip_grad_norm_(1.0)` and `torch.optim.AdamW` (no decay on LayerNorm / bias), `torch.set_num_threads(cores)`.

How it is timed: both are warmed up, then run in rounds (ours k steps, HF k steps, the order alternating between
rounds) so that load from other processes falls on both alike; a step's time is the median over rounds, and the
ratio ours/HF is the median of the per-round ratios. Process CPU time per step (all threads) is reported too: on a
shared machine it varies far less than wall time. The fp32 matmul peak (JAX, and torch for information) is
measured in the same process, before and after the timed rounds (the best is kept), and MFU is reported against
JAX's. Model FLOPs come from `bert_jax.model.flops_per_example`; HF computes the MLM
transform and vocab projection at every position, so its own model FLOPs are larger than ours (both are reported,
with XLA's `cost_analysis()` of our compiled step and torch's `FlopCounterMode` count of HF's step).

`--experiments` compiles variants of our step and times each against the baseline, interleaved: XLA CPU compile
options, matmul precision, donation, bfloat16 compute and local changes to the model or loss that are candidates
for the library (they live only in this file). Variants that change the arithmetic or the random stream are
labelled so. `--profile` traces a few steps with per-op trace events and attributes each op to the source
function it came from (`stack_frame_id` in the compiled HLO), and times forward-only and forward+backward programs
against the full step.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import glob
import json
import math
import os
import re
import resource
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any, Callable

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('TRANSFORMERS_OFFLINE', '1')

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import linen as nn  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from bert_jax import export as bert_export  # noqa: E402
from bert_jax import model as bert_model  # noqa: E402
from bert_jax import objective as bert_objective  # noqa: E402
from common import sharding, trainer  # noqa: E402
from common.trainer import Objective  # noqa: E402


# ----------------------------------------------------------------------------------------------------------------
# Arguments.
# ----------------------------------------------------------------------------------------------------------------

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
  p.add_argument('--steps', type=int, default=10, help='timed steps of each side')
  p.add_argument('--round', type=int, default=2, help='steps of one side per interleaved round')
  p.add_argument('--warmup', type=int, default=2, help='untimed steps of each side after compilation')
  p.add_argument('--dtype', default='float32', choices=('float32', 'bfloat16'), help='our compute dtype')
  p.add_argument('--threads', type=int, default=0, help='torch threads (0: the cores this process may use)')
  p.add_argument('--no-hf', action='store_true', help='time ours only')
  p.add_argument('--profile', action='store_true', help='per-op trace of our step and a forward / backward split')
  p.add_argument('--experiments', action='store_true', help='time variants of our step against the baseline')
  p.add_argument('--only', default='', help='with --experiments: comma-separated variant names to run')
  p.add_argument('--json', default='', metavar='OUT', help='write the numbers to this JSON file')
  args = p.parse_args(argv)
  for name in ('layers', 'hidden', 'heads', 'intermediate', 'vocab', 'seq', 'batch', 'predictions', 'steps', 'round'):
    if getattr(args, name) <= 0:
      p.error(f'--{name} must be positive, got {getattr(args, name)}')
  if args.hidden % args.heads:
    p.error(f'--hidden {args.hidden} is not divisible by --heads {args.heads}')
  if args.seq < 4 or args.predictions > args.seq - 3:
    p.error(f'--predictions {args.predictions} does not fit in --seq {args.seq} ([CLS] and two [SEP] are never '
            f'predicted)')
  return args


def cores() -> int:
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:
    return os.cpu_count() or 1


# ----------------------------------------------------------------------------------------------------------------
# The machine: fp32 matmul peak of JAX and torch.
# ----------------------------------------------------------------------------------------------------------------

def _square_matmul_peak(matmul: Callable[[int], Callable[[], None]], sizes, repeats) -> tuple[float, float]:
  """(best FLOP/s by wall time, best FLOP per process CPU-second) of square fp32 matmuls of the given sizes."""
  best_wall = best_cpu = 0.0
  for n in sizes:
    run = matmul(n)
    run()
    for _ in range(repeats):
      t, c = time.perf_counter(), time.process_time()
      run()
      flops = 2.0 * n ** 3
      best_wall = max(best_wall, flops / (time.perf_counter() - t))
      best_cpu = max(best_cpu, flops / max(time.process_time() - c, 1e-9))
  return best_wall, best_cpu


def jax_matmul_peak(sizes=(2048, 3072), repeats=3) -> tuple[float, float]:
  """What `common.metrics.measure_matmul_peak` measures (a jitted square fp32 matmul, the trainer's CPU peak), by
  wall time and per CPU-second."""
  def matmul(n):
    a = jax.device_put(jnp.ones((n, n), jnp.float32), jax.devices()[0])
    f = jax.jit(lambda x, y: x @ y)
    return lambda: f(a, a).block_until_ready()
  return _square_matmul_peak(matmul, sizes, repeats)


def torch_matmul_peak(sizes=(2048, 3072), repeats=3) -> tuple[float, float]:
  import torch

  def matmul(n):
    a = torch.ones(n, n)
    return lambda: torch.mm(a, a)
  return _square_matmul_peak(matmul, sizes, repeats)


# ----------------------------------------------------------------------------------------------------------------
# Config and batch (numpy, the pretraining loader's feature names).
# ----------------------------------------------------------------------------------------------------------------

def bert_config(args: argparse.Namespace) -> ml_collections.ConfigDict:
  """The pretraining config (`bert_jax.configs.common.base_config`) with the benchmark's dims."""
  from bert_jax.configs.common import base_config
  config = base_config()
  config.model.update(vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
                      num_attention_heads=args.heads, intermediate_size=args.intermediate,
                      max_position_embeddings=max(512, args.seq))
  config.data.update(max_seq_length=args.seq, max_predictions_per_seq=args.predictions, next_sentence=True)
  config.update(global_batch_size=args.batch, grad_accum_steps=1, num_train_steps=100_000, progress_bar=False)
  config.dtype = args.dtype
  config.remat = False
  return config


def make_batch(batch_size: int, seq_len: int, num_predictions: int, vocab_size: int, seed: int = 0) -> dict:
  """Full-length rows `[CLS] A [SEP] B [SEP]` (no padding, so both sides do the same work), `num_predictions`
  distinct predicted positions per row (all weight 1), random NSP labels."""
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


# ----------------------------------------------------------------------------------------------------------------
# Ours: the trainer's step, lowered and compiled ahead of time so the same executable is analysed and timed.
# ----------------------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def jax_setting(name: str, value):
  """Temporarily sets a `jax.config` option (e.g. 'jax_default_prng_impl')."""
  old = getattr(jax.config, name)
  jax.config.update(name, value)
  try:
    yield
  finally:
    jax.config.update(name, old)


@dataclasses.dataclass
class OurStep:
  name: str
  compiled: Any                 # jax.stages.Compiled of the train step
  state: Any                    # TrainState, donated to and returned by every call
  batch: dict
  objective: Objective
  setup: Any
  compile_s: float
  metrics: Any = None
  first_metrics: dict | None = None   # metrics of the first step from the initial state

  def run(self, steps: int) -> None:
    for _ in range(steps):
      self.state, self.metrics = self.compiled(self.state, self.batch)
    jax.block_until_ready((self.state, self.metrics))
    if self.first_metrics is None and steps:
      self.first_metrics = {k: float(v) for k, v in jax.device_get(self.metrics).items()} if steps == 1 else {}

  def hlo(self) -> str:
    return self.compiled.as_text()


def build_ours(config: ml_collections.ConfigDict, host_batch: dict, *, name: str = 'ours',
               objective: Objective | None = None, compiler_options: dict | None = None, donate: bool = True,
               settings: dict | None = None, make_step: Callable | None = None) -> OurStep:
  """Builds state and step as `trainer.train` does, on the first device only.

  `objective` replaces `bert_jax.objective.make_objective(config)`; `compiler_options` are XLA debug options for
  this executable; `settings` are `jax.config` options active while state and step are traced; `make_step`
  replaces `trainer.make_train_step` (same signature).
  """
  with contextlib.ExitStack() as stack:
    for key, value in (settings or {}).items():
      stack.enter_context(jax_setting(key, value))
    objective = objective or bert_objective.make_objective(config)
    mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
    setup = trainer.build_setup(config, objective, mesh)
    state = setup.create_state()
    batch = sharding.host_batch_to_global(host_batch, setup.mesh)
    if donate and make_step is None:
      _, jitted = trainer.compile_train_step(setup, objective, config)
    else:  # the same jit as `trainer.compile_train_step`, with the variant's step function or donation
      step_fn = (make_step or trainer.make_train_step)(objective, setup.tx, setup.schedule, config.grad_accum_steps)
      jitted = jax.jit(step_fn, in_shardings=(setup.state_shardings, None),
                       out_shardings=(setup.state_shardings, NamedSharding(setup.mesh, P())),
                       donate_argnums=(0,) if donate else ())
    t = time.perf_counter()
    with jax.set_mesh(setup.mesh), nn.logical_axis_rules(setup.rules):
      lowered = jitted.lower(setup.abstract_state, batch)
    compiled = lowered.compile(compiler_options)
    compile_s = time.perf_counter() - t
  return OurStep(name, compiled, state, batch, objective, setup, compile_s)


def compiled_flops(compiled) -> float:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  return float((cost or {}).get('flops', float('nan')))


def compiled_memory(compiled) -> dict:
  m = compiled.memory_analysis()
  if m is None:
    return {}
  out = {k: int(getattr(m, k)) for k in ('argument_size_in_bytes', 'output_size_in_bytes', 'alias_size_in_bytes',
                                          'temp_size_in_bytes') if hasattr(m, k)}
  # arguments + outputs not aliased to an argument + temporaries (the CPU client's own `peak_memory_in_bytes`
  # counts the arguments only).
  out['peak_bytes'] = max(int(getattr(m, 'peak_memory_in_bytes', 0) or 0),
                          out.get('argument_size_in_bytes', 0) + out.get('output_size_in_bytes', 0)
                          - out.get('alias_size_in_bytes', 0) + out.get('temp_size_in_bytes', 0))
  return out


def tree_bytes(tree) -> int:
  return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)))


# ----------------------------------------------------------------------------------------------------------------
# HF PyTorch: BertForPreTraining + torch.optim.AdamW on the same batch.
# ----------------------------------------------------------------------------------------------------------------

def rss_bytes() -> int:
  with open('/proc/self/statm') as f:
    return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')


def max_rss_bytes() -> int:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@dataclasses.dataclass
class HFStep:
  model: Any
  optimizer: Any
  inputs: dict
  step_fn: Callable[[], Any]
  attn_implementation: str

  def run(self, steps: int) -> None:
    for _ in range(steps):
      self.step_fn()


def build_hf(config: ml_collections.ConfigDict, host_batch: dict, threads: int) -> HFStep:
  import torch
  import transformers
  torch.set_num_threads(threads)
  torch.manual_seed(0)
  hf_config = transformers.BertConfig(**bert_export.config_to_hf(config.model))
  model = transformers.BertForPreTraining(hf_config).float().train()
  ids = torch.from_numpy(host_batch['input_ids'].astype(np.int64))
  labels = torch.full_like(ids, -100)
  positions = torch.from_numpy(host_batch['masked_lm_positions'].astype(np.int64))
  labels.scatter_(1, positions, torch.from_numpy(host_batch['masked_lm_ids'].astype(np.int64)))
  inputs = dict(input_ids=ids, token_type_ids=torch.from_numpy(host_batch['segment_ids'].astype(np.int64)),
                attention_mask=torch.from_numpy(host_batch['input_mask'].astype(np.int64)), labels=labels,
                next_sentence_label=torch.from_numpy(host_batch['next_sentence_labels'].astype(np.int64)))
  decay = [p for n, p in model.named_parameters() if not ('LayerNorm' in n or 'bias' in n)]
  no_decay = [p for n, p in model.named_parameters() if 'LayerNorm' in n or 'bias' in n]
  optim_cfg = config.optim
  optimizer = torch.optim.AdamW([{'params': decay, 'weight_decay': optim_cfg.weight_decay},
                                 {'params': no_decay, 'weight_decay': 0.0}],
                                lr=optim_cfg.learning_rate, betas=(optim_cfg.b1, optim_cfg.b2), eps=optim_cfg.eps)

  def step_fn():
    out = model(**inputs)
    out.loss.backward()
    if optim_cfg.clip_grad_norm > 0:
      torch.nn.utils.clip_grad_norm_(model.parameters(), optim_cfg.clip_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return out.loss

  attn = getattr(model.config, '_attn_implementation', None) or 'default'
  return HFStep(model, optimizer, inputs, step_fn, attn)


def hf_counted_flops(hf: HFStep) -> float:
  """FLOPs of one HF training step as torch's `FlopCounterMode` counts them (matmuls and attention)."""
  from torch.utils.flop_counter import FlopCounterMode
  counter = FlopCounterMode(display=False)
  with counter:
    hf.step_fn()
  return float(counter.get_total_flops())


# ----------------------------------------------------------------------------------------------------------------
# Interleaved timing.
# ----------------------------------------------------------------------------------------------------------------

def interleaved(runners: dict[str, Callable[[int], None]], steps: int, per_round: int,
                cpu: dict[str, list[float]] | None = None) -> dict[str, list[float]]:
  """Wall seconds per step of each runner, one entry per round; rounds alternate the order of the runners.

  `cpu`, if given, receives the process CPU seconds per step (all threads) in the same layout. Under load from
  other processes CPU time varies far less than wall time (a busy machine delays work more than it adds to it).
  """
  names = list(runners)
  times: dict[str, list[float]] = {n: [] for n in names}
  if cpu is not None:
    cpu.update({n: [] for n in names})
  rounds = max(1, math.ceil(steps / per_round))
  for r in range(rounds):
    for name in (names if r % 2 == 0 else names[::-1]):
      t, c = time.perf_counter(), time.process_time()
      runners[name](per_round)
      times[name].append((time.perf_counter() - t) / per_round)
      if cpu is not None:
        cpu[name].append((time.process_time() - c) / per_round)
  return times


def median_ratio(a: list[float], b: list[float]) -> float:
  """Median over rounds of a[i] / b[i]: robust to load that changes between rounds."""
  return statistics.median(x / y for x, y in zip(a, b))


# ----------------------------------------------------------------------------------------------------------------
# Profile: per-op trace events of our step attributed to source functions.
# ----------------------------------------------------------------------------------------------------------------

_SECTION = re.compile(r'^(FileNames|FunctionNames|FileLocations|StackFrames)$')
_INSTR = re.compile(r'^\s*(?:ROOT\s+)?%([^\s=]+)\s*=\s*')


def hlo_instructions(hlo_text: str) -> dict[str, dict]:
  """name -> {opcode, op_name, frames (innermost first: (file, function, line))} for every HLO instruction."""
  tables: dict[str, dict[int, str]] = {k: {} for k in ('FileNames', 'FunctionNames', 'FileLocations', 'StackFrames')}
  section = None
  instructions = {}
  for line in hlo_text.splitlines():
    if _SECTION.match(line):
      section = line
      continue
    if section and re.match(r'^\d+ ', line):
      idx, rest = line.split(' ', 1)
      tables[section][int(idx)] = rest
      continue
    section = None
    m = _INSTR.match(line)
    if not m:
      continue
    rest = line[m.end():]
    if rest.startswith('('):  # tuple shape: skip to its closing parenthesis
      depth = 0
      for i, ch in enumerate(rest):
        depth += ch == '('
        depth -= ch == ')'
        if depth == 0:
          rest = rest[i + 1:]
          break
    else:
      rest = rest.split(' ', 1)[1] if ' ' in rest else ''
    opcode = rest.strip().split('(', 1)[0]
    op_name = re.search(r'op_name="([^"]*)"', line)
    frame = re.search(r'stack_frame_id=(\d+)', line)
    kind = 'ynn' if '__ynn_fusion' in line else 'xnn' if '__xnn_fusion' in line else ''
    instructions[m.group(1)] = dict(opcode=opcode, kind=kind, op_name=op_name.group(1) if op_name else '',
                                    frame=int(frame.group(1)) if frame else 0)

  def field(text, name):
    m = re.search(name + r'=(\d+)', text)
    return int(m.group(1)) if m else 0

  def unquote(text):
    return text.strip().strip('"')

  def frames(frame_id):
    out, seen = [], set()
    while frame_id and frame_id not in seen and frame_id in tables['StackFrames']:
      seen.add(frame_id)
      entry = tables['StackFrames'][frame_id]
      loc = tables['FileLocations'].get(field(entry, 'file_location_id'), '')
      out.append((os.path.basename(unquote(tables['FileNames'].get(field(loc, 'file_name_id'), ''))),
                  unquote(tables['FunctionNames'].get(field(loc, 'function_name_id'), '')), field(loc, 'line')))
      frame_id = field(entry, 'parent_frame_id') - 1  # printed 1-based; 0 means no parent
    return out

  for info in instructions.values():
    info['frames'] = frames(info.pop('frame'))
  return instructions


_OPTIMIZER_FILES = ('optim.py', 'transform.py', 'update.py', 'numerics.py', 'linear_algebra.py', '_tree_math.py',
                    '_combining.py', 'base.py', 'alias.py')


def shared_op_category(file: str, function: str, is_dot: bool) -> str | None:
  """The step parts every model has (dropout, tied vocab projection, LayerNorm, embedding, optimizer), by one
  source frame; None when the frame names none of them (the model's own table decides)."""
  if function == 'Dropout.__call__':
    return 'dropout (random bits, mask, scaling)'
  if function == 'Embed.attend':
    return 'matmul: tied vocab projection' if is_dot else 'vocab projection: layout copies'
  if function == 'LayerNorm.__call__':
    return 'LayerNorm'
  if function == 'Embed.__call__':
    return 'embedding lookup + scatter-add grad'
  if file in _OPTIMIZER_FILES or function.startswith('apply_updates'):
    return 'optimizer (AdamW, clipping, norms)'
  if file == 'trainer.py' and '<lambda>' in function:
    return 'optimizer (AdamW, clipping, norms)'  # the non-finite guard, fused into the update
  return None


def sourceless_op_category(info: dict) -> str:
  """An op no frame placed: state and layout copies, or step bookkeeping."""
  if not info['frames'] and info['opcode'] in ('copy', 'fusion', 'transpose'):
    return 'copies without source (state copies, layouts)'
  return 'other (step bookkeeping, metrics)'


def op_category(info: dict) -> str:
  """Which part of the step an HLO op (forward or backward) belongs to: the innermost source frame that names a
  known part decides (a backward op carries the stack of the forward op it differentiates)."""
  is_dot = 'dot_general' in info['op_name'] or info['opcode'] in ('dot', 'convolution')
  for file, function, _ in info['frames']:
    shared = shared_op_category(file, function, is_dot)
    if shared:
      return shared
    if function in ('add_bias_matmul_grad', '_add_bias_fwd', '_add_bias_bwd'):
      return 'MLM head: gather, output bias + its grad'
    if function == 'dot_product_attention':
      return 'matmul: attention scores / context' if is_dot else 'attention softmax + mask'
    if 'softmax_cross_entropy' in function or function == 'mlm_nsp_sums':
      return 'MLM / NSP loss (log-softmax, argmax, grad)'
    if function == 'DenseGeneral.__call__':
      return 'matmul: dense layers' if is_dot else 'dense bias add / bias grad / layout'
    if function.startswith('BertLayer.__call__'):
      return 'encoder elementwise (GELU, residual)'
    if function.startswith('BertForPreTraining'):  # the model or a variant's subclass
      return 'MLM head: gather, output bias + its grad'
    if function == 'BertModel.__call__':
      return 'encoder elementwise (GELU, residual)'
  if 'dot_general' in info['op_name'] or info['opcode'] == 'dot':
    return 'matmul: dense layers'
  return sourceless_op_category(info)


def trace_op_times(step: OurStep, steps: int) -> tuple[dict[str, float], float]:
  """Runs `steps` steps under `jax.profiler.trace`; returns (op name -> summed event seconds per step, wall s/step)."""
  directory = tempfile.mkdtemp(prefix='bert_profile_')
  try:
    with jax.profiler.trace(directory):
      t = time.perf_counter()
      step.run(steps)
      wall = (time.perf_counter() - t) / steps
    files = glob.glob(os.path.join(directory, '**', '*.xplane.pb'), recursive=True)
    data = jax.profiler.ProfileData.from_file(files[0])
    totals: dict[str, float] = collections.defaultdict(float)
    for plane in data.planes:
      for line in plane.lines:
        for event in line.events:
          totals[event.name] += event.duration_ns * 1e-9 / steps
    return dict(totals), wall
  finally:
    shutil.rmtree(directory, ignore_errors=True)


def step_matmuls(config: ml_collections.ConfigDict) -> list[tuple[str, tuple[int, ...], int]]:
  """The matmuls of one training step as (name, (batch, M, K, N), count): forward, input grad, weight grad."""
  m, d = config.model, config.data
  tokens = config.global_batch_size * d.max_seq_length
  preds = config.global_batch_size * d.max_predictions_per_seq
  h, f, v, n = m.hidden_size, m.intermediate_size, m.vocab_size, m.num_hidden_layers
  heads, s = m.num_attention_heads, d.max_seq_length
  bh, hd = config.global_batch_size * heads, h // heads
  return [
      ('q/k/v/o fwd + input grad', (1, tokens, h, h), 8 * n),
      ('q/k/v/o weight grad', (1, h, tokens, h), 4 * n),
      ('ffn in fwd, ffn out input grad', (1, tokens, h, f), 2 * n),
      ('ffn out fwd, ffn in input grad', (1, tokens, f, h), 2 * n),
      ('ffn weight grads', (1, h, tokens, f), 2 * n),
      ('attention q.k / grads', (bh, s, hd, s), 3 * n),
      ('attention p.v / grads', (bh, s, s, hd), 3 * n),
      ('mlm transform (3x)', (1, preds, h, h), 3),
      ('vocab logits fwd', (1, preds, h, v), 1),
      ('vocab input grad', (1, preds, v, h), 1),
      ('vocab (embedding) weight grad', (1, v, preds, h), 1),
  ]


def matmul_roofline(config: ml_collections.ConfigDict, steps: int, per_round: int) -> list[dict]:
  """Times every matmul shape of the step alone (fp32, row-major operands), interleaved with each other and with a
  2048^2 square matmul (the last row, count 0) as the reference for the same load."""
  fns, runners = {}, {}
  for name, (b, m, k, n), count in step_matmuls(config):
    x = jnp.ones((b, m, k), jnp.float32)
    y = jnp.ones((b, k, n), jnp.float32)
    fn = jax.jit(lambda x, y: jnp.einsum('bmk,bkn->bmn', x, y))
    fn(x, y).block_until_ready()

    def run(reps, fn=fn, x=x, y=y):
      for _ in range(reps):
        out = fn(x, y)
      out.block_until_ready()
    fns[name] = (b, m, k, n, count)
    runners[name] = run
  size = 2048
  a = jnp.ones((size, size), jnp.float32)
  square = jax.jit(lambda x: x @ x)
  square(a).block_until_ready()

  def run_square(reps):
    for _ in range(reps):
      out = square(a)
    out.block_until_ready()
  runners[f'{size}^2 square'] = run_square
  fns[f'{size}^2 square'] = (1, size, size, size, 0)
  times = interleaved(runners, steps, per_round)
  rows = []
  for name, (b, m, k, n, count) in fns.items():
    seconds = statistics.median(times[name])
    rows.append(dict(name=name, shape=(b, m, k, n), count=count, flops=2.0 * b * m * k * n * count,
                     seconds=seconds * count, gflops_per_s=2.0 * b * m * k * n / seconds / 1e9))
  return rows


def profile_ours(config, host_batch, baseline: OurStep, steps: int, per_round: int) -> dict:
  """Per-op breakdown (a separately compiled copy with trace events) and forward / backward / optimizer split."""
  print('\n== Profile of our step ==', flush=True)
  traced = build_ours(config, host_batch, name='traced', compiler_options={'xla_cpu_enable_xprof_traceme': True})
  traced.run(2)
  op_times, wall = trace_op_times(traced, steps)
  instructions = hlo_instructions(traced.hlo())
  skip_opcodes = {'while', 'conditional', 'call'}
  per_op = {n: s for n, s in op_times.items() if n in instructions and instructions[n]['opcode'] not in skip_opcodes}
  total = sum(per_op.values())
  by_category: dict[str, float] = collections.defaultdict(float)
  for name, seconds in per_op.items():
    by_category[op_category(instructions[name])] += seconds
  print(f'traced step: {wall * 1e3:.0f} ms wall; ops sum to {total * 1e3:.0f} ms '
        f'(ops on both threads count; op time / wall = {total / wall:.2f})')
  print(f'{"category (forward + backward)":52s} {"ms/step":>9s} {"share":>7s}')
  for cat, seconds in sorted(by_category.items(), key=lambda kv: -kv[1]):
    print(f'{cat:52s} {seconds * 1e3:9.1f} {seconds / total:7.1%}')
  print(f'\n{"top ops":60s} {"ms/step":>9s}  source')
  top = sorted(per_op.items(), key=lambda kv: -kv[1])[:15]
  for name, seconds in top:
    info = instructions[name]
    where = next((f'{fn} ({f}:{ln})' for f, fn, ln in info['frames']), info['op_name'][-60:])
    print(f'{name[:60]:60s} {seconds * 1e3:9.1f}  {where}')

  # Forward-only and forward+backward programs of the same loss, interleaved with the full step.
  objective, setup = baseline.objective, baseline.setup
  params = baseline.state.params
  rng = jax.random.PRNGKey(1)

  def loss(params, batch, rng):
    return objective.loss_fn(params, batch, rng, {}, objective.normalizers(batch), True)[0]

  with jax.set_mesh(setup.mesh), nn.logical_axis_rules(setup.rules):
    forward = jax.jit(loss).lower(params, baseline.batch, rng).compile()
    grad = jax.jit(jax.value_and_grad(loss)).lower(params, baseline.batch, rng).compile()

  def runner(fn):
    def run(k):
      out = None
      for _ in range(k):
        out = fn(baseline.state.params, baseline.batch, rng)
      jax.block_until_ready(out)
    return run

  runner(forward)(1)
  runner(grad)(1)
  times = interleaved({'forward': runner(forward), 'forward+backward': runner(grad), 'full step': baseline.run},
                      steps, per_round)
  full = statistics.median(times['full step'])
  split = {k: statistics.median(v) for k, v in times.items()}
  print(f'\n{"program":30s} {"ms":>8s} {"of step":>8s}')
  for name, seconds in split.items():
    print(f'{name:30s} {seconds * 1e3:8.1f} {seconds / full:8.1%}')
  print(f'=> backward ~ {(split["forward+backward"] - split["forward"]) * 1e3:.0f} ms, optimizer + guard ~ '
        f'{(full - split["forward+backward"]) * 1e3:.0f} ms')

  # The same matmuls alone: what the step would take if everything else were free.
  rows = matmul_roofline(config, 3 * per_round, per_round)
  peak = rows.pop()['gflops_per_s'] * 1e9
  mm_total = sum(r['seconds'] for r in rows)
  mm_flops = sum(r['flops'] for r in rows)
  print(f'\n{"matmul alone (fp32)":34s} {"[batch, M, K, N]":>22s} {"x":>4s} {"GFLOP/s":>8s} {"ms/step":>8s}')
  for r in rows:
    print(f'{r["name"]:34s} {str(list(r["shape"])):>22s} {r["count"]:4d} {r["gflops_per_s"]:8.0f} '
          f'{r["seconds"] * 1e3:8.1f}')
  print(f'=> the step\'s {mm_flops / 1e9:.1f} GFLOP of matmuls take {mm_total * 1e3:.0f} ms alone '
        f'({mm_flops / mm_total / 1e9:.0f} GFLOP/s; a 2048^2 matmul, interleaved: {peak / 1e9:.0f} GFLOP/s), '
        f'{mm_total / full:.0%} of the full step ({full * 1e3:.0f} ms)')
  return dict(traced_wall_s=wall, op_sum_s=total, categories_s=dict(by_category),
              top_ops_s={n: s for n, s in top}, programs_s=split, matmuls=rows, matmuls_alone_s=mm_total,
              peak_now=peak)


# ----------------------------------------------------------------------------------------------------------------
# Experiments: variants of our step against the baseline.
# ----------------------------------------------------------------------------------------------------------------

@jax.custom_vjp
def add_bias_matmul_grad(x: jax.Array, bias: jax.Array) -> jax.Array:
  """`x [..., n] + bias [n]` whose bias gradient is `ones[1, rows] @ g[rows, n]` (a matmul) instead of a reduction
  over the leading axes, which XLA's CPU reduction emitters run far below memory bandwidth."""
  return x + bias


def _add_bias_fwd(x, bias):
  return x + bias, None


def _add_bias_bwd(_, g):
  rows = g.reshape(-1, g.shape[-1])
  return g, (jnp.ones((1, rows.shape[0]), rows.dtype) @ rows)[0]


add_bias_matmul_grad.defvjp(_add_bias_fwd, _add_bias_bwd)


class BertForPreTrainingBiasMatmulGrad(bert_model.BertForPreTraining):
  """`bert_jax.model.BertForPreTraining` (same parameters) with the MLM output bias added by
  `add_bias_matmul_grad`: the candidate change, kept here until it is measured to pay."""

  @nn.compact
  def __call__(self, input_ids, segment_ids=None, input_mask=None, masked_lm_positions=None, *,
               deterministic: bool = True):
    from common import layers
    cfg = self.config
    sequence, pooled, word = bert_model.BertModel(cfg, self.dtype, self.remat, name='bert')(
        input_ids, segment_ids, input_mask, deterministic=deterministic)
    init = layers.truncated_normal(cfg.initializer_range)
    h = sequence if masked_lm_positions is None else bert_model.gather_positions(sequence, masked_lm_positions)
    h = layers.DenseGeneral((cfg.hidden_size,), ('embed', 'act_embed'), kernel_init=init, dtype=self.dtype,
                            name='mlm_transform')(h)
    h = layers.activation(cfg.hidden_act)(h)
    h = layers.LayerNorm(cfg.layer_norm_eps, self.dtype, name='mlm_LayerNorm')(h)
    mlm_bias = self.param('mlm_output_bias', layers.with_axes(nn.initializers.zeros, ('vocab',)),
                          (cfg.vocab_size,), jnp.float32)
    mlm_logits = add_bias_matmul_grad(word.attend(h).astype(jnp.float32), mlm_bias)
    mlm_logits = layers.constrain(mlm_logits, ('batch', None, 'act_vocab'))
    nsp_logits = layers.DenseGeneral((2,), ('embed', 'classes'), kernel_init=init, dtype=self.dtype,
                                     name='nsp')(pooled).astype(jnp.float32)
    return mlm_logits, nsp_logits


def nll_and_correct_no_argmax(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(logsumexp(logits) - logits[label], logits[label] >= max(logits)): the loss of
  `optax.softmax_cross_entropy_with_integer_labels` (up to rounding) and an accuracy that reuses the row max
  instead of a separate argmax pass over `[batch, P, vocab]` (ties count as correct)."""
  label_logit = jnp.take_along_axis(logits, labels[..., None].astype(jnp.int32), -1)[..., 0]
  row_max = jax.lax.stop_gradient(jnp.max(logits, -1))
  lse = row_max + jnp.log(jnp.sum(jnp.exp(logits - row_max[..., None]), -1))
  return lse - label_logit, (label_logit >= row_max).astype(jnp.float32)


def variant_objective(config: ml_collections.ConfigDict, *, bias_matmul_grad: bool = False,
                      loss_no_argmax: bool = False) -> Objective:
  """`bert_jax.objective.make_objective(config)` with the candidate MLM-head / loss changes switched on."""
  base = bert_objective.make_objective(config)
  if bias_matmul_grad:
    model = BertForPreTrainingBiasMatmulGrad(config.model, bert_objective.compute_dtype(config.dtype),
                                             remat=config.remat)
  else:
    model = bert_objective.make_model(config)
  use_nsp = bool(config.data.next_sentence)

  def sums_no_argmax(mlm_logits, nsp_logits, batch):
    weights = batch['masked_lm_weights'].astype(jnp.float32)
    nll, correct = nll_and_correct_no_argmax(mlm_logits, batch['masked_lm_ids'])
    sums = dict(mlm_loss=jnp.sum(nll * weights), mlm_correct=jnp.sum(correct * weights))
    if use_nsp:
      nsp_nll, nsp_correct = nll_and_correct_no_argmax(nsp_logits, batch['next_sentence_labels'])
      sums.update(nsp_loss=jnp.sum(nsp_nll), nsp_correct=jnp.sum(nsp_correct))
    return sums

  def loss_fn(params, batch, rng, aux, norms, train):
    mlm_logits, nsp_logits = model.apply(
        {'params': params}, batch['input_ids'], batch['segment_ids'], batch['input_mask'],
        batch['masked_lm_positions'], deterministic=not train, rngs={'dropout': rng})
    if loss_no_argmax:
      sums = sums_no_argmax(mlm_logits, nsp_logits, batch)
    else:
      sums = bert_objective.mlm_nsp_sums(mlm_logits, nsp_logits, batch, use_nsp)
    loss = sums['mlm_loss'] / norms['mlm']
    if use_nsp:
      loss = loss + sums['nsp_loss'] / norms['nsp']
    return loss, (sums, aux)

  return dataclasses.replace(base, loss_fn=loss_fn)


def no_dropout_objective(config: ml_collections.ConfigDict) -> Objective:
  """Dropout probabilities 0 (an upper bound on what dropout costs; not a pretraining setting)."""
  config = ml_collections.ConfigDict(config.to_dict())
  config.model.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
  return bert_objective.make_objective(config)


def make_train_step_guard(guard: str) -> Callable:
  """`trainer.make_train_step` (no accumulation) with another form of the non-finite guard.

  guard='none': the update is applied unconditionally (same numbers as the trainer whenever loss and gradients are
  finite). guard='cond': the optimizer update runs inside `lax.cond(ok, update, keep)` instead of computing the
  update and then selecting `where(ok, new, old)` over params and optimizer state.
  """
  def make(objective, tx, schedule, accum_steps):
    if accum_steps != 1:
      raise ValueError('the guard variants support grad_accum_steps=1 only')
    grad_fn = jax.value_and_grad(objective.loss_fn, has_aux=True)

    def train_step(state, batch):
      rng = jax.random.fold_in(state.rng, state.step)
      norms = objective.normalizers(batch)
      (loss, (sums, aux)), grads = grad_fn(state.params, batch, rng, state.aux, norms, True)
      grad_norm = optax.global_norm(grads)
      ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

      def update(params, opt_state):
        updates, new_opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), new_opt_state

      if guard == 'none':
        new_params, new_opt_state = update(state.params, state.opt_state)
      else:
        new_params, new_opt_state = jax.lax.cond(ok, update, lambda p, o: (p, o), state.params, state.opt_state)
      new_state = state.replace(
          step=state.step + 1, params=new_params, opt_state=new_opt_state, aux=aux,
          skipped=state.skipped + (1 - ok.astype(jnp.int32)), bad_streak=jnp.where(ok, 0, state.bad_streak + 1))
      metrics = dict(objective.finalize(sums, norms))
      metrics.update(loss=loss, grad_norm=grad_norm, learning_rate=schedule(state.step),
                     step_ok=ok.astype(jnp.float32), skipped_steps=new_state.skipped.astype(jnp.float32),
                     nonfinite_streak=new_state.bad_streak.astype(jnp.float32))
      return new_state, metrics

    return train_step
  return make


@dataclasses.dataclass(frozen=True)
class Variant:
  name: str
  semantics: str         # 'exact' (same fp32 arithmetic), 'reordered' (same math, other rounding/order),
                         # 'rng' (same distribution, other dropout stream), 'approx' (changes the numbers)
  what: str
  compiler_options: dict | None = None
  settings: dict | None = None
  donate: bool = True
  dtype: str | None = None
  objective: Callable[[ml_collections.ConfigDict], Objective] | None = None
  make_step: Callable | None = None


VARIANTS = (
    Variant('no-donation', 'exact', 'jit without donate_argnums (state copied, not updated in place)', donate=False),
    Variant('precision-highest', 'exact', "jax_default_matmul_precision='highest'",
            settings={'jax_default_matmul_precision': 'highest'}),
    Variant('concurrency-scheduler', 'exact', '--xla_cpu_enable_concurrency_optimized_scheduler=true',
            compiler_options={'xla_cpu_enable_concurrency_optimized_scheduler': True}),
    Variant('ynn-off', 'exact', "--xla_cpu_experimental_ynn_fusion_type='' (no YNNPACK: XLA's own dot/loop emitters)",
            compiler_options={'xla_cpu_experimental_ynn_fusion_type': ''}),
    Variant('ynn-dot-only', 'exact', '--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_DOT',
            compiler_options={'xla_cpu_experimental_ynn_fusion_type': 'LIBRARY_FUSION_TYPE_DOT'}),
    Variant('ynn-individual-dot', 'exact', '--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT',
            compiler_options={'xla_cpu_experimental_ynn_fusion_type': 'LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT'}),
    Variant('onednn', 'exact', '--xla_cpu_use_onednn=true', compiler_options={'xla_cpu_use_onednn': True}),
    Variant('xnn-graph', 'exact', '--xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY',
            compiler_options={'xla_cpu_experimental_xnn_graph_fusion_mode': 'XNN_GRAPH_FUSION_MODE_GREEDY'}),
    Variant('single-thread', 'exact', '--xla_cpu_multi_thread_eigen=false',
            compiler_options={'xla_cpu_multi_thread_eigen': False}),
    Variant('mlm-bias-matmul-grad', 'reordered', 'MLM output-bias gradient as ones @ dlogits (custom_vjp) instead '
            'of a reduce over [batch, P]', objective=lambda c: variant_objective(c, bias_matmul_grad=True)),
    Variant('loss-no-argmax', 'reordered', 'MLM/NSP nll = logsumexp - logit[label]; accuracy from the row max '
            '(no argmax pass)', objective=lambda c: variant_objective(c, loss_no_argmax=True)),
    Variant('mlm-head-both', 'reordered', 'mlm-bias-matmul-grad + loss-no-argmax',
            objective=lambda c: variant_objective(c, bias_matmul_grad=True, loss_no_argmax=True)),
    Variant('guard-cond', 'exact', 'non-finite guard as lax.cond around the optimizer update instead of '
            'where(ok, new, old) over params + optimizer state', make_step=make_train_step_guard('cond')),
    Variant('no-guard', 'exact', 'no non-finite guard (equal results while everything is finite; measures what the '
            'guard costs)', make_step=make_train_step_guard('none')),
    Variant('rbg-dropout', 'rng', "jax_default_prng_impl='rbg' (XLA RngBitGenerator instead of threefry)",
            settings={'jax_default_prng_impl': 'rbg'}),
    Variant('unsafe-rbg-dropout', 'rng', "jax_default_prng_impl='unsafe_rbg'",
            settings={'jax_default_prng_impl': 'unsafe_rbg'}),
    Variant('fast-math', 'approx', '--xla_cpu_enable_fast_math=true',
            compiler_options={'xla_cpu_enable_fast_math': True}),
    Variant('bfloat16', 'approx', 'compute dtype bfloat16 (parameters float32)', dtype='bfloat16'),
    Variant('no-dropout', 'approx', 'dropout probabilities 0 (upper bound on the cost of dropout)',
            objective=no_dropout_objective),
)


def run_experiments(args, config, host_batch, baseline: OurStep) -> list[dict]:
  print('\n== Experiments: variants of our step, each interleaved with the baseline ==', flush=True)
  wanted = {n.strip() for n in args.only.split(',') if n.strip()}
  unknown = wanted - {v.name for v in VARIANTS}
  if unknown:
    raise SystemExit(f'--only: unknown variants {sorted(unknown)}; choose from {[v.name for v in VARIANTS]}')
  base_hlo = baseline.hlo()
  results = []
  print(f'{"variant":24s} {"semantics":10s} {"compile s":>9s} {"base ms":>8s} {"variant ms":>10s} '
        f'{"speedup":>8s} {"(cpu)":>6s} {"|dloss|":>8s}  what')
  print('(speedup: median over rounds of base/variant wall time; (cpu): the same with process CPU time; |dloss|: '
        'first-step loss from the same initial state and batch, against the baseline)')
  for variant in VARIANTS:
    if wanted and variant.name not in wanted:
      continue
    cfg = config
    if variant.dtype:
      cfg = ml_collections.ConfigDict(config.to_dict())
      cfg.dtype = variant.dtype
    try:
      step = build_ours(cfg, host_batch, name=variant.name,
                        objective=variant.objective(cfg) if variant.objective else None,
                        compiler_options=variant.compiler_options, donate=variant.donate, settings=variant.settings,
                        make_step=variant.make_step)
    except Exception as e:  # an option this XLA build does not know: report and go on
      print(f'{variant.name:24s} {variant.semantics:10s} failed to build: {str(e).splitlines()[0][:120]}')
      results.append(dict(name=variant.name, semantics=variant.semantics, what=variant.what, error=str(e)))
      continue
    same_hlo = step.hlo() == base_hlo
    step.run(1)
    step.run(max(args.warmup - 1, 0))
    ref, got = baseline.first_metrics or {}, step.first_metrics or {}
    loss_diff = abs(got.get('loss', math.nan) - ref.get('loss', math.nan))
    cpu: dict[str, list[float]] = {}
    times = interleaved({'base': baseline.run, 'variant': step.run}, args.steps, args.round, cpu)
    speedup = median_ratio(times['base'], times['variant'])
    speedup_cpu = median_ratio(cpu['base'], cpu['variant'])
    base_ms, var_ms = statistics.median(times['base']) * 1e3, statistics.median(times['variant']) * 1e3
    note = ' [identical HLO]' if same_hlo else ''
    print(f'{variant.name:24s} {variant.semantics:10s} {step.compile_s:9.1f} {base_ms:8.0f} {var_ms:10.0f} '
          f'{speedup:7.2f}x {speedup_cpu:5.2f}x {loss_diff:8.1e}  {variant.what}{note}', flush=True)
    results.append(dict(name=variant.name, semantics=variant.semantics, what=variant.what, speedup=speedup,
                        speedup_cpu_time=speedup_cpu, base_ms=base_ms, variant_ms=var_ms,
                        base_s_rounds=times['base'], variant_s_rounds=times['variant'],
                        base_cpu_s_rounds=cpu['base'], variant_cpu_s_rounds=cpu['variant'],
                        first_step_loss_diff=loss_diff,
                        compile_s=step.compile_s, identical_hlo=same_hlo, memory=compiled_memory(step.compiled)))
    del step
  return results


# ----------------------------------------------------------------------------------------------------------------
# Main.
# ----------------------------------------------------------------------------------------------------------------

def fmt_bytes(n: float) -> str:
  return f'{n / 2 ** 20:.0f} MiB'


def main(argv=None) -> dict:
  started = time.perf_counter()
  args = parse_args(argv)
  if 'xla_force_host_platform_device_count' in os.environ.get('XLA_FLAGS', ''):
    print('note: XLA_FLAGS asks for fake CPU devices; the benchmark uses the first device only', file=sys.stderr)
  threads = args.threads or cores()
  config = bert_config(args)
  host_batch = make_batch(args.batch, args.seq, args.predictions, args.vocab)
  tokens = args.batch * args.seq
  out: dict[str, Any] = dict(dims=dict(layers=args.layers, hidden=args.hidden, heads=args.heads,
                                       intermediate=args.intermediate, vocab=args.vocab, seq=args.seq,
                                       batch=args.batch, predictions=args.predictions, dtype=args.dtype),
                             cores=cores(), torch_threads=threads, device=str(jax.devices()[0]),
                             jax_version=jax.__version__)
  print(f'BERT pretraining step, {args.layers} layers, hidden {args.hidden}, {args.heads} heads, intermediate '
        f'{args.intermediate}, vocab {args.vocab}, seq {args.seq}, batch {args.batch}, {args.predictions} '
        f'predictions/seq, {args.dtype}; {cores()} cores; jax {jax.__version__}', flush=True)

  # HF first, so the process's peak RSS before it is the current RSS and the delta is HF's own.
  hf = None
  if not args.no_hf:
    import torch
    import transformers
    rss0 = rss_bytes()
    hf = build_hf(config, host_batch, threads)
    hf_flops_counted = hf_counted_flops(hf)  # the first warm-up step
    hf.run(max(args.warmup - 1, 0))
    hf_rss_delta = max_rss_bytes() - rss0
    hf_state_bytes = sum(p.numel() * p.element_size() for p in hf.model.parameters()) + sum(
        t.numel() * t.element_size() for s in hf.optimizer.state.values() for t in s.values()
        if torch.is_tensor(t))
    out.update(torch_version=torch.__version__, transformers_version=transformers.__version__,
               hf_attn_implementation=hf.attn_implementation)

  peak_jax, peak_jax_cpu = jax_matmul_peak()
  peak_torch = torch_matmul_peak()[0] if hf is not None else float('nan')

  ours = build_ours(config, host_batch)
  ours.run(1)
  ours.run(max(args.warmup - 1, 0))
  flops_ours = ours.objective.flops_per_example * args.batch
  flops_xla = compiled_flops(ours.compiled)
  memory = compiled_memory(ours.compiled)
  state_bytes = tree_bytes(ours.state)

  runners = {'ours': ours.run}
  if hf is not None:
    runners['hf'] = hf.run
  cpu: dict[str, list[float]] = {}
  times = interleaved(runners, args.steps, args.round, cpu)
  again = jax_matmul_peak()
  peak_jax, peak_jax_cpu = max(peak_jax, again[0]), max(peak_jax_cpu, again[1])
  if hf is not None:
    peak_torch = max(peak_torch, torch_matmul_peak()[0])

  t_ours = statistics.median(times['ours'])
  cpu_ours = statistics.median(cpu['ours'])
  res = dict(peak_flops_jax=peak_jax, peak_flops_per_cpu_s_jax=peak_jax_cpu, peak_flops_torch=peak_torch,
             compile_s=ours.compile_s,
             ours=dict(step_s=t_ours, step_s_rounds=times['ours'], cpu_s_rounds=cpu['ours'], cpu_s=cpu_ours,
                       tokens_per_s=tokens / t_ours, flops_analytic=flops_ours, flops_xla=flops_xla,
                       mfu=flops_ours / t_ours / peak_jax, mfu_xla_flops=flops_xla / t_ours / peak_jax,
                       mfu_cpu_time=flops_ours / cpu_ours / peak_jax_cpu, memory=memory, state_bytes=state_bytes))
  flops_hf = bert_model.flops_per_example(config.model, args.seq, args.seq) * args.batch
  if hf is not None:
    t_hf, cpu_hf = statistics.median(times['hf']), statistics.median(cpu['hf'])
    res['hf'] = dict(step_s=t_hf, step_s_rounds=times['hf'], cpu_s_rounds=cpu['hf'], cpu_s=cpu_hf,
                     tokens_per_s=tokens / t_hf, flops_analytic=flops_hf, flops_counted=hf_flops_counted,
                     mfu=flops_hf / t_hf / peak_jax, mfu_useful=flops_ours / t_hf / peak_jax,
                     mfu_cpu_time=flops_hf / cpu_hf / peak_jax_cpu, rss_delta_bytes=hf_rss_delta,
                     state_bytes=hf_state_bytes)
    res['ratio_tokens_per_s'] = median_ratio(times['hf'], times['ours'])
    res['ratio_cpu_time'] = median_ratio(cpu['hf'], cpu['ours'])
  out.update(res)

  # --- report ---------------------------------------------------------------------------------------------------
  o = res['ours']
  print(f'\nfp32 matmul peak: JAX {peak_jax / 1e9:.0f} GFLOP/s ({peak_jax_cpu / 1e9:.0f} GFLOP per CPU-second), '
        f'torch {peak_torch / 1e9:.0f} GFLOP/s (best of 2048^2 and 3072^2, before and after timing); MFU is '
        f'against JAX\'s')
  print(f'our step compiled in {ours.compile_s:.1f} s; {len(times["ours"])} rounds of {args.round} steps each side\n')
  rows = [('', 'ours (JAX)', 'HF (PyTorch)')]
  h = res.get('hf')
  na = '-'
  rows += [
      ('step time (median) ms', f'{o["step_s"] * 1e3:.0f}', f'{h["step_s"] * 1e3:.0f}' if h else na),
      ('  fastest round ms', f'{min(times["ours"]) * 1e3:.0f}', f'{min(times["hf"]) * 1e3:.0f}' if h else na),
      ('  CPU time/step (all threads) s', f'{o["cpu_s"]:.2f}', f'{h["cpu_s"]:.2f}' if h else na),
      ('tokens/s', f'{o["tokens_per_s"]:.0f}', f'{h["tokens_per_s"]:.0f}' if h else na),
      ('model GFLOP/step (analytic)', f'{flops_ours / 1e9:.1f}', f'{flops_hf / 1e9:.1f}'),
      ('GFLOP/step counted', f'{flops_xla / 1e9:.1f} (XLA)', f'{h["flops_counted"] / 1e9:.1f} (torch)' if h else na),
      ('MFU (own analytic FLOPs)', f'{o["mfu"]:.1%}', f'{h["mfu"]:.1%}' if h else na),
      ('MFU (our FLOPs = useful work)', f'{o["mfu"]:.1%}', f'{h["mfu_useful"]:.1%}' if h else na),
      ('MFU by CPU time (own FLOPs)', f'{o["mfu_cpu_time"]:.1%}', f'{h["mfu_cpu_time"]:.1%}' if h else na),
      ('memory', f'{fmt_bytes(memory.get("peak_bytes", 0))} compiled peak',
       f'{fmt_bytes(h["rss_delta_bytes"])} RSS delta' if h else na),
      ('  of which params + optimizer', fmt_bytes(state_bytes), fmt_bytes(h['state_bytes']) if h else na),
  ]
  width = max(len(r[0]) for r in rows) + 2
  for r in rows:
    print(f'{r[0]:{width}s}{r[1]:>26s}{r[2]:>26s}')
  if h:
    print(f'\nours / HF tokens/s: {res["ratio_tokens_per_s"]:.2f}x (median over rounds of the per-round ratio); '
          f'by CPU time: {res["ratio_cpu_time"]:.2f}x')
    print(f'HF runs the MLM transform and vocab projection at all {args.seq} positions ({flops_hf / 1e9:.1f} vs '
          f'{flops_ours / 1e9:.1f} GFLOP/step); attention implementation: {hf.attn_implementation}')
  print(f'XLA temp buffers {fmt_bytes(memory.get("temp_size_in_bytes", 0))}, arguments '
        f'{fmt_bytes(memory.get("argument_size_in_bytes", 0))} (state donated: alias '
        f'{fmt_bytes(memory.get("alias_size_in_bytes", 0))})', flush=True)

  print(f'({time.perf_counter() - started:.0f} s so far)', flush=True)
  if args.profile:
    out['profile'] = profile_ours(config, host_batch, ours, args.steps, args.round)
  if args.experiments:
    out['experiments'] = run_experiments(args, config, host_batch, ours)
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(out, f, indent=2, default=float)
    print(f'\nwrote {args.json}')
  return out


if __name__ == '__main__':
  main()
