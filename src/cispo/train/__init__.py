"""Training: the engine (model + optimizer), run configuration and the RL loop."""
