"""Two nodes on localhost (`torchrun --nnodes 2`, one rank each) train like one node with two
ranks: the same checks as test_fsdp_engine.py, and the same final weights bit for bit."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from tests.distributed.common import ROOT, free_port, torchrun
from tests.distributed.test_fsdp_engine import CASES

SCRIPT = ROOT / "tests" / "distributed" / "fsdp_checks.py"


@pytest.mark.slow
def test_two_nodes_on_localhost_equal_one_node_with_two_ranks(tmp_path: Path) -> None:
    one_json, one_weights = tmp_path / "one.json", tmp_path / "one.pt"
    done = torchrun(
        ["--standalone", "--nproc-per-node", "2", str(SCRIPT), str(one_json), str(one_weights)]
    )
    assert done.returncode == 0, done.stderr[-4000:]

    port = free_port()
    two_json, two_weights = tmp_path / "two.json", tmp_path / "two.pt"
    common = ["--nnodes", "2", "--nproc-per-node", "1", "--master-addr", "127.0.0.1"]
    with ThreadPoolExecutor(2) as pool:  # both nodes must run at once to meet
        runs = pool.map(
            lambda node: torchrun(
                [
                    *common,
                    "--node-rank",
                    str(node),
                    "--master-port",
                    str(port),
                    str(SCRIPT),
                    str(two_json),
                    str(two_weights),
                ]
            ),
            [0, 1],
        )
    for run in runs:
        assert run.returncode == 0, run.stderr[-4000:]

    two = json.loads(two_json.read_text())
    for case in CASES:
        got = two["cases"][case]
        assert got["sharded"] and got["moved"] > 1e-3
        assert got["weight_diff"] <= 1e-5, (case, got["weight_diff"])
    assert two["per_rank_mean_weight_diff"] > 1e-3
    one_final, two_final = torch.load(one_weights), torch.load(two_weights)
    assert one_final.keys() == two_final.keys() == set(CASES)
    for case in CASES:
        for name, tensor in one_final[case].items():
            assert torch.equal(two_final[case][name], tensor), (case, name)
