"""OAuth mailboxes through the whole service: a rejected token makes emlisten ask Creatio for a
new one (RefreshToken); the new token arrives through /update and listening resumes; without
one, the mailbox is reported unavailable."""

from __future__ import annotations

import trio

from emlisten.models import MailboxState
from tests.servers.creatio import CreatioStandIn
from tests.servers.dovecot import Dovecot
from tests.servers.tokeninfo import TokenInfoServer
from tests.service.conftest import running_service


async def test_rejected_token_is_refreshed_through_creatio(
    oauth_dovecot: Dovecot, tokeninfo: TokenInfoServer, creatio: CreatioStandIn, nursery: trio.Nursery
) -> None:
    user = oauth_dovecot.add_user()
    stale = tokeninfo.issue(user.name)
    tokeninfo.revoke(stale)
    async with running_service(oauth_dovecot, creatio, nursery, token_refresh_wait_seconds=30) as service:
        creds = service.credentials(user, UseOAuth=True, AccessToken=stale, Password="")
        assert (await service.create(creds)).status_code == 200
        (call,) = await creatio.wait_for_calls("RefreshToken", 1, timeout=15)
        assert call.body["MailboxId"] == creds["Id"]
        assert stale not in call.raw_body.decode()
        # Within the wait, Creatio is not told the mailbox is broken.
        assert creatio.states_for(creds["Id"]) == []

        fresh = tokeninfo.issue(user.name)
        response = await service.http.post("/api/listeners/update", json=[dict(creds, AccessToken=fresh)])
        assert response.status_code == 200, response.text
        await service.wait_state(creds["Id"], MailboxState.LISTENING)
        await oauth_dovecot.aappend(user, b"Subject: with a fresh token\r\n\r\nbody\r\n")
        (email,) = await creatio.wait_for_emails(creds["Id"], 1, timeout=15)
        assert email["Subject"] == "with a fresh token"


async def test_no_new_token_means_unavailable(
    oauth_dovecot: Dovecot, tokeninfo: TokenInfoServer, creatio: CreatioStandIn, nursery: trio.Nursery
) -> None:
    user = oauth_dovecot.add_user()
    stale = tokeninfo.issue(user.name)
    tokeninfo.revoke(stale)
    async with running_service(oauth_dovecot, creatio, nursery, token_refresh_wait_seconds=0.5) as service:
        creds = service.credentials(user, UseOAuth=True, AccessToken=stale, Password="")
        assert (await service.create(creds)).status_code == 200
        state = await creatio.wait_for_state(creds["Id"], False, timeout=15)
        assert "token" in state["ExceptionMessage"].lower()
        assert stale not in str(state)
