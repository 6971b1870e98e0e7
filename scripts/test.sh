#!/usr/bin/env bash
# Set up (idempotently) and run every check CI runs: lint, types, the unit and
# in-process tests, the end-to-end tests against real JupyterHub 6 and 5.5,
# the robustness suite and a short benchmark.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh --with-hub55
export PATH="$PWD/.tools/node_modules/.bin:$PATH"
bin=.venv/bin

echo "== lint and types"
"$bin/ruff" check .
"$bin/ruff" format --check .
"$bin/mypy" hub_transfer

echo "== tests, end-to-end with JupyterHub 6"
"$bin/python" -m pytest -q tests

echo "== end-to-end with JupyterHub 5.5"
HUB_PYTHON="$PWD/.venv-hub55/bin/python" "$bin/python" -m pytest -q tests/e2e

echo "== robustness suite: faults, kills, shutdown, hostile callers, secrets"
"$bin/python" -m pytest -q -p no:logging tests/stress

echo "== the README's demo"
"$bin/python" scripts/demo.py

echo "== benchmark, short form (prints figures; fails only on wrong results)"
"$bin/python" benchmarks/bench_submit.py --short
