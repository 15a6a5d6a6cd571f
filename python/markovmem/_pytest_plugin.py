"""pytest plugin for Markov invariants (registered through the ``pytest11`` entry point).

- the ``markov_invariants`` fixture: the helpers of :mod:`markovmem.testing`, so
  a CI test is one line::

      def test_new_tokens_kept_old_chain(markov_invariants):
          markov_invariants.assert_expansion_preserves("base.safetensors", "expanded.safetensors")

- ``pytest --markovmem-expansion BASE EXPANDED`` adds a test that checks the two
  files without writing any test code (repeat the option for several pairs).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

pytest.register_assert_rewrite("markovmem.testing")


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("markovmem", "Markov invariants (markovmem)")
    group.addoption(
        "--markovmem-expansion",
        action="append",
        nargs=2,
        metavar=("BASE", "EXPANDED"),
        default=[],
        help="check that the matrix file EXPANDED extends BASE without changing any old transition",
    )


@pytest.fixture
def markov_invariants() -> Any:
    """The module :mod:`markovmem.testing` (assert_expansion_preserves, assert_valid, ...)."""
    from markovmem import testing

    return testing


class MarkovExpansionItem(pytest.Item):
    """A generated test: BASE -> EXPANDED keeps every old transition."""

    def __init__(self, *, base: str, expanded: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.base = base
        self.expanded = expanded

    def runtest(self) -> None:
        from markovmem.testing import assert_expansion_preserves

        assert_expansion_preserves(self.base, self.expanded)

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException], style: Any = None) -> str:
        if isinstance(excinfo.value, AssertionError):
            return f"{self.base} -> {self.expanded}: {excinfo.value}"
        return str(super().repr_failure(excinfo))

    def reportinfo(self) -> tuple[Path, int, str]:
        return Path(self.expanded), 0, f"markovmem expansion {self.base} -> {self.expanded}"


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    for base, expanded in config.getoption("markovmem_expansion") or []:
        items.append(
            MarkovExpansionItem.from_parent(
                session,
                name=f"markovmem_expansion[{Path(base).name}->{Path(expanded).name}]",
                base=base,
                expanded=expanded,
            )
        )
