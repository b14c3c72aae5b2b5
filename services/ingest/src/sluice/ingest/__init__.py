"""Sluice ingest."""
