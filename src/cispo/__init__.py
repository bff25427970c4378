"""cispo: reinforcement-learning post-training of language models around CISPO.

The package is laid out in data-flow order (CONTRIBUTING.md §1): data types and tasks, rewards,
advantages, datums and losses; the engine (model + optimizer + sampler); the client and the server
on it; rollouts, the async worker and the training loop; recipes and the CLI on top.
"""

__version__ = "0.1.0"
