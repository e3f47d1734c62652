"""Evaluation of any causal LM: held-out loss, what the stitches mix (gates), and downstream tasks (offline sets,
a sandbox for generated code, lm-evaluation-harness)."""
