"""markovmem.llm: the torch + transformers adapter (distill a model, add tokens, tune, verify).

This is the only entry point that imports torch, and it does so lazily on
first attribute access, so ``import markovmem`` (and ``import markovmem.llm``)
work without torch.  Public names resolve to their submodule on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

#: public name -> submodule that defines it
_EXPORTS = {
    "MarkovMemConfig": "config",
    "LearnTokensConfig": "config",
    "NewTokenEmbeddingLayer": "layer",
    "NewTokenOutputLayer": "layer",
    "MarkovMemModel": "model",
    "add_tokens": "model",
    "alpha_to_embeddings": "model",
    "base_checksums": "model",
    "base_fingerprint": "model",
    "get_expansion": "model",
    "remove_expansion": "model",
    "set_embeddings": "model",
    "dictionary_info": "distillation",
    "distill": "distillation",
    "next_token_counts": "distillation",
    "TuneHistory": "tuning",
    "embedding_tune": "tuning",
    "ForgettingReport": "verify",
    "verify_no_forgetting": "verify",
    "LeakCalibration": "leak",
    "calibrate_leak": "leak",
    "export_merged": "expansion_io",
    "load_expansion": "expansion_io",
    "save_expansion": "expansion_io",
    "LearnResult": "pipeline",
    "TokenReport": "pipeline",
    "learn_tokens": "pipeline",
    "ColumnEvidence": "columns",
    "OutputInit": "columns",
    "RowLogs": "columns",
    "column_evidence": "columns",
    "output_init": "columns",
    "row_loglik": "columns",
    "two_sided_support": "columns",
    "PseudoWord": "pseudowords",
    "PseudoWordBench": "pseudowords",
    "PseudoWordBenchConfig": "pseudowords",
    "PseudoWordCorpus": "pseudowords",
    "build_corpus": "pseudowords",
    "DemoResult": "demo",
    "run_demo": "demo",
}

__all__ = sorted(_EXPORTS)  # noqa: PLE0605 - built from _EXPORTS so the two lists cannot drift apart

_INSTALL_HINT = "markovmem.llm needs torch and transformers; install them with `pip install markovmem[llm]`"


def _require_torch() -> None:
    """Import torch and transformers once, turning their absence into one clear ImportError."""
    missing = []
    for name in ("torch", "transformers", "safetensors"):
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ImportError(f"{_INSTALL_HINT} (missing: {', '.join(missing)})")


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'markovmem.llm' has no attribute {name!r}")
    _require_torch()
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
