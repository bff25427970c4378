"""The RL loop: rollout batch → CISPO updates → metrics → checkpoint, over a rollout source.

Written only against the Tinker-style client API (`cispo.client`), like tinker-cookbook's
`recipes/rl_loop.py`, so the same loop can drive a remote server. One run = an optional supervised
warm start (cross_entropy on the task's answers, so that a random model gets some reward), then
`rl.steps` rollout batches, each followed by `rl.epochs × rl.minibatches` optimizer steps
(`cispo.train.update.train_on_rollout`).

The batches come from a `cispo.rollout.source.RolloutSource`: the in-process source samples each
with the current weights (lag 0, the synchronous loop); with `asynchronous.enabled` the worker
source (`cispo.asynchronous.source.WorkerSource`) gets them from a sampler worker process running
up to `asynchronous.max_staleness` rounds ahead (docs/async.md). Everything else (set-up, warm
start, evaluation, logging, checkpoints, the staleness check and lag statistics, the summary) is
the same code for both: synchronous training is lag 0 of this loop.

Under `torchrun` (docs/distributed.md) every rank runs this loop on the same config: the engine
shards the model, every rank samples and scores its share of each batch's prompts and the shares
are all-gathered into the whole batch (`InProcessSource`; with `asynchronous.enabled` rank 0 alone
runs the sampler worker and broadcasts its batches), every rank trains its share of it
(`train_on_rollout`), each rank evaluates its share of the test problems,
checkpoints are sharded (DCP) directories that every rank writes, and rank 0 alone prints and
writes config.json, the logs, samples and plots. Every collective is issued by every rank in the
same order; nothing in a rank-0-only branch issues one.

Deliberately left out: multi-turn environments and a value function (GAE).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cispo import distributed
from cispo.asynchronous.source import WorkerSource
from cispo.asynchronous.staleness import LagStats, StalenessGate
from cispo.checkpoint import latest_named_state
from cispo.client import ServiceClient
from cispo.client.service import TrainingClient
from cispo.config import TrainConfig, to_dict
from cispo.engine.engine import EngineConfig, freeze_heap
from cispo.export import export_hint
from cispo.logging import Progress, RunLogger
from cispo.rollout.rollouts import Rollout, sample_rows
from cispo.rollout.source import InProcessSource, RolloutSource
from cispo.tasks import Problem, Task, make_task
from cispo.train.evaluate import evaluate_counts, rates
from cispo.train.update import train_on_rollout
from cispo.train.warm_start import supervised_warm_start


@dataclass(frozen=True)
class RunSummary:
    steps: int
    accuracy_start: float
    accuracy_end: float
    seconds: float
    lag_mean: float = 0.0
    """Token-weighted mean lag (trainer version − sampling version) over the run."""
    lag_max: int = 0
    """Largest lag of any token trained on."""
    discarded: int = 0
    """Batches refused by the staleness check and resampled in process (pacing keeps it 0)."""
    trainer_wait_s: float = 0.0
    """Time the trainer waited for batches (in process: all of the sampling and scoring)."""
    generator_wait_s: float = 0.0
    """Time the sampler worker was paused by the staleness gate (in process: 0)."""


class OtherRankLogger:
    """The logger of ranks other than 0 under torchrun: writes nothing (rank 0 logs the merged
    metrics, which are the same on every rank)."""

    def resume(self, step: int) -> None:
        pass

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        pass

    def log_samples(self, step: int, rows: Any) -> None:
        pass

    def plot(self) -> Path | None:
        return None

    def close(self) -> None:
        pass


def sharded_evaluate(
    training: TrainingClient, task: Task, test: list[Problem], config: TrainConfig
) -> dict[str, float]:
    """`evaluate` under any world size: every rank gathers the current weights into its sampler
    (a collective), evaluates its `share_bounds` share of the test problems (no collective) and
    the counts are all-gathered and added, so every rank returns the whole set's metrics. With
    greedy decoding and per-problem pass@k seeds, the shares give one process's numbers (up to
    a logit tie that the shares' batches round differently)."""
    sampler = training.save_weights_and_get_sampling_client()
    start, stop = distributed.share_bounds(
        len(test), distributed.current_rank(), distributed.current_world_size()
    )
    mine = (
        evaluate_counts(sampler, task, test[start:stop], config, first_index=start)
        if stop > start
        else (0.0, 0.0, 0.0)
    )
    shares = distributed.gather_objects(mine)
    return rates([sum(column) for column in zip(*shares, strict=True)], config)


