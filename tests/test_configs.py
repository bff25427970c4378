"""Typed dotted overrides, strict dict round trips and recipe loading (cispo.configs)."""

from __future__ import annotations

import dataclasses
import enum
import json
import math
from pathlib import Path
from typing import Literal

import pytest

from cispo.configs import (
    ConfigError,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    format_config,
    load_recipe,
)


class Device(enum.Enum):
    CPU = "cpu"
    CUDA = "cuda"


@dataclasses.dataclass(frozen=True, kw_only=True)
class LossConfig:
    name: Literal["cispo", "ppo", "grpo"] = "cispo"
    """Objective."""
    ratio_min: float = 0.0
    """Lower bound on the ratio."""
    ratio_max: float = 4.0
    """Upper bound on the ratio."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.ratio_min < self.ratio_max:
            raise ValueError(
                f"ratio_min must be in [0, ratio_max); got ratio_min={self.ratio_min}, "
                f"ratio_max={self.ratio_max}"
            )


@dataclasses.dataclass(frozen=True, kw_only=True)
class SamplingConfig:
    temperature: float = 1.0
    stop: tuple[str, ...] = ()
    top_k: int | None = None
    max_tokens: list[int] = dataclasses.field(default_factory=lambda: [16])


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvalConfig:
    every: int = 10
    samples: int = 4


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
    steps: int
    """Optimizer steps; required."""
    lr: float = 1e-5
    compile: bool = False
    family: Literal["llama", "qwen2"] = "llama"
    out_dir: Path = Path("runs/x")
    device: Device = Device.CPU
    loss: LossConfig = dataclasses.field(default_factory=LossConfig)
    sampling: SamplingConfig = dataclasses.field(default_factory=SamplingConfig)
    eval: EvalConfig | None = None
    extra: dict[str, float] = dataclasses.field(default_factory=dict)
    derived: int = dataclasses.field(init=False, default=0)

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        object.__setattr__(self, "derived", self.steps * 2)


BASE = TrainConfig(steps=5)


def test_scalars_are_coerced_by_annotation() -> None:
    cfg = apply_overrides(
        BASE, ["--steps=10", "lr=3e-4", "--compile=yes", "--family=qwen2", "--out_dir=/tmp/r"]
    )
    assert cfg.steps == 10 and isinstance(cfg.steps, int)
    assert cfg.lr == pytest.approx(3e-4, rel=1e-12) and isinstance(cfg.lr, float)
    assert cfg.compile is True
    assert cfg.family == "qwen2"
    assert cfg.out_dir == Path("/tmp/r")
    assert BASE.steps == 5  # the input is untouched


@pytest.mark.parametrize(
    ("text", "expected"),
    [("true", True), ("1", True), ("YES", True), ("false", False), ("0", False), ("no", False)],
)
def test_bool_spellings(text: str, expected: bool) -> None:
    assert apply_overrides(BASE, [f"--compile={text}"]).compile is expected


def test_nested_override_runs_post_init_validation() -> None:
    cfg = apply_overrides(BASE, ["--loss.ratio_max=5", "--loss.name=ppo"])
    assert cfg.loss == LossConfig(name="ppo", ratio_max=5.0)
    with pytest.raises(ConfigError, match=r"'loss'.*ratio_min must be in \[0, ratio_max\)"):
        apply_overrides(BASE, ["--loss.ratio_max=-1"])
    # The root's __post_init__ runs too: derived is recomputed from the new steps.
    assert apply_overrides(BASE, ["--steps=7"]).derived == 14


def test_overrides_are_validated_together_not_one_by_one() -> None:
    # ratio_min=6 alone is invalid against the old ratio_max=4; with ratio_max=8 it is valid.
    cfg = apply_overrides(BASE, ["--loss.ratio_min=6", "--loss.ratio_max=8"])
    assert (cfg.loss.ratio_min, cfg.loss.ratio_max) == (6.0, 8.0)


def test_later_override_of_same_key_wins() -> None:
    assert apply_overrides(BASE, ["--steps=2", "--steps=3"]).steps == 3


def test_sequences_from_json_and_comma_lists() -> None:
    cfg = apply_overrides(BASE, ['--sampling.stop=["\\n", "END"]', "--sampling.max_tokens=8,16"])
    assert cfg.sampling.stop == ("\n", "END")
    assert cfg.sampling.max_tokens == [8, 16]
    assert apply_overrides(BASE, ["--sampling.stop=a,b"]).sampling.stop == ("a", "b")
    assert apply_overrides(BASE, ["--sampling.stop="]).sampling.stop == ()
    assert apply_overrides(BASE, ["--sampling.stop=[]"]).sampling.stop == ()


def test_optional_none_and_value() -> None:
    cfg = apply_overrides(BASE, ["--sampling.top_k=50"])
    assert cfg.sampling.top_k == 50
    for text in ("none", "null", "None"):
        assert apply_overrides(cfg, [f"--sampling.top_k={text}"]).sampling.top_k is None


def test_unset_optional_section_is_built_from_defaults() -> None:
    cfg = apply_overrides(BASE, ["--eval.every=3"])
    assert cfg.eval == EvalConfig(every=3, samples=4)
    assert apply_overrides(cfg, ["--eval=none"]).eval is None


def test_enum_dict_and_quoted_string() -> None:
    cfg = apply_overrides(BASE, ["--device=CUDA", '--extra={"kl": 0.1}'])
    assert cfg.device is Device.CUDA
    assert cfg.extra == {"kl": 0.1}
    assert apply_overrides(BASE, ["--device=cuda"]).device is Device.CUDA


def test_unknown_key_names_it_suggests_and_lists_valid_keys() -> None:
    with pytest.raises(ConfigError) as info:
        apply_overrides(BASE, ["--loss.ratio_mx=5"])
    msg = str(info.value)
    assert "'loss.ratio_mx'" in msg
    assert "did you mean 'loss.ratio_max'" in msg
    assert "name, ratio_min, ratio_max" in msg
    with pytest.raises(ConfigError, match=r"unknown config key 'stepz'.*did you mean 'steps'"):
        apply_overrides(BASE, ["stepz=1"])
    # init=False fields are not settable and are not listed.
    with pytest.raises(ConfigError) as info:
        apply_overrides(BASE, ["derived=1"])
    assert "derived" not in str(info.value).split("valid keys")[1]


def test_bad_literal_lists_allowed_values() -> None:
    with pytest.raises(ConfigError) as info:
        apply_overrides(BASE, ["--family=qwen3"])
    msg = str(info.value)
    assert "'family'" in msg and "'qwen3'" in msg
    assert "one of 'llama', 'qwen2'" in msg


@pytest.mark.parametrize(
    ("override", "field", "expected"),
    [
        ("--steps=ten", "steps", "int"),
        ("--steps=1.5", "steps", "int"),
        ("--lr=fast", "lr", "float"),
        ("--compile=maybe", "compile", "bool"),
        ("--sampling.top_k=many", "sampling.top_k", "int | None"),
        ("--sampling.max_tokens=1,x", "sampling.max_tokens[1]", "int"),
        ("--device=tpu", "device", "'CPU', 'CUDA'"),
    ],
)
def test_bad_value_names_field_value_and_expected_type(
    override: str, field: str, expected: str
) -> None:
    value = override.split("=", 1)[1].split(",")[-1]
    with pytest.raises(ConfigError) as info:
        apply_overrides(BASE, [override])
    msg = str(info.value)
    assert f"'{field}'" in msg and repr(value) in msg and expected in msg, msg


def test_malformed_overrides_are_errors() -> None:
    with pytest.raises(ConfigError, match="form"):
        apply_overrides(BASE, ["--steps"])
    with pytest.raises(ConfigError, match="section"):
        apply_overrides(BASE, ["--loss=cispo"])
    with pytest.raises(ConfigError, match="not a section"):
        apply_overrides(BASE, ["--steps.x=1"])
    with pytest.raises(ConfigError, match="steps must be >= 1"):
        apply_overrides(BASE, ["--steps=0"])


def test_dict_round_trip_is_exact_and_json_safe() -> None:
    cfg = apply_overrides(
        BASE,
        [
            '--sampling.stop=["\\n"]',
            "--eval.every=2",
            "--device=CUDA",
            "--lr=inf",
            '--extra={"kl": 0.5}',
            "--loss.name=grpo",
        ],
    )
    data = json.loads(json.dumps(config_to_dict(cfg), allow_nan=False))
    assert "derived" not in data
    assert data["sampling"]["stop"] == ["\n"]
    back = config_from_dict(TrainConfig, data)
    assert back == cfg
    assert math.isinf(back.lr)
    assert isinstance(back.sampling.stop, tuple) and isinstance(back.out_dir, Path)


def test_from_dict_is_strict() -> None:
    data = config_to_dict(BASE)
    data["loss"]["ratio_mx"] = 1.0
    with pytest.raises(ConfigError, match=r"'loss.ratio_mx'.*did you mean 'loss.ratio_max'"):
        config_from_dict(TrainConfig, data)
    with pytest.raises(ConfigError, match=r"missing required config keys.*steps"):
        config_from_dict(TrainConfig, {})
    with pytest.raises(ConfigError, match=r"'steps'.*'5x'.*int"):
        config_from_dict(TrainConfig, {"steps": "5x"})
    with pytest.raises(ConfigError, match=r"'compile'.*expected bool"):
        config_from_dict(TrainConfig, {"steps": 1, "compile": 1})


RECIPE = """
from __future__ import annotations
import dataclasses

