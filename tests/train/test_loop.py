"""End-to-end claims about the RL loop on a tiny model (a few CPU steps each)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cispo.cli import apply_overrides, load_recipe
from cispo.config import TrainConfig
from cispo.train.loop import train
from tests.train.helpers import TINY_RUN, run_config

FAST = [*TINY_RUN, "--sft.steps=30"]


def _config(tmp_path: Path, *extra: str) -> TrainConfig:
    return run_config(tmp_path, [*FAST, *extra])


def _metrics(run_dir: Path) -> list[dict[str, float]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    latest = sorted((run_dir / "checkpoints").rglob("model.safetensors"))[-1]
    return load_file(str(latest))


def test_a_short_run_writes_metrics_curves_samples_and_checkpoints(tmp_path: Path) -> None:
    summary = train(_config(tmp_path, "--rl.steps=3"), echo=lambda _: None)
    rows = _metrics(tmp_path)
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    assert all(r.get("loss") is None or abs(r["loss"]) < 1e3 for r in rows)
    for name in ("config.json", "curves.png", "samples.md", "metrics.jsonl"):
        assert (tmp_path / name).exists(), name
    assert 0.0 <= summary.accuracy_end <= 1.0


def test_resume_after_half_the_steps_is_bitwise_equal_to_an_uninterrupted_run(
    tmp_path: Path,
) -> None:
    full, half = tmp_path / "full", tmp_path / "half"
    train(_config(full, "--rl.steps=4"), echo=lambda _: None)
    train(_config(half, "--rl.steps=2"), echo=lambda _: None)
    train(_config(half, "--rl.steps=4"), resume=True, echo=lambda _: None)
    a, b = _weights(full), _weights(half)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    drop = {"time"}
    rows_a = [
        {k: v for k, v in r.items() if k not in drop and not k.startswith("time/")}
        for r in _metrics(full)
    ]
    rows_b = [
        {k: v for k, v in r.items() if k not in drop and not k.startswith("time/")}
        for r in _metrics(half)
    ]
    assert rows_a == rows_b


def test_an_unknown_override_is_an_error_naming_the_key(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="ratio_mx"):
        apply_overrides(TrainConfig(), ["--loss.ratio_mx=5"])


@pytest.mark.parametrize(
    "name", ["arithmetic_cispo", "arithmetic_cispo_async", "arithmetic_cispo_async_lag1"]
)
def test_every_shipped_recipe_runs_two_steps(tmp_path: Path, name: str) -> None:
    config = apply_overrides(load_recipe(name), [*FAST, "--rl.steps=2"])
    config = dataclasses.replace(config, run=dataclasses.replace(config.run, dir=str(tmp_path)))
    train(config, echo=lambda _: None)
    assert len(_metrics(tmp_path)) == 3


def test_an_rl_update_raises_logprobs_of_positive_advantage_completions(tmp_path: Path) -> None:
    """One rollout + one CISPO step (real sampling, rewards, advantages): the summed logprob of the
    completions with A > 0 goes up and that of completions with A < 0 goes down."""
    from cispo.client import ServiceClient
    from cispo.rollout.rollouts import collect_rollout
    from cispo.tasks import make_task
    from cispo.train.update import train_on_rollout
    from cispo.train.warm_start import supervised_warm_start

    config = _config(
        tmp_path,
        "--rl.prompts_per_step=32",
        "--rl.group_size=8",
        "--task.digits=1",
        "--task.ops=+",
        "--sft.steps=60",
        "--sft.learning_rate=1e-2",
    )
    task = make_task(config.task.name, **config.task.kwargs())
    training = ServiceClient(checkpoint_root=tmp_path).create_lora_training_client(
        "tiny", rank=0, model_overrides=config.model.overrides()
    )
    supervised_warm_start(training, task, config)
    rollout = collect_rollout(training.save_weights_and_get_sampling_client(), task, 0, config)
    assert rollout.datums, "the warm-started model should get some groups with mixed rewards"

    def logprob_by_sign() -> tuple[float, float]:
        out = training.forward(rollout.datums, "cross_entropy").result()
        pos = neg = 0.0
        for datum, o in zip(rollout.datums, out.loss_fn_outputs, strict=True):
            mask = datum.loss_fn_inputs["mask"].to_torch() > 0
            a = float(datum.loss_fn_inputs["advantages"].to_torch()[mask][0])
            lp = float(o["logprobs"].to_torch()[mask].sum())
            pos, neg = (pos + lp, neg) if a > 0 else (pos, neg + lp)
        return pos, neg

    before = logprob_by_sign()
    metrics = train_on_rollout(training, rollout, config)
    after = logprob_by_sign()
    assert torch.isfinite(torch.tensor(metrics["loss"]))
    assert after[0] > before[0]
    assert after[1] < before[1]
