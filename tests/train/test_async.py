"""Claims about asynchronous training: the staleness bound, parity with the synchronous loop at
max_staleness=0, the weight-sync canary, and clean shutdown of the sampler worker.

The end-to-end tests start a real worker process (spawn: ~2-5 s each on a busy 2-core machine).
"""

from __future__ import annotations

import dataclasses
import heapq
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import cast

import psutil
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from cispo.asynchronous.staleness import NO_WEIGHTS, LagStats, StalenessGate
from cispo.asynchronous.worker import (
    GradChannel,
    GradReport,
    SamplerWorker,
    SyncCanary,
    WeightChannel,
    WeightSyncError,
    _gradient_share,
    balanced_share,
    loss_fn_config,
    share_layout,
)
from cispo.cli import apply_overrides, load_recipe
from cispo.client.service import TrainingClient
from cispo.config import TrainConfig
from cispo.rollout.rollouts import Rollout
from cispo.train import async_loop
from cispo.train.loop import train
from cispo.train.update import train_on_rollout
from cispo.types import Datum
from tests.train.helpers import TINY_RUN, random_datums, run_config, tiny_bundle, tiny_engine

# A tiny run whose warm start gets some reward (so RL steps really update the weights).
FAST = [
    *TINY_RUN,
    "--task.digits=1",
    "--sft.steps=80",
    "--sft.warmup_steps=5",
    "--sft.learning_rate=2e-2",
    "--run.threads=1",
    "--run.checkpoint_every=0",
]


def _config(run_dir: Path, *extra: str, recipe: TrainConfig | None = None) -> TrainConfig:
    return run_config(run_dir, [*FAST, *extra], recipe)


def _metrics(run_dir: Path) -> list[dict[str, float]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(sorted((run_dir / "checkpoints").rglob("model.safetensors"))[-1]))


def _quiet(_: str) -> None:
    pass


# ---------------------------------------------------------------- pacing (no model, no process)
def _simulate(
    gate: StalenessGate, gen_s: list[float], train_s: list[float], sync_s: list[float]
) -> tuple[list[int], int, float]:
    """Event simulation of one generator and one trainer driven by `gate`.

    Returns the lag of every batch at training time, the most batches ever waiting, the makespan.
    The trainer takes batches in order, trains, then publishes version step+1 (taking sync_s).
    """
    n = len(gen_s)
    published, consumed = 0, 0
    waiting: list[tuple[int, int]] = []  # (step, version) of finished batches
    gen_step, gen_busy, trainer_busy, trained = 0, False, False, 0
    lags, most_waiting, now = [], 0, 0.0
    events: list[tuple[float, int, str, int, int]] = []  # (time, tie, kind, step, version)
    tie = 0
    while trained < n:
        while True:  # every action enabled at `now`
            acted = False
            if not gen_busy and gen_step < n and gate.may_start(gen_step, published, consumed):
                heapq.heappush(events, (now + gen_s[gen_step], tie, "gen", gen_step, published))
                gen_busy, tie, acted = True, tie + 1, True
            if not trainer_busy and waiting:
                step, version = waiting.pop(0)
                assert step == trained and gate.admits(step, version)
                lags.append(step - version)
                consumed += 1
                heapq.heappush(events, (now + train_s[step] + sync_s[step], tie, "pub", step, 0))
                trainer_busy, tie, acted = True, tie + 1, True
            if not acted:
                break
        assert events, "deadlock: nothing can happen and the run is not finished"
        now, _, kind, step, version = heapq.heappop(events)
        if kind == "gen":
            waiting.append((step, version))
            most_waiting = max(most_waiting, len(waiting))
            gen_busy, gen_step = False, gen_step + 1
        else:
            published, trainer_busy, trained = step + 1, False, trained + 1
    return lags, most_waiting, now


@settings(max_examples=40, deadline=None)
@given(
    max_staleness=st.integers(0, 3),
    queue_size=st.integers(1, 3),
    seed=st.integers(0, 2**32 - 1),
    gen_scale=st.floats(0.01, 10.0),
    sync_scale=st.floats(0.0, 2.0),
)
def test_staleness_bound_is_never_exceeded_over_a_long_run_with_random_timings(
    max_staleness: int, queue_size: int, seed: int, gen_scale: float, sync_scale: float
) -> None:
    rng = random.Random(seed)
    n = 200
    # Heavy-tailed durations: most steps are quick, a few stall (a slow verifier, a long sample).
    gen = [gen_scale * rng.paretovariate(1.5) for _ in range(n)]
    tr = [rng.expovariate(1.0) for _ in range(n)]
    sync = [sync_scale * rng.random() for _ in range(n)]
    gate = StalenessGate(max_staleness, queue_size)
    lags, most_waiting, _ = _simulate(gate, gen, tr, sync)
    assert len(lags) == n  # every batch trained on, none discarded
    assert max(lags) <= max_staleness
    assert min(lags) >= 0
    assert most_waiting <= queue_size


