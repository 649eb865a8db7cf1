"""Test setup: 8 fake CPU devices, configured before JAX initialises its backends."""
import os

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('TRANSFORMERS_OFFLINE', '1')

import jax  # noqa: E402

jax.config.update('jax_default_matmul_precision', 'highest')
