"""Sluice cli."""
