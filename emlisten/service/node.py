"""One emlisten process: picks the adapters, starts the task tree for its role, shuts down cleanly.

```
root nursery
  asyncio bridge loop
  front scope (cancelled first on shutdown)
    http server
    mailbox manager            (primary, all)
  reader pool + delivery worker  (secondary, all; given a grace period on shutdown)
```
"""

from __future__ import annotations

import logging
import signal
from dataclasses import dataclass

import trio

from emlisten._bridge import open_asyncio_bridge
from emlisten.abc import MailSource, Sink, Store, TaskQueue
from emlisten.api.admin import admin_blueprint
from emlisten.api.app import create_app
from emlisten.api.server import serve_api
from emlisten.config import Role, Settings
from emlisten.errors import ConfigError
from emlisten.mail.imap import ImapSource
from emlisten.metrics import Metrics
from emlisten.queue.inprocess import InProcessQueue
from emlisten.service.delivery import DeliveryWorker
from emlisten.service.listeners import StoreListenerControl
from emlisten.service.listening import MailboxManager
from emlisten.service.readers import ReaderPool
from emlisten.sink.creatio import CreatioSink

log = logging.getLogger(__name__)


@dataclass
class Adapters:
    store: Store
    queue: TaskQueue
    source: MailSource
    sink: Sink


def build_adapters(settings: Settings) -> Adapters:
    if settings.redis_url:
        raise ConfigError("EMLISTEN_REDIS_URL is set, but the Redis store is not available in this version")
    if settings.amqp_url:
        raise ConfigError("EMLISTEN_AMQP_URL is set, but the RabbitMQ queue is not available in this version")
    if settings.role is Role.SECONDARY:
        raise ConfigError(
            "--role=secondary needs the shared Redis store and RabbitMQ queue "
            "(EMLISTEN_REDIS_URL, EMLISTEN_AMQP_URL); use --role=all for a single process"
        )
    from emlisten.store.memory import MemoryStore

    source = ImapSource(
        idle_renew_seconds=settings.idle_renew_seconds,
        keepalive_seconds=settings.keepalive_seconds,
        poll_seconds=settings.poll_seconds,
        connect_timeout=settings.connect_timeout_seconds,
        command_timeout=settings.command_timeout_seconds,
        ca_file=settings.tls_ca_file,
    )
    return Adapters(
        store=MemoryStore(),
        queue=InProcessQueue(),
        source=source,
        sink=CreatioSink(timeout=settings.delivery_timeout_seconds),
    )


async def run_node(
    settings: Settings,
    adapters: Adapters | None = None,
    *,
    handle_signals: bool = True,
    shutdown: trio.Event | None = None,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run until cancelled, signalled or ``shutdown`` is set. ``started(port)`` once the API listens."""

    adapters = adapters or build_adapters(settings)
    role = settings.role
    # Single-process mode without a secondary: the primary delivers itself.
    works = role.works or isinstance(adapters.queue, InProcessQueue)
    log.info(
        "emlisten starting: node=%s role=%s store=%s queue=%s",
        settings.node_id,
        role.value,
        adapters.store.name,
        adapters.queue.name,
    )
    if adapters.store.name == "memory":
        log.warning("in-memory store: subscriptions and checkpoints are lost when this process exits")
    metrics = Metrics()
    manager = MailboxManager(
        settings, adapters.store, adapters.queue, adapters.source, adapters.sink, metrics=metrics
    )
    readers = ReaderPool(adapters.source, idle_seconds=settings.reader_idle_seconds)
    worker = DeliveryWorker(settings, adapters.store, adapters.queue, readers, adapters.sink, metrics=metrics)
    depth = getattr(adapters.queue, "depth", None)
    metrics.watch(
        settings.node_id,
        states=lambda: manager.local_states,
        leases=lambda: len(manager.owned),
        queue_depth=depth if callable(depth) else lambda: None,
    )

    def extra_status() -> dict[str, object]:
        return {"Listeners": manager.running_count, "Draining": worker.busy, "Readers": readers.open_count}

    control = StoreListenerControl(
        adapters.store, adapters.queue, node_id=settings.node_id, role=role.value, extra_status=extra_status
    )
    app = create_app(control, api_token=settings.api_token, blueprints=[admin_blueprint(control, metrics)])
    shutdown = shutdown if shutdown is not None else trio.Event()
    try:
        async with open_asyncio_bridge(), trio.open_nursery() as root:
            if handle_signals:
                root.start_soon(_watch_signals, shutdown)
            if works:
                await root.start(readers.run)
                await root.start(worker.run)
            front = trio.CancelScope()
            port: int = await root.start(_run_front, front, settings, manager, app, role)
            log.info("ready: API on %s:%d", settings.host, port)
            task_status.started(port)
            await shutdown.wait()
            log.info("shutting down (grace %.0fs)", settings.shutdown_grace_seconds)
            front.cancel()
            worker.stop_intake()
            with trio.move_on_after(settings.shutdown_grace_seconds) as grace:
                await worker.wait_idle()
            if grace.cancelled_caught:
                log.warning("grace period over: cutting deliveries still in flight (they will be retried)")
            root.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(5):
            await adapters.sink.aclose()
            await adapters.queue.aclose()
            await adapters.store.aclose()
        log.info("stopped")


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


async def _watch_signals(shutdown: trio.Event) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.info("received %s", signal.Signals(signum).name)
            if shutdown.is_set():
                # Second signal: the operator wants out now.
                raise KeyboardInterrupt
            shutdown.set()
