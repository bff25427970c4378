"""Terminal progress bar for the training loop (tqdm), quiet in CI logs."""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping
from types import TracebackType
from typing import TextIO

from tqdm import tqdm

# Namespaced metrics shown in the postfix, under a short label. Other namespaced metrics (a full
# metrics dict has dozens) are left out; bare names ("nll", "acc") are shown as given.
_LABELS = {
    "reward/mean": "reward",
    "reward/accuracy": "acc",
    "train/accuracy": "acc",
    "accuracy": "acc",
    "eval/accuracy": "eval_acc",
    "time/step": "s/step",
    "s/step": "s/step",
}
_STEP_TIME = "s/step"


class Progress:
    """`Progress(total_steps, initial=resume_step)`; call `update(metrics)` once per step.

    The postfix shows reward, accuracy and seconds per step (measured between updates unless
    `time/step` or `s/step` is given).

    On a terminal the bar redraws at most twice a second. Elsewhere (CI, a log file) tqdm cannot
    redraw in place, so each refresh is a new line: refresh at most every `log_interval_s`.
    """

    def __init__(
        self,
        total_steps: int,
        initial: int = 0,
        *,
        desc: str | None = None,
        file: TextIO | None = None,
        disable: bool = False,
        log_interval_s: float = 30.0,
    ) -> None:
        stream = file if file is not None else sys.stderr
        is_tty = hasattr(stream, "isatty") and stream.isatty()
        self._bar = tqdm(
            total=total_steps,
            initial=initial,
            desc=desc,
            file=stream,
            disable=disable,
            unit="step",
            dynamic_ncols=is_tty,
            mininterval=0.5 if is_tty else log_interval_s,
            # A fixed mininterval: tqdm's adaptive miniters would otherwise skip refreshes.
            miniters=1,
        )
        self._last = time.perf_counter()

    def update(self, metrics: Mapping[str, float] | None = None) -> None:
        """Advance one step and show the chosen metrics (see `_LABELS`)."""
        now = time.perf_counter()
        postfix: dict[str, str] = {}
        for key, value in (metrics or {}).items():
            label = _LABELS.get(key, None if "/" in key else key)
            if label is not None and label not in postfix:
                postfix[label] = f"{float(value):.3g}"
        if _STEP_TIME not in postfix:
            postfix[_STEP_TIME] = f"{now - self._last:.3g}"
        postfix[_STEP_TIME] = postfix.pop(_STEP_TIME)  # always last
        self._last = now
        self._bar.set_postfix(postfix, refresh=False)
        self._bar.update(1)

    @property
    def n(self) -> int:
        return int(self._bar.n)

    def close(self) -> None:
        self._bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
