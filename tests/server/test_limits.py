"""Resource limits of `cispo serve` (issue 14, item 5), through the real tinker SDK: LoRA rank,
tokens per sample request, sampler copies per session, idle sessions. Where the issue measured
memory, the test bounds the process's resident memory (the server runs in this process)."""

from __future__ import annotations

import ctypes
import gc
import time
import weakref
from collections.abc import Iterator
from typing import Any

import pytest

tinker = pytest.importorskip("tinker")
from server_harness import API_KEY, LiveServer, raw_http, raw_session, start_server  # noqa: E402
from tinker import types  # noqa: E402

MIB = 1 << 20
WIDE = {"hidden_size": 256, "num_layers": 4, "num_heads": 4}
"""A "tiny" model of ~16 MiB of float32 weights: a copy of it shows in the resident set."""
PROBE = [1, 20, 30, 40, 50, 60]


def _rss() -> int:
    """Resident set of this process (server included), bytes, after `malloc_trim(0)`: glibc keeps
    freed heap pages of its per-thread arenas otherwise, so a freed model would still count."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def _datum(tokens: list[int]) -> types.Datum:
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": tokens[1:]},
    )


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    server = start_server(
        tmp_path_factory.mktemp("server"),
        model_overrides=WIDE,
        max_lora_rank=64,
        max_sample_tokens=256,
        max_samplers_per_session=2,
    )
    yield server
    server.stop()


@pytest.fixture(scope="module")
def training(service: Any) -> Any:
    return service.create_lora_training_client("tiny", rank=2, seed=1).result()


def test_a_lora_rank_over_max_lora_rank_is_refused_before_allocating(
    service: Any, live: LiveServer
) -> None:
    """Rank 10^6 allocated 7.7 GB before failing; now a 400 naming the limit, nothing built."""
    models = set(live.backend.models)
    gc.collect()
    before = _rss()
    with pytest.raises(tinker.BadRequestError, match=r"lora_config.rank must be in \[0, 64\]"):
        service.create_lora_training_client("tiny", rank=10**6).result()
    assert _rss() - before < 32 * MIB
    assert set(live.backend.models) == models
    allowed = service.create_lora_training_client("tiny", rank=64).result()
    assert live.backend.models[allowed.model_id].record.lora_rank == 64


def test_num_samples_times_max_tokens_over_the_budget_is_refused(
    training: Any, live: LiveServer
) -> None:
    sampler = training.save_weights_and_get_sampling_client().result()
    prompt = types.ModelInput.from_ints([1, 2, 3])
    with pytest.raises(tinker.BadRequestError, match=r"= 6400 exceeds max_sample_tokens=256"):
        sampler.sample(prompt, 64, types.SamplingParams(max_tokens=100)).result()
    # max_tokens=None is "up to the context": 1024 - 3 tokens for one sample.
    with pytest.raises(tinker.BadRequestError, match=r"None = 1021 left of the context"):
        sampler.sample(prompt, 1, types.SamplingParams(max_tokens=None)).result()
    # max_tokens past the context is refused on its own (already before this limit).
    with pytest.raises(tinker.BadRequestError, match="exceeds max_context_length=1024"):
        sampler.sample(prompt, 1, types.SamplingParams(max_tokens=1100)).result()
    within = sampler.sample(prompt, 2, types.SamplingParams(max_tokens=128, seed=0)).result()
    assert len(within.sequences) == 2 and all(len(s.tokens) <= 128 for s in within.sequences)


def test_old_sampler_copies_are_released_and_memory_stays_flat(
    training: Any, live: LiveServer
) -> None:
    """Each save_weights_and_get_sampling_client after a step holds a full copy of the model
    (~16 MiB here). With max_samplers_per_session=2, 12 steps keep at most 2 sampling sessions
    of the session; the oldest is released (its model freed: the weak reference dies) and a
    request to it gets 404 saying why. Without the limit the process would grow by 12 copies."""
    served = live.backend.models[training.model_id]
    copy_bytes = sum(p.numel() * p.element_size() for p in served.engine.model.parameters())
    assert copy_bytes > 12 * MIB

    def step_and_sampler() -> Any:
        training.forward_backward([_datum(PROBE)], "cross_entropy")
        training.optim_step(types.AdamParams(learning_rate=1e-3)).result()
        return training.save_weights_and_get_sampling_client().result()

    first = step_and_sampler()
    first_id = first._sampling_session_id
    first_model = weakref.ref(live.backend.samplers[first_id].sampler.model)
    step_and_sampler()  # the engine's own cached copy now exists too
    gc.collect()
    before = peak = _rss()
    for _ in range(12):
        latest = step_and_sampler()
        peak = max(peak, _rss())
    gc.collect()
    print(
        f"12 sampler copies of {copy_bytes / MIB:.1f} MiB: "
        f"peak RSS +{(peak - before) / MIB:.0f} MiB"
    )
    assert peak - before < 4 * copy_bytes, (peak - before) / MIB
    mine = [s for s in live.backend.samplers.values() if s.session_id == served.session_id]
    assert len(mine) <= 2
    assert first_model() is None, "the released sampler's model copy is still alive"
    prompt = types.ModelInput.from_ints([1, 2, 3])
    with pytest.raises(tinker.NotFoundError, match=r"was released.*max_samplers_per_session=2"):
        first.sample(prompt, 1, types.SamplingParams(max_tokens=2)).result()
    assert latest.sample(prompt, 1, types.SamplingParams(max_tokens=2, seed=0)).result().sequences


def test_idle_sessions_expire_and_heartbeating_sdk_sessions_do_not(tmp_path: Any) -> None:
    """session_idle_seconds=15: raw-HTTP sessions that send nothing (each holding a ~16 MiB
    model) are finished after 15 s and their models freed (resident memory back within a margin);
    an SDK client that only heartbeats (every 10 s) keeps its session and model."""
    live = start_server(
        tmp_path, model_overrides=WIDE, session_idle_seconds=15.0, ttl_sweep_seconds=0.5
    )
    try:
        sdk = tinker.ServiceClient(base_url=live.base_url, api_key=API_KEY)
        kept = sdk.create_lora_training_client("tiny", rank=2).result()
        gc.collect()
        before = _rss()
        idle: list[str] = []
        with raw_http(live, timeout=30) as http:
            for _ in range(8):
                session = raw_session(http, "t")
                r = http.post(
                    "/create_model",
                    json={"session_id": session, "model_seq_id": 0, "base_model": "tiny"},
                )
                assert r.status_code == 200, r.text
                idle.append(f"{session}:train:0")
            deadline = time.time() + 60
            while not all(m in live.backend.models for m in idle) and time.time() < deadline:
                time.sleep(0.2)
            refs = [weakref.ref(live.backend.models[m].engine.model) for m in idle]
            grown = _rss() - before
            print(f"8 idle sessions with a model: +{grown / MIB:.0f} MiB", end="; ")
            assert grown > 4 * 16 * MIB, grown / MIB  # the models are really there
            time.sleep(20)
            assert not any(m in live.backend.models for m in idle)
            gc.collect()
            assert all(ref() is None for ref in refs)
            print(f"after expiry: +{(_rss() - before) / MIB:.0f} MiB")
            assert _rss() - before < grown / 3, (_rss() - before) / MIB
            r = http.post("/get_info", json={"model_id": idle[0]})
            assert r.status_code == 404
        assert kept.model_id in live.backend.models  # heartbeats kept it
        assert kept.forward([_datum(PROBE)], "cross_entropy").result().loss_fn_outputs
        sdk.close("success").result()
    finally:
        live.stop()


def test_results_are_forgotten_after_result_keep_seconds() -> None:
    """A finished request's result is dropped `keep_seconds` after it is ready (then its id is
    unknown: 404), so the table does not grow with every request a server ever answered."""
    from cispo.server.futures import FutureTable, NotFound

    table = FutureTable(poll_timeout=1.0, keep_seconds=0.2)
    old = table.create("u")
    table.resolve(old, {"ok": 1})
    pending = table.create("u")  # not finished: kept however long it takes
    time.sleep(0.3)
    table.create("u")
    with pytest.raises(NotFound):
        table.check(old, "u")
    table.check(pending, "u")
    assert len(table) == 2


def test_the_least_recently_used_sampler_is_the_one_released(
    training: Any, live: LiveServer
) -> None:
    """LRU by last request, not by age: a sampler still in use outlives a newer idle one."""
    prompt = types.ModelInput.from_ints([1, 2, 3])
    params = types.SamplingParams(max_tokens=2, seed=0)

    def new_sampler() -> Any:
        training.forward_backward([_datum(PROBE)], "cross_entropy")
        training.optim_step(types.AdamParams(learning_rate=1e-3)).result()
        return training.save_weights_and_get_sampling_client().result()

    used, idle = new_sampler(), new_sampler()
    assert used.sample(prompt, 1, params).result().sequences
    newest = new_sampler()
    assert used.sample(prompt, 1, params).result().sequences
    assert newest.sample(prompt, 1, params).result().sequences
    with pytest.raises(tinker.NotFoundError, match="was released"):
        idle.sample(prompt, 1, params).result()
