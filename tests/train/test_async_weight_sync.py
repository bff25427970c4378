"""The async worker's weights travel as `cispo.engine.weight_sync` version directories: a sync
that skips a tensor stops the run (the worker's `WeightReceiver` refuses it before loading), and
the directories are gone with the worker."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import pytest
import torch

from cispo.asynchronous.worker import WeightChannel, WorkerError
from cispo.train.loop import train
from tests.train.test_async import _config, _quiet


def test_a_sync_that_skips_a_tensor_stops_the_run_with_a_weight_sync_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = WeightChannel.publish
    roots: list[Path] = []

    def publish(self: WeightChannel, weights: Mapping[str, torch.Tensor], version: int) -> None:
        roots.append(self.root)
        skipped = sorted(weights)[-1] if version >= 1 else None  # version 0 whole, then not
        real(self, {k: v for k, v in weights.items() if k != skipped}, version)

    monkeypatch.setattr(WeightChannel, "publish", publish)
    with pytest.raises(WorkerError, match=r"WeightSyncError: version 1: load_weights: .*missing"):
        train(_config(tmp_path, "--rl.steps=3", "--asynchronous.enabled=true"), echo=_quiet)
    assert roots and not roots[0].exists()  # removed with the worker


def test_the_worker_reads_whole_version_directories(tmp_path: Path) -> None:
    """The trainer's side of the channel writes one directory per version, two kept."""
    channel = WeightChannel(tmp_path / "w")
    weights = {"a": torch.ones(2), "b": torch.zeros(3)}
    for version in range(3):
        channel.publish({k: v + version for k, v in weights.items()}, version)
    assert channel.published() == 2
    assert sorted(p.name for p in (tmp_path / "w").iterdir()) == [
        "LATEST",
        "v_00000001",
        "v_00000002",
    ]