@dataclasses.dataclass(frozen=True, kw_only=True)
class Cfg:
    steps: int = 3
    tags: tuple[str, ...] = ()

def recipe() -> Cfg:
    return Cfg(steps=11)
"""


def test_recipe_loads_from_file_and_accepts_overrides(tmp_path: Path) -> None:
    path = tmp_path / "my_recipe.py"
    path.write_text(RECIPE)
    cfg = load_recipe(str(path))
    assert type(cfg).__name__ == "Cfg" and cfg.steps == 11  # type: ignore[attr-defined]
    # Postponed annotations in the recipe file resolve (the module is registered).
    assert apply_overrides(cfg, ["--tags=a,b"]).tags == ("a", "b")  # type: ignore[attr-defined]
    with pytest.raises(ConfigError, match="expected TrainConfig"):
        load_recipe(str(path), TrainConfig)


def test_recipe_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_recipe(str(tmp_path / "missing.py"))
    no_fn = tmp_path / "no_fn.py"
    no_fn.write_text("x = 1\n")
    with pytest.raises(ConfigError, match=r"no recipe\(\) function"):
        load_recipe(str(no_fn))
    with pytest.raises(ConfigError, match="no_such_recipe"):
        load_recipe("no_such_recipe")


def test_format_config_shows_every_field_with_sections() -> None:
    text = format_config(apply_overrides(BASE, ['--sampling.stop=["\\n"]']))
    lines = text.splitlines()
    assert lines[0] == "TrainConfig"
    assert "  steps: 5" in lines
    assert "  loss: (LossConfig)" in lines
    assert "    ratio_max: 4.0" in lines
    assert '    stop: ["\\n"]' in lines
    assert "  eval: null" in lines
