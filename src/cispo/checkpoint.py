"""Atomic checkpoint directories: save one by name, load one, find the latest.

`save_named_state(root, name, ...)` writes `root/name/` with exactly these four files, then points
`root/latest` at it:

    model.safetensors   the model state dict (tied/shared tensors stored once, see below);
                        metadata {"format": "pt", "cispo_aliases": JSON {alias: stored name}}
    optimizer.pt        torch.save of the optimizer state_dict given ({} if none)
    rng.pt              torch.save of the RNG-state dict given ({} if none)
    state.json          {"format_version": 1, "step": int, "trainer_state": {...}} (JSON)
    ../latest           text file: the name of the newest directory written, and a newline

`load_checkpoint(path)` reads one directory back; `latest_named_state(root)` finds the newest.
Every checkpoint cispo writes goes through `cispo.engine.save_engine_state`: optimizer.pt is
AdamW's state_dict ({"state": {param index: {"step", "exp_avg", "exp_avg_sq"}}, "param_groups"})
or {} for sampler weights; rng.pt is {"sample_generator": the engine's `torch.Generator` state}
or {}; trainer_state holds the engine's "version" (optimizer steps taken) and the caller's
metadata: for `TrainingClient.save_state` "base_model" and "model_overrides", and for the RL loop
also "step" and "warm_started". The RL loop writes `run_dir/checkpoints/<base model>/step_NNNNNN/`
(`cispo.server.store` documents the server's directories).

RNG: python `random`, numpy and the global torch RNG are not saved, because exact resume does
not need them: after set-up nothing draws from them (the tasks draw from their own seeded
`random.Random`, models are initialised under a forked RNG and train without dropout). The RL
loop does not need the sample generator either: it seeds every step's problems and samples from
(run seed, step), so a resumed step redraws exactly its data. The resume test in
tests/train/test_loop.py scrambles the global RNGs before resuming and still matches the
uninterrupted run bit for bit. The sample generator is saved for clients that sample without a
seed: after `load_state` their stream continues where it was saved.

Crash safety: a checkpoint is written into a `.tmp-*` directory in the same parent, every file
and the directory are fsynced, and only then is it renamed to `step_NNNNNN` (one atomic rename).
Saving over an existing name swaps the two directories atomically (Linux `renameat2`
RENAME_EXCHANGE), so the name is never absent; elsewhere the old one is renamed aside to
`.prev-<name>` first and `recover` puts it back if the process dies before the new one is in.
`latest` is replaced atomically after that. Pruning renames a directory away before deleting
it. So a SIGKILL at any moment leaves every visible `step_*` directory complete; stale `.tmp-*`
and `.trash-*` directories are ignored by readers and removed by the next save (`recover`).

Determinism: the same state gives byte-identical files (the safetensors header's metadata keys
are sorted; safetensors itself writes them in random HashMap order).

Tied weights: safetensors refuses tensors that share memory. The writer stores one copy of each
group of identical views and records the other names as aliases in the file's metadata; the
reader restores them as the same tensor, so `model.load_state_dict` sees every key.

Left out: async writes; one process writes. Sharded (multi-rank) checkpoints are
`cispo.distributed.checkpoint` (DCP).
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch
from torch import Tensor

_STEP_DIR = re.compile(r"^step_(\d+)$")
_TMP_PREFIX = ".tmp-"
_TRASH_PREFIX = ".trash-"
_PREV_PREFIX = ".prev-"
_FILES = ("model.safetensors", "optimizer.pt", "rng.pt", "state.json")
_ALIASES_KEY = "cispo_aliases"
_FORMAT_VERSION = 1

try:  # renameat2 for the atomic directory exchange (glibc >= 2.28); absent elsewhere
    _LIBC: ctypes.CDLL | None = ctypes.CDLL(None, use_errno=True)
except OSError:
    _LIBC = None

# torch's optimizer StateDict is dict[str, Any]; RNG and trainer states are heterogenous too.
StateDict = dict[str, Any]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Checkpoint:
    step: int
    """The optimizer step the checkpoint was taken after."""
    path: Path
    """The `step_NNNNNN` directory."""
    model_state: dict[str, Tensor]
    """Model state dict; tied names map to one shared tensor."""
    optimizer_state: StateDict
    """`torch.optim.Optimizer.state_dict()`, tensors on `map_location`."""
    rng_state: StateDict
    """The RNG-state dict given to `save_named_state`, tensors on the CPU."""
    trainer_state: StateDict
    """The JSON-able state given to `save_named_state`."""


# --------------------------------------------------------------------------------------------
# Model state with shared tensors


def _dedupe_shared(model_state: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, str]]:
    """One tensor per group of identical views (tied weights), plus {alias: stored name}.

    Tensors that share a storage without being the same view (e.g. a slice of another) are
    cloned, since safetensors cannot represent views.
    """
    unique: dict[str, Tensor] = {}
    aliases: dict[str, str] = {}
    first_of_view: dict[tuple[object, ...], str] = {}
    for name, tensor in model_state.items():
        tensor = tensor.detach()
        if tensor.numel() > 0:
            view = (
                tensor.device,
                tensor.untyped_storage().data_ptr(),
                tensor.storage_offset(),
                tuple(tensor.shape),
                tuple(tensor.stride()),
                tensor.dtype,
            )
            if view in first_of_view:
                aliases[name] = first_of_view[view]
                continue
            first_of_view[view] = name
        unique[name] = tensor
    storage_users: dict[tuple[object, int], int] = {}
    for tensor in unique.values():
        if tensor.numel() > 0:
            key = (tensor.device, tensor.untyped_storage().data_ptr())
            storage_users[key] = storage_users.get(key, 0) + 1
    for name, tensor in unique.items():
        shared = (
            tensor.numel() > 0
            and storage_users[(tensor.device, tensor.untyped_storage().data_ptr())] > 1
        )
        if shared or not tensor.is_contiguous():
            tensor = tensor.clone(memory_format=torch.contiguous_format)
        unique[name] = tensor.cpu()
    return unique, aliases


def _save_model(path: Path, model_state: Mapping[str, Tensor]) -> None:
    unique, aliases = _dedupe_shared(model_state)
    metadata = {_ALIASES_KEY: json.dumps(aliases, sort_keys=True), "format": "pt"}
    safetensors.torch.save_file(unique, str(path), metadata=metadata)
    _canonical_header(path)


def _canonical_header(path: Path) -> None:
    """Rewrite a safetensors header with its `__metadata__` keys sorted, in place.

    safetensors serialises the metadata from a Rust HashMap, whose iteration order is random per
    map: two saves of the same state gave different bytes. The header is `u64 length` + JSON
    (space-padded); tensor entries keep their order (their offsets are explicit), and the sorted
    JSON has the same length, so only the header bytes change.
    """
    with open(path, "r+b") as f:
        size = int.from_bytes(f.read(8), "little")
        raw = f.read(size)
        header = json.loads(raw)
        meta = header.pop("__metadata__", None)
        ordered = {} if meta is None else {"__metadata__": dict(sorted(meta.items()))}
        text = json.dumps({**ordered, **header}, separators=(",", ":"), ensure_ascii=False)
        encoded = text.encode()
        if len(encoded) > size:  # cannot happen for the same JSON; rewrite whole file if so
            rest = f.read()
            padded = encoded + b" " * (-len(encoded) % 8)
            f.seek(0)
            f.write(len(padded).to_bytes(8, "little") + padded + rest)
            f.truncate()
            return
        f.seek(8)
        f.write(encoded + b" " * (size - len(encoded)))


def _load_model(path: Path, device: str | torch.device) -> dict[str, Tensor]:
    with safetensors.safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    state = safetensors.torch.load_file(str(path), device=str(device))
    aliases: dict[str, str] = json.loads(metadata.get(_ALIASES_KEY, "{}"))
    for alias, target in aliases.items():
        state[alias] = state[target]
    return state


# --------------------------------------------------------------------------------------------
# Atomic file-system helpers


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    # Makes a rename durable. Not supported on every platform/file system; skip there.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_text_atomic(path: Path, text: str, *, durable: bool = True) -> None:
    tmp = path.with_name(f"{_TMP_PREFIX}{path.name}-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        if durable:
            os.fsync(f.fileno())
    os.replace(tmp, path)
    if durable:
        _fsync_dir(path.parent)


def _discard(path: Path) -> None:
    """Rename away (atomic: the name disappears at once), then delete."""
    trash = path.with_name(f"{_TRASH_PREFIX}{path.name}-{os.getpid()}")
    os.rename(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two existing paths (Linux `renameat2(RENAME_EXCHANGE)`); False where the
    platform or file system does not support it."""
    rename = getattr(_LIBC, "renameat2", None) if _LIBC is not None else None
    if rename is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    done = rename(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange)
    return bool(done == 0)


