"""Fixtures: a live server over a tiny model, and the SDK environment (offline, no telemetry)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

pytest.importorskip("tinker")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from server_harness import API_KEY, LiveServer, start_server


@pytest.fixture(autouse=True, scope="session")
def _sdk_env() -> Iterator[None]:
    saved = {
        k: os.environ.get(k)
        for k in ("TINKER_API_KEY", "TINKER_TELEMETRY", "HF_HUB_OFFLINE", "TINKER_BASE_URL")
    }
    os.environ.update(TINKER_API_KEY=API_KEY, TINKER_TELEMETRY="0", HF_HUB_OFFLINE="1")
    os.environ.pop("TINKER_BASE_URL", None)
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    server = start_server(tmp_path_factory.mktemp("server"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def service(live: LiveServer) -> Iterator[object]:
    import tinker

    client = tinker.ServiceClient(base_url=live.base_url)
    yield client
    client.close("success").result()
