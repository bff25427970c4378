"""Weight sync to a separate sampler: versioned safetensors directories and the canary.

The trainer publishes the weights of version k (the policy after k rounds of updates) as one
directory, written atomically; a sampler anywhere that can read the file system (another process,
a vLLM server, another node on a shared file system) loads it with `WeightReceiver.load`, which
checks it before and after `Sampler.load_weights`:

    root/v_00000007/model.safetensors  every tensor by the trainer's state-dict name (tied
                                       tensors stored once per name: no shared storage)
    root/v_00000007/manifest.json      {"version": 7, "tensors": {name: [dtype, shape]},
                                        "fingerprint": float, "probe": null | {"sequences",
                                        "logprobs", "temperature"}}
    root/LATEST                        "v_00000007\n", replaced atomically after the rename

Publishing writes `.tmp-v_00000007/`, fsyncs both files and the directory, renames it, fsyncs
the root, then replaces `LATEST`: a reader sees a whole version or none. Older versions beyond
`keep_last` are renamed away and deleted.

The receiver raises `WeightSyncError`, leaving the sampler as it was, when the version is not
newer than the one it holds (stale), when the file lacks a tensor the manifest lists (skipped)
or holds one it does not, when a tensor's dtype or shape differs from the manifest, or when the
sampler's model has names the file lacks. After loading, the canary: the sampler's
`fingerprint()` must equal the manifest's (`weight_fingerprint` of what the trainer published:
an exact copy gives the same float64 sum), and with a probe, `compute_logprobs` of the probe
sequences must be within `threshold` of the trainer's logprobs (max |Δ|; 0.0 on CPU with the same
model code). A failed canary after the load raises too (the sampler then holds the bad weights).

Under torchrun the caller gathers the full weights first (`cispo.distributed.full_state_dict`,
a collective on every rank) and every rank calls `publish_weights`; rank 0 writes.

In memory, for a sampler that is a rank of the trainer's process group: `broadcast_weights`
sends rank 0's weights to every rank (one `torch.distributed.broadcast` per tensor, in the
manifest's order, after the manifest itself), and `BroadcastReceiver` loads them with the same
checks (stale, skipped, fingerprint). Every rank calls both, so they raise on every rank alike.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
import torch.distributed as dist
from torch import Tensor

from cispo import distributed
from cispo.engine.sampler import Sampler, weight_fingerprint

__all__ = [
    "BroadcastReceiver",
    "Probe",
    "Published",
    "WeightReceiver",
    "WeightSyncError",
    "broadcast_weights",
    "latest_published",
    "publish_weights",
    "read_published",
    "version_dir",
]

_LATEST = "LATEST"
_MANIFEST = "manifest.json"
_WEIGHTS = "model.safetensors"
_PREFIX = "v_"


class WeightSyncError(RuntimeError):
    """The sampler's weights are not (or would not be) the trainer's: a stale or incomplete
    version, or the canary fired."""


@dataclass(frozen=True)
class Probe:
    """The canary's probe: sequences [N][T_i] and the trainer's logprobs of tokens 1..T_i - 1
    ([N][T_i - 1], `Sampler.compute_logprobs`'s layout) at `temperature`."""

    sequences: list[list[int]]
    logprobs: list[list[float]]
    temperature: float = 1.0


@dataclass(frozen=True)
class Published:
    """One published version, read back and checked against its manifest."""

    path: Path
    version: int
    weights: dict[str, Tensor]
    fingerprint: float
    probe: Probe | None


def version_dir(root: Path, version: int) -> Path:
    """`root/v_NNNNNNNN` (zero-padded, so names sort by version)."""
    if version < 0:
        raise ValueError(f"version must be >= 0, got {version}")
    return Path(root) / f"{_PREFIX}{version:08d}"


def _versions(root: Path) -> list[tuple[int, Path]]:
    out = []
    if root.is_dir():
        for entry in root.iterdir():
            name = entry.name
            if name.startswith(_PREFIX) and name[len(_PREFIX) :].isdigit() and entry.is_dir():
                out.append((int(name[len(_PREFIX) :]), entry))
    return sorted(out)


def latest_published(root: Path) -> Path | None:
    """The directory `root/LATEST` names, None before the first publish."""
    pointer = Path(root) / _LATEST
    if not pointer.is_file():
        return None
    return Path(root) / pointer.read_text().strip()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish_weights(
    root: Path,
    version: int,
    weights: Mapping[str, Tensor],
    *,
    probe: Probe | None = None,
    keep_last: int = 2,
    durable: bool = True,
) -> Path:
    """Publish `weights` (full, unsharded tensors by state-dict name) as `version` under `root`.

    Every rank calls it under torchrun (rank 0 writes; a barrier at the end). `version` must be
    newer than every version already published there (WeightSyncError otherwise: a trainer that
    went back in time would feed the sampler old weights under a new number). `keep_last` >= 1
    versions are kept. `durable=False` skips the fsyncs: readers on the same machine still see a
    whole version or none (the rename), a machine crash may lose it (the async worker's channel,
    whose versions live only as long as the run).
    """
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    root = Path(root)
    final = version_dir(root, version)
    problem = None
    if distributed.current_rank() == 0:
        newest = _versions(root)[-1][0] if _versions(root) else None
        if newest is not None and version <= newest:
            problem = (
                f"publishing version {version} under {str(root)!r}, which already holds version "
                f"{newest}: versions must increase"
            )
    problem = distributed.broadcast_object(problem)
    if problem is not None:
        raise WeightSyncError(problem)
    if distributed.current_rank() == 0:
        tensors = {name: t.detach().to("cpu").contiguous().clone() for name, t in weights.items()}
        manifest: dict[str, Any] = {
            "version": version,
            "tensors": {
                n: [str(t.dtype).removeprefix("torch."), list(t.shape)] for n, t in tensors.items()
            },
            "fingerprint": weight_fingerprint(tensors),
            "probe": None
            if probe is None
            else {
                "sequences": probe.sequences,
                "logprobs": probe.logprobs,
                "temperature": probe.temperature,
            },
        }
        root.mkdir(parents=True, exist_ok=True)
        tmp = root / f".tmp-{final.name}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        safetensors.torch.save_file(tensors, str(tmp / _WEIGHTS), metadata={"format": "pt"})
        (tmp / _MANIFEST).write_text(json.dumps(manifest))
        if durable:
            for name in (_WEIGHTS, _MANIFEST):
                _fsync(tmp / name)
            _fsync(tmp)
        os.rename(tmp, final)
        if durable:
            _fsync(root)
        pointer = root / f".tmp-{_LATEST}"
        pointer.write_text(final.name + "\n")
        if durable:
            _fsync(pointer)
        os.replace(pointer, root / _LATEST)
        for _, old in _versions(root)[:-keep_last]:
            trash = old.with_name(f".trash-{old.name}")
            os.rename(old, trash)
            shutil.rmtree(trash, ignore_errors=True)
    distributed.barrier()
    return final


def read_published(path: Path) -> Published:
    """Read one version directory and check the file against its manifest (WeightSyncError on a
    missing, extra, or differently shaped or typed tensor)."""
    path = Path(path)
    manifest_file, weights_file = path / _MANIFEST, path / _WEIGHTS
    if not manifest_file.is_file() or not weights_file.is_file():
        raise WeightSyncError(
            f"{str(path)!r} is not a published version (no {_MANIFEST}/{_WEIGHTS})"
        )
    manifest = json.loads(manifest_file.read_text())
    weights = safetensors.torch.load_file(str(weights_file))
    listed: dict[str, list[Any]] = manifest["tensors"]
    missing, extra = sorted(listed.keys() - weights.keys()), sorted(weights.keys() - listed.keys())
    if missing or extra:
        raise WeightSyncError(
            f"version {manifest['version']} at {str(path)!r}: tensors listed in the manifest but "
            f"missing from {_WEIGHTS}: {missing[:5]}; present but not listed: {extra[:5]}"
        )
    for name, (dtype, shape) in listed.items():
        got = weights[name]
        if str(got.dtype).removeprefix("torch.") != dtype or list(got.shape) != shape:
            raise WeightSyncError(
                f"version {manifest['version']}: tensor {name!r} is {got.dtype} {list(got.shape)}, "
                f"the manifest says {dtype} {shape}"
            )
    raw = manifest.get("probe")
    probe = None if raw is None else Probe(raw["sequences"], raw["logprobs"], raw["temperature"])
    # Fingerprint in the manifest's (the trainer's state-dict) order, as the sampler sums it.
    ordered = {name: weights[name] for name in listed}
    return Published(path, int(manifest["version"]), ordered, float(manifest["fingerprint"]), probe)


def _max_abs_diff(a: list[list[float]], b: list[list[float]]) -> float:
    if len(a) != len(b) or any(len(x) != len(y) for x, y in zip(a, b, strict=True)):
        return float("inf")
    diffs = [abs(p - q) for x, y in zip(a, b, strict=True) for p, q in zip(x, y, strict=True)]
    return max(diffs, default=0.0) if all(d == d for d in diffs) else float("nan")


class WeightReceiver:
    """The sampler side: loads published versions into `sampler` and runs the canary on each.

    `threshold`: the largest probe |sampler − trainer| logprob difference accepted (0 on CPU
    with the same model code; a vLLM sampler in bf16 needs more). `check_fingerprint=False`
    leaves the fingerprint comparison to the caller (the async worker reports its fingerprint to
    the trainer's `SyncCanary` instead)."""

    def __init__(
        self, sampler: Sampler, *, threshold: float = 1e-4, check_fingerprint: bool = True
    ) -> None:
        if not threshold >= 0:
            raise ValueError(f"threshold must be >= 0, got {threshold}")
        self.sampler = sampler
        self.threshold = threshold
        self.check_fingerprint = check_fingerprint
        self.loaded: int | None = None
        """The version loaded last (None before the first load)."""

    def load(self, path: Path) -> dict[str, float]:
        """Load the version at `path` and check it; returns the canary's metrics."""
        t = time.perf_counter()
        published = read_published(path)
        if self.loaded is not None and published.version <= self.loaded:
            raise WeightSyncError(
                f"stale weights: version {published.version} at {str(path)!r} is not newer than "
                f"version {self.loaded}, which the sampler already holds"
            )
        try:
            self.sampler.load_weights(published.weights, published.version)
        except ValueError as error:  # names or shapes that do not fit the sampler's model
            raise WeightSyncError(f"version {published.version}: {error}") from error
        self.loaded = published.version
        seconds = time.perf_counter() - t
        fingerprint = (
            self.sampler.fingerprint() if self.check_fingerprint else published.fingerprint
        )
        if fingerprint != published.fingerprint:
            raise WeightSyncError(
                f"canary: after loading version {published.version} the sampler's weight "
                f"fingerprint is {fingerprint!r}, the trainer published {published.fingerprint!r}"
            )
        metrics = {"weight_sync/version": float(published.version), "time/weight_load": seconds}
        if published.probe is not None:
            probe = published.probe
            mine = self.sampler.compute_logprobs(probe.sequences, temperature=probe.temperature)
            diff = _max_abs_diff(mine, probe.logprobs)
            if not diff <= self.threshold:
                raise WeightSyncError(
                    f"canary: version {published.version}'s probe logprobs differ from the "
                    f"trainer's by {diff:g} (threshold {self.threshold:g})"
                )
            metrics["canary/max_abs_logprob_diff"] = diff
        return metrics


def broadcast_weights(
    weights: Mapping[str, Tensor] | None,
    version: int,
    template: Mapping[str, Tensor],
) -> tuple[int, dict[str, Tensor], float]:
    """Every rank: (version, rank 0's `weights`, their fingerprint), through torch.distributed.

    Rank 0 passes its full weights and `version` (the others' `weights` and `version` are
    ignored); every rank passes `template`, tensors by name giving the shapes and dtypes it will
    receive (its sampler's state dict). Rank 0 broadcasts a manifest first; if any rank's template
    lacks a name, has another or differs in shape or dtype, every rank raises `WeightSyncError`
    before a tensor moves. Without a process group: `weights` itself.
    """
    rank = distributed.current_rank()
    manifest: dict[str, Any] | None = None
    if rank == 0:
        if weights is None:
            raise ValueError("broadcast_weights: rank 0 must pass the weights")
        manifest = {
            "version": version,
            "fingerprint": weight_fingerprint(weights),
            "tensors": {n: (str(t.dtype), tuple(t.shape)) for n, t in weights.items()},
        }
    manifest = distributed.broadcast_object(manifest)
    assert manifest is not None
    listed: dict[str, tuple[str, tuple[int, ...]]] = manifest["tensors"]
    missing, extra = (
        sorted(template.keys() - listed.keys()),
        sorted(listed.keys() - template.keys()),
    )
    wrong = [
        n
        for n in listed.keys() & template.keys()
        if (str(template[n].dtype), tuple(template[n].shape)) != listed[n]
    ]
    problem = (
        f"rank {rank}: version {manifest['version']} lacks {missing[:3]}, has unexpected "
        f"{extra[:3]}, differs in shape or dtype for {sorted(wrong)[:3]}"
        if missing or extra or wrong
        else None
    )
    problems = [p for p in distributed.gather_objects(problem) if p is not None]
    if problems:
        raise WeightSyncError("broadcast weights do not fit: " + "; ".join(problems))
    out: dict[str, Tensor] = {}
    for name, (_, shape) in listed.items():
        if rank == 0:
            assert weights is not None
            buffer = weights[name].detach().to("cpu").contiguous().clone()
        else:
            buffer = torch.empty(shape, dtype=template[name].dtype)
        if distributed.active():
            dist.broadcast(buffer, src=0)
        out[name] = buffer
    return int(manifest["version"]), out, float(manifest["fingerprint"])


class BroadcastReceiver:
    """`WeightReceiver`'s checks for weights that arrive by `broadcast_weights`: every rank calls
    `receive` at the same point; rank 0 sends, the others load into `sampler` (rank 0 may pass
    None: it has nothing to load)."""

    def __init__(self, sampler: Sampler | None) -> None:
        self.sampler = sampler
        self.loaded: int | None = None

    def receive(
        self, weights: Mapping[str, Tensor] | None, version: int, template: Mapping[str, Tensor]
    ) -> dict[str, float]:
        received, tensors, fingerprint = broadcast_weights(weights, version, template)
        stale = self.loaded is not None and received <= self.loaded
        problem = (
            f"stale weights: version {received} after version {self.loaded}" if stale else None
        )
        problems = [p for p in distributed.gather_objects(problem) if p is not None]
        if problems:
            raise WeightSyncError(problems[0])
        self.loaded = received
        problem = None
        if self.sampler is not None:
            self.sampler.load_weights(tensors, received)
            mine = self.sampler.fingerprint()
            if mine != fingerprint:
                problem = (
                    f"canary: after receiving version {received} the weight fingerprint of rank "
                    f"{distributed.current_rank()}'s sampler is {mine!r}, the sender's "
                    f"{fingerprint!r}"
                )
        problems = [p for p in distributed.gather_objects(problem) if p is not None]
        if problems:  # on every rank, so that none waits in a later collective
            raise WeightSyncError("; ".join(problems))
        return {"weight_sync/version": float(received)}
