"""Claims about the server's checkpoint store: the cispo.checkpoint format, names, legacy files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cispo.checkpoint import load_checkpoint
from cispo.server.futures import NotFound, UserError
from cispo.server.store import RunRecord, Store

RUN = "s:train:0"


def _store(root: Path) -> Store:
    store = Store(root)
    store.add_run(
        RunRecord(
            training_run_id=RUN,
            base_model="tiny",
            lora_rank=0,
            lora_targets=[],
            seed=0,
            model_overrides={"hidden_size": 16},
        )
    )
    return store


def test_saved_weights_round_trip_and_are_a_cispo_checkpoint(tmp_path: Path) -> None:
    store = _store(tmp_path)
    model = {"w": torch.arange(6.0).reshape(2, 3)}
    optimizer = {"state": {0: {"step": torch.tensor(2.0)}}, "param_groups": [{"lr": 0.1}]}
    generator = torch.Generator().manual_seed(5).get_state()
    state = {"model": model, "optimizer": optimizer, "version": 7, "sample_generator": generator}
    path = store.save(RUN, "weights", "a", state)
    assert path == "tinker://s:train:0/weights/a"
    _, loaded = store.load(path, "default")
    assert torch.equal(loaded["model"]["w"], model["w"]) and loaded["version"] == 7
    assert loaded["optimizer"]["param_groups"] == [{"lr": 0.1}]
    assert torch.equal(loaded["sample_generator"], generator)
    on_disk = load_checkpoint(tmp_path / "runs" / "s_train_0" / "weights" / "a")
    assert on_disk.trainer_state["base_model"] == "tiny"
    assert on_disk.trainer_state["model_overrides"] == {"hidden_size": 16}
    size = store.runs[RUN].checkpoints[-1]["size_bytes"]
    assert size == sum(f.stat().st_size for f in on_disk.path.iterdir())


def test_sampler_weights_load_with_no_optimizer(tmp_path: Path) -> None:
    store = _store(tmp_path)
    path = store.save(RUN, "sampler_weights", "s", {"model": {"w": torch.ones(2)}, "version": 1})
    _, loaded = store.load(path, "default")
    assert loaded["optimizer"] is None and "sample_generator" not in loaded


@pytest.mark.parametrize("name", ["latest", ".hidden", "a/b", ""])
def test_a_reserved_or_malformed_name_is_refused_and_writes_nothing(
    tmp_path: Path, name: str
) -> None:
    store = _store(tmp_path)
    with pytest.raises(UserError, match="checkpoint name"):
        store.save(RUN, "weights", name, {"model": {"w": torch.ones(1)}})
    assert not (tmp_path / "runs" / "s_train_0" / "weights").exists()


def test_a_checkpoint_from_the_old_single_file_format_is_still_read(tmp_path: Path) -> None:
    store = _store(tmp_path)
    legacy = tmp_path / "runs" / "s_train_0" / "weights" / "old"
    legacy.mkdir(parents=True)
    torch.save(
        {"model": {"w": torch.ones(2)}, "optimizer": None, "version": 3}, legacy / "state.pt"
    )
    _, loaded = store.load("tinker://s:train:0/weights/old", "default")
    assert loaded["version"] == 3 and torch.equal(loaded["model"]["w"], torch.ones(2))


def test_an_incomplete_checkpoint_directory_is_not_a_checkpoint(tmp_path: Path) -> None:
    store = _store(tmp_path)
    store.save(RUN, "weights", "c", {"model": {"w": torch.ones(1)}, "version": 0})
    (tmp_path / "runs" / "s_train_0" / "weights" / "c" / "optimizer.pt").unlink()
    with pytest.raises(NotFound, match="no checkpoint"):
        store.load("tinker://s:train:0/weights/c", "default")
