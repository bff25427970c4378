"""The worker source: rollout batches generated ahead of the trainer by a sampler worker process.

A `cispo.rollout.source.RolloutSource` for `cispo.train.loop.train`. The worker
(`cispo.asynchronous.worker`) samples batch k+1 while the trainer updates on batch k, paced by
`cispo.asynchronous.staleness.StalenessGate` so that no batch is trained on more than
`asynchronous.max_staleness` rounds after the weights that sampled it. After every step the
trainer's weights are published with their version (`after_step`), and the weight-sync canary
compares the two sides: the trainer scores a fixed probe batch when it publishes a version, the
worker scores the same probe after loading it and sends its weight fingerprint; `next` checks every
such report before handing out the batch, and raises `WeightSyncError` on a mismatch.

Everything it needs from the trainer goes through the training client: the weights to publish
(`TrainingClient.get_weights`) and the probe's logprobs (`TrainingClient.forward`).
max_staleness=0 makes the worker wait for the current weights: the in-process source's run.

Under torchrun (docs/distributed.md) rank 0 alone starts and talks to the worker. Every rank takes
part in each publish: the full-weights gather (`TrainingClient.get_weights`, a collective), the
probe forward (every rank scores the whole probe: FSDP's forward is a collective; rank 0 keeps
the result for its canary) and `publish_weights` (rank 0 writes the version directory, the
others join its refusal check and barrier). Rank 0 receives each batch, checks the worker's
reports with the canary and broadcasts the batch, or the failure, to every rank (as
`InProcessSource` broadcasts its batches): a worker crash or a `WeightSyncError` raises on every
rank at the same step instead of leaving the others waiting in a collective.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cispo import distributed
from cispo.asynchronous.worker import (
    SamplerWorker,
    SyncCanary,
    SyncReport,
    WorkerError,
    join_publish,
)
from cispo.client.service import TrainingClient
from cispo.config import TrainConfig
from cispo.engine.sampler import weight_fingerprint
from cispo.engine.weight_sync import WeightSyncError
from cispo.prompts import encode_answer, encode_prompt
from cispo.rollout.rollouts import Rollout, output_logprobs
from cispo.tasks import Task
from cispo.types import Datum, ModelInput


def probe_batch(task: Task, tokenizer: Any, config: TrainConfig) -> list[list[int]]:
    """The canary's fixed probe: prompt + answer tokens of the first held-out problems."""
    problems = task.problems("test", seed=config.run.seed + 1, n=config.asynchronous.probe_size)
    return [
        encode_prompt(tokenizer, p.prompt) + encode_answer(tokenizer, p.answer) for p in problems
    ]


def trainer_probe_logprobs(
    training: TrainingClient, probe: list[list[int]], temperature: float
) -> list[list[float]]:
    """Trainer logprobs of tokens 1..n of each probe sequence (`Sampler.compute_logprobs`'s
    layout)."""
    datums = [
        Datum(
            model_input=ModelInput.from_ints(seq[:-1]),
            loss_fn_inputs={"target_tokens": seq[1:], "weights": [1.0] * (len(seq) - 1)},  # type: ignore[dict-item]  # lists are converted in Datum.__post_init__
        )
        for seq in probe
    ]
    out = training.forward(datums, "cross_entropy", temperature=temperature).result()
    return output_logprobs(out.loss_fn_outputs)


@dataclass(frozen=True)
class _Failure:
    """What rank 0 broadcasts instead of a batch when the worker or the canary failed."""

    kind: str  # "WeightSyncError" or "WorkerError"
    message: str


class WorkerSource:
    """Batches from a sampler worker process; lag ≤ `asynchronous.max_staleness`.

    Starts the worker on construction (before the warm start, so that its imports and model build
    overlap it). Under torchrun the worker, its weight directory and the canary live on rank 0;
    every rank constructs the source and calls `next` and `after_step` at the same points.
    """

    def __init__(
        self, training: TrainingClient, task: Task, config: TrainConfig, *, start: int
    ) -> None:
        run = config.asynchronous
        self.max_staleness = run.max_staleness
        self.training = training
        self.config = config
        self.probe = probe_batch(task, training.get_tokenizer(), config)
        self.canary = SyncCanary(run.canary_threshold)
        self.worker: SamplerWorker | None = None
        root: Path | None = None
        try:
            if distributed.current_rank() == 0:
                self.worker = SamplerWorker(config, start=start, probe_tokens=self.probe)
                self.worker.start()
                root = self.worker.weights_root
        finally:  # the other ranks' `join_publish` root; None if rank 0 could not start
            shared_root = distributed.broadcast_object(root)
        if shared_root is None:
            raise WorkerError("rank 0 could not start the sampler worker (its error is rank 0's)")
        self.weights_root: Path = shared_root

    def describe(self) -> str:
        run = self.config.asynchronous
        pid = self.worker.pid if self.worker is not None else None
        world = distributed.current_world_size()
        where = f" (on rank 0 of {world})" if world > 1 else ""
        return (
            f"async: max_staleness={run.max_staleness}, queue_size={run.queue_size}; sampler "
            f"worker pid {pid}{where} with {run.worker_threads} thread(s), trainer with "
            f"{torch.get_num_threads()}"
        )

    def next(self, step: int) -> Rollout:
        """The worker's batch `step`, after checking every weight sync it reported before it.

        Every rank calls it; rank 0 receives the batch and broadcasts it, or the failure, which
        then raises on every rank (`WorkerError` or `WeightSyncError`, as on rank 0)."""
        outcome: Rollout | _Failure | None = None
        error: WorkerError | WeightSyncError | None = None
        if self.worker is not None:
            try:
                outcome = self._receive(self.worker, step)
            except (WorkerError, WeightSyncError) as caught:
                error = caught
                outcome = _Failure(type(caught).__name__, str(caught))
        shared = distributed.broadcast_object(outcome)
        if error is not None:
            raise error
        if isinstance(shared, _Failure):
            kind = WeightSyncError if shared.kind == "WeightSyncError" else WorkerError
            raise kind(f"on rank 0: {shared.message}")
        assert shared is not None  # rank 0 always has one
        return shared

    def _receive(self, worker: SamplerWorker, step: int) -> Rollout:
        metrics: dict[str, float] = {}
        while True:
            message = worker.next_message()
            if isinstance(message, SyncReport):
                metrics |= self.canary.check(message)
                continue
            if message.step != step:
                raise WorkerError(f"the sampler worker sent batch {message.step} for step {step}")
            break
        worker.mark_consumed(step + 1)
        message.metrics |= metrics
        return message

    def after_step(self, version: int) -> dict[str, float]:
        """Publish the trainer's weights as `version`, with what the canary expects of them.

        Every rank calls it: the gather, the probe forward and the publish are collectives under
        torchrun; rank 0 writes the version and records the canary's expectation."""
        t = time.perf_counter()
        weights = self.training.get_weights()
        probe = trainer_probe_logprobs(self.training, self.probe, self.config.sampling.temperature)
        if self.worker is not None:
            self.canary.expect(version, weight_fingerprint(weights), probe)
            self.worker.publish(weights, version)
        else:
            join_publish(self.weights_root, version, weights)
        return {"time/weight_sync": time.perf_counter() - t}

    def close(self) -> None:
        if self.worker is not None:
            self.worker.close()
