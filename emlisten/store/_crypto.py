"""Encryption at rest for mailbox documents (they hold IMAP passwords and OAuth tokens).

What is encrypted: the WHOLE mailbox document (user name, endpoints and callback URL included,
not only ``password``/``access_token``): one rule, nothing to forget when a secret field is added.
Mailbox ids stay in clear (they are the hash field names), and so do statuses and checkpoints,
which hold no secrets.

How: AES-256-GCM (``cryptography``). The 32-byte key is derived with HKDF-SHA256 from
``EMLISTEN_SECRET_KEY`` (any non-empty string). Each document gets a fresh random 96-bit nonce;
the mailbox id is the associated data, so a blob copied under another id does not decrypt.
Layout: ``b"\\x01"`` (format version) + nonce (12 bytes) + ciphertext with its 16-byte tag.

A wrong key fails the tag check: :meth:`CredentialCipher.decrypt` raises ``StoreError`` ("cannot
decrypt credentials: wrong EMLISTEN_SECRET_KEY?"), never returns garbage.
"""

from __future__ import annotations

import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from emlisten.errors import ConfigError, StoreError

_VERSION = b"\x01"
_NONCE_BYTES = 12
_TAG_BYTES = 16
# Fixed, public salt: the secret is the key material; the salt only separates this use of it.
_HKDF_SALT = b"emlisten/store/credentials"
_HKDF_INFO = b"emlisten mailbox documents AES-256-GCM v1"

WRONG_KEY_MESSAGE = "cannot decrypt credentials: wrong EMLISTEN_SECRET_KEY?"


def derive_key(secret_key: str) -> bytes:
    """32 bytes of key from any non-empty string."""

    if not secret_key:
        raise ConfigError("EMLISTEN_SECRET_KEY is empty: it is needed to encrypt credentials at rest")
    hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=_HKDF_SALT, info=_HKDF_INFO)
    return hkdf.derive(secret_key.encode())


class CredentialCipher:
    """Encrypts and decrypts mailbox documents with a key derived from the configured secret."""

    __slots__ = ("_aead",)

    def __init__(self, secret_key: str) -> None:
        self._aead = AESGCM(derive_key(secret_key))

    def __repr__(self) -> str:
        return "CredentialCipher(<key hidden>)"

    def encrypt(self, plaintext: bytes, *, associated_data: bytes) -> bytes:
        nonce = os.urandom(_NONCE_BYTES)
        return _VERSION + nonce + self._aead.encrypt(nonce, plaintext, associated_data)

    def decrypt(self, blob: bytes, *, associated_data: bytes) -> bytes:
        if len(blob) < 1 + _NONCE_BYTES + _TAG_BYTES or blob[:1] != _VERSION:
            raise StoreError("cannot decrypt credentials: not an encrypted emlisten document")
        nonce = blob[1 : 1 + _NONCE_BYTES]
        try:
            return self._aead.decrypt(nonce, blob[1 + _NONCE_BYTES :], associated_data)
        except InvalidTag:
            raise StoreError(WRONG_KEY_MESSAGE) from None
