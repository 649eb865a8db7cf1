"""Benchmarks: throughput, memory and MFU of our training steps against HF PyTorch on the same config, in one run."""
