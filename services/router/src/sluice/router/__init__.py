"""Sluice router."""
