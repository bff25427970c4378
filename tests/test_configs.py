"""The command line (`cispo.cli.main`, tyro over the config dataclasses), the validation of every
config field at that boundary, the strict config.json round trip, and recipe loading."""

from __future__ import annotations

import ast
import dataclasses
import json
import math
import os
import re
import subprocess
import sys
import typing
from pathlib import Path
from typing import Any

import pytest

import cispo.train.loop
from cispo import cli
from cispo.cli import apply_overrides, load_recipe
from cispo.config import (
    ConfigError,
    LossSettings,
    OptimConfig,
    RLConfig,
    TrainConfig,
    _validate,
    at_least,
    from_dict,
    to_dict,
)
from tests.train.helpers import TINY_RUN

ROOT = Path(__file__).resolve().parents[1]
INF_ALLOWED = {"loss.ratio_max"}  # CISPO's upper bound: inf = no upper clip (Tinker's form)


@pytest.fixture(autouse=True)
def _wide_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    """tyro wraps its messages to the terminal; a wide one keeps each message on one line."""
    monkeypatch.setenv("COLUMNS", "1000")


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def section_fields() -> list[tuple[str, str, Any]]:
    """(section, field, resolved type) of every field of every TrainConfig section."""
    rows = []
    for name, cls in typing.get_type_hints(TrainConfig).items():
        hints = typing.get_type_hints(cls)
        rows += [(name, f.name, hints[f.name]) for f in dataclasses.fields(cls)]
    return rows


