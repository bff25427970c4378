"""Claims about giving freed heap memory back to the OS (`cispo.engine.heap`, `trim_heap`)."""

from __future__ import annotations

import ctypes
import os
from typing import Any

import pytest
import torch

from cispo.config import MMAP_THRESHOLD_MAX
from cispo.datums import rl_datum
from cispo.engine import engine as engine_module
from cispo.engine import heap
from cispo.engine.engine import Engine, EngineConfig
from cispo.models import load_bundle
from cispo.types import AdamParams, SamplingParams
from tests.train.helpers import random_datums, tiny_engine

CISPO = {"reduction": "token_mean", "anchor": "old"}
GLIBC = bool(getattr(os, "confstr", lambda _: None)("CS_GNU_LIBC_VERSION"))


class _NoSymbols:
    """A C library without malloc_trim / mallopt (macOS, musl)."""

    def __getattr__(self, name: str) -> Any:
        raise AttributeError(name)


def test_heap_helpers_are_no_ops_where_the_c_library_lacks_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(ctypes, "CDLL", lambda _: _NoSymbols())
    assert heap.trim_heap() is False
    assert heap.set_mmap_threshold(128 * 1024) is False


def test_heap_helpers_are_no_ops_off_glibc(monkeypatch: pytest.MonkeyPatch) -> None:
    def not_glibc(name: str) -> str:
        raise ValueError(f"unrecognized configuration name {name!r}")  # what macOS raises

    def must_not_load(_: object) -> Any:
        raise AssertionError("loaded a C library off glibc")

    monkeypatch.setattr(os, "confstr", not_glibc)
    monkeypatch.setattr(ctypes, "CDLL", must_not_load)
    assert heap.trim_heap() is False
    assert heap.set_mmap_threshold(128 * 1024) is False


@pytest.mark.skipif(not GLIBC, reason="glibc only")
def test_trim_heap_runs_on_glibc() -> None:
    assert heap.trim_heap() is True


@pytest.mark.parametrize("bad", [-1, heap.MMAP_THRESHOLD_MAX + 1])
def test_a_bad_mmap_threshold_is_refused_naming_the_field(bad: int) -> None:
    with pytest.raises(ValueError, match=rf"mmap_threshold .*0\.\.33554432.*got {bad}"):
        EngineConfig(mmap_threshold=bad)
    with pytest.raises(ValueError, match=rf"mmap threshold .*got {bad}"):
        heap.set_mmap_threshold(bad)


@pytest.mark.parametrize("trim", [True, False])
def test_the_engine_trims_the_heap_after_each_call_unless_told_not_to(
    monkeypatch: pytest.MonkeyPatch, trim: bool
) -> None:
    calls: list[str] = []

    def counted() -> bool:
        calls.append("trim")
        return True

    monkeypatch.setattr(engine_module, "trim_heap", counted)
    engine = tiny_engine(trim_heap=trim)
    after_loading = len(calls)
    prompts = [[1, 20, 21], [1, 22]]
    groups = engine.sampler().sample(prompts, 2, SamplingParams(max_tokens=4, seed=0, stop=[]))
    after_sampling = len(calls)
    datums = [
        rl_datum(p, s.tokens, s.logprobs, 1.0, old_logprobs=s.logprobs)
        for p, g in zip(prompts, groups, strict=True)
        for s in g
    ]
    out = engine.forward_backward(datums, "cispo", CISPO)
    after_forward_backward = len(calls)
    before = [p.detach().clone() for p in engine.model.parameters()]
    engine.optim_step(AdamParams(learning_rate=1e-2))
    after_optim_step = len(calls)
    assert out.metrics["train/num_tokens"] > 0  # something was trained
    assert any(
        not torch.equal(a, p) for a, p in zip(before, engine.model.parameters(), strict=True)
    )
    with pytest.raises(ValueError):  # a failing call trims too (its partial activations)
        engine.forward_backward(datums, "no-such-loss")
    n = int(trim)  # one trim after: construction, sampling pass, forward_backward, optim_step,
    # failed call
    counts = [after_loading, after_sampling, after_forward_backward, after_optim_step, len(calls)]
    assert counts == [n, 2 * n, 3 * n, 4 * n, 5 * n]


