"""Training: the LDM objective, optimisation, checkpoints, the per-worker loop, Ray Train wiring."""