def _replace_dir(new: Path, final: Path) -> None:
    """Put directory `new` at `final`, replacing the directory there, such that a SIGKILL at any
    moment leaves a complete checkpoint visible at `final` or recoverable by `recover`.

    Linux: one atomic exchange (`final` is never absent), then the old copy, now at `new`'s
    hidden name, is deleted. Elsewhere: the old directory is renamed aside to `.prev-<name>`, the
    new one renamed in, then the old one deleted; a crash between the two renames leaves
    `.prev-<name>`, which `recover` (run by every save and at server start-up) renames back.
    """
    if _exchange(new, final):
        shutil.rmtree(new, ignore_errors=True)
        return
    aside = final.with_name(f"{_PREV_PREFIX}{final.name}")
    if aside.exists():
        shutil.rmtree(aside)
    os.rename(final, aside)
    os.rename(new, final)
    shutil.rmtree(aside, ignore_errors=True)


def recover(root: Path) -> None:
    """Finish or undo what a killed save left in `root`: a `.prev-<name>` directory whose `<name>`
    is missing is renamed back (it is the complete previous checkpoint), other `.prev-*`, and
    every `.tmp-*` and `.trash-*`, are deleted. Only one process may write under `root`."""
    root = Path(root)
    if not root.is_dir():
        return
    for entry in root.iterdir():
        if entry.name.startswith(_PREV_PREFIX) and entry.is_dir():
            target = root / entry.name[len(_PREV_PREFIX) :]
            if not target.exists() and is_complete(entry):
                os.rename(entry, target)
            else:
                shutil.rmtree(entry, ignore_errors=True)
    _remove_stale(root)


