"""Experiments on migrations: traces of real runs and probes, and what is computed from them."""
