"""Several streaming subscriptions on one ``GetStreamingEvents`` connection.

Exchange carries up to 200 subscriptions per ``GetStreamingEvents`` request, and the list can only
be changed by issuing a new request. A :class:`StreamingHub` (one per EWS URL and credentials)
owns :class:`StreamingConnection` s; each ``listen`` joins one that has room as a
:class:`Member`. A connection re-issues its request with the full ``SubscriptionIds`` list
whenever membership changes (after a short settle delay, so a burst of joins costs one request),
reads the old response until the new one is open (plus ``handover_grace``), and dispatches each
notification to its member by ``SubscriptionId``.

Service accounts (``ImpersonatedUser``): the listeners of every mailbox the account impersonates
share connections, up to 200 subscriptions each, which Exchange serves only when the whole group
lives on one mailbox server: a connection has an *anchor* (the address of the mailbox that opened
it), every ``Subscribe`` for it is sent with ``X-AnchorMailbox: <anchor>`` and
``X-PreferServerAffinity: true``, the ``X-BackEndOverrideCookie`` of the first answer goes with
later ``Subscribe`` and ``GetStreamingEvents`` requests of the group, and those carry the anchor
too (Microsoft's "maintain affinity between a group of subscriptions and the Mailbox server").
A listener *reserves* its place on a connection before subscribing, so it subscribes with that
connection's affinity. Other credentials (a user's own) form a group per mailbox, as before.

Outcomes for a member: ``live`` is set once its id is in an open response; ``lost`` when the
server names its id in ``ErrorSubscriptionIds`` (only that member re-subscribes); ``error`` when
its connection breaks or the server refuses the request (every member of that request gets the
error, so each ``listen`` raises and the supervisor reconnects it with a catch-up).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Protocol
from xml.etree.ElementTree import Element

import httpx
import trio

from emlisten.errors import MailConnectError, MailSourceError
from emlisten.mail.ews import _soap
from emlisten.models import MailboxConfig

if TYPE_CHECKING:
    from emlisten.mail.ews.source import EwsClient

log = logging.getLogger(__name__)

#: Exchange's limit of subscriptions per ``GetStreamingEvents`` connection.
MAX_SUBSCRIPTIONS_PER_CONNECTION = 200

SUBSCRIPTION_GONE = frozenset(
    {"ErrorSubscriptionNotFound", "ErrorInvalidSubscription", "ErrorExpiredSubscription"}
)

#: Makes the connection's own client for the lead member's mailbox (its headers: auth, anchor,
#: impersonation), over the connection's HTTP pool.
ClientFactory = Callable[[httpx.AsyncClient, MailboxConfig], "EwsClient"]


class Member:
    """One listener's subscription on a hub connection."""

    __slots__ = ("ended", "error", "live", "lost", "mailbox", "notify", "refused", "settled", "subscription")

    def __init__(
        self, mailbox: MailboxConfig, subscription: str, notify: Callable[[], Awaitable[None]]
    ) -> None:
        self.mailbox = mailbox
        self.subscription = subscription
        self.notify = notify
        self.live = False
        self.lost = False
        #: Lost before its request had any successful envelope (the server refused it at once).
        self.refused = False
        self.error: MailSourceError | None = None
        #: Set when ``live`` or ended (whichever comes first).
        self.settled = trio.Event()
        self.ended = trio.Event()

    def set_live(self) -> None:
        self.live = True
        self.settled.set()

    def end(self, *, lost: bool = False, refused: bool = False, error: MailSourceError | None = None) -> None:
        if self.ended.is_set():
            return
        self.lost = lost
        self.refused = refused
        self.error = error
        self.ended.set()
        self.settled.set()


