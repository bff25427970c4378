"""Progress: postfix shows reward, accuracy and step time; quiet when not a terminal."""

from __future__ import annotations

import io

from cispo.logging import Progress


def test_postfix_shows_reward_accuracy_and_step_time_from_a_full_metrics_dict() -> None:
    out = io.StringIO()
    with Progress(10, initial=2, desc="CISPO", file=out, log_interval_s=0.0) as bar:
        bar.update({"reward/mean": 0.8125, "reward/accuracy": 0.5, "loss/clip_frac": 0.1})
        assert bar.n == 3
    text = out.getvalue()
    assert "CISPO" in text and "3/10" in text
    assert "reward=0.812" in text and "acc=0.5" in text and "s/step=" in text
    assert "clip_frac" not in text  # namespaced metrics without a short label are left out


def test_bare_metric_names_and_given_step_time_are_shown_as_is() -> None:
    out = io.StringIO()
    with Progress(4, file=out, log_interval_s=0.0) as bar:
        bar.update({"nll": 2.25, "s/step": 1.5})
    text = out.getvalue().rstrip().splitlines()[-1]
    assert text.endswith("nll=2.25, s/step=1.5]"), text


def test_not_a_tty_refreshes_at_most_once_per_interval() -> None:
    out = io.StringIO()  # not a TTY, like a CI log
    with Progress(1000, file=out, log_interval_s=3600.0) as bar:
        for _ in range(500):
            bar.update({"reward/mean": 0.5})
    # tqdm draws the start and the final state on close; nothing in between.
    assert out.getvalue().count("\r") <= 3
    assert "500/1000" in out.getvalue()


def test_disabled_writes_nothing() -> None:
    out = io.StringIO()
    with Progress(5, file=out, disable=True) as bar:
        bar.update({"reward/mean": 1.0})
    assert out.getvalue() == ""
