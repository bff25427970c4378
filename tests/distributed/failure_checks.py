"""Launched by tests/distributed/test_rank_failure.py under `torchrun --nproc-per-node 2`:
`cispo train` in which rank 1 raises in its second RL step, while rank 0 goes on into that step's
collectives (where, alone, it would wait for rank 1 until the collective timeout).

    python -m torch.distributed.run --standalone --nproc-per-node 2 \\
        tests/distributed/failure_checks.py ARGS...
"""

from __future__ import annotations

import sys
from typing import Any

from cispo import distributed
from cispo.cli import main
from cispo.train import loop

FAILING_RANK = 1
FAILING_STEP = 1  # 0-based: the second RL step


class DeliberateFailure(RuntimeError):
    """What rank 1 raises in place of its RL update."""


def _failing_update() -> None:
    real, calls = loop.train_on_rollout, [0]

    def update(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        if distributed.current_rank() == FAILING_RANK and calls[0] > FAILING_STEP:
            raise DeliberateFailure(f"rank {FAILING_RANK} fails in RL step {calls[0]}")
        return real(*args, **kwargs)

    loop.train_on_rollout = update  # type: ignore[assignment]


if __name__ == "__main__":
    _failing_update()
    sys.exit(main(["train", *sys.argv[1:]]))
