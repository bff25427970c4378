"""Run logging: metrics.jsonl, TensorBoard, optional W&B/trackio, curve PNG, sample tables.

`RunLogger` writes everything under one run directory; `Progress` is the terminal progress bar.
The JSONL files are the record of a run; the other sinks are views of it.
"""

from cispo.logging.curves import plot_curves
from cispo.logging.progress import Progress
from cispo.logging.run_logger import RunLogger
from cispo.logging.samples import samples_markdown

__all__ = ["Progress", "RunLogger", "plot_curves", "samples_markdown"]
