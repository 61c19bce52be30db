"""Benchmarks: stand-alone scripts (``python -m benchmarks.NAME``) printing ratios against a peer measured
in the same run."""
