"""The RL loop: sample → reward → advantages → datums → CISPO updates → metrics → checkpoint.

Written only against the Tinker-style client API (`cispo.client`), like tinker-cookbook's
`recipes/rl_loop.py`, so the same loop can drive a remote server. One run = an optional supervised
warm start (cross_entropy on the task's answers, so that a random model gets some reward), then
`rl.steps` rollout batches. Each batch is sampled from the current weights; `rl.epochs ×
rl.minibatches` optimizer steps follow, and every step after the first of a batch is off-policy: the
ratio is anchored on `old_logprobs`, which equal the sampler's logprobs (the sampler is numerically
the trainer here; set `rl.recompute_old_logprobs` when it is not).

Deliberately left out: multi-turn environments and a value function (GAE). The stages live in
`rollouts.py`, `warm_start.py` and `evaluate.py`; async generation is `async_loop.py`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cispo.checkpoint import latest_named_state
from cispo.client import ServiceClient
from cispo.client.service import TrainingClient
from cispo.configs import config_to_dict
from cispo.export import export_hint
from cispo.logging import Progress, RunLogger
from cispo.tasks import Problem, Task, make_task
from cispo.train.config import TrainConfig
from cispo.train.engine import EngineConfig, freeze_heap
from cispo.train.evaluate import evaluate
from cispo.train.rollouts import Rollout, collect_rollout, sample_rows, train_on_rollout
from cispo.train.warm_start import supervised_warm_start


@dataclass(frozen=True)
class RunSummary:
    steps: int
    accuracy_start: float
    accuracy_end: float
    seconds: float


@dataclass
class OpenRun:
    """What a loop needs once a run is set up (or resumed): the task, the clients, the logger and
    where to start."""

    run_dir: Path
    task: Task
    training: TrainingClient
    logger: RunLogger
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
        sampler = self.training.save_weights_and_get_sampling_client()
        first = evaluate(sampler, self.task, self.test, config)
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
            sampler = self.training.save_weights_and_get_sampling_client()
            evaluation = evaluate(sampler, self.task, self.test, config)
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
    latest checkpoint's weights, optimizer and step, else a fresh `config.json`."""
    if config.run.threads:
        torch.set_num_threads(config.run.threads)
    torch.manual_seed(config.run.seed)
    run_dir = Path(config.run.dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    task = make_task(config.task.name, **config.task.kwargs())
    service = ServiceClient(checkpoint_root=run_dir / "checkpoints", seed=config.run.seed)
    training = service.create_lora_training_client(
        config.model.base_model,
        rank=config.model.lora_rank,
        seed=config.run.seed,
        engine_config=EngineConfig(micro_batch_size=config.rl.micro_batch_size),
        model_overrides=config.model.overrides(),
    )
    logger = RunLogger(
        run_dir, tensorboard=config.run.tensorboard, wandb_project=config.run.wandb_project
    )
    start, state = 0, {}
    latest = latest_named_state(training.checkpoint_dir) if resume else None
    if latest is not None:
        state = training.load_state(str(latest)).result()
        start = int(state["step"])
        logger.resume(start)
        echo(f"resumed from {latest} at step {start}")
    else:
        (run_dir / "config.json").write_text(config_json(config_to_dict(config)))
    test = task.problems("test", seed=config.run.seed, n=config.eval.num_problems)
    freeze_heap()
    return OpenRun(run_dir, task, training, logger, start, state, test)


def train(
    config: TrainConfig, *, resume: bool = False, echo: Callable[[str], None] = print
) -> RunSummary:
    """Run (or resume) the whole job described by `config`."""
    if config.asynchronous.enabled:
        from cispo.train.async_loop import train_async  # it imports this module

        return train_async(config, resume=resume, echo=echo)
    started = time.perf_counter()
    run = open_run(config, resume=resume, echo=echo)
    run_dir, task, training, logger = run.run_dir, run.task, run.training, run.logger
    start, rl = run.start, config.rl
    echo(describe_plan(config, training))
    first = run.warm_start_and_evaluate(config, echo)
    last = first
    progress = Progress(
        rl.steps, initial=start, desc="CISPO" if config.loss.name == "cispo" else config.loss.name
    )
    for step in range(start, rl.steps):
        t = time.perf_counter()
        rollout = collect_rollout(
            training.save_weights_and_get_sampling_client(), task, step, config
        )
        metrics = rollout.metrics | train_on_rollout(training, rollout, config)
        metrics["time/step"] = time.perf_counter() - t
        last = run.end_step(config, step + 1, metrics, rollout) or last
        progress.update(
            {
                "reward": metrics["reward/mean"],
                "acc": metrics["reward/accuracy"],
                "s/step": metrics["time/step"],
            }
        )
    progress.close()
    logger.plot()
    logger.close()
    training.close()
    summary = RunSummary(
        rl.steps, first["eval/accuracy"], last["eval/accuracy"], time.perf_counter() - started
    )
    echo(
        f"held-out greedy accuracy: {summary.accuracy_start:.1%} -> {summary.accuracy_end:.1%} "
        f"in {summary.seconds:.0f} s; run directory: {run_dir}\n{export_hint(run_dir)}"
    )
    return summary


def describe_plan(config: TrainConfig, training: TrainingClient) -> str:
    rl = config.rl
    params = sum(p.numel() for p in training.engine.model.parameters())
    trainable = sum(p.numel() for p in training.engine.model.parameters() if p.requires_grad)
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
            f"run directory: {config.run.dir}",
        ]
    )


def config_json(data: dict[str, Any]) -> str:
    import json

    return json.dumps(data, indent=2, sort_keys=True)
