"""Markdown table of sample completions, for reading a run's outputs by eye."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

# Columns shown first, in this order; any other keys follow in order of first appearance.
_LEADING = ("prompt", "completion", "reward", "advantage")


def _cell(value: object, max_chars: int) -> str:
    if isinstance(value, float):
        text = f"{value:.4g}"
    elif value is None:
        text = ""
    else:
        text = str(value)
    if len(text) > max_chars:
        text = text[: max_chars - 1] + "…"
    # Keep one row per line and the column structure intact.
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\r", "").replace("\n", "<br>")


def samples_markdown(
    step: int, rows: Sequence[Mapping[str, object]], *, max_chars: int = 500
) -> str:
    """A markdown document with one table row per sample; long cells are cut at `max_chars`."""
    columns = [c for c in _LEADING if any(c in row for row in rows)]
    for row in rows:
        columns += [k for k in row if k not in columns]
    lines = [f"# Samples at step {step}", "", f"{len(rows)} samples.", ""]
    if columns:
        lines.append("| " + " | ".join(columns) + " |")
        lines.append("|" + "|".join("---" for _ in columns) + "|")
        for row in rows:
            lines.append("| " + " | ".join(_cell(row.get(c), max_chars) for c in columns) + " |")
    return "\n".join(lines) + "\n"
