"""Checkpoints resume exactly, prune, keep tied weights, and survive a SIGKILL mid-write.

Everything goes through the API the engine, the client, the server and the RL loop use:
`save_named_state`, `load_checkpoint`, `latest_named_state`."""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import safetensors
import torch
from torch import nn

import cispo.checkpoint as checkpoint_module
from cispo.checkpoint import Checkpoint, latest_named_state, load_checkpoint, save_named_state


class TinyLM(nn.Module):
    """Embedding + dropout + lm_head tied to the embedding (like small Llama/Qwen2 configs)."""

    def __init__(self, vocab: int = 11, dim: int = 8) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.hidden = nn.Linear(dim, dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        self.lm_head.weight = self.embed.weight

    def forward(self, tokens: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        hidden = torch.tanh(self.hidden(self.embed(tokens))) * keep / 0.75  # dropout p=0.25
        logits: torch.Tensor = self.lm_head(hidden)
        return logits


def _train_step(model: TinyLM, opt: torch.optim.Optimizer, rng: torch.Generator) -> None:
    # Data and dropout masks both come from `rng`, so an exact resume also needs its state.
    tokens = torch.randint(0, 11, (4, 5), generator=rng)
    keep = (torch.rand(4, 4, 8, generator=rng) > 0.25).float()
    logits = model(tokens[:, :-1], keep)
    loss = nn.functional.cross_entropy(logits.reshape(-1, 11), tokens[:, 1:].reshape(-1))
    opt.zero_grad()
    loss.backward()  # type: ignore[no-untyped-call]
    opt.step()


def _make(seed: int = 0) -> tuple[TinyLM, torch.optim.AdamW]:
    torch.manual_seed(seed)
    model = TinyLM()
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)


def _latest(root: Path) -> Checkpoint | None:
    path = latest_named_state(root)
    return None if path is None else load_checkpoint(path)


def test_resume_from_checkpoint_is_bitwise_identical_to_uninterrupted_training(
    tmp_path: Path,
) -> None:
    model, opt = _make()
    rng = torch.Generator().manual_seed(123)
    for _ in range(6):
        _train_step(model, opt, rng)
    expected = {k: v.clone() for k, v in model.state_dict().items()}

    model, opt = _make()
    rng = torch.Generator().manual_seed(123)
    for _ in range(3):
        _train_step(model, opt, rng)
    save_named_state(
        tmp_path,
        "step_000003",
        model_state=model.state_dict(),
        optimizer_state=opt.state_dict(),
        rng_state={"data": rng.get_state()},
        trainer_state={"data_position": 12},
    )
    saved_opt = opt.state_dict()
    del model, opt
    rng.manual_seed(999)  # perturb the RNG; the checkpoint must put it back

    ckpt = _latest(tmp_path)
    assert ckpt is not None and ckpt.step == 3 and ckpt.trainer_state == {"data_position": 12}
    model, opt = _make(seed=7)  # different init; everything must come from the checkpoint
    model.load_state_dict(ckpt.model_state)
    opt.load_state_dict(ckpt.optimizer_state)
    rng.set_state(ckpt.rng_state["data"])
    # The optimizer state round-trips bitwise (moments and step counts).
    for pid, st in saved_opt["state"].items():
        for key, value in st.items():
            assert torch.equal(ckpt.optimizer_state["state"][pid][key], value), (pid, key)
    for _ in range(3):
        _train_step(model, opt, rng)
    for name, value in model.state_dict().items():
        assert torch.equal(value, expected[name]), name


def test_tied_weights_are_stored_once_and_restored_as_one_tensor(tmp_path: Path) -> None:
    model, _ = _make()
    state = model.state_dict()
    assert state["embed.weight"].data_ptr() == state["lm_head.weight"].data_ptr()
    path = save_named_state(
        tmp_path, "a", model_state=state, optimizer_state={}, rng_state={}, trainer_state={}
    )
    with safetensors.safe_open(str(path / "model.safetensors"), framework="pt") as f:
        stored = set(f.keys())
    assert len(stored) == len(state) - 1  # one of the two tied names is an alias
    loaded = load_checkpoint(path).model_state
    assert set(loaded) == set(state)
    assert loaded["embed.weight"] is loaded["lm_head.weight"]
    for name, value in state.items():
        assert torch.equal(loaded[name], value), name
    fresh, _ = _make(seed=5)
    fresh.load_state_dict(loaded)
    assert fresh.lm_head.weight is fresh.embed.weight  # still tied after loading


def test_overlapping_views_are_saved_as_copies(tmp_path: Path) -> None:
    base = torch.arange(12.0)
    state = {"whole": base, "head": base[:4], "strided": base[::3]}
    path = save_named_state(
        tmp_path, "a", model_state=state, optimizer_state={}, rng_state={}, trainer_state={}
    )
    loaded = load_checkpoint(path).model_state
    for name, value in state.items():
        assert torch.equal(loaded[name], value), name


def test_a_generator_state_survives_a_checkpoint(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(5)
    torch.rand(3, generator=gen)  # not at its seed's start
    path = save_named_state(
        tmp_path,
        "a",
        model_state={},
        optimizer_state={},
        rng_state={"sample_generator": gen.get_state()},
        trainer_state={},
    )
    expected = torch.rand(4, generator=gen)
    assert not torch.equal(torch.rand(4, generator=gen), expected)  # the stream really moves
    gen.set_state(load_checkpoint(path).rng_state["sample_generator"])
    assert torch.equal(torch.rand(4, generator=gen), expected)


def _save_step(root: Path, step: int, keep_last: int | None = 3) -> Path:
    return save_named_state(
        root,
        f"step_{step:06d}",
        model_state={"w": torch.full((3,), float(step))},
        optimizer_state={"step": step},
        rng_state={},
        trainer_state={"step": step},
        keep_last=keep_last,
    )


def test_keep_last_prunes_older_checkpoints_after_writing(tmp_path: Path) -> None:
    for step in range(1, 6):
        _save_step(tmp_path, step, keep_last=2)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["latest", "step_000004", "step_000005"]
    assert (tmp_path / "latest").read_text() == "step_000005\n"
    _save_step(tmp_path, 6, keep_last=None)
    assert latest_named_state(tmp_path) == tmp_path / "step_000006"
    assert len(list(tmp_path.glob("step_*"))) == 3


def test_resaving_an_earlier_step_points_latest_at_it_and_keeps_it(tmp_path: Path) -> None:
    for step in (1, 2, 3):
        _save_step(tmp_path, step, keep_last=1)
    _save_step(tmp_path, 2, keep_last=1)  # resumed from an older checkpoint, saved again
    ckpt = _latest(tmp_path)
    assert ckpt is not None and ckpt.step == 2
    assert torch.equal(ckpt.model_state["w"], torch.full((3,), 2.0))


def test_named_states_prune_only_step_names_and_track_latest(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(3)
    root = tmp_path / "checkpoints" / "policy"

    def save(name: str, step: int | None) -> Path:
        meta = {} if step is None else {"step": step}
        return save_named_state(
            root,
            name,
            model_state={"w": torch.zeros(2)},
            optimizer_state={},
            rng_state={"sample_generator": gen.get_state()},
            trainer_state=meta,
            keep_last=2,
        )

    for step in (0, 25, 50):
        save(f"step_{step:06d}", step)
    save("sampler_weights", None)  # a non-step name: never pruned, never prunes
    assert latest_named_state(root) == root / "sampler_weights"
    save("step_000075", 75)
    names = sorted(p.name for p in root.iterdir())
    assert names == ["latest", "sampler_weights", "step_000050", "step_000075"]
    ckpt = load_checkpoint(root / "step_000075")
    assert ckpt.step == 75 and ckpt.trainer_state == {"step": 75}
    assert load_checkpoint(root / "sampler_weights").step == 0
    assert torch.equal(ckpt.rng_state["sample_generator"], gen.get_state())
    with pytest.raises(ValueError, match="bad checkpoint name"):
        save("../escape", 1)


def test_no_checkpoint_gives_none(tmp_path: Path) -> None:
    assert latest_named_state(tmp_path / "missing") is None
    assert latest_named_state(tmp_path) is None


def test_non_json_trainer_state_fails_before_touching_disk(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    with pytest.raises(TypeError):
        save_named_state(
            root,
            "step_000001",
            model_state={},
            optimizer_state={},
            rng_state={},
            trainer_state={"bad": object()},
        )
    assert not root.exists()


def test_stale_temp_dir_is_ignored_and_cleaned_next_save(tmp_path: Path) -> None:
    _save_step(tmp_path, 1)
    stale = tmp_path / ".tmp-step_000002-abc"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half a file")
    ckpt = _latest(tmp_path)
    assert ckpt is not None and ckpt.step == 1
    _save_step(tmp_path, 2)
    assert not stale.exists()
    assert [p.name for p in tmp_path.glob(".*")] == []


def test_crash_before_rename_leaves_previous_checkpoint_latest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _save_step(tmp_path, 1)

    def crash(src: object, dst: object) -> None:
        raise KeyboardInterrupt  # stands in for the process dying between write and rename

    monkeypatch.setattr(os, "rename", crash)
    with pytest.raises(KeyboardInterrupt):
        _save_step(tmp_path, 2)
    monkeypatch.undo()
    ckpt = _latest(tmp_path)
    assert ckpt is not None and ckpt.step == 1
    assert not (tmp_path / "step_000002").exists()


def test_latest_falls_back_to_newest_complete_dir_when_pointer_is_stale(tmp_path: Path) -> None:
    _save_step(tmp_path, 1)
    _save_step(tmp_path, 2)
    (tmp_path / "latest").write_text("step_000009\n")  # points at nothing
    ckpt = _latest(tmp_path)
    assert ckpt is not None and ckpt.step == 2


WRITER = textwrap.dedent(
    """
    import sys, torch
    from cispo.checkpoint import save_named_state
    root = sys.argv[1]
    step = 0
    while True:
        step += 1
        # ~2 MB per checkpoint so the kill often lands inside a write.
        save_named_state(
            root, f"step_{step:06d}",
            model_state={"w": torch.full((512, 1024), float(step))},
            optimizer_state={"state": {0: {"exp_avg": torch.full((4,), float(step))}}},
            rng_state={"torch": torch.get_rng_state()},
            trainer_state={"step": step},
            keep_last=2,
        )
    """
)


def test_sigkill_while_writing_leaves_a_complete_latest_checkpoint(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path)], env=env)
    try:
        pointer = tmp_path / "latest"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if pointer.exists() and pointer.read_text().strip() >= "step_000003":
                break
            assert proc.poll() is None, "writer died on its own"
            time.sleep(0.005)
        else:
            pytest.fail("writer made no progress")
        time.sleep(random.Random(0).uniform(0.0, 0.02))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL

    ckpt = _latest(tmp_path)
    assert ckpt is not None and ckpt.step >= 3
    # Every piece belongs to the same step: nothing half-written is visible.
    assert torch.equal(ckpt.model_state["w"], torch.full((512, 1024), float(ckpt.step)))
    exp_avg = ckpt.optimizer_state["state"][0]["exp_avg"]
    assert torch.equal(exp_avg, torch.full((4,), float(ckpt.step)))
    assert ckpt.trainer_state == {"step": ckpt.step}
    # So is every visible step directory, not just the latest.
    for path in tmp_path.glob("step_*"):
        other = load_checkpoint(path)
        assert json.loads((path / "state.json").read_text())["step"] == other.step
        assert torch.equal(other.model_state["w"], torch.full((512, 1024), float(other.step)))
    # The next save cleans whatever the kill left behind.
    _save_step(tmp_path, ckpt.step + 1)
    assert [p.name for p in tmp_path.glob(".*")] == []


KILLED_OVERWRITE = textwrap.dedent(
    """
    import os, signal, sys, torch
    import cispo.checkpoint as ck
    root, mode = sys.argv[1], sys.argv[2]

    def save(value):
        ck.save_named_state(root, "best", model_state={"w": torch.full((4,), value)},
                            optimizer_state={}, rng_state={}, trainer_state={})

    save(1.0)
    if mode == "aside":  # the portable path: die right after the old one went aside
        ck._exchange = lambda a, b: False
        real_rename = os.rename

        def rename(src, dst):
            real_rename(src, dst)
            if os.path.basename(src) == "best":
                os.kill(os.getpid(), signal.SIGKILL)

        os.rename = rename
    else:  # the atomic exchange: die before the old copy is deleted
        real_exchange = ck._exchange

        def exchange(a, b):
            assert real_exchange(a, b), "renameat2 exchange unsupported"
            os.kill(os.getpid(), signal.SIGKILL)

        ck._exchange = exchange
    save(2.0)
    """
)


def _best(root: Path) -> float:
    path = latest_named_state(root)
    assert path is not None and path.name == "best"
    return float(load_checkpoint(path).model_state["w"][0])


@pytest.mark.parametrize("mode", ["exchange", "aside"])
def test_a_sigkill_while_overwriting_a_name_never_loses_it(tmp_path: Path, mode: str) -> None:
    """Overwriting `best` and dying mid-way leaves `best` (old or new) complete and `latest`
    pointing at it, also after the next save (which used to delete both hidden copies)."""
    if mode == "exchange":
        a, b = tmp_path / "a", tmp_path / "b"
        a.mkdir(), b.mkdir()
        if not checkpoint_module._exchange(a, b):
            pytest.skip("no renameat2 RENAME_EXCHANGE here")
    root = tmp_path / "states"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", KILLED_OVERWRITE, str(root), mode], env=env, timeout=120
    )
    assert done.returncode == -signal.SIGKILL
    if mode == "exchange":
        assert _best(root) == 2.0  # the name was never absent
    else:
        assert not (root / "best").exists() and (root / ".prev-best").is_dir()
        checkpoint_module.recover(root)  # what the next save and a server start-up run
        assert _best(root) == 1.0
    save_named_state(
        root, "other", model_state={}, optimizer_state={}, rng_state={}, trainer_state={}
    )
    assert float(load_checkpoint(root / "best").model_state["w"][0]) in (1.0, 2.0)
    assert sorted(p.name for p in root.iterdir()) == ["best", "latest", "other"]


def test_identical_saves_write_byte_identical_files(tmp_path: Path) -> None:
    """sha256 of every file of six saves of the same state: one digest per file. safetensors
    writes its header metadata in HashMap order, which varied between saves before sorting."""
    model, opt = _make(seed=3)
    _train_step(model, opt, torch.Generator().manual_seed(3))
    digests: dict[str, set[str]] = {}
    for i in range(6):
        path = save_named_state(
            tmp_path / f"root{i}",
            "same",
            model_state=model.state_dict(),
            optimizer_state=opt.state_dict(),
            rng_state={"torch": torch.get_rng_state()},
            trainer_state={"step": 1},
        )
        for file in sorted(path.iterdir()):
            digest = hashlib.sha256(file.read_bytes()).hexdigest()
            digests.setdefault(file.name, set()).add(digest)
    assert sorted(digests) == ["model.safetensors", "optimizer.pt", "rng.pt", "state.json"]
    assert all(len(d) == 1 for d in digests.values()), digests
    raw = (path / "model.safetensors").read_bytes()
    header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])
    assert list(header["__metadata__"]) == sorted(header["__metadata__"])
