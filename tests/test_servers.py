"""Self-tests of the test servers: the private Dovecot and the Creatio stand-in."""

from __future__ import annotations

import imaplib
import signal
import socket
import ssl
import subprocess
import time
import uuid

import httpx
import pytest
import trio

from tests.servers.creatio import CreatioStandIn
from tests.servers.dovecot import Dovecot, MailUser, _end_process_group, make_message

# -- Dovecot ---------------------------------------------------------------------------------


def test_append_returns_increasing_uids(dovecot: Dovecot, mail_user: MailUser) -> None:
    first = dovecot.append(mail_user, make_message(subject="one"))
    second = dovecot.append(mail_user, make_message(subject="two"))
    assert 0 < first < second
    assert dovecot.uids(mail_user) == [first, second]


def test_users_added_at_runtime_log_in_at_once(dovecot: Dovecot) -> None:
    users = [dovecot.add_user() for _ in range(5)]
    assert len({u.name for u in users}) == 5
    for user in users:
        assert dovecot.append(user, make_message()) == 1
    named = dovecot.add_user(f"named-{uuid.uuid4().hex[:8]}", password="other-pw")
    assert named.email == f"{named.name}@{dovecot.domain}"
    assert dovecot.uids(named) == []


def test_wrong_password_and_unknown_user_are_rejected(dovecot: Dovecot, mail_user: MailUser) -> None:
    for name, password in ((mail_user.name, "wrong-pw"), ("no-such-user", "x")):
        conn = imaplib.IMAP4(dovecot.host, dovecot.imap_port, timeout=10)
        with pytest.raises(imaplib.IMAP4.error, match="AUTHENTICATIONFAILED"):
            conn.login(name, password)
        conn.shutdown()


def test_password_change_applies_to_next_login(dovecot: Dovecot, mail_user: MailUser) -> None:
    changed = dovecot.set_password(mail_user, "new-secret")
    assert dovecot.uids(changed) == []
    with pytest.raises(imaplib.IMAP4.error):
        dovecot.uids(mail_user)


def test_password_not_in_repr(mail_user: MailUser) -> None:
    assert mail_user.password not in repr(mail_user)


def test_implicit_tls_verifies_with_the_private_ca(dovecot: Dovecot, mail_user: MailUser) -> None:
    context = dovecot.client_ssl_context()
    for server_name in ("127.0.0.1", "localhost"):
        conn = imaplib.IMAP4_SSL(server_name, dovecot.imaps_port, ssl_context=context, timeout=10)
        conn.login(mail_user.name, mail_user.password)
        conn.logout()


def test_tls_fails_without_the_ca(dovecot: Dovecot) -> None:
    with (
        socket.create_connection((dovecot.host, dovecot.imaps_port), timeout=10) as raw,
        pytest.raises(ssl.SSLCertVerificationError),
    ):
        ssl.create_default_context().wrap_socket(raw, server_hostname=dovecot.host)


def test_starttls_offered_and_works(dovecot: Dovecot, mail_user: MailUser) -> None:
    conn = imaplib.IMAP4(dovecot.host, dovecot.imap_port, timeout=10)
    assert "STARTTLS" in conn.capabilities
    conn.starttls(ssl_context=dovecot.client_ssl_context())
    conn.login(mail_user.name, mail_user.password)
    conn.logout()


def test_special_use_folders_and_create_folder(dovecot: Dovecot, mail_user: MailUser) -> None:
    dovecot.create_folder(mail_user, "Projects/Alpha")
    uid = dovecot.append(mail_user, make_message(), folder="Projects/Alpha")
    assert dovecot.uids(mail_user, "Projects/Alpha") == [uid]
    with dovecot.imap(mail_user) as conn:
        typ, lines = conn.list()
    assert typ == "OK"
    listing = b"\n".join(line for line in lines if isinstance(line, bytes))
    for flag, name in (
        (rb"\Sent", b"Sent"),
        (rb"\Drafts", b"Drafts"),
        (rb"\Trash", b"Trash"),
        (rb"\Junk", b"Junk"),
    ):
        assert any(flag in line and name in line for line in listing.splitlines()), listing
    assert b'"/"' in listing and b"Projects/Alpha" in listing


def test_kick_cuts_the_users_sessions(dovecot: Dovecot, mail_user: MailUser) -> None:
    other = dovecot.add_user()
    with dovecot.imap(mail_user) as kicked, dovecot.imap(other) as kept:
        kicked.select("INBOX")
        kept.select("INBOX")
        dovecot.kick(mail_user)
        # The server ends the session on its own (maybe after a BYE): read until EOF.
        kicked.sock.settimeout(10)
        while kicked.readline():
            pass
        with pytest.raises((imaplib.IMAP4.abort, OSError)):
            kicked.noop()
        assert kept.noop()[0] == "OK"


