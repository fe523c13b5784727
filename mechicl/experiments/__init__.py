"""Experiments: grid files, the content-addressed result store, the runner and its executors,
memory estimates and batch sizes from a budget, training-checkpoint sweeps."""
