"""No secret the run used appears in any log, answer or database file.

Runs last: it searches everything the earlier parts produced (both hubs' logs,
which hold the service's output, the service's ledgers, every response body)
for every secret they used: hub API tokens (servers', minted ones, the admin
service's), the hub's cookie secret, the service's Globus client secret and
crypt key, users' Globus tokens, and every access and refresh token the
stand-in ever issued, the service's own included. On its own it first makes
some traffic of its own, good and bad, so it never checks an empty record.
"""

from __future__ import annotations

import pathlib

from .conftest import (
    CRYPT_KEY,
    Book,
    StressGlobus,
    StressHub,
    call,
    histogram,
    report,
    run_many,
    submit,
)


def files_to_search(book: Book) -> dict[str, pathlib.Path]:
    """Every recorded file, and beside each ledger its WAL and journal."""
    found = {}
    for name, path in book.files.items():
        for candidate in [path, *path.parent.glob(path.name + "-*")]:
            if candidate.is_file():
                found[f"{name} ({candidate.name})"] = candidate
    return found


def test_no_secret_anywhere(
    stress_hub: StressHub, stress_globus: StressGlobus, book: Book
) -> None:
    hub, globus = stress_hub, stress_globus
    globus.rotate_tokens()
    globus.standin.add_fault("submit_transfer", 503, probability=0.3)
    try:
        outcomes = run_many(
            lambda i: submit(hub, hub.users[i % len(hub.users)], f"secret-{i}", i),
            40,
            8,
        )
    finally:
        globus.standin.clear_faults()
    outcomes.append(
        call(
            book,
            "POST",
            hub.hub.service_url,
            token=hub.server_token(hub.users[0]),
            json={"globus_token": "an-unknown-token", "transfer": {}},
        )
    )
    hub.settle("secret-")

    for user in hub.users:
        book.secret(f"globus token of {user}", globus.token(user))
    book.secret("crypt key", CRYPT_KEY)
    secrets = dict(book.secrets)
    secrets.update(globus.issued_secrets())
    assert len(secrets) > 10, sorted(secrets)

    places = {name: path.read_bytes() for name, path in files_to_search(book).items()}
    places["response bodies"] = "\n".join(book.bodies).encode()
    hits = [
        (secret_name, place)
        for secret_name, value in secrets.items()
        for place, data in places.items()
        if value.encode() in data
    ]
    report(
        "secrets check",
        [
            ("secrets searched for", len(secrets)),
            (
                "of which Globus tokens issued",
                sum(1 for name in secrets if name.startswith("globus ")),
            ),
            (
                "files searched",
                f"{len(places) - 1} ({sum(map(len, places.values()))} "
                "bytes with the bodies)",
            ),
            ("response bodies searched", len(book.bodies)),
            ("own traffic", histogram(o.code for o in outcomes)),
            ("hits", len(hits)),
        ],
    )
    # name the secret and the place, never the value
    assert not hits, hits
