"""The README's top holds exactly two set-up commands, and CI runs the second one."""

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _bash_blocks(text: str) -> list[str]:
    return re.findall(r"```bash\n(.*?)\n```", text, flags=re.S)


def test_readme_top_has_exactly_two_setup_commands_before_any_section() -> None:
    text = (ROOT / "README.md").read_text()
    top = text.split("\n## ", 1)[0]
    blocks = _bash_blocks(top)
    assert len(blocks) == 2, blocks
    assert all("\n" not in b for b in blocks), "each set-up command is one line"
    assert "cispo train" in blocks[0]
    assert "make check test" in blocks[1]


def test_ci_runs_the_readme_test_command_verbatim() -> None:
    out = subprocess.run(
        ["awk", "/^<!-- test-command -->/{getline; getline; print; exit}", "README.md"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert out == _bash_blocks((ROOT / "README.md").read_text())[1]
    assert "README.md" in (ROOT / ".ci" / "run").read_text()
