"""The objective comparison of `benchmarks/compare_objectives.py`: objectives, presets, cells and outputs."""
