"""Asynchronous off-policy RL: a sampler worker generates batch k+1 while the trainer updates on k.

The same run as `cispo.train.loop.train` (warm start, evaluation, checkpoints, logs), except that
rollout batches come from `cispo.train.sampler_worker` (a separate process with its own copy of the
weights), paced by `cispo.rollout.staleness.StalenessGate` so that no batch is trained on more
than `asynchronous.max_staleness` trainer steps after the weights that sampled it. After each
trainer step the weights are published with their version, and the weight-sync canary compares the
two sides.

Three policies per token (docs/losses.md): the datum's `logprobs` are the sampler's (version v),
`old_logprobs` the trainer's at the start of this round of updates (version = step ≥ v), recomputed
with a forward pass when the batch is stale (`asynchronous.recompute_old_logprobs`), and the current
trainer's. With `loss.anchor="old"` the CISPO ratio is π_θ/π_old and `asynchronous.correction`
("tis"/"mis") may weight tokens by exp(old − sampler); with `loss.anchor="sampler"` the ratio is
π_θ/q, which already contains that factor, so no correction is allowed. At lag 0 nothing is
recomputed (old = sampler, as in the synchronous loop): max_staleness=0 reproduces that loop.

With `asynchronous.worker_grad_share > 0` the worker also computes the gradient of the last datums
of each batch once the weights that batch is trained at are published (it holds exactly them
then), and the trainer adds it to its own before the optimizer step (`_train_with_worker_share`):
the update is the synchronous one, split over the two processes.

Left out: partial rollouts, several sampler workers, a remote training client (the loop reads the
in-process engine's weights). docs/async.md has the design and the benchmark.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch

from cispo.client.service import TrainingClient
from cispo.client.types import Datum, ForwardBackwardOutput, ModelInput
from cispo.export import export_hint
from cispo.logging import Progress
from cispo.prompts import encode_answer, encode_prompt
from cispo.rollout.staleness import LagStats, StalenessGate
from cispo.tasks import Task
from cispo.train.config import TrainConfig
from cispo.train.engine import loss_totals, merge_metrics
from cispo.train.loop import RunSummary, describe_plan, open_run
from cispo.train.rollouts import (
    Rollout,
    collect_rollout,
    output_logprobs,
    train_on_rollout,
    with_old_logprobs,
)
from cispo.train.sampler_worker import (
    GradChannel,
    GradReport,
    SamplerWorker,
    SyncCanary,
    SyncReport,
    WeightSyncError,
    WorkerError,
    later_steps_need_old_logprobs,
    loss_fn_config,
    part_gradient,
    recomputes_old_logprobs,
    share_layout,
    weight_fingerprint,
)

_Message = TypeVar("_Message", Rollout, GradReport)


@dataclasses.dataclass(frozen=True)
class AsyncRunSummary(RunSummary):
    lag_mean: float
    """Token-weighted mean lag (trainer version − sampling version) over the run."""
    lag_max: int
    """Largest lag of any token trained on."""
    discarded: int
    """Batches refused by the staleness check and resampled on-policy (pacing keeps it 0)."""
    trainer_wait_s: float
    """Time the trainer waited for batches (generation not hidden behind training)."""
    generator_wait_s: float
    """Time the generator was paused by the staleness gate."""


def probe_batch(task: Task, tokenizer: Any, config: TrainConfig) -> list[list[int]]:
    """The canary's fixed probe: prompt + answer tokens of the first held-out problems."""
    problems = task.problems("test", seed=config.run.seed + 1, n=config.asynchronous.probe_size)
    return [
        encode_prompt(tokenizer, p.prompt) + encode_answer(tokenizer, p.answer) for p in problems
    ]


def trainer_probe_logprobs(
    training: TrainingClient, probe: list[list[int]], temperature: float
) -> list[list[float]]:
    """Trainer logprobs of tokens 1..n of each probe sequence (`compute_logprobs`'s layout)."""
    datums = [
        Datum(
            model_input=ModelInput.from_ints(seq[:-1]),
            loss_fn_inputs={"target_tokens": seq[1:], "weights": [1.0] * (len(seq) - 1)},  # type: ignore[dict-item]  # lists are converted in Datum.__post_init__
        )
        for seq in probe
    ]
    out = training.forward(datums, "cross_entropy", temperature=temperature).result()
    return output_logprobs(out.loss_fn_outputs)


