"""The prepared accelerator check (`benchmarks/accelerator_throughput.py`) runs on CPU.

It is meant for a machine this suite never sees (a GPU, ≤ 10 minutes, one go), so its `--smoke`
size runs here: a script that has rotted would waste the one device run a session gets.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_accelerator_throughput_script_trains_samples_and_writes_its_json(
    tmp_path: Path,
) -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import accelerator_throughput
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    out = tmp_path / "throughput.json"
    results = accelerator_throughput.main(["--smoke", "--out", str(out)])
    assert out.read_text().strip().startswith("{")
    assert results["device"] == "cpu" and results["parameters"] > 0
    assert results["update"]["engine"] == "shared_prefix"  # the engine's default path
    for section, rate in (
        ("update", "computed_tokens_per_s"),
        ("sampling", "generated_tokens_per_s"),
    ):
        assert results[section][rate] > 0, section
    # each group's prompt computed once: fewer computed than trained tokens
    assert results["update"]["computed_tokens_per_s"] < results["update"]["trained_tokens_per_s"]