@dataclass
class OpenRun:
    """What a loop needs once a run is set up (or resumed): the task, the clients, the logger and
    where to start."""

    run_dir: Path
    task: Task
    training: TrainingClient
    logger: RunLogger | OtherRankLogger
    start: int
    state: dict[str, Any]
    test: list[Problem]

    def warm_start_and_evaluate(
        self, config: TrainConfig, echo: Callable[[str], None]
    ) -> dict[str, float]:
        """The supervised warm start unless the checkpoint already has it, then the held-out
        evaluation before RL (logged as step 0 on a fresh run)."""
        if not self.state.get("warm_started"):
            supervised_warm_start(self.training, self.task, config)
            self.training.save_state(
                "step_000000", metadata={"step": 0, "warm_started": True}
            ).result()
        first = sharded_evaluate(self.training, self.task, self.test, config)
        if not self.state:  # a fresh run; a resumed one logged step 0 already
            self.logger.log(0, first)
        echo(f"held-out greedy accuracy before RL: {first['eval/accuracy']:.1%}")
        return first

    def end_step(
        self, config: TrainConfig, done: int, metrics: dict[str, float], rollout: Rollout
    ) -> dict[str, float] | None:
        """After RL step `done`: the held-out evaluation when due (merged into `metrics`), the
        metrics line, and the checkpoint when due (atomic; fsynced only after the last step).
        Returns the evaluation's metrics if one ran."""
        evaluation = None
        if done % config.eval.every == 0 or done == config.rl.steps:
            evaluation = sharded_evaluate(self.training, self.task, self.test, config)
            metrics |= evaluation
            self.logger.log_samples(done, sample_rows(rollout, config.rl.group_size))
        self.logger.log(done, metrics)
        every = config.run.checkpoint_every
        if (every and done % every == 0) or done == config.rl.steps:
            self.training.save_state(
                f"step_{done:06d}",
                metadata={"step": done, "warm_started": True},
                keep_last=config.run.keep_last,
                durable=done == config.rl.steps,
            ).result()
        return evaluation


def open_run(config: TrainConfig, *, resume: bool, echo: Callable[[str], None]) -> OpenRun:
    """Threads and seeds, the task, a training client on the model, the logger; on `resume`, the
    latest checkpoint's weights, optimizer and step (refused, before anything changes, if the
    config changes the run's trajectory: `check_resume_config`), else a fresh `config.json`.
    Under torchrun every rank builds the same model (same seed) and its engine shards it; rank 0
    alone writes the run's files."""
    info = distributed.init_from_env()
    if config.run.threads:
        torch.set_num_threads(config.run.threads)
    torch.manual_seed(config.run.seed)
    task = make_task(config.task.name, **config.task.kwargs())  # a bad task file leaves no run
    run_dir = Path(config.run.dir)
    writes = info.rank == 0  # on several nodes run.dir must be on a shared file system
    if writes:
        run_dir.mkdir(parents=True, exist_ok=True)
    service = ServiceClient(checkpoint_root=run_dir / "checkpoints", seed=config.run.seed)
    training = service.create_lora_training_client(
        config.model.base_model,
        rank=config.model.lora_rank,
        seed=config.run.seed,
        engine_config=EngineConfig(
            micro_batch_size=config.rl.micro_batch_size, **config.engine.kwargs()
        ),
        model_overrides=config.model.overrides(),
    )
    latest = latest_named_state(training.checkpoint_dir) if resume else None
    saved = run_dir / "config.json"
    data = to_dict(config)
    if latest is not None and saved.exists():
        try:
            check_resume_config(json.loads(saved.read_text()), data)
        except ValueError:
            training.close()
            raise
    logger: RunLogger | OtherRankLogger = (
        RunLogger(
            run_dir, tensorboard=config.run.tensorboard, wandb_project=config.run.wandb_project
        )
        if writes
        else OtherRankLogger()
    )
    start, state = 0, {}
    if latest is not None:
        state = training.load_state(str(latest)).result()
        start = int(state["step"])
        logger.resume(start)
        echo(f"resumed from {latest} at step {start}")
    if writes and (latest is None or not saved.exists()):
        saved.write_text(json.dumps(data, indent=2, sort_keys=True))
    test = task.problems("test", seed=config.run.seed, n=config.eval.num_problems)
    freeze_heap()
    return OpenRun(run_dir, task, training, logger, start, state, test)


