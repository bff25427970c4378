"""Claims about the recipe's `engine` section: the speed switches reach the trainer's engine,
the plan names them, bad values are refused, and they never block a resume."""

from __future__ import annotations

from pathlib import Path

import pytest

from cispo.cli import apply_overrides
from cispo.config import ConfigError, EngineSettings, TrainConfig, to_dict
from cispo.train.loop import check_resume_config, describe_plan, open_run, train
from tests.train.helpers import TINY_RUN, assert_every_rl_step_trained, run_config

SWITCHES = [
    "--engine.shared_prefix=true",
    "--engine.packed_row_tokens=256",
    "--engine.adamw_impl=fused",
    "--engine.fused_logprobs=false",
    "--engine.trim_heap=false",
    "--engine.mmap_threshold=131072",
]


def test_engine_switches_reach_the_trainers_engine(tmp_path: Path) -> None:
    config = run_config(tmp_path / "run", [*TINY_RUN, *SWITCHES])
    opened = open_run(config, resume=False, echo=lambda _: None)
    try:
        engine = opened.training.engine
        assert engine.config.shared_prefix is True
        assert engine.config.packed_row_tokens == 256
        assert engine.config.fused_logprobs is False
        assert engine.config.trim_heap is False
        assert engine.config.mmap_threshold == 131072
        assert engine.config.micro_batch_size == config.rl.micro_batch_size
        group = engine.optimizer.param_groups[0]
        assert (group["fused"], group["foreach"]) == (True, False)
        plan = describe_plan(config, opened.training)
    finally:
        opened.training.close()
    assert (
        "engine: shared_prefix on, packing rows of ≤ 256 tokens, adamw fused, "
        "fused logprobs off, heap trim off, mmap threshold 131072 B" in plan
    )


def test_the_default_plan_says_every_speed_feature_is_off(tmp_path: Path) -> None:
    line = TrainConfig().engine.describe()
    assert line == (
        "engine: shared_prefix off, packing off, adamw torch default (for-loop on CPU), "
        "fused logprobs auto, heap trim on"
    )


def test_a_run_with_every_switch_on_trains_and_prints_them(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    config = run_config(run_dir, [*TINY_RUN, *SWITCHES, "--rl.steps=2", "--sft.steps=100"])
    lines: list[str] = []
    train(config, echo=lines.append)
    assert_every_rl_step_trained(run_dir)
    assert any(line.startswith("engine: shared_prefix on") for line in "\n".join(lines).split("\n"))


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        (["--engine.packed_row_tokens=64"], "engine.packed_row_tokens"),
        (
            ["--engine.shared_prefix=true", "--engine.packed_row_tokens=0"],
            "engine.packed_row_tokens",
        ),
        (["--engine.logprob_chunk_size=0"], "engine.logprob_chunk_size"),
        (["--engine.mmap_threshold=-1"], "engine.mmap_threshold"),
        (["--engine.mmap_threshold=33554433"], "engine.mmap_threshold"),
    ],
)
def test_bad_engine_settings_are_refused_naming_the_field(overrides: list[str], field: str) -> None:
    with pytest.raises((ConfigError, SystemExit, ValueError)) as error:
        apply_overrides(TrainConfig(), overrides)
    if not isinstance(error.value, SystemExit):
        assert field in str(error.value)
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        EngineSettings(**{k.split("=")[0][len("--engine.") :]: _parse(k) for k in overrides})


def _parse(override: str) -> object:
    value = override.split("=", 1)[1]
    return {"true": True, "false": False}.get(value, int(value) if value.isdigit() else value)


def test_changing_engine_switches_or_an_older_config_without_them_does_not_block_resume() -> None:
    saved = to_dict(TrainConfig())
    current = to_dict(apply_overrides(TrainConfig(), SWITCHES))
    check_resume_config(saved, current)
    del saved["engine"]  # a run directory written before the section existed
    check_resume_config(saved, current)