def test_lag_1_overlaps_generation_with_training_and_lag_0_does_not() -> None:
    # Generation and training 1 s each: serial takes 2 s/step, lag 1 hides one behind the other.
    n = 50
    ones, zeros = [1.0] * n, [0.0] * n
    lags0, _, t0 = _simulate(StalenessGate(0), ones, ones, zeros)
    lags1, _, t1 = _simulate(StalenessGate(1), ones, ones, zeros)
    assert t0 == pytest.approx(2 * n) and set(lags0) == {0}
    assert t1 == pytest.approx(n + 1) and set(lags1[1:]) == {1}


def test_gate_waits_for_weights_and_for_queue_room() -> None:
    gate = StalenessGate(max_staleness=1, queue_size=1)
    assert not gate.may_start(0, NO_WEIGHTS, 0)  # nothing published yet
    assert gate.may_start(1, published=0, consumed=1)  # batch 1 may use version 0
    assert not gate.may_start(2, published=0, consumed=2)  # would be 2 behind
    assert not gate.may_start(1, published=0, consumed=0)  # batch 0 still waits: no room
    assert gate.admits(3, 2) and not gate.admits(3, 1)


def test_lag_stats_are_token_weighted_over_the_run() -> None:
    stats = LagStats(max_staleness=1)
    step0 = stats.add(0, [(0, 30)])
    step1 = stats.add(1, [(0, 10)])
    assert step0["staleness/lag_0_frac"] == 1.0 and step1["staleness/lag_1_frac"] == 1.0
    assert stats.mean == pytest.approx(10 / 40) and stats.max == 1


# ---------------------------------------------------------------- end to end (real worker)
def test_async_with_max_staleness_0_reproduces_the_synchronous_run(tmp_path: Path) -> None:
    sync_dir, async_dir = tmp_path / "sync", tmp_path / "async"
    sync = train(_config(sync_dir, "--rl.steps=3"), echo=_quiet)
    run = train(
        _config(
            async_dir,
            "--rl.steps=3",
            "--asynchronous.enabled=true",
            "--asynchronous.max_staleness=0",
        ),
        echo=_quiet,
    )
    rows_sync, rows_async = _metrics(sync_dir), _metrics(async_dir)
    assert any(r.get("loss") for r in rows_sync), "vacuous: no RL step had a loss"
    skip = ("time", "staleness/", "canary/")
    for a, b in zip(rows_sync, rows_async, strict=True):
        kept = {k: v for k, v in a.items() if not k.startswith(skip)}
        assert kept == {k: b[k] for k in kept}
    wa, wb = _weights(sync_dir), _weights(async_dir)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert run.accuracy_end == sync.accuracy_end
    assert isinstance(run, async_loop.AsyncRunSummary) and run.lag_max == 0


def test_the_lag_1_recipe_trains_stale_batches_within_the_bound_and_reports_the_lag(
    tmp_path: Path,
) -> None:
    recipe = load_recipe("arithmetic_cispo_async_lag1")
    assert recipe.asynchronous.enabled and recipe.asynchronous.max_staleness == 1
    run = train(_config(tmp_path, "--rl.steps=4", recipe=recipe), echo=_quiet)
    rows = _metrics(tmp_path)[1:]
    assert isinstance(run, async_loop.AsyncRunSummary)
    assert run.lag_max == 1 and 0 < run.lag_mean <= 1 and run.discarded == 0
    assert rows[0]["staleness/lag_max"] == 0.0  # the first batch is sampled with version 0
    assert {r["staleness/lag_max"] for r in rows} <= {0.0, 1.0}
    assert all(r["staleness/lag_0_frac"] + r["staleness/lag_1_frac"] == 1.0 for r in rows)
    assert rows[-1]["staleness/run_lag_max"] == 1.0
    diffs = [r["canary/max_abs_logprob_diff"] for r in rows if "canary/max_abs_logprob_diff" in r]
    assert diffs and max(diffs) <= 1e-3


