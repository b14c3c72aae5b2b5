"""Sluice benchmarks: ``python -m bench`` (or ``sluice bench``) from the repository root.

Stages live in their own modules (``bench.e2e``: ingest and end-to-end throughput through
the trio, with the bare database pipeline as the baseline); results print as a table and are
saved under ``bench/results/`` (ignored by git).
"""
