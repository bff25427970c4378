"""End-to-end claims about the RL loop on a tiny model (a few CPU steps each)."""

from __future__ import annotations

import ast
import dataclasses
import datetime
import json
import os
import random
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from cispo.cli import apply_overrides, load_recipe
from cispo.config import TrainConfig
from cispo.train import loop
from cispo.train.loop import train
from tests.train.helpers import (
    TINY_RUN,
    Interrupted,
    assert_every_rl_step_trained,
    checkpoint_dirs,
    interrupt_after,
    metrics,
    run_config,
    weights,
)

STEPS = 4
PIN = Path(__file__).parents[1] / "assets" / "tiny_run.json"


def _config(tmp_path: Path, *extra: str) -> TrainConfig:
    return run_config(tmp_path, [*TINY_RUN, *extra])


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One uninterrupted `STEPS`-step run, shared by the tests below (read it, never write it)."""
    run_dir = tmp_path_factory.mktemp("tiny_run")
    train(_config(run_dir, f"--rl.steps={STEPS}"), echo=lambda _: None)
    return run_dir


def test_a_short_run_trains_and_writes_metrics_curves_samples_and_checkpoints(
    tiny_run: Path,
) -> None:
    assert_every_rl_step_trained(tiny_run)
    rows = metrics(tiny_run)
    assert [r["step"] for r in rows] == list(range(STEPS + 1))
    assert all(r.get("loss") is None or abs(r["loss"]) < 1e3 for r in rows)
    for name in ("config.json", "curves.png", "samples.md", "metrics.jsonl"):
        assert (tiny_run / name).exists(), name
    assert [d.name for d in checkpoint_dirs(tiny_run)] == [
        f"step_{s:06d}" for s in range(STEPS + 1)
    ]


def _without_times(rows: list[dict[str, float]]) -> list[dict[str, float]]:
    return [{k: v for k, v in r.items() if k != "time" and not k.startswith("time/")} for r in rows]


def _assert_same(a: Any, b: Any, where: str) -> None:
    """Bitwise equality of nested optimizer / RNG states (tensors compared with torch.equal)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype, where
        assert torch.equal(a, b), where
    elif isinstance(a, Mapping):
        assert isinstance(b, Mapping) and a.keys() == b.keys(), where
        for key in a:
            _assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list | tuple):
        assert isinstance(b, list | tuple) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def test_resume_after_half_the_steps_is_bitwise_equal_to_an_uninterrupted_run(
    tiny_run: Path, tmp_path: Path
) -> None:
    """Stop after step STEPS/2, resume, run to STEPS: the final weights, optimizer state, sampler
    RNG, loop state and every metric equal the uninterrupted run's, bit for bit.

    The stop: a copy of the uninterrupted run's directory is cut back to what a run killed during
    step STEPS/2 + 1 leaves: checkpoints up to STEPS/2 with `latest` naming the last, metrics up
    to STEPS/2 + 1 (a step's line is written before its checkpoint). The process-global RNGs
    (python, numpy, torch) are scrambled before the resume: exact resume must not need them."""
    assert_every_rl_step_trained(tiny_run)  # every step updates, so equality is not vacuous
    half = STEPS // 2
    resumed = tmp_path / "resumed"
    shutil.copytree(tiny_run, resumed)
    for path in checkpoint_dirs(resumed)[half + 1 :]:
        shutil.rmtree(path)
    kept = checkpoint_dirs(resumed)
    assert kept[-1].name == f"step_{half:06d}"
    (kept[-1].parent / "latest").write_text(kept[-1].name + "\n")
    rows = [r for r in metrics(resumed) if r["step"] <= half + 1]
    (resumed / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    before = {p.name: os.stat(p / "model.safetensors").st_ino for p in kept}
    random.seed(12345)
    np.random.seed(12345)
    torch.manual_seed(12345)

    train(_config(resumed, f"--rl.steps={STEPS}"), resume=True, echo=lambda _: None)

    # It resumed (kept the first half as written) rather than starting over.
    assert {p.name: os.stat(p / "model.safetensors").st_ino for p in kept} == before
    assert metrics(resumed)[: half + 1] == rows[: half + 1]  # timestamps included
    full_dirs, resumed_dirs = checkpoint_dirs(tiny_run), checkpoint_dirs(resumed)
    assert [d.name for d in resumed_dirs] == [d.name for d in full_dirs]
    a, b = full_dirs[-1], resumed_dirs[-1]
    _assert_same(weights(a), weights(b), "model")
    for name in ("optimizer.pt", "rng.pt"):
        _assert_same(
            torch.load(a / name, weights_only=True), torch.load(b / name, weights_only=True), name
        )
    assert json.loads((a / "state.json").read_text()) == json.loads((b / "state.json").read_text())
    assert _without_times(metrics(resumed)) == _without_times(metrics(tiny_run))


PINNED_KEYS = ("loss", "reward/mean", "rl/datums", "eval/accuracy")
PIN_TOLERANCE = 1e-6


def _snapshot(run_dir: Path) -> list[dict[str, float]]:
    return [
        {"step": r["step"], **{k: r[k] for k in PINNED_KEYS if k in r}} for r in metrics(run_dir)
    ]


def test_a_tiny_seeded_run_matches_its_pinned_losses_and_rewards(
    tiny_run: Path, request: pytest.FixtureRequest
) -> None:
    """The first STEPS losses, rewards, datum counts and held-out accuracies of the shared tiny
    run (seed 0, one torch thread) equal the pin in tests/assets/tiny_run.json within
    PIN_TOLERANCE (absolute). tests/assets/README.md says why that tolerance and how to re-pin."""
    assert_every_rl_step_trained(tiny_run)
    assert torch.get_num_threads() == 1  # `--run.threads=1`: the pin is a one-thread run
    got = _snapshot(tiny_run)
    reason = request.config.getoption("--repin")
    if reason:
        old = json.loads(PIN.read_text()) if PIN.exists() else {"history": []}
        entry = {
            "date": datetime.date.today().isoformat(),
            "torch": torch.__version__,
            "why": reason,
        }
        PIN.write_text(
            json.dumps(
                {
                    "overrides": [*TINY_RUN, f"--rl.steps={STEPS}"],
                    "torch": torch.__version__,
                    "threads": 1,
                    "tolerance": PIN_TOLERANCE,
                    "history": [*old["history"], entry],
                    "rows": got,
                },
                indent=1,
            )
            + "\n"
        )
    pin = json.loads(PIN.read_text())
    assert pin["overrides"] == [*TINY_RUN, f"--rl.steps={STEPS}"], "the pinned config changed"
    hint = (
        f"pinned with torch {pin['torch']}, running {torch.__version__}; if the change is meant, "
        "re-pin with a reason (tests/assets/README.md)"
    )
    assert [r["step"] for r in got] == [r["step"] for r in pin["rows"]], hint
    for mine, pinned in zip(got, pin["rows"], strict=True):
        assert mine.keys() == pinned.keys(), (mine, pinned, hint)
        for key, value in pinned.items():
            assert abs(mine[key] - value) <= PIN_TOLERANCE, (mine["step"], key, mine[key], hint)


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
        interrupt_after(patch, 1)
        with pytest.raises(Interrupted):
            train(_config(tmp_path, "--rl.steps=2"), echo=lambda _: None)
    changed = ["--eval.every=1", "--run.threads=1", "--rl.micro_batch_size=7", "--run.keep_last=3"]
    train(_config(tmp_path, "--rl.steps=2", *changed), resume=True, echo=lambda _: None)
    assert [r["step"] for r in metrics(tmp_path)] == [0, 1, 2]
    assert set(loop.RESUME_MAY_CHANGE) >= {"run.dir", "eval.every", "run.threads"}


def test_the_loop_and_its_sources_speak_only_the_client_api() -> None:
    """No client's `.engine` is read in train/ or the two rollout sources: the loop gets parameter
    counts from `get_info` and the weights to publish from `get_weights` (`config.engine`, the
    recipe's engine settings, is not a client's)."""
    src = Path(loop.__file__).parents[1]
    files = [*sorted((src / "train").glob("*.py")), src / "rollout/source.py"]
    files.append(src / "asynchronous/source.py")
    reads = [
        f"{path.name}:{node.lineno} .{node.attr}"
        for path in files
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Attribute)
        and node.attr == "engine"
        and not (isinstance(node.value, ast.Name) and node.value.id == "config")
    ]
    assert len(files) >= 7 and not reads, reads


def test_an_unknown_override_is_an_error_naming_the_key(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="ratio_mx"):
        apply_overrides(TrainConfig(), ["--loss.ratio_mx=5"])


@pytest.mark.parametrize(
    "name", ["arithmetic_cispo", "arithmetic_cispo_async", "arithmetic_cispo_async_lag1"]
)
def test_every_shipped_recipe_runs_two_steps(tmp_path: Path, name: str) -> None:
    config = apply_overrides(load_recipe(name), [*TINY_RUN, "--rl.steps=2"])
    config = dataclasses.replace(config, run=dataclasses.replace(config.run, dir=str(tmp_path)))
    train(config, echo=lambda _: None)
    assert len(metrics(tmp_path)) == 3
    assert_every_rl_step_trained(tmp_path)


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
