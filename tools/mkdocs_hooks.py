"""MkDocs hooks of the documentation site (mkdocs.yml: ``hooks``).

- The benchmark figures live once, under bench/results/, where the scripts write them; the
  site serves each PNG there at ``results/<same path>`` (docs link to ``../results/...``).
- The build fails unless every public name of markovmem, markovmem.llm and markovmem.testing
  (their ``__all__``) has a docstring and a ``::: identifier`` entry in docs/reference/.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import itertools
import re
from pathlib import Path
from typing import Any

from mkdocs.config.defaults import MkDocsConfig
from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
PUBLIC_MODULES = ("markovmem", "markovmem.llm", "markovmem.testing")
#: Public names that are data, not code: documented by the page that lists them.
NOT_OBJECTS = {"__version__"}


def on_files(files: Files, config: MkDocsConfig) -> Files:
    """Serve bench/results/**/*.png at results/**/*.png."""
    for png in sorted(RESULTS.rglob("*.png")):
        uri = "results/" + png.relative_to(RESULTS).as_posix()
        files.append(File.generated(config, uri, abs_src_path=str(png)))
    return files


def _resolve(identifier: str) -> Any:
    """The object behind a dotted identifier: the longest importable module, then attributes."""
    parts = identifier.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj: Any = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for name in parts[cut:]:
            obj = getattr(obj, name)
        return obj
    raise PluginError(f"docs/reference: cannot import {identifier!r}")


def _attribute_docstring(module: Any, name: str) -> str:
    """The string literal right after ``name = ...`` in the module's source (how griffe documents data)."""
    body = ast.parse(inspect.getsource(module)).body
    for stmt, after in itertools.pairwise(body):
        targets = (
            stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target] if isinstance(stmt, ast.AnnAssign) else []
        )
        named = any(isinstance(t, ast.Name) and t.id == name for t in targets)
        if named and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant):
            return after.value.value if isinstance(after.value.value, str) else ""
    return ""


def _own_docstring(module: Any, obj: Any, name: str) -> bool:
    if not (inspect.isclass(obj) or inspect.isroutine(obj) or inspect.ismodule(obj)):
        return bool(_attribute_docstring(module, name).strip())
    doc = inspect.getdoc(obj) or ""
    if inspect.isclass(obj):
        doc = obj.__dict__.get("__doc__") or ""
        # dataclasses write their signature as the docstring of a class that has none
        if doc.startswith(f"{name}("):
            return False
    return bool(doc.strip())


def on_pre_build(config: MkDocsConfig) -> None:
    """Fail the build when a public name has no docstring or no reference entry."""
    docs = Path(config["docs_dir"])
    identifiers = []
    for page in sorted((docs / "reference").glob("*.md")):
        identifiers += re.findall(r"^::: ([\w.]+)\s*$", page.read_text(), flags=re.MULTILINE)
    try:
        documented = {id(_resolve(i)) for i in identifiers}
        missing = []
        for module_name in PUBLIC_MODULES:
            module = importlib.import_module(module_name)
            for name in module.__all__:
                if name in NOT_OBJECTS:
                    continue
                obj = getattr(module, name)
                where = f"{module_name}.{name}"
                if id(obj) not in documented:
                    missing.append(f"{where} has no '::: ' entry in docs/reference/")
                if not _own_docstring(module, obj, name):
                    missing.append(f"{where} has no docstring")
    except ImportError as exc:
        raise PluginError(
            f"the API reference imports markovmem and its adapter: install with "
            f'`pip install -c constraints.txt -e ".[llm,docs]"` ({exc})'
        ) from exc
    if missing:
        raise PluginError("undocumented public names:\n  " + "\n  ".join(missing))