def _remove_stale(root: Path) -> None:
    for entry in root.iterdir():
        if entry.name.startswith((_TMP_PREFIX, _TRASH_PREFIX)):
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)


def _step_dirs(root: Path) -> list[tuple[int, Path]]:
    found = []
    if root.is_dir():
        for entry in root.iterdir():
            match = _STEP_DIR.match(entry.name)
            if match and entry.is_dir():
                found.append((int(match.group(1)), entry))
    return sorted(found)


def is_complete(path: Path) -> bool:
    """A whole `save_named_state` directory, or a whole sharded one (`is_sharded`)."""
    return all((path / name).is_file() for name in _FILES) or is_sharded(path)


def is_sharded(path: Path) -> bool:
    """Whether `path` is a sharded (DCP) checkpoint that `cispo.distributed.checkpoint` wrote:
    DCP's `.metadata` and its `state.json` (written last, before the rename)."""
    return (path / ".metadata").is_file() and (path / "state.json").is_file()


# --------------------------------------------------------------------------------------------
# Public API


def save_named_state(
    root: Path,
    name: str,
    *,
    model_state: Mapping[str, Tensor],
    optimizer_state: Mapping[str, Any],
    rng_state: Mapping[str, Any],
    trainer_state: Mapping[str, Any],
    keep_last: int | None = 0,
    durable: bool = True,
) -> Path:
    """Write `root/name/` atomically (replacing a directory of that name), point `root/latest`
    at it, prune.

    The checkpoint's step is `trainer_state["step"]` if given, else the N of a `step_N` name,
    else 0. Saving a `step_N` name prunes the older `step_N` directories to the `keep_last`
    newest up to this step (None or 0 keeps all); directories with a larger step (left by a run
    resumed at an earlier step) and other names are never pruned. `durable=False` skips the
    fsyncs: the rename still makes the checkpoint appear whole or not at all if the *process* is
    killed (the page cache survives), but a machine crash may lose it. The RL loop uses it for
    its per-step checkpoints, where the fsyncs cost as much as half a tiny-model step.
    """
    if not name or "/" in name or name.startswith(".") or name == "latest":
        raise ValueError(f"bad checkpoint name {name!r}: one path component, not hidden")
    match = _STEP_DIR.match(name)
    given = trainer_state.get("step")
    if isinstance(given, int) and not isinstance(given, bool):
        step = given
    else:
        step = int(match.group(1)) if match else 0
    return _save(
        Path(root),
        name,
        step=step,
        model_state=model_state,
        optimizer_state=optimizer_state,
        rng_state=rng_state,
        trainer_state=trainer_state,
        keep_last=keep_last if match else None,
        durable=durable,
    )


