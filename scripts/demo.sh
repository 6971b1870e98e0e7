#!/usr/bin/env bash
# hub-transfer demo: set up (idempotently), then run a real JupyterHub with
# hub-transfer in ACL mode against the local Globus stand-in, submit transfers
# as the JupyterLab extension would, and stop everything. Exits 0 only if every
# step worked. Everything listens on 127.0.0.1; scratch files go to a temp dir.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh
# the hub starts configurable-http-proxy by name
export PATH="$PWD/.tools/node_modules/.bin:$PATH"
exec .venv/bin/python scripts/demo.py "$@"
