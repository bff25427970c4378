"""Where the RL loop's batches come from: the `RolloutSource` protocol and the in-process source.

The loop (`cispo.train.loop.train`) asks a source for batch `step`, trains on it, and tells the
source that the trainer's weights are now version `step + 1`. Versions count rounds of updates
(one per batch; docs/async.md): a batch sampled with the weights of version v and trained at
trainer version `step` has lag `step − v`, at most the source's `max_staleness`.

- `InProcessSource` (here): batch `step` is sampled through the training client's own sampling
  client with the current weights, so every batch has lag 0. This is the synchronous loop. Under
  torchrun every rank gathers the current weights (a collective), samples and scores its
  `share_bounds` share of the batch's prompts, each prompt on the random stream of its index in
  the batch, and the ranks all-gather the shares, so that every rank assembles the same whole
  batch, the one one process samples (up to float rounding; docs/distributed.md). Each rank then
  trains its share (`cispo.train.update`). One process is world size 1 of the same code.
- `cispo.asynchronous.source.WorkerSource`: batches come from a sampler worker process that runs
  ahead of the trainer, lag ≤ `asynchronous.max_staleness`.
"""

from __future__ import annotations

from typing import Protocol

from cispo import distributed
from cispo.client.service import TrainingClient
from cispo.config import TrainConfig
from cispo.rollout.rollouts import Rollout, assemble_rollout, sample_share, step_problems
from cispo.tasks import Task


class RolloutSource(Protocol):
    """Rollout batches for the loop, in step order."""

    max_staleness: int
    """The largest lag (trainer version − sampling version) of a batch it hands out."""

    def describe(self) -> str:
        """One line for the run's log: how batches are produced."""
        ...

    def next(self, step: int) -> Rollout:
        """Batch `step`, its `version` the policy version that sampled it; its `metrics` may
        carry the source's own (`time/`, `canary/`)."""
        ...

    def after_step(self, version: int) -> dict[str, float]:
        """The trainer's weights are now version `version`: called once before the first step
        (with the starting version) and after every step. Returns metrics of that step."""
        ...

    def close(self) -> None:
        """Release what the source holds (processes, buffers); safe to call more than once."""
        ...


class InProcessSource:
    """Batch `step` sampled with the training client's current weights (lag 0)."""

    max_staleness = 0

    def __init__(self, training: TrainingClient, task: Task, config: TrainConfig) -> None:
        self.training = training
        self.task = task
        self.config = config

    def describe(self) -> str:
        return "rollouts: sampled in process with the current weights (lag 0)"

    def next(self, step: int) -> Rollout:
        sampler = self.training.save_weights_and_get_sampling_client()  # every rank: collective
        problems = step_problems(self.task, step, self.config)  # the same on every rank
        start, stop = distributed.share_bounds(
            len(problems), distributed.current_rank(), distributed.current_world_size()
        )
        mine = sample_share(sampler, self.task, problems, step, self.config, range(start, stop))
        shares = distributed.gather_objects(mine)  # every rank, in rank order
        # The current weights are the policy after `step` rounds of updates.
        return assemble_rollout(step, problems, shares, self.config, version=step)

    def after_step(self, version: int) -> dict[str, float]:
        return {}  # the next batch reads the weights straight from the training client

    def close(self) -> None:
        pass  # the training client belongs to the loop
