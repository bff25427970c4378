"""The asynchronous loop under `torchrun --nproc-per-node 2` (CPU, gloo) against one process.

One launch of `async_checks.py` runs four 2-rank runs (lag 0, the lag-1 recipe, a corrupted
weight sync, a killed worker); the one-process lag-0 reference runs here. The configuration is
test_train.py's (TINY_RUN with gentler learning rates), for the reason given there: at TINY_RUN's
own rates float summation order alone makes the runs sample different batches.
"""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from cispo.cli import load_recipe
from cispo.train.loop import train
from tests.distributed.common import ROOT, max_diff, torchrun
from tests.distributed.test_train import OVERRIDES, PER_MICRO_BATCH, RELATIVE, WEIGHTS
from tests.train.helpers import metrics, run_config

SCRIPT = ROOT / "tests" / "distributed" / "async_checks.py"
ASYNC_LAG0 = ["--asynchronous.enabled=true", "--asynchronous.max_staleness=0"]
CANARY = 1e-5  # max |sampler − trainer| probe logprob (the worker's sampler against the trainer's
# fused forward; through the FSDP root on 2 ranks): measured ≤ 3.6e-7 in one process and on 2 ranks


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("torchrun_async")
    done = torchrun(["--standalone", "--nproc-per-node", "2", str(SCRIPT), str(out), *OVERRIDES])
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    single = out / "single"
    summary = train(
        run_config(single, [*OVERRIDES, *ASYNC_LAG0], load_recipe("arithmetic_cispo")),
        echo=lambda _: None,
    )
    results = json.loads((out / "results.json").read_text())
    return {
        "out": out,
        "single": single,
        "summary": summary,
        "ranks": results,
        "stdout": done.stdout,
    }


def test_two_rank_async_lag_0_trains_the_one_process_async_run(runs: dict[str, Any]) -> None:
    two, one = metrics(runs["out"] / "lag0"), metrics(runs["single"])
    rl_rows = [r for r in two if r["step"] > 0]
    assert len(rl_rows) == 3 and all(r["rl/datums"] > 0 for r in rl_rows), rl_rows
    assert all("canary/max_abs_logprob_diff" in r for r in rl_rows), "no worker sync was checked"
    assert [r["step"] for r in two] == [r["step"] for r in one]
    compared = 0
    for a, b in zip(two, one, strict=True):
        keys = {k for k in b if not k.startswith("time") and k not in PER_MICRO_BATCH}
        assert keys <= a.keys(), sorted(keys - a.keys())
        for key in keys:
            if key.startswith("staleness/"):  # the lag histogram: identical
                assert a[key] == b[key], (a["step"], key, a[key], b[key])
            elif key.startswith("canary/"):
                assert max(a[key], b[key]) <= CANARY, (a["step"], key, a[key], b[key])
            elif isinstance(b[key], float) and math.isfinite(b[key]):
                scale = 1.0 if key.startswith("mismatch/") else max(abs(b[key]), 1e-3)
                tolerance = 1e-6 if key.startswith("mismatch/") else RELATIVE
                assert abs(a[key] - b[key]) / scale <= tolerance, (a["step"], key, a[key], b[key])
            compared += 1
    assert compared > 100
    for rank in runs["ranks"]:
        assert rank["lag0"]["lag_max"] == runs["summary"].lag_max == 0
        assert rank["lag0"]["discarded"] == 0


def test_two_rank_async_lag_0_ends_with_the_one_process_weights_having_moved(
    runs: dict[str, Any],
) -> None:
    final = dict(torch.load(runs["out"] / "lag0.pt", weights_only=False)["model"])
    reference = load_file(str(runs["single"] / "checkpoints/tiny/step_000003/model.safetensors"))
    first = load_file(str(runs["single"] / "checkpoints/tiny/step_000001/model.safetensors"))
    assert max_diff(reference, first) > 1e-4  # two RL steps moved the weights
    assert max_diff(final, reference) <= WEIGHTS


def test_two_rank_lag_1_recipe_trains_stale_batches_within_the_bound(
    runs: dict[str, Any],
) -> None:
    rows = [r for r in metrics(runs["out"] / "lag1") if r["step"] > 0]
    assert len(rows) == 3 and all(r["rl/datums"] > 0 and r["optim/grad_norm"] > 0 for r in rows)
    assert all(r["staleness/lag_0_frac"] + r["staleness/lag_1_frac"] == 1.0 for r in rows)
    assert {r["staleness/lag_max"] for r in rows} <= {0.0, 1.0}
    summaries = [rank["lag1"] for rank in runs["ranks"]]
    same = ("steps", "accuracy_start", "accuracy_end", "lag_mean", "lag_max", "discarded")
    assert [{k: s[k] for k in same} for s in summaries[1:]] == [{k: summaries[0][k] for k in same}]
    assert summaries[0]["lag_max"] <= 1 and summaries[0]["discarded"] == 0
    assert summaries[0]["lag_max"] == rows[-1]["staleness/run_lag_max"]


def test_only_rank_0_starts_the_worker_and_writes_the_run_files(runs: dict[str, Any]) -> None:
    rank0, rank1 = runs["ranks"]
    for name in ("lag0", "lag1", "canary", "crash"):
        assert (rank0[name]["workers_started"], rank1[name]["workers_started"]) == (1, 0), name
    assert rank0["alive_workers"] == [] and rank1["alive_workers"] == []
    run, single = runs["out"] / "lag0", runs["single"]
    assert sorted(p.name for p in run.iterdir()) == sorted(p.name for p in single.iterdir())
    assert len(metrics(run)) == len(metrics(single)) == 4  # one line per step, one writer
    # printed by rank 0 alone: once per run that got past its warm start
    assert runs["stdout"].count("held-out greedy accuracy before RL") == 4


def test_a_failed_weight_sync_stops_every_rank_with_the_canary_error(runs: dict[str, Any]) -> None:
    rank0, rank1 = (rank["canary"] for rank in runs["ranks"])
    assert rank0["error"] == rank1["error"] == "WeightSyncError", (rank0, rank1)
    assert "disagree on the probe batch" in rank0["message"]
    assert (
        rank1["message"].startswith("on rank 0: ") and "disagree on the probe" in rank1["message"]
    )


def test_a_dead_worker_stops_every_rank_with_a_worker_error(runs: dict[str, Any]) -> None:
    rank0, rank1 = (rank["crash"] for rank in runs["ranks"])
    assert rank0["error"] == rank1["error"] == "WorkerError", (rank0, rank1)
    assert "exited with code -9" in rank0["message"] and "exited with code -9" in rank1["message"]
    rows = metrics(runs["out"] / "crash")
    assert [r["step"] for r in rows] == [0, 1, 2]  # steps 1 and 2 trained, then the stop
