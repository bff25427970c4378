"""Claims about the engine under torchrun (2 ranks, FSDP2, gloo on CPU) against one process:
with the engine's defaults (shared-prefix packing through the FSDP root, fused AdamW on DTensor
parameters) and with padded rows, against the padded, for-loop AdamW single-process reference.

One launch of `fsdp_checks.py` runs every check (a 2-rank launch costs ~10 s); this module reads
its JSON and applies the tolerances. Gradients are compared after the first step; weights after
3 AdamW steps (lr 1e-3: AdamW's early updates are g/|g|-like, so a float-level gradient difference
on a near-zero gradient entry is amplified in proportion to the learning rate).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.distributed.common import ROOT, torchrun

SCRIPT = ROOT / "tests" / "distributed" / "fsdp_checks.py"
CASES = [
    "llama/token_mean",
    "llama/seq_mean_token_mean",
    "qwen2/token_mean",
    "qwen2/seq_mean_token_sum",
    "llama/padded",
]
# Metrics whose merged value does not depend on how the datums are cut into micro-batches.
# (`loss/value`, `loss/active_tokens`, `fork/grad_share` are per-micro-batch quantities whose
# token-weighted mean does, in one process as across ranks.)
PARTITION_FREE = [
    "loss:sum",
    "train/num_tokens",
    "optim/grad_norm",
    "cispo/weight_mean",
    "cispo/weight_min",
    "cispo/weight_max",
    "mismatch/kl_sample_train_k1",
    "mismatch/abs_logprob_diff_max",
]


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("fsdp") / "results.json"
    done = torchrun(["--standalone", "--nproc-per-node", "2", str(SCRIPT), str(out)])
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    data: dict[str, Any] = json.loads(Path(out).read_text())
    return data


@pytest.mark.parametrize("case", CASES)
def test_two_fsdp_ranks_with_unequal_tokens_train_like_one_process(
    results: dict[str, Any], case: str
) -> None:
    got = results["cases"][case]
    assert results["backend"] == "gloo" and got["sharded"]
    if case.endswith("/padded"):  # engine.shared_prefix=false, adamw for-loop: padded rows
        assert got["packed_largest_group"] == [0, 0] and not got["adamw_fused"]
    else:  # the defaults: every rank packed a group of 2+ through the root; fused AdamW
        assert min(got["packed_largest_group"]) >= 2 and got["adamw_fused"]
    assert got["moved"] > 1e-3  # training happened: 3 steps of lr 1e-3 moved the weights
    tokens_rank0, tokens_rank1 = got["tokens_per_rank"]
    assert all(a != b for a, b in zip(tokens_rank0, tokens_rank1, strict=True))
    assert got["grad_diff"] <= 1e-6 * max(1.0, got["grad_scale"])
    assert got["weight_diff"] <= 1e-5


@pytest.mark.parametrize("case", CASES)
def test_metrics_merged_over_ranks_equal_the_single_process_metrics(
    results: dict[str, Any], case: str
) -> None:
    diffs = results["cases"][case]["metric_diffs"]
    for key in PARTITION_FREE:
        assert diffs[key] <= 1e-5, (key, diffs[key])


def test_normalising_by_each_ranks_own_token_count_is_caught(results: dict[str, Any]) -> None:
    """The per-rank token mean, then FSDP's average over ranks, is a different gradient when the
    ranks hold unequal token counts; the tolerance above (1e-5) is far below its error."""
    assert results["per_rank_mean_weight_diff"] > 1e-3


def test_fused_logprobs_through_the_fsdp_root_equal_the_naive_single_process_path(
    results: dict[str, Any],
) -> None:
    fused = results["fused"]
    assert fused["grad_scale"] > 1e-3  # the reference gradient is not trivially zero
    assert fused["logprob_diff"] <= 1e-5
    assert fused["forward_only_diff"] <= 1e-5
    assert fused["grad_diff"] <= 1e-6 * max(1.0, fused["grad_scale"])
    assert fused["forward_only_left_no_grads"]


def test_ranks_built_with_different_seeds_train_rank_0s_initial_weights(
    results: dict[str, Any],
) -> None:
    seeds = results["different_seeds"]
    assert seeds["before"][0] == 0.0 and seeds["before"][1] > 1e-2  # rank 1 built other weights
    assert seeds["after"] == [0.0, 0.0]  # bit for bit rank 0's after sharding


def test_two_fsdp_ranks_train_lora_like_one_process_with_the_base_frozen(
    results: dict[str, Any],
) -> None:
    lora = results["lora"]
    assert lora["sharded"] and lora["trainable"] > 0
    assert lora["adapters_moved"] > 1e-3  # training happened (B starts at 0)
    assert lora["base_moved"] == 0.0
    assert lora["weight_diff"] <= 1e-5


def test_sharded_lora_checkpoint_round_trips_the_adapter_only_optimizer_state(
    results: dict[str, Any],
) -> None:
    lora = results["lora"]
    entries = lora["optimizer_entries"]
    assert entries[0] == entries[1] == lora["trainable"]  # one Adam state per adapter tensor
    assert lora["dcp_weight_diff"] == 0.0 and lora["dcp_optimizer_diff"] == 0.0


def test_lora_exports_of_a_sharded_run_load_with_peft_to_equal_weights(
    results: dict[str, Any],
) -> None:
    """`export_engine_hf` (a PEFT adapter onto the engine's base) and `cispo export` of the
    sharded checkpoint (adapter + base directories) each load with `PeftModel.from_pretrained`."""
    assert results["lora"]["engine_export_diff"] == 0.0
    assert results["lora"]["cli_export_diff"] == 0.0
