"""The HTTP contract below the SDK: auth, size limits, malformed input, seq_id ordering, futures."""

from __future__ import annotations

import time
from typing import Any

import httpx
import pytest
from server_harness import API_KEY, LiveServer, create_raw_model, raw_http, raw_session, wait_future
from tinker import types
from tinker.proto import tinker_public_pb2 as pb
from tinker.proto.request_conv import forward_backward_request_to_proto

from cispo.losses import LOSSES
from cispo.server.wire import decode_forward_backward

PROTO = {"Content-Type": "application/x-protobuf"}


@pytest.fixture(scope="module")
def http(live: LiveServer) -> Any:
    with raw_http(live, timeout=30) as client:
        yield client


@pytest.fixture(scope="module")
def model_id(http: httpx.Client) -> str:
    return create_raw_model(http, raw_session(http), seed=1)


def _datum(tokens: list[int]) -> types.Datum:
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": tokens[1:]},
    )


def _fwdbwd(
    model_id: str,
    seq_id: int,
    *,
    loss: str = "cross_entropy",
    config: dict[str, float] | None = None,
    forward_only: bool = False,
) -> bytes:
    request = types.ForwardBackwardRequest(
        forward_backward_input=types.ForwardBackwardInput(
            data=[_datum([1, 20, 30, 40, 50])], loss_fn=loss, loss_fn_config=config
        ),
        model_id=model_id,
        seq_id=seq_id,
    )
    msg = forward_backward_request_to_proto(request)
    msg.forward_only = forward_only
    return msg.SerializeToString()


def _next_seq(live: LiveServer, model_id: str) -> int:
    return live.backend.models[model_id].sequencer.next_seq_id


def _logprobs(http: httpx.Client, live: LiveServer, model_id: str) -> list[float]:
    seq = _next_seq(live, model_id)
    r = http.post(
        "/forward_backward", content=_fwdbwd(model_id, seq, forward_only=True), headers=PROTO
    )
    assert r.status_code == 200, r.text
    return list(wait_future(http, r.json()["request_id"]).loss_fn_outputs[0]["logprobs"].tolist())


@pytest.mark.parametrize("headers", [{}, {"X-API-Key": "tml-wrong"}])
def test_requests_without_the_right_api_key_get_401(live: LiveServer, headers: dict) -> None:
    r = httpx.post(
        f"{live.base_url}/api/v1/client/config", json={"sdk_version": "x"}, headers=headers
    )
    assert r.status_code == 401
    assert "X-API-Key" in r.json()["detail"]


def test_body_over_the_size_limit_gets_413(live: LiveServer, http: httpx.Client) -> None:
    big = b"x" * (live.backend.config.max_request_bytes + 1)
    r = http.post("/forward_backward", content=big, headers=PROTO)
    assert r.status_code == 413


