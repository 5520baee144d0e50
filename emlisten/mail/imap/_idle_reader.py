"""One task reads for every idle IMAP session, and wakes a session's own task only for news.

Why: Dovecot sends its IDLE keepalive (``* OK Still here``) to every session of one client
address in the same second. With one task waiting per socket, 10,000 sessions meant 10,000
task wake-ups in one event-loop pass (80-110 µs each: 0.4-1.0 s), and mail that arrived in
that second waited for the whole pass at each of its round trips. Here the sockets of sessions
waiting in IDLE sit in a private epoll set; one system task waits on that set (an epoll fd is
itself pollable), reads what is ready, and drops what the waiting session says it may skip
(the keepalive) without a task switch. It serves at most ``CHUNK`` sockets per pass of the
event loop, so the sessions fetching mail take their turns between chunks.

A transport parks here only in a read that passes something over (``skip``) and has to wait;
other reads wait on their own socket as before. Where ``select.epoll`` is missing (not Linux),
:func:`shared_reader` returns None and every read waits on its own socket.

The reader is a system task of the current Trio run (like Trio's own I/O manager), started by
the first parked read: it has no resources of its own beyond the epoll set, which it closes
when the run ends.
"""

from __future__ import annotations

import logging
import select
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from typing import TYPE_CHECKING

import outcome
import trio

if TYPE_CHECKING:
    from emlisten.mail.imap._transport import Transport

log = logging.getLogger(__name__)

#: Sockets served per event-loop pass (about 20 µs each for a TLS keepalive).
CHUNK = 256
#: Off where there is no epoll; tests and experiments may turn it off to compare.
ENABLED = hasattr(select, "epoll")

Skip = Callable[[bytes], bool]


@dataclass(slots=True)
class _Parked:
    task: trio.lowlevel.Task
    transport: Transport
    max_bytes: int
    skip: Skip


class SharedReader:
    """The private epoll set and the sessions parked in it (by file descriptor)."""

    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._parked: dict[int, _Parked] = {}
        self._running = False
        #: Reads passed over without waking their session (what the reader saves).
        self.passed_over = 0
        #: Reads handed to their session.
        self.handed_over = 0

    @property
    def parked_count(self) -> int:
        return len(self._parked)

    async def wait(self, transport: Transport, fd: int, max_bytes: int, skip: Skip) -> bytes | None:
        """Parks the calling task until ``transport`` has data that ``skip`` does not pass over
        (returned), or needs its task for something else (None: read again). Cancel-safe:
        nothing is read for a task once it is cancelled."""
        if fd in self._parked:
            raise trio.BusyResourceError("this connection is already waiting")
        self._parked[fd] = _Parked(trio.lowlevel.current_task(), transport, max_bytes, skip)
        try:
            self._epoll.register(fd, select.EPOLLIN)
        except FileExistsError:
            self._epoll.modify(fd, select.EPOLLIN)
        except BaseException:
            del self._parked[fd]
            raise
        if not self._running:
            self._running = True
            trio.lowlevel.spawn_system_task(self._run, name="emlisten shared IMAP idle reader")

        def abort(_: object) -> trio.lowlevel.Abort:
            self._unpark(fd)
            return trio.lowlevel.Abort.SUCCEEDED

        result: bytes | None = await trio.lowlevel.wait_task_rescheduled(abort)
        return result

    def closing(self, fd: int) -> None:
        """``fd`` is about to be closed: its parked read ends with ``ClosedResourceError``."""
        self._hand_back(fd, outcome.Error(trio.ClosedResourceError("the connection was closed")))

    def _unpark(self, fd: int) -> _Parked | None:
        parked = self._parked.pop(fd, None)
        if parked is not None:
            with suppress(OSError, ValueError):
                self._epoll.unregister(fd)
        return parked

    def _hand_back(self, fd: int, result: outcome.Outcome[bytes | None]) -> None:
        """Unpark ``fd`` (if still parked) and wake its task with ``result``."""
        parked = self._unpark(fd)
        if parked is not None:
            trio.lowlevel.reschedule(parked.task, result)

    async def _run(self) -> None:
        try:
            while True:
                await trio.lowlevel.wait_readable(self._epoll.fileno())
                for fd, _ in self._epoll.poll(0, CHUNK):
                    self._serve(fd)
        except Exception:  # a system task must not crash the run: the sessions reconnect
            log.exception("the shared IMAP idle reader failed")
            self._running = False  # the next parked read starts it again
            for fd in list(self._parked):
                self._hand_back(
                    fd, outcome.Error(trio.BrokenResourceError("the shared IMAP idle reader failed"))
                )
        except BaseException:  # cancelled: the run is ending
            self._epoll.close()
            raise

    def _serve(self, fd: int) -> None:
        parked = self._parked.get(fd)
        if parked is None:
            return  # unparked since the poll
        try:
            result = parked.transport._read_for_shared_reader(parked.max_bytes, parked.skip)
        except Exception as exc:  # the connection's own failure: its task raises it
            self._hand_back(fd, outcome.Error(exc))
            return
        if isinstance(result, Stay):
            self.passed_over += 1
            return
        self.handed_over += 1
        self._hand_back(fd, outcome.Value(result))


class Stay:
    """What a read for the shared reader returns when there is nothing for the session: it
    stays parked."""


STAY = Stay()

_READER: trio.lowlevel.RunVar[SharedReader | None] = trio.lowlevel.RunVar("emlisten_shared_idle_reader")


def shared_reader() -> SharedReader | None:
    """The current Trio run's shared reader (made on first use), or None where it is off."""
    if not ENABLED:
        return None
    try:
        return _READER.get()
    except LookupError:
        reader = SharedReader()
        _READER.set(reader)
        return reader
