"""BERT-base and XLNet-base pretraining steps on an accelerator: MFU against a matmul peak measured in the same run,
each compute dtype and attention path of ours, and HF PyTorch on the same device and batch.

  python -m benchmarks.accelerator --json /tmp/acc.json                 # both models, base dims, seq 128
  python -m benchmarks.accelerator --models bert --batch 128 --steps 5  # fewer
  python -m benchmarks.accelerator --tiny                               # a CPU smoke run of the whole script

What runs, on the first device of JAX's default backend (a GPU or TPU; the CPU only with --tiny):
  peaks      square `[n, n] x [n, n]` matmuls in JAX, bfloat16 and float32 (default precision), random data, the
             median of timed calls after warm-up, before and after the steps; MFU is against the peak of the
             step's compute dtype;
  attention  `common.attention.fused_attention` (the 'fused' route: cuDNN's kernel where it takes the call)
             against the materialised kernel in float32 at highest precision on the same bfloat16 inputs with a
             padding mask, outputs and gradients, relative errors; and whether the compiled program holds a cuDNN
             attention call;
  steps      our real train step (`harness.build_jax_step`: the recipe's objective, AdamW, clipping, the
             non-finite guard, dropout on, state donated) at BERT-base / XLNet-base dims: bfloat16 (what the base
             configs run), float32, and for BERT bfloat16 with the 'fused' attention (attention-probability dropout
             0, which the fused kernel requires); HF PyTorch (`BertForPreTraining` / `XLNetLMHeadModel`, its
             default attention, float32 weights under `torch.autocast(bfloat16)`, fused AdamW, clipping) timed
             in alternation with our bfloat16 step.

Every item is printed when done and the JSON is rewritten after each, so a run stopped at a time limit keeps what
it measured. Step times are medians of rounds of `--steps` steps (`harness.interleaved`: the order alternates),
each round ending on a device sync.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import re
import statistics
import time
import traceback

os.environ.setdefault('JAX_PLATFORMS', '')  # any backend (the harness alone would pin the CPU)
os.environ.setdefault('XLA_PYTHON_CLIENT_MEM_FRACTION', '0.45')  # torch shares the device in this process

# pylint: disable=wrong-import-position
from benchmarks import harness  # noqa: E402
from benchmarks import bert_pretrain, xlnet_pretrain  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from bert_jax import model as bert_model  # noqa: E402
from common import attention  # noqa: E402

BASE = dict(layers=12, hidden=768, heads=12, intermediate=3072, vocab=32000)
TINY = dict(layers=2, hidden=64, heads=4, intermediate=128, vocab=1000)
STEPS = ('bert:bfloat16', 'bert:bfloat16:fused', 'bert:float32', 'xlnet:bfloat16', 'xlnet:float32')


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog='python -m benchmarks.accelerator', description=__doc__.split('\n')[0])
  p.add_argument('--models', default='bert,xlnet', help='comma-separated: bert, xlnet')
  p.add_argument('--seq', type=int, default=128)
  p.add_argument('--batch', type=int, default=128, help='global batch of every step (BERT and XLNet)')
  p.add_argument('--predictions', type=int, default=20, help='BERT MLM positions / XLNet targets per row')
  p.add_argument('--steps', type=int, default=10, help='steps per timed round')
  p.add_argument('--rounds', type=int, default=3, help='timed rounds of each step')
  p.add_argument('--no-hf', action='store_true', help='time ours only')
  p.add_argument('--no-fp32', action='store_true', help='skip the float32 steps')
  p.add_argument('--only', default='', help=f'comma-separated steps to run, of {", ".join(STEPS)} (default: all '
                 'of --models)')
  p.add_argument('--peak-size', type=int, default=8192, help='n of the square peak matmuls')
  p.add_argument('--tiny', action='store_true', help='tiny dims, a few steps (checks the script on a CPU)')
  p.add_argument('--json', default='', metavar='OUT', help='write the numbers to this JSON file (after each item)')
  args = p.parse_args(argv)
  args.models = [m for m in args.models.split(',') if m]
  bad = [m for m in args.models if m not in ('bert', 'xlnet')]
  if bad:
    p.error(f'--models: unknown {bad}; choose from bert, xlnet')
  bad = [w for w in args.only.split(',') if w and w not in STEPS]
  if bad:
    p.error(f'--only: unknown {bad}; choose from {", ".join(STEPS)}')
  for name in ('seq', 'batch', 'predictions', 'steps', 'rounds', 'peak_size'):
    if getattr(args, name) <= 0:
      p.error(f'--{name.replace("_", "-")} must be positive, got {getattr(args, name)}')
  if args.tiny:
    args.seq, args.batch, args.predictions, args.steps, args.rounds, args.peak_size = 32, 4, 5, 2, 2, 256
  if args.predictions > args.seq // 2 - 2:
    p.error(f'--predictions {args.predictions} does not fit in --seq {args.seq}')
  args.dims = TINY if args.tiny else BASE
  return args


# ----------------------------------------------------------------------------------------------------------------
# Peaks and the attention check.
# ----------------------------------------------------------------------------------------------------------------

def _median_s(fn, repeats: int) -> float:
  fn()
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def matmul_peak(dtype, n: int, repeats: int = 20) -> float:
  """FLOP/s of a jitted `[n, n] x [n, n]` matmul in `dtype` on random data (median of `repeats` calls)."""
  a, b = (jax.random.normal(jax.random.PRNGKey(i), (n, n), jnp.float32).astype(dtype) for i in (1, 2))
  f = jax.jit(lambda x, y: x @ y)
  return 2.0 * n ** 3 / _median_s(lambda: f(a, b).block_until_ready(), repeats)


def torch_matmul_peak(n: int, device: str, repeats: int = 20) -> float:
  import torch  # pylint: disable=import-outside-toplevel
  a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))

  def run():
    torch.mm(a, b)
    if device == 'cuda':
      torch.cuda.synchronize()
  return 2.0 * n ** 3 / _median_s(run, repeats)


def _rel(x, ref) -> float:
  x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
  return float(np.linalg.norm(x - ref) / np.linalg.norm(ref))


def attention_check(batch: int, seq: int, heads: int, head_dim: int) -> dict:
  """The 'fused' route against the materialised kernel in float32 (highest precision), on bfloat16 inputs with a
  padding mask (a quarter of the rows' last third of keys masked), outputs and gradients of a random projection;
  and the time of each bfloat16 route's forward + backward (median of 20 calls)."""
  kq, kk, kv, kw = jax.random.split(jax.random.PRNGKey(7), 4)
  shape = (batch, seq, heads, head_dim)
  q, k, v = (jax.random.normal(key, shape, jnp.float32).astype(jnp.bfloat16) for key in (kq, kk, kv))
  w = jax.random.normal(kw, shape, jnp.float32)
  input_mask = np.ones((batch, seq), np.int32)
  input_mask[: max(1, batch // 4), 2 * seq // 3:] = 0
  mask = attention.padding_mask(jnp.asarray(input_mask))

  def loss(impl, dtype):
    def f(q, k, v):
      q, k, v = (x.astype(dtype) for x in (q, k, v))
      if impl == 'fused':
        out = attention.fused_attention(q, k, v, mask)
      else:
        out = attention.dot_product_attention(q, k, v, mask, implementation='materialized')
      return jnp.sum(out.astype(jnp.float32) * w), out
    return f

  results = {}
  with jax.default_matmul_precision('highest'):
    (_, ref), ref_grads = jax.jit(jax.value_and_grad(loss('materialized', jnp.float32), (0, 1, 2), has_aux=True))(
        q, k, v)
  for impl in ('fused', 'materialized'):
    fn = jax.jit(jax.value_and_grad(loss(impl, jnp.bfloat16), (0, 1, 2), has_aux=True))
    hlo = fn.lower(q, k, v).compile().as_text()
    (_, out), grads = fn(q, k, v)
    seconds = _median_s(lambda: jax.block_until_ready(fn(q, k, v)), 20)
    results[impl] = dict(output_rel_err=_rel(out, ref),
                         grad_rel_err=max(_rel(g, r) for g, r in zip(grads, ref_grads)),
                         cudnn_calls=cudnn_targets(hlo), forward_backward_ms=seconds * 1e3)
  return results


# ----------------------------------------------------------------------------------------------------------------
# Steps.
# ----------------------------------------------------------------------------------------------------------------

def _namespace(args, dtype: str, **extra) -> argparse.Namespace:
  d = args.dims
  return argparse.Namespace(layers=d['layers'], hidden=d['hidden'], heads=d['heads'], intermediate=d['intermediate'],
                            vocab=d['vocab'], seq=args.seq, batch=args.batch, predictions=args.predictions,
                            predict=args.predictions, reuse=args.seq // 2, mem=args.seq // 2, dtype=dtype,
                            no_dropout=False, **extra)


def bert_setup(args, dtype: str, fused: bool):
  config = bert_pretrain.bert_config(_namespace(args, dtype))
  if fused:  # the fused kernel has no probability dropout: without it a training step stays materialised
    config.model.update(attention_impl='fused', attention_probs_dropout_prob=0.0)
  batch = bert_pretrain.make_batch(args.batch, args.seq, args.predictions, args.dims['vocab'])
  objective = harness.pretraining_recipe('bert', config).make_objective(config)
  return config, batch, objective


def xlnet_setup(args, dtype: str):
  config = xlnet_pretrain.xlnet_config(_namespace(args, dtype))
  batch = xlnet_pretrain.make_batch(args.batch, args.seq, args.seq // 2, args.predictions, args.dims['vocab'])
  objective = harness.pretraining_recipe('xlnet', config).make_objective(config)
  return config, batch, objective


def torch_device() -> str:
  import torch  # pylint: disable=import-outside-toplevel
  return 'cuda' if torch.cuda.is_available() else 'cpu'


def _sync():
  import torch  # pylint: disable=import-outside-toplevel
  if torch.cuda.is_available():
    torch.cuda.synchronize()


def hf_step(model_name: str, config, host_batch) -> harness.TorchStep:
  """HF's model on the torch device (the model benchmark's `build_hf`): float32 weights, forward under bfloat16
  autocast, fused AdamW on CUDA (same hyper-parameters and decay mask as ours), clipping."""
  import torch  # pylint: disable=import-outside-toplevel
  build = bert_pretrain.build_hf if model_name == 'bert' else xlnet_pretrain.build_hf
  return build(config, host_batch, threads=harness.cores(), device=torch_device(), autocast=torch.bfloat16)


def torch_runner(step: harness.TorchStep):
  """`step.run`, then a device sync, so that a round's wall time holds its work."""
  def run(n):
    step.run(n)
    _sync()
  return run


class Report:
  def __init__(self, path: str):
    self.path, self.out = path, {}

  def add(self, key: str, value) -> None:
    self.out[key] = value
    if self.path:
      with open(self.path, 'w') as f:
        json.dump(self.out, f, indent=2, default=float)


def variants(args) -> list[tuple[str, str, bool]]:
  """(model, dtype, fused attention) in the order they run: what the base configs run first (with HF), then the
  fused attention and float32."""
  out = [(m, 'bfloat16', False) for m in args.models]
  if 'bert' in args.models:
    out.append(('bert', 'bfloat16', True))
  if not args.no_fp32:
    out += [(m, 'float32', False) for m in args.models]
  if args.only:
    wanted = [tuple(w.split(':')) for w in args.only.split(',') if w]
    out = [v for w in wanted for v in out if (v[0], v[1]) + (('fused',) if v[2] else ()) == w]
  return out


def cudnn_targets(hlo: str) -> dict:
  """{custom-call target naming cuDNN: count} in a compiled program's text."""
  targets = re.findall(r'custom_call_target="([^"]*cudnn[^"]*)"', hlo)
  return {t: targets.count(t) for t in sorted(set(targets))}


def measure(model_name: str, dtype: str, fused: bool, args, peaks: dict, report: Report) -> None:
  label = f'{model_name} {dtype}' + (' fused attention (attention dropout 0)' if fused else '')
  key = label.replace(' ', '_').replace('(', '').replace(')', '')
  started = time.perf_counter()
  try:
    if model_name == 'bert':
      config, host_batch, objective = bert_setup(args, dtype, fused)
    else:
      config, host_batch, objective = xlnet_setup(args, dtype)
    ours = harness.build_jax_step(config, objective, host_batch)
    ours.run(1)
    first = dict(ours.first_metrics or {})
    ours.run(2)
    runners = {'ours': ours.run}
    reference = None
    if dtype == 'bfloat16' and not fused and not args.no_hf:
      reference = hf_step(model_name, config, host_batch)
      first['hf_loss'] = float(reference.step().item())
      torch_runner(reference)(2)
      runners['hf'] = torch_runner(reference)
    times = harness.interleaved(runners, args.steps * args.rounds, args.steps)
    step_s = statistics.median(times['ours'])
    flops = objective.flops_per_example * args.batch
    peak = peaks[dtype]
    hlo = ours.hlo()
    row = dict(label=label, dtype=dtype, attention_impl=config.model.get('attention_impl', 'materialized'),
               batch=args.batch, seq=args.seq, compile_s=ours.compile_s, step_ms=step_s * 1e3,
               round_ms=[t * 1e3 for t in times['ours']], tokens_per_s=args.batch * args.seq / step_s,
               model_gflop_per_step=flops / 1e9, xla_gflop_per_step=ours.flops_xla() / 1e9,
               mfu=flops / step_s / peak, peak_tflops=peak / 1e12, first_metrics=first, memory=ours.memory(),
               cudnn_calls=cudnn_targets(hlo),
               wall_s=time.perf_counter() - started)
    msg = (f'{label}: {row["step_ms"]:.1f} ms/step, {row["tokens_per_s"]:,.0f} tokens/s, MFU {row["mfu"]:.1%} '
           f'of {peak / 1e12:.0f} TFLOP/s, compile {ours.compile_s:.1f} s, cuDNN calls '
           f'{row["cudnn_calls"]}, first loss {first}')
    if reference is not None:
      hf_s = statistics.median(times['hf'])
      row.update(hf_step_ms=hf_s * 1e3, hf_round_ms=[t * 1e3 for t in times['hf']],
                 ours_over_hf=harness.median_ratio(times['hf'], times['ours']),
                 hf_attn_implementation=getattr(reference.model.config, '_attn_implementation', None))
      if model_name == 'bert':
        hf_flops = bert_model.flops_per_example(config.model, args.seq, args.seq) * args.batch
        row.update(hf_model_gflop_per_step=hf_flops / 1e9, hf_mfu=hf_flops / hf_s / peak)
      msg += (f'\n  HF {hf_s * 1e3:.1f} ms/step ({row["hf_attn_implementation"]}); ours / HF '
              f'{row["ours_over_hf"]:.2f}x' + (f', HF MFU {row["hf_mfu"]:.1%}' if 'hf_mfu' in row else ''))
    print(msg, flush=True)
    report.add(key, row)
  except Exception as e:  # pylint: disable=broad-except  # one failed item must not lose the others
    traceback.print_exc()
    print(f'{label}: FAILED {type(e).__name__}: {e}', flush=True)
    report.add(key, dict(label=label, error=f'{type(e).__name__}: {e}'))
  finally:
    ours = reference = runners = None  # pylint: disable=unused-variable
    gc.collect()
    if not args.no_hf:
      try:
        import torch  # pylint: disable=import-outside-toplevel
        if torch.cuda.is_available():
          torch.cuda.empty_cache()
      except ImportError:
        pass


def main(argv=None) -> dict:
  started = time.perf_counter()
  args = parse_args(argv)
  report = Report(args.json)
  device = jax.devices()[0]
  env = dict(backend=jax.default_backend(), device=str(device), device_kind=getattr(device, 'device_kind', ''),
             jax_version=jax.__version__, dims=args.dims, seq=args.seq, batch=args.batch,
             predictions=args.predictions, steps=args.steps, rounds=args.rounds)
  try:
    import flax  # pylint: disable=import-outside-toplevel
    import torch  # pylint: disable=import-outside-toplevel
    import transformers  # pylint: disable=import-outside-toplevel
    env.update(flax_version=flax.__version__, torch_version=torch.__version__,
               transformers_version=transformers.__version__, torch_device=torch_device())
  except ImportError as e:
    env['import_error'] = str(e)
  print(f'{env}', flush=True)
  report.add('environment', env)
  if env['backend'] == 'cpu' and not args.tiny:
    print('note: JAX runs on the CPU here; base dims on a CPU take hours (use --tiny to check the script)', flush=True)

  peaks = {'bfloat16': matmul_peak(jnp.bfloat16, args.peak_size), 'float32': matmul_peak(jnp.float32, args.peak_size)}
  if not args.no_hf:
    peaks['torch_bfloat16'] = torch_matmul_peak(args.peak_size, torch_device())
  print('matmul peaks (TFLOP/s): ' + ', '.join(f'{k} {v / 1e12:.1f}' for k, v in peaks.items()), flush=True)
  report.add('peaks_before', {k: v / 1e12 for k, v in peaks.items()})

  d = args.dims
  check = attention_check(args.batch, args.seq, d['heads'], d['hidden'] // d['heads'])
  print(f'attention check (relative error against float32 materialised): {check}', flush=True)
  report.add('attention_check', check)

  for model_name, dtype, fused in variants(args):
    measure(model_name, dtype, fused, args, peaks, report)

  after = {'bfloat16': matmul_peak(jnp.bfloat16, args.peak_size), 'float32': matmul_peak(jnp.float32, args.peak_size)}
  report.add('peaks_after', {k: v / 1e12 for k, v in after.items()})
  print('matmul peaks after (TFLOP/s): ' + ', '.join(f'{k} {v / 1e12:.1f}' for k, v in after.items()))
  summary = [(row['label'], f'{row["step_ms"]:.1f}', f'{row["mfu"]:.1%}',
              f'{row["ours_over_hf"]:.2f}x' if 'ours_over_hf' in row else '-')
             for row in report.out.values() if isinstance(row, dict) and 'step_ms' in row]
  print(f'\n{"step":58s} {"ms":>8s} {"MFU":>7s} {"ours/HF":>8s}')
  for label, ms, mfu, ratio in summary:
    print(f'{label:58s} {ms:>8s} {mfu:>7s} {ratio:>8s}')
  print(f'({time.perf_counter() - started:.0f} s)')
  return report.out


if __name__ == '__main__':
  main()
