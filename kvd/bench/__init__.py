"""Benchmarks: kvd measured against HF transformers on the same requests (`python -m kvd.bench.offline`)."""