def _save(
    root: Path,
    name: str,
    *,
    step: int,
    model_state: Mapping[str, Tensor],
    optimizer_state: Mapping[str, Any],
    rng_state: Mapping[str, Any],
    trainer_state: Mapping[str, Any],
    keep_last: int | None,
    durable: bool = True,
) -> Path:
    if keep_last is not None and keep_last < 0:
        raise ValueError(f"keep_last must be >= 0 (0 or None keeps all), got {keep_last}")
    # Serialise the JSON first: a non-JSON-able trainer_state fails before touching the disk.
    state_json = json.dumps(
        {"format_version": _FORMAT_VERSION, "step": step, "trainer_state": dict(trainer_state)},
        indent=1,
    )
    root.mkdir(parents=True, exist_ok=True)
    recover(root)
    final = root / name
    tmp = Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{name}-", dir=root))
    try:
        _save_model(tmp / "model.safetensors", model_state)
        torch.save(dict(optimizer_state), tmp / "optimizer.pt")
        torch.save(dict(rng_state), tmp / "rng.pt")
        (tmp / "state.json").write_text(state_json)
        if durable:
            for file_name in _FILES:
                _fsync_file(tmp / file_name)
            _fsync_dir(tmp)
        if final.exists():
            _replace_dir(tmp, final)
        else:
            os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    point_latest(root, final.name, step, keep_last=keep_last, durable=durable)
    return final


def point_latest(root: Path, name: str, step: int, *, keep_last: int | None, durable: bool) -> None:
    """After `root/name` (the checkpoint of `step`) is complete: point `root/latest` at it
    atomically and prune older `step_N` directories to `keep_last` (0 or None keeps all).
    Sharded checkpoints (`cispo.engine.sharded_state`) use it too, from rank 0."""
    if keep_last is not None and keep_last < 0:
        raise ValueError(f"keep_last must be >= 0 (0 or None keeps all), got {keep_last}")
    if durable:
        _fsync_dir(root)
    _write_text_atomic(root / "latest", name + "\n", durable=durable)
    if keep_last:
        older = [path for s, path in _step_dirs(root) if s < step]
        for path in older[: max(0, len(older) - (keep_last - 1))]:
            _discard(path)


def discard_checkpoint(path: Path) -> None:
    """Remove a checkpoint directory: renamed away first, so it never looks half-deleted."""
    if path.exists():
        _discard(path)


def load_checkpoint(path: Path, *, map_location: str | torch.device = "cpu") -> Checkpoint:
    """Read one directory `save_named_state` wrote (FileNotFoundError naming the missing files if
    it is incomplete)."""
    path = Path(path)
    missing = [name for name in _FILES if not (path / name).is_file()]
    if missing:
        raise FileNotFoundError(f"incomplete checkpoint {path}: missing {', '.join(missing)}")
    meta = json.loads((path / "state.json").read_text())
    return Checkpoint(
        step=int(meta["step"]),
        path=path,
        model_state=_load_model(path / "model.safetensors", map_location),
        optimizer_state=torch.load(
            path / "optimizer.pt", map_location=map_location, weights_only=True
        ),
        # RNG states are CPU ByteTensors whatever the device.
        rng_state=torch.load(path / "rng.pt", map_location="cpu", weights_only=True),
        trainer_state=meta["trainer_state"],
    )


def latest_named_state(root: Path) -> Path | None:
    """The directory `root/latest` names if it is complete, else the newest complete `step_N`
    directory, else None."""
    root = Path(root)
    pointer = root / "latest"
    if pointer.is_file():
        named = root / pointer.read_text().strip()
        if named.name and not named.name.startswith(".") and is_complete(named):
            return named
    for _, path in reversed(_step_dirs(root)):
        if is_complete(path):
            return path
    return None
