"""Training: train state, objectives, the stages' step functions, checkpoints and logging."""