RESUME_MAY_CHANGE = {
    "run.dir": "where the run lives, not what it computes",
    "run.threads": "torch threads: float summation order only, not the data or the schedule",
    "rl.micro_batch_size": "sequences per forward pass: float summation order only",
    "run.tensorboard": "a logging sink",
    "run.wandb_project": "a logging sink",
    "run.checkpoint_every": "which checkpoints are written (resume is exact from any)",
    "run.keep_last": "which checkpoints are kept",
    "eval.every": "held-out evaluation: fixed seeds, reads no training state or RNG",
    "eval.num_problems": "held-out evaluation: fixed seeds, reads no training state or RNG",
    "eval.pass_k": "held-out evaluation: fixed seeds, reads no training state or RNG",
    "asynchronous.worker_threads": "the sampler worker's torch threads (summation order only)",
    "asynchronous.worker_timeout_s": "a time-out, not a computation",
    "asynchronous.canary_threshold": "a check of the weight sync, not a computation",
    "asynchronous.probe_size": "a check of the weight sync, not a computation",
    "engine.shared_prefix": "a speed switch of the engine: float summation order only",
    "engine.packed_row_tokens": "a speed switch of the engine: float summation order only",
    "engine.adamw_impl": "a speed switch of the engine: float rounding of the update only",
    "engine.fused_logprobs": "a speed switch of the engine: float summation order only",
    "engine.logprob_chunk_size": "a speed switch of the engine: float summation order only",
    "engine.trim_heap": "where freed memory goes (the allocator): the same computation",
    "engine.mmap_threshold": "where freed memory goes (the allocator): the same computation",
}
"""Config fields a resumed run may change, and why none of them changes the trajectory (the
batches, the updates, the learning rates). Every other field must equal the run's config.json."""


def check_resume_config(saved: Mapping[str, Any], current: Mapping[str, Any]) -> None:
    """Raise ValueError naming every field (dotted) whose value in `current` differs from the
    run's saved config, except `RESUME_MAY_CHANGE`. Fields the saved config lacks count as
    changed; fields only the saved config has (removed from the program since) are ignored."""
    changed = [
        f"{key}: {old!r} -> {new!r}"
        for key, new in _flatten(current).items()
        if key not in RESUME_MAY_CHANGE and (old := _flatten(saved).get(key, "<absent>")) != new
    ]
    if changed:
        raise ValueError(
            "resuming with a config that changes the run's trajectory (compared with its "
            "config.json): " + "; ".join(changed) + ". Resume with the run's own config, or "
            f"start a new run directory. Fields that may change: {', '.join(RESUME_MAY_CHANGE)}"
        )


