"""Every Creatio route is served by the real node (the features' own suites test them in depth)."""

from __future__ import annotations

from tests.servers.dovecot import MailUser
from tests.service.conftest import RunningService


async def test_mailbox_routes_are_served(service: RunningService, mail_user: MailUser) -> None:
    creds = service.credentials(mail_user)
    validate = await service.http.post("/api/mailbox/validate", json=creds)
    assert validate.status_code == 200
    assert validate.json()["IsValid"] is True

    wrong = await service.http.post("/api/mailbox/validate", json=dict(creds, Password="bad-password"))
    assert wrong.json()["IsValid"] is False
    assert "bad-password" not in wrong.text

    folders = await service.http.post("/api/mailbox/folders", json=creds)
    assert folders.status_code == 200
    assert "INBOX" in {f["Id"] for f in folders.json()}

    pong = await service.http.post("/api/availability/app", json=service.creatio.base_url)
    assert pong.status_code == 200 and pong.json() == "pong"


async def test_send_route_is_served(service: RunningService, mail_user: MailUser) -> None:
    # An empty body is refused by the send route itself (not a 404 from a missing route).
    response = await service.http.post("/apiv2/email/send", json={})
    assert response.status_code == 400
    assert response.json()["Message"]
