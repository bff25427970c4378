"""Issue 14, "refuse, change nothing, stay up": hostile or absurd requests through the real SDK.

Each test sends what a client can send (through `tinker.TrainingClient` where the SDK lets it, raw
HTTP where the SDK validates first) and checks the answer is a 4xx naming the field, the server
stays up, and the model (weights, optimizer, RNG) is exactly as before.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import threading
from typing import Any

import httpx
import pytest
import torch
from server_harness import (
    API_KEY,
    LiveServer,
    assert_same,
    create_raw_model,
    raw_http,
    raw_session,
    start_server,
    wait_future,
)
from tinker import types
from tinker.proto.request_conv import forward_backward_request_to_proto

import cispo.server.app as server_app
from cispo.engine.engine import EngineConfig

tinker = pytest.importorskip("tinker")

PROTO = {"Content-Type": "application/x-protobuf"}
PROBE = [1, 20, 30, 40, 50, 60]


@pytest.fixture
def training(service: Any) -> Any:
    """A fresh SDK training client per test: the SDK poisons a TrainingClient after any failed
    request ("this TrainingClient is poisoned"), so a refusal ends that client's life."""
    return service.create_lora_training_client("tiny", rank=2, seed=3).result()


@pytest.fixture(scope="module")
def http(live: LiveServer) -> Any:
    with raw_http(live) as client:
        yield client


@pytest.fixture(scope="module")
def raw(http: httpx.Client) -> str:
    """A model driven by raw HTTP (seq_ids under the test's control)."""
    return _create_raw_model(http)


def _create_raw_model(http: httpx.Client) -> str:
    return create_raw_model(http, raw_session(http), seed=3)


def _next(live: LiveServer, model_id: str) -> int:
    return live.backend.models[model_id].sequencer.next_seq_id


def _run(http: httpx.Client, route: str, **kwargs: Any) -> Any:
    r = http.post(route, **kwargs)
    assert r.status_code == 200, r.text
    result = wait_future(http, r.json()["request_id"])
    assert not (isinstance(result, dict) and "error" in result), result
    return result


def _datum(tokens: list[int], **inputs: Any) -> types.Datum:
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": tokens[1:], **inputs},
    )


def _sparse_body(model_id: str, seq_id: int, shape: list[int], crow: list[int], col: list[int]):
    """A forward_backward whose `weights` is a sparse CSR tensor, encoded by the SDK's codec."""
    weights = types.TensorData(
        data=[1.0] * len(col),
        dtype="float32",
        shape=shape,
        sparse_crow_indices=crow,
        sparse_col_indices=col,
    )
    request = types.ForwardBackwardRequest(
        forward_backward_input=types.ForwardBackwardInput(
            data=[_datum([1, 2, 3], weights=weights)], loss_fn="cross_entropy"
        ),
        model_id=model_id,
        seq_id=seq_id,
    )
    return forward_backward_request_to_proto(request).SerializeToString()


def _state(live: LiveServer, model_id: str) -> dict[str, Any]:
    """Everything a refused request must leave alone, cloned."""
    engine = live.backend.models[model_id].engine
    params = [p for g in engine.optimizer.param_groups for p in g["params"]]
    return {
        "model": {k: v.clone() for k, v in engine.model.state_dict().items()},
        "grads": [None if p.grad is None else p.grad.clone() for p in params],
        "optimizer": engine.state()["optimizer"],
        "generator": engine.sample_generator.get_state(),
        "torch_rng": torch.get_rng_state(),
        "version": engine.version,
    }


def _probe_body(model_id: str, seq_id: int, *, forward_only: bool = True) -> bytes:
    request = types.ForwardBackwardRequest(
        forward_backward_input=types.ForwardBackwardInput(
            data=[_datum(PROBE)], loss_fn="cross_entropy"
        ),
        model_id=model_id,
        seq_id=seq_id,
    )
    msg = forward_backward_request_to_proto(request)
    msg.forward_only = forward_only
    return msg.SerializeToString()


# ------------------------------------------------------------------ 1. declared sizes