def _flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, Mapping):
            out |= _flatten(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def train(
    config: TrainConfig, *, resume: bool = False, echo: Callable[[str], None] = print
) -> RunSummary:
    """Run (or resume) the whole job described by `config`."""
    run = config.asynchronous
    if run.correction != "none" and config.loss.anchor != "old":
        raise ValueError(
            f"asynchronous.correction={run.correction!r} needs loss.anchor='old': "
            "with the sampler anchor the ratio already contains exp(old − sampler)"
        )
    started = time.perf_counter()
    if distributed.init_from_env().rank != 0:
        echo = _silent  # rank 0 prints
    opened = open_run(config, resume=resume, echo=echo)
    training, rl = opened.training, config.rl
    echo(describe_plan(config, training))
    in_process = InProcessSource(training, opened.task, config)
    source: RolloutSource = in_process
    try:
        if run.enabled:  # started before the warm start: its start-up overlaps it
            source = WorkerSource(training, opened.task, config, start=opened.start)
        echo(source.describe())
        first = opened.warm_start_and_evaluate(config, echo)
        last = first
        gate, lags = StalenessGate(source.max_staleness), LagStats(source.max_staleness)
        source.after_step(opened.start)
        rl_started, waits, generator_waits = time.perf_counter(), 0.0, 0.0
        name = "CISPO" if config.loss.name == "cispo" else config.loss.name
        progress = Progress(
            rl.steps,
            initial=opened.start,
            desc=f"{name} (lag ≤ {source.max_staleness})" if source.max_staleness else name,
            disable=distributed.current_rank() != 0,
        )
        for step in range(opened.start, rl.steps):
            t = time.perf_counter()
            rollout = source.next(step)
            wait = time.perf_counter() - t
            if not gate.admits(step, rollout.version):  # pacing makes this unreachable; counted
                lags.discarded += 1
                rollout = in_process.next(step)
            lag = step - rollout.version
            metrics = rollout.metrics | train_on_rollout(training, rollout, config, lag=lag)
            metrics |= source.after_step(step + 1)
            metrics |= lags.add(step, [(rollout.version, int(rollout.metrics["rl/tokens"]))])
            metrics["time/wait_for_batch"] = wait
            waits += wait
            generator_waits += rollout.metrics.get("time/generator_wait", 0.0)
            metrics["time/step"] = time.perf_counter() - t
            if step + 1 == rl.steps:
                metrics |= {
                    "staleness/run_lag_mean": lags.mean,
                    "staleness/run_lag_max": float(lags.max),
                    "time/rl_steps_per_s": (rl.steps - opened.start)
                    / (time.perf_counter() - rl_started),
                }
            last = opened.end_step(config, step + 1, metrics, rollout) or last
            progress.update(
                {
                    "reward": metrics["reward/mean"],
                    "acc": metrics["reward/accuracy"],
                    "lag": lag,
                    "s/step": metrics["time/step"],
                }
            )
        progress.close()
    finally:
        source.close()
        training.close()
        opened.logger.close()  # draws the final curves (once: each draw costs ~1 s of CPU)
    summary = RunSummary(
        rl.steps,
        first["eval/accuracy"],
        last["eval/accuracy"],
        time.perf_counter() - started,
        lag_mean=lags.mean,
        lag_max=lags.max,
        discarded=lags.discarded,
        trainer_wait_s=waits,
        generator_wait_s=generator_waits,
    )
    echo(
        f"held-out greedy accuracy: {summary.accuracy_start:.1%} -> {summary.accuracy_end:.1%} "
        f"in {summary.seconds:.0f} s; lag mean {summary.lag_mean:.2f}, max {summary.lag_max} "
        f"(bound {source.max_staleness}), {summary.discarded} batch(es) discarded; trainer "
        f"waited {waits:.1f} s for batches; run directory: {opened.run_dir}\n"
        f"{export_hint(opened.run_dir)}"
    )
    return summary


def _silent(line: str) -> None:
    """The `echo` of ranks other than 0."""


def describe_plan(config: TrainConfig, training: TrainingClient) -> str:
    rl, info = config.rl, training.get_info()
    params, trainable = info.num_parameters, info.num_trainable_parameters
    return "\n".join(
        [
            f"model: {config.model.base_model} ({params / 1e6:.2f}M parameters, "
            f"{trainable / 1e6:.2f}M trainable); task: {config.task.name}",
            f"warm start: {config.sft.steps} supervised steps × {config.sft.batch_size} problems",
            f"RL: {rl.steps} steps × {rl.prompts_per_step} prompts × {rl.group_size} samples = "
            f"{rl.prompts_per_step * rl.group_size} samples/step, "
            f"{rl.epochs * rl.minibatches} optimizer step(s) per rollout batch, "
            f"≤ {rl.prompts_per_step * rl.group_size * config.sampling.max_tokens} "
            "completion tokens/step",
            f"loss: {config.loss.describe()}; reduction {config.loss.reduction}; "
            f"advantages {rl.advantage}",
            config.engine.describe(),
            f"run directory: {config.run.dir}",
        ]
    )