def test_the_worker_gradient_share_gives_the_synchronous_update(tmp_path: Path) -> None:
    """At max_staleness=0 the async run is the synchronous one; with the worker computing the
    gradient of 40% of every batch, the weights still match it up to float summation order."""
    sync_dir, shared_dir = tmp_path / "sync", tmp_path / "shared"
    train(_config(sync_dir, "--rl.steps=3"), echo=_quiet)
    run = train(
        _config(
            shared_dir,
            "--rl.steps=3",
            "--asynchronous.enabled=true",
            "--asynchronous.max_staleness=0",
            "--asynchronous.worker_grad_share=0.4",
        ),
        echo=_quiet,
    )
    rows_sync, rows_shared = _metrics(sync_dir)[1:], _metrics(shared_dir)[1:]
    assert all(r["rl/datums"] >= 3 for r in rows_shared), "vacuous: the worker got no datum"
    assert all(r["time/worker_grad"] > 0 for r in rows_shared)
    for a, b in zip(rows_sync, rows_shared, strict=True):
        assert b["train/num_tokens"] == a["train/num_tokens"]  # both halves counted once
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4, abs=1e-6)
        assert b["optim/grad_norm"] == pytest.approx(a["optim/grad_norm"], rel=1e-4)
    wa, wb = _weights(sync_dir), _weights(shared_dir)
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) < 1e-5
    assert any(not torch.equal(wa[k], _weights_at(sync_dir, 0)[k]) for k in wa), "no update"
    assert isinstance(run, async_loop.AsyncRunSummary) and run.lag_max == 0


def _weights_at(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    path = next((run_dir / "checkpoints").rglob(f"step_{step:06d}/model.safetensors"))
    return load_file(str(path))


def test_the_worker_gradient_share_at_lag_1_keeps_the_bound(tmp_path: Path) -> None:
    run = train(
        _config(
            tmp_path,
            "--rl.steps=4",
            "--asynchronous.enabled=true",
            "--asynchronous.max_staleness=1",
            "--asynchronous.worker_grad_share=0.5",
            "--loss.anchor=old",
            "--asynchronous.correction=tis",
        ),
        echo=_quiet,
    )
    rows = _metrics(tmp_path)[1:]
    assert isinstance(run, async_loop.AsyncRunSummary)
    assert run.lag_max == 1 and run.discarded == 0
    assert all(r["time/worker_grad"] > 0 and r["optim/grad_norm"] > 0 for r in rows)
    assert rows[-1]["staleness/run_lag_max"] == 1.0


def test_an_async_run_resumes_from_its_checkpoint_with_the_first_batch_on_policy(
    tmp_path: Path,
) -> None:
    """Resume is exact for the weights, optimizer and data position, not for the in-flight batch:
    the batch sampled one step ahead is not in the checkpoint, so the first batch after a resume
    is sampled with the checkpoint's own weights (lag 0) and the lag bound holds from there."""
    args = [
        "--asynchronous.enabled=true",
        "--asynchronous.worker_grad_share=0.5",
        "--run.checkpoint_every=1",
    ]
    train(_config(tmp_path, "--rl.steps=2", *args), echo=_quiet)
    run = train(_config(tmp_path, "--rl.steps=4", *args), resume=True, echo=_quiet)
    rows = _metrics(tmp_path)
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]  # nothing logged twice
    assert rows[3]["staleness/lag_max"] == 0.0  # step 3: the first batch after the resume
    assert rows[4]["staleness/lag_max"] == 1.0
    assert isinstance(run, async_loop.AsyncRunSummary) and run.lag_max == 1
    assert any((tmp_path / "checkpoints").rglob("step_000004"))


@pytest.mark.parametrize("share", ["0", "0.5"])
def test_a_refused_batch_is_resampled_by_the_trainer_and_counted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, share: str
) -> None:
    """The trainer-side staleness check (unreachable under pacing) forced to refuse step 1: the
    trainer samples that batch itself at lag 0, ignores the worker's gradient share of the
    refused batch, and the run goes on with the worker."""
    real = StalenessGate.admits

    def admits(self: StalenessGate, step: int, version: int) -> bool:
        return step != 1 and real(self, step, version)

    monkeypatch.setattr(StalenessGate, "admits", admits)
    run = train(
        _config(
            tmp_path,
            "--rl.steps=3",
            "--asynchronous.enabled=true",
            f"--asynchronous.worker_grad_share={share}",
        ),
        echo=_quiet,
    )
    rows = _metrics(tmp_path)[1:]
    assert isinstance(run, async_loop.AsyncRunSummary) and run.discarded == 1
    assert rows[1]["staleness/lag_max"] == 0.0  # the trainer's own batch
    assert all(r["optim/grad_norm"] > 0 for r in rows)