def test_malformed_protobuf_and_json_get_400(http: httpx.Client) -> None:
    r = http.post("/forward_backward", content=b"\xff\xff\xff\xff", headers=PROTO)
    assert r.status_code == 400 and "protobuf" in r.json()["detail"]
    r = http.post("/optim_step", content=b"{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "OptimStepRequest" in r.json()["detail"]
    r = http.post("/forward_backward", json={"model_id": "x"})
    assert r.status_code == 400 and "protobuf" in r.json()["detail"]


def test_server_advertises_the_loss_registry_and_unknown_loss_lists_it(
    http: httpx.Client, live: LiveServer, model_id: str
) -> None:
    caps = httpx.get(
        f"{live.base_url}/api/v1/get_server_capabilities", headers={"X-API-Key": API_KEY}
    )
    assert caps.status_code == 200, caps.text
    assert caps.json()["supported_loss_fns"] == sorted(LOSSES)
    seq = _next_seq(live, model_id)
    r = http.post("/forward_backward", content=_fwdbwd(model_id, seq, loss="grpo"), headers=PROTO)
    assert r.status_code == 400
    assert f"unknown loss_fn 'grpo'; valid: {sorted(LOSSES)}" in r.json()["detail"]


def test_unknown_model_id_gets_404(http: httpx.Client) -> None:
    r = http.post("/forward_backward", content=_fwdbwd("nope:train:9", 1), headers=PROTO)
    assert r.status_code == 404 and "nope:train:9" in r.json()["detail"]
    r = http.post("/get_info", json={"model_id": "nope:train:9"})
    assert r.status_code == 404


@pytest.mark.parametrize(
    ("loss", "config", "message"),
    [
        ("cispo", {"clip_high_threshold": 4.0, "bogus": 1.0}, "bogus"),
        ("no_such_loss", None, "no_such_loss"),
        ("ppo", {"clip_high_threshold": float("nan")}, "clip_high_threshold=nan"),
        ("cispo", {"kl_coef": float("nan")}, "kl_coef=nan"),
        ("dro", None, "beta"),
        ("importance_sampling", None, "advantages"),
    ],
)
def test_bad_loss_config_gets_400_and_changes_nothing(
    http: httpx.Client, live: LiveServer, model_id: str, loss: str, config: Any, message: str
) -> None:
    before = _logprobs(http, live, model_id)
    seq = _next_seq(live, model_id)
    r = http.post(
        "/forward_backward", content=_fwdbwd(model_id, seq, loss=loss, config=config), headers=PROTO
    )
    assert r.status_code == 400 and message in r.json()["detail"]
    # The refused request took its seq_id (the SDK never reuses one), and ran nothing.
    assert _next_seq(live, model_id) == seq + 1
    r = http.post(
        "/optim_step",
        json={"model_id": model_id, "seq_id": seq + 1, "adam_params": {"learning_rate": 0.1}},
    )
    wait_future(http, r.json()["request_id"])  # a step with no gradient accumulated: no change
    assert _logprobs(http, live, model_id) == pytest.approx(before, abs=0)


def test_an_unknown_endpoint_gets_404_and_still_consumes_a_training_seq_id(
    http: httpx.Client, live: LiveServer, model_id: str
) -> None:
    before = _logprobs(http, live, model_id)
    seq = _next_seq(live, model_id)
    r = http.post("/no_such_thing", json={"model_id": model_id, "seq_id": seq})
    assert r.status_code == 404 and "/api/v1/no_such_thing" in r.json()["detail"]
    assert _next_seq(live, model_id) == seq + 1
    assert _logprobs(http, live, model_id) == pytest.approx(before, abs=0)


def test_out_of_order_seq_ids_execute_in_seq_id_order(
    http: httpx.Client, live: LiveServer, model_id: str
) -> None:
    """seq s+2 (forward) and s+1 (optim_step) arrive before s (forward_backward); they wait, and
    the forward at s+2 sees the weights after the step, as in-order execution would give."""
    before = _logprobs(http, live, model_id)
    s = _next_seq(live, model_id)
    fwd = http.post(
        "/forward_backward", content=_fwdbwd(model_id, s + 2, forward_only=True), headers=PROTO
    ).json()["request_id"]
    opt = http.post(
        "/optim_step",
        json={"model_id": model_id, "seq_id": s + 1, "adam_params": {"learning_rate": 0.05}},
    ).json()
    time.sleep(0.2)
    assert live.backend.models[model_id].sequencer.waiting == [s + 1, s + 2]
    r = http.post("/retrieve_future", json={"request_id": fwd})
    assert r.json()["type"] == "try_again"
    fb = http.post("/forward_backward", content=_fwdbwd(model_id, s), headers=PROTO)
    wait_future(http, fb.json()["request_id"])
    assert wait_future(http, opt["request_id"])["metrics"]["optim/grad_norm"] > 0
    stepped = list(wait_future(http, fwd).loss_fn_outputs[0]["logprobs"].tolist())
    assert stepped != pytest.approx(before, abs=1e-4)
    assert _logprobs(http, live, model_id) == pytest.approx(stepped, abs=1e-6)


def test_a_resent_seq_id_returns_the_same_future(
    http: httpx.Client, live: LiveServer, model_id: str
) -> None:
    seq = _next_seq(live, model_id)
    body = _fwdbwd(model_id, seq, forward_only=True)
    first = http.post("/forward_backward", content=body, headers=PROTO).json()["request_id"]
    again = http.post("/forward_backward", content=body, headers=PROTO).json()["request_id"]
    assert first == again
    wait_future(http, first)
    # seq_id 0 was never used on this model and lies behind the counter: refused, not re-run.
    stale = http.post("/forward_backward", content=_fwdbwd(model_id, 0), headers=PROTO)
    assert stale.status_code == 400 and "already executed" in stale.json()["detail"]


def test_unknown_checkpoint_path_and_unknown_future_are_refused(
    http: httpx.Client, model_id: str
) -> None:
    r = http.post(
        "/load_weights",
        json={
            "model_id": model_id,
            "seq_id": 1_000,  # within the window of seq_ids a model accepts
            "path": "tinker://x/weights/y",
            "optimizer": True,
        },
    )
    assert r.status_code == 404 and "unknown training run" in r.json()["detail"]
    r = http.post(
        "/load_weights",
        json={
            "model_id": model_id,
            "seq_id": 1_001,
            "path": "tinker://../../etc",
            "optimizer": True,
        },
    )
    assert r.status_code == 400
    r = http.post("/retrieve_future", json={"request_id": "req-999999"})
    assert r.status_code == 404


def test_sparse_csr_loss_inputs_decode_to_the_dense_tensor() -> None:
    msg = pb.ForwardBackwardRequest(model_id="m", seq_id=1, loss_fn="cross_entropy")
    datum = msg.data.add()
    datum.model_input.add().encoded_text.tokens = bytes([1, 0, 0, 0, 2, 0, 0, 0])
    weights = datum.loss_fn_inputs["weights"]
    weights.dtype = pb.DTYPE_FLOAT32
    weights.shape.extend([1, 2])
    import numpy as np

    weights.sparse_csr.values = np.asarray([0.5], dtype="<f4").tobytes()
    weights.sparse_csr.crow_indices = np.asarray([0, 1], dtype="<i8").tobytes()
    weights.sparse_csr.col_indices = np.asarray([1], dtype="<i8").tobytes()
    call = decode_forward_backward(msg.SerializeToString())
    assert call.datums[0].model_input.to_ints() == [1, 2]
    assert call.datums[0].loss_fn_inputs["weights"].data == [0.0, 0.5]
