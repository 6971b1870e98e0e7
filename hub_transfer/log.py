"""Logging set-up and the one-line-per-request access log.

The format follows JupyterHub's (level letter, millisecond time, logger name,
``module:line``) so that the service's lines read naturally next to the hub's in
the same terminal or pod log. The access line names the hub user and never the
query string, because a ``?token=`` may ride along there.
"""

from __future__ import annotations

import hashlib
import logging
import typing as t

from tornado.log import LogFormatter, access_log, app_log, gen_log
from tornado.web import RequestHandler

LOG_FORMAT = (
    "%(color)s[%(levelname)1.1s %(asctime)s.%(msecs).03d %(name)s "
    "%(module)s:%(lineno)d]%(end_color)s %(message)s"
)
DATE_FORMAT = "%Y-%m-%d %H:%M:%S"


def token_hash(token: str) -> str:
    """The full SHA-256 of a token: the key under which caches keep it.

    Never a prefix: a cache keyed by a short hash would hand one user's
    results to whoever finds another string with the same prefix.
    """
    return hashlib.sha256(token.encode("utf-8", "replace")).hexdigest()


def token_label(token: str) -> str:
    """Twelve hex digits of the token's hash: enough to tell tokens apart in a
    log line, and nothing a cache lookup would accept."""
    return token_hash(token)[:12]


def init_logging(log: logging.Logger, level: int) -> None:
    """Send our logger and tornado's through one handler in the hub's format.

    Tornado's loggers are hung under ours so one ``--log-level`` governs them,
    and propagation to the root logger is cut so lines are not printed twice
    when a library configures the root logger.
    """
    handler = logging.StreamHandler()
    handler.setFormatter(LogFormatter(fmt=LOG_FORMAT, datefmt=DATE_FORMAT))
    log.handlers = [handler]
    log.setLevel(level)
    log.propagate = False

    for name in ("tornado", "hub_transfer", "jupyterhub", "globus_sdk"):
        if name == log.name:
            continue
        other = logging.getLogger(name)
        other.handlers = [handler]
        other.propagate = False
        # globus-sdk is chatty at DEBUG and logs request details there;
        # keep it at WARNING unless the admin asks for debug everywhere
        other.setLevel(level if name != "globus_sdk" else max(level, logging.WARNING))

    # tornado's own loggers, renamed so a line says it comes from us; "requests"
    # rather than "access" so it does not read as our ACL module
    for tornado_log, suffix in (
        (access_log, "requests"),
        (app_log, "tornado"),
        (gen_log, "tornado.general"),
    ):
        tornado_log.name = f"{log.name}.{suffix}"


def client_ip(request: t.Any) -> str:
    """The caller's address as the proxy saw it.

    configurable-http-proxy appends the peer it accepted to X-Forwarded-For, so
    the last entry is the one a client cannot forge; anything earlier, and any
    X-Real-Ip, came from the client.
    """
    forwarded = request.headers.get("X-Forwarded-For", "")
    last = forwarded.rsplit(",", 1)[-1].strip()
    return last or request.remote_ip


def log_request(handler: RequestHandler) -> None:
    """Write one access line per request, at a level chosen by its status.

    Health checks that succeed go to DEBUG so the hub's polling does not flood
    the log; 4xx are WARNING and 5xx ERROR, so an admin can grep for failed
    transfers. Requests slower than a second are at least INFO.
    """
    status = handler.get_status()
    request = handler.request
    elapsed_ms = 1000.0 * request.request_time()

    if status < 300 and getattr(handler, "quiet_access_log", False):
        level = logging.DEBUG
    elif status < 400:
        level = logging.INFO
    elif status < 500:
        level = logging.WARNING
    else:
        level = logging.ERROR
    if elapsed_ms >= 1000 and level < logging.INFO:
        level = logging.INFO

    metrics = handler.settings.get("metrics")
    if metrics is not None:
        metrics.observe_request(
            type(handler).__name__, request.method or "", status, elapsed_ms / 1000
        )

    user = getattr(handler, "hub_user_name", "") or ""
    outcome = getattr(handler, "log_outcome", "")
    access_log.log(
        level,
        "%s %s %s (%s@%s) %.2fms%s",
        status,
        request.method,
        request.path,
        user,
        client_ip(request),
        elapsed_ms,
        f" {outcome}" if outcome else "",
    )
