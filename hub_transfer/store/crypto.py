"""Encryption of kept tokens, with keys from the environment.

Keys follow JupyterHub's ``JUPYTERHUB_CRYPT_KEY`` rules: one or more 32-byte
keys, hex or base64, separated by ``;``. The first key encrypts; every key
decrypts, which is how keys are rotated: put the new key first, keep the old
one after it until the old tokens are gone.
"""

from __future__ import annotations

import base64
import binascii
import os

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

KEY_ENV = "HUB_TRANSFER_CRYPT_KEY"


class CryptKeyError(ValueError):
    """The key is missing or malformed; the message never shows the key."""


def _parse_key(text: str, position: int) -> bytes:
    text = text.strip()
    raw: bytes | None = None
    try:
        raw = bytes.fromhex(text)
    except ValueError:
        try:
            raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        except (binascii.Error, ValueError):
            raw = None
    if raw is None or len(raw) != 32:
        raise CryptKeyError(
            f"{KEY_ENV} key #{position} is not 32 bytes of hex or base64 "
            "(make one with: openssl rand -hex 32)"
        )
    return base64.urlsafe_b64encode(raw)


class CryptKeeper:
    """Encrypts and decrypts short secrets (refresh tokens) for the store."""

    def __init__(self, keys: str | None = None) -> None:
        text = os.environ.get(KEY_ENV, "") if keys is None else keys
        parts = [part for part in text.split(";") if part.strip()]
        if not parts:
            raise CryptKeyError(
                f"{KEY_ENV} is not set; ACL mode keeps users' refresh tokens and "
                "needs a key to encrypt them (make one with: openssl rand -hex 32)"
            )
        self._fernet = MultiFernet(
            [Fernet(_parse_key(part, i + 1)) for i, part in enumerate(parts)]
        )

    def encrypt(self, secret: str) -> bytes:
        return self._fernet.encrypt(secret.encode("utf-8"))

    def decrypt(self, blob: bytes) -> str:
        """Decrypt, or raise CryptKeyError when no configured key fits."""
        try:
            return self._fernet.decrypt(blob).decode("utf-8")
        except InvalidToken:
            raise CryptKeyError(
                f"a stored token cannot be decrypted with the {KEY_ENV} keys; was "
                "the old key removed before its tokens were replaced?"
            ) from None
