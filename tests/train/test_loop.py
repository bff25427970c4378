"""End-to-end claims about the RL loop on a tiny model (a few CPU steps each)."""

from __future__ import annotations

import ast
import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cispo.config import TrainConfig
from cispo.configs import apply_overrides, load_recipe
from cispo.train import loop
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


class _Interrupted(Exception):
    pass


def _interrupt_after(monkeypatch: pytest.MonkeyPatch, steps: int) -> None:
    """The loop's update raises on RL step `steps` (0-based): the run stops after `steps` steps,
    as a killed process would, its checkpoints written."""
    real, calls = loop.train_on_rollout, [0]

    def update(*args: object, **kwargs: object) -> dict[str, float]:
        calls[0] += 1
        if calls[0] > steps:
            raise _Interrupted
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(loop, "train_on_rollout", update)


def test_resume_after_half_the_steps_is_bitwise_equal_to_an_uninterrupted_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    full, half = tmp_path / "full", tmp_path / "half"
    train(_config(full, "--rl.steps=4"), echo=lambda _: None)
    with monkeypatch.context() as patch:
        _interrupt_after(patch, 2)
        with pytest.raises(_Interrupted):
            train(_config(half, "--rl.steps=4"), echo=lambda _: None)
    assert [r["step"] for r in _metrics(half)] == [0, 1, 2]
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


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ("--rl.steps=5", "rl.steps: 3 -> 5"),
        ("--optim.learning_rate=2e-2", "optim.learning_rate: 0.01 -> 0.02"),
        ("--optim.decay=constant", "optim.decay: 'cosine' -> 'constant'"),
    ],
)
def test_resuming_with_a_config_that_changes_the_schedule_is_refused_naming_the_field(
    tmp_path: Path, change: str, named: str
) -> None:
    train(_config(tmp_path, "--rl.steps=3", "--eval.every=3"), echo=lambda _: None)
    files = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.raises(ValueError, match=re.escape(named)):
        train(_config(tmp_path, "--rl.steps=3", change), resume=True, echo=lambda _: None)
    after = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert after == files  # refused before anything in the run directory changed


def test_resuming_may_change_fields_that_cannot_change_the_trajectory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """eval.every, run.threads, rl.micro_batch_size, checkpointing and logging may differ
    (`RESUME_MAY_CHANGE` says why); the resumed run goes on to its last step."""
    with monkeypatch.context() as patch:
        _interrupt_after(patch, 1)
        with pytest.raises(_Interrupted):
            train(_config(tmp_path, "--rl.steps=2"), echo=lambda _: None)
    changed = ["--eval.every=1", "--run.threads=1", "--rl.micro_batch_size=7", "--run.keep_last=3"]
    train(_config(tmp_path, "--rl.steps=2", *changed), resume=True, echo=lambda _: None)
    assert [r["step"] for r in _metrics(tmp_path)] == [0, 1, 2]
    assert set(loop.RESUME_MAY_CHANGE) >= {"run.dir", "eval.every", "run.threads"}


def test_the_loop_and_its_sources_speak_only_the_client_api() -> None:
    """No client's `.engine` is read in train/ or the two rollout sources: the loop gets parameter
    counts from `get_info` and the weights to publish from `get_weights`."""
    src = Path(loop.__file__).parents[1]
    files = [*sorted((src / "train").glob("*.py")), src / "rollout/source.py"]
    files.append(src / "asynchronous/source.py")
    reads = [
        f"{path.name}:{node.lineno} .{node.attr}"
        for path in files
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Attribute) and node.attr == "engine"
    ]
    assert len(files) >= 7 and not reads, reads


def test_an_unknown_override_is_an_error_naming_the_key(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="ratio_mx"):
        apply_overrides(TrainConfig(), ["--loss.ratio_mx=5"])


@pytest.mark.parametrize(
    "name", ["arithmetic_cispo", "arithmetic_cispo_async", "arithmetic_cispo_async_lag1"]
)
def test_every_shipped_recipe_runs_two_steps(tmp_path: Path, name: str) -> None:
    config = apply_overrides(load_recipe(name, TrainConfig), [*FAST, "--rl.steps=2"])
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
