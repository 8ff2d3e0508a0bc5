"""Training: state, optimisers, per-stage steps, the parallel wrapper, checkpoints and the loop."""
