"""Training: the one Accelerate loop, checkpoints, and the per-family steps and losses."""
