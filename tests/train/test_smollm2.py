"""(slow) The SmolLM2 recipe end to end: two CISPO steps on the real pretrained model."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
from pathlib import Path

import pytest

from cispo import models
from cispo.recipes.smollm2_arithmetic_cispo import recipe
from cispo.train.loop import train


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec(models.SMOLLM2_PACKAGE) is None
    or importlib.util.find_spec("gguf") is None,
    reason=f"needs: {models.SMOLLM2_INSTALL}",
)
def test_smollm2_recipe_runs_cispo_steps_with_matching_sampler_and_trainer(
    tmp_path: Path,
) -> None:
    config = recipe()
    config = dataclasses.replace(
        config,
        sampling=dataclasses.replace(config.sampling, max_tokens=8),
        rl=dataclasses.replace(config.rl, steps=2),
        eval=dataclasses.replace(config.eval, num_problems=4),
        run=dataclasses.replace(config.run, dir=str(tmp_path), tensorboard=False, keep_last=1),
    )
    train(config, echo=lambda _: None)

    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if r["step"] >= 1]
    assert [r["step"] for r in steps] == [1, 2]
    # A step whose groups all got equal rewards has no datums and no loss; 8 groups × 4 samples
    # of a model that solves part of the problems leave at least one group with a signal.
    trained = [r for r in steps if r["rl/datums"] > 0]
    assert trained
    for r in trained:
        assert math.isfinite(r["loss"])
        # The sampler is the trainer's own weights: on-policy logprobs agree to float rounding.
        assert abs(r["mismatch/kl_sample_train_k1"]) < 1e-3
        assert r["mismatch/abs_logprob_diff_max"] < 1e-2
