"""Grids of candidate merges and their ranking by the evaluation's numbers."""
