"""A rollout batch sampled in shares (what each torchrun rank does: `InProcessSource`) equals the
batch sampled at once: each prompt samples on the random stream of its index in the batch."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from cispo.cli import load_recipe
from cispo.client import ServiceClient
from cispo.rollout.rollouts import (
    assemble_rollout,
    collect_rollout,
    sample_share,
    step_problems,
)
from cispo.tasks import make_task
from cispo.train.warm_start import supervised_warm_start
from tests.train.helpers import TINY_RUN, run_config


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("shares")
    overrides = [*TINY_RUN, "--sft.steps=60", "--rl.prompts_per_step=16"]
    config = run_config(tmp, overrides, load_recipe("arithmetic_cispo"))
    task = make_task(config.task.name, **config.task.kwargs())
    training = ServiceClient(checkpoint_root=Path(tmp)).create_lora_training_client(
        "tiny", rank=0, model_overrides=config.model.overrides()
    )
    supervised_warm_start(training, task, config)  # mixed rewards: some groups give datums
    return {
        "config": config,
        "task": task,
        "sampler": training.save_weights_and_get_sampling_client(),
    }


def _datum_view(datum: Any) -> tuple[list[int], list[float], list[float]]:
    inputs = datum.loss_fn_inputs
    return (
        datum.model_input.to_ints(),
        inputs["target_tokens"].to_torch().tolist(),
        inputs["advantages"].to_torch().tolist(),
    )


def test_a_batch_sampled_in_shares_equals_the_batch_sampled_at_once(setup: dict[str, Any]) -> None:
    config, task, sampler = setup["config"], setup["task"], setup["sampler"]
    whole = collect_rollout(sampler, task, 3, config)
    assert whole.datums, "the warm start should give some groups with mixed rewards"
    problems = step_problems(task, 3, config)
    cuts = [range(11, 16), range(0, 5), range(5, 11)]  # out of rank order
    shares = [sample_share(sampler, task, problems, 3, config, r) for r in cuts]
    assembled = assemble_rollout(3, problems, shares, config, version=whole.version)
    assert assembled.texts == whole.texts
    assert torch.equal(assembled.rewards, whole.rewards)
    assert torch.equal(assembled.advantages, whole.advantages)
    assert [_datum_view(d) for d in assembled.datums] == [_datum_view(d) for d in whole.datums]
    for a, b in zip(assembled.datums, whole.datums, strict=True):
        old_a = a.loss_fn_inputs["old_logprobs"].to_torch()
        old_b = b.loss_fn_inputs["old_logprobs"].to_torch()
        assert torch.allclose(old_a, old_b, atol=1e-5, rtol=0)
    shared_keys = {k for k in whole.metrics if not k.startswith(("time/", "rollout/share"))}
    assert {k: assembled.metrics[k] for k in shared_keys} == {
        k: whole.metrics[k] for k in shared_keys
    }
    assert whole.metrics["rollout/share_prompts_max"] == 16.0
    assert assembled.metrics["rollout/share_prompts_max"] == 6.0
    assert assembled.metrics["rollout/share_prompts_min"] == 5.0


def test_shares_that_miss_or_repeat_a_prompt_are_refused(setup: dict[str, Any]) -> None:
    config, task, sampler = setup["config"], setup["task"], setup["sampler"]
    problems = step_problems(task, 0, config)[:4]
    a = sample_share(sampler, task, problems, 0, config, range(0, 2))
    b = sample_share(sampler, task, problems, 0, config, range(1, 4))
    with pytest.raises(ValueError, match=r"the shares cover prompts \[0, 1, 1, 2, 3\]"):
        assemble_rollout(0, problems, [a, b], config, version=0)
    with pytest.raises(ValueError, match=r"cover prompts \[0, 1\], not 0..3 once"):
        assemble_rollout(0, problems, [a], config, version=0)
