"""Where `tinker://` paths live on disk, and the training-run records that survive a restart.

    <root>/runs/<run>/run.json                     run record (base model, LoRA, checkpoints)
    <root>/runs/<run>/weights/<name>/              save_weights: model + optimizer + sampler RNG
    <root>/runs/<run>/sampler_weights/<name>/      save_weights_for_sampler: model only
    <root>/runs/<run>/external_weights/<name>/     save_weights_external: `cispo.export` layout
                                                   (model/ HF directory; adapter/ + base/ for LoRA)

A checkpoint directory is `cispo.checkpoint`'s named state (model.safetensors, optimizer.pt,
rng.pt, state.json), the same format `cispo.client.TrainingClient.save_state` writes: written
into a temporary directory, fsynced and renamed into place, so a crash never leaves a half-written
one, and `TrainingClient.load_state("<root>/runs/<run>/weights/<name>")` reads a server
checkpoint (and the server's sampler sessions read the client's). Sampler checkpoints store an
empty optimizer state. Directories from before this format (`state.pt`, one `torch.save`) are
still read.

`tinker://<training_run_id>/<weights|sampler_weights>/<name>` maps to the directory; the training
run id is the model id (`<session>:train:<n>`), stored as `<session>_train_<n>` on disk. Files are
read with `weights_only=True`: only tensors and plain containers.

A checkpoint may carry a TTL (`ttl_seconds`, 1 hour to 10 years, as Tinker allows): its entry holds
`expires_at`, and once that time has passed the checkpoint is deleted, both by the server's periodic
`sweep` and by any request that resolves its path (an expired path is refused, never loaded).
`delete` removes a checkpoint's directory and its entry.

Every run record names its `owner`, the user (API key) whose session created it; `resolve` and
`all_checkpoints` take the asking user and treat another user's runs exactly as unknown ones
(NotFound, the same message). Records written before owners existed belong to `DEFAULT_OWNER`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from cispo.checkpoint import is_complete, recover
from cispo.engine.engine import load_engine_state, save_engine_state
from cispo.server.futures import NotFound, UserError

SCHEME = "tinker://"
KINDS = {"weights": "training", "sampler_weights": "sampler"}
"""Checkpoints the server loads (`resolve`)."""
EXTERNAL = "external_weights"
"""Exported HF/PEFT directories: listed, deleted, downloaded, never loaded back."""
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_RESERVED = frozenset({"latest"})  # `cispo.checkpoint`'s pointer file beside the checkpoints
_LEGACY_FILE = "state.pt"
DEFAULT_OWNER = "default"
"""The user of the single `--api-key`, and the owner of run records that name none."""
TTL_RANGE = (3600, 10 * 365 * 24 * 3600)
"""Allowed `ttl_seconds`, as Tinker documents it: 1 hour to 10 years."""


def check_ttl(ttl_seconds: int | None) -> None:
    """UserError unless `ttl_seconds` is None (never expires) or within TTL_RANGE."""
    lo, hi = TTL_RANGE
    if ttl_seconds is not None and not lo <= ttl_seconds <= hi:
        raise UserError(
            f"ttl_seconds must be in [{lo}, {hi}] (1 hour to 10 years) or None, got {ttl_seconds}"
        )


@dataclass
class RunRecord:
    training_run_id: str
    base_model: str
    lora_rank: int
    """0 = full fine-tuning."""
    lora_targets: list[str]
    seed: int
    model_overrides: dict[str, Any]
    user_metadata: dict[str, str] | None = None
    created: float = field(default_factory=time.time)
    last_request_time: float = field(default_factory=time.time)
    checkpoints: list[dict[str, Any]] = field(default_factory=list)
    owner: str = DEFAULT_OWNER
    """The user (API key) whose session created the run; no other user sees it."""


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, tz=timezone.utc).isoformat()


def _expired(entry: dict[str, Any], now: float) -> bool:
    expires = entry.get("expires_at")
    return expires is not None and datetime.fromisoformat(expires).timestamp() <= now


MAX_AGE_RECIPIENTS = 10
AGE_SUFFIX = ".age"


def age_recipients(keys: list[str] | None) -> list[Any] | None:
    """`age_encryption_recipients` ("age1..." or SSH public keys) as pyrage recipients; None for
    none. UserError for a bad key, too many, or pyrage missing (the optional `pyrage` package)."""
    if not keys:
        return None
    if len(keys) > MAX_AGE_RECIPIENTS:
        raise UserError(f"at most {MAX_AGE_RECIPIENTS} age_encryption_recipients, got {len(keys)}")
    try:
        import pyrage
    except ImportError as error:
        raise UserError(
            "age_encryption_recipients needs the `pyrage` package on the server "
            "(pip install pyrage); omit them to export unencrypted"
        ) from error
    out = []
    for key in keys:
        kind = pyrage.x25519 if key.startswith("age1") else pyrage.ssh
        try:
            out.append(kind.Recipient.from_str(key))
        except pyrage.RecipientError as error:
            raise UserError(f"bad age_encryption_recipients entry {key!r}: {error}") from error
    return out


def encrypt_tree(directory: Path, recipients: list[Any]) -> None:
    """Replace every file under `directory` with `<name>.age`, encrypted to `recipients`."""
    import pyrage

    for path in [f for f in directory.rglob("*") if f.is_file()]:
        pyrage.encrypt_file(str(path), str(path) + AGE_SUFFIX, recipients)
        path.unlink()


class Store:
    def __init__(self, root: Path, clock: Callable[[], float] = time.time) -> None:
        self.root = root
        self.clock = clock
        """Seconds since the epoch; TTLs are measured on it (tests move it forward)."""
        self.runs_dir = root / "runs"
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self.runs: dict[str, RunRecord] = {}
        for path in sorted(self.runs_dir.glob("*/run.json")):
            record = RunRecord(**json.loads(path.read_text()))
            self.runs[record.training_run_id] = record
        for kind in KINDS:  # finish or undo saves a killed server left half done
            for directory in sorted(self.runs_dir.glob(f"*/{kind}")):
                recover(directory)

    @staticmethod
    def _dir_name(run_id: str) -> str:
        return run_id.replace(":", "_")

    def add_run(self, record: RunRecord) -> None:
        with self._lock:
            self.runs[record.training_run_id] = record
            self._write_record(record)

    def _write_record(self, record: RunRecord) -> None:
        run_dir = self.runs_dir / self._dir_name(record.training_run_id)
        run_dir.mkdir(parents=True, exist_ok=True)
        tmp = run_dir / "run.json.tmp"
        tmp.write_text(json.dumps(asdict(record), indent=1))
        os.replace(tmp, run_dir / "run.json")

    def touch(self, run_id: str) -> None:
        record = self.runs.get(run_id)
        if record is not None:
            record.last_request_time = time.time()

    # ------------------------------------------------------------------ checkpoints
    def save(
        self,
        run_id: str,
        kind: str,
        name: str,
        state: dict[str, Any],
        *,
        overwrite: bool = True,
        ttl_seconds: int | None = None,
        user_metadata: dict[str, str] | None = None,
    ) -> str:
        """Write `state` under `tinker://run_id/kind/name` atomically; returns the path."""
        check_ttl(ttl_seconds)
        if not _NAME.match(name) or name in _RESERVED:
            raise UserError(
                f"checkpoint name {name!r} must match {_NAME.pattern} (letters, digits, . _ -) "
                f"and not be one of {sorted(_RESERVED)}"
            )
        record = self.runs[run_id]
        parent = self.runs_dir / self._dir_name(run_id) / kind
        parent.mkdir(parents=True, exist_ok=True)
        final = parent / name
        if final.exists() and not overwrite:
            raise UserError(f"checkpoint {name!r} already exists (pass overwrite=True)")
        save_engine_state(
            parent,
            name,
            state,
            {
                "base_model": record.base_model,
                "model_overrides": record.model_overrides,
                "lora_rank": record.lora_rank,
                "kind": kind,
            },
        )
        path = f"{SCHEME}{run_id}/{kind}/{name}"
        now = self.clock()
        self._add_entry(
            record,
            {
                "checkpoint_id": f"{kind}/{name}",
                "checkpoint_type": KINDS[kind],
                "time": _iso(now),
                "tinker_path": path,
                "size_bytes": sum(f.stat().st_size for f in final.rglob("*") if f.is_file()),
                "public": False,
                "user_metadata": user_metadata,
                "expires_at": None if ttl_seconds is None else _iso(now + ttl_seconds),
            },
        )
        return path

    def save_external(
        self,
        run_id: str,
        name: str,
        write: Callable[[Path], object],
        *,
        ttl_seconds: int | None = None,
    ) -> str:
        """`write(directory)` fills `tinker://run_id/external_weights/name` (replacing it);
        returns the path."""
        check_ttl(ttl_seconds)
        directory = self.checkpoint_dir(run_id, f"{EXTERNAL}/{name}")
        record = self.runs[run_id]
        write(directory)
        path = f"{SCHEME}{run_id}/{EXTERNAL}/{name}"
        now = self.clock()
        self._add_entry(
            record,
            {
                "checkpoint_id": f"{EXTERNAL}/{name}",
                "checkpoint_type": "external",
                "time": _iso(now),
                "tinker_path": path,
                "size_bytes": sum(f.stat().st_size for f in directory.rglob("*") if f.is_file()),
                "public": False,
                "user_metadata": None,
                "expires_at": None if ttl_seconds is None else _iso(now + ttl_seconds),
            },
        )
        return path

    def external_files(self, run_id: str, name: str) -> dict[str, Path]:
        """relative path -> file of a live external_weights checkpoint (KeyError if none)."""
        if self.entry(run_id, f"{EXTERNAL}/{name}") is None:
            raise KeyError(name)
        directory = self.checkpoint_dir(run_id, f"{EXTERNAL}/{name}")
        return {
            f.relative_to(directory).as_posix(): f
            for f in sorted(directory.rglob("*"))
            if f.is_file()
        }

    def _add_entry(self, record: RunRecord, entry: dict[str, Any]) -> None:
        with self._lock:
            path = entry["tinker_path"]
            record.checkpoints = [c for c in record.checkpoints if c["tinker_path"] != path]
            record.checkpoints.append(entry)
            self._write_record(record)

    def checkpoint_dir(self, run_id: str, checkpoint_id: str) -> Path:
        """The directory of `<kind>/<name>`; UserError for anything else (no path traversal)."""
        kind, _, name = checkpoint_id.partition("/")
        if kind not in (*KINDS, EXTERNAL) or not _NAME.match(name) or name in _RESERVED:
            raise UserError(
                f"checkpoint id must be <kind>/<name> with kind in {sorted([*KINDS, EXTERNAL])} "
                f"and a name of letters, digits, . _ -; got {checkpoint_id!r}"
            )
        return self.runs_dir / self._dir_name(run_id) / kind / name

    def entry(self, run_id: str, checkpoint_id: str) -> dict[str, Any] | None:
        """The listed entry of `tinker://run_id/checkpoint_id`, None if unknown or expired (an
        expired one is deleted here)."""
        record = self.runs.get(run_id)
        if record is None:
            return None
        for entry in record.checkpoints:
            if entry["checkpoint_id"] == checkpoint_id:
                if _expired(entry, self.clock()):
                    self.delete(run_id, checkpoint_id)
                    return None
                return entry
        return None

    def delete(self, run_id: str, checkpoint_id: str) -> bool:
        """Remove a checkpoint's directory and entry; False if there was none."""
        record = self.runs.get(run_id)
        if record is None:
            return False
        directory = self.checkpoint_dir(run_id, checkpoint_id)
        with self._lock:
            kept = [c for c in record.checkpoints if c["checkpoint_id"] != checkpoint_id]
            found = len(kept) != len(record.checkpoints)
            record.checkpoints = kept
            if found:
                self._write_record(record)
        if directory.is_dir():
            shutil.rmtree(directory)
            found = True
        return found

    def set_ttl(self, run_id: str, checkpoint_id: str, ttl_seconds: int | None) -> None:
        """Expire the checkpoint `ttl_seconds` from now, or never (None)."""
        check_ttl(ttl_seconds)
        entry = self.entry(run_id, checkpoint_id)
        if entry is None:
            raise KeyError(checkpoint_id)
        expires = None if ttl_seconds is None else _iso(self.clock() + ttl_seconds)
        self._add_entry(self.runs[run_id], {**entry, "expires_at": expires})

    def sweep(self) -> list[str]:
        """Delete every expired checkpoint; returns their paths."""
        now = self.clock()
        expired = [
            (run_id, c["checkpoint_id"], c["tinker_path"])
            for run_id, record in list(self.runs.items())
            for c in list(record.checkpoints)
            if _expired(c, now)
        ]
        for run_id, checkpoint_id, _ in expired:
            self.delete(run_id, checkpoint_id)
        return [path for _, _, path in expired]

    def owned(self, run_id: str, owner: str) -> RunRecord | None:
        """The run record of `run_id` if `owner` owns it, else None (unknown or another's)."""
        record = self.runs.get(run_id)
        return record if record is not None and record.owner == owner else None

    def all_checkpoints(self, owner: str) -> list[dict[str, Any]]:
        """Every live checkpoint of every run of `owner`, newest first, each with its
        training_run_id."""
        self.sweep()
        found = [
            {**c, "training_run_id": run_id}
            for run_id, record in list(self.runs.items())
            if record.owner == owner
            for c in record.checkpoints
        ]
        return sorted(found, key=lambda c: c["time"], reverse=True)

    def resolve(self, path: str, owner: str) -> tuple[RunRecord, str, Path]:
        """`tinker://run/kind/name` of `owner` -> (run record, kind, checkpoint directory);
        UserError for a malformed or expired path, NotFound for an unknown run, another owner's
        run or a missing or incomplete checkpoint."""
        if not path.startswith(SCHEME):
            raise UserError(f"path must look like tinker://<run>/weights/<name>, got {path!r}")
        parts = path[len(SCHEME) :].split("/")
        if len(parts) != 3 or parts[1] not in KINDS or not _NAME.match(parts[2]):
            raise UserError(f"path must look like tinker://<run>/weights/<name>, got {path!r}")
        run_id, kind, name = parts
        record = self.owned(run_id, owner)
        if record is None:
            raise NotFound(f"unknown training run {run_id!r} in {path!r}")
        listed = any(c["tinker_path"] == path for c in record.checkpoints)
        if listed and self.entry(run_id, f"{kind}/{name}") is None:
            raise UserError(f"checkpoint {path!r} has expired (its TTL passed) and was deleted")
        directory = self.runs_dir / self._dir_name(run_id) / kind / name
        if not (directory / _LEGACY_FILE).is_file() and not is_complete(directory):
            raise NotFound(f"no checkpoint at {path!r}")
        return record, kind, directory

    def load(self, path: str, owner: str) -> tuple[RunRecord, dict[str, Any]]:
        """The run record and {"model", "optimizer" (None for sampler weights), "version",
        ["sample_generator"]} of a checkpoint of `owner`."""
        record, _, directory = self.resolve(path, owner)
        if (directory / _LEGACY_FILE).is_file():
            legacy: dict[str, Any] = torch.load(
                directory / _LEGACY_FILE, map_location="cpu", weights_only=True
            )
            return record, legacy
        return record, load_engine_state(directory)[0]

    # ------------------------------------------------------------------ REST views
    def training_run_json(self, record: RunRecord) -> dict[str, Any]:
        def last(kind: str) -> dict[str, Any] | None:
            found = [c for c in record.checkpoints if c["checkpoint_type"] == kind]
            return found[-1] if found else None

        return {
            "training_run_id": record.training_run_id,
            "base_model": record.base_model,
            "model_owner": record.owner,
            "is_lora": record.lora_rank > 0,
            "corrupted": False,
            "lora_rank": record.lora_rank or None,
            "last_request_time": _iso(record.last_request_time),
            "last_checkpoint": last("training"),
            "last_sampler_checkpoint": last("sampler"),
            "user_metadata": record.user_metadata,
        }
