"""Launched by tests/distributed/test_async.py under `torchrun --nproc-per-node 2`: the
asynchronous loop (`asynchronous.enabled`) under a process group, four runs in one launch.

    python -m torch.distributed.run --standalone --nproc-per-node 2 \
        tests/distributed/async_checks.py OUT OVERRIDES...

1. `lag0`: arithmetic_cispo with the worker at max_staleness=0 (OVERRIDES, 3 RL steps);
2. `lag1`: the arithmetic_cispo_async_lag1 recipe with the same OVERRIDES;
3. `canary`: every published version corrupted on rank 0 (the canary must stop both ranks);
4. `crash`: the worker killed (SIGKILL) when version 2 is published (both ranks must stop).

Writes OUT/<run>/ (run directories), OUT/lag0.pt and OUT/lag1.pt (rank 0: the final DCP
checkpoint as one torch file) and OUT/results.json: per rank, each run's summary or the error it
raised, the workers it started and those still alive at the end.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import psutil
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from cispo import distributed
from cispo.asynchronous.worker import SamplerWorker, WeightChannel, WeightSyncError, WorkerError
from cispo.cli import load_recipe
from cispo.train.loop import train
from tests.train.helpers import run_config

ASYNC_LAG0 = ["--asynchronous.enabled=true", "--asynchronous.max_staleness=0"]
SHORT = ["--sft.steps=10"]  # the failure runs need no learning, only steps


def _corrupt_every_publish() -> None:
    real = WeightChannel.publish

    def publish(self: WeightChannel, weights: Mapping[str, torch.Tensor], version: int) -> None:
        g = torch.Generator().manual_seed(version)
        real(
            self,
            {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in weights.items()},
            version,
        )

    WeightChannel.publish = publish  # type: ignore[method-assign]


def _kill_worker_at_version_2() -> None:
    real = SamplerWorker.publish

    def publish(self: SamplerWorker, weights: Mapping[str, torch.Tensor], version: int) -> None:
        real(self, weights, version)
        if version == 2:
            assert self.pid is not None
            os.kill(self.pid, signal.SIGKILL)
            self.process.join()

    SamplerWorker.publish = publish  # type: ignore[method-assign]


def _run() -> None:
    out, overrides = Path(sys.argv[1]), sys.argv[2:]
    rank = distributed.current_rank()
    pids: list[int] = []
    real_start = SamplerWorker.start

    def start(self: SamplerWorker) -> None:
        real_start(self)
        assert self.pid is not None
        pids.append(self.pid)

    SamplerWorker.start = start  # type: ignore[method-assign]
    results: dict[str, Any] = {}
    runs = [
        ("lag0", "arithmetic_cispo", ASYNC_LAG0, None),
        ("lag1", "arithmetic_cispo_async_lag1", [], None),
        (
            "canary",
            "arithmetic_cispo",
            [*SHORT, "--asynchronous.enabled=true"],
            _corrupt_every_publish,
        ),
        ("crash", "arithmetic_cispo", [*SHORT, *ASYNC_LAG0], _kill_worker_at_version_2),
    ]
    saved = {
        "WeightChannel.publish": WeightChannel.publish,
        "SamplerWorker.publish": SamplerWorker.publish,
    }
    for name, recipe, extra, sabotage in runs:
        if sabotage is not None and rank == 0:  # only rank 0 has a worker and a channel
            sabotage()
        before = len(pids)
        config = run_config(out / name, [*overrides, *extra], load_recipe(recipe))
        try:
            summary = train(config, echo=print)
            results[name] = dataclasses.asdict(summary)
        except (WeightSyncError, WorkerError) as error:
            results[name] = {"error": type(error).__name__, "message": str(error)[-400:]}
        results[name]["workers_started"] = len(pids) - before
        WeightChannel.publish = saved["WeightChannel.publish"]  # type: ignore[method-assign]
        SamplerWorker.publish = saved["SamplerWorker.publish"]  # type: ignore[method-assign]
        root = out / name / "checkpoints" / "tiny"
        if rank == 0 and "error" not in results[name]:
            dcp_to_torch_save(root / (root / "latest").read_text().strip(), out / f"{name}.pt")
    results["alive_workers"] = [pid for pid in pids if psutil.pid_exists(pid)]
    everyone = distributed.gather_objects(results)
    if rank == 0:
        (out / "results.json").write_text(json.dumps(everyone, indent=1))
    dist.barrier()


if __name__ == "__main__":
    _run()
    dist.destroy_process_group()
