"""Secrets (mail passwords, OAuth tokens, the API token, the secret key) are nowhere in plain
text: not in logs (DEBUG included), error texts, metrics, API answers or callbacks, not in
Redis keys or values, not in the data directory's files. A whole node runs on each store."""

from __future__ import annotations

import base64
import logging
import traceback
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import trio
from redis.asyncio import Redis

from emlisten._bridge import open_asyncio_bridge, run_asyncio
from emlisten.errors import StoreError
from emlisten.service.node import run_node
from tests.contract.backends import REDIS_URL, delete_redis_keys, unique_prefix
from tests.secret_scan import register_secret
from tests.servers.creatio import CreatioStandIn
from tests.servers.dovecot import Dovecot, make_message
from tests.service.conftest import fast_settings


def _secret(kind: str) -> str:
    return register_secret(f"{kind}-{uuid.uuid4().hex}")


def _forms(secret: str) -> list[bytes]:
    """The plain-text spellings a leak could take: UTF-8, base64, UTF-16 (SQLite may use it)."""
    raw = secret.encode()
    return [raw, base64.b64encode(raw).rstrip(b"="), secret.encode("utf-16-le")]


async def _redis_dump(prefix: str) -> list[bytes]:
    """Every key under ``prefix`` and every value, whatever its type."""

    async def dump() -> list[bytes]:
        client: Any = Redis.from_url(REDIS_URL)  # untyped here: values of every kind
        found: list[bytes] = []
        try:
            async for key in client.scan_iter(match=f"{prefix}*", count=500):
                found.append(key)
                kind = (await client.type(key)).decode()
                if kind == "string":
                    found.append(await client.get(key) or b"")
                elif kind == "hash":
                    for field, value in (await client.hgetall(key)).items():
                        found += [field, value]
                elif kind == "list":
                    found += await client.lrange(key, 0, -1)
                elif kind == "set":
                    found += list(await client.smembers(key))
                elif kind == "zset":
                    found += [member for member, _ in await client.zrange(key, 0, -1, withscores=True)]
                elif kind == "stream":
                    for _, entry in await client.xrange(key):
                        for field, value in entry.items():
                            found += [field, value]
                else:
                    found.append(await client.dump(key) or b"")
        finally:
            await client.aclose()
        return found

    return await run_asyncio(dump)


def _files(directory: Path) -> list[bytes]:
    return [path.read_bytes() for path in sorted(directory.rglob("*")) if path.is_file()]


