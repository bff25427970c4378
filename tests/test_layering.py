"""The package's imports run in one direction: every module imports only its own layer or lower
ones, and no two modules import each other, directly or around a circle (lazy imports inside
functions count too). The layers, low to high, are the data-flow order of CONTRIBUTING.md."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "cispo"

LAYERS: list[set[str]] = [
    {"types", "tokenizer", "prompts"},  # leaf data types and text encoding
    {
        "models",
        "tasks",
        "rewards",
        "advantages",
        "datums",
        "losses",
        "ops",
        "checkpoint",
        "logging",
    },  # maths, models and I/O helpers
    {"config"},  # typed run configuration (plain dataclasses)
    {"distributed"},  # process group, FSDP2 sharding, DCP checkpoints: below the engine
    {"engine"},  # model + optimizer, collation, the HF sampler
    {"client"},  # the Tinker-style API over the engine
    {"server", "rollout", "export"},  # HTTP protocol over the engine; prompts → datums
    {"asynchronous"},  # the sampler worker process and its pacing
    {"train"},  # the loop, warm start, evaluation, run directory
    {"recipes"},
    {"cli", "__main__"},
]


def _unit(module: str) -> str:
    """`cispo.engine.sampler` -> `engine`; `cispo` itself -> `` (the package root)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _layer(unit: str) -> int:
    for i, layer in enumerate(LAYERS):
        if unit in layer:
            return i
    raise AssertionError(f"cispo.{unit} is in no layer of tests/test_layering.py: place it")


def _module_name(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path, module: str) -> set[str]:
    """Every `cispo.*` module `path` imports (`from cispo.x import y` counts `cispo.x.y` when that
    is a module, else `cispo.x`)."""
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("cispo")}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            if not base.startswith("cispo"):
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in MODULES else base)
    return found - {module}


MODULES = {_module_name(p): p for p in SRC.rglob("*.py")}
GRAPH = {name: _imports(path, name) for name, path in MODULES.items()}


def test_every_import_goes_to_the_same_or_a_lower_layer() -> None:
    upward = [
        f"{a} (layer {_layer(_unit(a))}) imports {b} (layer {_layer(_unit(b))})"
        for a, targets in GRAPH.items()
        if a != "cispo"
        for b in targets
        if b != "cispo" and _layer(_unit(b)) > _layer(_unit(a))
    ]
    assert not upward, "imports that run upward:\n" + "\n".join(sorted(upward))


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as a path [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_two_modules_import_each_other_around_a_circle() -> None:
    # A package's __init__ re-exporting its modules is not a circle of the code itself.
    graph = {
        a: {b for b in targets if not (MODULES[b].name == "__init__.py" and a.startswith(b + "."))}
        for a, targets in GRAPH.items()
    }
    assert _cycle(graph) is None, "import circle: " + " -> ".join(_cycle(graph) or [])


def test_no_two_packages_import_each_other() -> None:
    units: dict[str, set[str]] = {}
    for a, targets in GRAPH.items():
        units.setdefault(_unit(a), set()).update(_unit(b) for b in targets if _unit(b) != _unit(a))
    units.pop("", None)
    assert _cycle(units) is None, "package circle: " + " -> ".join(_cycle(units) or [])


@pytest.mark.parametrize(
    ("graph", "expected"),
    [({"a": {"b"}, "b": {"a"}}, ["a", "b", "a"]), ({"a": {"b"}, "b": set()}, None)],
)
def test_the_cycle_finder_finds_a_planted_circle(
    graph: dict[str, set[str]], expected: list[str] | None
) -> None:
    assert _cycle(graph) == expected
