"""Sluice sender."""
