"""One emlisten process: picks the adapters, starts the task tree for its role, shuts down cleanly.

```
root nursery
  asyncio bridge loop            (aio-pika, aiosmtplib live here; Redis is pure Trio)
  signal watcher
  reader pool + delivery worker  (secondary, all; a primary stands in while no secondary lives)
  front scope (cancelled first on shutdown)
    http server
    mailbox manager              (primary, all: ownership + one supervisor per owned mailbox)
```
"""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager, suppress
from dataclasses import dataclass
from typing import TypeVar

import trio
from quart import Blueprint

from emlisten import __version__, _egress
from emlisten._bridge import open_asyncio_bridge
from emlisten.abc import MailSource, Sink, Store, TaskQueue
from emlisten.api._guard import ApiAccess
from emlisten.api.admin import admin_blueprint
from emlisten.api.app import create_app
from emlisten.api.history import history_blueprint
from emlisten.api.server import serve_api
from emlisten.api.v1 import node_v1_blueprint
from emlisten.config import Role, Settings
from emlisten.errors import ConfigError, StoreError
from emlisten.mail.ews import EwsSource
from emlisten.mail.graph import announce_api, graph_source_from_settings, graph_sources
from emlisten.mail.imap import ImapSource
from emlisten.mail.router import RoutingSource
from emlisten.metrics import Metrics
from emlisten.models import NodeInfo
from emlisten.queue.inprocess import InProcessQueue
from emlisten.service.collector import CollectorPolicy
from emlisten.service.delivery import DeliveryWorker
from emlisten.service.history import HistoryLoads
from emlisten.service.listeners import StoreListenerControl
from emlisten.service.listening import MailboxManager
from emlisten.service.readers import ReaderPool
from emlisten.sink.creatio import CreatioSink
from emlisten.sink.webhook import RoutingSink, WebhookSink, find_webhook_sink
from emlisten.store.memory import MemoryStore

log = logging.getLogger(__name__)

S = TypeVar("S", bound=MailSource)


@dataclass
class Adapters:
    store: Store
    queue: TaskQueue
    source: MailSource
    sink: Sink


def check_topology(settings: Settings) -> None:
    """Refuse combinations that would silently lose or strand mail."""

    if settings.amqp_url and not settings.redis_url:
        raise ConfigError(
            "EMLISTEN_AMQP_URL needs EMLISTEN_REDIS_URL: workers on other nodes must read the "
            "mailboxes and checkpoints from the shared store"
        )
    if settings.role is Role.SECONDARY and not (settings.redis_url and settings.amqp_url):
        raise ConfigError(
            "--role=secondary needs the shared Redis store and RabbitMQ queue "
            "(EMLISTEN_REDIS_URL, EMLISTEN_AMQP_URL); use --role=all for a single process"
        )
    if settings.redis_url and not settings.secret_key:
        raise ConfigError(
            "EMLISTEN_SECRET_KEY is required with Redis: mailbox credentials are encrypted at rest"
        )
    if settings.data_dir and not settings.redis_url and not settings.secret_key:
        raise ConfigError(
            "EMLISTEN_DATA_DIR needs EMLISTEN_SECRET_KEY: mailbox credentials are encrypted at rest "
            "(keep the key outside the data directory); unset EMLISTEN_DATA_DIR to keep state in memory"
        )


def build_local_adapters(settings: Settings) -> Adapters:
    """Source and sink of this process, with the in-memory store and in-process queue."""

    return Adapters(
        store=MemoryStore(),
        queue=InProcessQueue(),
        source=RoutingSource(mail_sources(settings)),
        # Mailboxes registered through /v1 go to their webhook (docs/webhooks.md).
        sink=RoutingSink(
            CreatioSink(
                timeout=settings.delivery_timeout_seconds,
                max_connections=settings.callback_max_connections,
            ),
            WebhookSink.from_settings(settings),
        ),
    )


