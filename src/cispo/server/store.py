"""Where `tinker://` paths live on disk, and the training-run records that survive a restart.

    <root>/runs/<run>/run.json                     run record (base model, LoRA, checkpoints)
    <root>/runs/<run>/weights/<name>/              save_weights: model + optimizer + sampler RNG
    <root>/runs/<run>/sampler_weights/<name>/      save_weights_for_sampler: model only

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
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from cispo.checkpoint import is_complete, recover
from cispo.server.futures import UserError
from cispo.train.engine import load_engine_state, save_engine_state

SCHEME = "tinker://"
KINDS = {"weights": "training", "sampler_weights": "sampler"}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_RESERVED = frozenset({"latest"})  # `cispo.checkpoint`'s pointer file beside the checkpoints
_LEGACY_FILE = "state.pt"


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


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, tz=timezone.utc).isoformat()


class Store:
    def __init__(self, root: Path) -> None:
        self.root = root
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
        self, run_id: str, kind: str, name: str, state: dict[str, Any], *, overwrite: bool = True
    ) -> str:
        """Write `state` under `tinker://run_id/kind/name` atomically; returns the path."""
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
        entry = {
            "checkpoint_id": f"{kind}/{name}",
            "checkpoint_type": KINDS[kind],
            "time": _iso(time.time()),
            "tinker_path": path,
            "size_bytes": sum(f.stat().st_size for f in final.iterdir() if f.is_file()),
        }
        with self._lock:
            record.checkpoints = [c for c in record.checkpoints if c["tinker_path"] != path]
            record.checkpoints.append(entry)
            self._write_record(record)
        return path

    def resolve(self, path: str) -> tuple[RunRecord, str, Path]:
        """`tinker://run/kind/name` -> (run record, kind, checkpoint directory); UserError if
        unknown or incomplete."""
        if not path.startswith(SCHEME):
            raise UserError(f"path must look like tinker://<run>/weights/<name>, got {path!r}")
        parts = path[len(SCHEME) :].split("/")
        if len(parts) != 3 or parts[1] not in KINDS or not _NAME.match(parts[2]):
            raise UserError(f"path must look like tinker://<run>/weights/<name>, got {path!r}")
        run_id, kind, name = parts
        record = self.runs.get(run_id)
        if record is None:
            raise UserError(f"unknown training run {run_id!r} in {path!r}")
        directory = self.runs_dir / self._dir_name(run_id) / kind / name
        if not (directory / _LEGACY_FILE).is_file() and not is_complete(directory):
            raise UserError(f"no checkpoint at {path!r}")
        return record, kind, directory

    def load(self, path: str) -> tuple[RunRecord, dict[str, Any]]:
        """The run record and {"model", "optimizer" (None for sampler weights), "version",
        ["sample_generator"]} of a checkpoint."""
        record, _, directory = self.resolve(path)
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
            "model_owner": "local",
            "is_lora": record.lora_rank > 0,
            "corrupted": False,
            "lora_rank": record.lora_rank or None,
            "last_request_time": _iso(record.last_request_time),
            "last_checkpoint": last("training"),
            "last_sampler_checkpoint": last("sampler"),
            "user_metadata": record.user_metadata,
        }
