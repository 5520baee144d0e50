"""The Redis store against a private ``redis-server`` of its own: ``rediss://`` (a TLS port and a
password, a private CA made with openssl as the Dovecot fixture does), and what the shared
Redis must not be put through (SCRIPT FLUSH)."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from emlisten.errors import StoreError
from emlisten.models import Checkpoint, MailboxConfig, Security, ServerEndpoint
from emlisten.store.redis import RedisStore
from tests.secret_scan import register_secret
from tests.servers.dovecot import free_port, make_tls_files

pytestmark = pytest.mark.redis


class TlsRedis:
    def __init__(self, root: Path) -> None:
        self.ca, cert, key = make_tls_files(root / "tls")
        self.port = free_port()
        self.password = register_secret("tls-redis-password-0123")
        server = shutil.which("redis-server") or "/usr/bin/redis-server"
        self.process = subprocess.Popen(
            [
                server,
                "--port",
                "0",
                "--bind",
                "127.0.0.1",
                "--tls-port",
                str(self.port),
                "--tls-cert-file",
                str(cert),
                "--tls-key-file",
                str(key),
                "--tls-ca-cert-file",
                str(self.ca),
                "--tls-auth-clients",
                "no",
                "--requirepass",
                self.password,
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(root),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def url(self, *, host: str = "localhost", password: str | None = None, query: str = "") -> str:
        secret = self.password if password is None else password
        return f"rediss://:{secret}@{host}:{self.port}/0{query}"

    async def wait_listening(self) -> None:
        with trio.fail_after(20):
            while True:
                try:
                    stream = await trio.open_tcp_stream("127.0.0.1", self.port)
                except OSError:
                    await trio.sleep(0.05)  # no event tells that a process began to listen
                    continue
                await stream.aclose()
                return


@pytest.fixture
def tls_redis(tmp_path: Path) -> Iterator[TlsRedis]:
    server = TlsRedis(tmp_path)
    try:
        yield server
    finally:
        server.process.terminate()
        server.process.wait(10)


def mailbox(mailbox_id: str = "m-1") -> MailboxConfig:
    return MailboxConfig(
        id=mailbox_id,
        user_name="someone@example.com",
        password="hunter2-password",
        imap=ServerEndpoint("imap.example.com", 993, Security.SSL_ON_CONNECT),
        bpm_endpoint="https://creatio.example.com/0/ProcessFullEmail",
    )


async def test_the_store_over_tls_with_a_password(tls_redis: TlsRedis) -> None:
    await tls_redis.wait_listening()
    url = tls_redis.url(query=f"?ssl_ca_certs={tls_redis.ca}")
    async with RedisStore.open(url, secret_key="k") as store, store.changes() as changes:
        await store.put_mailbox(mailbox())
        assert await store.get_mailbox("m-1") == mailbox()
        await store.publish_change("m-1")
        with trio.fail_after(5):
            assert await anext(changes) == "m-1"
    # The certificate names 127.0.0.1 too.
    by_address = tls_redis.url(host="127.0.0.1", query=f"?ssl_ca_certs={tls_redis.ca}")
    async with RedisStore.open(by_address, secret_key="k") as store:
        assert await store.list_mailbox_ids() == ["m-1"]
    # Without verification (ssl_cert_reqs=none), as redis-py read it.
    async with RedisStore.open(tls_redis.url(query="?ssl_cert_reqs=none"), secret_key="k") as store:
        assert await store.get_mailbox("m-1") == mailbox()


async def test_an_unknown_ca_or_a_wrong_password_is_a_store_error(tls_redis: TlsRedis) -> None:
    await tls_redis.wait_listening()
    with pytest.raises(StoreError, match="CERTIFICATE_VERIFY_FAILED") as caught:
        async with RedisStore.open(tls_redis.url(), secret_key="k"):  # the system's CAs only
            pass
    assert tls_redis.password not in str(caught.value)

    wrong = register_secret("wrong-tls-redis-password-4567")
    with pytest.raises(StoreError, match="AUTH failed: WRONGPASS") as caught:
        async with RedisStore.open(
            tls_redis.url(password=wrong, query=f"?ssl_ca_certs={tls_redis.ca}"), secret_key="k"
        ):
            pass
    assert wrong not in str(caught.value)


async def test_scripts_flushed_from_redis_are_sent_again(tls_redis: TlsRedis) -> None:
    """SCRIPT FLUSH (what a restarted Redis looks like to the scripts), on this private server
    (the shared one's other clients would see it too): single calls and a pipeline of scripts
    (restore_mailboxes) go on, by EVAL, and then by EVALSHA again."""
    await tls_redis.wait_listening()
    url = tls_redis.url(query=f"?ssl_ca_certs={tls_redis.ca}")
    async with RedisStore.open(url, secret_key="k") as store:
        await store.put_mailbox(mailbox())
        assert await store.seed_checkpoint("m-1", "INBOX", Checkpoint(1, 5))
        first = {"m-2": {"INBOX": Checkpoint(1, 1)}}
        assert await store.restore_mailboxes([mailbox("m-2")], first) == ["m-2"]

        assert await store._client.execute("SCRIPT", "FLUSH") == b"OK"
        assert await store.advance_checkpoint("m-1", "INBOX", Checkpoint(1, 9)) is True
        more = {"m-3": {"INBOX": Checkpoint(1, 2)}}
        assert await store.restore_mailboxes([mailbox("m-1"), mailbox("m-3")], more) == ["m-3"]

        assert await store._client.execute("SCRIPT", "FLUSH") == b"OK"
        # A pipeline of scripts first this time; each ran once (m-4 is registered once).
        assert await store.restore_mailboxes([mailbox("m-3"), mailbox("m-4")], {}) == ["m-4"]
        assert await store.advance_checkpoint("m-1", "INBOX", Checkpoint(1, 9)) is False

        assert await store.get_checkpoint("m-1", "INBOX") == Checkpoint(1, 9)
        assert await store.get_checkpoint("m-3", "INBOX") == Checkpoint(1, 2)
        assert sorted(await store.list_mailbox_ids()) == ["m-1", "m-2", "m-3", "m-4"]
        shas = [store._restore.sha, store._advance.sha]
        assert await store._client.execute("SCRIPT", "EXISTS", *shas) == [1, 1]
