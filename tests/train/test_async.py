"""Claims about asynchronous training: the staleness bound, parity with the synchronous loop at
max_staleness=0, the weight-sync canary, and clean shutdown of the sampler worker.

The end-to-end tests start a real worker process (spawn: ~2-5 s each on a busy 2-core machine).
"""

from __future__ import annotations

import heapq
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import psutil
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from cispo.asynchronous.staleness import NO_WEIGHTS, LagStats, StalenessGate
from cispo.asynchronous.worker import SPAWN, SamplerWorker, WeightChannel, WeightSyncError
from cispo.cli import load_recipe
from cispo.client.service import TrainingClient
from cispo.config import TrainConfig
from cispo.rollout.rollouts import Rollout, output_logprobs, with_old_logprobs
from cispo.train import loop
from cispo.train.loop import train
from cispo.train.update import train_on_rollout
from cispo.types import Datum
from tests.train.helpers import (
    TINY_RUN,
    Interrupted,
    assert_every_rl_step_trained,
    interrupt_after,
    random_datums,
    run_config,
    tiny_bundle,
    tiny_engine,
)

# The shared tiny run (every RL step trains), checkpointed after the warm start and at the end.
FAST = [*TINY_RUN, "--run.checkpoint_every=0"]


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


def _hold_the_channel_lock(channel: WeightChannel, holding: Any) -> None:
    """A stand-in worker that takes the channel's lock and keeps it (until it is killed)."""
    with channel._cond:
        holding.set()
        time.sleep(120)


def test_a_worker_killed_holding_the_channel_lock_does_not_block_the_trainer(
    tmp_path: Path,
) -> None:
    """A worker killed (SIGKILL, the OOM killer) while it holds the channel's lock never releases
    it; the trainer's publish, mark_consumed and stop must still return (the death is then
    reported by `next_message`), not wait forever."""
    channel = WeightChannel(tmp_path)
    holding = SPAWN.Event()
    process = SPAWN.Process(target=_hold_the_channel_lock, args=(channel, holding), daemon=True)
    process.start()
    channel.watch(process.is_alive)
    assert holding.wait(timeout=60), "the stand-in worker never took the lock"
    os.kill(process.pid, signal.SIGKILL)  # type: ignore[arg-type]
    process.join(timeout=10)
    assert not process.is_alive()

    def trainer() -> None:
        channel.publish({"w": torch.ones(2)}, 0)
        channel.mark_consumed(1)
        channel.stop()

    thread = threading.Thread(target=trainer, daemon=True)
    thread.start()
    thread.join(timeout=10)
    assert not thread.is_alive(), "the trainer is blocked on the dead worker's lock"
    assert channel._published.value == 0 and channel._stopped.value == 1  # (read without the lock)
    assert (tmp_path / "v_00000000" / "model.safetensors").is_file()


# ---------------------------------------------------------------- end to end (real worker)
def test_async_with_max_staleness_0_reproduces_the_synchronous_run(tmp_path: Path) -> None:
    sync_dir, async_dir = tmp_path / "sync", tmp_path / "async"
    sync = train(_config(sync_dir, "--rl.steps=3"), echo=_quiet)  # the in-process source
    run = train(
        _config(
            async_dir,
            "--rl.steps=3",
            "--asynchronous.enabled=true",
            "--asynchronous.max_staleness=0",
        ),
        echo=_quiet,
    )
    assert_every_rl_step_trained(sync_dir)
    assert_every_rl_step_trained(async_dir)
    rows_sync, rows_async = _metrics(sync_dir), _metrics(async_dir)
    assert any(r.get("loss") for r in rows_sync), "vacuous: no RL step had a loss"
    assert all("canary/max_abs_logprob_diff" in r for r in rows_async[1:]), "no worker ran"
    skip = ("time", "staleness/", "canary/")
    for a, b in zip(rows_sync, rows_async, strict=True):
        kept = {k: v for k, v in a.items() if not k.startswith(skip)}
        assert kept == {k: b[k] for k in kept}  # exact: every metric, every step
    wa, wb = _weights(sync_dir), _weights(async_dir)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)  # tolerance 0: bitwise-equal weights
    assert any(not torch.equal(wa[k], _weights_at(sync_dir, 0)[k]) for k in wa), "no update"
    assert run.accuracy_end == sync.accuracy_end
    assert run.lag_max == 0 and sync.lag_max == 0


def test_the_lag_1_recipe_trains_stale_batches_within_the_bound_and_reports_the_lag(
    tmp_path: Path,
) -> None:
    recipe = load_recipe("arithmetic_cispo_async_lag1")
    assert recipe.asynchronous.enabled and recipe.asynchronous.max_staleness == 1
    run = train(_config(tmp_path, "--rl.steps=4", recipe=recipe), echo=_quiet)
    assert_every_rl_step_trained(tmp_path)
    rows = _metrics(tmp_path)[1:]
    assert all(r["optim/grad_norm"] > 0 for r in rows), "vacuous: no update"
    assert run.lag_max == 1 and 0 < run.lag_mean <= 1 and run.discarded == 0
    assert rows[0]["staleness/lag_max"] == 0.0  # the first batch is sampled with version 0
    assert {r["staleness/lag_max"] for r in rows} <= {0.0, 1.0}
    assert all(r["staleness/lag_0_frac"] + r["staleness/lag_1_frac"] == 1.0 for r in rows)
    assert rows[-1]["staleness/run_lag_max"] == 1.0
    diffs = [r["canary/max_abs_logprob_diff"] for r in rows if "canary/max_abs_logprob_diff" in r]
    assert diffs and max(diffs) <= 1e-3


