"""RunLogger: JSONL records, resume truncation, TensorBoard scalars, samples, curves, trackers.

No __init__.py here on purpose: a `tests/logging` package would be imported as `logging` and
shadow the standard library.
"""

from __future__ import annotations

import json
import logging
import math
import struct
import sys
import types
from pathlib import Path
from typing import Any

import pytest

from cispo.logging import RunLogger, run_logger, samples_markdown

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_each_log_call_is_one_flushed_json_line(tmp_path: Path) -> None:
    logger = RunLogger(tmp_path, tensorboard=False, plot_every_s=0)
    logger.log(1, {"reward/mean": 0.25, "loss/clip_frac": 0.0, "count": 3})
    # Flushed per line: readable before close.
    assert _lines(tmp_path / "metrics.jsonl")[0]["reward/mean"] == 0.25
    logger.log(2, {"reward/mean": 0.5, "loss": float("nan")})
    logger.close()
    records = _lines(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2]
    assert records[0]["count"] == 3.0 and records[0]["loss/clip_frac"] == 0.0
    assert records[1]["loss"] is None  # non-finite values are null: the file is strict JSON
    assert all(isinstance(r["time"], float) for r in records)
    for line in (tmp_path / "metrics.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=lambda c: pytest.fail(f"non-standard JSON {c}"))


def test_non_numeric_metric_and_reserved_names_are_errors(tmp_path: Path) -> None:
    with RunLogger(tmp_path, tensorboard=False, plot_every_s=0) as logger:
        with pytest.raises(TypeError, match="'text'"):
            logger.log(1, {"text": "abc"})  # type: ignore[dict-item]
        with pytest.raises(ValueError, match="reserved"):
            logger.log(1, {"step": 1.0})


def test_resume_drops_lines_after_the_resume_step(tmp_path: Path) -> None:
    logger = RunLogger(tmp_path, tensorboard=False, plot_every_s=0)
    for step in range(1, 8):
        logger.log(step, {"reward/mean": step / 10})
        logger.log_samples(step, [{"prompt": "p", "completion": str(step)}])
    logger.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 8, "rew')  # torn line from a crash mid-write

    # The process restarts from a checkpoint at step 4 and re-runs steps 5..6.
    logger = RunLogger(tmp_path, tensorboard=False, plot_every_s=0)
    logger.resume(4)
    for step in (5, 6):
        logger.log(step, {"reward/mean": -step / 10})
    logger.close()
    records = _lines(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert [r["reward/mean"] for r in records] == [0.1, 0.2, 0.3, 0.4, -0.5, -0.6]
    assert [r["step"] for r in _lines(tmp_path / "samples.jsonl")] == [1, 2, 3, 4]


def test_tensorboard_event_file_holds_the_scalars(tmp_path: Path) -> None:
    event_accumulator = pytest.importorskip(
        "tensorboard.backend.event_processing.event_accumulator"
    )
    with RunLogger(tmp_path, plot_every_s=0) as logger:
        for step in range(3):
            logger.log(step, {"reward/mean": 0.5 * step})
    event_files = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert len(event_files) == 1
    acc = event_accumulator.EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    events = acc.Scalars("reward/mean")
    assert [e.step for e in events] == [0, 1, 2]
    assert [e.value for e in events] == pytest.approx([0.0, 0.5, 1.0], abs=1e-7)


def test_tensorboard_resume_purges_later_steps(tmp_path: Path) -> None:
    event_accumulator = pytest.importorskip(
        "tensorboard.backend.event_processing.event_accumulator"
    )
    with RunLogger(tmp_path, plot_every_s=0) as logger:
        for step in range(1, 6):
            logger.log(step, {"reward/mean": 1.0})
    with RunLogger(tmp_path, plot_every_s=0) as logger:
        logger.resume(3)
        logger.log(4, {"reward/mean": 2.0})
    acc = event_accumulator.EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    by_step = {e.step: e.value for e in acc.Scalars("reward/mean")}
    assert by_step == {1: 1.0, 2: 1.0, 3: 1.0, 4: 2.0}


def test_missing_tensorboard_warns_once_and_logging_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import now fails
    with (
        caplog.at_level(logging.WARNING, logger="cispo.logging"),
        RunLogger(tmp_path, plot_every_s=0) as logger,
    ):
        logger.log(1, {"reward/mean": 1.0})
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "tensorboard is not installed" in warnings[0].getMessage()
    assert not (tmp_path / "tensorboard").exists()
    assert _lines(tmp_path / "metrics.jsonl")[0]["reward/mean"] == 1.0


@pytest.mark.parametrize("tracker", ["wandb", "trackio"])
def test_asking_for_a_missing_tracker_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tracker: str
) -> None:
    monkeypatch.setitem(sys.modules, tracker, None)
    kwargs: dict[str, Any] = {f"{tracker}_project": "demo"}
    with pytest.raises(ImportError, match=f"{tracker}_project was given but {tracker} is not"):
        RunLogger(tmp_path, tensorboard=False, **kwargs)
    assert not (tmp_path / "metrics.jsonl").exists()  # failed before opening files


@pytest.mark.parametrize("tracker", ["wandb", "trackio"])
def test_installed_tracker_receives_init_metrics_and_finish(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tracker: str
) -> None:
    calls: list[tuple[str, Any, Any]] = []
    fake = types.ModuleType(tracker)
    fake.init = lambda **kw: calls.append(("init", kw["project"], kw["config"]))  # type: ignore[attr-defined]
    fake.log = lambda values, step: calls.append(("log", step, values))  # type: ignore[attr-defined]
    fake.finish = lambda: calls.append(("finish", None, None))  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, tracker, fake)
    kwargs: dict[str, Any] = {f"{tracker}_project": "demo"}
    with RunLogger(
        tmp_path, tensorboard=False, plot_every_s=0, config={"lr": 1e-3}, **kwargs
    ) as lg:
        lg.log(3, {"reward/mean": 0.75})
    assert calls == [
        ("init", "demo", {"lr": 1e-3}),
        ("log", 3, {"reward/mean": 0.75}),
        ("finish", None, None),
    ]


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def test_curves_png_is_redrawn_at_most_every_plot_every_s_seconds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = [1000.0]
    monkeypatch.setattr(run_logger.time, "monotonic", lambda: clock[0])
    logger = RunLogger(tmp_path, tensorboard=False, plot_every_s=60.0)
    curves = tmp_path / "curves.png"
    for step in range(1, 5):
        clock[0] += 14.0  # 56 s after the logger opened by step 4
        logger.log(step, {"reward/mean": math.sin(step), "reward/std": 0.1, "accuracy": step / 8})
    assert not curves.exists()  # less than 60 s since the start
    clock[0] += 4.0
    logger.log(5, {"reward/mean": 0.2, "accuracy": 0.6})
    assert curves.exists()
    first = curves.stat().st_size
    stamp = curves.stat().st_mtime_ns
    clock[0] += 59.0
    logger.log(6, {"reward/mean": 0.3})
    assert curves.stat().st_mtime_ns == stamp  # 59 s since the last redraw
    logger.log(7, {"eval/accuracy": 0.7})
    logger.close()  # redraws with the eval point
    width, height = _png_size(curves)
    assert (width, height) == (1100, 400)  # two panels (reward, accuracy), 5.5x4 in at 100 dpi
    # A drawn figure, not a blank canvas: a 1100x400 white PNG compresses to a few kB.
    assert first > 15_000 and curves.stat().st_size > 15_000
    assert [p.name for p in tmp_path.glob(".tmp-*")] == []


