"""Downstream evaluation on real benchmarks, offline: task files built from PyPI wheels (tasks), a scorer for any
causal LM (scoring), a sandbox for model-written code (sandbox), and lm-evaluation-harness glue (lmeval)."""
