"""Benchmarks and the helpers they need; never imported by product defaults."""
