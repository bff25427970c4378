"""Claims about the process-group helpers without a process group (no launch)."""

from __future__ import annotations

import pytest
import torch

import cispo.distributed as d
from cispo.engine import Engine, EngineConfig
from tests.distributed.common import random_datums, tiny_engine


@pytest.mark.parametrize(("count", "world"), [(7, 2), (8, 2), (5, 3), (3, 3), (10, 4)])
def test_rank_shares_are_contiguous_balanced_and_cover_the_items_in_order(
    count: int, world: int
) -> None:
    items = list(range(count))
    shares = [d.rank_share(items, rank=r, world_size=world) for r in range(world)]
    assert [x for share in shares for x in share] == items
    sizes = [len(s) for s in shares]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


def test_fewer_items_than_ranks_is_refused_with_the_counts() -> None:
    with pytest.raises(ValueError, match=r"2 items .* world_size=3"):
        d.rank_share([1, 2], rank=0, world_size=3)
    with pytest.raises(ValueError, match=r"rank=3 must be in \[0, world_size=3\)"):
        d.share_bounds(5, 3, 3)


def test_world_size_one_creates_no_process_group_and_collectives_are_identities(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    info = d.init_from_env()
    assert (info.world_size, info.backend, info.device) == (1, None, torch.device("cpu"))
    assert not d.active() and d.current_world_size() == 1 and d.current_rank() == 0
    assert d.all_reduce_totals(5.0, 2.0, 3) == (5.0, 2.0, 3)
    assert d.gather_objects({"a": 1}) == [{"a": 1}]
    assert d.rank_share([1, 2, 3]) == [1, 2, 3]


def test_bad_launch_environment_is_refused_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="WORLD_SIZE='two'"):
        d.init_from_env()
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(ValueError, match=r"RANK=2 must be in \[0, WORLD_SIZE=2\)"):
        d.init_from_env()
    with pytest.raises(ValueError, match="backend must be"):
        d.init_from_env("mpi")


def test_an_engine_without_a_process_group_is_not_sharded_and_refuses_bf16() -> None:
    engine = tiny_engine("llama")
    assert engine._sharded is None
    assert not any(type(p).__name__ == "DTensor" for p in engine.model.parameters())
    engine.forward_backward(random_datums(3, seed=0), "cispo", {"reduction": "token_mean"})
    with pytest.raises(ValueError, match=r"bf16=True needs a process group"):
        Engine(engine.model, eos_token_id=None, pad_token_id=0, config=EngineConfig(bf16=True))
