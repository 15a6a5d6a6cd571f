#!/usr/bin/env bash
# Apply the project's formatters to the whole tree: ruff's autofixes (imports sorted,
# pyupgrade, unused noqa removed...), ruff format, then clang-format on cpp/ and bindings/
# (extern/ is vendored and left alone); ruff formats the Python blocks of Markdown files too.
# The versions are the `lint` extra's:
#   pip install -c constraints.txt -e ".[lint]"
# Prints how many files changed.  .ci/run and pre-commit check what this script writes.
set -euo pipefail
cd "$(dirname "$0")/.."

before="$(mktemp)"
after="$(mktemp)"
trap 'rm -f "$before" "$after"' EXIT
snapshot() { git ls-files -z -- '*.py' '*.pyi' '*.md' 'cpp/*' 'bindings/*' | xargs -0 md5sum; }
snapshot >"$before"

ruff check --fix --quiet . || true # what autofix leaves behind, `ruff check .` reports below
ruff format --quiet .
git ls-files -z -- 'cpp/*.cpp' 'cpp/*.hpp' 'cpp/*.inc' 'bindings/*.cpp' 'bindings/*.hpp' |
  xargs -0 clang-format -i --style=file

snapshot >"$after"
changed="$(diff "$before" "$after" | grep -c '^>' || true)"
echo "tools/format.sh: ${changed} file(s) changed"
ruff check --quiet .