def train_async(
    config: TrainConfig, *, resume: bool = False, echo: Callable[[str], None] = print
) -> AsyncRunSummary:
    """Run (or resume) `config` with asynchronous generation (`asynchronous.enabled`)."""
    run = config.asynchronous
    if run.correction != "none" and config.loss.anchor != "old":
        raise ValueError(
            f"asynchronous.correction={run.correction!r} needs loss.anchor='old': "
            "with the sampler anchor the ratio already contains exp(old − sampler)"
        )
    share = run.worker_grad_share
    loss_cfg = loss_fn_config(config)
    started = time.perf_counter()
    opened = open_run(config, resume=resume, echo=echo)
    run_dir, task, training, logger = opened.run_dir, opened.task, opened.training, opened.logger
    start, rl = opened.start, config.rl
    echo(describe_plan(config, training))
    probe = probe_batch(task, training.get_tokenizer(), config)
    model = training.engine.model
    # Started before the warm start so that its imports and model build overlap with it.
    grads = GradChannel(model) if share > 0 else None
    worker = SamplerWorker(
        config, start=start, probe_tokens=probe, weights=model.state_dict(), grads=grads
    )
    try:
        worker.start()
        echo(
            f"async: max_staleness={run.max_staleness}, queue_size={run.queue_size}; sampler "
            f"worker pid {worker.pid} with {run.worker_threads} thread(s), trainer with "
            f"{torch.get_num_threads()}"
        )
        first = opened.warm_start_and_evaluate(config, echo)
        last = first
        canary = SyncCanary(run.canary_threshold)
        gate, lags = StalenessGate(run.max_staleness, run.queue_size), LagStats(run.max_staleness)

        def publish(version: int) -> float:
            t = time.perf_counter()
            weights = model.state_dict()
            canary.expect(
                version,
                weight_fingerprint(weights),
                trainer_probe_logprobs(training, probe, config.sampling.temperature),
            )
            worker.publish(weights, version)
            return time.perf_counter() - t

        publish(start)
        rl_started, waits, generator_waits = time.perf_counter(), 0.0, 0.0
        progress = Progress(
            rl.steps, initial=start, desc=f"async CISPO (lag ≤ {run.max_staleness})"
        )
        for step in range(start, rl.steps):
            t = time.perf_counter()
            rollout, metrics = _next(worker, canary, Rollout)
            metrics["time/wait_for_batch"] = time.perf_counter() - t
            admitted = gate.admits(step, rollout.version)
            if not admitted:  # pacing makes this unreachable; counted
                lags.discarded += 1
                rollout = collect_rollout(
                    training.save_weights_and_get_sampling_client(), task, step, config
                )
                rollout.version = step
            worker.mark_consumed(step + 1)
            lag = step - rollout.version
            round_config = dataclasses.replace(
                config,
                rl=dataclasses.replace(
                    rl, recompute_old_logprobs=recomputes_old_logprobs(config, lag)
                ),
            )
            if grads is None:
                metrics |= rollout.metrics | train_on_rollout(
                    training, rollout, round_config, loss_fn_config=loss_cfg
                )
            else:
                metrics |= rollout.metrics | _train_with_worker_share(
                    training, worker, grads, canary, rollout, round_config, use_worker=admitted
                )
            metrics["time/weight_sync"] = publish(step + 1)
            metrics |= lags.add(step, [(rollout.version, int(rollout.metrics["rl/tokens"]))])
            waits += metrics["time/wait_for_batch"]
            generator_waits += rollout.metrics.get("time/generator_wait", 0.0)
            metrics["time/step"] = time.perf_counter() - t
            if step + 1 == rl.steps:
                metrics |= {
                    "staleness/run_lag_mean": lags.mean,
                    "staleness/run_lag_max": float(lags.max),
                    "time/rl_steps_per_s": (rl.steps - start) / (time.perf_counter() - rl_started),
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
        logger.plot()
    finally:
        worker.close()
        training.close()
        logger.close()
    summary = AsyncRunSummary(
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
        f"(bound {run.max_staleness}), {summary.discarded} batch(es) discarded; trainer waited "
        f"{waits:.1f} s for batches; run directory: {run_dir}\n{export_hint(run_dir)}"
    )
    return summary


def _next(
    worker: SamplerWorker, canary: SyncCanary, kind: type[_Message]
) -> tuple[_Message, dict[str, float]]:
    """The worker's next message of type `kind`, checking every weight sync reported before it.

    The worker's messages come in a fixed order per step (its weight syncs, its share of the
    gradient of step k, batch k+1), so any other type here is a protocol error.
    """
    metrics: dict[str, float] = {}
    while True:
        message = worker.next_message()
        if isinstance(message, SyncReport):
            metrics |= canary.check(message)
        elif isinstance(message, kind):
            return message, metrics
        else:
            raise WorkerError(
                f"expected a {kind.__name__} from the sampler worker, got {type(message).__name__}"
            )


def _train_with_worker_share(
    training: TrainingClient,
    worker: SamplerWorker,
    grads: GradChannel,
    canary: SyncCanary,
    rollout: Rollout,
    config: TrainConfig,
    *,
    use_worker: bool,
) -> dict[str, float]:
    """`train_on_rollout` with the worker's help on the first optimizer step: the trainer's
    forward/backward on the first datums of the first minibatch, the worker's gradient of the
    rest of it added in (both normalised by the minibatch's totals); the round's later steps use
    the old logprobs the worker recomputed for the datums it holds.

    `use_worker=False` (a batch the trainer resampled itself): the worker's report is read and
    ignored, and the trainer does everything.
    """
    recompute = config.rl.recompute_old_logprobs
    extra: dict[str, float] = {}

    def forward_backward(
        part: Sequence[Any], loss_fn: str, cfg: Any = None, **kwargs: Any
    ) -> ForwardBackwardOutput:
        if kwargs.pop("forward_only", False):
            return training.forward(part, loss_fn, cfg, **kwargs).result()
        return training.forward_backward(part, loss_fn, cfg, **kwargs).result()

    def first_step(datums: list[Any]) -> tuple[list[Any], dict[str, float]]:
        per, share = share_layout(rollout, config, recompute)
        share = share if use_worker else 0
        head = datums[: per - share]
        parts: list[dict[str, float]] = []
        head_old: list[list[float]] = []
        if head:
            out, recomputed = part_gradient(
                forward_backward, head, loss_totals(datums[:per]), config, recompute
            )
            parts.append(out.metrics)
            head_old = recomputed or []
        t = time.perf_counter()
        report, canary_metrics = _next(worker, canary, GradReport)
        if report.step != rollout.step:
            raise WorkerError(
                f"the worker sent its gradient share of step {report.step} during step "
                f"{rollout.step}"
            )
        extra.update(canary_metrics)
        extra["time/wait_for_grad"] = time.perf_counter() - t
        extra["rl/worker_grad_share"] = share / per if per else 0.0
        extra["time/worker_grad"] = report.seconds
        if share and report.count:
            if grads.fingerprint() != report.fingerprint:
                raise WeightSyncError(
                    f"the worker's gradient share of step {rollout.step} arrived changed "
                    f"(fingerprint {grads.fingerprint()!r}, it wrote {report.fingerprint!r})"
                )
            grads.add_into(training.engine.model)
            parts.append(report.metrics)
        if later_steps_need_old_logprobs(config, recompute) and datums:
            if share:
                if report.old_logprobs is None or len(report.old_logprobs) != len(datums) - len(
                    head
                ):
                    raise WorkerError(f"the worker sent no old logprobs for step {rollout.step}")
                rest_old = report.old_logprobs
            else:
                rest, rest_old = datums[per:], []
                if rest:
                    temperature = config.sampling.temperature
                    scored = forward_backward(
                        rest, "cross_entropy", forward_only=True, temperature=temperature
                    )
                    rest_old = output_logprobs(scored.loss_fn_outputs)
            datums = with_old_logprobs(datums, head_old + rest_old)
        merged = merge_metrics([(m["train/num_tokens"], m) for m in parts]) if parts else {}
        return datums, merged

    metrics = train_on_rollout(
        training, rollout, config, loss_fn_config=loss_fn_config(config), first_step=first_step
    )
    return metrics | extra