def test_the_gradient_share_of_a_two_minibatch_round_with_recomputed_old_logprobs_is_exact(
    tmp_path: Path,
) -> None:
    """Two optimizer steps per batch, old logprobs recomputed: the worker computes part of the
    first step's gradient and the old logprobs of the datums it holds; the trainer's second step
    uses them. At max_staleness=0 this is the synchronous round up to float summation order."""
    extra = ["--rl.steps=3", "--rl.minibatches=2", "--rl.recompute_old_logprobs=true"]
    sync_dir, shared_dir = tmp_path / "sync", tmp_path / "shared"
    train(_config(sync_dir, *extra), echo=_quiet)
    train(
        _config(
            shared_dir,
            *extra,
            "--asynchronous.enabled=true",
            "--asynchronous.max_staleness=0",
            "--asynchronous.worker_grad_share=0.5",
        ),
        echo=_quiet,
    )
    rows_sync, rows_shared = _metrics(sync_dir)[1:], _metrics(shared_dir)[1:]
    assert all(r["rl/datums"] >= 4 and r["time/worker_grad"] > 0 for r in rows_shared)
    for a, b in zip(rows_sync, rows_shared, strict=True):
        assert b["train/num_tokens"] == a["train/num_tokens"]
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4, abs=1e-6)
        assert b["optim/grad_norm"] == pytest.approx(a["optim/grad_norm"], rel=1e-4)  # 2nd step
    wa, wb = _weights(sync_dir), _weights(shared_dir)
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) < 1e-5


def _client(tmp_path: Path) -> TrainingClient:
    engine = tiny_engine()
    return TrainingClient(engine, tiny_bundle(), tmp_path / f"client-{id(engine)}")


def _worker_report(
    config: TrainConfig, rollout: Rollout, trainer: TrainingClient
) -> tuple[GradReport, GradChannel]:
    """The worker's `_gradient_share` of `rollout`, from an engine with the trainer's weights."""
    grads = GradChannel(trainer.engine.model)
    return _gradient_share(tiny_engine(), rollout, config, grads), grads


def _shared_round(
    config: TrainConfig,
    rollout: Rollout,
    sent: tuple[GradReport, GradChannel],
    training: TrainingClient,
) -> dict[str, float]:
    """The trainer's side of a shared round, in process, fed one worker report."""
    report, grads = sent

    class OneReport:
        def next_message(self) -> GradReport:
            return report

    worker = cast(SamplerWorker, OneReport())
    return async_loop._train_with_worker_share(
        training, worker, grads, SyncCanary(1e-3), rollout, config, use_worker=True
    )


def _rollout(datums: list[Datum]) -> Rollout:
    return Rollout(0, [], [], torch.zeros(3, 4), torch.zeros(3, 4), datums, {}, version=0)


def test_the_shared_round_trains_on_the_old_logprobs_the_worker_recomputed(tmp_path: Path) -> None:
    """In process, no timing: the worker's `_gradient_share` and the trainer's side of a
    two-minibatch round, on datums whose stored old logprobs are deliberately wrong. Recomputing
    replaces them (the worker's for the datums it holds), so the result equals the synchronous
    `train_on_rollout`; with the wrong ones left in, it would not."""
    config = _config(
        tmp_path,
        "--rl.minibatches=2",
        "--rl.recompute_old_logprobs=true",
        "--asynchronous.enabled=true",
        "--asynchronous.worker_grad_share=0.5",
        "--loss.anchor=old",
    )
    datums = []
    for d in random_datums(12, seed=4):
        inputs = dict(d.loss_fn_inputs)
        inputs["old_logprobs"] = [0.0] * d.model_input.length  # wrong on purpose
        datums.append(Datum(model_input=d.model_input, loss_fn_inputs=inputs))
    rollout = _rollout(datums)
    shared, sync, stale = _client(tmp_path), _client(tmp_path), _client(tmp_path)
    sent = _worker_report(config, rollout, shared)
    report = sent[0]
    assert report.count == 3 and report.old_logprobs is not None
    assert len(report.old_logprobs) == 9  # its 3 datums of minibatch 0, then minibatch 1's 6
    _shared_round(config, rollout, sent, shared)
    train_on_rollout(sync, rollout, config, loss_fn_config=loss_fn_config(config))
    no_recompute = dataclasses.replace(
        config, rl=dataclasses.replace(config.rl, recompute_old_logprobs=False)
    )
    train_on_rollout(stale, rollout, no_recompute, loss_fn_config=loss_fn_config(config))
    ws, wy, wz = (c.engine.model.state_dict() for c in (shared, sync, stale))
    assert max(float((ws[k] - wy[k]).abs().max()) for k in ws) < 2e-5  # summation order
    stale_diff = max(float((wz[k] - wy[k]).abs().max()) for k in wz)
    assert stale_diff > 1e-3, stale_diff  # wrong old logprobs are visible: the test can fail
    for c in (shared, sync, stale):
        c.close()