def test_a_huge_declared_sparse_shape_is_refused_before_any_allocation() -> None:
    """~220 bytes declaring a [1, 3e8] float32 (1.2 GB dense) are refused with the address space
    capped at 256 MiB above the baseline and without growing peak RSS: the shape is checked
    against the datum length and the configured maximum before densifying."""
    script = r"""
import json, resource
from tinker import types
from tinker.proto.request_conv import forward_backward_request_to_proto
from cispo.server.wire import WireError, decode_forward_backward
# Address space now + 256 MiB: densifying any of the shapes below would need more.
vm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmSize:"))
limit = vm * 1024 + (256 << 20)
resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))
out = {}
for shape in ([1, 100_000_000], [1, 300_000_000], [2**31, 2**31]):
    w = types.TensorData(data=[1.0], dtype="float32", shape=shape,
                         sparse_crow_indices=[0, 1] + [1] * (shape[0] - 1 if shape[0] < 9 else 0),
                         sparse_col_indices=[0])
    req = types.ForwardBackwardRequest(forward_backward_input=types.ForwardBackwardInput(
        data=[types.Datum(model_input=types.ModelInput.from_ints([1, 2]),
                          loss_fn_inputs={"target_tokens": [2, 3], "weights": w})],
        loss_fn="cross_entropy"), model_id="m", seq_id=1)
    body = forward_backward_request_to_proto(req).SerializeToString()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        decode_forward_backward(body)
        out[str(shape)] = ["accepted", 0, len(body)]
    except WireError as error:
        grew = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
        out[str(shape)] = [str(error), grew, len(body)]
print(json.dumps(out))
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True
    )
    results = json.loads(done.stdout.strip().splitlines()[-1])
    for shape, (message, grew_kb, size) in results.items():
        assert size < 300, shape
        assert grew_kb < 32 * 1024, f"{shape}: peak RSS grew by {grew_kb} KB"
        assert "weights" in message and "declares" in message, (shape, message)


def test_huge_sparse_shape_through_the_sdk_gets_400_and_the_server_stays_up(
    live: LiveServer, training: Any, http: httpx.Client
) -> None:
    before = _state(live, training.model_id)
    weights = types.TensorData(
        data=[1.0],
        dtype="float32",
        shape=[1, 100_000_000],
        sparse_crow_indices=[0, 1],
        sparse_col_indices=[0],
    )
    with pytest.raises(tinker.BadRequestError, match="declares 100000000 values"):
        training.forward_backward([_datum([1, 2, 3], weights=weights)], "cross_entropy").result()
    assert http.get("/healthz").json() == {"status": "ok"}
    assert_same(before, _state(live, training.model_id))


@pytest.mark.parametrize(
    ("shape", "crow", "col", "message"),
    [
        ([1, 2], [0, 1], [2], "column indices must be in [0, 2)"),
        ([1, 2], [0, 1], [-1], "column indices must be in [0, 2)"),
        ([2, 1], [0, 2, 1], [0, 0], "never decrease"),
        ([2, 1], [1, 1, 1], [0], "start at 0"),
        ([1, 2], [0, 1, 1], [0], "row pointers"),
        ([-1, -2], [0, 1], [0], "negative dimension"),
        ([2], [0, 1], [0], "must be 2-D"),
    ],
)
def test_bad_sparse_indices_get_400_not_500(
    live: LiveServer,
    raw: str,
    http: httpx.Client,
    shape: list[int],
    crow: list[int],
    col: list[int],
    message: str,
) -> None:
    before = _state(live, raw)
    r = http.post(
        "/forward_backward",
        content=_sparse_body(raw, _next(live, raw), shape, crow, col),
        headers=PROTO,
    )
    assert r.status_code == 400, r.text
    assert message in r.json()["detail"] and "weights" in r.json()["detail"]
    assert_same(before, _state(live, raw))
    assert http.get("/healthz").json() == {"status": "ok"}


def test_a_valid_sparse_tensor_still_trains_like_the_dense_one(
    live: LiveServer, training: Any, http: httpx.Client
) -> None:
    """The bounds do not refuse what the SDK legitimately sends: weights [[0, 1]] as CSR."""
    weights = types.TensorData(
        data=[1.0],
        dtype="float32",
        shape=[1, 2],
        sparse_crow_indices=[0, 1],
        sparse_col_indices=[1],
    )
    sparse = training.forward([_datum([1, 2, 3], weights=weights)], "cross_entropy").result()
    dense = training.forward([_datum([1, 2, 3], weights=[0.0, 1.0])], "cross_entropy").result()
    assert dense.metrics["loss:sum"] > 0
    assert sparse.metrics["loss:sum"] == pytest.approx(dense.metrics["loss:sum"], rel=1e-6)


def test_forward_backward_is_decoded_off_the_event_loop(
    live: LiveServer, training: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    threads: list[threading.Thread] = []
    real = server_app.decode_forward_backward

    def spy(*args: Any, **kwargs: Any) -> Any:
        threads.append(threading.current_thread())
        return real(*args, **kwargs)

    monkeypatch.setattr(server_app, "decode_forward_backward", spy)
    training.forward([_datum(PROBE)], "cross_entropy").result()
    assert threads and all(t is not live._thread for t in threads)


# ------------------------------------------------------------------ 2. optimizer / sampling numbers


def _grad_pending(training: Any) -> None:
    training.forward_backward([_datum(PROBE)], "cross_entropy").result()


@pytest.mark.parametrize(
    ("field", "value"), [("learning_rate", 1e308), ("weight_decay", 1e300), ("eps", 0.0)]
)
def test_absurd_adam_params_through_the_sdk_are_refused_and_change_nothing(
    live: LiveServer, training: Any, http: httpx.Client, field: str, value: float
) -> None:
    _grad_pending(training)
    before = _state(live, training.model_id)
    with pytest.raises(tinker.BadRequestError, match=rf"AdamParams\.{field} must be a finite"):
        training.optim_step(types.AdamParams(**{field: value})).result()
    assert_same(before, _state(live, training.model_id))
    assert http.get("/healthz").json() == {"status": "ok"}


@pytest.mark.parametrize(
    ("field", "literal"),
    [
        ("learning_rate", "Infinity"),
        ("learning_rate", "1e999"),
        ("learning_rate", "NaN"),
        ("weight_decay", "NaN"),
        ("weight_decay", "Infinity"),
        ("eps", "Infinity"),
        ("grad_clip_norm", "NaN"),
        ("beta2", "-Infinity"),
    ],
)
def test_non_finite_adam_params_in_raw_json_get_400_naming_the_field(
    live: LiveServer, raw: str, http: httpx.Client, field: str, literal: str
) -> None:
    _run(
        http,
        "/forward_backward",
        content=_probe_body(raw, _next(live, raw), forward_only=False),
        headers=PROTO,
    )  # a gradient is pending
    before = _state(live, raw)
    seq_id = _next(live, raw)
    body = (
        f'{{"model_id": "{raw}", "seq_id": {seq_id}, '
        f'"adam_params": {{"learning_rate": 1e-3, "{field}": {literal}}}}}'
    )
    r = http.post("/optim_step", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    detail = r.json()["detail"]
    assert f"AdamParams.{field}" in detail and "finite" in detail, detail
    assert_same(before, _state(live, raw))
    ok = body.replace(
        f'"{field}": {literal}', f'"{field}": 0.5' if field == "beta2" else '"eps": 1e-8'
    ).replace(f'"seq_id": {seq_id}', f'"seq_id": {seq_id + 1}')  # the refusal consumed seq_id
    metrics = _run(http, "/optim_step", content=ok, headers={"Content-Type": "application/json"})
    assert metrics["metrics"]["optim/grad_norm"] > 0  # the same request with a sane value trains


@pytest.fixture(scope="module")
def sampler_id(http: httpx.Client) -> str:
    session = raw_session(http)
    r = http.post(
        "/create_sampling_session",
        json={"session_id": session, "sampling_session_seq_id": 0, "base_model": "tiny"},
    )
    assert r.status_code == 200, r.text
    return str(r.json()["sampling_session_id"])


def test_tiny_temperature_and_huge_seed_through_the_sdk_are_refused(training: Any) -> None:
    sampler = training.save_weights_and_get_sampling_client().result()
    prompt = types.ModelInput.from_ints(PROBE)
    with pytest.raises(tinker.BadRequestError, match="temperature"):
        sampler.sample(prompt, 1, types.SamplingParams(max_tokens=2, temperature=1e-30)).result()
    with pytest.raises(tinker.BadRequestError, match="seed"):
        sampler.sample(prompt, 1, types.SamplingParams(max_tokens=2, seed=2**70)).result()
    ok = sampler.sample(prompt, 1, types.SamplingParams(max_tokens=2, seed=1)).result()
    assert all(math.isfinite(x) for x in ok.sequences[0].logprobs)


@pytest.mark.parametrize(
    ("field", "literal"),
    [
        ("temperature", "NaN"),
        ("temperature", "Infinity"),
        ("temperature", "1e999"),
        ("top_p", "NaN"),
        ("seed", "1000000000000000000000000000000"),
        ("max_tokens", "0"),
        ("top_k", "-5"),
    ],
)
def test_non_finite_sampling_params_in_raw_json_get_400_and_leave_the_rng(
    live: LiveServer, http: httpx.Client, sampler_id: str, field: str, literal: str
) -> None:
    generator = live.backend.samplers[sampler_id].sampler.generator
    before = generator.get_state()
    body = (
        f'{{"sampling_session_id": "{sampler_id}", "num_samples": 1, '
        f'"prompt": {{"chunks": [{{"type": "encoded_text", "tokens": {PROBE}}}]}}, '
        f'"sampling_params": {{"max_tokens": 2, "{field}": {literal}}}}}'
    )
    r = http.post("/asample", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    assert field in r.json()["detail"], r.json()
    assert torch.equal(generator.get_state(), before)


def test_create_model_with_an_out_of_range_seed_is_refused_and_frees_its_model_seq_id(
    live: LiveServer, service: Any, http: httpx.Client
) -> None:
    with pytest.raises(tinker.BadRequestError, match=r"lora_config\.seed"):
        service.create_lora_training_client("tiny", rank=2, seed=2**70).result()
    assert not live.backend._reserved
    session = raw_session(http)
    for seed, status in ((2**70, 400), (-(2**64), 400), (5, 200)):
        r = http.post(
            "/create_model",
            json={
                "session_id": session,
                "model_seq_id": 0,
                "base_model": "tiny",
                "lora_config": {"rank": 2, "seed": seed},
            },
        )
        assert r.status_code == status, r.text
    assert wait_future(http, r.json()["request_id"])["model_id"] == f"{session}:train:0"


# ------------------------------------------------------------------ 3. failed requests roll back


def test_a_forward_backward_failing_in_its_last_micro_batch_leaves_no_gradient(
    tmp_path: Any,
) -> None:
    """Through the SDK, on a server whose engine runs micro-batches of 4: 6 datums, NaN
    advantages only in the last one, nonfinite="raise". The call fails after the first
    micro-batch's backward; the gradient accumulated before it is kept bitwise and nothing of
    the failed call remains (weights, optimizer, RNG too)."""
    server = start_server(tmp_path, engine=EngineConfig(micro_batch_size=4))
    try:
        service = tinker.ServiceClient(base_url=server.base_url)
        training = service.create_lora_training_client("tiny", rank=2, seed=3).result()
        rows = [[1, 5 + i, 9, 13 + i, 17] for i in range(6)]

        def datums(last_advantage: float) -> list[types.Datum]:
            return [
                _datum(
                    row,
                    logprobs=[-1.0] * 4,
                    advantages=[last_advantage if i == 5 else 1.0 - 0.3 * i] * 4,
                )
                for i, row in enumerate(rows)
            ]

        training.forward_backward(datums(0.5), "cispo").result()  # a pending gradient
        before = _state(server, training.model_id)
        assert any(g is not None for g in before["grads"])
        with pytest.raises(Exception, match="non-finite"):
            training.forward_backward(datums(math.nan), "cispo", {"nonfinite": "raise"}).result()
        assert_same(before, _state(server, training.model_id))
        service.close("success").result()
    finally:
        server.stop()


# ------------------------------------------------------------------ 5. seq_id window


def test_seq_ids_beyond_the_window_get_400_naming_the_range(tmp_path: Any) -> None:
    """With max_seq_ids_ahead=3 and next=s: s+3, s+100000 and 10**30 are refused with the range
    [s, s+2]; s+2 is accepted, waits, and runs once s and s+1 arrive."""
    server = start_server(tmp_path, max_seq_ids_ahead=3)
    try:
        with httpx.Client(
            base_url=f"{server.base_url}/api/v1", headers={"X-API-Key": API_KEY}, timeout=60
        ) as http:
            model = _create_raw_model(http)
            s = _next(server, model)
            for seq in (s + 3, s + 100_000, 10**30):
                r = http.post(
                    "/optim_step",
                    json={"model_id": model, "seq_id": seq, "adam_params": {"learning_rate": 0}},
                )
                assert r.status_code == 400, r.text
                assert f"expected a seq_id in [{s}, {s + 2}]" in r.json()["detail"]
            r = http.post("/forward_backward", content=_probe_body(model, s + 2), headers=PROTO)
            assert r.status_code == 200, r.text
            last = r.json()["request_id"]
            assert server.backend.models[model].sequencer.waiting == [s + 2]
            for seq in (s, s + 1):
                _run(http, "/forward_backward", content=_probe_body(model, seq), headers=PROTO)
            assert wait_future(http, last).loss_fn_outputs[0]["logprobs"].tolist()
            assert _next(server, model) == s + 3
    finally:
        server.stop()