def test_plot_without_plottable_metrics_writes_nothing(tmp_path: Path) -> None:
    with RunLogger(tmp_path, tensorboard=False, plot_every_s=0) as logger:
        logger.log(1, {"loss": 1.0})
        assert logger.plot() is None
    assert not (tmp_path / "curves.png").exists()


def test_samples_md_is_a_table_of_the_latest_step(tmp_path: Path) -> None:
    with RunLogger(tmp_path, tensorboard=False, plot_every_s=0) as logger:
        logger.log_samples(1, [{"prompt": "old", "completion": "x", "reward": 0.0}])
        rows = [
            {"prompt": "2+3=", "completion": "5", "reward": 1.0, "advantage": 0.5, "len": 1},
            {"prompt": "a|b", "completion": "line1\nline2", "reward": 0.0, "advantage": -0.5},
        ]
        logger.log_samples(2, rows)
    md = (tmp_path / "samples.md").read_text()
    lines = md.splitlines()
    assert lines[0] == "# Samples at step 2"
    assert "| prompt | completion | reward | advantage | len |" in lines
    assert "| 2+3= | 5 | 1 | 0.5 | 1 |" in lines
    assert "| a\\|b | line1<br>line2 | 0 | -0.5 |  |" in lines
    assert "old" not in md
    table_rows = [line for line in lines if line.startswith("|")]
    assert len(table_rows) == 2 + len(rows)  # header, rule, one line per sample
    samples = _lines(tmp_path / "samples.jsonl")
    assert [s["step"] for s in samples] == [1, 2, 2]
    assert samples[2]["completion"] == "line1\nline2"


def test_samples_markdown_cuts_long_cells() -> None:
    md = samples_markdown(0, [{"completion": "x" * 50}], max_chars=10)
    assert "| xxxxxxxxx… |" in md
