"""A small harness for training-step benchmarks: our REAL train step (`common.trainer`) against a PyTorch step
(usually the HF model) on the same batch, in one process. See benchmarks/README.md ("The harness").

Import it before JAX starts: it defaults JAX to the CPU (one device), keeps HF offline, and sets host memory up as
every entry point does (`common.host_memory`: XLA:CPU's buffers reused from step to step; the glibc settings reach
torch's allocations too), for both sides of a comparison in this process; `XLNET_BERT_JAX_MALLOC=default` leaves
everything as it is.
"""
import os

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('TRANSFORMERS_OFFLINE', '1')

import common  # noqa: E402,F401  pylint: disable=wrong-import-position,unused-import  (common.host_memory)

# pylint: disable=wrong-import-position
from benchmarks.harness.experiments import COMMON_VARIANTS, Variant, run_experiments, select  # noqa: E402
from benchmarks.harness.machine import Peak, cores, pin_to_one_core  # noqa: E402
from benchmarks.harness.profile import TRACED_OPTIONS, matmul_roofline, op_profile, phase_split  # noqa: E402
from benchmarks.harness.report import (Column, comparison_rows, fmt_bytes, print_comparison,  # noqa: E402
                                       print_speedup, print_table, records,
                                       report_against_reference, write_json)
from benchmarks.harness.steps import (JaxStep, TorchStep, build_jax_step, hf_training_step,  # noqa: E402
                                      pretraining_recipe, torch_long)
from benchmarks.harness.timing import REFERENCE, Run, interleaved, median_ratio, run_comparison  # noqa: E402

__all__ = ['COMMON_VARIANTS', 'Column', 'JaxStep', 'Peak', 'REFERENCE', 'Run', 'TRACED_OPTIONS', 'TorchStep',
           'Variant', 'build_jax_step', 'comparison_rows', 'cores', 'fmt_bytes', 'hf_training_step', 'interleaved',
           'matmul_roofline', 'median_ratio', 'op_profile', 'phase_split', 'pin_to_one_core', 'pretraining_recipe',
           'print_comparison', 'print_speedup', 'print_table', 'records', 'report_against_reference', 'run_comparison',
           'run_experiments', 'select', 'torch_long', 'write_json']
