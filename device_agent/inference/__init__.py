"""Inference on the board: the interpreter adapter (the only code that touches tensors),
preprocessing from the manifest, and reading scores into a prediction."""
