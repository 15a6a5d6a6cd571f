"""The code in README.md's quickstart and in docs/tutorial.md runs as written, on stories260k.

The model directory comes from MARKOVMEM_TEST_MODEL; the tests skip without it.  Each
snippet's placeholder line ``MODEL = "path/to/stories260k"`` is pointed at that directory.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODEL_DIR = os.environ.get("MARKOVMEM_TEST_MODEL")
pytestmark = pytest.mark.skipif(not MODEL_DIR, reason="MARKOVMEM_TEST_MODEL is not set (a stories260k directory)")
PLACEHOLDER = re.compile(r'^MODEL = "path/to/stories260k".*$', re.MULTILINE)


def _run(code: str, where: str) -> dict[str, Any]:
    pytest.importorskip("torch")
    assert PLACEHOLDER.search(code), f'{where} has no MODEL = "path/to/stories260k" line'
    code = PLACEHOLDER.sub(f"MODEL = {MODEL_DIR!r}", code)
    namespace: dict[str, Any] = {"__name__": "__docs_example__"}
    exec(compile(code, where, "exec"), namespace)  # noqa: S102 - runs the documentation's own code: the point of the test
    return namespace


def test_readme_quickstart_runs_and_certifies(capsys: pytest.CaptureFixture[str]) -> None:
    text = (ROOT / "README.md").read_text()
    m = re.search(r"<!-- quickstart -->\n```python\n(.*?)```\n<!-- /quickstart -->", text, re.DOTALL)
    assert m, "README.md has no quickstart block"
    assert len(m.group(1).splitlines()) <= 20, "the quickstart is meant to stay short"
    ns = _run(m.group(1), "README.md quickstart")
    result, cert = ns["result"], ns["cert"]
    assert cert.ok and result.report.ok
    assert result.report.max_abs_logit_diff == 0.0
    decomposition = result.decomposition(ns["tokenizer"])
    assert list(decomposition) == ["glorp"] and decomposition["glorp"]
    out = capsys.readouterr().out
    assert "glorp" in out and str(cert) in out


def test_tutorial_runs_end_to_end() -> None:
    text = (ROOT / "docs" / "tutorial.md").read_text()
    blocks = re.findall(r"^```python\n(.*?)^```$", text, re.DOTALL | re.MULTILINE)
    assert len(blocks) >= 5, "docs/tutorial.md lost its code blocks"
    ns = _run("\n".join(blocks), "docs/tutorial.md")
    assert ns["cert"].ok and ns["result"].report.ok
    # The merged export loads in plain transformers with the new word in its vocabulary.
    assert ns["logits"].shape[-1] == ns["result"].matrix.n_base + 1
