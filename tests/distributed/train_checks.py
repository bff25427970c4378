"""Launched by tests/distributed/test_train.py under `torchrun --nproc-per-node 2`: a whole
`cispo train` run, then the same run resumed from its second-to-last checkpoint.

    python -m torch.distributed.run --standalone --nproc-per-node 2 \
        tests/distributed/train_checks.py OUT ARGS...

Writes OUT/run (the run directory), OUT/final.pt and OUT/resumed.pt (rank 0: the final checkpoint's
weights, converted from DCP to one torch file, after the run and after the resume),
OUT/exit_codes.json (every rank's exit statuses) and OUT/sample_calls.json (per rank, the
stream ids of every call of its `HFSampler.sample` that had explicit, not all-zero stream ids:
the rollout shares; evaluation's seeded requests run on stream 0).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch.distributed as dist
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from cispo import distributed
from cispo.cli import main
from cispo.engine.sampler import HFSampler

ROLLOUT_CALLS: list[list[int]] = []


def _record_rollout_calls() -> None:
    """Wrap `HFSampler.sample` (every sampler of the run, shared or a copy) to record the stream
    ids of the rollout calls this rank makes."""
    original = HFSampler.sample

    def recording(
        self: HFSampler, prompts: Any, n: int, params: Any, stream_ids: Any = None
    ) -> Any:
        if stream_ids is not None and any(stream_ids):
            ROLLOUT_CALLS.append([int(s) for s in stream_ids])
        return original(self, prompts, n, params, stream_ids)

    HFSampler.sample = recording  # type: ignore[method-assign]


def _write_rollout_calls(out: Path) -> None:
    calls: Sequence[list[list[int]]] = distributed.gather_objects(ROLLOUT_CALLS)
    if distributed.current_rank() == 0:
        (out / "sample_calls.json").write_text(json.dumps(calls))


def _run() -> None:
    _record_rollout_calls()
    out, args = Path(sys.argv[1]), sys.argv[2:]
    run = out / "run"
    codes = [main(["train", *args, f"--run.dir={run}"])]
    root = run / "checkpoints" / "tiny"
    last = (root / "latest").read_text().strip()
    if distributed.current_rank() == 0:
        dcp_to_torch_save(root / last, out / "final.pt")
        # Back to the checkpoint before the last: remove the last and point `latest` back.
        step = int(last.split("_")[1])
        previous = f"step_{step - 1:06d}"
        (out / "removed").mkdir()
        (root / last).rename(out / "removed" / last)
        (root / "latest").write_text(previous + "\n")
    dist.barrier()
    codes.append(main(["train", *args, f"--run.dir={run}", "--resume"]))
    if distributed.current_rank() == 0:
        dcp_to_torch_save(root / last, out / "resumed.pt")
    _write_rollout_calls(out)
    everyone = distributed.gather_objects(codes)
    if distributed.current_rank() == 0:
        (out / "exit_codes.json").write_text(json.dumps(everyone))
    dist.barrier()


if __name__ == "__main__":
    _run()
    dist.destroy_process_group()