def test_a_gradient_share_changed_in_transit_stops_the_round_before_the_step(
    tmp_path: Path,
) -> None:
    config = _config(
        tmp_path, "--asynchronous.enabled=true", "--asynchronous.worker_grad_share=0.5"
    )
    rollout = _rollout(random_datums(8, seed=5))
    trainer = _client(tmp_path)
    before = {k: v.clone() for k, v in trainer.engine.model.state_dict().items()}
    sent = _worker_report(config, rollout, trainer)
    buffer = next(iter(sent[1]._buffers.values()))
    buffer.view(-1)[0] += 1e-3  # what a broken shared-memory transfer would look like
    with pytest.raises(WeightSyncError, match="arrived changed"):
        _shared_round(config, rollout, sent, trainer)
    after = trainer.engine.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # no optimizer step was taken
    trainer.close()


def test_a_bad_worker_gradient_share_is_refused_before_anything_starts(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="asynchronous\\.worker_grad_share"):
        train(
            _config(
                tmp_path, "--asynchronous.enabled=true", "--asynchronous.worker_grad_share=1.0"
            ),
            echo=_quiet,
        )
    assert not (tmp_path / "metrics.jsonl").exists()


def _sabotage(monkeypatch: pytest.MonkeyPatch, corrupt: bool) -> None:
    real = WeightChannel.publish
    first: dict[str, torch.Tensor] = {}

    def publish(self: WeightChannel, weights: Mapping[str, torch.Tensor], version: int) -> None:
        if corrupt:  # every sync delivers slightly wrong weights
            g = torch.Generator().manual_seed(version)
            real(
                self,
                {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in weights.items()},
                version,
            )
            return
        if not first:  # every sync after the first silently re-sends the first weights
            first.update({k: v.clone() for k, v in weights.items()})
        real(self, first, version)

    monkeypatch.setattr(WeightChannel, "publish", publish)


@pytest.fixture
def worker_pids(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """Pids of the sampler workers started during the test; asserts they are all gone after."""
    pids: list[int] = []
    real = SamplerWorker.start

    def start(self: SamplerWorker) -> None:
        real(self)
        assert self.pid is not None
        pids.append(self.pid)

    monkeypatch.setattr(SamplerWorker, "start", start)
    yield pids
    assert pids, "no worker was started"
    for pid in pids:
        assert not psutil.pid_exists(pid), f"orphan sampler worker {pid}"


def test_canary_fires_when_a_sync_leaves_the_sampler_weights_unchanged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, worker_pids: list[int]
) -> None:
    _sabotage(monkeypatch, corrupt=False)
    with pytest.raises(WeightSyncError, match="did not change the sampler's weights"):
        train(_config(tmp_path, "--rl.steps=4", "--asynchronous.enabled=true"), echo=_quiet)


def test_canary_fires_when_the_sampler_weights_diverge_from_the_trainer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, worker_pids: list[int]
) -> None:
    _sabotage(monkeypatch, corrupt=True)
    with pytest.raises(WeightSyncError, match="disagree on the probe batch"):
        train(_config(tmp_path, "--rl.steps=2", "--asynchronous.enabled=true"), echo=_quiet)


def test_the_worker_is_gone_after_a_successful_run(tmp_path: Path, worker_pids: list[int]) -> None:
    train(
        _config(tmp_path, "--rl.steps=2", "--sft.steps=0", "--asynchronous.enabled=true"),
        echo=_quiet,
    )