def _weights_at(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    path = next((run_dir / "checkpoints").rglob(f"step_{step:06d}/model.safetensors"))
    return load_file(str(path))


def test_an_async_run_resumes_from_its_checkpoint_with_the_first_batch_on_policy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Resume is exact for the weights, optimizer and data position, not for the in-flight batch:
    the batch sampled one step ahead is not in the checkpoint, so the first batch after a resume
    is sampled with the checkpoint's own weights (lag 0) and the lag bound holds from there."""
    config = _config(
        tmp_path, "--rl.steps=4", "--asynchronous.enabled=true", "--run.checkpoint_every=1"
    )
    with monkeypatch.context() as patch:
        interrupt_after(patch, 2)
        with pytest.raises(Interrupted):
            train(config, echo=_quiet)
    assert [r["step"] for r in _metrics(tmp_path)] == [0, 1, 2]
    run = train(config, resume=True, echo=_quiet)
    assert_every_rl_step_trained(tmp_path)
    rows = _metrics(tmp_path)
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]  # nothing logged twice
    assert rows[3]["staleness/lag_max"] == 0.0  # step 3: the first batch after the resume
    assert rows[4]["staleness/lag_max"] == 1.0
    assert run.lag_max == 1
    assert any((tmp_path / "checkpoints").rglob("step_000004"))


def test_a_refused_batch_is_resampled_by_the_trainer_and_counted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The trainer-side staleness check (unreachable under pacing) forced to refuse step 1: the
    trainer samples that batch in process at lag 0, and the run goes on with the worker."""
    real = StalenessGate.admits

    def admits(self: StalenessGate, step: int, version: int) -> bool:
        return step != 1 and real(self, step, version)

    monkeypatch.setattr(StalenessGate, "admits", admits)
    run = train(
        _config(
            tmp_path,
            "--rl.steps=3",
            "--asynchronous.enabled=true",
        ),
        echo=_quiet,
    )
    assert_every_rl_step_trained(tmp_path)
    rows = _metrics(tmp_path)[1:]
    assert run.discarded == 1 and rows[-1]["staleness/discarded"] == 1.0
    assert rows[1]["staleness/lag_max"] == 0.0  # the trainer's own batch
    assert all(r["optim/grad_norm"] > 0 for r in rows)


def test_a_stale_batch_is_trained_on_old_logprobs_recomputed_at_the_current_weights(
    tmp_path: Path,
) -> None:
    """In process, no worker: a two-minibatch round on datums whose stored old logprobs are wrong
    on purpose. At lag 1 with the old anchor they are recomputed, so the round equals one on the
    right old logprobs (the trainer's own, bitwise); at lag 0 they are kept, and it does not."""
    config = _config(
        tmp_path, "--rl.minibatches=2", "--loss.anchor=old", "--asynchronous.correction=tis"
    )
    wrong = []
    for d in random_datums(12, seed=4):
        inputs = dict(d.loss_fn_inputs)
        inputs["old_logprobs"] = [0.0] * d.model_input.length
        wrong.append(Datum(model_input=d.model_input, loss_fn_inputs=inputs))
    stale, right, kept = _client(tmp_path), _client(tmp_path), _client(tmp_path)
    scored = right.forward(wrong, "cross_entropy", temperature=config.sampling.temperature)
    fixed = with_old_logprobs(wrong, output_logprobs(scored.result().loss_fn_outputs))
    train_on_rollout(stale, _rollout(wrong), config, lag=1)
    train_on_rollout(right, _rollout(fixed), config, lag=0)
    train_on_rollout(kept, _rollout(wrong), config, lag=0)
    ws, wr, wk = (c.get_weights() for c in (stale, right, kept))
    assert any(not torch.equal(wr[k], _initial()[k]) for k in wr), "vacuous: no update"
    assert all(torch.equal(ws[k], wr[k]) for k in ws)
    kept_diff = max(float((wk[k] - wr[k]).abs().max()) for k in wk)
    assert kept_diff > 1e-3, kept_diff  # wrong old logprobs are visible: the test can fail
    for c in (stale, right, kept):
        c.close()


def _client(tmp_path: Path) -> TrainingClient:
    engine = tiny_engine()
    return TrainingClient(engine, tiny_bundle(), tmp_path / f"client-{id(engine)}")


def _initial() -> dict[str, torch.Tensor]:
    return tiny_engine().model.state_dict()


def _rollout(datums: list[Datum]) -> Rollout:
    return Rollout(1, [], [], torch.zeros(3, 4), torch.zeros(3, 4), datums, {}, version=0)


def test_a_correction_with_the_sampler_anchor_is_refused_before_anything_starts(
    tmp_path: Path,
) -> None:
    refused = r"asynchronous\.correction='tis' needs loss\.anchor='old'"
    with pytest.raises(ValueError, match=refused):
        train(
            _config(tmp_path, "--loss.anchor=sampler", "--asynchronous.correction=tis"),
            echo=_quiet,
        )
    assert not any(tmp_path.iterdir())  # no run directory content, no worker


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

    monkeypatch.setattr(loop, "train_on_rollout", fail)
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