def mail_sources(settings: Settings) -> dict[str, MailSource]:
    """One MailSource per protocol; a mailbox's ``protocol`` picks one (docs/protocols.md)."""

    sources: dict[str, MailSource] = {}
    sources["imap"] = ImapSource(
        idle_renew_seconds=settings.idle_renew_seconds,
        keepalive_seconds=settings.keepalive_seconds,
        poll_seconds=settings.poll_seconds,
        connect_timeout=settings.connect_timeout_seconds,
        command_timeout=settings.command_timeout_seconds,
        recheck_seconds=settings.recheck_seconds,
        recheck_late_seconds=settings.recheck_late_seconds,
        recheck_after_connect=settings.recheck_after_connect,
        max_concurrent_wakeups=settings.max_concurrent_wakeups,
        ca_file=settings.tls_ca_file,
    )
    sources["graph"] = graph_source_from_settings(settings)
    sources["ews"] = EwsSource(
        connect_timeout=settings.connect_timeout_seconds,
        request_timeout=settings.command_timeout_seconds,
        ca_file=settings.tls_ca_file,
        auth_mode=settings.ews_auth,
        connections_per_account=settings.ews_connections_per_account,
    )
    return sources


@asynccontextmanager
async def open_adapters(settings: Settings) -> AsyncIterator[Adapters]:
    """The configured adapters; RabbitMQ needs the asyncio bridge to be open (Redis does not)."""

    check_topology(settings)
    local = build_local_adapters(settings)
    async with AsyncExitStack() as stack:
        store: Store = local.store
        queue: TaskQueue = local.queue
        if settings.redis_url:
            from emlisten.store.redis import RedisStore

            assert settings.secret_key is not None
            store = await stack.enter_async_context(
                RedisStore.open(
                    settings.redis_url,
                    secret_key=settings.secret_key,
                    prefix=settings.redis_prefix,
                    # No store call may hang past a lease's life (a Redis that stopped answering).
                    command_timeout=settings.lease_ttl_seconds,
                )
            )
            if settings.data_dir:
                log.info("EMLISTEN_DATA_DIR is not used: the store is Redis")
        elif settings.data_dir:
            from emlisten.store.sqlite import SqliteStore

            assert settings.secret_key is not None
            store = await stack.enter_async_context(
                SqliteStore.open(settings.data_dir, secret_key=settings.secret_key)
            )
        if settings.amqp_url:
            from emlisten.queue.rabbitmq import RabbitMQQueue

            queue = await stack.enter_async_context(
                RabbitMQQueue.open(
                    settings.amqp_url, queue_name=settings.amqp_queue, quorum=settings.amqp_quorum
                )
            )
        yield Adapters(store, queue, local.source, local.sink)