def test_restart_keeps_ports_users_and_mail(private_dovecot: Dovecot) -> None:
    user = private_dovecot.add_user()
    uid = private_dovecot.append(user, make_message())
    ports = (private_dovecot.imap_port, private_dovecot.imaps_port)
    private_dovecot.restart()
    assert (private_dovecot.imap_port, private_dovecot.imaps_port) == ports
    assert private_dovecot.uids(user) == [uid]
    assert "starting up" in private_dovecot.log_text()
    private_dovecot.stop()
    assert not private_dovecot.running
    with pytest.raises(OSError):
        socket.create_connection((private_dovecot.host, ports[0]), timeout=2).close()


def test_ending_a_process_group_does_not_wait_for_its_zombies_to_be_reaped() -> None:
    """Dovecot.stop() ends the master's children too. Killed, they are zombies until whoever
    adopted them reaps them (PID 1 of a container: seconds later, or never): the group is over
    then, and stop() used to wait for the reaping, 2 + 5 s at worst on every stop and restart.
    Here the group's member is this process's own child, reaped only at the end: a zombie for
    as long as the helper looks."""
    child = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        started = time.monotonic()
        _end_process_group(child.pid)
        took = time.monotonic() - started
        os_wait_status = child.wait(timeout=10)
        assert os_wait_status == -signal.SIGTERM  # it was ended, by the first signal
        # Waiting for the reaping takes grace + 5 s (7 s) whatever the load; a look takes ms.
        assert took < 5.0
        # The group is gone altogether now: nothing to signal, and no error.
        _end_process_group(child.pid)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


async def _read_until(stream: trio.SocketStream, buffer: bytearray, marker: bytes) -> bytes:
    while marker not in buffer:
        data = await stream.receive_some(65536)
        if not data:
            raise ConnectionError(f"closed before {marker!r}: {bytes(buffer)!r}")
        buffer += data
    end = buffer.index(marker) + len(marker)
    line_end = buffer.find(b"\r\n", end)
    end = len(buffer) if line_end < 0 else line_end + 2
    chunk = bytes(buffer[:end])
    del buffer[:end]
    return chunk


async def _idle_then_append(dovecot: Dovecot, user: MailUser, idle_for: float = 0.0) -> tuple[int, float]:
    """IDLE on INBOX, (wait ``idle_for``), APPEND from a second connection; returns the new
    UID and the seconds until the IDLE connection saw EXISTS."""
    stream = await trio.open_tcp_stream(dovecot.host, dovecot.imap_port)
    buffer = bytearray()
    async with stream:
        await _read_until(stream, buffer, b"* OK")
        await stream.send_all(f'a LOGIN "{user.name}" "{user.password}"\r\n'.encode())
        await _read_until(stream, buffer, b"a OK")
        await stream.send_all(b"b SELECT INBOX\r\n")
        await _read_until(stream, buffer, b"b OK")
        await stream.send_all(b"c IDLE\r\n")
        await _read_until(stream, buffer, b"+ ")
        if idle_for:
            await trio.sleep(idle_for)  # nothing to wait on: hibernation is silent
        started = time.monotonic()
        uid = await dovecot.aappend(user, make_message())
        with trio.fail_after(5):
            await _read_until(stream, buffer, b"EXISTS")
        latency = time.monotonic() - started
        await stream.send_all(b"DONE\r\n")
        await _read_until(stream, buffer, b"c OK")
    return uid, latency


async def test_idle_sees_a_second_connections_append_quickly(dovecot: Dovecot, mail_user: MailUser) -> None:
    uid, _latency = await _idle_then_append(dovecot, mail_user)  # EXISTS seen within 5 s
    assert uid == 1
    assert await dovecot.auids(mail_user) == [1]


async def test_hibernated_idle_still_sees_new_mail() -> None:
    with Dovecot(hibernate_timeout="1s") as server:
        user = server.add_user()
        uid, _latency = await _idle_then_append(server, user, idle_for=1.6)  # seen within 5 s
        assert uid == 1
        assert "imap_hibernate_timeout = 1s" in server.config_file.read_text()


# -- Creatio stand-in ------------------------------------------------------------------------

MAILBOX = "6d1a4a6e-8e43-4a8e-9a5f-0c8a3c1f0b11"


def full_email_body(mailbox_id: str, *subjects: str) -> dict[str, object]:
    return {
        "Emails": [{"Id": str(uuid.uuid4()), "Subject": s} for s in subjects],
        "SubscriptionInfo": {
            "Id": str(uuid.uuid4()),
            "SysAdminUnit": "Supervisor",
            "MailboxId": mailbox_id,
            "WorkspaceName": "Default",
            "TimeZoneId": "UTC",
            "EventTimeStamp": 0,
        },
    }


