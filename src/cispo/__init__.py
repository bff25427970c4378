"""cispo: reinforcement-learning post-training of language models around CISPO.

The package is laid out in data-flow order (STYLE.md §1):
tasks → rollout → rewards → advantages → datums → losses → train → checkpoint/metrics,
with `client/` (a Tinker-style API) and `cli.py` on top.
"""

__version__ = "0.1.0"
