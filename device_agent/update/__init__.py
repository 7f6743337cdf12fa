"""Bundles on the board: the manifest contract, and model updates (staged, verified, swapped in)."""