@pytest.mark.parametrize("error", [RuntimeError("trainer failed"), KeyboardInterrupt()])
def test_the_worker_is_gone_after_the_trainer_raises(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    worker_pids: list[int],
    error: BaseException,
) -> None:
    def fail(*args: object, **kwargs: object) -> dict[str, float]:
        raise error

    monkeypatch.setattr(async_loop, "train_on_rollout", fail)
    with pytest.raises(type(error)):
        train(
            _config(tmp_path, "--rl.steps=3", "--sft.steps=0", "--asynchronous.enabled=true"),
            echo=_quiet,
        )


# The child installs Python's own SIGINT handler: a shell without job control starts background
# commands (and so pytest and this child) with SIGINT ignored, and Python then keeps it ignored.
_CTRL_C_RUN = """
import dataclasses, signal, sys
from cispo.cli import apply_overrides
from cispo.config import TrainConfig
from cispo.train.loop import train
if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)
    config = apply_overrides(TrainConfig(), sys.argv[2:])
    config = dataclasses.replace(config, run=dataclasses.replace(config.run, dir=sys.argv[1]))
    train(config, echo=lambda line: print(line, flush=True))
"""


def test_ctrl_c_stops_the_run_and_its_worker(tmp_path: Path) -> None:
    script = tmp_path / "run.py"
    script.write_text(_CTRL_C_RUN)
    args = [*FAST, "--sft.steps=0", "--rl.steps=100000", "--asynchronous.enabled=true"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, str(script), str(tmp_path / "run"), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        env=env,
        cwd=Path(__file__).parents[2],
    )
    assert proc.stdout is not None
    pid = None
    for line in proc.stdout:
        if "sampler worker pid" in line:
            pid = int(line.split("sampler worker pid")[1].split()[0])
        if "before RL" in line:
            break
    assert pid is not None and psutil.pid_exists(pid)
    time.sleep(2.0)  # into the RL steps, with the worker generating
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole group
    output = proc.communicate(timeout=60)[0]
    assert proc.returncode != 0 and "KeyboardInterrupt" in output
    assert not psutil.pid_exists(pid), "orphan sampler worker after Ctrl-C"


def test_balanced_share_matches_hand_worked_values() -> None:
    # One step per batch: s = (F − c·S) / 2F.
    assert balanced_share(3000, 4000, 0, 0, gen_cost=0.3) == pytest.approx(0.3875)
    # A second minibatch the trainer does alone (4000) whose old logprobs the worker recomputes
    # first (a third of 4000): equal work would give (8000 − 900 − 1333.3) / 8000 = 0.72, but
    # the trainer would then wait; ready in time: (4000 − 1333.3) / 8000.
    assert balanced_share(3000, 4000, 4000, 4000, gen_cost=0.3) == pytest.approx(1 / 3)
    assert balanced_share(30000, 4000, 0, 0, gen_cost=0.3) == 0.0  # generation alone is longer
    assert balanced_share(0, 4000, 0, 0, gen_cost=0.3) == 0.5  # never more than half
    assert balanced_share(3000, 0, 0, 0, gen_cost=0.3) == 0.0  # nothing to share


def test_the_token_split_gives_fewer_datums_to_the_worker_when_fewer_are_trained() -> None:
    """The same sampling work (512 × 2 tokens) with 400 vs 150 datums to train: with fewer
    datums the worker's generation is a larger part of its day, so it takes a smaller share."""
    config = apply_overrides(
        TrainConfig(),
        [
            "--asynchronous.worker_grad_share=0.9",
            "--asynchronous.worker_grad_split=tokens",
            "--asynchronous.worker_gen_cost=0.3",
        ],
    )

    def share(n: int) -> float:
        datums = random_datums(n, seed=1)
        rollout = _rollout(datums)
        rollout.metrics["rl/tokens"] = 512 * 2.0
        per, count = share_layout(rollout, config, recompute=False)
        assert per == n
        return count / n

    many, few = share(400), share(150)
    assert 0.0 < few < many < 0.9
    fixed = dataclasses.replace(
        config,
        asynchronous=dataclasses.replace(config.asynchronous, worker_grad_split="fixed"),
    )
    assert share_layout(_rollout(random_datums(10)), fixed, recompute=False) == (10, 9)
