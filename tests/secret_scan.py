"""Every log line of the test run, scanned for the secrets the tests used (passwords, tokens,
keys). A secret in a log fails the run, even when every test passed.

Covered: everything logged in the test processes at INFO and above (the service runs in-process
in most tests), and what the tests hand to :func:`scan_text` (logs of emlisten subprocesses).
With xdist each worker writes its findings to a directory that the controller checks last.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path

import pytest

_ENV = "EMLISTEN_TEST_SECRET_SCAN_DIR"
#: Secrets shorter than this are too likely to occur by chance ("x", "pw").
_MIN_LENGTH = 8

_secrets: set[str] = set()
_texts: list[str] = []


def register_secret(secret: str) -> str:
    if len(secret) >= _MIN_LENGTH:
        _secrets.add(secret)
    return secret


def scan_text(text: str) -> None:
    _texts.append(text)


class _Collector(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        try:
            _texts.append(self.format(record))
        except Exception:
            _texts.append(str(record.msg))


def pytest_configure(config: pytest.Config) -> None:
    if not hasattr(config, "workerinput") and _ENV not in os.environ:
        os.environ[_ENV] = tempfile.mkdtemp(prefix="emlisten-secret-scan-")
    handler = _Collector(level=logging.INFO)
    handler.setFormatter(logging.Formatter("%(name)s %(message)s"))
    logging.getLogger().addHandler(handler)


def _leaks() -> list[str]:
    text = "\n".join(_texts)
    return sorted(secret for secret in _secrets if secret in text)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    directory = Path(os.environ[_ENV])
    worker = getattr(session.config, "workerinput", None)
    if worker is not None:
        (directory / f"{worker['workerid']}.json").write_text(
            json.dumps({"leaks": _leaks(), "secrets": len(_secrets), "lines": len(_texts)})
        )
        return
    reports = [json.loads(p.read_text()) for p in directory.glob("*.json")]
    reports.append({"leaks": _leaks(), "secrets": len(_secrets), "lines": len(_texts)})
    leaked = sorted({secret for report in reports for secret in report["leaks"]})
    checked = sum(report["secrets"] for report in reports)
    lines = sum(report["lines"] for report in reports)
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if leaked:
        # Show only a prefix: the report itself must not become a leak.
        shown = ", ".join(f"{secret[:3]}..." for secret in leaked)
        if reporter is not None:
            reporter.write_line(f"SECRET LEAK: {len(leaked)} secret(s) found in logs: {shown}", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
    elif reporter is not None and checked:
        reporter.write_line(f"secret scan: {checked} secrets, {lines} log lines, no leak")
