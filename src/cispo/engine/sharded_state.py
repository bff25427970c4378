"""An `Engine`'s state as a sharded DCP checkpoint (`cispo.distributed.checkpoint`).

The counterpart of `save_engine_state` / `load_engine_state` for an engine under torchrun (its
model sharded with FSDP2), usable without a process group too: the directory holds the model and
optimizer by parameter name, every rank's RNG (with the engine's sampling generator) and the
engine's version beside `trainer_state`. Loading re-shards onto any world size
(`cispo.distributed.checkpoint` says what that does to the RNG).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cispo.distributed.checkpoint import LoadedShardedState, export_hf, load_sharded, save_sharded
from cispo.engine.engine import Engine

__all__ = ["export_engine_hf", "load_sharded_engine_state", "save_sharded_engine_state"]


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