def state_body(mailbox_id: str, available: bool) -> dict[str, object]:
    return {
        "MailboxId": mailbox_id,
        "SenderEmailAddress": "a@example.test",
        "BpmUserName": "Supervisor",
        "BpmUserWorkspace": "Default",
        "Avaliable": available,
        "ExceptionClassName": "",
        "ExceptionMessage": "",
    }


async def test_standin_records_calls_over_real_http(creatio: CreatioStandIn) -> None:
    assert creatio.endpoint().startswith("http://127.0.0.1:")
    assert creatio.endpoint().endswith("/0/ServiceModel/ExchangeListenerService.svc/ProcessFullEmail")
    before = time.monotonic()
    async with httpx.AsyncClient() as client:
        response = await client.post(
            creatio.endpoint(),
            json=full_email_body(MAILBOX, "a", "b"),
            headers={"X-Test": "yes"},
        )
        assert response.status_code == 200
        response = await client.post(creatio.endpoint("ProcessMailboxState"), json=state_body(MAILBOX, False))
        assert response.status_code == 200
        assert (await client.post(f"{creatio.base_url}/elsewhere", json={})).status_code == 404
    (call,) = creatio.calls("ProcessFullEmail")
    assert call.headers["x-test"] == "yes"
    assert call.headers["content-type"].startswith("application/json")
    assert call.received_at >= before and call.accepted and call.mailbox_id == MAILBOX
    assert [e["Subject"] for e in creatio.emails_for(MAILBOX.upper())] == ["a", "b"]
    assert creatio.emails_for(str(uuid.uuid4())) == []
    assert [c.method for c in creatio.calls()] == ["ProcessFullEmail", "ProcessMailboxState", "elsewhere"]
    state = await creatio.wait_for_state(MAILBOX, available=False, timeout=1)
    assert state["Avaliable"] is False


async def test_standin_fails_on_demand(creatio: CreatioStandIn) -> None:
    creatio.fail_next("ProcessFullEmail", status=503, count=2)
    creatio.fail_mailbox("other-mailbox", 401)
    async with httpx.AsyncClient() as client:
        statuses = [
            (await client.post(creatio.endpoint(), json=full_email_body(MAILBOX, f"m{i}"))).status_code
            for i in range(3)
        ]
        other = await client.post(creatio.endpoint(), json=full_email_body("other-mailbox", "x"))
        state = await client.post(
            creatio.endpoint("ProcessMailboxState"), json=state_body("OTHER-MAILBOX", True)
        )
        creatio.clear_failures()
        again = await client.post(creatio.endpoint(), json=full_email_body("other-mailbox", "y"))
    assert statuses == [503, 503, 200]
    assert (other.status_code, state.status_code, again.status_code) == (401, 401, 200)
    # Only accepted calls count as delivered emails.
    assert [e["Subject"] for e in creatio.emails_for(MAILBOX)] == ["m2"]
    assert [e["Subject"] for e in creatio.emails_for("other-mailbox")] == ["y"]
    assert [c.status for c in creatio.calls("ProcessFullEmail")] == [503, 503, 200, 401, 200]


async def test_standin_waits_for_emails_and_states_without_polling(
    creatio: CreatioStandIn,
) -> None:
    async def send_later() -> None:
        async with httpx.AsyncClient() as client:
            for subject in ("x", "y", "z"):
                await client.post(creatio.endpoint(), json=full_email_body(MAILBOX, subject))
            await client.post(creatio.endpoint("ProcessMailboxState"), json=state_body(MAILBOX, True))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(send_later)
        emails = await creatio.wait_for_emails(MAILBOX, 3, timeout=10)
        state = await creatio.wait_for_state(MAILBOX, available=True, timeout=10)
    assert [e["Subject"] for e in emails] == ["x", "y", "z"]
    assert state["Avaliable"] is True
    with pytest.raises(AssertionError, match="Avaliable=True"):
        await creatio.wait_for_state(MAILBOX, True, timeout=0.2, since=time.monotonic())
    with pytest.raises(AssertionError, match="4 email"):
        await creatio.wait_for_emails(MAILBOX, 4, timeout=0.2)


async def test_two_standins_get_distinct_ports(creatio: CreatioStandIn) -> None:
    other = CreatioStandIn()
    async with trio.open_nursery() as nursery:
        await nursery.start(other.serve)
        assert other.port != creatio.port
        async with httpx.AsyncClient() as client:
            await client.post(other.endpoint("RefreshToken"), json={"MailboxId": MAILBOX})
        assert [c.method for c in other.calls()] == ["RefreshToken"]
        assert creatio.calls() == []
        nursery.cancel_scope.cancel()