@pytest.fixture(params=["redis", "sqlite"])
async def store_settings(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[dict[str, Any]]:
    if request.param == "redis":
        prefix = unique_prefix()
        yield {"redis_url": REDIS_URL, "redis_prefix": prefix}
        # The node's bridge is closed by now: clean up in one of our own.
        async with open_asyncio_bridge():
            await delete_redis_keys(prefix)
    else:
        yield {"data_dir": str(tmp_path / "data")}


async def test_no_secret_in_plain_text_anywhere(
    store_settings: dict[str, Any],
    dovecot: Dovecot,
    creatio: CreatioStandIn,
    nursery: trio.Nursery,
    caplog: pytest.LogCaptureFixture,
    tmp_path: Path,
) -> None:
    caplog.set_level(logging.DEBUG)
    api_token, secret_key, access_token = _secret("api-token"), _secret("secret-key"), _secret("oauth")
    user = dovecot.add_user(password=_secret("mail-password"))
    secrets = [api_token, secret_key, access_token, user.password]
    settings = fast_settings(dovecot, api_token=api_token, secret_key=secret_key, **store_settings)
    bearer = {"Authorization": f"Bearer {api_token}"}
    shutdown = trio.Event()
    stopped = trio.Event()

    async def run(task_status: trio.TaskStatus[int]) -> None:
        try:
            await run_node(settings, handle_signals=False, shutdown=shutdown, task_status=task_status)
        finally:
            stopped.set()

    port = await nursery.start(run)
    seen: list[bytes] = []  # everything the outside world got from the node
    mailbox_id, oauth_id = str(uuid.uuid4()), str(uuid.uuid4())
    base = {
        "UserName": user.name,
        "SenderEmailAddress": user.email,
        "ServiceUrl": dovecot.host,
        "Port": dovecot.imap_port,
        "SecureOption": 0,
        "BpmEndpoint": creatio.endpoint(),
    }
    password_box = {**base, "Id": mailbox_id, "Password": user.password}
    oauth_box = {**base, "Id": oauth_id, "UseOAuth": True, "AccessToken": access_token}
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:

        async def call(method: str, path: str, **kwargs: Any) -> httpx.Response:
            response = await client.request(method, path, **kwargs)
            seen.append(response.content)
            seen.append(str(response.headers).encode())
            return response

        assert (
            await call("POST", "/api/listeners/create", json=[password_box, oauth_box])
        ).status_code == 200
        with trio.fail_after(30):  # mail that lands before the listener selects is not new
            while (await client.get(f"/v1/mailboxes/{mailbox_id}", headers=bearer)).json().get(
                "state"
            ) != "listening":
                await trio.sleep(0.05)  # no change feed for a mailbox's state
        dovecot.append(user, make_message(subject="secret scan"))
        await creatio.wait_for_emails(mailbox_id, 1, timeout=60)
        await call("POST", "/api/listeners/update", json=[{**password_box, "Password": user.password}])
        await call("POST", "/api/listeners/subscriptionsstate", json=[mailbox_id, oauth_id])
        await call("POST", "/api/mailbox/validate", json=password_box)
        await call("POST", "/api/mailbox/validate", json={**password_box, "Password": user.password + "x"})
        await call("POST", "/api/mailbox/validate", json=oauth_box, headers=bearer)
        await call("POST", "/api/mailbox/folders", json=password_box)
        await call("POST", "/api/mailbox/folders", json={**password_box, "Port": 1})
        await call("POST", "/api/listeners/create", json=[{**password_box, "Id": "not-a-guid"}])
        for path in ("/v1/mailboxes", "/v1/nodes", f"/v1/mailboxes/{mailbox_id}", "/ui/api/mailboxes"):
            await call("GET", path, headers=bearer)
        for path in ("/readyz", "/metrics", "/api/listeners/status"):
            await call("GET", path)
        await call("GET", "/v1/mailboxes", headers={"Authorization": f"Bearer {api_token[:-1]}"})
        if "redis_url" in store_settings:
            async with open_asyncio_bridge():
                stored = await _redis_dump(store_settings["redis_prefix"])
            assert stored, "the node stored nothing in Redis"
        await call("POST", "/api/listeners/close", json=[mailbox_id, oauth_id])
    shutdown.set()
    await stopped.wait()
    if "data_dir" in store_settings:
        stored = _files(Path(store_settings["data_dir"]))
        assert stored, "the node stored nothing in its data directory"
    seen += [call.raw_body for call in creatio.calls()]
    seen.append(caplog.text.encode())
    # The search can find things: the mailbox's id is there in plain text.
    assert any(mailbox_id.encode() in blob for blob in stored)
    places = {"stored": stored, "answers, callbacks and logs": seen}
    leaks = [
        f"{secret[:8]}... in {where}"
        for where, blobs in places.items()
        for secret in secrets
        for form in _forms(secret)
        if any(form in blob for blob in blobs)
    ]
    assert leaks == []
    assert any(b"secret scan" in call.raw_body for call in creatio.calls())  # the scan saw real data


@pytest.mark.redis
@pytest.mark.parametrize("user", ["emlisten-no-such-user", ""])
async def test_a_wrong_redis_password_is_in_no_error_or_log(
    user: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A node whose Redis URL holds a wrong password (with an ACL user, or for the default user)
    fails to start with the store's error: neither it, its causes nor any log line (DEBUG
    included) names the password."""
    caplog.set_level(logging.DEBUG)
    password = _secret("redis-password")
    target = urlsplit(REDIS_URL)
    url = f"redis://{user}:{password}@{target.hostname}:{target.port or 6379}/0"
    settings = fast_settings(
        None, secret_key=_secret("secret-key"), redis_url=url, redis_prefix=unique_prefix()
    )
    with pytest.raises(BaseException) as caught:  # a StoreError, maybe in a group
        await run_node(settings, handle_signals=False)
    errors = _leaves(caught.value)
    assert any(isinstance(error, StoreError) and "AUTH failed" in str(error) for error in errors), errors
    told = "".join(traceback.format_exception(caught.value)).encode() + caplog.text.encode()
    assert not [form for form in _forms(password) if form in told]


def _leaves(error: BaseException) -> list[BaseException]:
    if isinstance(error, BaseExceptionGroup):
        return [leaf for inner in error.exceptions for leaf in _leaves(inner)]
    return [error]
