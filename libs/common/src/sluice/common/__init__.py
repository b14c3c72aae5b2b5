"""Sluice common."""