class _Request:
    """One ``GetStreamingEvents`` request of a connection."""

    def __init__(self, connection: StreamingConnection, ids: list[str]) -> None:
        self.connection = connection
        self.ids = ids
        self.scope = trio.CancelScope()
        self.finished = False
        self.opened = False
        self.closed = False
        self.busy = False
        self.busy_ms: int | None = None
        #: Any successful envelope on this request.
        self.successful = False
        self.error: MailSourceError | None = None
        self.superseded: _Request | None = None

    async def run(self, client: EwsClient, timeout_minutes: int) -> None:
        body = _soap.get_streaming_events(self.ids, timeout_minutes)
        try:
            with self.scope:
                await client.stream(body, self.on_envelope, on_open=self.on_open)
        except MailSourceError as exc:
            self.error = exc
        finally:
            self.finished = True
            self.connection.wake.set()

    def on_open(self) -> None:
        self.opened = True
        connection = self.connection
        for sid in self.ids:
            member = connection.members.get(sid)
            if member is not None:
                member.set_live()
        for older in connection.requests:
            if older is not self and older.superseded is self:
                older.scope.deadline = min(
                    older.scope.deadline, trio.current_time() + connection.handover_grace
                )

    async def on_envelope(self, root: Element) -> bool:
        connection = self.connection
        fault = _soap.fault_of(root)
        if fault is not None:
            return self._on_error(fault.code, fault.message, fault.back_off_ms, ())
        for message in _soap.streaming_messages(root):
            response = message.response
            if not response.ok:
                if not self._on_error(
                    response.code, response.message, response.back_off_ms, message.error_subscription_ids
                ):
                    return False
                continue
            self.successful = True
            for sid in dict.fromkeys(message.new_mail):
                member = connection.members.get(sid)
                if member is not None:
                    await member.notify()
            if message.connection_status == "Closed":
                self.closed = True
                return False
        return True

    def _on_error(self, code: str, message: str, back_off_ms: int | None, error_ids: tuple[str, ...]) -> bool:
        connection = self.connection
        if error_ids and (code in SUBSCRIPTION_GONE or all(i in self.ids for i in error_ids)):
            for sid in error_ids:
                connection.lose(sid, code, refused=not self.successful)
            # Exchange ends the response after naming lost subscriptions; re-issue without them.
            self.closed = True
            return False
        if code in SUBSCRIPTION_GONE:
            for sid in self.ids:
                connection.lose(sid, code, refused=not self.successful)
            self.closed = True
            return False
        if code == "ErrorServerBusy":
            self.busy = True
            self.busy_ms = back_off_ms
            return False
        raise connection.client_for_errors()._error(code, message)


class StreamingConnection:
    """One ``GetStreamingEvents`` connection carrying up to ``capacity`` subscriptions."""

    def __init__(self, hub: StreamingHub, anchor: str = "") -> None:
        self.hub = hub
        #: The group's anchor mailbox (grouped hubs only; "" otherwise).
        self.anchor = anchor
        #: ``X-BackEndOverrideCookie`` value from the group's first Subscribe answer.
        self.backend_cookie = ""
        #: Listeners that reserved a place and are subscribing.
        self.reserved = 0
        self.running = False
        self.members: dict[str, Member] = {}
        self.requests: list[_Request] = []
        self.wake = trio.Event()
        self.membership_changed = False
        self.handover_grace = hub.handover_grace
        self._client: EwsClient | None = None
        self._client_for: Member | None = None
        self._http: httpx.AsyncClient | None = None

    @property
    def capacity(self) -> int:
        return self.hub.capacity

    def lead(self) -> Member | None:
        return next(iter(self.members.values()), None)

    def client(self) -> EwsClient:
        """A client with the lead member's headers (the lead changes as members come and go)."""
        lead = self.lead()
        if lead is None or self._http is None:
            raise MailConnectError("EWS streaming connection has no member")
        if self._client is None or self._client_for is not lead:
            self._client = self.hub.make_client(self._http, lead.mailbox)
            self._client_for = lead
        if self.anchor:
            self._client.set_affinity(self.affinity_headers())
        return self._client

    def affinity_headers(self) -> dict[str, str]:
        """Headers keeping the group on its mailbox server ({} for an ungrouped hub)."""
        if not self.anchor:
            return {}
        headers = {"X-AnchorMailbox": self.anchor, "X-PreferServerAffinity": "true"}
        if self.backend_cookie:
            headers["Cookie"] = f"X-BackEndOverrideCookie={self.backend_cookie}"
        return headers

    def client_for_errors(self) -> EwsClient:
        if self._client is None:
            raise MailConnectError("EWS streaming connection has no client")
        return self._client

    def add(self, member: Member) -> None:
        self.members[member.subscription] = member
        self._changed()

    def remove(self, member: Member) -> None:
        if self.members.get(member.subscription) is member:
            del self.members[member.subscription]
            self._changed()

    def lose(self, sid: str, code: str, *, refused: bool) -> None:
        member = self.members.pop(sid, None)
        if member is not None:
            log.info(
                "EWS subscription lost (%s): subscribing again", code, extra={"mailbox": member.mailbox.id}
            )
            member.end(lost=True, refused=refused)
            self._changed()

    def _changed(self) -> None:
        self.membership_changed = True
        self.wake.set()

    def _close(self) -> None:
        if self in self.hub.connections:
            self.hub.connections.remove(self)

    def _fail(self, ids: list[str], error: MailSourceError) -> None:
        for sid in ids:
            member = self.members.pop(sid, None)
            if member is not None:
                member.end(error=error)

    async def run(self) -> None:
        """Until no member is left; every member still here at the end gets an error."""
        settings = self.hub.settings
        lead = self.lead()
        if lead is None:
            return
        try:
            async with self.hub.open_http(lead.mailbox) as http, trio.open_nursery() as nursery:
                self._http = http
                current: _Request | None = None
                busy_in_a_row = 0
                while self.members:
                    self.wake = trio.Event()
                    if current is not None and current.finished:
                        done, current = current, None
                        self.requests.remove(done)
                        if done.busy:
                            busy_in_a_row += 1
                            if self.lead() is not None:
                                await self.client().back_off(done.busy_ms, busy_in_a_row)
                        elif done.error is not None:
                            busy_in_a_row = 0
                            self._fail(done.ids, done.error)
                        elif not done.closed:
                            busy_in_a_row = 0
                            where = self.client_for_errors().where
                            self._fail(
                                done.ids,
                                MailConnectError(
                                    f"EWS {where}: stream ended without ConnectionStatus Closed"
                                ),
                            )
                        else:
                            busy_in_a_row = 0
                        continue
                    for old in [r for r in self.requests if r is not current and r.finished]:
                        self.requests.remove(old)
                    if current is None or self.membership_changed:
                        if current is not None and self.hub.settle_delay > 0:
                            # Joins come in bursts: one re-issue for the burst.
                            await trio.sleep(self.hub.settle_delay)
                            if not self.members:
                                break
                        self.membership_changed = False
                        new = _Request(self, list(self.members))
                        if current is not None:
                            current.superseded = new
                        self.requests.append(new)
                        nursery.start_soon(new.run, self.client(), settings.connection_timeout_minutes)
                        current = new
                        continue
                    await self.wake.wait()
                # No member: take no more joins from here on (the nursery still winds down).
                self._close()
                nursery.cancel_scope.cancel()
        except MailSourceError as exc:
            self._fail(list(self.members), exc)
        finally:
            self._http = None
            self._close()
            self._fail(list(self.members), MailConnectError("EWS streaming connection ended"))


