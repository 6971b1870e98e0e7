"""The transfer document the Globus JupyterLab extension sends, for tests,
the demo and the benchmark: one definition of its shape."""

from __future__ import annotations

import typing as t

# the example of the extension's documentation for hub-managed services
SEED_SOURCE = "ddb59aef-6d04-11e5-ba46-22000b92c6ec"
SEED_DESTINATION = "ddb59af0-6d04-11e5-ba46-22000b92c6ec"


def item(source: str, destination: str, recursive: bool = False) -> dict[str, t.Any]:
    """One ``DATA`` entry, as the extension writes it."""
    return {
        "source_path": source,
        "destination_path": destination,
        "recursive": recursive,
    }


def seed_items() -> list[dict[str, t.Any]]:
    """The two items of the documentation's example (a file and a directory)."""
    return [
        item("/share/godata/file1.txt", "~/"),
        item("/foo/bar", "~/bar", recursive=True),
    ]


def extension_body(
    globus_token: str | None,
    *,
    source: str = SEED_SOURCE,
    destination: str = SEED_DESTINATION,
    items: list[dict[str, t.Any]] | None = None,
    label: str | None = None,
) -> dict[str, t.Any]:
    """The whole POST body: the user's Globus token and the transfer."""
    transfer: dict[str, t.Any] = {
        "source_endpoint": source,
        "destination_endpoint": destination,
        "DATA": seed_items() if items is None else items,
    }
    if label is not None:
        transfer["label"] = label
    return {"globus_token": globus_token, "transfer": transfer}
