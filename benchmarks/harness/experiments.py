"""Variants of our step timed against the baseline, interleaved: XLA CPU compile options, `jax.config` settings,
donation, config changes (compute dtype, dropout off) and the previous form of a function the step calls by module
attribute (a landed change measured against what it replaced). A variant is always the real train step built
another way; changes to a model's code are not variants (they belong in the model, behind a config switch)."""
from __future__ import annotations

import contextlib
import dataclasses
import importlib
import math
import statistics
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections

from benchmarks.harness.steps import JaxStep, build_jax_step
from benchmarks.harness.timing import interleaved, median_ratio


@dataclasses.dataclass(frozen=True)
class Variant:
  name: str
  semantics: str         # 'exact' (same fp32 arithmetic), 'rng' (same distribution, other dropout stream),
                         # 'approx' (changes the numbers)
  what: str
  compiler_options: dict | None = None
  settings: dict | None = None
  donate: bool = True
  change_config: Callable[[ml_collections.ConfigDict], None] | None = None   # edits a copy of the config
  # (module, attribute, value) set while the step is traced: the PREVIOUS form of a function the step calls by
  # module attribute (`common.train_step.update_if`, `common.layers.add_bias`), to measure a change after it landed.
  patches: tuple = ()


def _set_dtype(dtype: str) -> Callable[[ml_collections.ConfigDict], None]:
  def change(config):
    config.dtype = dtype
  return change


def _update_if_where(ok, update, old):
  """The non-finite guard as it was before `train_step.keep_if` / `update_if`: a select per leaf."""
  return jax.tree.map(lambda n, o: jnp.where(ok, n, o), update(), old)


def _update_if_after(ok, update, old):
  """The non-finite guard as it was before `train_step.update_if`: the update computed, then one conditional
  choosing between the two finished states."""
  new = update()
  return jax.lax.cond(ok, lambda: new, lambda: old)


def _add_bias_plain(x, bias):
  """The output bias as it was before `layers.add_bias`: its gradient is XLA's column-sum reduction."""
  return x + bias.astype(x.dtype)


def _keep_mask_bernoulli(rng, rate, shape):
  """Dropout's keep mask as it was before `layers.keep_mask`: 32 random bits per element."""
  return jax.random.bernoulli(rng, 1.0 - rate, tuple(shape))


def _argmax_hits_reduce(logits, labels):
  """The objectives' accuracy as it was before `layers.argmax_hits`: `jnp.argmax`, a (value, index) reduction."""
  return (jnp.argmax(logits, -1) == labels).astype(jnp.float32)


@contextlib.contextmanager
def patched(patches):
  saved = [(module, name, getattr(importlib.import_module(module), name)) for module, name, _ in patches]
  for module, name, value in patches:
    setattr(importlib.import_module(module), name, value)
  try:
    yield
  finally:
    for module, name, value in saved:
      setattr(importlib.import_module(module), name, value)


def _option(name: str, flag: str, value, what: str = '') -> Variant:
  return Variant(name, 'exact', what or f'--{flag}={value}', compiler_options={flag: value})


COMMON_VARIANTS = (
    Variant('no-donation', 'exact', 'jit without donate_argnums (state copied, not updated in place)', donate=False),
    Variant('precision-highest', 'exact', "jax_default_matmul_precision='highest'",
            settings={'jax_default_matmul_precision': 'highest'}),
    _option('concurrency-scheduler', 'xla_cpu_enable_concurrency_optimized_scheduler', True),
    _option('ynn-off', 'xla_cpu_experimental_ynn_fusion_type', '',
            "--xla_cpu_experimental_ynn_fusion_type='' (no YNNPACK: XLA's own dot/loop emitters)"),
    _option('ynn-dot-only', 'xla_cpu_experimental_ynn_fusion_type', 'LIBRARY_FUSION_TYPE_DOT'),
    _option('ynn-individual-dot', 'xla_cpu_experimental_ynn_fusion_type', 'LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT'),
    _option('onednn', 'xla_cpu_use_onednn', True),
    _option('xnn-graph', 'xla_cpu_experimental_xnn_graph_fusion_mode', 'XNN_GRAPH_FUSION_MODE_GREEDY'),
    _option('single-thread', 'xla_cpu_multi_thread_eigen', False),
    Variant('guard-where', 'exact', 'the non-finite guard as where(ok, new, old) per leaf (before keep_if)',
            patches=(('common.train_step', 'update_if', _update_if_where),)),
    Variant('guard-after', 'exact', 'the update computed before the non-finite guard chooses (before update_if)',
            patches=(('common.train_step', 'update_if', _update_if_after),)),
    Variant('bias-grad-reduce', 'reordered', 'LM output-bias grad as a column sum (before layers.add_bias)',
            patches=(('common.layers', 'add_bias', _add_bias_plain),)),
    Variant('dropout-bernoulli', 'rng', 'dropout masks from jax.random.bernoulli, 32 random bits per element '
            '(before layers.keep_mask: 16)', patches=(('common.layers', 'keep_mask', _keep_mask_bernoulli),)),
    Variant('argmax-reduce', 'reordered', 'accuracy from jnp.argmax, a (value, index) reduction (before '
            'layers.argmax_hits)', patches=(('common.layers', 'argmax_hits', _argmax_hits_reduce),)),
    Variant('rbg-dropout', 'rng', "jax_default_prng_impl='rbg' (XLA RngBitGenerator instead of threefry)",
            settings={'jax_default_prng_impl': 'rbg'}),
    Variant('unsafe-rbg-dropout', 'rng', "jax_default_prng_impl='unsafe_rbg'",
            settings={'jax_default_prng_impl': 'unsafe_rbg'}),
    Variant('fast-math', 'approx', '--xla_cpu_enable_fast_math=true',
            compiler_options={'xla_cpu_enable_fast_math': True}),
    Variant('bfloat16', 'approx', 'compute dtype bfloat16 (parameters float32)', change_config=_set_dtype('bfloat16')),
)


