"""The embedded default run, generated one step ahead by a sampler worker that also computes part
of each gradient: the throughput recipe for two cores.

Lag 1 (`max_staleness=1`): the worker samples batch k+1 with the weights of step k while the
trainer updates on batch k. The CISPO ratio is anchored on the sampler's own logprobs
(`loss.anchor="sampler"`), which already carries the staleness correction exp(old − sampler), so
nothing is recomputed and no TIS/MIS is added (docs/async.md, "no double correction"). One
optimizer step per batch, as in the synchronous default.

Cores: trainer 1 thread, worker 1 thread. The worker's generation is about a third of the
trainer's update, so it also computes the gradient of the last datums of every batch at the
weights the trainer's update starts from; the two partial gradients add up to the full-batch one.
How many: balanced per batch from its token counts (`worker_grad_split="tokens"`, about 40% early
in the run, less once many groups are dropped), at most half. docs/async.md has the timings.
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
            worker_grad_share=0.5,
            worker_grad_split="tokens",
        ),
    )
