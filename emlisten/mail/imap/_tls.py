"""Shared TLS client contexts: one ``ssl.SSLContext`` per verification setting.

A new default context per connection costs ~800 KiB (it loads the CA store), so every
connection with the same setting shares one context, created on first use.
"""

from __future__ import annotations

import os
import ssl
import warnings

from emlisten.errors import ConfigError

#: Extra CA certificates (PEM file) trusted in addition to the system store.
CA_FILE_ENV = "EMLISTEN_TLS_CA_FILE"

_contexts: dict[tuple[bool, str | None], ssl.SSLContext] = {}


def ca_file_from_env() -> str | None:
    return os.environ.get(CA_FILE_ENV) or None


def context_for(verify: bool, ca_file: str | None = None) -> ssl.SSLContext:
    """The shared client context for ``verify`` (system CAs, plus ``ca_file`` when given).

    ``ca_file`` is ignored when ``verify`` is false. Callers usually pass
    ``ca_file_from_env()``; tests pass a path directly.
    """
    key = (verify, ca_file if verify else None)
    context = _contexts.get(key)
    if context is None:
        context = _create(*key)
        _contexts[key] = context
    return context


def _create(verify: bool, ca_file: str | None) -> ssl.SSLContext:
    if not verify:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        # Old mail servers still exist; without verification we accept what they speak.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            context.minimum_version = ssl.TLSVersion.TLSv1
        context.set_ciphers("DEFAULT:@SECLEVEL=0")
        return context
    context = ssl.create_default_context()
    if ca_file:
        try:
            context.load_verify_locations(cafile=ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"cannot load TLS CA file {ca_file!r}: {exc}") from exc
    return context


__all__ = ["CA_FILE_ENV", "ca_file_from_env", "context_for"]
