"""The in-process client and the server sample the same sequences for the same requests and seeds:
both batch pending requests with `cispo.engine.batching.run_sample_batches` (one KV-cached
`Sampler.sample` per group of compatible requests) over the same weights. Through the real tinker
SDK; the server's sampling thread is held while the requests arrive so that it drains them in one
pass, as the client's first `.result()` does. Seeded requests sample on their own random streams,
so the order in which the concurrent requests reach the server's queue does not matter."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

tinker = pytest.importorskip("tinker")
from server_harness import TINY, LiveServer  # noqa: E402
from tinker import types  # noqa: E402

from cispo.client import ServiceClient  # noqa: E402
from cispo.types import ModelInput, SamplingParams  # noqa: E402

TIMEOUT = 60.0
PROMPTS = [[1, 20, 21], [1, 22], [1, 23, 24, 25], [1, 26, 27]]


@pytest.fixture(scope="module")
def remote(service: Any) -> Any:
    client = service.create_sampling_client(base_model="tiny").result()
    # The session's model is built when the first request arrives; wait for it here, so that it
    # is not built while `local` seeds the same global RNG to build its own.
    client.sample(types.ModelInput.from_ints([1, 2]), 1, types.SamplingParams(max_tokens=1)).result(
        timeout=TIMEOUT
    )
    return client


@pytest.fixture(scope="module")
def local(remote: Any, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The server's "tiny" sampler: base weights of seed 0 (ServerConfig.seed), TINY sizes."""
    service = ServiceClient(checkpoint_root=tmp_path_factory.mktemp("client"), seed=0)
    training = service.create_lora_training_client("tiny", rank=0, model_overrides=TINY)
    return training.save_weights_and_get_sampling_client()


def _requests() -> list[tuple[list[int], int, dict[str, Any]]]:
    """Two groups: three prompts share (n=3, params A), one has its own params."""
    a: dict[str, Any] = {"max_tokens": 6, "seed": 5, "temperature": 1.0}
    b: dict[str, Any] = {"max_tokens": 4, "seed": 9, "temperature": 0.7, "stop": [3]}
    return [(PROMPTS[0], 3, a), (PROMPTS[1], 3, a), (PROMPTS[2], 2, b), (PROMPTS[3], 3, a)]


def _view(sequences: Any) -> list[tuple[list[int], list[float], str]]:
    return [(list(s.tokens), [float(x) for x in s.logprobs], str(s.stop_reason)) for s in sequences]


def test_a_batch_of_requests_gives_the_same_samples_in_process_and_from_the_server(
    live: LiveServer, remote: Any, local: Any
) -> None:
    requests = _requests()
    pending = [
        local.sample(ModelInput.from_ints(p), n, SamplingParams(**kw)) for p, n, kw in requests
    ]
    in_process = [_view(f.result().sequences) for f in pending]
    # The same batch submitted in reverse order: the same samples, bit for bit.
    backwards = {
        i: local.sample(ModelInput.from_ints(p), n, SamplingParams(**kw))
        for i, (p, n, kw) in reversed(list(enumerate(requests)))
    }
    assert [_view(backwards[i].result().sequences) for i in range(len(requests))] == in_process
    # Hold the server's one sampling thread until every request is queued (test-only access to
    # the backend's executor and queue): it then drains them in one pass, as flush() did.
    backend = live.backend
    gate = threading.Event()
    held = backend._sampling.submit(gate.wait, TIMEOUT)
    try:
        # Sent concurrently (the SDK's way), so they reach the queue in any order: a seeded
        # request samples on its own stream (stream id 0; cispo.engine.batching), so the row
        # order of the batch does not change its samples.
        futures = [
            remote.sample(types.ModelInput.from_ints(p), n, types.SamplingParams(**kw))
            for p, n, kw in requests
        ]
        deadline = time.time() + TIMEOUT
        while len(backend._sample_queue) < len(requests):
            assert time.time() < deadline, "the requests never reached the server's queue"
            time.sleep(0.01)
    finally:
        gate.set()
    held.result()
    over_http = [_view(f.result(timeout=TIMEOUT).sequences) for f in futures]
    assert over_http == in_process
    assert [len(v) for v in over_http] == [3, 3, 2, 3]
    assert len({tuple(s[0]) for v in over_http for s in v}) > 1, "every sample is the same"


def test_one_request_with_prompt_logprobs_gives_the_same_answer_in_process_and_from_the_server(
    remote: Any, local: Any
) -> None:
    prompt, params = PROMPTS[2], {"max_tokens": 5, "seed": 1, "temperature": 1.0}
    mine = local.sample(
        ModelInput.from_ints(prompt), 2, SamplingParams(**params), include_prompt_logprobs=True
    ).result()
    theirs = remote.sample(
        types.ModelInput.from_ints(prompt),
        2,
        types.SamplingParams(**params),
        include_prompt_logprobs=True,
    ).result(timeout=TIMEOUT)
    assert _view(theirs.sequences) == _view(mine.sequences)
    assert len(mine.prompt_logprobs) == len(prompt) and mine.prompt_logprobs[0] is None
    assert [float(x) for x in theirs.prompt_logprobs[1:]] == mine.prompt_logprobs[1:]
