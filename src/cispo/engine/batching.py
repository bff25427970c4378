"""Batching of pending sample requests: one implementation for the in-process client and the server.

Requests that can share one KV-cached pass (the same `Sampler`, `num_samples` and
`SamplingParams`) are grouped, in order of first arrival, and each group runs as one
`Sampler.sample(prompts, num_samples, params)`; the [P][n] result is fanned back out, request by
request, in submission order. The client's `SamplingClient` runs its deferred requests through
`run_sample_batches` at the first `.result()`; the server's sampling thread runs every request
queued since its last pass (`cispo.server.runtime.Backend._drain_samples`), so the same requests
with the same seeds give the same samples in process and over HTTP.

Streams (`cispo.engine.sampler.stream_uniforms`): a seeded request's prompt runs on its
`stream_id`, 0 unless the in-process caller chose another (the server and the Tinker SDK send
none), so its samples are a function of (weights, prompt, n, params, stream id) alone, whatever it
is batched with and in which order (up to the float rounding of its logits), like vLLM's
per-request seed; two seeded requests with the same prompt, params and stream id get the same
samples. Unseeded requests promise no reproducibility: they run on their positions in the group
(stream ids 0 .. P-1 under one base seed per call), so that no two of them share draws.

A failing group does not stop the others: every waiter of that group gets the error (`fail`), as
does a waiter whose own `deliver` raises. A `BaseException` that is not an `Exception`
(KeyboardInterrupt) fails every waiter not yet served, then propagates.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from cispo.engine.sampler import Sampler
from cispo.types import SampledSequence, SamplingParams

W = TypeVar("W")


@dataclass(frozen=True)
class SampleRequest:
    """One prompt to sample `num_samples` completions of, with `params`, from `sampler`."""

    sampler: Sampler
    prompt: list[int]
    num_samples: int
    params: SamplingParams
    stream_id: int = 0
    """The prompt's random stream when `params.seed` is set (module docstring)."""

    def batch_key(self) -> tuple[int, int, str]:
        """Requests with equal keys run in one `sample` call. `SamplingParams` may hold a list
        (stop), so the key uses its repr, which names every field."""
        return (id(self.sampler), self.num_samples, repr(self.params))


def run_sample_batches(
    requests: Sequence[tuple[SampleRequest, W]],
    deliver: Callable[[W, list[SampledSequence]], None],
    fail: Callable[[W, BaseException], None],
) -> None:
    """Sample every `(request, waiter)` pair, one `Sampler.sample` call per group of compatible
    requests; `deliver(waiter, sequences)` gets the request's `num_samples` sequences,
    `fail(waiter, error)` the error of its group (or of its own `deliver`)."""
    groups: dict[tuple[int, int, str], list[tuple[SampleRequest, W]]] = {}
    for item in requests:
        groups.setdefault(item[0].batch_key(), []).append(item)
    batches = list(groups.values())
    for index, batch in enumerate(batches):
        first = batch[0][0]
        try:
            seeded = first.params.seed is not None
            results = first.sampler.sample(
                [request.prompt for request, _ in batch],
                first.num_samples,
                first.params,
                [request.stream_id for request, _ in batch] if seeded else None,
            )
            if len(results) != len(batch):
                raise RuntimeError(
                    f"the sampler returned {len(results)} results for {len(batch)} prompts"
                )
        except Exception as error:  # every waiter of the group gets it; other groups still run
            for _, waiter in batch:
                fail(waiter, error)
            continue
        except BaseException as error:  # no waiter is left waiting forever
            for rest in batches[index:]:
                for _, waiter in rest:
                    fail(waiter, error)
            raise
        for (_, waiter), sequences in zip(batch, results, strict=True):
            try:
                deliver(waiter, sequences)
            except Exception as error:
                fail(waiter, error)
