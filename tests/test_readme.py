"""README.md is the front door: exactly two commands, and CI runs the test one."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _block(text: str, marker: str) -> list[str]:
    m = re.search(rf"<!-- {marker} -->\n```bash\n(.*?)```\n<!-- /{marker} -->", text, re.DOTALL)
    assert m, f"README.md has no {marker} block"
    return [line for line in m.group(1).splitlines() if line.strip()]


def test_readme_has_one_main_and_one_test_command() -> None:
    text = (ROOT / "README.md").read_text()
    main = _block(text, "main-command")
    test = _block(text, "test-command")
    assert len(main) == 1 and "markovmem" in main[0]
    assert len(test) == 1 and "pytest" in test[0]
    assert "constraints.txt" in main[0] and "constraints.txt" in test[0]


def test_ci_runs_the_readme_test_command() -> None:
    ci = (ROOT / ".ci" / "run").read_text()
    assert "<!-- test-command -->" in ci
    assert "MARKOVMEM_TEST_MODEL" in ci


def test_constraints_pin_cpu_torch() -> None:
    lines = (ROOT / "constraints.txt").read_text().splitlines()
    assert "torch==2.13.0" in [line.strip() for line in lines]
