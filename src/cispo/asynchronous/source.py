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
"""

from __future__ import annotations

import time
from typing import Any

import torch

from cispo.asynchronous.worker import (
    SamplerWorker,
    SyncCanary,
    SyncReport,
    WorkerError,
)
from cispo.client.service import TrainingClient
from cispo.config import TrainConfig
from cispo.engine.sampler import weight_fingerprint
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


class WorkerSource:
    """Batches from a sampler worker process; lag ≤ `asynchronous.max_staleness`.

    Starts the worker on construction (before the warm start, so that its imports and model build
    overlap it), with the training client's current weights as the buffers' shapes.
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
        self.worker = SamplerWorker(config, start=start, probe_tokens=self.probe)
        self.worker.start()

    def describe(self) -> str:
        run = self.config.asynchronous
        return (
            f"async: max_staleness={run.max_staleness}, queue_size={run.queue_size}; sampler "
            f"worker pid {self.worker.pid} with {run.worker_threads} thread(s), trainer with "
            f"{torch.get_num_threads()}"
        )

    def next(self, step: int) -> Rollout:
        """The worker's batch `step`, after checking every weight sync it reported before it."""
        metrics: dict[str, float] = {}
        while True:
            message = self.worker.next_message()
            if isinstance(message, SyncReport):
                metrics |= self.canary.check(message)
                continue
            if message.step != step:
                raise WorkerError(f"the sampler worker sent batch {message.step} for step {step}")
            break
        self.worker.mark_consumed(step + 1)
        message.metrics |= metrics
        return message

    def after_step(self, version: int) -> dict[str, float]:
        """Publish the trainer's weights as `version`, with what the canary expects of them."""
        t = time.perf_counter()
        weights = self.training.get_weights()
        self.canary.expect(
            version,
            weight_fingerprint(weights),
            trainer_probe_logprobs(self.training, self.probe, self.config.sampling.temperature),
        )
        self.worker.publish(weights, version)
        return {"time/weight_sync": time.perf_counter() - t}

    def close(self) -> None:
        self.worker.close()
