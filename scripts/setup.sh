#!/usr/bin/env bash
# Prepare a machine to run hub-transfer's demo and tests, idempotently:
#   .venv        the project (editable) with its test and lint tools,
#                JupyterHub 6 (the newest the service supports)
#   .venv-hub55  the same with JupyterHub 5.5, the zero-to-jupyterhub release
#   .tools       configurable-http-proxy from npm, for the real hubs
# Needs python3 (3.11+), npm and network access to PyPI and npm only.
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3}
quiet=(--quiet --disable-pip-version-check)

make_venv() {
    local dir=$1 hub=$2
    if [ ! -x "$dir/bin/python" ]; then
        echo "setup: creating $dir"
        "$python" -m venv "$dir"
    fi
    echo "setup: installing hub-transfer and $hub into $dir"
    "$dir/bin/python" -m pip install "${quiet[@]}" --upgrade pip
    "$dir/bin/python" -m pip install "${quiet[@]}" -e ".[test,lint]" "$hub"
}

make_venv .venv "jupyterhub>=6,<7"
if [ "${1:-}" = "--with-hub55" ]; then
    make_venv .venv-hub55 "jupyterhub==5.5.*"
fi

if [ ! -x .tools/node_modules/.bin/configurable-http-proxy ]; then
    echo "setup: installing configurable-http-proxy into .tools"
    npm install --silent --no-audit --no-fund --prefix .tools \
        configurable-http-proxy@5 >/dev/null
fi
echo "setup: done"