@pytest.mark.parametrize("threshold", [128 * 1024, None])
def test_the_mmap_threshold_is_fixed_only_during_forward_backward(
    monkeypatch: pytest.MonkeyPatch, threshold: int | None
) -> None:
    calls: list[int] = []

    def recorded(nbytes: int) -> bool:
        calls.append(nbytes)
        return True

    monkeypatch.setattr(engine_module, "set_mmap_threshold", recorded)
    engine = tiny_engine(mmap_threshold=threshold)
    engine.sampler().sample([[1, 20]], 2, SamplingParams(max_tokens=3, seed=0, stop=[]))
    assert calls == []
    datums = random_datums(4)
    out = engine.forward_backward(datums, "cispo", CISPO)
    assert out.metrics["train/num_tokens"] > 0
    engine.optim_step(AdamParams(learning_rate=1e-2))
    with pytest.raises(ValueError):  # restored after a failed call too
        engine.forward_backward(datums, "no-such-loss")
    fixed = [] if threshold is None else [threshold, heap.MMAP_THRESHOLD_MAX]
    assert calls == fixed * 2


def test_the_configs_mmap_threshold_bound_is_glibcs() -> None:
    assert MMAP_THRESHOLD_MAX == heap.MMAP_THRESHOLD_MAX


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.mark.skipif(not GLIBC or not os.path.exists("/proc/self/status"), reason="glibc, Linux")
def test_resident_memory_returns_near_its_level_before_a_forward_backward() -> None:
    """A forward_backward's activations (~320 MiB of 2-8 MB tensors: 16 sequences × 128 tokens,
    hidden 256, 4 layers) are freed when it returns; with trim_heap the process's RSS comes back
    within 8 MiB of where it was, where glibc alone keeps > 128 MiB of them resident (both on
    one engine, glibc's state made what a real run's is, so the test shows what it claims). The
    8 MiB is below the 16 MiB of gradients the call moves aside and adds back: a trim before
    they are freed fails it."""
    bundle = load_bundle("tiny", overrides={"hidden_size": 256, "num_layers": 4, "num_heads": 4})
    engine = Engine(
        bundle.model,
        eos_token_id=bundle.tokenizer.eos_token_id,
        pad_token_id=bundle.tokenizer.pad_token_id,
        config=EngineConfig(micro_batch_size=16, trim_heap=False),
    )
    g = torch.Generator().manual_seed(0)
    datums = []
    for _ in range(16):
        tokens = torch.randint(4, 40, (128,), generator=g).tolist()
        lp = [-1.0] * 64
        datums.append(rl_datum(tokens[:64], tokens[64:], lp, 1.0, old_logprobs=lp))
    # Freeing a 24 MiB mapping raises glibc's dynamic mmap threshold to 24 MiB (what a real
    # run's first large frees do), so the activations below land in the heap, not in mappings.
    torch.empty(24 * 2**20, dtype=torch.uint8).fill_(1)
    engine.forward_backward(datums, "cispo", CISPO)  # the gradients stay allocated from here on

    def growth() -> float:
        heap.trim_heap()
        before = _rss_mib()
        out = engine.forward_backward(datums, "cispo", CISPO)
        assert out.metrics["train/num_tokens"] == 16 * 64  # it trained
        return _rss_mib() - before

    kept = growth()
    engine.config = EngineConfig(micro_batch_size=16, trim_heap=True)
    returned = growth()
    assert kept > 128, f"glibc alone kept only {kept:.1f} MiB: the activations are too small"
    assert returned < 8, f"{returned:.1f} MiB still resident after a trimmed forward_backward"
