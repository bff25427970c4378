"""Training: the RL loop, the update, the supervised warm start and held-out evaluation."""
