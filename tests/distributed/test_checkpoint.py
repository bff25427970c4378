"""Claims about sharded (DCP) engine checkpoints and the HF export, under 2 ranks on CPU/gloo.

One launch of `checkpoint_checks.py` runs every check; this module reads its JSON.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.distributed.common import ROOT, torchrun

SCRIPT = ROOT / "tests" / "distributed" / "checkpoint_checks.py"


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("dcp")
    done = torchrun(["--standalone", "--nproc-per-node", "2", str(SCRIPT), str(out)])
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    data: dict[str, Any] = json.loads((out / "results.json").read_text())
    return data


def test_sharded_resume_is_bitwise_identical_to_an_uninterrupted_run(
    results: dict[str, Any],
) -> None:
    assert results["moved"] > 1e-2  # 4 steps of lr 1e-2 trained the model
    assert results["fresh_engine_differed"] > 1e-2  # the engine loaded into started elsewhere
    assert results["optimizer_steps"] == 4.0 and results["optimizer_entries"] > 0
    assert results["resume_weights_bitwise"], results["resume_weight_diff"]
    assert results["resume_optimizer_bitwise"]
    assert results["version"] == 4 and results["trainer_state"] == {"version": 2, "step": 2}


def test_every_ranks_rng_is_restored_from_its_own_file(results: dict[str, Any]) -> None:
    assert results["ranks_rng_differ"]
    assert results["rng_restored_on_every_rank"]


def test_saving_over_an_existing_checkpoint_is_refused_on_every_rank(
    results: dict[str, Any],
) -> None:
    assert results["overwrite_refused_on_every_rank"]


def test_hf_export_loads_with_from_pretrained_to_the_same_weights(results: dict[str, Any]) -> None:
    assert results["hf_files"] == ["config.json", "model.safetensors"]
    assert results["hf_tied"]
    assert results["hf_exact"]


def test_a_two_rank_checkpoint_resumes_in_one_process_without_its_rng(
    results: dict[str, Any],
) -> None:
    """World size 2 -> 1: DCP re-shards model and optimizer exactly; RNG is left alone; the run
    continues to the 2-rank result up to float summation order."""
    assert results["reshard_saved_world_size"] == 2
    assert results["reshard_load_bitwise"]
    assert not results["reshard_rng_restored"]
    assert results["reshard_continue_diff"] <= 1e-5
