"""Sharded checkpoints with torch.distributed.checkpoint (DCP), and a Hugging Face export.

Layout of a checkpoint directory `path` (every rank writes into it: on several nodes it must be a
shared file system):

    path/.metadata, path/__R_0.distcp   DCP: model and optimizer state, keyed by the model's
                                        parameter names, each rank writing its own shards
    path/rng_rank_R.pt                  rank R's RNG states (python, numpy, torch, named
                                        generators)
    path/state.json                     {"world_size", "trainer_state"} (rank 0)

The directory is written as `.tmp-<name>` beside `path` and renamed by rank 0 after every rank
has finished (a barrier), so a visible `path` is complete.

Resuming with a different world size (or without a process group): DCP re-shards the model and
optimizer state onto the new layout by parameter name (the values are the same; what a rank holds
changes). The per-rank RNG states are restored only when the world size matches the one saved;
otherwise they are left as they are and `load_sharded` says so (`rng_restored=False`). Each
rank's share of a batch changes with the world size too, so such a resume continues the same run
mathematically (up to float summation order), not bitwise.

`export_hf` gathers the full weights to rank 0 (CPU) and writes `model.safetensors` + `config.json`
that `from_pretrained` loads; a tied LM head is stored once, under the embedding's name. A peft
(LoRA) model is written as a PEFT adapter directory.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)
from torch.distributed.checkpoint.state_dict_loader import load as dcp_load
from torch.distributed.checkpoint.state_dict_saver import save as dcp_save

from cispo.distributed.group import active, current_rank, current_world_size

__all__ = [
    "LoadedShardedState",
    "export_hf",
    "load_sharded",
    "read_sharded_model_state",
    "save_sharded",
]

_STATE_FILE = "state.json"


def _capture_rng_state(generators: Mapping[str, torch.Generator] | None = None) -> dict[str, Any]:
    """Python `random`, numpy's global RNG, torch CPU (and CUDA) and named generator states.

    The result holds only tensors, ints, floats, strings, lists and dicts, so `torch.load` can
    read it back with `weights_only=True`.
    """
    version, mt_state, gauss = random.getstate()
    np_state = np.random.get_state(legacy=True)
    assert isinstance(np_state, tuple)  # legacy=True always gives the tuple form
    name, key, pos, has_gauss, cached_gauss = np_state
    state: dict[str, Any] = {
        "python": {"version": version, "state": list(mt_state), "gauss": gauss},
        "numpy": {
            "name": str(name),
            "key": torch.from_numpy(np.asarray(key, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gauss),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "generators": {n: g.get_state() for n, g in (generators or {}).items()},
    }
    return state


def _restore_rng_state(
    state: Mapping[str, Any], generators: Mapping[str, torch.Generator] | None = None
) -> None:
    """Inverse of `_capture_rng_state`. Each generator passed in must have a saved state.

    CUDA states are restored for the devices present (a CPU-only resume skips them).
    """
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    npst = state["numpy"]
    key = npst["key"].numpy().astype(np.uint32)
    np.random.set_state(
        (npst["name"], key, npst["pos"], npst["has_gauss"], npst["cached_gaussian"])
    )
    torch.set_rng_state(state["torch"])
    cuda_states = state.get("cuda", [])
    if cuda_states and torch.cuda.is_available():
        for device, cuda_state in enumerate(cuda_states[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, device)
    saved = state.get("generators", {})
    for name, generator in (generators or {}).items():
        if name not in saved:
            raise KeyError(
                f"no saved RNG state for generator {name!r}; saved: {sorted(saved) or 'none'}"
            )
        generator.set_state(saved[name])


def _rng_file(rank: int) -> str:
    return f"rng_rank_{rank}.pt"


def _barrier() -> None:
    if active():
        dist.barrier()


def _fsync_tree(path: Path) -> None:
    for item in path.iterdir():
        if item.is_file():
            with open(item, "rb") as handle:
                os.fsync(handle.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_sharded(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    trainer_state: Mapping[str, Any],
    generators: Mapping[str, torch.Generator] | None = None,
) -> Path:
    """Write model + optimizer (DCP), this rank's RNG and `trainer_state` (JSON) to `path`.

    Every rank calls it with the same `path` and `trainer_state`. An existing `path` is refused
    (rank 0 checks, every rank raises).
    """
    path = Path(path)
    tmp = path.parent / f".tmp-{path.name}"
    problem = None
    if current_rank() == 0:
        if path.exists():
            problem = f"checkpoint directory {str(path)!r} already exists"
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)  # a stale, incomplete attempt
            tmp.mkdir()
    problems = [problem]
    if active():
        dist.broadcast_object_list(problems, src=0)
    if problems[0] is not None:
        raise FileExistsError(problems[0])
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp_save({"model": model_state, "optimizer": optim_state}, checkpoint_id=str(tmp))
    torch.save(_capture_rng_state(generators), tmp / _rng_file(current_rank()))
    _barrier()
    if current_rank() == 0:
        payload = {"world_size": current_world_size(), "trainer_state": dict(trainer_state)}
        (tmp / _STATE_FILE).write_text(json.dumps(payload, indent=1))
        _fsync_tree(tmp)
        os.replace(tmp, path)
    _barrier()
    return path


@dataclass(frozen=True)
class LoadedShardedState:
    trainer_state: dict[str, Any]
    """The JSON state given to `save_sharded`."""
    saved_world_size: int
    """World size of the job that wrote the checkpoint."""
    rng_restored: bool
    """False when the world size differs from the saved one: RNG states were left alone."""


def load_sharded(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    *,
    generators: Mapping[str, torch.Generator] | None = None,
) -> LoadedShardedState:
    """Load what `save_sharded` wrote into `model` (sharded or not) and `optimizer` (if given).

    Every rank calls it. Re-shards across world sizes (module docstring).
    """
    path = Path(path)
    state_file = path / _STATE_FILE
    if not state_file.is_file():
        raise FileNotFoundError(f"{str(path)!r} is not a sharded checkpoint (no {_STATE_FILE})")
    payload = json.loads(state_file.read_text())
    if optimizer is None:
        model_state = get_model_state_dict(model)
        dcp_load({"model": model_state}, checkpoint_id=str(path))
        set_model_state_dict(model, model_state)
    else:
        model_state, optim_state = get_state_dict(model, optimizer)
        state: dict[str, Any] = {"model": model_state, "optimizer": optim_state}
        dcp_load(state, checkpoint_id=str(path))
        set_state_dict(
            model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"]
        )
    saved_world = int(payload["world_size"])
    restored = saved_world == current_world_size()
    if restored:
        rng = torch.load(path / _rng_file(current_rank()), weights_only=True)
        _restore_rng_state(rng, generators)
    return LoadedShardedState(dict(payload["trainer_state"]), saved_world, restored)


def export_hf(path: Path, model: nn.Module) -> Path | None:
    """Gather the full weights on rank 0 and write a `from_pretrained` directory there.

    Every rank calls it (the gather is a collective); rank 0 writes `model.safetensors` and
    `config.json` into `path` and returns it, the other ranks return None. With tied word
    embeddings `lm_head.weight` is left out: `from_pretrained` ties it back to the embedding.

    A peft model (LoRA) is written as a PEFT adapter directory instead (`adapter_config.json` +
    `adapter_model.safetensors`, peft's own key mapping `get_peft_model_state_dict`), which
    `PeftModel.from_pretrained(base, path)` loads onto the base the engine was built from (its
    weights are frozen: training never changes them). The merged model of a LoRA run comes from
    `cispo export` (`cispo.export`), which also writes the base beside the adapter.
    """
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "save_pretrained"):
        raise TypeError(f"{type(model).__name__} has no transformers config to export")
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(model, options=options)
    if current_rank() != 0:
        _barrier()
        return None
    peft_config = getattr(model, "peft_config", None)
    if isinstance(peft_config, Mapping):
        _write_peft_adapter(Path(path), model, peft_config, state)
        _barrier()
        return Path(path)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    tensors = {
        name: tensor.detach().contiguous()
        for name, tensor in state.items()
        if isinstance(tensor, Tensor) and not (tied and name == "lm_head.weight")
    }
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(str(path))
    _barrier()
    return path


def _write_peft_adapter(
    path: Path, model: nn.Module, peft_config: Mapping[str, Any], state: Mapping[str, Any]
) -> None:
    """Rank 0 of `export_hf` for a peft model: the active adapter of the gathered `state`."""
    from peft import get_peft_model_state_dict

    name = str(getattr(model, "active_adapter", "default"))
    adapter = get_peft_model_state_dict(model, state_dict=dict(state), adapter_name=name)
    tensors = {k: v.detach().contiguous() for k, v in adapter.items() if isinstance(v, Tensor)}
    path.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file(
        tensors, str(path / "adapter_model.safetensors"), metadata={"format": "pt"}
    )
    peft_config[name].save_pretrained(str(path))


def read_sharded_model_state(path: Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """(model state dict, trainer_state) of a `save_sharded` directory, in this process, without
    a model or a process group (DCP's `dcp_to_torch_save` through a temporary file). For tools
    (`cispo export`) that need the plain weights of a run trained under torchrun."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    path = Path(path)
    state_file = path / _STATE_FILE
    if not state_file.is_file():
        raise FileNotFoundError(f"{str(path)!r} is not a sharded checkpoint (no {_STATE_FILE})")
    payload = json.loads(state_file.read_text())
    with tempfile.TemporaryDirectory() as tmp:
        target = Path(tmp) / "state.pt"
        dcp_to_torch_save(str(path), str(target))
        data = torch.load(target, weights_only=False)
    model = {k: v for k, v in data["model"].items() if isinstance(v, Tensor)}
    return model, dict(payload["trainer_state"])