async def run_node(
    settings: Settings,
    adapters: Adapters | None = None,
    *,
    handle_signals: bool = True,
    shutdown: trio.Event | None = None,
    process_exits: bool = False,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run until cancelled, signalled or ``shutdown`` is set. ``started(port)`` once the API listens.

    ``adapters`` (tests, benchmarks) replaces the configured ones; they are still closed here.
    ``process_exits``: the process ends when this returns (the CLI), so the memory of the node
    is left to the OS instead of a last full garbage collection.
    """

    shutdown = shutdown if shutdown is not None else trio.Event()
    async with open_asyncio_bridge():
        if adapters is None:
            async with open_adapters(settings) as opened:
                await _run(settings, opened, handle_signals, shutdown, task_status, exits=process_exits)
        else:
            await _run(settings, adapters, handle_signals, shutdown, task_status, exits=process_exits)


async def _run(
    settings: Settings,
    adapters: Adapters,
    handle_signals: bool,
    shutdown: trio.Event,
    task_status: trio.TaskStatus[int],
    *,
    exits: bool,
) -> None:
    role = settings.role
    shared_queue = not isinstance(adapters.queue, InProcessQueue)
    _egress.configure(callback_allow=settings.callback_allow, mail_allow=settings.mail_allow)
    log.info(
        "emlisten %s starting: node=%s role=%s store=%s queue=%s",
        __version__,
        settings.node_id,
        role.value,
        adapters.store.name,
        adapters.queue.name,
    )
    if adapters.store.name == "memory":
        log.warning(
            "in-memory store: subscriptions and checkpoints are lost when this process exits "
            "(set EMLISTEN_DATA_DIR to keep them)"
        )
    metrics = Metrics()
    manager = MailboxManager(
        settings, adapters.store, adapters.queue, adapters.source, adapters.sink, metrics=metrics
    )
    readers = ReaderPool(adapters.source, idle_seconds=settings.reader_idle_seconds)
    worker = DeliveryWorker(settings, adapters.store, adapters.queue, readers, adapters.sink, metrics=metrics)
    history = HistoryLoads(settings, adapters.store, adapters.source, adapters.sink)
    imap = _source_of(adapters, "imap", ImapSource)
    if imap is not None:
        imap.command_observer = metrics.imap_command
        looks = metrics.imap_looks
        imap.look_observer = lambda outcome: looks.labels(outcome).inc()
    depth = getattr(adapters.queue, "depth", None)
    metrics.watch(
        settings.node_id,
        states=lambda: manager.local_states,
        leases=lambda: len(manager.owned),
        queue_depth=depth if callable(depth) and not shared_queue else lambda: None,
    )

    def extra_status() -> dict[str, object]:
        return {
            "Listeners": manager.running_count,
            "Draining": worker.busy,
            "Readers": readers.open_count,
            "HistoryLoads": history.running_count,
        }

    control = StoreListenerControl(
        adapters.store,
        adapters.queue,
        node_id=settings.node_id,
        role=role.value,
        extra_status=extra_status,
        history=history.progress,
    )
    app = create_app(
        control,
        api_token=settings.api_token,
        access=ApiAccess.from_settings(settings),
        max_body_bytes=settings.max_request_bytes,
        blueprints=[
            *_feature_blueprints(settings, adapters, control, metrics),
            history_blueprint(history, adapters.store),
            node_v1_blueprint(settings, control, adapters.store, adapters.sink, history=history.progress),
        ],
    )
    collector = CollectorPolicy(full_every=settings.gc_full_collect_seconds, on_pause=metrics.gc_pause)
    try:
        async with trio.open_nursery() as root:
            if handle_signals:
                root.start_soon(_watch_signals, shutdown)
            await root.start(collector.run)
            await root.start(readers.run)
            await root.start(history.run)
            webhooks = find_webhook_sink(adapters.sink)
            if webhooks is not None:
                webhooks.bind(adapters.store, node_id=settings.node_id)
                webhooks.on_outcome = metrics.activity.webhook_outcome
                await root.start(webhooks.run)
            if role.works or not shared_queue:
                # Secondaries always work; so does any node whose queue is its own.
                await root.start(worker.run)
            else:
                root.start_soon(_stand_in_worker, settings, adapters.store, worker)
            if not role.listens:
                root.start_soon(_heartbeat, settings, adapters.store)
            front = trio.CancelScope()
            port: int = await root.start(_run_front, front, settings, manager, app, role)
            announce_api(adapters.source, settings.host, port)  # Graph's notification URL
            log.info("ready: API on %s:%d", settings.host, port)
            task_status.started(port)
            await shutdown.wait()
            log.info("shutting down (grace %.0fs)", settings.shutdown_grace_seconds)
            collector.hold()
            ews_source = _source_of(adapters, "ews", EwsSource)
            if ews_source is not None:
                # Another node takes the mailboxes over: leave their EWS subscriptions to lapse
                # (docs/exchange.md#unsubscribe-on-close-and-on-shutdown).
                ews_source.keep_subscriptions()
            front.cancel()
            worker.stop_intake()
            with trio.move_on_after(settings.shutdown_grace_seconds) as grace:
                await worker.wait_idle()
            if grace.cancelled_caught:
                log.warning("grace period over: cutting deliveries still in flight (they will be retried)")
            root.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(5):
            if not role.listens:
                with suppress(StoreError):
                    await adapters.store.remove_node(settings.node_id)
            await adapters.sink.aclose()
            await adapters.queue.aclose()
            await adapters.store.aclose()
        collector.release(collect=not exits)
        log.info("stopped")


def _feature_blueprints(
    settings: Settings, adapters: Adapters, control: StoreListenerControl, metrics: Metrics
) -> list[Blueprint]:
    # Imported here: these modules import the app module's helpers.
    from emlisten.api.mailbox import mailbox_blueprint
    from emlisten.api.send import send_blueprint
    from emlisten.mail.ews.send import EwsSender
    from emlisten.mail.graph.send import GraphSender
    from emlisten.sender.router import ProtocolSender
    from emlisten.sender.smtp import SmtpSender
    from emlisten.ui.routes import console_blueprint

    imap = _source_of(adapters, "imap", ImapSource)
    ews = _source_of(adapters, "ews", EwsSource)
    graph_source = next(iter(graph_sources(adapters.source)), None)
    # Each mailbox sends through its own protocol: SMTP, EWS CreateItem or Graph /sendMail.
    sender = ProtocolSender(
        {
            "imap": SmtpSender(ca_file=settings.tls_ca_file, imap_source=imap),
            "ews": EwsSender(ews or EwsSource(ca_file=settings.tls_ca_file)),
            "graph": GraphSender(graph_source or graph_source_from_settings(settings)),
        }
    )
    from emlisten.mail.graph.api import graph_blueprint

    return [
        admin_blueprint(control, metrics),
        console_blueprint(control, adapters.store, metrics.activity, node_id=settings.node_id),
        mailbox_blueprint(
            imap,
            ews=ews,
            graph=graph_source,
            validate_timeout=settings.validate_timeout_seconds,
            validate_connect_timeout=settings.validate_connect_timeout_seconds,
        ),
        send_blueprint(lambda: sender),
        *(graph_blueprint(graph, adapters.queue.publish) for graph in graph_sources(adapters.source)),
    ]


def _source_of(adapters: Adapters, protocol: str, kind: type[S]) -> S | None:
    """The mail source serving ``protocol``, when it is of the expected kind."""
    source = adapters.source
    if isinstance(source, RoutingSource):
        source = source.sources.get(protocol, source)
    return source if isinstance(source, kind) else None


async def _run_front(
    scope: trio.CancelScope,
    settings: Settings,
    manager: MailboxManager,
    app: object,
    role: Role,
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    with scope:
        async with trio.open_nursery() as nursery:
            if role.listens:
                await nursery.start(manager.run)
            port: int = await nursery.start(serve_api, app, settings.host, settings.port)
            task_status.started(port)


async def _heartbeat(settings: Settings, store: Store) -> None:
    """Secondaries announce themselves, so primaries know someone consumes the queue."""

    started_at = time.time()
    while True:
        node = NodeInfo(settings.node_id, settings.role.value, 0, time.time(), started_at, __version__)
        try:
            await store.heartbeat(node, settings.lease_ttl_seconds)
        except StoreError as exc:
            log.warning("heartbeat failed: %s", exc)
        await trio.sleep(settings.lease_renew_seconds)


async def _stand_in_worker(settings: Settings, store: Store, worker: DeliveryWorker) -> None:
    """A primary with a shared queue delivers itself while no secondary is alive."""

    while True:
        await _until_workers_alive(settings, store, alive=False)
        log.warning("no secondary alive: this primary downloads and delivers until one returns")
        worker.reset_intake()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(worker.run)
            await _until_workers_alive(settings, store, alive=True)
            log.info("a secondary is alive again: handing delivery back")
            worker.stop_intake()
            with trio.move_on_after(settings.shutdown_grace_seconds):
                await worker.wait_idle()
            # Unfinished tasks go back to the queue for the secondary.
            nursery.cancel_scope.cancel()


async def _until_workers_alive(settings: Settings, store: Store, *, alive: bool) -> None:
    while True:
        if await _workers_alive(settings, store) == alive:
            return
        await trio.sleep(settings.lease_renew_seconds)


async def _workers_alive(settings: Settings, store: Store) -> bool:
    try:
        nodes = await store.list_nodes()
    except StoreError as exc:
        log.warning("cannot see the other nodes: %s", exc)
        return True  # keep the current arrangement rather than flapping
    return any(Role(n.role).works for n in nodes if n.id != settings.node_id)


async def _watch_signals(shutdown: trio.Event) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.info("received %s", signal.Signals(signum).name)
            if shutdown.is_set():
                # Second signal: the operator wants out now.
                raise KeyboardInterrupt
            shutdown.set()
