"""Benchmarks of the BLIP conversion: `python -m benchmarks [--quick]` (see `benchmarks.__main__`)."""
