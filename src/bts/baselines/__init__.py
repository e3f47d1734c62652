"""Baselines of the BTS paper: weight merges, BTX mixture-of-experts, BTM ensemble, sequence routing."""
