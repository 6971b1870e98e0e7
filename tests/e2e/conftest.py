"""Fixtures: a real JupyterHub running hub-transfer, and the Globus stand-in.

The machinery lives in ``hub_transfer.testing.localhub`` so the demo and the
crash and stress tests share it. The hub runs from the Python named by
``HUB_PYTHON`` (default: the one running pytest), so the same tests cover
JupyterHub 5.5 and 6.1 by pointing at another venv.
"""

from __future__ import annotations

import json
import os
import pathlib
import sys
import typing as t

import pytest

from hub_transfer.testing.localhub import (
    GlobusSetup,
    LocalHub,
    LocalHubError,
    argv_of,
    http,
    proxy_on_path,
)

# the names the tests import from here
Hub = LocalHub
__all__ = ["GlobusSetup", "Hub", "argv_of", "http", "hub_python"]

USERS = ("alice", "bob")


def hub_python() -> str:
    """The interpreter that runs the hub (and therefore the service)."""
    return os.environ.get("HUB_PYTHON") or sys.executable


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "e2e: starts a real JupyterHub and the Globus stand-in"
    )


@pytest.fixture(scope="session")
def hub_globus() -> t.Iterator[GlobusSetup]:
    """The Globus stand-in with the service's client and two users' identities."""
    with GlobusSetup.start(USERS, client_name="hub-transfer e2e") as globus:
        yield globus


@pytest.fixture(scope="session")
def hub(
    hub_globus: GlobusSetup, tmp_path_factory: pytest.TempPathFactory
) -> t.Iterator[LocalHub]:
    """JupyterHub with hub-transfer loaded from the shipped config fragment."""
    python = hub_python()
    path = os.pathsep.join([str(pathlib.Path(python).parent), os.environ["PATH"]])
    if proxy_on_path(path) is None:
        pytest.skip("configurable-http-proxy is not on PATH (run scripts/setup.sh)")

    running = LocalHub(
        tmp_path_factory.mktemp("hub"),
        python=python,
        users=USERS,
        service_env=hub_globus.service_env(),
    )
    try:
        try:
            running.start()
        except LocalHubError as exc:
            pytest.fail(str(exc))
        yield running
    finally:
        outcome = running.stop()
        if outcome["leftovers"]:
            print("killed what the hub left running:", json.dumps(outcome))


@pytest.fixture(scope="session")
def hub_log_path(hub: LocalHub) -> pathlib.Path:
    """Where the hub's and the service's output go (for log-content tests)."""
    return hub.log_path
