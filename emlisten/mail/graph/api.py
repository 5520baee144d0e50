"""The HTTP side of Graph change notifications: a Blueprint on emlisten's API.

``POST /v1/graph/notifications/<route>`` receives change notifications and
``POST /v1/graph/lifecycle/<route>`` lifecycle notifications (see
:mod:`emlisten.mail.graph.notifications` for what a route is). Both answer Graph's validation
handshake (``?validationToken=...`` -> ``200 text/plain`` with the token) for routes emlisten
made, and ``202`` once the notifications are checked and the resulting sync tasks published;
an unknown route is ``404``, a queue that cannot take the task ``503`` (Graph retries).

Graph sends no bearer token: when ``EMLISTEN_API_TOKEN`` is set these routes must be exempt from
it (they authenticate by the route's HMAC and the ``clientState``).
"""

from __future__ import annotations

import json
import logging

import trio
from quart import Blueprint, Response, request

from emlisten.errors import QueueError
from emlisten.mail.graph.notifications import LIFECYCLE_PREFIX, NOTIFICATION_PREFIX, Publish
from emlisten.mail.graph.source import GraphSource

log = logging.getLogger(__name__)

#: Notification bodies are small; refuse anything that is not.
MAX_NOTIFICATION_BYTES = 1024 * 1024
#: Graph wants an answer within 3 s; leave room for the network.
PUBLISH_TIMEOUT = 2.0


def graph_blueprint(source: GraphSource, publish: Publish) -> Blueprint:
    """Routes for ``source``'s notifications; ``publish`` puts a SyncTask on the queue."""

    blueprint = Blueprint("graph", __name__)
    hub = source.hub

    async def receive(token: str, *, lifecycle: bool) -> Response:
        route = hub.signer.parse(token)
        if route is None:
            return Response("", status=404)
        validation = request.args.get("validationToken")
        if validation is not None:
            return Response(validation, status=200, content_type="text/plain; charset=utf-8")
        data = await request.get_data(cache=False, as_text=False)
        if isinstance(data, str):  # not with as_text=False; keeps the type checker informed
            data = data.encode("utf-8")
        if len(data) > MAX_NOTIFICATION_BYTES:
            return Response("", status=413)
        try:
            body = json.loads(data.decode("utf-8-sig")) if data.strip() else None
        except (UnicodeDecodeError, json.JSONDecodeError):
            return Response("", status=400)
        try:
            with trio.fail_after(PUBLISH_TIMEOUT):
                await hub.handle(route, body, publish, lifecycle=lifecycle)
        except (QueueError, trio.TooSlowError) as exc:
            log.warning("could not queue a Graph notification: %s", type(exc).__name__)
            return Response("", status=503)
        return Response("", status=202)

    @blueprint.post(NOTIFICATION_PREFIX + "<token>")
    async def notification(token: str) -> Response:
        return await receive(token, lifecycle=False)

    @blueprint.post(LIFECYCLE_PREFIX + "<token>")
    async def lifecycle_notification(token: str) -> Response:
        return await receive(token, lifecycle=True)

    return blueprint


__all__ = ["MAX_NOTIFICATION_BYTES", "graph_blueprint"]
