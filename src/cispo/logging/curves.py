"""Learning curves PNG from metrics.jsonl (matplotlib's Agg canvas; no pyplot global state)."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

from cispo.logging.jsonl import read_jsonl

# Spread statistics clutter a curve panel; the mean (or the bare metric) is what is plotted.
_SKIP_SUFFIXES = ("/std", "/min", "/max", "/var", "errors", "_frac")
# Namespaces whose names merely mention a panel word (`time/reward`, `advantage/nan_reward_frac`).
_SKIP_PREFIXES = ("time/", "advantage/", "optim/", "staleness/")


def _series(records: list[dict[str, object]], key: str) -> tuple[list[int], list[float]]:
    steps, values = [], []
    for record in records:
        value = record.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            steps.append(int(record["step"]))  # type: ignore[call-overload]  # written by RunLogger
            values.append(float(value))
    return steps, values


def plot_curves(
    metrics_path: Path,
    out_path: Path,
    *,
    panels: Sequence[str] = ("reward", "accuracy"),
) -> Path | None:
    """Plot each metric whose name contains a panel word against step; None if nothing to plot.

    One panel per word ("reward": `reward/mean`, ...; "accuracy": train and `eval/accuracy`).
    Eval series are drawn with markers since they are sparse. Written atomically (temp file +
    `os.replace`), so a viewer never sees a half-written PNG.
    """
    records = [r for r in read_jsonl(metrics_path) if "step" in r]
    keys: list[str] = []
    for record in records:
        keys += [k for k in record if k not in keys and k not in ("step", "time")]
    chosen = {
        word: [
            k
            for k in keys
            if word in k.lower()
            and not k.endswith(_SKIP_SUFFIXES)
            and not k.startswith(_SKIP_PREFIXES)
        ]
        for word in panels
    }
    chosen = {word: ks for word, ks in chosen.items() if any(_series(records, k)[0] for k in ks)}
    if not chosen:
        return None
    # Imported here: matplotlib costs ~0.2 s to import, and most processes never plot (the
    # sampler worker, `cispo config`, the server).
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5 * len(chosen), 4.0), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(chosen), squeeze=False)[0]
    for ax, (word, ks) in zip(axes, chosen.items(), strict=True):
        for key in ks:
            steps, values = _series(records, key)
            if not steps:
                continue
            sparse = "eval" in key.lower() or len(steps) < 3
            ax.plot(steps, values, label=key, marker="o" if sparse else None, markersize=3)
        ax.set_xlabel("step")
        ax.set_title(word)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    tmp = out_path.with_name(f".tmp-{out_path.name}-{os.getpid()}")
    fig.savefig(tmp, format="png", dpi=100)
    os.replace(tmp, out_path)
    return out_path
