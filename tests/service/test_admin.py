"""The native admin API that operators and `emlisten status` read."""

from __future__ import annotations

import trio

from emlisten.models import MailboxState
from tests.servers.dovecot import MailUser
from tests.service.conftest import RunningService


async def test_mailboxes_and_nodes(service: RunningService, make_mail_user: object) -> None:
    good: MailUser = make_mail_user()  # type: ignore[operator]
    bad: MailUser = make_mail_user()  # type: ignore[operator]
    c_good = service.credentials(good, FolderIds=["INBOX"])
    c_bad = service.credentials(bad, Password="wrong-password")
    assert (await service.create(c_good, c_bad)).status_code == 200
    await service.wait_state(c_good["Id"], MailboxState.LISTENING)
    await service.wait_state(c_bad["Id"], MailboxState.AUTHENTICATION_ERROR)
    uid = await service.dovecot.aappend(good, b"Subject: counted\r\n\r\nbody\r\n")
    await service.creatio.wait_for_emails(c_good["Id"], 1, timeout=15)

    body = (await service.http.get("/v1/mailboxes")).json()
    by_id = {m["id"]: m for m in body["mailboxes"]}
    assert body["count"] == 2
    listening = by_id[c_good["Id"]]
    assert listening["state"] == "listening"
    assert listening["node"] == "test-node"
    assert listening["email"] == good.email
    assert listening["delivered"] == 1
    (folder,) = listening["folders"]
    assert folder["name"] == "INBOX" and folder["last_uid"] == uid and folder["uidvalidity"] > 0
    failing = by_id[c_bad["Id"]]
    assert failing["state"] == "authenticationError"
    assert failing["last_error"] and "wrong-password" not in failing["last_error"]

    # The heartbeat carries the mailbox count as of its last round (every lease_renew_seconds).
    with trio.fail_after(10):
        while (node := (await service.http.get("/v1/nodes")).json()["nodes"][0])["mailboxes"] != 2:
            await trio.sleep(0.05)
    assert node["id"] == "test-node" and node["role"] == "all" and node["mailboxes"] == 2
    assert 0 <= node["heartbeat_age_seconds"] < 10

    ready = await service.http.get("/readyz")
    assert ready.status_code == 200
    assert ready.json() == {"ready": True, "checks": {"store": "ok", "queue": "ok"}}

    status = (await service.http.get("/api/listeners/status")).json()
    assert status["Connections"]["Total"] == 2
    assert status["Connections"]["listening"] == 1
    assert status["Connections"]["authenticationError"] == 1
