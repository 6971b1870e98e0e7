"""Fixtures that run the real globus-sdk against the Globus stand-in.

- ``globus``: one stand-in process for the session, with a confidential client
  (Access Manager of ``HUB_COLLECTION``) and Globus identities for alice and bob
- ``globus_env``: points globus-sdk at it for the duration of a test
- ``real_submitter``: a TransferSubmitter using the client, retries off
"""

from __future__ import annotations

import os
import typing as t

import pytest

from hub_transfer.globus import TransferSubmitter
from hub_transfer.testing.standin import StandInProcess

HUB_COLLECTION = "c0ffee00-0000-4000-8000-000000000001"
CRYPT_KEY = "6f" * 32


class Globus:
    """The running stand-in plus the client and identities tests use."""

    def __init__(self, standin: StandInProcess) -> None:
        self.standin = standin
        self.client = standin.create_client(access_manager_of=[HUB_COLLECTION])
        self.scope = self.client["scope"]
        self.identities = {
            name: standin.create_identity(f"{name}@example.org")
            for name in ("alice", "bob", "admin")
        }

    def identity(self, name: str) -> str:
        return self.identities[name]["id"]

    def user_token(self, name: str, **kwargs: t.Any) -> str:
        """A token for the custom scope, as the JupyterLab extension holds it."""
        issued = self.standin.issue_token(
            self.identity(name), client_id=self.client["client_id"], **kwargs
        )
        return issued["access_token"]

    def rules(self) -> list[dict[str, t.Any]]:
        return self.standin.acl_rules(HUB_COLLECTION)

    def operations(self) -> list[str]:
        return [call["operation"] for call in self.standin.calls()]


@pytest.fixture(scope="session")
def globus_process() -> t.Iterator[StandInProcess]:
    with StandInProcess() as standin:
        yield standin


@pytest.fixture
def globus(globus_process, monkeypatch) -> t.Iterator[Globus]:
    """A clean stand-in state, and globus-sdk pointed at it."""
    globus_process.reset()
    for name, value in globus_process.env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("HUB_TRANSFER_CRYPT_KEY", CRYPT_KEY)
    yield Globus(globus_process)
    globus_process.clear_faults()


@pytest.fixture
def real_submitter(globus) -> t.Iterator[TransferSubmitter]:
    submitter = TransferSubmitter(
        client_id=globus.client["client_id"],
        client_secret=globus.client["client_secret"],
        required_scope=globus.scope,
        max_retries=0,
    )
    yield submitter
    submitter.close()


def env_without_globus() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("GLOBUS_")}
