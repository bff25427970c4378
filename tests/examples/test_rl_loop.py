"""examples/rl_loop.py, run twice with tiny settings: in process (`cispo.client`) and against a live
`cispo serve` through the real tinker SDK (same script, `--base-url` picks the client).

Both runs must train (RL datums, finite losses, sampler and trainer logprobs in agreement, the
weights moved) and, with the same seed, give the same numbers: the sampling requests are seeded one
per prompt, so the server's batching of concurrent requests cannot change a draw, and both clients
drive the same engine on the same base weights.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

pytest.importorskip("tinker")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from tests.server.server_harness import API_KEY, start_server

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "rl_loop.py"
TINY_RUN = [
    "--sft-steps=80",
    "--rl-steps=4",
    "--prompts-per-step=8",
    "--group-size=8",
    "--eval-problems=16",
]
SAME = 1e-5
"""Tolerance on losses and logprobs between the clients: the same engine computes both, but the
server's numbers cross the wire as float32 and its greedy evaluation may batch differently."""


def _load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("rl_loop_example", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    example = _load_example()
    with pytest.MonkeyPatch.context() as env:
        env.setenv("TINKER_TELEMETRY", "0")
        env.setenv("HF_HUB_OFFLINE", "1")
        env.delenv("TINKER_BASE_URL", raising=False)
        env.chdir(tmp_path_factory.mktemp("in_process"))
        in_process = example.main(TINY_RUN)
        # The default "tiny" (no size overrides): the model the in-process client builds.
        live = start_server(tmp_path_factory.mktemp("server"), model_overrides={})
        try:
            server = example.main(
                [*TINY_RUN, f"--base-url={live.base_url}", f"--api-key={API_KEY}"]
            )
        finally:
            live.stop()
    return {"in_process": in_process, "server": server}


@pytest.mark.parametrize("client", ["in_process", "server"])
def test_rl_loop_example_trains_with_cispo(runs: dict[str, dict[str, Any]], client: str) -> None:
    run = runs[client]
    trained = [s for s in run["steps"] if s["datums"] > 0]
    assert trained, f"no RL step had a group with unequal rewards: {run['steps']}"
    assert all(math.isfinite(s["loss"]) and s["loss"] != 0.0 for s in trained), trained
    # On-policy: the trainer's logprobs of the sampled tokens are the sampler's.
    assert all(abs(s["sampler_minus_trainer_logprob"]) < 1e-4 for s in trained), trained
    # The weights moved: the logprob of a fixed held-out answer changed.
    moved = run["probe_logprob_after"] - run["probe_logprob_before"]
    assert abs(moved) > 1e-3, run


def test_rl_loop_example_gives_the_same_numbers_on_both_clients(
    runs: dict[str, dict[str, Any]],
) -> None:
    local, remote = runs["in_process"], runs["server"]
    assert len(local["steps"]) == len(remote["steps"]) == 4
    for mine, theirs in zip(local["steps"], remote["steps"], strict=True):
        # The same seeded draws give the same completions, rewards and datums exactly.
        for key in ("reward", "datums"):
            assert mine[key] == theirs[key], (key, mine, theirs)
        for key in ("loss", "sampler_minus_trainer_logprob"):
            assert mine[key] == pytest.approx(theirs[key], rel=SAME, abs=SAME, nan_ok=True), key
    for key in ("sft_nll", "probe_logprob_before", "probe_logprob_after"):
        assert local[key] == pytest.approx(remote[key], rel=SAME, abs=SAME), key
    # Greedy answers: requests may be batched differently, which can flip a near-tie only.
    for key in ("accuracy_before", "accuracy_after"):
        assert abs(local[key] - remote[key]) <= 1 / 16, (key, local[key], remote[key])
