"""`cispo train` under `torchrun --nproc-per-node 2` (CPU, gloo) against the same run in 1 process.

One launch of `train_checks.py` runs the recipe to the end, then resumes it from its
second-to-last checkpoint; the one-process reference runs here. The configuration is TINY_RUN
with gentler learning rates: at TINY_RUN's own (1e-2 for 150 supervised steps) the run is
chaotic in float summation order, so that even one process with another micro-batch size ends
its warm start 0.11 away (max |Δweight|) and the two runs sample different batches. With
these rates the two runs stay close and sample the same tokens. The two ranks run the engine's
defaults (shared-prefix packing through the FSDP root, fused AdamW on DTensor parameters), the
one-process reference runs them switched off (padded rows, for-loop AdamW).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from cispo.cli import load_recipe, main
from cispo.export import export_checkpoint
from cispo.train.loop import train
from tests.distributed.common import ROOT, max_diff, torchrun
from tests.train.helpers import TINY_RUN, metrics, run_config

SCRIPT = ROOT / "tests" / "distributed" / "train_checks.py"
RECIPE = "arithmetic_cispo"
CHANGED = {
    "--sft.learning_rate": "3e-3",
    "--optim.learning_rate": "1e-3",
    "--run.keep_last": "3",
    "--rl.steps": "3",
}
OVERRIDES = [a for a in TINY_RUN if a.split("=")[0] not in CHANGED] + [
    f"{k}={v}" for k, v in CHANGED.items()
]
# Metrics that are per-micro-batch quantities (their merged value depends on how the datums are
# cut into micro-batches, in one process as across ranks: docs/distributed.md) or timings.
PER_MICRO_BATCH = {"loss/value", "loss/active_tokens", "fork/grad_share"}
# The prompts each rank sampled: the whole batch in one process, half of it on each of 2 ranks.
PER_RANK = {"rollout/share_prompts_max", "rollout/share_prompts_min"}
OFF = ["--engine.shared_prefix=false", "--engine.adamw_impl=for-loop"]  # the reference's
RELATIVE = 1e-3  # metrics: relative to max(|value|, 1e-3), measured ≤ 5.6e-4 (optim/grad_norm)
# mismatch/* (≈ 0 on-policy: |sampler - trainer| logprobs) absolute: 2e-6, measured 2.4e-7
# (2.4e-7 when rank 0 sampled the whole batch and both sides ran padded rows: each rank's sampler
# now runs half the batch, whose logits round differently, and packed and padded logprobs differ
# by float rounding, ≤ 1.9e-6 in benchmarks/shared_prefix.py, docs/LOG.md)
MISMATCH = 2e-6
# Counts against a threshold (a token is a "fork" when its sampler probability is < 0.1): one token
# can sit within float rounding of it, and each rank's sampler rounds its half batch differently.
# Absolute, one token in 100 (the steps train 100+ tokens); measured: one token of 112 in one step.
THRESHOLD_COUNTS = {"fork/token_frac": 0.01}
WEIGHTS = 5e-5  # max |Δweight| of the final checkpoints, measured 2.0e-5 (3.8e-6 when both
# sides ran padded rows and torch's default AdamW)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("torchrun_train")
    done = torchrun(
        ["--standalone", "--nproc-per-node", "2", str(SCRIPT), str(out), RECIPE, *OVERRIDES]
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    single = out / "single"
    train(run_config(single, [*OVERRIDES, *OFF], load_recipe(RECIPE)), echo=lambda _: None)
    return {"out": out, "run": out / "run", "single": single, "stdout": done.stdout}


def _final_weights(path: Path) -> dict[str, torch.Tensor]:
    data = torch.load(path, weights_only=False)
    return dict(data["model"])


def test_two_ranks_train_the_same_run_as_one_process(runs: dict[str, Any]) -> None:
    two, one = metrics(runs["run"]), metrics(runs["single"])
    rl_rows = [r for r in two if r["step"] > 0]
    assert len(rl_rows) == 3 and all(r["rl/datums"] > 0 for r in rl_rows), rl_rows
    assert [r["step"] for r in two] == [r["step"] for r in one]
    compared = 0
    for a, b in zip(two, one, strict=True):
        keys = {k for k in b if not k.startswith("time") and k not in PER_MICRO_BATCH | PER_RANK}
        assert keys <= a.keys(), sorted(keys - a.keys())
        for key in keys:
            if not (isinstance(b[key], float) and math.isfinite(b[key])):
                continue
            scale = 1.0 if key.startswith("mismatch/") else max(abs(b[key]), 1e-3)
            tolerance = MISMATCH if key.startswith("mismatch/") else RELATIVE
            if key in THRESHOLD_COUNTS:
                scale, tolerance = 1.0, THRESHOLD_COUNTS[key]
            assert abs(a[key] - b[key]) / scale <= tolerance, (a["step"], key, a[key], b[key])
            compared += 1
    assert compared > 100


def test_each_rank_samples_only_its_half_of_each_batch(runs: dict[str, Any]) -> None:
    """Rank 0 samples prompts 0-7 of each step's 16 on streams 0-7, rank 1 prompts 8-15 on
    streams 8-15 (seen at each rank's `HFSampler.sample`: 3 steps, then the resume's step 3),
    and every rank assembles the whole batch (the metrics above equal one process's)."""
    calls = json.loads((runs["out"] / "sample_calls.json").read_text())
    assert calls == [[list(range(0, 8))] * 4, [list(range(8, 16))] * 4]
    for row in (r for r in metrics(runs["run"]) if r["step"] > 0):
        assert row["rollout/share_prompts_max"] == row["rollout/share_prompts_min"] == 8
    for row in (r for r in metrics(runs["single"]) if r["step"] > 0):
        assert row["rollout/share_prompts_max"] == row["rollout/share_prompts_min"] == 16


def test_two_ranks_end_with_the_one_process_weights_having_moved(runs: dict[str, Any]) -> None:
    final = _final_weights(runs["out"] / "final.pt")
    reference = load_file(str(runs["single"] / "checkpoints/tiny/step_000003/model.safetensors"))
    first = load_file(str(runs["single"] / "checkpoints/tiny/step_000001/model.safetensors"))
    assert max_diff(reference, first) > 1e-4  # two RL steps moved the weights
    assert max_diff(final, reference) <= WEIGHTS


def test_only_rank_0_writes_the_run_files(runs: dict[str, Any]) -> None:
    run, single = runs["run"], runs["single"]
    top = sorted(p.name for p in run.iterdir())
    assert top == sorted(p.name for p in single.iterdir()), top
    # metrics.jsonl: one line per step (two writers would interleave or double them)
    assert len(metrics(run)) == len(metrics(single)) == 4
    written = json.loads((run / "config.json").read_text())
    assert written == json.loads((single / "config.json").read_text()) | {
        "run": written["run"],
        "engine": written["engine"],
    }
    assert runs["stdout"].count("held-out greedy accuracy before RL") == 2  # run + resume, once
    assert runs["stdout"].count("engine: shared_prefix on, packing off, adamw fused") == 2
    assert json.loads((runs["out"] / "exit_codes.json").read_text()) == [[0, 0], [0, 0]]


def test_sharded_checkpoints_keep_the_last_three_and_point_latest(runs: dict[str, Any]) -> None:
    root = runs["run"] / "checkpoints" / "tiny"
    names = sorted(p.name for p in root.iterdir() if p.name.startswith("step_"))
    assert names == ["step_000001", "step_000002", "step_000003"]
    assert (root / "latest").read_text() == "step_000003\n"
    for name in names:
        files = sorted(p.name for p in (root / name).iterdir())
        assert files == [
            ".metadata",
            "__0_0.distcp",
            "__1_0.distcp",
            "rng_rank_0.pt",
            "rng_rank_1.pt",
            "state.json",
        ]


def test_a_resumed_two_rank_run_ends_bitwise_where_the_uninterrupted_one_did(
    runs: dict[str, Any],
) -> None:
    final = _final_weights(runs["out"] / "final.pt")
    resumed = _final_weights(runs["out"] / "resumed.pt")
    assert all(torch.equal(final[k], resumed[k]) for k in final)
    assert len(metrics(runs["run"])) == 4  # the resume dropped and rewrote step 3's line


def test_cispo_export_of_the_two_rank_run_gives_its_final_weights(
    runs: dict[str, Any], tmp_path: Path
) -> None:
    """The line `cispo train` ends with works for a sharded run: the export's weights are the
    final DCP checkpoint's, and its load-back check passed."""
    result = export_checkpoint(runs["run"], tmp_path / "export")
    exported = load_file(str(result.model_dir / "model.safetensors"))
    final = _final_weights(runs["out"] / "final.pt")
    assert exported and all(torch.equal(exported[k], final[k]) for k in exported)
    assert result.max_logprob_diff <= 1e-4


def test_nproc_below_one_and_nproc_under_torchrun_are_refused(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """`cispo train --nproc N` (N > 1 starts torchrun on the same command line: docs) refuses
    N < 1, and N > 1 inside a torchrun job, before creating anything."""
    run_dir = tmp_path / "run"
    assert main(["train", RECIPE, "--nproc", "0", f"--run.dir={run_dir}"]) == 2
    assert "--nproc must be >= 1, got 0" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["train", RECIPE, "--nproc=2", f"--run.dir={run_dir}"]) == 2
    assert "under torchrun (WORLD_SIZE=2)" in capsys.readouterr().err
    assert not run_dir.exists()