def attribute_docstrings(path: Path, class_name: str) -> dict[str, str]:
    """Field -> the string literal under it, read from the source (what tyro shows in --help)."""
    tree = ast.parse(path.read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == class_name)
    docs = {}
    for stmt, nxt in zip(cls.body, cls.body[1:], strict=False):
        if (
            isinstance(stmt, ast.AnnAssign)
            and isinstance(stmt.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[stmt.target.id] = nxt.value.value
    return docs


def squash(text: str) -> str:
    """Help text without box drawing and with whitespace collapsed."""
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", text).split())


def printed_config(out: str) -> TrainConfig:
    return from_dict(TrainConfig, json.loads(out))


# --------------------------------------------------------------------------------------------
# Overrides


def test_scalars_are_coerced_by_annotation(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(
        capsys,
        "config",
        "--rl.steps=10",
        "--optim.learning_rate=3e-4",
        "--run.tensorboard=no",
        "--model.family=qwen2",
        "--run.dir=/tmp/r",
    )
    assert code == 0
    cfg = printed_config(out)
    assert cfg.rl.steps == 10 and isinstance(cfg.rl.steps, int)
    assert cfg.optim.learning_rate == pytest.approx(3e-4, rel=1e-12)
    assert isinstance(cfg.optim.learning_rate, float)
    assert cfg.run.tensorboard is False
    assert cfg.model.family == "qwen2"
    assert cfg.run.dir == "/tmp/r"
    recipe = load_recipe("arithmetic_cispo")
    assert apply_overrides(recipe, ["--rl.steps=10"]).rl.steps == 10
    assert recipe.rl.steps == load_recipe("arithmetic_cispo").rl.steps  # the input is untouched


@pytest.mark.parametrize(
    ("text", "expected"),
    [("true", True), ("1", True), ("YES", True), ("false", False), ("0", False), ("no", False)],
)
def test_bool_spellings(text: str, expected: bool) -> None:
    cfg = apply_overrides(
        TrainConfig(), [f"--run.tensorboard={text}", f"--task.instruction={text}"]
    )
    assert cfg.run.tensorboard is expected and cfg.task.instruction is expected


def test_nested_override_runs_post_init_validation(capsys: pytest.CaptureFixture[str]) -> None:
    cfg = apply_overrides(TrainConfig(), ["--loss.ratio_max=5", "--loss.name=ppo"])
    assert cfg.loss == LossSettings(name="ppo", ratio_max=5.0)
    code, _, err = run_cli(capsys, "config", "--loss.ratio_min=5")
    assert code == 2
    assert "ratio_min=5.0 > ratio_max=4.0" in err, err


def test_overrides_are_validated_together_not_one_by_one() -> None:
    # hidden_size=30 alone is invalid against the default num_heads=4; with num_heads=3 it is
    # valid (and num_heads=3 alone is invalid against the default hidden_size=128).
    cfg = apply_overrides(TrainConfig(), ["--model.hidden_size=30", "--model.num_heads=3"])
    assert (cfg.model.hidden_size, cfg.model.num_heads) == (30, 3)
    with pytest.raises(ConfigError, match=r"model\.hidden_size = 30"):
        apply_overrides(TrainConfig(), ["--model.hidden_size=30"])


def test_later_override_of_same_key_wins() -> None:
    assert apply_overrides(TrainConfig(), ["--rl.steps=2", "--rl.steps=3"]).rl.steps == 3


def test_space_separated_values_and_hyphens_parse_too() -> None:
    cfg = apply_overrides(TrainConfig(), ["--rl.steps", "7", "--loss.ratio-max=6"])
    assert (cfg.rl.steps, cfg.loss.ratio_max) == (7, 6.0)


def test_optional_none_and_value() -> None:
    cfg = apply_overrides(TrainConfig(), ["--run.wandb_project=proj"])
    assert cfg.run.wandb_project == "proj"
    assert apply_overrides(cfg, ["--run.wandb_project=None"]).run.wandb_project is None


def test_unknown_key_names_it_and_suggests_the_closest_key(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, _, err = run_cli(capsys, "train", "--loss.ratio_mx=5")
    assert code == 2
    assert "--loss.ratio_mx" in err and "Perhaps you meant" in err and "--loss.ratio_max" in err
    assert "Traceback" not in err
    code, _, err = run_cli(capsys, "config", "--rl.stepz=1")
    assert code == 2 and "--rl.steps" in err
    with pytest.raises(ConfigError, match=r"loss\.ratio_max"):  # the library form
        apply_overrides(TrainConfig(), ["--loss.ratio_mx=5"])


def test_bad_literal_lists_allowed_values(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(capsys, "config", "--model.family=qwen3")
    assert code == 2
    assert "--model.family" in err and "'qwen3'" in err and "'llama', 'qwen2'" in err


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("--rl.steps=ten", "INT"),
        ("--rl.steps=1.5", "INT"),
        ("--optim.learning_rate=fast", "FLOAT"),
        ("--run.tensorboard=maybe", "true/false"),
    ],
)
def test_bad_value_names_field_value_and_expected_type(
    capsys: pytest.CaptureFixture[str], override: str, expected: str
) -> None:
    key, value = override.split("=", 1)
    code, _, err = run_cli(capsys, "config", override)
    assert code == 2
    assert key in err and value in err and expected in err, err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    "argv",
    [["--rl.steps"], ["--loss=cispo"], ["--rl.steps=3", "stray"], ["--rl.steps.x=1"]],
)
def test_malformed_overrides_are_errors(
    capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    code, out, err = run_cli(capsys, "config", *argv)
    assert code == 2 and out == "" and err.strip()


def test_unknown_command_suggests_the_closest(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(capsys, "trian")
    assert code == 2 and "did you mean 'train'" in err


# --------------------------------------------------------------------------------------------
# Validation at the boundary: every bad value stops before anything runs, exit 2, no traceback

BAD_VALUES = [
    ("--optim.weight_decay=nan", "optim.weight_decay = nan", "finite"),
    ("--optim.learning_rate=inf", "optim.learning_rate = inf", "finite"),
    ("--optim.learning_rate=-1", "optim.learning_rate = -1.0", "> 0"),
    ("--optim.beta1=1.5", "optim.beta1 = 1.5", "[0, 1)"),
    ("--eval.every=0", "eval.every = 0", ">= 1"),
    ("--run.keep_last=-1", "run.keep_last = -1", ">= 0"),
    ("--run.threads=-1", "run.threads = -1", ">= 0"),
    ("--task.digits=0", "task.digits = 0", ">= 1"),
    ("--task.ops=*/", "task.ops = '*/'", "'+-*'"),
    ("--task.ops=", "task.ops = ''", "non-empty"),
    ("--sampling.top_k=0", "sampling.top_k = 0", "-1"),
    ("--sampling.top_p=0", "sampling.top_p = 0.0", "(0, 1]"),
    ("--rl.minibatches=3", "rl.minibatches = 3", "divisor of rl.prompts_per_step=64"),
    ("--rl.advantage=grpoo", "rl.advantage = 'grpoo'", "did you mean 'grpo'"),
    ("--loss.name=cispoo", "loss.name = 'cispoo'", "did you mean 'cispo'"),
    ("--task.name=jsonl", "task.path = None", "existing JSONL file"),
    ("--model.base_model=no/such/dir", "model.base_model = 'no/such/dir'", "directory"),
    ("--model.hidden_size=130", "model.hidden_size = 130", "model.num_heads=4"),
]


@pytest.mark.parametrize(("override", "names", "allowed"), BAD_VALUES)
@pytest.mark.parametrize("command", ["config", "train"])
def test_a_bad_value_is_refused_before_anything_runs(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    command: str,
    override: str,
    names: str,
    allowed: str,
) -> None:
    ran: list[TrainConfig] = []
    monkeypatch.setattr(cispo.train.loop, "train", lambda config, **_: ran.append(config))
    run_dir = tmp_path / "run"
    code, out, err = run_cli(capsys, command, f"--run.dir={run_dir}", override)
    assert code == 2, (out, err)
    assert names in err and allowed in err, err
    assert "Traceback" not in err and out == ""
    assert not ran and not run_dir.exists()


@pytest.mark.parametrize(
    ("path", "text"),
    [
        (f"{s}.{f}", text)
        for s, f, tp in section_fields()
        if tp is float
        for text in ("nan", "inf", "-inf")
    ],
)
def test_every_float_field_refuses_nan_and_inf(
    capsys: pytest.CaptureFixture[str], path: str, text: str
) -> None:
    """Generated from the dataclasses: a new float field is covered without editing this test."""
    code, out, err = run_cli(capsys, "config", f"--{path}={text}")
    if text == "inf" and path in INF_ALLOWED:
        assert code == 0 and printed_config(out) == apply_overrides(
            TrainConfig(), [f"--{path}=inf"]
        )
        return
    assert code == 2, out
    assert f"{path} = {float(text)!r}" in err and "finite" in err, err


def test_the_float_sweep_is_not_empty() -> None:
    floats = {f"{s}.{f}" for s, f, tp in section_fields() if tp is float}
    assert {"optim.weight_decay", "optim.learning_rate", "loss.ratio_max"} <= floats
    assert len(floats) >= 20, floats


def test_every_numeric_field_must_declare_its_range() -> None:
    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Section:
        declared: int = 1
        forgotten: float = 0.5

    with pytest.raises(TypeError, match=r"x\.forgotten has no declared Range"):
        _validate(Section(), "x", {"declared": at_least(0)})


def test_a_recipe_building_a_bad_config_fails_with_the_field_named() -> None:
    with pytest.raises(ConfigError, match=r"rl\.steps = '3': must be int"):
        RLConfig(steps="3")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"optim\.weight_decay = True: must be float"):
        OptimConfig(weight_decay=True)
    with pytest.raises(ConfigError, match=r"optim\.weight_decay = -1: must be a finite number >="):
        OptimConfig(weight_decay=-1)  # an int in a float field is described as a float's range
    with pytest.raises(ConfigError, match=r"optim\.decay = 'linear': must be one of 'constant'"):
        OptimConfig(decay="linear")  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# Help from the docstrings


def test_train_help_lists_every_field_with_its_docstring(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, out, _ = run_cli(capsys, "train", "--help")
    assert code == 0
    text = squash(out)
    assert "--resume" in text
    for section, cls in typing.get_type_hints(TrainConfig).items():
        docs = attribute_docstrings(ROOT / "src/cispo/config.py", cls.__name__)
        for f in dataclasses.fields(cls):
            assert f"--{section}.{f.name} " in text, f.name
            assert " ".join(docs[f.name].split())[:60] in text, f"{section}.{f.name}"


def test_help_shows_the_recipes_values_as_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(capsys, "train", "smollm2_arithmetic_cispo", "--help")
    assert code == 0 and "(default: smollm2-135m)" in squash(out)


def test_serve_help_lists_every_server_config_field_with_its_docstring(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from cispo.server.runtime import ServerConfig

    code, out, _ = run_cli(capsys, "serve", "--help")
    assert code == 0
    text = squash(out)
    docs = attribute_docstrings(ROOT / "src/cispo/server/runtime.py", "ServerConfig")
    not_options = {"model_overrides", "engine"}  # a mapping and a nested optional: API only
    for f in dataclasses.fields(ServerConfig):
        option = f"--{f.name.replace('_', '-')}"
        if f.name in not_options:
            assert option not in text
            continue
        assert re.search(rf"{option}[ ,]", text), f.name
        assert " ".join(docs[f.name].split())[:60] in text, f.name
    assert "--host" in text and "--port" in text


@pytest.fixture
def served(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Any, str, int]]:
    """`cispo serve` up to uvicorn: records (ServerConfig, host, port) instead of serving."""
    import uvicorn

    import cispo.server.app

    calls: list[tuple[Any, str, int]] = []
    monkeypatch.setattr(cispo.server.app, "create_app", lambda config: config)
    monkeypatch.setattr(
        uvicorn, "run", lambda app, host, port, log_level: calls.append((app, host, port))
    )
    monkeypatch.delenv("CISPO_API_KEY", raising=False)
    return calls


def test_serve_builds_its_server_config_from_the_options(
    capsys: pytest.CaptureFixture[str],
    served: list[tuple[Any, str, int]],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    argv = ["serve", "--api-key", "tml-a", "--base-models", "tiny", str(tmp_path), "--port=9001"]
    assert run_cli(capsys, *argv, "--full-finetune", f"--root={tmp_path}")[0] == 0
    config, host, port = served[-1]
    assert (host, port, config.api_key, config.root) == ("127.0.0.1", 9001, "tml-a", tmp_path)
    assert config.base_models == ("tiny", str(tmp_path)) and config.full_finetune is True
    monkeypatch.setenv("CISPO_API_KEY", "tml-env")
    assert run_cli(capsys, "serve")[0] == 0 and served[-1][0].api_key == "tml-env"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "--api-key"),
        (["--api-key=tml-a", "--max-request-bytes=10"], "max_request_bytes must be >= 1024"),
        (["--api-key=tml-a", "--poll-timeout=nan"], "poll_timeout must be a finite number"),
        (["--api-key=tml-a", "--port=70000"], "port must be in [0, 65535]"),
        (["--api-key=tml-a", "--base-model=tiny"], "--base-models"),
    ],
)
def test_serve_refuses_bad_options_with_exit_2(
    capsys: pytest.CaptureFixture[str],
    served: list[tuple[Any, str, int]],
    argv: list[str],
    message: str,
) -> None:
    code, _, err = run_cli(capsys, "serve", *argv)
    assert code == 2 and message in err and "Traceback" not in err, err
    assert not served


# --------------------------------------------------------------------------------------------
# train: the recipe, --resume, the README's commands


@pytest.fixture
def trained(monkeypatch: pytest.MonkeyPatch) -> list[tuple[TrainConfig, bool]]:
    calls: list[tuple[TrainConfig, bool]] = []
    monkeypatch.setattr(
        cispo.train.loop, "train", lambda config, resume=False: calls.append((config, resume))
    )
    return calls


def test_train_takes_the_recipe_overrides_resume_and_the_equals_form(
    capsys: pytest.CaptureFixture[str], trained: list[tuple[TrainConfig, bool]]
) -> None:
    assert run_cli(capsys, "train", "--run.dir=runs/x", "--resume")[0] == 0
    config, resume = trained[-1]
    assert resume is True and config.run.dir == "runs/x"
    assert config == dataclasses.replace(load_recipe(cli.DEFAULT_RECIPE), run=config.run)
    argv = ["train", "arithmetic_cispo_async", "--rl.steps=40", "--loss.ratio_max=5"]
    assert run_cli(capsys, *argv)[0] == 0
    config, resume = trained[-1]
    recipe = load_recipe("arithmetic_cispo_async")
    assert resume is False and config.asynchronous == recipe.asynchronous
    assert (config.rl.steps, config.loss.ratio_max) == (40, 5.0)
    assert config.loss.anchor == recipe.loss.anchor  # the rest of the recipe is kept


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    using = text.split("## Using it", 1)[1].split("\n## ", 1)[0]
    lines = [line.split("#", 1)[0].strip() for line in using.splitlines()]
    return [line for line in lines if line.startswith("cispo ")]


@pytest.mark.parametrize("line", readme_commands())
def test_every_command_in_the_readme_parses(
    capsys: pytest.CaptureFixture[str],
    trained: list[tuple[TrainConfig, bool]],
    served: list[tuple[Any, str, int]],
    tmp_path: Path,
    line: str,
) -> None:
    recipe = tmp_path / "my_recipe.py"
    recipe.write_text(RECIPE)
    argv = line.replace("path/to/my_recipe.py", str(recipe)).split()[1:]
    if argv[0] == "export":  # needs a trained run; its options parse (tests/test_export.py runs it)
        argv.append("--help")
    code, _, err = run_cli(capsys, *argv)
    assert code == 0, err
    runs = argv[0] in ("train", "serve") and "--help" not in argv
    assert len(trained) + len(served) == runs


def test_the_readme_documents_train_config_and_serve() -> None:
    commands = readme_commands()
    assert {c.split()[1] for c in commands} >= {"train", "config", "serve"}
    assert any("--resume" in c for c in commands) and any(".py" in c for c in commands)


def test_python_dash_m_cispo_runs_the_cli() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    result = subprocess.run(
        [sys.executable, "-m", "cispo", "config", "--rl.steps=3"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert printed_config(result.stdout).rl.steps == 3


def test_a_bad_jsonl_file_stops_train_with_file_line_and_exit_2(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    data = tmp_path / "data.jsonl"
    data.write_bytes(b'{"prompt": "1+1=", "answer": "2"}\n{"prompt": "\xff", "answer": "3"}\n')
    run_dir = tmp_path / "run"
    argv = ["train", "--task.name=jsonl", f"--task.path={data}", f"--run.dir={run_dir}"]
    code, _, err = run_cli(capsys, *argv)
    assert code == 2 and f"{data}:2: not UTF-8: byte 0xff" in err and "Traceback" not in err
    assert not (run_dir / "checkpoints").exists()


# --------------------------------------------------------------------------------------------
# config.json: to_dict / from_dict


def test_config_prints_every_field_of_every_section(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(capsys, "config", "--rl.epochs=2")
    assert code == 0
    data = json.loads(out)
    assert {(s, f) for s, f, _ in section_fields()} == {
        (s, f) for s, section in data.items() for f in section
    }
    assert data["rl"]["epochs"] == 2


def test_dict_round_trip_is_exact_and_json_safe() -> None:
    cfg = apply_overrides(
        load_recipe("arithmetic_cispo_async"),
        ["--loss.ratio_max=inf", "--run.wandb_project=p", "--rl.epochs=2"],
    )
    data = json.loads(json.dumps(to_dict(cfg), allow_nan=False))
    assert data["loss"]["ratio_max"] == "inf"
    back = from_dict(TrainConfig, data)
    assert back == cfg and math.isinf(back.loss.ratio_max)


def test_from_dict_is_strict() -> None:
    data = to_dict(TrainConfig())
    data["loss"]["ratio_mx"] = 1.0
    with pytest.raises(ConfigError, match=r"'loss.ratio_mx'; did you mean 'loss.ratio_max'"):
        from_dict(TrainConfig, data)
    with pytest.raises(ConfigError, match=r"rl.steps = '5x': must be int"):
        from_dict(TrainConfig, {"rl": {"steps": "5x"}})
    with pytest.raises(ConfigError, match=r"run.tensorboard = 1: must be bool"):
        from_dict(TrainConfig, {"run": {"tensorboard": 1}})
    with pytest.raises(ConfigError, match=r"optim.beta1 = 2.0: must be a finite number in \[0"):
        from_dict(TrainConfig, {"optim": {"beta1": 2.0}})
    with pytest.raises(ConfigError, match=r"rl = 3: must be a JSON object of RLConfig fields"):
        from_dict(TrainConfig, {"rl": 3})

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Required:
        steps: int

    with pytest.raises(ConfigError, match=r"missing config keys for Required: steps"):
        from_dict(Required, {})


def test_a_tiny_train_run_writes_config_json_that_reads_back(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    argv = [*TINY_RUN, "--sft.steps=2", "--rl.steps=1", "--eval.num_problems=4"]
    code, _, err = run_cli(capsys, "train", *argv, f"--run.dir={tmp_path}", "--run.threads=1")
    assert code == 0, err
    rows = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["step"] for r in rows] == [0, 1]  # it trained: one RL step
    written = from_dict(TrainConfig, json.loads((tmp_path / "config.json").read_text()))
    expected = apply_overrides(TrainConfig(), [*argv, f"--run.dir={tmp_path}", "--run.threads=1"])
    assert written == expected


# --------------------------------------------------------------------------------------------
# Recipes

RECIPE = """
from __future__ import annotations
from cispo.config import RLConfig, TrainConfig

def recipe() -> TrainConfig:
    return TrainConfig(rl=RLConfig(steps=11))
"""


def test_recipe_loads_from_file_and_accepts_overrides(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = tmp_path / "my_recipe.py"
    path.write_text(RECIPE)
    assert load_recipe(str(path)).rl.steps == 11
    code, out, _ = run_cli(capsys, "config", str(path), "--rl.epochs=2")
    assert code == 0
    cfg = printed_config(out)
    assert (cfg.rl.steps, cfg.rl.epochs) == (11, 2)


@pytest.mark.parametrize(
    ("source", "message"),
    [
        (None, "recipe file not found"),
        ("x = 1\n", r"defines no recipe() function"),
        ("def recipe():\n    return 3\n", "returned int, not TrainConfig"),
        (
            "from cispo.config import RLConfig\ndef recipe():\n    return RLConfig(steps=-1)\n",
            "rl.steps = -1: must be an integer >= 0",
        ),
    ],
)
def test_recipe_errors_exit_2_with_a_message(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, source: str | None, message: str
) -> None:
    path = tmp_path / "r.py"
    if source is not None:
        path.write_text(source)
    code, _, err = run_cli(capsys, "train", str(path))
    assert code == 2 and message in err and "Traceback" not in err, err


def test_an_unknown_recipe_name_suggests_the_closest(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(capsys, "config", "arithmetic_cipso")
    assert code == 2 and "did you mean 'arithmetic_cispo'" in err
