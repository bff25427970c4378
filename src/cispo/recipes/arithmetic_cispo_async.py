"""The embedded default run, generated one step ahead by a sampler worker process.

Lag 1 (`max_staleness=1`): the worker samples batch k+1 with the weights of step k while the
trainer updates on batch k. The CISPO ratio is anchored on the sampler's own logprobs
(`loss.anchor="sampler"`), which already carries the staleness correction exp(old − sampler), so
nothing is recomputed and no TIS/MIS is added (docs/async.md, "no double correction"). One
optimizer step per batch, as in the synchronous default. Cores: trainer 1 thread, worker 1 thread.
"""

from dataclasses import replace

from cispo.config import AsyncConfig, TrainConfig


def recipe() -> TrainConfig:
    base = TrainConfig()
    return replace(
        base,
        loss=replace(base.loss, anchor="sampler"),
        run=replace(base.run, dir="runs/arithmetic_cispo_async", threads=1),
        asynchronous=AsyncConfig(
            enabled=True,
            max_staleness=1,
            recompute_old_logprobs=False,
            correction="none",
            worker_threads=1,
        ),
    )