class StreamingHub:
    """The streaming connections of one (EWS URL, credentials, impersonation) group."""

    def __init__(
        self,
        key: tuple[str, ...],
        settings: HubSettings,
        registry: dict[tuple[str, ...], StreamingHub],
        *,
        open_http: Callable[[MailboxConfig], AbstractAsyncContextManager[httpx.AsyncClient]],
        make_client: ClientFactory,
        grouped: bool = False,
    ) -> None:
        self.key = key
        #: Several mailboxes (a service account's) share connections, with server affinity.
        self.grouped = grouped
        self.open_http = open_http
        self.make_client = make_client
        self.settings = settings
        self.capacity = settings.subscriptions_per_connection
        self.handover_grace = settings.handover_grace
        self.settle_delay = settings.settle_delay
        self.connections: list[StreamingConnection] = []
        self._registry = registry

    def reserve(self, anchor: str) -> StreamingConnection:
        """A place on a connection with room (a new one, anchored at ``anchor`` when the hub
        is grouped, if none has room); :meth:`join` or :meth:`unreserve` ends the reservation."""
        for connection in self.connections:
            if len(connection.members) + connection.reserved < self.capacity:
                connection.reserved += 1
                return connection
        connection = StreamingConnection(self, anchor if self.grouped else "")
        connection.reserved += 1
        self.connections.append(connection)
        return connection

    def join(self, member: Member, connection: StreamingConnection) -> StreamingConnection:
        """``member`` on ``connection``, which it reserved. If that connection ended meanwhile
        (its last member left), on a new one with the same anchor and cookie: the member's
        subscription was made with them."""
        if connection not in self.connections:
            ended = connection
            connection = StreamingConnection(self, ended.anchor)
            connection.backend_cookie = ended.backend_cookie
            self.connections.append(connection)
        else:
            connection.reserved -= 1
        connection.add(member)
        if not connection.running:
            connection.running = True
            trio.lowlevel.spawn_system_task(self._run, connection)
        return connection

    def unreserve(self, connection: StreamingConnection) -> None:
        connection.reserved -= 1
        if not connection.running and not connection.members and not connection.reserved:
            connection._close()
            self._forget_if_empty()

    def _forget_if_empty(self) -> None:
        if not self.connections and self._registry.get(self.key) is self:
            del self._registry[self.key]

    async def _run(self, connection: StreamingConnection) -> None:
        try:
            await connection.run()
        except Exception:  # a system task must not crash the run: members get the error
            log.exception("EWS streaming connection failed")
            connection._fail(list(connection.members), MailConnectError("EWS streaming connection failed"))
        finally:
            self._forget_if_empty()


class HubSettings(Protocol):
    """What the hub reads from ``EwsSettings``."""

    @property
    def connection_timeout_minutes(self) -> int: ...
    @property
    def subscriptions_per_connection(self) -> int: ...
    @property
    def handover_grace(self) -> float: ...
    @property
    def settle_delay(self) -> float: ...
