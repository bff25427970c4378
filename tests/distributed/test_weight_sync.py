"""The in-memory weight sync (`broadcast_weights` / `BroadcastReceiver`) between a trainer rank
and a sampler rank, under 2 ranks on CPU/gloo: one launch of `weight_sync_checks.py`."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.distributed.common import ROOT, torchrun

SCRIPT = ROOT / "tests" / "distributed" / "weight_sync_checks.py"


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    out = tmp_path_factory.mktemp("broadcast")
    done = torchrun(["--standalone", "--nproc-per-node", "2", str(SCRIPT), str(out)])
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    data: list[dict[str, Any]] = json.loads((out / "results.json").read_text())
    return data


def test_the_sampler_rank_receives_each_version_exactly(ranks: list[dict[str, Any]]) -> None:
    sampler = ranks[1]
    assert sampler["version"] == 2
    assert sampler["fingerprints"] == [True, True]  # bit-identical weights, other initial ones
    assert sampler["probe_diffs"] == [0.0, 0.0]  # canary: same code on both ranks


def test_a_stale_version_raises_on_every_rank(ranks: list[dict[str, Any]]) -> None:
    for rank in ranks:
        assert rank["stale"] == "stale weights: version 1 after version 2"


def test_a_skipped_tensor_raises_on_every_rank_before_a_tensor_moves(
    ranks: list[dict[str, Any]],
) -> None:
    for rank in ranks:
        assert rank["skipped"] is not None and "lacks ['model.norm.weight']" in rank["skipped"]
