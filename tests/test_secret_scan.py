"""The secret scan itself: it must find a registered secret in collected log text."""

from __future__ import annotations

import pytest

from tests import secret_scan


def test_scan_finds_registered_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(secret_scan, "_secrets", set())
    monkeypatch.setattr(secret_scan, "_texts", [])
    secret_scan.register_secret("pw-0123456789abcdef")
    secret_scan.register_secret("pw")  # too short to scan for
    secret_scan.scan_text("emlisten.x connected as user")
    assert secret_scan._leaks() == []
    secret_scan.scan_text("emlisten.x login failed with pw-0123456789abcdef")
    assert secret_scan._leaks() == ["pw-0123456789abcdef"]
