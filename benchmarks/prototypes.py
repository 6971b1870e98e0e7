"""Throw-away prototypes of proposed service changes, for measuring only.

Loaded by ``service_config.py`` inside the service process when
``HUB_TRANSFER_BENCH_PROTOTYPE`` names one (``bench_submit.py --prototype``);
never otherwise. Each replaces ``TransferSubmitter.submit`` for the happy path
only, so a proposal's gain can be measured before anyone changes the service.
They keep the Globus calls of the warm path exactly as they are (a submission
id, then the submit with it), so the stand-in's call counts stay comparable.

``one_job``
    Both Transfer calls in one thread-pool job: one hand-off from the loop to
    a worker thread and back per submission instead of two.
``async``
    Both Transfer calls made on the event loop with aiohttp (installed with
    JupyterHub 6, not 5.5): no thread hand-off and no worker-thread cap.
"""

from __future__ import annotations

import os
import time
import typing as t

import globus_sdk

from hub_transfer.globus import submitter as submitter_module

TransferSubmitter = submitter_module.TransferSubmitter


def _plain(value: t.Any) -> t.Any:
    """A globus-sdk payload as JSON-ready data, unset (MISSING) fields dropped."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items() if v is not globus_sdk.MISSING}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


async def submit_one_job(
    self: t.Any, credential: t.Any, user: t.Any, document: t.Any
) -> dict[str, t.Any]:
    client = self.transfer_client(credential.access_token)

    def both() -> t.Any:
        submission = client.get_submission_id()
        data = submitter_module.build_transfer_data(document, submission["value"])
        return client.submit_transfer(data)

    result = await self.call("submission_id+submit", both)
    return dict(result.data)


async def submit_async(
    self: t.Any, credential: t.Any, user: t.Any, document: t.Any
) -> dict[str, t.Any]:
    import aiohttp

    session = getattr(self, "_bench_session", None)
    if session is None:
        # one pooled session: connections to Globus are kept alive
        connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300)
        session = self._bench_session = aiohttp.ClientSession(connector=connector)
    base = os.environ["GLOBUS_SDK_SERVICE_URL_TRANSFER"].rstrip("/") + "/v0.10/"
    headers = {"Authorization": f"Bearer {credential.access_token}"}

    async def timed(operation: str, method: str, path: str, **kwargs: t.Any) -> t.Any:
        started = time.perf_counter()
        async with session.request(
            method, base + path, headers=headers, **kwargs
        ) as response:
            body = await response.json()
            response.raise_for_status()
        if self.metrics is not None:
            self.metrics.observe_call(operation, "ok", time.perf_counter() - started)
        return body

    submission = await timed("submission_id", "GET", "submission_id")
    data = submitter_module.build_transfer_data(document, submission["value"])
    return dict(await timed("submit", "POST", "transfer", json=_plain(data)))


PROTOTYPES = {"one_job": submit_one_job, "async": submit_async}


def install(name: str) -> None:
    TransferSubmitter.submit = PROTOTYPES[name]  # type: ignore[method-assign]
