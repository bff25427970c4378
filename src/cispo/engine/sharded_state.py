"""An `Engine`'s state as a sharded DCP checkpoint (`cispo.distributed.checkpoint`).

The counterpart of `save_engine_state` / `load_engine_state` for an engine under torchrun (its
model sharded with FSDP2), usable without a process group too: the directory holds the model and
optimizer by parameter name, every rank's RNG (with the engine's sampling generator) and the
engine's version beside `trainer_state`. Loading re-shards onto any world size
(`cispo.distributed.checkpoint` says what that does to the RNG).

`save_sharded_named_state` is the run-directory form (the RL loop's checkpoints under torchrun):
`root/step_NNNNNN/` as a sharded directory, then `root/latest` and `keep_last` pruning as for
`cispo.checkpoint.save_named_state`, done by rank 0 after every rank has written.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cispo import distributed
from cispo.checkpoint import discard_checkpoint, point_latest
from cispo.distributed.checkpoint import LoadedShardedState, export_hf, load_sharded, save_sharded
from cispo.engine.engine import Engine

__all__ = [
    "export_engine_hf",
    "load_sharded_engine_state",
    "save_sharded_engine_state",
    "save_sharded_named_state",
]


def save_sharded_engine_state(
    engine: Engine, path: Path, trainer_state: Mapping[str, Any] | None = None
) -> Path:
    """Every rank: write `engine`'s model, optimizer, RNG and version (+ `trainer_state`)."""
    state = {"version": engine.version, **(trainer_state or {})}
    return save_sharded(
        path,
        engine.model,
        engine.optimizer,
        trainer_state=state,
        generators={"sample_generator": engine.sample_generator},
    )


def load_sharded_engine_state(
    engine: Engine, path: Path, *, optimizer: bool = True
) -> LoadedShardedState:
    """Every rank: load a `save_sharded_engine_state` directory into `engine` (version too)."""
    loaded = load_sharded(
        path,
        engine.model,
        engine.optimizer if optimizer else None,
        generators={"sample_generator": engine.sample_generator},
    )
    engine.version = int(loaded.trainer_state.get("version", 0))
    engine._snapshot = None
    return loaded


def export_engine_hf(engine: Engine, path: Path) -> Path | None:
    """Every rank: gather the weights; rank 0 writes a `from_pretrained` directory at `path`."""
    return export_hf(path, engine.model)


def save_sharded_named_state(
    engine: Engine,
    root: Path,
    name: str,
    trainer_state: Mapping[str, Any],
    *,
    keep_last: int | None = 0,
    durable: bool = True,
) -> Path:
    """Every rank: `save_sharded_engine_state` to `root/name` (replacing a directory of that
    name: rank 0 removes it first), then rank 0 points `root/latest` at it and prunes older
    `step_N` directories to `keep_last`. `durable` only concerns `latest`: the sharded directory
    is always fsynced before its rename."""
    if not name or "/" in name or name.startswith(".") or name == "latest":
        raise ValueError(f"bad checkpoint name {name!r}: one path component, not hidden")
    root = Path(root)
    if distributed.current_rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        discard_checkpoint(root / name)
    distributed.barrier()
    path = save_sharded_engine_state(engine, root / name, trainer_state)
    if distributed.current_rank() == 0:  # as save_named_state: only `step_N` names prune
        match = re.fullmatch(r"step_(\d+)", name)
        step = int(trainer_state.get("step", match.group(1) if match else 0))
        point_latest(root, name, step, keep_last=keep_last if match else None, durable=durable)
    distributed.barrier()
    return path
