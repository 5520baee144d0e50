"""The Creatio callback client on its own, against the real stand-in over HTTP and HTTPS: what goes
on the wire, how failures come back (status, Retry-After, timeouts, egress, TLS), and that
connections go back to their pool after each call."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from emlisten.errors import DeliveryError
from emlisten.models import Email, MailboxConfig, Security, ServerEndpoint
from emlisten.sink.creatio import CreatioSink
from tests.servers._http import serve_app, server_config
from tests.servers.creatio import CreatioStandIn
from tests.servers.dovecot import make_tls_files


def mailbox(endpoint: str) -> MailboxConfig:
    return MailboxConfig(
        id="0f8fad5b-d9cb-469f-a165-70867728950e",
        user_name="alice@example.com",
        imap=ServerEndpoint("imap.example.com", 993, Security.SSL_ON_CONNECT),
        bpm_endpoint=endpoint,
        bpm_user="Supervisor",
        bpm_user_workspace="Default",
        bpm_user_time_zone="Europe/Berlin",
    )


@pytest.fixture
async def creatio(nursery: trio.Nursery) -> CreatioStandIn:
    standin = CreatioStandIn()
    await nursery.start(standin.serve)
    return standin


@pytest.fixture
async def sink() -> AsyncIterator[CreatioSink]:
    made = CreatioSink(timeout=5.0)
    try:
        yield made
    finally:
        await made.aclose()


async def test_wire_body_and_headers(creatio: CreatioStandIn, sink: CreatioSink) -> None:
    email = Email(id="e1", subject="Grüße ✓", body="<p>hi</p>", is_html_body=True, sender="a@example.com")
    await sink.deliver(mailbox(creatio.endpoint()), [email], idempotency_key="box/INBOX/7/1..7/2")
    (call,) = creatio.calls("ProcessFullEmail")
    assert call.http_method == "POST"
    assert call.headers["idempotency-key"] == "box/INBOX/7/1..7/2"
    assert call.headers["content-type"] == "application/json"
    assert call.headers["user-agent"].startswith("emlisten/")
    assert call.headers["content-length"] == str(len(call.raw_body))
    assert "cookie" not in call.headers
    # Compact UTF-8, as httpx's json= encoded it (Creatio reads UTF-8; no \u escapes needed).
    assert "Grüße ✓".encode() in call.raw_body
    assert b'"Subject":"Gr' in call.raw_body
    assert call.body["Emails"][0]["Subject"] == "Grüße ✓"
    assert call.body["SubscriptionInfo"]["SysAdminUnit"] == "Supervisor"


async def test_sibling_methods_reach_their_paths(creatio: CreatioStandIn, sink: CreatioSink) -> None:
    box = mailbox(creatio.endpoint())
    await sink.report_state(box, available=False, error_class="AuthError", message="bad password")
    await sink.notify_new_ids(box, ["7/1"])
    await sink.request_token_refresh(box)
    assert [c.method for c in creatio.calls()] == ["ProcessMailboxState", "NewEmail", "RefreshToken"]
    assert creatio.calls("ProcessMailboxState")[0].body["Avaliable"] is False


async def test_error_status_and_retry_after(creatio: CreatioStandIn, sink: CreatioSink) -> None:
    creatio.fail_next("ProcessFullEmail", status=503, count=1, retry_after=7)
    with pytest.raises(DeliveryError) as caught:
        await sink.deliver(mailbox(creatio.endpoint()), [Email(id="e1")], idempotency_key="k")
    assert caught.value.status == 503
    assert caught.value.retry_after == 7.0
    assert "Creatio answered HTTP 503: " in str(caught.value)
    # The connection that carried the error answer is usable again.
    await sink.deliver(mailbox(creatio.endpoint()), [Email(id="e1")], idempotency_key="k")
    assert len(creatio.accepted_calls("ProcessFullEmail")) == 1


async def test_no_answer_in_time(creatio: CreatioStandIn) -> None:
    sink = CreatioSink(timeout=0.5)
    try:
        creatio.hold_next("ProcessFullEmail")
        with pytest.raises(DeliveryError, match="did not answer in time"):
            await sink.deliver(mailbox(creatio.endpoint()), [Email(id="e1")], idempotency_key="k")
    finally:
        creatio.release()
        await sink.aclose()


async def test_connections_go_back_to_the_pool(creatio: CreatioStandIn) -> None:
    # Two pools of 4: a call that kept its connection would stop the 9th call for good.
    sink = CreatioSink(timeout=5.0, max_connections=8)
    try:
        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                for worker in range(4):
                    nursery.start_soon(_calls, sink, creatio.endpoint(), worker, 15)
        creatio.fail_next("ProcessFullEmail", status=500, count=20)
        for _ in range(20):
            with pytest.raises(DeliveryError):
                await sink.deliver(mailbox(creatio.endpoint()), [Email(id="e")], idempotency_key="k")
        await sink.deliver(mailbox(creatio.endpoint()), [Email(id="e")], idempotency_key="k")
    finally:
        await sink.aclose()
    assert len(creatio.accepted_calls("ProcessFullEmail")) == 61


async def _calls(sink: CreatioSink, endpoint: str, worker: int, count: int) -> None:
    for i in range(count):
        await sink.deliver(mailbox(endpoint), [Email(id=f"{worker}-{i}")], idempotency_key=f"{worker}-{i}")


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://169.254.169.254/0/ServiceModel/ExchangeListenerService.svc/ProcessFullEmail", "not allowed"),
        ("http://127.0.0.1:1/0/ServiceModel/ExchangeListenerService.svc/ProcessFullEmail", "ConnectError"),
        ("ftp://127.0.0.1/x", "UnsupportedProtocol"),
        ("http:///x", "UnsupportedProtocol"),
    ],
)
async def test_unreachable_callbacks(sink: CreatioSink, url: str, reason: str) -> None:
    with pytest.raises(DeliveryError, match="cannot reach Creatio") as caught:
        await sink.deliver(mailbox(url), [Email(id="e1")], idempotency_key="k")
    assert reason in str(caught.value)


async def test_unusable_body_is_a_delivery_error(creatio: CreatioStandIn, sink: CreatioSink) -> None:
    box = mailbox(creatio.endpoint()).replace(context={"x": float("nan")})
    with pytest.raises(DeliveryError, match="cannot be used"):
        await sink.report_state(box, available=True)
    assert creatio.calls() == []


async def test_https_callback_verifies_the_certificate(
    nursery: trio.Nursery, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ca, cert, key = make_tls_files(tmp_path / "tls")
    standin = CreatioStandIn()
    config = server_config("127.0.0.1")
    config.certfile, config.keyfile = str(cert), str(key)
    standin.port = await nursery.start(serve_app, standin._asgi, config)
    url = standin.endpoint().replace("http://", "https://")

    untrusting = CreatioSink(timeout=5.0)
    try:
        with pytest.raises(DeliveryError, match="cannot reach Creatio"):
            await untrusting.deliver(mailbox(url), [Email(id="e1")], idempotency_key="k")
    finally:
        await untrusting.aclose()
    assert standin.calls() == []

    monkeypatch.setenv("SSL_CERT_FILE", str(ca))  # read when the sink is made, as httpx did
    trusting = CreatioSink(timeout=5.0)
    try:
        await trusting.deliver(mailbox(url), [Email(id="e1")], idempotency_key="k")
    finally:
        await trusting.aclose()
    assert json.loads(standin.calls("ProcessFullEmail")[0].raw_body)["Emails"][0]["Id"] == "e1"


class ClosingServer:
    """A real HTTP/1.1 server over TCP that plays the receiver's side of a keep-alive race:
    the requests numbered in ``unanswered`` (from 0, across connections) are read, then their
    connection is closed without an answer, as when a server's idle timeout ends it just as a
    request goes out. Every other request gets ``200 {}`` on a kept-alive connection."""

    def __init__(self, unanswered: set[int]) -> None:
        self.unanswered = unanswered
        self.seen: list[tuple[int, str]] = []  # (connection, idempotency key or method path)
        self.port = 0
        self._connections = 0

    async def serve(self, task_status: trio.TaskStatus[None]) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self._handle, listeners)

    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}/0/ServiceModel/ExchangeListenerService.svc/ProcessFullEmail"

    async def _handle(self, stream: trio.SocketStream) -> None:
        connection, self._connections = self._connections, self._connections + 1
        buffered = b""
        async with stream:
            while True:
                while b"\r\n\r\n" not in buffered:
                    data = await stream.receive_some()
                    if not data:
                        return
                    buffered += data
                head, _, buffered = buffered.partition(b"\r\n\r\n")
                request_line, *lines = head.split(b"\r\n")
                fields = {
                    name.strip().lower(): value.strip()
                    for name, value in (line.split(b":", 1) for line in lines)
                }
                length = int(fields[b"content-length"])
                while len(buffered) < length:
                    buffered += await stream.receive_some()
                buffered = buffered[length:]
                key = fields.get(b"idempotency-key", request_line.split(b" ")[1].rpartition(b"/")[2])
                self.seen.append((connection, key.decode()))
                if len(self.seen) - 1 in self.unanswered:
                    return  # closed, the request unanswered
                await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n")
                await stream.send_all(b"Content-Length: 2\r\n\r\n{}")


async def test_a_delivery_its_kept_alive_connection_lost_unanswered_is_sent_again_once(
    nursery: trio.Nursery,
) -> None:
    server = ClosingServer(unanswered={1})
    await nursery.start(server.serve)
    sink = CreatioSink(timeout=5.0, max_connections=4)  # one pool: the second call reuses
    try:
        box = mailbox(server.endpoint())
        await sink.deliver(box, [Email(id="e1")], idempotency_key="k1")
        await sink.deliver(box, [Email(id="e2")], idempotency_key="k2")
    finally:
        await sink.aclose()
    # The second went on the kept-alive connection, which the server closed; then on a new one.
    assert server.seen == [(0, "k1"), (0, "k2"), (1, "k2")]


async def test_a_delivery_is_sent_again_only_once(nursery: trio.Nursery) -> None:
    server = ClosingServer(unanswered={0, 1})
    await nursery.start(server.serve)
    sink = CreatioSink(timeout=5.0, max_connections=4)
    try:
        with pytest.raises(DeliveryError, match=r"cannot reach Creatio.*RemoteProtocolError"):
            await sink.deliver(mailbox(server.endpoint()), [Email(id="e1")], idempotency_key="k1")
    finally:
        await sink.aclose()
    assert server.seen == [(0, "k1"), (1, "k1")]


async def test_a_callback_without_an_idempotency_key_is_not_sent_again(nursery: trio.Nursery) -> None:
    server = ClosingServer(unanswered={0})
    await nursery.start(server.serve)
    sink = CreatioSink(timeout=5.0, max_connections=4)
    try:
        with pytest.raises(DeliveryError, match="RemoteProtocolError"):
            await sink.report_state(mailbox(server.endpoint()), available=True)
    finally:
        await sink.aclose()
    assert server.seen == [(0, "ProcessMailboxState")]


async def endless_answers(status: bytes, task_status: trio.TaskStatus[int]) -> None:
    """A real HTTP/1.1 server that answers each request with a chunked body without end."""

    async def handle(stream: trio.SocketStream) -> None:
        received = b""
        async with stream:
            while b"\r\n\r\n" not in received:
                received += await stream.receive_some()
            await stream.send_all(b"HTTP/1.1 " + status + b"\r\nTransfer-Encoding: chunked\r\n\r\n")
            chunk = b"4000\r\n" + b"x" * 0x4000 + b"\r\n"
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                while True:
                    await stream.send_all(chunk)

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    task_status.started(listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(handle, listeners)


@pytest.mark.parametrize("status", [b"200 OK", b"500 Internal Server Error"])
async def test_an_endless_answer_does_not_hold_the_delivery(nursery: trio.Nursery, status: bytes) -> None:
    # Each read comes within the timeout, so only a bound on the body ends the call.
    port = await nursery.start(endless_answers, status)
    sink = CreatioSink(timeout=5.0, max_connections=4)
    box = mailbox(f"http://127.0.0.1:{port}/0/ServiceModel/ExchangeListenerService.svc/ProcessFullEmail")
    try:
        with trio.fail_after(10):
            if status.startswith(b"200"):
                await sink.deliver(box, [Email(id="e1")], idempotency_key="k1")
            else:
                with pytest.raises(DeliveryError, match=r"Creatio answered HTTP 500: x{200}$"):
                    await sink.deliver(box, [Email(id="e1")], idempotency_key="k1")
    finally:
        await sink.aclose()
