"""``GET {prefix}metrics``: Prometheus metrics for hub admins or a scraper token."""

from __future__ import annotations

import hmac
import typing as t

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from tornado import web

from ..errors import ServiceError
from .base import APIHandler


class MetricsHandler(APIHandler):
    """Serve the registry; a metrics token skips the hub lookup entirely."""

    quiet_access_log = True

    def initialize(  # type: ignore[override]
        self,
        hub_auth: t.Any,
        metrics: t.Any = None,
        metrics_token: str = "",
        submitter: t.Any = None,
        access: t.Any = None,
        **kwargs: t.Any,
    ) -> None:
        super().initialize(hub_auth, **kwargs)
        self.metrics = metrics
        self.metrics_token = metrics_token
        self.submitter = submitter
        self.access = access

    async def prepare(self) -> None:
        self._by_metrics_token = self._has_metrics_token()
        if not self._by_metrics_token:
            await super().prepare()

    def _has_metrics_token(self) -> bool:
        if not self.metrics_token:
            return False
        header = self.request.headers.get("Authorization", "")
        scheme, _, value = header.partition(" ")
        if scheme.lower() not in ("bearer", "token"):
            return False
        return hmac.compare_digest(value.strip().encode(), self.metrics_token.encode())

    async def get(self) -> None:
        if not self._by_metrics_token:
            user = self.require_hub_user()
            if not user.get("admin"):
                raise ServiceError(
                    403,
                    "admin_only",
                    "Only hub admins (or holders of the metrics token) may read "
                    "metrics.",
                )
        if self.metrics is None:
            raise ServiceError(404, "not_found", "Metrics are not enabled.")

        # refresh the gauges that are cheaper to read at scrape time
        if self.submitter is not None:
            self.metrics.refresh_caches(self.submitter.caches())
            self.metrics.executor_queue.set(self.submitter.queue_depth)
            self.metrics.executor_busy.set(self.submitter.in_flight)
        if self.access is not None:
            tasks, rules = self.access.counts()
            self.metrics.tracked_tasks.set(tasks)
            self.metrics.live_rules.set(rules)

        self.set_header("Content-Type", CONTENT_TYPE_LATEST)
        self.finish(generate_latest(self.metrics.registry))


default_handlers: list[tuple[str, type[web.RequestHandler]]] = [
    ("metrics", MetricsHandler),
]