def build_variant(variant: Variant, config: ml_collections.ConfigDict, make_objective, host_batch: dict) -> JaxStep:
  if variant.change_config:
    config = ml_collections.ConfigDict(config.to_dict())
    variant.change_config(config)
  with patched(variant.patches):
    return build_jax_step(config, make_objective(config), host_batch, name=variant.name,
                          compiler_options=variant.compiler_options, settings=variant.settings,
                          donate=variant.donate)


def _first_loss(step: JaxStep) -> float:
  return (step.first_metrics or {}).get('loss', math.nan)


def run_experiments(variants, config: ml_collections.ConfigDict, make_objective, host_batch: dict,
                    baseline: JaxStep, *, steps: int, per_round: int, warmup: int) -> list[dict]:
  """Builds each variant, checks its first-step loss against the baseline's (same initial state and batch) and
  times it interleaved with the baseline. A variant this XLA build refuses is reported and skipped."""
  print('\n== Experiments: variants of our step, each interleaved with the baseline ==', flush=True)
  base_hlo = baseline.hlo()
  print(f'{"variant":24s} {"semantics":10s} {"compile s":>9s} {"base ms":>8s} {"variant ms":>10s} '
        f'{"speedup":>8s} {"(cpu)":>6s} {"|dloss|":>8s}  what')
  print('(speedup: median over rounds of base/variant wall time; (cpu): the same with process CPU time; |dloss|: '
        'first-step loss from the same initial state and batch, against the baseline)')
  results = []
  for variant in variants:
    row = dict(name=variant.name, semantics=variant.semantics, what=variant.what)
    try:
      step = build_variant(variant, config, make_objective, host_batch)
    except Exception as e:  # pylint: disable=broad-except
      print(f'{variant.name:24s} {variant.semantics:10s} failed to build: {str(e).splitlines()[0][:120]}')
      results.append(dict(row, error=str(e)))
      continue
    step.run(1)
    step.run(max(warmup - 1, 0))
    cpu: dict[str, list[float]] = {}
    times = interleaved({'base': baseline.run, 'variant': step.run}, steps, per_round, cpu)
    row.update(speedup=median_ratio(times['base'], times['variant']),
               speedup_cpu_time=median_ratio(cpu['base'], cpu['variant']),
               base_ms=statistics.median(times['base']) * 1e3, variant_ms=statistics.median(times['variant']) * 1e3,
               base_s_rounds=times['base'], variant_s_rounds=times['variant'], base_cpu_s_rounds=cpu['base'],
               variant_cpu_s_rounds=cpu['variant'], first_step_loss_diff=abs(_first_loss(step) - _first_loss(baseline)),
               compile_s=step.compile_s, identical_hlo=step.hlo() == base_hlo, memory=step.memory())
    note = ' [identical HLO]' if row['identical_hlo'] else ''
    print(f'{variant.name:24s} {variant.semantics:10s} {step.compile_s:9.1f} {row["base_ms"]:8.0f} '
          f'{row["variant_ms"]:10.0f} {row["speedup"]:7.2f}x {row["speedup_cpu_time"]:5.2f}x '
          f'{row["first_step_loss_diff"]:8.1e}  {variant.what}{note}', flush=True)
    results.append(row)
    del step
  return results


def select(variants, only: str) -> list[Variant]:
  """The variants named in `only` (comma-separated; empty: all); an unknown name is a one-line error."""
  wanted = {n.strip() for n in only.split(',') if n.strip()}
  unknown = wanted - {v.name for v in variants}
  if unknown:
    raise SystemExit(f'--only: unknown variants {sorted(unknown)}; choose from {[v.name for v in variants]}')
  return [v for v in variants if not wanted or v.name in wanted]
