"""The checks' versions agree everywhere: the `lint`/`docs` extras, pre-commit and .ci/run."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

ROOT = Path(__file__).resolve().parents[1]


def _extras() -> dict[str, str]:
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    pins = {}
    for req in extras["lint"] + extras["docs"]:
        name, _, version = req.partition("==")
        assert version, f"{req!r} in the lint/docs extras is not pinned with =="
        pins[name] = version
    return pins


def test_pre_commit_pins_the_extras_versions() -> None:
    pins = _extras()
    config = (ROOT / ".pre-commit-config.yaml").read_text()
    used = dict(re.findall(r'"([a-z-]+)==([0-9.]+)"', config))
    used.update(re.findall(r"\b(mypy|mkdocs)==([0-9.]+) from the", config))
    assert used, ".pre-commit-config.yaml pins no version"
    for name, version in used.items():
        assert pins.get(name) == version, f"pre-commit runs {name}=={version}; the extras pin {pins.get(name)}"
    assert {"ruff", "clang-format", "mypy", "mkdocs"} <= set(used)


def test_ci_runs_every_check_before_the_tests() -> None:
    ci = (ROOT / ".ci" / "run").read_text()
    checks = ["ruff check", "ruff format --check", "mypy", "clang-format --dry-run -Werror", "mkdocs build --strict"]
    tests_at = ci.index('bash -euo pipefail -c "$test_command"')
    for check in checks:
        assert check in ci[:tests_at], f".ci/run does not run `{check}` before the tests"
    assert "lint" in ci and "docs" in ci, ".ci/run must install the lint and docs extras"
