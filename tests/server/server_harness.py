"""Test harness: a live server (uvicorn in a background thread, loopback, free port)."""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

pytest.importorskip("tinker")
pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")

from tinker.proto.response_conv import deserialize_forward_backward_output  # noqa: E402

from cispo.server.app import create_app  # noqa: E402
from cispo.server.runtime import Backend, ServerConfig  # noqa: E402

API_KEY = "tml-cispo-test-key"
TINY = {"hidden_size": 32, "num_layers": 1, "num_heads": 2}


@dataclass
class LiveServer:
    base_url: str
    backend: Backend
    root: Path
    _server: uvicorn.Server
    _thread: threading.Thread

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=30)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_server(root: Path, **overrides: object) -> LiveServer:
    """`overrides`: ServerConfig fields; "tiny" is the 1-layer TINY unless `model_overrides`."""
    settings: dict[str, object] = {"model_overrides": TINY, "poll_timeout": 1.0, **overrides}
    config = ServerConfig(root=root, api_key=API_KEY, **settings)  # type: ignore[arg-type]
    app = create_app(config)
    port = _free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        if time.time() > deadline or not thread.is_alive():
            raise RuntimeError("server did not start")
        time.sleep(0.02)
    return LiveServer(f"http://127.0.0.1:{port}", app.state.backend, root, server, thread)


def assert_same(a: Any, b: Any, where: str = "state") -> None:
    """Bitwise equality of nested dicts/lists of tensors and plain values (tensors compared as
    bytes, so NaN payloads and -0.0 count)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def wait_future(
    http: httpx.Client, request_id: str, *, raw: bool = False, refusals_ok: bool = False
) -> Any:
    """Poll /retrieve_future over raw HTTP until the future is not `try_again`.

    Returns the decoded forward(-backward) output for a protobuf body (`raw`: its bytes) and the
    JSON dict otherwise (maybe {"error": ...}). Any status >= 500 fails the test, and so does a
    4xx unless `refusals_ok`.
    """
    for _ in range(200):
        r = http.post("/retrieve_future", json={"request_id": request_id})
        assert r.status_code < (500 if refusals_ok else 300), r.text
        if r.headers["content-type"].startswith("application/x-protobuf"):
            return r.content if raw else deserialize_forward_backward_output(r.content)
        body = r.json()
        if body.get("type") != "try_again":
            return body
    raise AssertionError(f"future {request_id} never completed")


def raw_http(live: LiveServer, *, key: str = API_KEY, timeout: float = 60) -> httpx.Client:
    """An httpx client on the server's /api/v1 with an API key (use it as a context manager)."""
    return httpx.Client(
        base_url=f"{live.base_url}/api/v1", headers={"X-API-Key": key}, timeout=timeout
    )


def raw_session(http: httpx.Client, sdk_version: str = "test") -> str:
    """A new session id, over raw HTTP."""
    r = http.post(
        "/create_session", json={"tags": [], "user_metadata": None, "sdk_version": sdk_version}
    )
    assert r.status_code == 200, r.text
    return str(r.json()["session_id"])


def create_raw_model(http: httpx.Client, session: str, *, seed: int) -> str:
    """A rank-2 LoRA model on "tiny" in `session`, over raw HTTP; its model_id."""
    r = http.post(
        "/create_model",
        json={
            "session_id": session,
            "model_seq_id": 0,
            "base_model": "tiny",
            "lora_config": {"rank": 2, "seed": seed},
        },
    )
    assert r.status_code == 200, r.text
    return str(wait_future(http, r.json()["request_id"])["model_id"])
